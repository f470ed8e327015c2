"""A small OCI Distribution client on treq: blobs and manifests, resumable.

Used by ``tml image push``/``pull`` now, and by supervisors and the image
cache later. It speaks the subset of the OCI Distribution API that
``docs/images.md`` lists:

- the registry token flow: on ``401`` with ``WWW-Authenticate: Bearer
  realm=…,service=…`` it asks for a token and retries with it. It asks only
  for the repository and actions of the operation it performs (``pull`` to
  read, ``pull,push`` to upload, ``delete`` to delete), never the challenge's
  ``scope``. Given the store's registered ``service`` and the switchboard's
  token ``realm`` (how ``tml`` and supervisors build it), it asks that realm
  only, for that service only, and refuses a challenge naming another realm or
  service; HTTP Basic credentials go only to that realm (or, without one, to a
  trusted realm prefix). A pre-made bearer token may be given instead;
- ``503`` answers and refused connections are retried with capped exponential
  backoff and jitter for at most ``retry_time`` seconds (0: ``retries``
  times), other transient failures ``retries`` times;
- blobs: ``HEAD`` (an existing blob is not uploaded again), monolithic upload
  of small blobs, chunked upload (``POST``, ``PATCH`` with ``Content-Range``,
  ``PUT ?digest=``) of large ones, resumed after a failure from the offset the
  store reports (``GET`` on the session → ``Range: 0-N``), ``GET`` into a
  temporary file, verified while streaming, resumed with ``Range`` requests,
  renamed into place only when the digest matches;
- manifests: ``PUT`` and ``GET`` by tag or digest, digests checked.

Bodies are streamed from disk a slice at a time (``FileBodyProducer``), and
files are hashed in a thread, so the reactor never holds a whole blob nor
blocks on hashing one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import treq
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from treadmill.images.format import OCI_INDEX, OCI_MANIFEST, Blob, digest_of, is_digest

USER_AGENT = b"treadmill-images/0.1"
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
MAX_MANIFEST = 4 * 1024 * 1024
READ_SIZE = 64 * 1024
MIN_RATE = 64 * 1024  # bytes/s a request body may take before it times out
MANIFEST_ACCEPT = ", ".join(
    (
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)

# OCI repository names and tags (the distribution spec's grammar), for every role.
COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAMESPACE = re.compile(COMPONENT)
"""One component of a repository name: a namespace (``alice`` of ``alice/fw``)."""
REPOSITORY = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_REPOSITORY = 255

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""

Credentials = tuple[str, str] | Callable[[], Awaitable[tuple[str, str]]]
"""HTTP Basic credentials for a token realm, or an async function returning them."""

T = TypeVar("T")


# -- names ---------------------------------------------------------------------------


def is_repository(name: str) -> bool:
    """Whether ``name`` is a valid OCI repository name."""
    return len(name) <= MAX_REPOSITORY and REPOSITORY.fullmatch(name) is not None


def repository_of(name: str) -> str:
    """The OCI repository for a catalogue image name: the name, lowercased.

    The switchboard grants registry access per repository the same way.
    Raises :class:`ValueError` if the result is not a valid repository name.
    """
    repo = name.lower()
    if not is_repository(repo):
        raise ValueError(
            f"{name!r} does not make a valid OCI repository name (lowercase letters, digits, "
            "'.', '_', '__' or '-' between them, '/' between components)"
        )
    return repo


def parse_reference(text: str, default_tag: str = "latest") -> tuple[str, str]:
    """``NAME[:TAG]`` → ``(NAME, TAG)``; :class:`ValueError` for a malformed tag."""
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, default_tag
    if not TAG.fullmatch(tag):
        raise ValueError(f"invalid tag {tag!r} (letters, digits, '.', '_', '-'; up to 128)")
    if not name:
        raise ValueError(f"no image name in {text!r}")
    return name, tag


def check_store_url(url: str) -> str:
    """``url`` without a final ``/``; :class:`ValueError` unless ``http(s)://HOST[:PORT][/PREFIX]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"an image store URL is http(s)://HOST[:PORT][/PREFIX], not {url!r}")
    return url.rstrip("/")


