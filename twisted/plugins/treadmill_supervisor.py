from twisted.application.service import ServiceMaker

treadmillSupervisor = ServiceMaker(
    "Treadmill supervisor",
    "treadmill.supervisor.tap",
    "Manages one host (mock, qemu or serial) for the switchboard.",
    "treadmill-supervisor",
)
