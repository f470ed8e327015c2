from twisted.application.service import ServiceMaker

treadmillSwitchboard = ServiceMaker(
    "Treadmill switchboard",
    "treadmill.switchboard.tap",
    "Central coordinator: users, tokens, hosts, images, jobs and scheduling.",
    "treadmill-switchboard",
)