def canonical_store_url(url: str) -> str:
    """The form stores are registered and compared in: :func:`check_store_url` with a
    lowercase scheme and host (:class:`ValueError` if malformed)."""
    parts = urlsplit(check_store_url(url))
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))


# -- errors ------------------------------------------------------------------------


class RegistryError(Exception):
    """The store answered with an error (OCI ``{"errors": [...]}`` or otherwise)."""

    def __init__(self, status: int | None, code: str, message: str, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.url = url


class RegistryUnreachable(RegistryError):
    """The connection failed, or was lost before a complete answer."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(None, "UNREACHABLE", f"cannot reach {url}: {reason}", url)
        self.reason = reason


class DigestMismatch(RegistryError):
    """Content did not match its digest (or its announced size)."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(None, "DIGEST_INVALID", message, url)


_RETRY_STATUS = frozenset({408, 416, 429, 500, 502, 503, 504})
PULL = ("pull",)
PUSH = ("pull", "push")
DELETE = ("delete",)


def _retryable(error: RegistryError) -> bool:
    return isinstance(error, RegistryUnreachable) or error.status in _RETRY_STATUS


def _unavailable(error: RegistryError) -> bool:
    """The store is down or overloaded for now: retried for a time, not a count."""
    return error.status == 503 or (isinstance(error, RegistryUnreachable)
                                   and error.reason == "connection refused")


def _leaf(exc: BaseException) -> BaseException:
    """What a request failure wraps."""
    while isinstance(exc, RequestGenerationFailed | RequestTransmissionFailed | ResponseFailed
                     | ResponseNeverReceived) and exc.reasons:
        exc = exc.reasons[0].value
    return exc


def _cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is a request cancelled (by its caller, unless a timer of ours did)."""
    return isinstance(_leaf(exc), CancelledError | ierror.ConnectingCancelledError)


def _transport_reason(exc: BaseException) -> str | None:
    """A short reason if ``exc`` means the connection failed, else ``None`` (a
    cancellation is the caller's: ``None`` too)."""
    if isinstance(exc, RequestGenerationFailed) and exc.reasons:
        # Reading the body failed on our side (a local I/O error): worth a retry.
        return f"sending the body failed: {exc.reasons[0].value}"
    leaf = _leaf(exc)
    if isinstance(leaf, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(leaf, ierror.DNSLookupError):
        return f"cannot resolve the host name ({leaf})"
    if isinstance(leaf, ierror.TimeoutError | ierror.TCPTimedOutError):
        return "timed out"
    if isinstance(leaf, ierror.ConnectionDone | ierror.ConnectionLost | PotentialDataLoss):
        return "the connection was closed unexpectedly"
    if isinstance(leaf, ierror.ConnectError):
        return str(leaf) or type(leaf).__name__
    if type(leaf).__module__.startswith(("OpenSSL", "service_identity")):
        return f"TLS error: {leaf}"
    if isinstance(exc, RequestTransmissionFailed | ResponseFailed | ResponseNeverReceived):
        return str(leaf) or type(leaf).__name__
    return None


# -- local blobs ---------------------------------------------------------------------


def hash_file(path: str | os.PathLike[str]) -> Blob:
    """The sha256 digest and size of a file (blocking: call it in a thread)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
            size += len(chunk)
    return Blob("sha256:" + h.hexdigest(), size)


async def file_blob(reactor: Any, path: str | os.PathLike[str]) -> Blob:
    """:func:`hash_file` in the reactor's thread pool."""
    return await deferToThreadPool(reactor, reactor.getThreadPool(), hash_file, path)


class _Slice:
    """A file-like view of ``length`` bytes of ``f`` from ``start``, for FileBodyProducer."""

    def __init__(self, f: IO[bytes], start: int, length: int,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._f = f
        self._start = start
        self._length = length
        self._pos = 0
        self._on_read = on_read
        f.seek(start)

    def read(self, n: int = -1) -> bytes:
        remaining = self._length - self._pos
        if n < 0 or n > remaining:
            n = remaining
        data = self._f.read(n) if n else b""
        self._pos += len(data)
        if data and self._on_read is not None:
            self._on_read(len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(base + offset, self._length))
        self._f.seek(self._start + self._pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._f.close()


@dataclass(frozen=True)
class BlobSource:
    """Where an upload reads a blob from: a file (streamed) or bytes in memory."""

    blob: Blob
    path: str | None = None
    data: bytes | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> BlobSource:
        return cls(Blob(digest_of(data), len(data)), data=data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], blob: Blob) -> BlobSource:
        return cls(blob, path=os.fspath(path))

    def producer(self, offset: int, length: int,
                 on_read: Callable[[int], None] | None = None) -> FileBodyProducer:
        f: IO[bytes] = (io.BytesIO(self.data or b"") if self.path is None
                        else open(self.path, "rb"))
        return FileBodyProducer(_Slice(f, offset, length, on_read), readSize=READ_SIZE)


# -- auth ------------------------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → ``("bearer", {"realm": …, "service": …})``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
    return scheme.lower(), params


def _same_prefix(url: str, prefix: str) -> bool:
    u, p = urlsplit(url), urlsplit(prefix)
    if (u.scheme.lower(), u.netloc.lower()) != (p.scheme.lower(), p.netloc.lower()):
        return False
    base = p.path.rstrip("/")
    return u.path == base or u.path.startswith(base + "/")


@dataclass(frozen=True)
class Manifest:
    """A fetched manifest: its exact bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> Any:
        return json.loads(self.data)


class _Sink(Protocol):
    """Writes a response body to a file and a hash, with an idle timeout."""

    def __init__(self, reactor: Any, write: Callable[[bytes], None], idle: float) -> None:
        self.done: Deferred[None] = Deferred()
        self._reactor = reactor
        self._write = write
        self._idle = idle
        self._timer: Any = None
        self._failed: BaseException | None = None

    def connectionMade(self) -> None:
        self._timer = self._reactor.callLater(self._idle, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._abort(ierror.TimeoutError("no data for %g s" % self._idle))

    def _abort(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            if self.transport is not None:
                self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._failed is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        try:
            self._write(data)
        except BaseException as e:
            self._abort(e)

    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.done.called:
            return
        if self._failed is not None:
            self.done.errback(Failure(self._failed))
        elif reason.check(ResponseDone) or reason.check(PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class RegistryClient:
    """An OCI Distribution client for one store (``{url}/v2/…``).

    ``service`` is the store's registered service name and ``realm`` the
    switchboard's token endpoint (``…/api/v1/registry/token``): with them,
    tokens are asked of ``realm`` only, for ``service`` only, and a challenge
    naming another realm or service is refused (nothing is sent).
    ``credentials`` (user, password — for Treadmill, the user name and API
    token) are sent only to ``realm``, or without one to token realms under one
    of ``trusted_realms`` (URL prefixes), never to the store itself. ``token``
    is a pre-made bearer token, sent to the store as is. Failed uploads and
    downloads are retried ``retries`` times in all (exponential backoff from
    ``backoff`` seconds, at most ``max_backoff``, with jitter), resuming where
    the store says they stopped; a store answering 503 or refusing connections
    is retried until ``retry_time`` seconds have passed instead (``retry_time`` 0:
    ``retries`` times too, for a caller that answers its own client meanwhile);
    ``on_retry(message)`` is told about each retry.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        http: HTTPClient | None = None,
        ca_file: str | None = None,
        credentials: Credentials | None = None,
        token: str | None = None,
        service: str | None = None,
        realm: str | None = None,
        trusted_realms: Sequence[str] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        retry_time: float = 60.0,
        timeout: float = 60.0,
        on_retry: Callable[[str], None] | None = None,
        user_agent: bytes = USER_AGENT,
    ) -> None:
        self.reactor = reactor
        self.base_url = check_store_url(url)
        self.chunk_size = max(1, chunk_size)
        self.retries = max(1, retries)
        self.backoff = backoff
        self.max_backoff = max(backoff, max_backoff)
        self.retry_time = retry_time
        self.timeout = timeout
        self.on_retry = on_retry
        self.user_agent = user_agent
        self.service = service
        self.realm = realm
        if realm is not None and urlsplit(realm).scheme not in ("http", "https"):
            raise ValueError(f"a token realm is an http(s) URL, not {realm!r}")
        self._credentials = credentials
        self._static_token = token
        self._trusted = tuple(trusted_realms)
        self._tokens: dict[str, tuple[str, float, frozenset[str]]] = {}
        self._random = random.Random()
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            if ca_file is not None:
                from treadmill.common.tls import client_policy

                agent = Agent(reactor, contextFactory=client_policy(ca_file), pool=self._pool,
                              connectTimeout=15)
            else:
                agent = Agent(reactor, pool=self._pool, connectTimeout=15)
            http = HTTPClient(agent)
        self._http = http

    async def close(self) -> None:
        """Close idle pooled connections."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- plumbing ------------------------------------------------------------------

    def url(self, repo: str, *segments: str) -> str:
        return f"{self.base_url}/v2/{repo}/" + "/".join(segments)

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self.reactor, seconds, lambda: None)

    def _token_for(self, repo: str, actions: Sequence[str]) -> str | None:
        hit = self._tokens.get(repo)
        if hit is not None and hit[1] > self.reactor.seconds() and hit[2].issuperset(actions):
            return hit[0]
        return self._static_token

    async def _send(self, method: str, url: str, headers: dict[bytes, list[bytes]],
                    body: Any, timeout: float | None, redirects: bool) -> IResponse:
        """The response's head; past ``timeout`` seconds the request is cancelled and
        ``timed out`` (retried by the caller), but a cancellation of the caller stays a
        :class:`CancelledError` (``tml image push`` interrupted by SIGINT used to take
        it for a timeout and go on)."""
        sent = self._http.request(method, url, headers=headers, data=body,
                                  allow_redirects=redirects, unbuffered=True,
                                  reactor=self.reactor)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            sent.cancel()

        timer = self.reactor.callLater(timeout, expire) if timeout else None
        try:
            return await sent
        except Exception as e:
            if expired:
                raise RegistryUnreachable(url, "timed out") from None
            if _cancelled(e):
                raise CancelledError() from None
            reason = _transport_reason(e)
            if reason is None:
                raise
            raise RegistryUnreachable(url, reason) from None
        finally:
            if timer is not None and timer.active():
                timer.cancel()

    async def _request(
        self,
        method: str,
        url: str,
        repo: str,
        *,
        headers: Mapping[bytes, bytes] | None = None,
        body: Callable[[], Any] | None = None,
        ok: Sequence[int] = (200,),
        timeout: float | None = None,
        redirects: bool = False,
        actions: Sequence[str] | None = None,
    ) -> IResponse:
        """Send a request, doing the token flow on a ``401`` once; check the status.

        ``actions`` are what the operation needs on ``repo`` (default: ``pull``
        for reads, ``pull,push`` for writes, ``delete`` for ``DELETE``).
        """
        if actions is None:
            actions = (PULL if method in ("GET", "HEAD") else DELETE if method == "DELETE"
                       else PUSH)
        for attempt in (0, 1):
            h = {b"User-Agent": [self.user_agent]}
            for k, v in (headers or {}).items():
                h[k] = [v]
            token = self._token_for(repo, actions)
            if token:
                h[b"Authorization"] = [b"Bearer " + token.encode("ascii")]
            response = await self._send(method, url, h, body() if body else None,
                                        timeout or self.timeout, redirects)
            if response.code == 401 and attempt == 0:
                challenge = response.headers.getRawHeaders(b"www-authenticate", [b""])[0]
                scheme, params = parse_challenge(challenge.decode("latin-1"))
                if scheme == "bearer" and "realm" in params:
                    await self._discard(response)
                    await self._authenticate(repo, params, url, actions)
                    continue
            if response.code not in ok:
                raise await self._error(response, url)
            return response
        raise AssertionError("unreachable")

    async def _discard(self, response: IResponse) -> None:
        try:
            await treq.content(response)
        except Exception:
            pass

    async def _read(self, response: IResponse, url: str, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0

        def collect(data: bytes) -> None:
            nonlocal total
            total += len(data)
            if total > limit:
                raise RegistryError(response.code, "TOO_LARGE",
                                    f"the response from {url} exceeds {limit} bytes", url)
            chunks.append(data)

        try:
            await treq.collect(response, collect)
        except RegistryError:
            raise
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from None
            reason = _transport_reason(e)
            if reason is None:
                raise
            raise RegistryUnreachable(url, reason) from None
        return b"".join(chunks)

    async def _error(self, response: IResponse, url: str) -> RegistryError:
        status = response.code
        try:
            body = await self._read(response, url, 65536)
        except RegistryError:
            body = b""
        phrase = (response.phrase or b"").decode("latin-1")
        code, message = f"HTTP_{status}", f"HTTP {status} {phrase}"
        try:
            data = json.loads(body)
            if isinstance(data.get("errors"), list) and data["errors"]:
                err = data["errors"][0]
                code, message = str(err.get("code", code)), str(err.get("message", message))
            elif isinstance(data.get("error"), dict):
                err = data["error"]
                code, message = str(err.get("code", code)), str(err.get("message", message))
        except (ValueError, AttributeError, TypeError):
            pass
        return RegistryError(status, code, message.strip(), url)

    async def _authenticate(self, repo: str, params: dict[str, str], url: str,
                            actions: Sequence[str] = PULL) -> None:
        """Get a token for ``actions`` on ``repo`` (never the challenge's scope)."""
        realm = params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(401, "UNAUTHORIZED", f"bad token realm {realm!r} from {url}", url)
        if self.realm is not None and realm != self.realm:
            raise RegistryError(
                401, "UNAUTHORIZED",
                f"the store at {self.base_url} wants a token from {realm}, not from "
                f"{self.realm}; no token was requested", url)
        service = params.get("service")
        if self.service is not None:
            if service != self.service:
                raise RegistryError(
                    401, "UNAUTHORIZED",
                    f"the store at {self.base_url} asks for a token for service "
                    f"{service!r}, but it is registered as {self.service!r}; no token was "
                    "requested", url)
        headers = {b"User-Agent": [self.user_agent], b"Accept": [b"application/json"]}
        if self._credentials is not None:
            if self.realm is None and not any(_same_prefix(realm, p) for p in self._trusted):
                raise RegistryError(
                    401, "UNAUTHORIZED",
                    f"the store at {self.base_url} wants a token from {realm}, which is not "
                    "a trusted token service; credentials were not sent", url)
            creds = self._credentials
            user, password = creds if isinstance(creds, tuple) else await creds()
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers[b"Authorization"] = [b"Basic " + basic.encode("ascii")]
        elif self._static_token is not None:
            raise RegistryError(401, "UNAUTHORIZED", f"{url}: the store refused the token", url)
        held = self._tokens.get(repo)
        wanted = set(actions)
        if held is not None and held[1] > self.reactor.seconds():
            wanted |= held[2]  # one token for everything this client does on repo
        ordered = [a for a in (*PUSH, *DELETE) if a in wanted]
        query = [("service", service)] if service else []
        query.append(("scope", f"repository:{repo}:{','.join(ordered)}"))
        sep = "&" if urlsplit(realm).query else "?"
        token_url = realm + (sep + urlencode(query) if query else "")
        response = await self._send("GET", token_url, headers, None, self.timeout, False)
        if response.code != 200:
            err = await self._error(response, token_url)
            raise RegistryError(
                401, "UNAUTHORIZED", f"token request to {realm} refused: {err.message}", url)
        body = await self._read(response, token_url, 65536)
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            expires_in = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(401, "UNAUTHORIZED", f"no token in the answer of {realm}", url)
        lifetime = max(1.0, min(expires_in, 86400.0) * 0.9)
        self._tokens[repo] = (token, self.reactor.seconds() + lifetime, frozenset(ordered))

    def _give_up(self, e: RegistryError, failures: int, tries: int, started: float) -> bool:
        """Whether the ``failures``-th failure ``e`` ends the operation (``e`` is then
        reworded to say so). ``tries`` 1 never retries (the caller has another store)."""
        if not _retryable(e):
            return True
        if _unavailable(e) and tries > 1 and self.retry_time > 0:
            elapsed = self.reactor.seconds() - started
            if elapsed + self._delay(failures, jitter=False) / 2 <= self.retry_time:
                return False
            e.message = (f"{e.message} (still unavailable after {failures} attempts in "
                         f"{elapsed:.0f} s; giving up)")
            e.args = (e.message,)
            return True
        return failures >= tries

    def _delay(self, failures: int, jitter: bool = True) -> float:
        """Exponential from ``backoff``, capped at ``max_backoff``; jitter takes it down to
        half at random, so that many clients do not come back at once."""
        delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        return delay * self._random.uniform(0.5, 1.0) if jitter else delay

    async def _retrying(self, what: str, op: Callable[[], Awaitable[T]],
                        retries: int | None = None) -> T:
        tries = retries or self.retries
        failures = 0
        started = self.reactor.seconds()
        while True:
            try:
                return await op()
            except RegistryError as e:
                failures += 1
                if self._give_up(e, failures, tries, started):
                    raise
                await self._pause(failures, f"{what}: {e.message}", tries)

    async def _pause(self, failures: int, message: str, tries: int | None = None) -> None:
        delay = self._delay(failures)
        tries = tries or self.retries
        text = f"{message}; retrying in {delay:.2g} s (attempt {failures + 1}"
        text += f"/{tries})" if failures < tries else ")"
        self.log.info("{text}", text=text)
        if self.on_retry is not None:
            self.on_retry(text)
        await self._sleep(delay)

    # -- blobs ----------------------------------------------------------------------

    async def blob_size(self, repo: str, digest: str, actions: Sequence[str] = PULL
                        ) -> int | None:
        """The size of a blob in the store (``HEAD``), or ``None`` if it is not there.

        ``actions``: what the operation it is part of needs (:data:`PUSH` for an upload).
        """
        url = self.url(repo, "blobs", digest)

        async def head() -> int | None:
            response = await self._request("HEAD", url, repo, ok=(200, 404), redirects=True,
                                           actions=actions)
            await self._discard(response)
            if response.code == 404:
                return None
            length = response.headers.getRawHeaders(b"content-length", [b""])[0]
            return int(length) if length.isdigit() else -1

        return await self._retrying(f"HEAD {digest}", head)

    async def push_blob(self, repo: str, source: BlobSource,
                        progress: Progress | None = None) -> bool:
        """Upload a blob unless the store has it; return whether it was uploaded."""
        blob = source.blob
        if await self.blob_size(repo, blob.digest, PUSH) is not None:
            if progress is not None:
                progress(blob.size, blob.size)
            return False
        await self._upload(repo, source, progress)
        return True

    async def push_file(self, repo: str, path: str | os.PathLike[str],
                        blob: Blob | None = None, progress: Progress | None = None
                        ) -> tuple[Blob, bool]:
        """Upload a file (hashed in a thread first unless ``blob`` is given)."""
        if blob is None:
            blob = await file_blob(self.reactor, path)
        uploaded = await self.push_blob(repo, BlobSource.from_file(path, blob), progress)
        return blob, uploaded

    async def push_bytes(self, repo: str, data: bytes) -> Blob:
        """Upload a small blob held in memory."""
        source = BlobSource.from_bytes(data)
        await self.push_blob(repo, source)
        return source.blob

    def _resolve(self, base: str, response: IResponse) -> str:
        location = response.headers.getRawHeaders(b"location", [b""])[0].decode("latin-1")
        if not location:
            raise RegistryError(response.code, "BAD_RESPONSE", f"{base}: no Location header", base)
        return urljoin(base, location)

    @staticmethod
    def _range_end(response: IResponse) -> int | None:
        """The last byte offset of ``Range: 0-N`` (``-1`` for none), or ``None``."""
        value = response.headers.getRawHeaders(b"range", [b""])[0].decode("latin-1")
        m = re.fullmatch(r"\s*(?:bytes=)?0-(-?\d+)\s*", value)
        return int(m.group(1)) if m else None

    async def _start_upload(self, repo: str) -> str:
        url = self.url(repo, "blobs", "uploads", "")
        response = await self._request("POST", url, repo, ok=(202,))
        await self._discard(response)
        return self._resolve(url, response)

    async def _upload_status(self, location: str, repo: str) -> tuple[str, int] | None:
        """``(location, offset)`` of an upload session, or ``None`` if the store forgot it."""
        response = await self._request("GET", location, repo, ok=(200, 204, 404), actions=PUSH)
        await self._discard(response)
        if response.code == 404:
            return None
        end = self._range_end(response)
        new_location = location
        if response.headers.hasHeader(b"location"):
            new_location = self._resolve(location, response)
        # "0-0" is ambiguous (nothing, or one byte): start again from nothing.
        return new_location, (end + 1 if end is not None and end > 0 else 0)

    async def _patch(self, location: str, repo: str, source: BlobSource, offset: int,
                     length: int, progress: Progress | None) -> tuple[str, int]:
        sent = 0

        def on_read(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(offset + sent, source.blob.size)

        def body() -> FileBodyProducer:
            nonlocal sent
            sent = 0
            return source.producer(offset, length, on_read)

        headers = {
            b"Content-Type": b"application/octet-stream",
            b"Content-Range": f"{offset}-{offset + length - 1}".encode(),
        }
        response = await self._request("PATCH", location, repo, headers=headers, body=body,
                                       ok=(202, 204), timeout=self.timeout + length / MIN_RATE)
        await self._discard(response)
        new_location = self._resolve(location, response) if response.headers.hasHeader(
            b"location") else location
        end = self._range_end(response)
        return new_location, (end + 1 if end is not None else offset + length)

    async def _put_blob(self, location: str, repo: str, source: BlobSource,
                        with_body: bool, progress: Progress | None) -> None:
        parts = urlsplit(location)
        query = [*parse_qsl(parts.query, keep_blank_values=True), ("digest", source.blob.digest)]
        url = urlunsplit(parts._replace(query=urlencode(query)))
        size = source.blob.size
        sent = 0

        def on_read(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(sent, size)

        def body() -> Any:
            nonlocal sent
            sent = 0
            return source.producer(0, size, on_read) if with_body else None

        headers = {b"Content-Type": b"application/octet-stream"}
        response = await self._request(
            "PUT", url, repo, headers=headers, body=body, ok=(201, 202, 204),
            timeout=self.timeout + (size / MIN_RATE if with_body else 0))
        await self._discard(response)
        stored = response.headers.getRawHeaders(b"docker-content-digest", [b""])[0].decode()
        if stored and stored != source.blob.digest:
            raise DigestMismatch(f"the store saved {stored} for {source.blob.digest}", url)

    async def _upload(self, repo: str, source: BlobSource, progress: Progress | None) -> None:
        """Upload, resuming after failures from the offset the store reports."""
        blob = source.blob
        location: str | None = None
        offset = 0
        failures = 0
        started = self.reactor.seconds()
        need_status = False
        range_errors = 0
        while True:
            try:
                if location is None:
                    location = await self._start_upload(repo)
                    offset, need_status = 0, False
                elif need_status:
                    status = await self._upload_status(location, repo)
                    need_status = False
                    if status is None:
                        # The store forgot the session: done already, or start over.
                        if await self.blob_size(repo, blob.digest, PUSH) is not None:
                            return
                        location = None
                        continue
                    location, offset = status
                if progress is not None:
                    progress(offset, blob.size)
                if offset == 0 and blob.size <= self.chunk_size:
                    await self._put_blob(location, repo, source, True, progress)
                    return
                while offset < blob.size:
                    n = min(self.chunk_size, blob.size - offset)
                    location, offset = await self._patch(location, repo, source, offset, n,
                                                         progress)
                    failures = range_errors = 0
                    started = self.reactor.seconds()
                await self._put_blob(location, repo, source, False, None)
                return
            except RegistryError as e:
                failures += 1
                if self._give_up(e, failures, self.retries, started):
                    raise
                if e.status == 416:
                    range_errors += 1
                    if range_errors > 1:
                        location = None  # Confused about the offset twice: start over.
                need_status = location is not None
                await self._pause(failures, f"upload of {blob.digest[:19]}: {e.message}")

    async def pull_blob(self, repo: str, digest: str, dest: str | os.PathLike[str], *,
                        size: int | None = None, progress: Progress | None = None) -> Blob:
        """Download a blob to ``dest``, verifying its digest (and ``size``) as it streams.

        The bytes go to a temporary file next to ``dest``, which is renamed to
        ``dest`` only once verified; a lost connection is resumed with a
        ``Range`` request. Raises :class:`DigestMismatch` on bad content.
        """
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        url = self.url(repo, "blobs", digest)
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        f = os.fdopen(fd, "wb")
        state = {"hash": hashlib.sha256(), "received": 0}

        def write(data: bytes) -> None:
            received = state["received"] + len(data)
            if size is not None and received > size:
                raise DigestMismatch(f"blob {digest} is larger than {size} bytes", url)
            f.write(data)
            state["hash"].update(data)
            state["received"] = received
            if progress is not None:
                progress(received, size if size is not None else 0)

        async def attempt() -> None:
            headers = {}
            if state["received"]:
                headers[b"Range"] = f"bytes={state['received']}-".encode()
            response = await self._request("GET", url, repo, headers=headers, ok=(200, 206),
                                           redirects=True)
            if response.code == 200 and state["received"]:
                f.seek(0)
                f.truncate()
                state["hash"], state["received"] = hashlib.sha256(), 0
            elif response.code == 206:
                value = response.headers.getRawHeaders(b"content-range", [b""])[0].decode()
                if not value.startswith(f"bytes {state['received']}-"):
                    await self._discard(response)
                    raise RegistryError(206, "BAD_RESPONSE", f"unexpected Content-Range {value!r}",
                                        url)
            sink = _Sink(self.reactor, write, self.timeout)
            response.deliverBody(sink)
            try:
                await sink.done
            except RegistryError:
                raise
            except Exception as e:
                if _cancelled(e):
                    raise CancelledError() from None
                raise RegistryUnreachable(url, _transport_reason(e) or str(e)) from None
            if size is not None and state["received"] < size:
                raise RegistryUnreachable(
                    url, f"the body ended after {state['received']} of {size} bytes")

        try:
            await self._retrying(f"download of {digest[:19]}", attempt)
            f.flush()
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), os.fsync,
                                    f.fileno())
            f.close()
            got = "sha256:" + state["hash"].hexdigest()
            if got != digest:
                raise DigestMismatch(f"blob {digest} from {url} has digest {got}", url)
            os.replace(tmp, target)
        except BaseException:
            f.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return Blob(digest, state["received"])

    async def get_blob(self, repo: str, digest: str, max_size: int = MAX_MANIFEST) -> bytes:
        """A small blob's bytes, verified."""
        url = self.url(repo, "blobs", digest)

        async def get() -> bytes:
            response = await self._request("GET", url, repo, redirects=True)
            return await self._read(response, url, max_size)

        data = await self._retrying(f"GET {digest[:19]}", get)
        if digest_of(data) != digest:
            raise DigestMismatch(f"blob {digest} from {url} has digest {digest_of(data)}", url)
        return data

    # -- manifests --------------------------------------------------------------------

    async def put_manifest(self, repo: str, reference: str, data: bytes,
                           media_type: str = OCI_MANIFEST) -> str:
        """``PUT`` a manifest by tag or digest; return its digest."""
        url = self.url(repo, "manifests", reference)
        digest = digest_of(data)

        async def put() -> IResponse:
            response = await self._request(
                "PUT", url, repo, headers={b"Content-Type": media_type.encode()},
                body=lambda: data, ok=(200, 201, 202, 204))
            await self._discard(response)
            return response

        response = await self._retrying(f"PUT manifest {reference}", put)
        stored = response.headers.getRawHeaders(b"docker-content-digest", [b""])[0].decode()
        if stored and stored != digest:
            raise DigestMismatch(f"the store saved the manifest as {stored}, not {digest}", url)
        return digest

    async def get_manifest(self, repo: str, reference: str, accept: str = MANIFEST_ACCEPT,
                           *, retries: int | None = None) -> Manifest:
        """``GET`` a manifest by tag or digest, checking its digest.

        ``retries`` overrides the client's (1: fail at once, to try another store).
        """
        url = self.url(repo, "manifests", reference)

        async def get() -> tuple[IResponse, bytes]:
            response = await self._request("GET", url, repo, headers={b"Accept": accept.encode()})
            return response, await self._read(response, url, MAX_MANIFEST)

        response, data = await self._retrying(f"GET manifest {reference}", get, retries)
        digest = digest_of(data)
        if is_digest(reference) and digest != reference:
            raise DigestMismatch(f"manifest {reference} from {url} has digest {digest}", url)
        stored = response.headers.getRawHeaders(b"docker-content-digest", [b""])[0].decode()
        if stored and stored != digest:
            raise DigestMismatch(f"manifest from {url} is {digest}, the store says {stored}", url)
        media_type = response.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        return Manifest(data, media_type.split(";")[0].strip(), digest)
