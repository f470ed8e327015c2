"""Publishing a job's host-local services through rendezvous proxies: the supervisor's side.

An :class:`ExposureManager` exists for as long as a job runs. For each proxy
the job names (``{"url", "token"}``: the proxy's base URL and a capability
token granting ``publish`` on ``{"type": "tunnel", "name": <job id>}``) it
keeps a control WebSocket up (``ClientService``, capped exponential backoff
with jitter) and publishes every service on it, again after every
reconnect: within the proxy's grace period the tunnels survived and the
answers name the same ports and paths. When a client connects to a tunnel
the proxy sends ``connect``; the manager dials the service's local
``(host, port)`` and the proxy's data port at the same time, sends the data
header, and splices the two with backpressure (``treadmill.common.splice``).
A proxy of control minor 2 names a dial-back ``pool`` size in ``welcome``: the
manager then keeps that many idle data connections open to it
(``dialpool.DialPool``, at most ``pool`` if given), so that a client is joined
at once and only the local service is dialled; ``connect`` remains the
fallback when they are all in use. The wire formats are in ``docs/proxy.md``.

For the supervisor (the lead wires it)::

    exposure = ExposureManager(reactor, job_id,
                               proxies=[{"url": "wss://proxy.example", "token": "…"}],
                               services={"ssh": ("127.0.0.1", 2222)})
    exposure.on_change(lambda endpoints: report(job_id, endpoints))
    exposure.start()
    ...
    await exposure.close()            # the job ended: its tunnels close now

A service is ``(host, port)``, or ``(host, port, True)`` when it
authenticates its users itself (an SSH server): only those get a public TCP
port; the others (consoles, the mock's echo) only a WebSocket URL that needs a
console token for the job (``docs/proxy.md``, "Consoles").

``endpoints`` lists ``{"service", "proxy", "host", "port"?, "url"?, "auth"?}``:
the public TCP port on ``host`` and the WebSocket URL of each published
service on each proxy, and ``auth`` (``service`` or ``token``) as the proxy
answered. ``close(final=False)`` (a supervisor shutting down while its
job lives on) leaves the tunnels to the proxy's grace period instead.

``tools/bench/expose.py`` runs one alone (manual checks, the benchmark).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.common.eager import write_now
from treadmill.common.splice import (
    Splice,
    StreamEnd,
    client_endpoint,
    direct_endpoint,
    join,
    no_delay,
)
from treadmill.common.wsfactory import PreciseClientFactory
from treadmill.common.wsjson import JsonSession, QuietLogger
from treadmill.protocol import proxy as messages
from treadmill.protocol.proxy import CloseCode, parse_proxy_url
from treadmill.supervisor.dialpool import DialPool, PooledEnd

__all__ = ["ExposureManager", "Service", "authenticates"]

Service = tuple[str, int] | tuple[str, int, bool]
"""A host-local service: ``(host, port)``, or ``(host, port, True)`` if it authenticates
its users itself."""


def authenticates(service: Service) -> bool:
    """Whether a service declared that it authenticates its users itself."""
    return len(service) > 2 and service[2] is True  # type: ignore[misc]

_GIVE_UP_FAST = 16  # a failure count that means "wait reconnect_max"


# -- the legs of a connection ---------------------------------------------------------


class _LocalEnd(StreamEnd):
    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)


class _DataEnd(StreamEnd):
    """The data connection to the proxy: the header line first (once the local service
    is connected too: the proxy joins the client on it), then the client's bytes."""

    def __init__(self, header: bytes):
        super().__init__()
        self.header = header

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)


