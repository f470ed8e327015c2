"""Assembling a role's service tree: the root :class:`RoleService`, listeners plus the
optional manhole and metrics, and leaving with a failure status when start-up fails
under twistd (:func:`twistd_service`, the end of every ``makeService``)."""

from __future__ import annotations

import gc
import os
import re
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

#: The file creation mask of every role's process: what it creates is its own
#: (directories 0700, files 0600) unless created with an explicit mode (the image
#: store's blobs, shared with its group).
UMASK = 0o077


class RoleService(MultiService):
    """The root service of a role's process.

    Start-up is the coroutine :meth:`_start` (run by ``startService``);
    :meth:`ready` fires when it is done. With :attr:`exit_on_failure` (twistd sets
    it), a failed start-up logs :attr:`start_failure` and ends the process with
    status 1: systemd restarts it, rather than it staying up and deaf.
    ``_stopping`` tells ``_start`` that a stop began meanwhile.
    """

    log = Logger()
    reactor: Any
    start_failure = "The service cannot start"

    def __init__(self) -> None:
        super().__init__()
        self._ready: Deferred[None] | None = None
        self._stopping = False
        self.exit_on_failure = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._ready = Deferred.fromCoroutine(self._start())
        if self.exit_on_failure:
            self._ready.addErrback(self._start_failed)

    async def _start(self) -> None:
        raise NotImplementedError

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure(self.start_failure, failure)
        exit_failed(self.reactor)

    def ready(self) -> Deferred[None]:
        """Fires when start-up is done."""
        return self._ready if self._ready is not None else succeed(None)


BACKLOG = 1024
"""The listen backlog of a TCP or TLS listener whose description names none (Twisted's
default, 50, makes the kernel drop connections in a burst: a fleet reconnecting, a CI farm
starting its jobs)."""


def with_backlog(desc: str, backlog: int = BACKLOG) -> str:
    """A TCP or TLS listener description with ``backlog=`` (unless it names one)."""
    kind = desc.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and not re.search(r"(^|:)backlog=", desc):
        return f"{desc}:backlog={backlog}"
    return desc


def listeners(reactor: Any, descriptions: list[str], factory: IProtocolFactory,
              name: str) -> MultiService:
    """One ``StreamServerEndpointService`` per endpoint description, under one parent;
    TCP and TLS listeners get a backlog of :data:`BACKLOG` unless they name one."""
    parent = MultiService()
    parent.setName(name)
    for i, desc in enumerate(descriptions):
        endpoint = serverFromString(reactor, with_backlog(desc))
        service = StreamServerEndpointService(endpoint, factory)
        # Fail the start loudly when a port cannot be bound.
        service._raiseSynchronously = True
        service.setName(f"{name}-{i}")
        service.setServiceParent(parent)
    return parent


def add_operator_services(reactor: Any, root: MultiService, values: dict[str, Any],
                          namespace: dict[str, Any], registry: Any = None) -> None:
    """Attach the manhole and ``/metrics`` listeners the configuration asks for.

    ``registry`` is the role's Prometheus registry (default: the global one).
    Once the reactor runs, the start-up heap is frozen (``gc.freeze``): full
    collections under load then skip its objects instead of stalling the
    reactor for tens of milliseconds; later the surviving heap is frozen every
    10 s and collected in full every half hour (:mod:`treadmill.common.gcpolicy`).

    Every role calls this from ``makeService``, so it is also where the
    process-wide settings apply: the HTTP head and idle limits
    (``http.head_timeout``, ``http.idle_timeout``) and the file creation mask
    (:func:`restrict_umask`: what a daemon creates, twistd's ``--logfile``
    included, is not readable by other local users).
    """
    restrict_umask()
    from treadmill.common.http import configure_timeouts

    configure_timeouts(values.get("http.head_timeout", 10.0),
                       values.get("http.idle_timeout", 60.0))
    reactor.callWhenRunning(gc.freeze)
    from treadmill.common.gcpolicy import FreezePolicy

    policy = FreezePolicy(reactor)
    policy.setName("gc-freeze")
    policy.setServiceParent(root)
    if values.get("manhole.listen"):
        from treadmill.common.manhole import manhole_service

        manhole: IService = manhole_service(
            reactor, values["manhole.listen"], values["manhole.authorized_keys"],
            values["manhole.host_key"], namespace)
        manhole.setName("manhole")
        manhole.setServiceParent(root)
    if values.get("metrics.listen"):
        from treadmill.common.metrics import metrics_service

        metrics: IService = metrics_service(reactor, values["metrics.listen"], registry)
        metrics.setName("metrics")
        metrics.setServiceParent(root)


def twistd_service(reactor: Any, root: Any, values: dict[str, Any]) -> IService:
    """The end of every role's ``makeService``: ``root`` leaves the process with status 1
    when its start-up fails (:attr:`RoleService.exit_on_failure`) and gets the manhole
    and ``/metrics`` listeners the settings ask for (:func:`add_operator_services`, with
    ``root.namespace()`` and ``root.metrics.registry``). Returns ``root``."""
    root.exit_on_failure = True
    add_operator_services(reactor, root, values, root.namespace(), root.metrics.registry)
    return root  # type: ignore[no-any-return]


def restrict_umask() -> int:
    """Add :data:`UMASK` to the process's file creation mask (a stricter one, such as
    systemd's ``UMask=0077``, stays); return the new mask."""
    current = os.umask(UMASK)
    os.umask(current | UMASK)
    return current | UMASK


def exit_failed(reactor: Any) -> None:
    """Stop the running reactor, then leave the process with status 1.

    For a role whose start-up failed (a store that cannot be opened, a port that
    cannot be bound): twistd would exit 0 after ``reactor.stop()``, and systemd must
    see the failure rather than a process left up and deaf. Under twistd, services
    start before the reactor runs (a port that cannot be bound fails then): the exit
    then waits until it runs.
    """
    if not reactor.running:
        reactor.callWhenRunning(exit_failed, reactor)
        return
    reactor.addSystemEventTrigger("after", "shutdown", _exit_1)
    reactor.stop()


def _exit_1() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
