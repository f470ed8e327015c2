"""A small client for the switchboard's JSON API (``docs/api.md``), on treq.

Retries (``docs/cli.md``): an idempotent request (``GET``, ``HEAD``, ``PUT``,
``DELETE``, or a ``POST`` with an ``Idempotency-Key``) that fails to connect or
is answered 503 is sent again, backing off with jitter and honouring
``Retry-After``, for at most ``retry_for`` seconds; then the last failure is
reported with how long it was retried. ``POST /api/v1/jobs`` always carries an
``Idempotency-Key`` (a fresh UUID per submission, the same for its retries), so
that a retried submission returns the same job. Other requests are sent once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from treadmill.cli.config import ConfigError, Settings
from treadmill.cli.output import clean
from treadmill.cli.retry import Retry, retry_after_seconds
from treadmill.cli.sse import SSEMessage, SSEParser

USER_AGENT = b"tml/0.1"
# RFC 3986 pchar minus "/": a segment keeps these, everything else is percent-encoded.
_SEGMENT_SAFE = "!$&'()*+,;=:@"
_NO_BODY = object()
IDEMPOTENCY_KEY = b"Idempotency-Key"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_FOR = 30.0  # default seconds an idempotent request is retried
RETRY_INITIAL = 0.5  # the first pause (halved at most by the jitter), doubling to...
RETRY_MAX_DELAY = 8.0  # ...this


class NotUtf8(ValueError):
    """An argument that must go on the wire (a path segment, a query value) is not valid
    UTF-8 text: a usage error."""


def _wire_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise NotUtf8(f"{value!r} is not valid UTF-8") from None
    return value


class ApiError(Exception):
    """The switchboard answered with an error (``{"error": {"code", "message"}}``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """The switchboard could not be reached, or the connection failed."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the switchboard at {url}: {reason}")
        self.url = url
        self.reason = reason


class Cancelled(CancelledError):
    """The caller cancelled what it awaited (an interrupt, or a follower told to stop).

    Unlike a request that timed out, it is never retried and never reported as
    the switchboard being unreachable."""


def cancellable(d: Deferred[Any]) -> Deferred[Any]:
    """``d``, except that cancelling the result cancels ``d`` and fails with
    :class:`Cancelled`, whatever ``d`` fails with then (``ResponseNeverReceived``…)."""
    cancelled = False

    def cancel(_: Deferred[Any]) -> None:
        nonlocal cancelled
        cancelled = True
        d.cancel()

    outer: Deferred[Any] = Deferred(cancel)

    def failed(failure: Failure) -> None:
        outer.errback(Failure(Cancelled()) if cancelled else failure)

    d.addCallbacks(outer.callback, failed)
    return outer


class _Collector(Protocol):
    def __init__(self, finished: Deferred[None], collector: Callable[[bytes], None]):
        self.finished: Deferred[None] | None = finished
        self.collector = collector

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        try:
            self.collector(data)
        except BaseException:
            finished, self.finished = self.finished, None
            self.transport.loseConnection()
            finished.errback(Failure())

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        finished, self.finished = self.finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(None)
        else:
            finished.errback(reason)

    def stop(self) -> None:
        self.finished = None
        if self.transport is not None:
            self.transport.loseConnection()


def collect(response: IResponse, collector: Callable[[bytes], None]) -> Deferred[None]:
    """Like ``treq.collect``, but cancelling it closes the connection at once (so no
    more data reaches ``collector``) and fails with :class:`Cancelled`."""
    protocol: _Collector | None = None

    def cancel(_: Deferred[None]) -> None:
        if protocol is not None:
            protocol.stop()

    finished: Deferred[None] = Deferred(cancel)
    protocol = _Collector(finished, collector)
    response.deliverBody(protocol)
    return cancellable(finished)


T = TypeVar("T")


class RequestOptions(TypedDict, total=False):
    """The keywords of :meth:`ApiClient.request` (defaults: those of ``_send``)."""

    params: Mapping[str, Any] | None
    body: Any
    auth: bool
    idempotency_key: str | None


class _StopWatching(Exception):
    """Raised by a stream callback to close the stream early."""


def _leaf_reason(exc: BaseException) -> BaseException:
    """The underlying failure of a twisted.web wrapper exception."""
    while isinstance(exc, RequestTransmissionFailed | ResponseFailed) and exc.reasons:
        exc = exc.reasons[0].value
    return exc


def _openssl_reason(exc: BaseException) -> str:
    """``certificate verify failed`` rather than ``[('SSL routines', '', '…')]``."""
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [e[-1] for e in errors if isinstance(e, tuple) and e and e[-1]]
    text = "; ".join(reasons) or str(exc) or type(exc).__name__
    if "certificate verify failed" in text:
        text += " (is --ca-file or ca_file set to the switchboard's CA?)"
    return text


def describe_transport_error(exc: BaseException, timeout: float | None = None) -> str | None:
    """A short reason if ``exc`` means the connection failed, else ``None``."""
    leaf = _leaf_reason(exc)
    if isinstance(leaf, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(leaf, ierror.DNSLookupError):
        return f"cannot resolve the host name ({leaf})"
    if isinstance(leaf, ierror.TCPTimedOutError | ierror.TimeoutError):
        return "connection timed out"
    if isinstance(leaf, CancelledError | ierror.ConnectingCancelledError):
        return f"no response within {timeout:g} s" if timeout else "request cancelled"
    if isinstance(leaf, ierror.ConnectionDone | ierror.ConnectionLost):
        return "the connection was closed unexpectedly"
    if isinstance(leaf, ierror.ConnectError):
        return str(leaf)
    if type(leaf).__module__.startswith("OpenSSL"):
        return f"TLS error: {_openssl_reason(leaf)}"
    if type(leaf).__module__.startswith("service_identity"):
        return f"TLS error: the certificate does not match the host name ({leaf})"
    if isinstance(exc, RequestTransmissionFailed | ResponseFailed):
        text = str(leaf)
        return type(leaf).__name__ if not text or _is_repr(text) else text
    return None


def plain_error(exc: BaseException) -> str:
    """Text for people about ``exc``: never a ``Failure`` or exception repr.

    Connection failures get :func:`describe_transport_error`'s short reasons,
    ``OSError`` its ``strerror`` (and file name); text that is a repr (``[<twisted…``,
    ``<…object at 0x…>``) or empty becomes the exception's class name.
    """
    reason = describe_transport_error(exc)
    if reason is not None and not _is_repr(reason):
        return reason
    leaf = _leaf_reason(exc)
    if isinstance(leaf, OSError) and leaf.strerror:
        return f"{leaf.strerror}: {leaf.filename}" if leaf.filename else leaf.strerror
    text = str(leaf)
    return type(leaf).__name__ if not text or _is_repr(text) else text


def _is_repr(text: str) -> bool:
    return "<twisted." in text or "Failure " in text or " object at 0x" in text


def is_transient(exc: BaseException) -> bool:
    """Whether a failed connection may work when tried again (not a TLS failure)."""
    leaf = _leaf_reason(exc)
    module = type(leaf).__module__
    if module.startswith("OpenSSL") or module.startswith("service_identity"):
        return False
    return isinstance(leaf, ierror.ConnectError | ierror.ConnectionLost | ierror.ConnectionDone
                      | ierror.TimeoutError | ierror.ConnectingCancelledError | CancelledError)


async def _error_from(response: IResponse) -> ApiError:
    """Turn an error response into an :class:`ApiError`."""
    status = response.code
    phrase = (response.phrase or b"").decode("latin-1")
    try:
        body = await treq.content(response)
        data = json.loads(body)
        err = data["error"]
        return ApiError(status, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        pass
    if 300 <= status < 400:
        location = response.headers.getRawHeaders(b"location", [b"?"])[0].decode("latin-1")
        return ApiError(status, "redirect", f"the switchboard redirected to {location}")
    return ApiError(status, f"http_{status}", f"HTTP {status} {phrase}".strip())


class ApiClient:
    """Requests to ``{base_url}/api/v1/...`` with a bearer token, JSON in and out.

    Every method raises :class:`ApiError` for an error response and
    :class:`Unreachable` when the connection fails.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        token: str | None,
        http: HTTPClient,
        *,
        pool: HTTPConnectionPool | None = None,
        timeout: float = 60.0,
        retry_for: float = RETRY_FOR,
    ) -> None:
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for
        # Told (once per request) when a request is retried: ``on_retry(text)``.
        self.on_retry: Callable[[str], None] | None = None
        self._http = http
        self._pool = pool

    @classmethod
    def from_settings(cls, reactor: Any, settings: Settings) -> ApiClient:
        """A client with its own connection pool, verifying TLS with ``settings.ca_file``."""
        pool = HTTPConnectionPool(reactor, persistent=True)
        if settings.ca_file:
            from treadmill.common.tls import client_policy

            try:
                policy = client_policy(settings.ca_file)
            except (OSError, ValueError) as e:
                raise ConfigError(f"CA file: {plain_error(e)}") from None
            agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=15)
        else:
            agent = Agent(reactor, pool=pool, connectTimeout=15)
        return cls(reactor, settings.url, settings.token, HTTPClient(agent), pool=pool,
                   retry_for=settings.retry_for)

    async def close(self) -> None:
        """Close idle connections."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    def url(self, segments: Sequence[str]) -> str:
        """The URL of an API path; each segment is percent-encoded (``/`` too)."""
        return self.base_url + "/api/v1/" + "/".join(
            quote(_wire_text(s), safe=_SEGMENT_SAFE) for s in segments)

    def _headers(self, accept: bytes, auth: bool) -> dict[bytes, list[bytes]]:
        headers = {b"Accept": [accept], b"User-Agent": [USER_AGENT]}
        if auth and self.token:
            headers[b"Authorization"] = [b"Bearer " + self.token.encode("utf-8")]
        return headers

    def _retrying(self, retry: Retry, what: str, delay: float) -> None:
        if retry.failures == 1 and self.on_retry is not None:
            self.on_retry(f"tml: {what}; retrying for up to {self.retry_for:g} s")

    async def _send(
        self,
        method: str,
        segments: Sequence[str],
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = _NO_BODY,
        auth: bool = True,
        accept: bytes = b"application/json",
        stream: bool = False,
        idempotency_key: str | None = None,
    ) -> IResponse:
        kwargs: dict[str, Any] = {}
        if body is not _NO_BODY:
            kwargs["json"] = body
        if params:
            kwargs["params"] = {k: _wire_text(str(v)) for k, v in params.items()
                                if v is not None}
        headers = self._headers(accept, auth)
        if idempotency_key is not None:
            headers[IDEMPOTENCY_KEY] = [idempotency_key.encode("ascii")]
        retry: Retry | None = None
        if method in IDEMPOTENT_METHODS or idempotency_key is not None:
            retry = Retry(self.reactor, give_up_after=self.retry_for, initial=RETRY_INITIAL,
                          max_delay=RETRY_MAX_DELAY)
            retry.since = self.reactor.seconds()  # the bound counts from the first attempt
        while True:
            try:
                response = await cancellable(self._http.request(
                    method,
                    self.url(segments),
                    headers=headers,
                    allow_redirects=False,
                    unbuffered=stream,
                    # A stream may rightly stay silent until the next event: no timeout.
                    timeout=None if stream else self.timeout,
                    reactor=self.reactor,
                    **kwargs,
                ))
            except Cancelled:
                raise
            except Exception as e:
                reason = describe_transport_error(e, self.timeout)
                if reason is None:
                    raise
                transient = retry is not None and is_transient(e)
                delay = retry.next_delay() if transient and retry is not None else None
                if delay is None:
                    if retry is not None and retry.failures > 1:
                        reason = f"{reason} ({retry.summary()})"
                    raise Unreachable(self.base_url, reason) from None
                assert retry is not None
                self._retrying(retry, f"cannot reach the switchboard at {self.base_url}: "
                               f"{reason}", delay)
                await retry.sleep(delay)
                continue
            if 200 <= response.code < 300:
                return response
            try:
                error = await _error_from(response)
            except (ResponseFailed, ierror.ConnectionLost) as e:
                reason = plain_error(e)
                raise Unreachable(self.base_url, reason) from None
            if response.code != 503 or retry is None:
                raise error
            wait = retry_after_seconds(
                (response.headers.getRawHeaders(b"retry-after") or [None])[-1])
            delay = retry.next_delay(wait)
            what = f"the switchboard is unavailable (HTTP 503: {clean(error.message)})"
            if delay is None:
                raise Unreachable(self.base_url, f"{what}; {retry.summary()}")
            self._retrying(retry, what, delay)
            await retry.sleep(delay)

    async def _reading(self, body: Awaitable[T]) -> T:
        """Await the reading of a response body: a broken connection is :class:`Unreachable`."""
        try:
            return await body
        except Cancelled:
            raise
        except Exception as e:
            reason = describe_transport_error(e)
            if reason is None:
                raise
            raise Unreachable(self.base_url, reason) from None

    async def request(self, method: str, segments: Sequence[str],
                      **options: Unpack[RequestOptions]) -> Any:
        """Send a request; return the decoded JSON body, or ``None`` for 204.

        ``params`` go in the query string (``None`` values are left out), ``body`` is sent as
        JSON, ``auth=False`` sends no token. With ``idempotency_key`` (sent as
        ``Idempotency-Key``) a ``POST`` is retried like an idempotent request;
        ``POST /api/v1/jobs`` always gets one.
        """
        if (options.get("idempotency_key") is None and method == "POST"
                and tuple(segments) == ("jobs",)):
            options["idempotency_key"] = str(uuid.uuid4())
        response = await self._send(method, segments, **options)
        content = await self._reading(cancellable(treq.content(response)))
        if response.code == 204 or not content.strip():
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise ApiError(
                response.code, "bad_response", "the switchboard's response is not JSON"
            ) from None

    async def get(self, *segments: str, params: Mapping[str, Any] | None = None) -> Any:
        """``GET`` an API path."""
        return await self.request("GET", segments, params=params)

    async def post(self, *segments: str, body: Any = _NO_BODY, auth: bool = True) -> Any:
        """``POST`` to an API path, with a JSON body if given."""
        return await self.request("POST", segments, body=body, auth=auth)

    async def put(self, *segments: str, body: Any) -> Any:
        """``PUT`` a JSON body."""
        return await self.request("PUT", segments, body=body)

    async def patch(self, *segments: str, body: Any) -> Any:
        """``PATCH`` with a JSON body."""
        return await self.request("PATCH", segments, body=body)

    async def delete(self, *segments: str) -> Any:
        """``DELETE`` an API path."""
        return await self.request("DELETE", segments)

    async def watch(
        self,
        segments: Sequence[str],
        on_message: Callable[[SSEMessage], bool],
        *,
        params: Mapping[str, Any] | None = None,
    ) -> bool:
        """Follow a Server-Sent Events stream, calling ``on_message`` for each message.

        ``on_message`` returns true to stop; the stream is then closed. Returns
        whether it stopped that way (``False``: the server ended the stream).
        """
        response = await self._send(
            "GET", segments, params=params, accept=b"text/event-stream", stream=True
        )
        parser = SSEParser()

        def collector(data: bytes) -> None:
            for message in parser.feed(data):
                if on_message(message):
                    raise _StopWatching()

        try:
            await self._reading(collect(response, collector))
        except _StopWatching:
            return True
        for message in parser.close():
            if on_message(message):
                return True
        return False
