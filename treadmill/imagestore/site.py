"""The image store's HTTP site: requests that stream upload bodies to disk.

:class:`RegistryRequest` recognises an upload request when its headers have
arrived and writes its body to the :class:`~treadmill.imagestore.uploads.BodySink`
that :meth:`~treadmill.imagestore.api.RegistryAPI.body_sink` returns, instead
of buffering it; :class:`RegistryChannel` turns away a TLS handshake on a
plain-HTTP listener at once; :func:`registry_site` builds the ``Site`` of a
:class:`~treadmill.imagestore.api.RegistryAPI`.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from twisted.web.http import Request as HTTPRequest

from treadmill.common.http import HardenedChannel, HardenedSite, LimitedRequest
from treadmill.imagestore.api import RegistryAPI
from treadmill.imagestore.errors import error_body
from treadmill.imagestore.uploads import BodySink


class RegistryRequest(LimitedRequest):
    """A request that streams upload bodies to a sink instead of buffering them.

    Other bodies (manifests) are buffered up to ``max_body`` bytes, as by
    :class:`~treadmill.common.http.LimitedRequest`. The request line is
    read from the channel when the headers are complete (``gotLength``),
    which is the moment twisted.web would otherwise pick a buffer.
    """

    body_sink: BodySink | None = None

    @classmethod
    def error_body(cls, status: int, message: str) -> bytes:
        code = {400: "REQUEST_INVALID", 408: "REQUEST_INVALID",
                431: "REQUEST_INVALID"}.get(status, "UNKNOWN")
        return error_body(code, message)

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        registry = getattr(site, "registry", None)
        command = getattr(self.channel, "_command", None)
        path = getattr(self.channel, "_path", None)
        if registry is not None and command is not None and path is not None \
                and self.check_head() is None:
            sink = registry.body_sink(self, command, path)
            if sink is not None:
                self.body_sink = sink
                HTTPRequest.gotLength(self, 0)  # an empty in-memory buffer
                return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_sink is not None:
            self.body_sink.write(data)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body_sink is not None:
            self.body_sink.finish()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        self.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        if self.body_sink is not None:
            self.body_sink.abort()
        super().connectionLost(reason)


class RegistryChannel(HardenedChannel):
    """HTTP/1.1 only (upload streaming relies on its request line), and quick to
    turn away a TLS handshake on a plain-HTTP listener.

    Registry clients told that a store is "insecure" (``--tls-verify=false``)
    try HTTPS first and fall back to HTTP on error; without this, the
    ClientHello would sit in the request-line parser until the client's TLS
    handshake timeout (10 s in skopeo) expired. On an ``ssl:`` listener the
    channel sees decrypted bytes, which never start with ``0x16``.
    """

    _sniffed = False

    def dataReceived(self, data: bytes) -> None:
        if not self._sniffed and data:
            self._sniffed = True
            if data[:1] == b"\x16":
                self.transport.abortConnection()
                return
        super().dataReceived(data)


class RegistrySite(HardenedSite):
    """A ``Site`` whose requests can stream upload bodies to ``registry``."""

    protocol = RegistryChannel
    registry: RegistryAPI


def registry_site(api: RegistryAPI, **kwargs: Any) -> RegistrySite:
    request_class = type("RegistryRequest", (RegistryRequest,), {"max_body": api.max_manifest})
    site = RegistrySite(api.resource(), **kwargs)
    site.requestFactory = request_class
    site.registry = api
    return site
