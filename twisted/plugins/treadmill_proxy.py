from twisted.application.service import ServiceMaker

treadmillProxy = ServiceMaker(
    "Treadmill proxy",
    "treadmill.proxy.tap",
    "Rendezvous proxy: publishes supervisors' host-local ports on public TCP ports and "
    "WebSocket paths.",
    "treadmill-proxy",
)
