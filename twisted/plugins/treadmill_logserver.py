from twisted.application.service import ServiceMaker

treadmillLogserver = ServiceMaker(
    "Treadmill log server",
    "treadmill.logserver.tap",
    "Stores job logs pushed by supervisors and serves them to readers, live.",
    "treadmill-logserver",
)
