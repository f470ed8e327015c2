"""The supervisor: manages one host through a host driver, for the switchboard.

    service.py   SupervisorService: the root service and SupervisorConfig
    link.py      the WebSocket link to the switchboard (docs/protocol.md)
    runner.py    JobRunner: the protocol's job semantics, at most one job
    journal.py   the state directory: current job, event journal, ended jobs
    drivers/     IHostDriver and IJobReporter; the mock driver
    tap.py       ``twistd treadmill-supervisor``
    fleet.py     many mock supervisors in one process, for load tests

``docs/supervisor.md`` is the operator's and the driver author's guide.
"""
