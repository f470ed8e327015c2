"""Retention: whole jobs are deleted by age and by total size, oldest first."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest_twisted

from tests.logserver.support import Keys, LogClient, new_job, start_logserver
from tests.util.waiting import sleep


@pytest_twisted.ensureDeferred
async def test_idle_jobs_expire_on_the_timer(tmp_path: Path, keys: Keys) -> None:
    server = await start_logserver(tmp_path / "logs", keys, retention_max_age=0.6,
                                   retention_interval=0.1)
    try:
        client = LogClient(server.url)
        idle, busy = new_job(), new_job()
        await client.append(idle, "console", 0, b"old news", keys.token(idle, "append"))
        w = keys.token(busy, "append")
        offset = 0
        deadline = time.monotonic() + 5
        while (server.root / "jobs" / idle).exists():
            assert time.monotonic() < deadline, "the idle job was never deleted"
            offset = (await client.append(busy, "console", offset, b"tick\n", w)).body["length"]
            await sleep(0.1)
        assert (server.root / "jobs" / busy).exists()
        assert (await client.list(idle, keys.token(idle, "read"))).body["streams"] == []
        assert (await client.read(idle, "console", keys.token(idle, "read"))).code == 404
        assert server.service.store.deleted_jobs == 1
        assert not os.listdir(server.root / "trash")
        # A deleted job can start again from scratch (a late writer gets a gap first).
        late = await client.append(idle, "console", 8, b"!", keys.token(idle, "append"))
        assert (late.code, late.error, late.body["length"]) == (409, "gap", 0)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_total_size_deletes_the_least_recently_written(tmp_path: Path,
                                                              keys: Keys) -> None:
    server = await start_logserver(tmp_path / "logs", keys, retention_max_age=None,
                                   retention_max_bytes=250_000, retention_interval=3600)
    try:
        client = LogClient(server.url)
        jobs = [new_job() for _ in range(3)]
        for job in jobs:
            await client.append(job, "console", 0, b"x" * 100_000, keys.token(job, "append"))
            await sleep(0.01)
        # The first job is written again: now the second is the least recently written.
        await client.append(jobs[0], "events", 0, b"e", keys.token(jobs[0], "append"))
        assert await server.service.retention() == [jobs[1]]
        assert server.service.store.total_bytes == 200_001
        assert await server.service.retention() == []
        remaining = sorted(os.listdir(server.root / "jobs"))
        assert remaining == sorted([jobs[0], jobs[2]])
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_ages_survive_a_restart(tmp_path: Path, keys: Keys) -> None:
    root = tmp_path / "logs"
    server = await start_logserver(root, keys, retention_max_age=None)
    client = LogClient(server.url)
    old, new = new_job(), new_job()
    for job in (old, new):
        await client.append(job, "console", 0, b"data", keys.token(job, "append"))
    await server.stop()
    past = time.time() - 7200
    for path in (root / "jobs" / old).iterdir():
        os.utime(path, (past, past))
    os.utime(root / "jobs" / old, (past, past))
    server = await start_logserver(root, keys, retention_max_age=3600.0,
                                   retention_interval=3600)
    try:
        # The first pass runs at start.
        deadline = time.monotonic() + 5
        while (root / "jobs" / old).exists():
            assert time.monotonic() < deadline
            await sleep(0.05)
        assert (root / "jobs" / new).exists()
    finally:
        await server.stop()
