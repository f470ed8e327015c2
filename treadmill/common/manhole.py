"""An SSH manhole: a Python shell inside a running daemon, for operators.

The shell is a :class:`twisted.conch.manhole.ColoredManhole` whose namespace
holds the role's live service objects, with an interpreter that accepts
``await`` at top level (:class:`AsyncManholeInterpreter`): an awaited
expression, or an expression whose value is a coroutine or a Deferred, is
awaited and its result printed when it arrives. Sessions without a terminal
(``ssh host 'expr'``, or lines piped to ``ssh host``) run their lines in order,
each waiting for the previous one's result, and end with exit status 1 if any
line raised. Logins are by public key only, against
an OpenSSH ``authorized_keys`` file that is re-read at every login (any user
name is accepted; the key decides). Each login is logged with the user name and
the key's fingerprint (the session's *operator*); a namespace value wrapped in
:class:`PerSession` is made for each session from its operator, so that what a
helper records can say who acted. The host key is generated on first start
(Ed25519, mode 0600) and reused afterwards, so clients can pin it.

Listeners must be loopback TCP or UNIX sockets; ``config.RoleOptions`` checks
this for ``manhole.listen``.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from treadmill.common.deferreds import fork
from treadmill.common.files import write_atomically

__all__ = ["AsyncManholeInterpreter", "AuthorizedKeysFile", "PerSession", "describe_namespace",
           "load_or_create_host_key", "manhole_factory", "manhole_service",
           "session_namespace"]

log = Logger()


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """The keys of an OpenSSH ``authorized_keys`` file, for every user name.

    The file is read at each login so that edits apply without a restart; an
    unreadable file authorises nobody.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> list[keys.Key]:
        """Parse the file; raise ``OSError`` if it cannot be read."""
        with open(self.path, "rb") as f:
            return list(readAuthorizedKeyFile(f))

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        try:
            return self.read()
        except OSError as e:
            log.error("cannot read manhole authorized keys {path}: {error}",
                      path=self.path, error=e.strerror)
            return []


def load_or_create_host_key(path: str) -> keys.Key:
    """Load the SSH host key at ``path``, generating an Ed25519 key first if absent."""
    if not os.path.exists(path):
        private = ed25519.Ed25519PrivateKey.generate()
        data = private.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        )
        write_atomically(path, data)
        log.info("generated manhole host key {path} ({fingerprint})",
                 path=path, fingerprint=keys.Key(private).fingerprint(
                     keys.FingerprintFormats.SHA256_BASE64))
    return keys.Key.fromFile(path)


class PerSession:
    """A namespace value made for each session: ``make(operator)`` (the user name and
    key fingerprint the session logged in with) returns what the session sees."""

    def __init__(self, make: Callable[[str], Any]) -> None:
        self.make = make
        self.__doc__ = inspect.getdoc(make("")) or ""
        self.shown = make("")  # what help_manhole() describes


def session_namespace(namespace: dict[str, Any], operator: str) -> dict[str, Any]:
    """A session's copy of ``namespace``: :class:`PerSession` values made for
    ``operator``, which is also bound to ``operator``."""
    copy = {name: value.make(operator) if isinstance(value, PerSession) else value
            for name, value in namespace.items()}
    copy["operator"] = operator
    return copy


class _KeyChecker(SSHPublicKeyChecker):
    """Public keys from ``authorized_keys``; a login's avatar id is its operator,
    ``"USER SHA256:…"``, and each login is logged."""

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
        d = super().requestAvatarId(credentials)
        if credentials.signature is None:
            return d  # the client only asks whether the key would do

        def accepted(username: bytes) -> bytes:
            operator = _operator(username, credentials.blob)
            log.info("manhole login: {operator}", operator=operator)
            return operator.encode("utf-8")

        def refused(failure: Failure) -> Failure:
            log.warn("manhole login refused: {operator}",
                     operator=_operator(credentials.username, credentials.blob))
            return failure

        return d.addCallbacks(accepted, refused)


def _operator(username: bytes, blob: bytes) -> str:
    try:
        fingerprint = keys.Key.fromString(blob).fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    except keys.BadKeyError:
        fingerprint = "unknown key"
    return f"{username.decode('utf-8', 'replace')[:64]} {fingerprint}"


