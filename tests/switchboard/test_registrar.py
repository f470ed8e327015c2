"""Link registration in batches (:mod:`treadmill.switchboard.registrar`) on a real
database: links arriving together are written by one statement, each host's row says
its link, an unknown token gets None, a token twice waits for the next batch, and a
batch that fails (a row locked past the lock timeout) is written again link by link,
so only the locked host's registration fails."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg2
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard.support import FAST, add_host, locked_hosts
from tests.switchboard.support import sb as sb  # the fixture: a switchboard with FAST settings
from tests.util.running import stopping
from tests.util.waiting import sleep
from treadmill.switchboard import credentials
from treadmill.switchboard.database import Timeouts
from treadmill.switchboard.registrar import LinkRegistrar


async def hosts(sb: RunningSwitchboard, count: int) -> dict[str, bytes]:
    """``count`` hosts: {name: token digest}."""
    return {f"h{i}": credentials.token_hash(await add_host(sb, f"h{i}", grant=False))
            for i in range(count)}


async def linked(sb: RunningSwitchboard, registrar: LinkRegistrar, count: int
                 ) -> tuple[dict[str, bytes], dict[str, int], dict[str, str]]:
    """``count`` hosts, their links registered together through ``registrar``:
    ({name: token digest}, {name: host id}, {name: session})."""
    digests = await hosts(sb, count)
    chosen = {name: str(uuid.uuid4()) for name in digests}
    rows = await gatherResults([registrar.register(digests[name], chosen[name])
                                for name in sorted(digests)])
    return digests, {row["name"]: row["id"] for row in rows}, chosen


async def sessions(sb: RunningSwitchboard) -> dict[str, tuple[str | None, str | None]]:
    rows = await sb.store.pool.fetchall("SELECT name, instance, session FROM hosts")
    return {row["name"]: (row["instance"], row["session"] and str(row["session"]))
            for row in rows}


@pytest_twisted.ensureDeferred
async def test_links_arriving_together_are_registered_by_one_statement(
        sb: RunningSwitchboard) -> None:
    registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
    digests, ids, chosen = await linked(sb, registrar, 20)
    assert registrar.batches == 1 and registrar.largest == 20
    assert sorted(ids) == sorted(digests)
    recorded = await sessions(sb)
    assert all(recorded[name] == ("i-1", chosen[name]) for name in digests)


@pytest_twisted.ensureDeferred
async def test_an_unknown_token_gets_none_and_the_others_their_rows(
        sb: RunningSwitchboard) -> None:
    digests = await hosts(sb, 2)
    registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
    known = registrar.register(digests["h0"], str(uuid.uuid4()))
    unknown = registrar.register(credentials.token_hash("tmh_" + "x" * 43), str(uuid.uuid4()))
    assert (await unknown) is None
    assert (await known)["name"] == "h0"
    assert registrar.batches == 1 and (await sessions(sb))["h1"] == (None, None)


@pytest_twisted.ensureDeferred
async def test_a_token_twice_waits_for_the_next_batch_and_the_later_session_wins(
        sb: RunningSwitchboard) -> None:
    digests = await hosts(sb, 2)
    registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    results = await gatherResults([registrar.register(digests["h0"], first),
                                   registrar.register(digests["h1"], str(uuid.uuid4())),
                                   registrar.register(digests["h0"], second)])
    assert [row["name"] for row in results] == ["h0", "h1", "h0"]
    assert registrar.batches == 2
    assert (await sessions(sb))["h0"] == ("i-1", second)


@pytest_twisted.ensureDeferred
async def test_a_batch_stalled_on_a_locked_row_fails_only_that_hosts_registration(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await start_switchboard(migrated_database, tmp_path,
                                                timeouts=Timeouts(lock=0.5), **FAST)) as sb:
        digests = await hosts(sb, 5)
        registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
        async with locked_hosts(migrated_database, "h2"):
            waiting = [registrar.register(digests[name], str(uuid.uuid4()))
                       for name in sorted(digests)]
            outcomes = await DeferredList(waiting, consumeErrors=True)
        failed = [name for name, (ok, _) in zip(sorted(digests), outcomes, strict=True) if not ok]
        assert failed == ["h2"]
        assert outcomes[2][1].check(psycopg2.OperationalError) is not None  # lock timeout
        assert registrar.batches == 1 + 5  # the batch, then each link alone
        recorded = await sessions(sb)
        assert recorded["h2"] == (None, None)
        assert all(recorded[name][0] == "i-1" for name in digests if name != "h2")


@pytest_twisted.ensureDeferred
async def test_while_batches_are_in_flight_newcomers_gather_into_the_next(
        migrated_database: str, tmp_path: Path) -> None:
    """Two batches stall on locked rows (the most in flight); what arrives meanwhile
    waits at most ``max_wait`` and then goes as one more batch."""
    async with stopping(await start_switchboard(migrated_database, tmp_path,
                                                timeouts=Timeouts(lock=30.0), **FAST)) as sb:
        digests = await hosts(sb, 12)
        registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None, max_wait=0.2)
        async with locked_hosts(migrated_database, "h0", "h1"):
            first = registrar.register(digests["h0"], str(uuid.uuid4()))
            await sleep(0.05)  # written: one batch in flight, stalled
            second = registrar.register(digests["h1"], str(uuid.uuid4()))
            await sleep(0.05)  # two in flight: the most
            started = reactor.seconds()
            rest = await gatherResults([registrar.register(digests[f"h{i}"],
                                                           str(uuid.uuid4()))
                                        for i in range(2, 12)])
            assert 0.15 < reactor.seconds() - started < 2.0
            assert [row["name"] for row in rest] == [f"h{i}" for i in range(2, 12)]
            assert registrar.batches == 3 and registrar.largest == 10
            assert not first.called and not second.called
        assert (await first)["name"] == "h0" and (await second)["name"] == "h1"


@pytest_twisted.ensureDeferred
async def test_a_token_being_written_holds_its_next_registration_back(
        migrated_database: str, tmp_path: Path) -> None:
    """The second registration of a token is not written beside the first (which could
    commit after it): it waits until the first is written, and so wins."""
    async with stopping(await start_switchboard(migrated_database, tmp_path,
                                                timeouts=Timeouts(lock=30.0), **FAST)) as sb:
        digests = await hosts(sb, 2)
        registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None, max_wait=0.05)
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        async with locked_hosts(migrated_database, "h0"):
            earlier = registrar.register(digests["h0"], first)
            await sleep(0.1)  # written, and stalled on the lock
            later = registrar.register(digests["h0"], second)
            other = await registrar.register(digests["h1"], str(uuid.uuid4()))
            await sleep(0.3)
            assert other["name"] == "h1" and registrar.batches == 2  # h0 again: not yet
            assert not later.called and registrar.waiting == 1
        assert (await earlier)["name"] == "h0" and (await later)["name"] == "h0"
        assert registrar.batches == 3 and (await sessions(sb))["h0"] == ("i-1", second)


@pytest_twisted.ensureDeferred
async def test_links_ending_together_are_forgotten_by_one_statement(
        sb: RunningSwitchboard) -> None:
    """A host linked again meanwhile (a newer session) keeps its link."""
    registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
    digests, ids, chosen = await linked(sb, registrar, 10)
    newer = str(uuid.uuid4())
    await registrar.register(digests["h9"], newer)
    await gatherResults([Deferred.fromCoroutine(registrar.ended(ids[name], chosen[name]))
                         for name in digests])
    assert registrar.end_batches == 1
    recorded = await sessions(sb)
    assert all(recorded[f"h{i}"] == (None, None) for i in range(9))
    assert recorded["h9"] == ("i-1", newer)


@pytest_twisted.ensureDeferred
async def test_ends_meanwhile_go_in_the_next_batch_and_a_failed_one_link_by_link(
        migrated_database: str, tmp_path: Path) -> None:
    """The first batch stalls on a locked row until the lock times out; the links ending
    meanwhile wait for it and are then written together; the failed batch is written
    again one link at a time, so only the locked host's end fails."""
    async with stopping(await start_switchboard(migrated_database, tmp_path,
                                                timeouts=Timeouts(lock=0.5), **FAST)) as sb:
        registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
        _, ids, chosen = await linked(sb, registrar, 6)

        def end(name: str) -> Deferred[None]:
            return Deferred.fromCoroutine(registrar.ended(ids[name], chosen[name]))

        async with locked_hosts(migrated_database, "h0"):
            first = [end("h0"), end("h1")]
            await sleep(0.1)  # written, and stalled on the lock
            later = [end(f"h{i}") for i in range(2, 6)]
            await sleep(0.1)
            assert registrar.end_batches == 1 and not any(d.called for d in first + later)
            outcomes = await DeferredList(first, consumeErrors=True)
            await gatherResults(later)
        assert outcomes[0][1].check(psycopg2.OperationalError) is not None  # lock timeout
        assert outcomes[1][0], outcomes[1][1]
        assert registrar.end_batches == 1 + 2 + 1  # the batch, each of its two, the rest
        recorded = await sessions(sb)
        assert recorded["h0"] == ("i-1", chosen["h0"])
        assert all(recorded[f"h{i}"] == (None, None) for i in range(1, 6))


@pytest_twisted.ensureDeferred
async def test_the_link_states_of_many_links_are_one_statement_in_order(
        sb: RunningSwitchboard) -> None:
    """Each link's kinds are recorded if the session is still its host's (a host named
    twice: its last kinds), and each gets its own answer, in order."""
    registrar = LinkRegistrar(reactor, sb.store, "i-1", lambda: None)
    _, ids, chosen = await linked(sb, registrar, 3)
    rows = await sb.store.link_states([(ids["h2"], ["qemu", "mock"], chosen["h2"]),
                                       (ids["h0"], None, chosen["h0"]),
                                       (ids["h1"], ["mock"], str(uuid.uuid4())),  # stale
                                       (ids["h2"], ["serial"], chosen["h2"])])
    assert rows == [{"active": None, "held": None, "snapshots": 0}] * 4
    recorded = {row["name"]: (row["kinds"], row["current"]) for row in await sb.store.pool.fetchall(
        "SELECT name, kinds, kinds_session = session AS current FROM hosts")}
    assert recorded == {"h0": (None, True), "h1": (None, None), "h2": (["serial"], True)}
