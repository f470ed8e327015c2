"""The supervisor: manages one host through a host driver, for the switchboard.

    tap.py          ``twistd treadmill-supervisor``: options, ``makeService``
    config.py       SupervisorConfig
    service.py      SupervisorService: the root service; its tree is drawn there
    link.py         the WebSocket link to the switchboard (docs/protocol.md)
    runner.py       JobRunner: the protocol's job semantics, at most one job
    hold.py         which failed jobs' hosts are held for debugging, and a Hold
    outbox.py       EventOutbox: job events, journaled, sent until acknowledged
    snapshots.py    SnapshotRequests: snapshot_job, results sent until acknowledged
    observers.py    IJobObserver: what the runner tells about its jobs
    journal.py      the state directory: current job, event journal, ended jobs
    results.py      console patterns and agent results: the ``results`` stream
    console.py      ConsoleBridge: a console as a TCP service
    joblogs.py      JobLogs: each job's streams, shipped to its log servers
    logship.py      LogShipper: one job's spool and send loops
    jobexposure.py  JobExposure: each job's services, published on its proxies
    exposure.py     the proxy control client and ExposureManager
    dialpool.py     DialPool: pooled data connections to a proxy (control minor 2)
    consolenotices.py  ConsoleNotices: proxies' console clients, to the audit log
    echo.py         an echo service the mock host publishes through proxies
    fetch.py        ImageFetcher (IImageFetcher): jobs' images for the drivers
    blobcache.py    the local blob directory: layout, checks, garbage collection
    leases.py       site image cache leases
    storeclient.py  the OCI client towards registered image stores only
    metrics.py      SupervisorMetrics: a Prometheus registry per supervisor
    drivers/        IHostDriver and IJobReporter; the mock, qemu and serial drivers

``docs/supervisor.md`` is the operator's and the driver author's guide.
"""