class _User(manhole_ssh.TerminalUser):
    """A logged-in operator (``operator``: the avatar id :class:`_KeyChecker` made)."""

    def __init__(self, original: Any, avatarId: bytes) -> None:
        super().__init__(original, avatarId)
        self.operator = avatarId.decode("utf-8", "replace")


class AsyncManholeInterpreter(manhole.ManholeInterpreter):
    """Conch's manhole interpreter, with top-level ``await``.

    Source is compiled with ``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``; code that
    awaits runs as a Deferred, step by step with the shell's ``stdout`` and
    display hook in place, so ``await x`` and ``print(await x)`` show their
    output in the session. An expression whose value is a coroutine or an
    unfired Deferred is awaited too, and its result shown (and bound to ``_``)
    when it arrives. ``errors`` counts the lines that raised; ``pending()``
    is what the last lines still wait for.
    """

    def __init__(self, handler: Any, locals: dict[str, Any] | None = None,
                 filename: str = "<manhole>") -> None:
        super().__init__(handler, locals, filename)
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.errors = 0
        self._waiting: list[Deferred[None]] = []
        self._late = False  # running a step after the line's prompt came back
        # print() goes through write() too, so late output is marked as such.
        self.monkeyPatcher.addPatch(sys, "stdout", _Stdout(self))

    def runcode(self, code: Any) -> None:
        with self.monkeyPatcher:
            try:
                result = eval(code, self.locals)
            except BaseException:  # SystemExit too: it must not end the daemon.
                self.showtraceback()
                return
        if code.co_flags & inspect.CO_COROUTINE:
            self._await(result, show=False)

    def displayhook(self, obj: Any) -> None:
        if inspect.iscoroutine(obj) or (isinstance(obj, Deferred) and not obj.called):
            self._await(obj, show=True)
        elif isinstance(obj, Deferred):
            # Already fired: show the result it holds now, without consuming it.
            self.locals["_"] = obj
            self.write(repr(obj))
        else:
            super().displayhook(obj)

    def showtraceback(self) -> None:
        self.errors += 1
        error = sys.exc_info()[1]
        if error is not None:
            self.write(self._format(error))

    def write(self, data: str, isAsync: bool | None = None) -> None:
        super().write(data, isAsync or self._late)

    def _format(self, error: BaseException) -> str:
        """The traceback of ``error`` from the operator's code on (no shell frames)."""
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != self.filename:
            tb = tb.tb_next
        return "".join(traceback.format_exception(
            type(error), error, tb if tb is not None else error.__traceback__))

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        self.errors += 1
        super().showsyntaxerror(filename, **kwargs)

    def pending(self) -> Deferred[Any] | None:
        """A Deferred that fires when every result still awaited has been shown."""
        self._waiting = [d for d in self._waiting if not d.called]
        return DeferredList(list(self._waiting)) if self._waiting else None

    def cancel(self) -> None:
        """Cancel every result still awaited (each shows a ``CancelledError``)."""
        for d in list(self._waiting):
            d.cancel()

    def _stepped(self, awaitable: Any) -> Generator[Any, Any, Any]:
        """Drive ``awaitable`` one step at a time with the shell's patches applied."""
        if isinstance(awaitable, Deferred):
            return (yield fork(awaitable))
        value: Any = None
        error: BaseException | None = None
        first = True
        while True:
            self._late = not first
            first = False
            with self.monkeyPatcher:
                try:
                    step = awaitable.throw(error) if error is not None else awaitable.send(value)
                except StopIteration as stop:
                    return stop.value
                finally:
                    self._late = False
            try:
                value, error = (yield step), None
            except BaseException as e:
                value, error = None, e

    def _await(self, awaitable: Any, show: bool) -> None:
        synchronous = [True]

        def done(result: Any) -> None:
            if show:
                self.locals["_"] = result
                if result is not None:
                    self.write(repr(result), not synchronous[0])

        def failed(failure: Failure) -> None:
            self.errors += 1
            self.write(self._format(failure.value), not synchronous[0])

        d: Deferred[None] = Deferred.fromCoroutine(self._stepped(awaitable))
        d.addCallbacks(done, failed)
        synchronous[0] = False
        if not d.called:
            self._waiting.append(d)


