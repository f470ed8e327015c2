"""Link registration in batches: the links of many hosts recorded in one statement.

A fleet that comes back at once (a failover, a restart) would otherwise cost two
statements per link (find the host by its token, record the link), each a round
trip through the pool. :class:`LinkRegistrar` collects the registrations that
arrive while earlier ones are being written and writes them together
(:meth:`~treadmill.switchboard.store.links.LinkQueries.register_links`): one
statement finds every host by its token and records its link. With nothing in
flight a registration is written at once (in the same reactor turn's batch), so
a lone link waits for nobody.

At most ``concurrency`` batches are in flight; a registration never waits more
than ``max_wait`` seconds for one to finish (a batch stalled on a locked row does
not hold up the others for long). A token is in one batch at a time (a second
registration of it waits until the first is written: the later one wins). A
batch that fails is written again one link at a time, so that one host's error
(a lock timeout, a deadlock) fails only its own handshake (with the database
away, each fails at once).

Links that end together (a balancer restarted, a network blip, a rebalance) are
forgotten together too (:meth:`LinkRegistrar.ended`, a
:class:`~treadmill.switchboard.batching.Batcher` of
:meth:`~treadmill.switchboard.store.links.LinkQueries.links_disconnected`): the links
ending while a write is in flight are written by the next one statement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.switchboard.batching import Batcher
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.store import Store

__all__ = ["LinkRegistrar"]

_Entry = tuple[bytes, str, Deferred]


class LinkRegistrar:
    """Registers links in batches for ``instance`` (``instance_id()`` at each write)."""

    log = Logger()

    def __init__(self, reactor: Any, store: Store, instance: str,
                 instance_id: Callable[[], str | None], *, concurrency: int = 2,
                 max_batch: int = 256, max_wait: float = 0.05):
        self.reactor = reactor
        self.store = store
        self.instance = instance
        self.instance_id = instance_id
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._waiting: list[_Entry] = []
        self._in_flight = 0
        self._writing: set[bytes] = set()  # tokens of the batches in flight
        self._call: Any = None  # the pending flush
        self.batches = 0  # statements written (batches, and single links after a failure)
        self.registered = 0
        self.largest = 0  # the largest batch so far
        self._ends: Batcher[tuple[int, str], None] = Batcher(reactor, self._forget,
                                                             concurrency=1)

    def register(self, digest: bytes, session: str) -> Deferred[dict | None]:
        """Record that this instance holds, as ``session``, the link of the host whose
        token hashes to ``digest``; its row (``id``, ``name``), or None for no such host."""
        done: Deferred[dict | None] = Deferred()
        self._waiting.append((digest, session, done))
        if self._in_flight < self.concurrency:
            self._schedule(0)  # this turn's arrivals together
        else:
            self._schedule(self.max_wait)
        return done

    async def ended(self, host_id: int, session: str) -> None:
        """Forget the link ``session`` of host ``host_id`` (unless a newer session
        superseded it), with the others ending meanwhile."""
        await self._ends.submit((host_id, session))

    @property
    def end_batches(self) -> int:
        """Statements that forgot ended links."""
        return self._ends.batches

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- internals ---------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self.reactor.seconds() + delay:
                return
            self._call.cancel()
        self._call = self.reactor.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._call = None
        batch: dict[bytes, _Entry] = {}
        later: list[_Entry] = []
        for entry in self._waiting:
            if entry[0] in batch or entry[0] in self._writing or len(batch) >= self.max_batch:
                later.append(entry)
            else:
                batch[entry[0]] = entry
        self._waiting = later
        if batch:
            self._in_flight += 1
            self._writing.update(batch)
            Deferred.fromCoroutine(self._write(list(batch.values())))
        if any(digest not in self._writing for digest, _, _ in self._waiting):
            self._schedule(0 if self._in_flight < self.concurrency else self.max_wait)
        # (a token being written waits for its batch to end, which flushes again)

    async def _write(self, batch: list[_Entry]) -> None:
        try:
            try:
                rows = await self._statement(batch)
            except Exception as e:
                if len(batch) == 1:
                    batch[0][2].errback(e)
                    return
                (self.log.warn if not unavailable(e) else self.log.info)(
                    "A batch of {count} link registrations failed ({error}); writing them "
                    "one by one", count=len(batch), error=str(e).strip())
                for entry in batch:
                    await self._one(entry)
                return
            for digest, _, done in batch:
                done.callback(rows.get(digest))
        finally:
            self._in_flight -= 1
            self._writing.difference_update(digest for digest, _, _ in batch)
            if self._waiting:
                self._schedule(0)

    async def _one(self, entry: _Entry) -> None:
        digest, _, done = entry
        try:
            rows = await self._statement([entry])
        except Exception as e:
            done.errback(e)
            return
        done.callback(rows.get(digest))

    async def _statement(self, batch: list[_Entry]) -> dict[bytes, dict]:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        rows = await self.store.register_links(
            [(digest, session) for digest, session, _ in batch], self.instance,
            self.instance_id())
        self.registered += len(rows)
        return rows

    async def _forget(self, links: list[tuple[int, str]]) -> list[None]:
        await self.store.links_disconnected(links)
        return [None] * len(links)