class _OneShot(Factory):
    """A factory of one given protocol (``connectProtocol`` makes a class per call)."""

    noisy = False

    def __init__(self, protocol: Protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class _Rendezvous:
    """One ``connect``: dial the local service and the proxy, join them when both are up."""

    def __init__(self, manager: ExposureManager, link: _ProxyLink, conn_id: str, service: str):
        self.manager = manager
        self.link = link
        self.conn_id = conn_id
        self.service = service
        self.local = _LocalEnd()
        self.data = _DataEnd(messages.data_header(conn_id, link.token))
        self.failed = False

    def start(self, local_endpoint: Any, data_endpoint: Any) -> None:
        local = local_endpoint.connect(_OneShot(self.local))
        data = data_endpoint.connect(_OneShot(self.data))
        local.addErrback(self._local_failed)
        data.addErrback(self._data_failed)
        DeferredList([local, data], consumeErrors=True).addCallback(self._both)

    def _local_failed(self, failure: Failure) -> None:
        self.failed = True
        self.manager.counts["local_failed"] += 1
        text = failure.getErrorMessage()
        self.manager.log.warn("{name}: cannot reach {service} for a client: {error}",
                              name=self.manager.name, service=self.service, error=text)
        self.link.send(messages.connect_failed(self.conn_id, f"{self.service}: {text}"))

    def _data_failed(self, failure: Failure) -> None:
        self.failed = True
        self.manager.counts["data_failed"] += 1
        self.manager.log.warn("{name}: cannot open a data connection to {url}: {error}",
                              name=self.manager.name, url=self.link.url,
                              error=failure.getErrorMessage())

    def _both(self, _: Any) -> None:
        if self.failed:
            for end in (self.local, self.data):
                if end.transport is not None and not end.lost:
                    end.abort()
            return
        self.manager.counts["spliced"] += 1
        if not self.data.lost:
            write_now(self.data.transport, self.data.header)
        splice = join(self.local, self.data, self.manager._splice_closed, self.link)
        if not (self.local.lost or self.data.lost):
            self.manager.splices.add(splice)


# -- the control connection -----------------------------------------------------------


_parse = functools.partial(messages.parse, expect=messages.TO_SUPERVISOR)


class _ControlClient(JsonSession, WebSocketClientProtocol):
    log = QuietLogger(namespace="treadmill.supervisor.exposure.ws")
    violation_code = CloseCode.PROTOCOL_VIOLATION
    factory: Any

    def __init__(self) -> None:
        super().__init__()
        self.handling = False
        self.opened = False
        self.closed: Deferred[None] = Deferred()
        self._wrong_protocol = False

    @property
    def link(self) -> _ProxyLink:
        return self.factory.link  # type: ignore[no-any-return]

    def close(self, code: int, reason: str) -> None:
        self.handling = False
        super().close(code, reason)

    def violation_message(self, text: str) -> dict[str, Any]:
        return messages.protocol_error(text)

    def log_violation(self, text: str) -> None:
        self.link.manager.log.error("{name}: protocol violation by {url}: {error}",
                                    name=self.link.manager.name, url=self.link.url, error=text)

    def connectionMade(self) -> None:
        # The token this connection presents (pooled connections must present it too).
        self.presented = self.factory.headers["Authorization"].removeprefix("Bearer ")
        super().connectionMade()

    def onConnect(self, response: Any) -> None:
        self._wrong_protocol = response.protocol != messages.SUBPROTOCOL

    def onOpen(self) -> None:
        if self._wrong_protocol:
            self.link.failures = _GIVE_UP_FAST
            self.link.manager.log.error("{name}: {url} does not speak {sub}",
                                        name=self.link.manager.name, url=self.link.url,
                                        sub=messages.SUBPROTOCOL)
            self.close(CloseCode.PROTOCOL_VIOLATION, "subprotocol required")
            return
        self.opened = True
        self.handling = True
        self.link.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = self.receive(payload, isBinary, _parse, messages.ProtocolError)
        if message is not None:
            self.link.message(self, message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self.link.closed(self, code, reason)
        finally:
            if not self.closed.called:
                self.closed.callback(None)


class _ProxyLink:
    """One proxy: its control connection, and what it published for us."""

    def __init__(self, manager: ExposureManager, url: str, token: str):
        self.manager = manager
        self.url = url
        self.token = token
        self.secure, self.host, self.port, self.base = parse_proxy_url(url)
        reactor = manager.reactor
        control_url = (f"{self.base}{messages.CONTROL_PATH}?job="
                       f"{quote(manager.job_id, safe='')}")
        self.factory = PreciseClientFactory(
            control_url, protocols=[messages.SUBPROTOCOL], reactor=reactor,
            headers={"Authorization": f"Bearer {token}",
                     messages.MINOR_HEADER: str(messages.MINOR)})
        self.factory.protocol = _ControlClient
        self.factory.link = self
        self.factory.setProtocolOptions(
            autoPingInterval=manager.heartbeat_interval,
            autoPingTimeout=manager.heartbeat_timeout,
            openHandshakeTimeout=manager.heartbeat_timeout,
            maxMessagePayloadSize=messages.MAX_MESSAGE_BYTES,
            maxFramePayloadSize=messages.MAX_MESSAGE_BYTES)
        endpoint = client_endpoint(reactor, self.host, self.port, manager.heartbeat_timeout)
        if self.secure:
            from treadmill.common.tls import client_options

            endpoint = wrapClientTLS(client_options(self.host, manager.ca_file), endpoint)
        initial = manager.reconnect_initial
        self._backoff = backoffPolicy(initial, manager.reconnect_max, factor=2,
                                      jitter=lambda: manager.jitter() * initial)
        self.client = ClientService(endpoint, self.factory, retryPolicy=self._retry_delay,
                                    clock=reactor)
        self.session: _ControlClient | None = None
        self.welcome: dict[str, Any] | None = None
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, tuple[str, str]] = {}
        self.failures = 0
        self.connections = 0  # control sessions opened so far
        self._requests: dict[int, str] = {}
        self._request_id = 0
        self._stopping = False
        self.session_token = token  # the token the current control connection presented
        self._data: tuple[dict[str, Any], Any] | None = None  # (welcome, its data endpoint)
        self.pool = DialPool(reactor, self._dial_pooled,
                             lambda: messages.pool_header(manager.job_id, self.session_token),
                             functools.partial(manager._pool_join, self),
                             backoff=backoffPolicy(0.5, manager.reconnect_max, factor=2,
                                                   jitter=lambda: 0.0))

    def _retry_delay(self, attempt: int) -> float:
        return float(self._backoff(max(0, attempt - 1) + self.failures))

    def start(self) -> None:
        self.client.startService()

    async def stop(self, final: bool) -> None:
        self._stopping = True
        self.pool.stop()
        session = self.session
        if session is not None:
            session.close(CloseCode.NORMAL if final else CloseCode.GOING_AWAY,
                          "job ended" if final else "supervisor going away")
            closed = session.closed
            timer = self.manager.reactor.callLater(
                3.0, lambda: closed.called or closed.callback(None))
            await closed
            if timer.active():
                timer.cancel()
        await self.client.stopService()

    def send(self, message: dict[str, Any]) -> bool:
        return self.session.send(message) if self.session is not None else False

    def data_endpoint(self) -> Any:
        """Where data connections go (after a ``welcome``): its data port, TLS if it says
        (one endpoint per ``welcome``: every data connection dials it)."""
        welcome = self.welcome
        assert welcome is not None
        if self._data is not None and self._data[0] is welcome:
            return self._data[1]
        manager = self.manager
        endpoint: Any = direct_endpoint(manager.reactor, self.host, welcome["data_port"],
                                        manager.connect_timeout)
        if welcome["data_tls"]:
            from treadmill.common.tls import client_options

            endpoint = wrapClientTLS(client_options(self.host, manager.ca_file), endpoint)
        self._data = (welcome, endpoint)
        return endpoint

    def _dial_pooled(self, end: PooledEnd) -> Deferred[Any]:
        return self.data_endpoint().connect(_OneShot(end))  # type: ignore[no-any-return]

    def publish(self, service: str) -> None:
        self._request_id += 1
        self._requests[self._request_id] = service
        target = self.manager.services.get(service)
        self.send(messages.publish(self._request_id, service, tcp=self.manager.tcp,
                                   websocket=self.manager.websocket,
                                   authenticates=target is not None and authenticates(target)))

    def unpublish(self, service: str) -> None:
        self._request_id += 1
        self.send(messages.unpublish(self._request_id, service))

    def set_token(self, token: str) -> None:
        """Use ``token`` from the next (re)connection on (and in data headers)."""
        self.token = token
        self.factory.headers["Authorization"] = f"Bearer {token}"

    # -- from the protocol -----------------------------------------------------------

    def opened(self, session: _ControlClient) -> None:
        self.session = session
        self.connections += 1
        # Pooled connections must present the token this connection did (the proxy
        # recognises it, and verifies no other for them).
        self.session_token = session.presented

    def message(self, session: _ControlClient, message: dict[str, Any]) -> None:
        if session is not self.session:
            return
        kind = message["type"]
        manager = self.manager
        if kind == "welcome":
            if message["job"] != manager.job_id:
                session.close(CloseCode.PROTOCOL_VIOLATION, "wrong job")
                return
            self.welcome = message
            self.failures = 0
            manager.log.info("{name}: connected to proxy {url}", name=manager.name,
                             url=self.url)
            for service in manager.services:
                self.publish(service)
            for service in message.get("published", []):
                if service not in manager.services:  # left over from an earlier run
                    self.unpublish(service)
            offered = message.get("pool", 0)  # minor 2; an older proxy offers none
            self.pool.resize(offered if manager.pool is None else min(offered, manager.pool))
        elif kind == "published":
            self._requests.pop(message["request_id"], None)
            endpoint: dict[str, Any] = {"service": message["service"], "proxy": self.url,
                                        "host": message["host"]}
            if "tcp_port" in message:
                endpoint["port"] = message["tcp_port"]
            if "ws_url" in message:
                endpoint["url"] = message["ws_url"]
            elif "ws_path" in message:
                endpoint["url"] = self.base + message["ws_path"]
            if "auth" in message:
                endpoint["auth"] = message["auth"]
            self.errors.pop(message["service"], None)
            if self.endpoints.get(message["service"]) != endpoint:
                self.endpoints[message["service"]] = endpoint
                manager._changed()
        elif kind == "error":
            service = self._requests.pop(message["request_id"], message.get("service", "?"))
            self.errors[service] = (message["code"], message["message"])
            manager.log.error("{name}: proxy {url} refused to publish {service}: {code}: "
                              "{message}", name=manager.name, url=self.url, service=service,
                              code=message["code"], message=message["message"])
        elif kind == "connect":
            manager._connect(self, message["conn_id"], message["service"])
        elif kind == "console":
            manager._console(self, message)
        elif kind == "protocol_error":
            manager.log.error("{name}: proxy {url} reports a protocol error: {text}",
                              name=manager.name, url=self.url, text=message["message"])

    def closed(self, session: _ControlClient, code: int | None, reason: str | None) -> None:
        if session is self.session:
            self.session = None
            self.welcome = None  # the next connection's welcome says where to dial
            self._requests.clear()
            self.pool.stop()  # the proxy closed its side too
        if self._stopping:
            return
        status = None
        status_line = getattr(session, "http_status_line", None)
        if status_line:
            parts = status_line.split()
            if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
                status = int(parts[1])
        if not session.opened:
            self.failures += 1
            if status is not None:
                self.manager.log.error("{name}: proxy {url} refused the control connection "
                                       "(HTTP {status}); retrying with backoff",
                                       name=self.manager.name, url=self.url, status=status)
            return
        remote = session.remoteCloseCode
        if remote in (CloseCode.PROTOCOL_VIOLATION, CloseCode.SUPERSEDED):
            self.failures += 1
        self.manager.log.info("{name}: control connection to {url} closed ({code}); "
                              "reconnecting", name=self.manager.name, url=self.url,
                              code=remote if remote is not None else code)


# -- the manager ----------------------------------------------------------------------


class ExposureManager:
    """Publishes a job's services on its proxies; see the module docstring.

    :param proxies: ``[{"url": ws(s)/http(s) base URL, "token": capability token}]``.
    :param services: ``{name: (host, port)}`` of the host-local endpoints;
        ``(host, port, True)`` for one that authenticates its users itself.
    :param tcp: publish public TCP ports; :param websocket: publish WebSocket paths.
    :param pool: the most idle pooled data connections to keep per proxy (control
        minor 2); None: as many as each proxy offers; 0: no pool (every client waits
        for a ``connect`` round trip).
    """

    log = Logger()

    def __init__(self, reactor: Any, job_id: str, proxies: Sequence[Mapping[str, str]],
                 services: Mapping[str, Service], *, ca_file: str | None = None,
                 tcp: bool = True, websocket: bool = True, reconnect_initial: float = 1.0,
                 reconnect_max: float = 30.0, heartbeat_interval: float = 10.0,
                 heartbeat_timeout: float = 20.0, connect_timeout: float = 10.0,
                 name: str = "exposure", jitter: Callable[[], float] = random.random,
                 pool: int | None = None):
        for service in services:
            messages.validate(messages.unpublish(0, service))  # a valid service name
        self.reactor = reactor
        self.job_id = job_id
        self.services = dict(services)
        self.ca_file = ca_file
        self.tcp = tcp
        self.websocket = websocket
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.jitter = jitter
        self.pool = pool
        self._locals: dict[tuple[str, int], Any] = {}  # local services' endpoints
        self.links = [_ProxyLink(self, p["url"], p["token"]) for p in proxies]
        self.splices: set[Splice] = set()
        self.counts: dict[str, int] = {"spliced": 0, "local_failed": 0, "data_failed": 0,
                                       "unknown_service": 0, "pool_joined": 0}
        self._callbacks: list[Callable[[list[dict[str, Any]]], None]] = []
        self._console_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._waiters: list[Deferred[list[dict[str, Any]]]] = []
        self._started = False
        self._closed = False

    # -- the API -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect to every proxy and publish (again after every reconnect)."""
        if self._started:
            return
        self._started = True
        for link in self.links:
            link.start()

    async def close(self, final: bool = True) -> None:
        """Stop. ``final`` (the job ended): the proxies close its tunnels at once and the
        connections through them end here; otherwise the proxies keep the tunnels for
        their grace period (a supervisor restart) and live connections are left alone."""
        if self._closed:
            return
        self._closed = True
        await DeferredList([Deferred.fromCoroutine(link.stop(final)) for link in self.links],
                           consumeErrors=True)
        if final:
            for splice in list(self.splices):
                splice.close()
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters = []

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """``{"service", "proxy", "host", "port"?, "url"?}`` per service and proxy."""
        return [dict(link.endpoints[s]) for link in self.links for s in self.services
                if s in link.endpoints]

    @property
    def errors(self) -> list[dict[str, str]]:
        """Services a proxy refused to publish: ``{"service", "proxy", "code", "message"}``."""
        return [{"service": s, "proxy": link.url, "code": code, "message": text}
                for link in self.links for s, (code, text) in sorted(link.errors.items())]

    @property
    def connections(self) -> int:
        """Client connections spliced through right now."""
        return len(self.splices)

    def on_change(self, callback: Callable[[list[dict[str, Any]]], None]) -> None:
        """Call ``callback(endpoints)`` whenever the endpoints change."""
        self._callbacks.append(callback)

    def on_console(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(notice)`` for each console client a proxy reports opened or
        closed (the proxy's ``console`` message, its ``proxy`` URL added; control minor 1)."""
        self._console_callbacks.append(callback)

    def published(self) -> Deferred[list[dict[str, Any]]]:
        """Fires with the endpoints once every service is published on every proxy."""
        if self._complete():
            return succeed(self.endpoints)
        waiter: Deferred[list[dict[str, Any]]] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def set_services(self, services: Mapping[str, Service]) -> None:
        """The host's services are now ``services``: publish the new ones, unpublish
        the ones that went, on every connected proxy (the others on reconnect)."""
        for service in services:
            messages.validate(messages.unpublish(0, service))
        old, self.services = self.services, dict(services)
        changed = False
        for link in self.links:
            for service in old:
                if service not in self.services:
                    link.errors.pop(service, None)
                    changed |= link.endpoints.pop(service, None) is not None
                    if link.welcome is not None:
                        link.unpublish(service)
            for service in self.services:
                if link.welcome is None:
                    continue
                if service not in old or (authenticates(old[service])
                                          != authenticates(self.services[service])):
                    link.publish(service)  # new, or its authentication changed
        if changed:
            self._changed()

    def set_token(self, url: str, token: str) -> None:
        """A fresh token for the proxy at ``url``, used from its next reconnection on."""
        for link in self.links:
            if link.url == url:
                link.set_token(token)

    # -- internals -------------------------------------------------------------------

    def _complete(self) -> bool:
        return all(s in link.endpoints for link in self.links for s in self.services)

    def _changed(self) -> None:
        endpoints = self.endpoints
        for callback in list(self._callbacks):
            try:
                callback(endpoints)
            except Exception:
                self.log.failure("{name}: endpoint callback failed", name=self.name)
        if self._complete():
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(endpoints)

    def _connect(self, link: _ProxyLink, conn_id: str, service: str) -> None:
        target = self.services.get(service)
        if target is None or link.welcome is None or self._closed:
            self.counts["unknown_service"] += 1
            link.send(messages.connect_failed(conn_id, f"no service {service} here"))
            return
        _Rendezvous(self, link, conn_id, service).start(self._local(target),
                                                        link.data_endpoint())

    def _pool_join(self, link: _ProxyLink, data: PooledEnd, service: str) -> Deferred[Any] | None:
        """The proxy joined a client of ``service`` to the pooled connection ``data``:
        dial the service and relay (closing ``data``, and so the client, if it cannot
        be reached: the pooled form of ``connect_failed``)."""
        target = self.services.get(service)
        if target is None or self._closed:
            self.counts["unknown_service"] += 1
            data.abort()
            return None
        self.counts["pool_joined"] += 1
        local = _LocalEnd()
        connecting = self._local(target).connect(_OneShot(local))

        def connected(_: Any) -> None:
            self.counts["spliced"] += 1
            splice = join(local, data, self._splice_closed, link)
            if not (local.lost or data.lost):
                self.splices.add(splice)

        def failed(failure: Failure) -> None:
            self.counts["local_failed"] += 1
            self.log.warn("{name}: cannot reach {service} for a client: {error}",
                          name=self.name, service=service, error=failure.getErrorMessage())
            data.abort()

        connecting.addCallbacks(connected, failed)
        return connecting

    def _local(self, target: Service) -> Any:
        """The endpoint of a local service (made once: every client dials it)."""
        key = (target[0], target[1])
        endpoint = self._locals.get(key)
        if endpoint is None:
            endpoint = self._locals[key] = direct_endpoint(self.reactor, key[0], key[1],
                                                           self.connect_timeout)
        return endpoint

    def _console(self, link: _ProxyLink, message: dict[str, Any]) -> None:
        notice = {k: v for k, v in message.items() if k != "type"}
        notice["proxy"] = link.url
        for callback in list(self._console_callbacks):
            try:
                callback(dict(notice))
            except Exception:
                self.log.failure("{name}: console callback failed", name=self.name)

    def _splice_closed(self, splice: Splice) -> None:
        self.splices.discard(splice)