class _Stdout(manhole.FileWrapper):
    """``sys.stdout`` in the shell: text to the interpreter's ``write``."""

    def write(self, data: str) -> None:
        self.o.write(data.replace("\r\n", "\n"))


class _AsyncManhole(manhole.ColoredManhole):
    """The interactive shell, with :class:`AsyncManholeInterpreter`. While a line
    waits for a result the prompt is held back and lines typed ahead wait their
    turn; Ctrl-C cancels the wait."""

    _gone = False  # the connection is lost

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = AsyncManholeInterpreter(self, self.namespace)
        self._queued: deque[bytes] = deque()
        self._waiting: Deferred[Any] | None = None

    def lineReceived(self, line: bytes) -> None:
        if self._waiting is not None:
            self._queued.append(line)
            return
        self.pn = bool(self.interpreter.push(line))
        waiting = self.interpreter.pending()
        if waiting is not None:
            self._waiting = waiting
            waiting.addBoth(self._resume)
            return
        self._prompt()

    def _prompt(self) -> None:
        if self._needsNewline():
            self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])

    def _resume(self, _: object) -> None:
        self._waiting = None
        if self._gone:
            return
        self._prompt()
        while self._queued and self._waiting is None:
            self.lineReceived(self._queued.popleft())

    def handle_INT(self) -> None:
        if self._waiting is None:
            super().handle_INT()
            return
        self._queued.clear()
        self.interpreter.resetBuffer()
        self.pn = 0
        self.interpreter.cancel()

    def connectionLost(self, reason: Any) -> None:
        # What the session still waits for runs on (a drain half done is worse); its
        # output has nowhere to go.
        self._gone = True
        self._queued.clear()
        super().connectionLost(reason)

    def addOutput(self, data: Any, isAsync: bool | None = None) -> None:
        if self._gone:
            return
        if self._waiting is not None:
            isAsync = False  # no prompt shown: write in place
        elif isAsync and not data.strip():
            return  # a late print()'s own newline would redraw the prompt once more
        super().addOutput(data, isAsync)


class _LineSession:
    """A session without a terminal: Python lines from an exec request or standard
    input, run in order, results printed as plain text, then an exit status."""

    def __init__(self, proto: Any, namespace: dict[str, Any], command: bytes | None) -> None:
        self.proto = proto
        self.interpreter = AsyncManholeInterpreter(self, namespace)
        self.lines: deque[bytes] = deque()
        self.partial = b""
        self.eof = False
        self.more = False
        self.busy = False
        self.finished = False
        self.last = b"\n"
        proto.makeConnection(manhole_ssh._Glue(
            write=self.dataReceived, loseConnection=self.closed, name="manhole line session"))
        if command is not None:
            self.dataReceived(command + b"\n")
            self.eofReceived()

    def addOutput(self, data: str | bytes, isAsync: bool | None = None) -> None:
        """Called by the interpreter for everything it prints."""
        if self.finished or not data:
            return
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
        self.last = raw
        self.proto.write(raw)

    def _end_line(self) -> None:
        if not self.last.endswith(b"\n"):
            self.addOutput(b"\n")

    def dataReceived(self, data: bytes) -> None:
        if self.eof:
            return  # an exec request's standard input, or data after EOF: not code
        *lines, self.partial = (self.partial + data).split(b"\n")
        self.lines.extend(line.rstrip(b"\r") for line in lines)
        self._pump()

    def eofReceived(self) -> None:
        if self.eof:
            return
        if self.partial:
            self.lines.append(self.partial.rstrip(b"\r"))
            self.partial = b""
        self.eof = True
        self._pump()

    def closed(self) -> None:
        self.finished = True

    def _pump(self) -> None:
        if self.busy or self.finished:
            return
        while self.lines or (self.eof and self.more):
            # At the end of the input an unfinished block is closed by an empty line.
            line = self.lines.popleft() if self.lines else b""
            self.more = bool(self.interpreter.push(line))
            if self.finished:
                return
            waiting = self.interpreter.pending()
            if waiting is not None:
                self.busy = True
                waiting.addBoth(self._resume)
                return
            self._end_line()
        if self.eof:
            self.finished = True
            status = 1 if self.interpreter.errors else 0
            reason = ProcessTerminated(exitCode=status) if status else ProcessDone(None)
            self.proto.processEnded(Failure(reason))

    def _resume(self, _: object) -> None:
        self.busy = False
        self._end_line()
        self._pump()


