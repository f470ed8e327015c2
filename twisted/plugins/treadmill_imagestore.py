from twisted.application.service import ServiceMaker

treadmillImagestore = ServiceMaker(
    "Treadmill image store",
    "treadmill.imagestore.tap",
    "OCI image store: blobs, manifests and tags, with capability-token access.",
    "treadmill-imagestore",
)