class _TerminalSession(manhole_ssh.TerminalSession):
    """Conch's terminal session, with window resizes and EOF handled, not logged as
    errors, and sessions without a pty (exec requests, piped input) run line by line."""

    _transport: manhole_ssh.TerminalSessionTransport | None = None
    _lines: _LineSession | None = None
    _pty = False

    def getPty(self, term: bytes, windowSize: tuple[int, ...], attrs: Any) -> None:
        super().getPty(term, windowSize, attrs)
        self._pty = True

    def _namespace(self) -> dict[str, Any]:
        return session_namespace(self.chainedProtocolFactory.namespace,
                                 getattr(IConchUser(self.original), "operator", ""))

    def openShell(self, proto: Any) -> None:
        if not self._pty:
            self._lines = _LineSession(proto, self._namespace(), None)
            return
        namespace = self._namespace()
        self._transport = self.transportFactory(
            proto, insults.ServerProtocol(_AsyncManhole, namespace), IConchUser(self.original),
            self.width, self.height)

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        self._lines = _LineSession(proto, self._namespace(), cmd)

    def windowChanged(self, newWindowSize: tuple[int, int, int, int]) -> None:
        self.height, self.width = newWindowSize[:2]
        if self._transport is not None:
            terminal = self._transport.chainedProtocol.terminalProtocol
            terminal.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        if self._lines is not None:
            self._lines.eofReceived()

    def closed(self) -> None:
        if self._lines is not None:
            self._lines.closed()


class _ManholeProtocolFactory:
    """Builds the terminal protocol for one session."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def __call__(self) -> insults.ServerProtocol:
        return insults.ServerProtocol(_AsyncManhole, self.namespace)


def describe_namespace(namespace: dict[str, Any]) -> str:
    """One line per name: a function's first docstring line, else the object's type."""
    lines = []
    for name in sorted(namespace):
        if name.startswith("_"):
            continue
        obj = namespace[name]
        if isinstance(obj, PerSession):
            obj = obj.shown
        doc = inspect.getdoc(obj) if inspect.isroutine(obj) else None
        if doc:
            call = "() [await]" if inspect.iscoroutinefunction(obj) else "()"
            lines.append(f"{name + call:<24} {doc.splitlines()[0]}")
        else:
            lines.append(f"{name:<24} {type(obj).__module__}.{type(obj).__qualname__}")
    return "\n".join(lines)


def manhole_factory(
    authorized_keys: str, host_key: str, namespace: dict[str, Any]
) -> manhole_ssh.ConchFactory:
    """The SSH server factory of a manhole; fails early if a key file is unusable."""
    keydb = AuthorizedKeysFile(authorized_keys)
    keydb.read()

    def help_manhole() -> None:
        """Print what this namespace holds: helpers with their first docstring line."""
        print(describe_namespace(namespace))

    namespace.setdefault("help_manhole", help_manhole)
    key = load_or_create_host_key(host_key)

    realm = manhole_ssh.TerminalRealm()
    realm.userFactory = _User
    realm.sessionFactory = _TerminalSession
    realm.chainedProtocolFactory = _ManholeProtocolFactory(namespace)
    factory = manhole_ssh.ConchFactory(portal.Portal(realm, [_KeyChecker(keydb)]))
    # ConchFactory's key maps are class attributes: never mutate those.
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    return factory


def manhole_service(
    reactor: IReactorCore,
    endpoints: list[str],
    authorized_keys: str,
    host_key: str,
    namespace: dict[str, Any],
) -> MultiService:
    """An SSH manhole listening on each endpoint description in ``endpoints``.

    ``namespace`` is shared by all sessions and is not copied: objects added
    to it later are visible too.
    """
    factory = manhole_factory(authorized_keys, host_key, namespace)
    service = MultiService()
    for desc in endpoints:
        StreamServerEndpointService(serverFromString(reactor, desc), factory).setServiceParent(
            service)
    return service
