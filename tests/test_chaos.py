"""Chaos: kill -9 every role and stop PostgreSQL in the middle of jobs, pushes and follows.

Real ``twistd`` daemons on loopback — a switchboard, an image store, a log
server, a proxy and three mock supervisors — on a private PostgreSQL cluster
(``treadmill.dev.pgcluster``), so stopping it disturbs no other test. A
workload of mock jobs with console output (each submitted once with an
``Idempotency-Key`` the client retries), image pushes into alice's namespace
and ``tml job logs --follow`` followers runs while each role is killed with
SIGKILL and restarted once, and PostgreSQL is stopped and started once, at
seeded-random moments. Then:

- every job, following its restarts, ends ``workload_exited`` with status 0;
  only a job on the killed supervisor may end ``host_dropped_job`` (and is
  restarted); no ``execution_timeout``, no other reason;
- each job's console on the log server is byte-exact: the mock's deterministic
  line sequence with nothing lost, repeated or torn, closed, and what each
  follower printed;
- every pushed image is pullable by tag with the right manifest and blob digests;
- within ``SETTLE`` seconds of the last fault every host is connected, enabled
  and healthy; at the end each is idle and runs a probe job.

``TREADMILL_CHAOS_SEED`` picks the schedule (printed on failure);
``TREADMILL_CHAOS_DURATION`` (seconds, default 30) lengthens the run: every
``ROUND`` seconds each role is killed once more (a soak, see CONTRIBUTING.md).
Deselect with ``-m "not chaos"``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import signal
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from tests.support import Client
from tests.util.daemons import Daemon, bootstrap_admin, run_python
from tests.util.ports import free_port
from treadmill.cli.main import run as tml
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.images import format as fmt
from treadmill.images.oci import RegistryClient

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SEED = int(os.environ.get("TREADMILL_CHAOS_SEED", "13"))
DURATION = float(os.environ.get("TREADMILL_CHAOS_DURATION", "30"))
ROUND = 30.0  # seconds per round of faults: each role once
SETTLE = 10.0  # after the last fault, every host is back within this
HOSTS = 3
CONSOLE_RATE = 4000
ROLES = ("switchboard", "imagestore", "logserver", "proxy", "supervisor", "postgres")
DIGEST = "sha256:" + "c" * 64
STORE_SERVICE = "treadmill-imagestore"
LINE = re.compile(rb"mock console ([0-9a-f]{8}) line (\d{8})\n")


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def expected_console(job_id: str, size: int) -> bytes:
    """The first ``size`` bytes the mock writes for ``job_id`` (see drivers/mock.py)."""
    out = bytearray()
    n = 0
    while len(out) < size:
        n += 1
        out += b"mock console %s line %08d\n" % (job_id[:8].encode(), n)
    return bytes(out[:size])


class PostgreSQL:
    """A private cluster in a directory the postgres user can reach (as tests/conftest.py)."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="treadmill-chaos-pg-")
        os.chmod(self.root, 0o711)
        self.dir = os.path.join(self.root, "pg")
        self.dsn = ""

    async def start(self) -> None:
        out, err, code = await run_python("-m", "treadmill.dev.pgcluster", "start", self.dir)
        assert code == 0, err
        self.dsn = out.strip()

    async def stop(self) -> None:
        _, err, code = await run_python("-m", "treadmill.dev.pgcluster", "stop", self.dir)
        assert code == 0, err

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Job:
    key: str
    run_time: float
    id: str | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)
    followed: str | None = None


@dataclass
class Push:
    repo: str
    tag: str
    blobs: list[bytes]
    digest: str | None = None
    attempts: int = 0


class Bed:
    """Every role as a ``twistd`` process, and the calls that survive their faults."""

    def __init__(self, tmp: Path, pg: PostgreSQL):
        self.tmp, self.pg = tmp, pg
        self.key = tmp / "key.pem"
        load_or_create_signing_key(str(self.key))  # Every satellite trusts its public half.
        self.ports = {role: free_port() for role in ("switchboard", "imagestore", "logserver",
                                                     "proxy", "proxy_data")}
        self.url = f"http://127.0.0.1:{self.ports['switchboard']}"
        self.store_url = f"http://127.0.0.1:{self.ports['imagestore']}"
        self.logs_url = f"http://127.0.0.1:{self.ports['logserver']}"
        self.proxy_url = f"http://127.0.0.1:{self.ports['proxy']}"
        self.daemons: dict[str, Daemon] = {}
        self.supervisors: list[Daemon] = []
        self.admin = Client(self.url)
        self.alice = Client(self.url)
        self.alice_token = ""
        self.began = reactor.seconds()
        self.pushing = 0

    def _config(self, name: str, text: str) -> str:
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        return str(path)

    def configure(self) -> None:
        p = self.ports
        self.sb_config = self._config("switchboard", (
            f'listen = ["tcp:{p["switchboard"]}:interface=127.0.0.1"]\n'
            f'[database]\ndsn = "{self.pg.dsn}"\npool_size = 3\n'
            f'[capabilities]\nsigning_key = "{self.key}"\n'
            "[jobs]\ntimeout_interval = 0.2\n"
            "[scheduler]\ninterval = 0.5\n"
            f'[logs]\nservers = ["{self.logs_url}"]\nreplicas = 1\n'
            f'[proxies]\nservers = ["{self.proxy_url}"]\n'
            "[supervisors]\nping_interval = 1.0\nping_timeout = 2.0\nreconcile_retry = 0.5\n"
            "unreachable_after = 30\n"))
        self.daemons["switchboard"] = Daemon("treadmill-switchboard",
                                             ["--config", self.sb_config])
        self.daemons["imagestore"] = Daemon("treadmill-imagestore", ["--config", self._config(
            "imagestore",
            f'listen = ["tcp:{p["imagestore"]}:interface=127.0.0.1"]\n'
            f'root = "{self.tmp / "store"}"\nservice = "{STORE_SERVICE}"\n'
            f'[auth]\nrealm = "{self.url}/api/v1/registry/token"\nkeys_file = "{self.key}"\n'
            "[http]\naccess_log = false\n")])
        self.daemons["logserver"] = Daemon("treadmill-logserver", ["--config", self._config(
            "logserver",
            f'listen = ["tcp:{p["logserver"]}:interface=127.0.0.1"]\n'
            f'root = "{self.tmp / "logs"}"\nfsync = "always"\n'
            f'[auth]\nkeys_file = "{self.key}"\n[http]\naccess_log = false\n')])
        low = random.Random(SEED).randrange(20000, 30000, 100)
        self.daemons["proxy"] = Daemon("treadmill-proxy", ["--config", self._config(
            "proxy",
            f'listen = ["tcp:{p["proxy"]}:interface=127.0.0.1"]\n'
            f'data_listen = ["tcp:{p["proxy_data"]}:interface=127.0.0.1"]\n'
            f'public_host = "127.0.0.1"\npublic_interface = "127.0.0.1"\n'
            f'ports = "{low}-{low + 99}"\n'
            f'[auth]\nkeys_file = "{self.key}"\n[http]\naccess_log = false\n')])

    def health(self, role: str) -> str:
        return {"switchboard": self.url, "imagestore": self.store_url,
                "logserver": self.logs_url, "proxy": self.proxy_url}[role] + "/healthz"

    async def start(self) -> None:
        self.configure()
        for daemon in self.daemons.values():
            daemon.start()
        for role, daemon in self.daemons.items():
            await daemon.wait_http(self.health(role), timeout=60)
        self.admin = Client(self.url, await bootstrap_admin("--config", self.sb_config))
        r = await self.admin.post("/api/v1/stores", {"url": self.store_url,
                                                     "service": STORE_SERVICE})
        assert r.status == 201, r.body
        assert (await self.admin.post("/api/v1/users", {"name": "alice"})).status == 201
        r = await self.admin.post("/api/v1/tokens", {"user": "alice", "label": "chaos"})
        assert r.status == 201, r.body
        self.alice_token = r.body["token"]
        self.alice = Client(self.url, self.alice_token)
        for i in range(HOSTS):
            name = f"mock-{i}"
            r = await self.admin.post("/api/v1/hosts", {"name": name, "tags": ["mock", name]})
            assert r.status == 201, r.body
            await self.admin.post(f"/api/v1/hosts/{name}/grants",
                                  {"user": "*", "privilege": "start"})
            config = self._config(name, (
                f'state_dir = "{self.tmp / name}"\ndriver = "mock"\n'
                f'[switchboard]\nurl = "ws://127.0.0.1:{self.ports["switchboard"]}"\n'
                f'token = "{r.body["token"]}"\n'
                "[reconnect]\ninitial = 0.1\nmax = 1.0\n"
                "[heartbeat]\ninterval = 1.0\ntimeout = 2.0\n"
                "[events]\nack_timeout = 1.0\nresend_max = 2.0\n"
                f"[mock]\nrun_time = 1.0\nconsole_rate = {CONSOLE_RATE}\n"
                "[mock.stages]\nstarting = 0.05\nfetching_image = 0.05\nallocating = 0.05\n"
                "provisioning = 0.05\nbooting = 0.05\n"))
            daemon = Daemon("treadmill-supervisor", ["--config", config])
            daemon.start()
            self.supervisors.append(daemon)
        await self.hosts_ready(60)

    async def stop(self) -> None:
        for daemon in [*self.supervisors, *self.daemons.values()]:
            await daemon.stop()

    async def call(self, client: Client, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None, timeout: float = 90) -> Any:
        """One API call, retried through restarts and outages (reset, 502-504)."""
        deadline = reactor.seconds() + timeout
        while True:
            try:
                d = Deferred.fromCoroutine(client.request(method, path, body, headers=headers))
                r = await d.addTimeout(10, reactor)
                if r.status not in (502, 503, 504):
                    return r
            except Exception as e:
                r = e
            assert reactor.seconds() < deadline, f"{method} {path}: still failing: {r!r}"
            await sleep(0.2)

    async def hosts(self) -> list[dict[str, Any]]:
        r = await self.call(self.admin, "GET", "/api/v1/hosts")
        assert r.status == 200, r.body
        return r.body["hosts"]

    async def hosts_ready(self, timeout: float) -> float:
        """Wait until every host is connected, enabled and healthy; the seconds it took."""
        started = reactor.seconds()
        while True:
            hosts = await self.hosts()
            if len(hosts) == HOSTS and all(h["connected"] and h["enabled"] and h["healthy"]
                                           for h in hosts):
                return reactor.seconds() - started
            assert reactor.seconds() - started < timeout, f"hosts not ready: {hosts}"
            await sleep(0.1)


async def submit(bed: Bed, job: Job) -> None:
    body = {"image": DIGEST, "tags": ["mock"], "max_restarts": 3,
            "parameters": {"mock.run_time": {"value": str(job.run_time)}}}
    r = await bed.call(bed.alice, "POST", "/api/v1/jobs", body,
                       headers={"Idempotency-Key": job.key})
    assert r.status in (200, 201), r.body
    job.id = r.body["id"]


async def follow(bed: Bed, job: Job) -> None:
    """``tml job logs --follow`` from the job's start; a failed follow is started again."""
    assert job.id is not None
    while True:
        r = await bed.call(bed.alice, "GET", f"/api/v1/jobs/{job.id}")
        if r.body["state"] in ("ready", "terminated"):
            break
        await sleep(0.2)
    for _attempt in range(10):
        out, err = io.StringIO(), io.StringIO()
        env = {"HOME": str(bed.tmp / "home"), "TREADMILL_URL": bed.url,
               "TREADMILL_TOKEN": bed.alice_token}
        code = await tml(reactor, ["job", "logs", job.id, "--follow"], out, err, env)
        if code == 0:
            job.followed = out.getvalue()
            return
        await sleep(0.5)
    raise AssertionError(f"tml job logs --follow {job.id} kept failing: {err.getvalue()}")


async def push(bed: Bed, image: Push) -> None:
    """Push until the store has it (a push of the same content again is harmless)."""
    deadline = reactor.seconds() + 120
    while True:
        image.attempts += 1
        bed.pushing += 1
        client = RegistryClient(reactor, bed.store_url, credentials=("alice", bed.alice_token),
                                service=STORE_SERVICE, realm=f"{bed.url}/api/v1/registry/token",
                                retries=2, backoff=0.2, retry_time=10, timeout=10)
        try:
            await client.push_bytes(image.repo, fmt.EMPTY_BLOB)
            layers = [await client.push_bytes(image.repo, b) for b in image.blobs]
            manifest = fmt.manifest_bytes(fmt.build_qemu_manifest(layers))
            image.digest = await client.put_manifest(image.repo, image.tag, manifest)
            return
        except Exception as e:
            assert reactor.seconds() < deadline, f"push {image.repo}: {e!r}"
            await sleep(0.5)
        finally:
            bed.pushing -= 1
            await client.close()


async def busy(bed: Bed, role: str) -> bool:
    if role == "imagestore":
        return bed.pushing > 0
    if role == "supervisor":
        host = (await bed.call(bed.admin, "GET", "/api/v1/hosts/mock-0")).body
        if host["current_job"] is None:
            return False
        job = await bed.call(bed.admin, "GET", f"/api/v1/jobs/{host['current_job']}")
        return job.body["state"] == "ready"
    return True


async def fault(bed: Bed, role: str, down: float, log: list[str]) -> None:
    log.append(f"{reactor.seconds() - bed.began:.1f} s: {role} down for {down:.1f} s")
    if role == "postgres":
        await bed.pg.stop()
        await sleep(down)
        await bed.pg.start()
        return
    # Strike in the middle of something: a job running on mock-0, a push under way.
    deadline = reactor.seconds() + 5
    while reactor.seconds() < deadline and not await busy(bed, role):
        await sleep(0.05)
    daemon = bed.supervisors[0] if role == "supervisor" else bed.daemons[role]
    assert await daemon.signal(signal.SIGKILL) != 0
    await sleep(down)
    daemon.start()
    if role != "supervisor":
        await daemon.wait_http(bed.health(role), timeout=60)


async def all_jobs(bed: Bed) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor = ""
    while True:
        r = await bed.call(bed.admin, "GET", f"/api/v1/jobs?limit=500{cursor}")
        assert r.status == 200, r.body
        jobs += r.body["jobs"]
        if "next_cursor" not in r.body:
            return jobs
        cursor = f"&cursor={r.body['next_cursor']}"


async def chain_of(bed: Bed, job: Job) -> list[dict[str, Any]]:
    """The job and its restarts, oldest first, once the last one ended; else []."""
    return chain_in(await all_jobs(bed), job.id)


def chain_in(jobs: list[dict[str, Any]], job_id: str | None) -> list[dict[str, Any]]:
    by_parent = {j["restart_of"]: j for j in jobs if j.get("restart_of")}
    current = next(j for j in jobs if j["id"] == job_id)
    chain = [current]
    while current["id"] in by_parent:
        current = by_parent[current["id"]]
        chain.append(current)
    return chain if chain[-1]["state"] == "terminated" else []


async def console(bed: Bed, job_id: str) -> tuple[bytes, bool]:
    access = (await bed.call(bed.admin, "POST", f"/api/v1/jobs/{job_id}/logs/token")).body
    headers = {"Authorization": f"Bearer {access['token']}"}
    r = await treq.get(f"{bed.logs_url}/v1/jobs/{job_id}/streams", headers=headers)
    streams = {s["name"]: s for s in (await r.json())["streams"]}
    r = await treq.get(f"{bed.logs_url}/v1/jobs/{job_id}/streams/console", headers=headers)
    data = await r.content()
    return (data if r.code == 200 else b""), bool(streams.get("console", {}).get("closed"))


@pytest_twisted.ensureDeferred
async def test_chaos(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    rounds = max(1, round(DURATION / ROUND))
    pg = PostgreSQL()
    bed = Bed(tmp_path, pg)
    faults: list[str] = []
    try:
        await pg.start()
        await bed.start()
        window = rounds * ROUND
        jobs = [Job(uuid.UUID(int=rng.getrandbits(128)).hex, round(rng.uniform(0.5, 2.0), 2))
                for _ in range(int(window))]
        pushes = [Push(f"alice/chaos-{i}", f"v{i}",
                       [rng.randbytes(rng.randrange(1, 2048) * 1024) for _ in range(2)])
                  for i in range(max(4, int(window / 3)))]
        work: list[Deferred[Any]] = []

        async def later(delay: float, coro: Any, *args: Any) -> None:
            await sleep(delay)
            await coro(*args)

        async def job_then_follow(j: Job, follows: bool) -> None:
            await submit(bed, j)
            if follows:
                await follow(bed, j)

        for i, j in enumerate(jobs):
            work.append(Deferred.fromCoroutine(later(rng.uniform(0, window), job_then_follow,
                                                     j, i % 4 == 0)))
        for p in pushes:
            work.append(Deferred.fromCoroutine(later(rng.uniform(0, window), push, bed, p)))

        async def chaos() -> None:
            gap = ROUND / len(ROLES)
            start = reactor.seconds()
            for n in range(rounds):
                for i, role in enumerate(rng.sample(ROLES, len(ROLES))):
                    at = n * ROUND + i * gap + rng.uniform(0, gap / 3)
                    await sleep(max(0.0, start + at - reactor.seconds()))
                    await fault(bed, role, rng.uniform(0.3, 1.5), faults)
                    # Every host is back soon after each fault.
                    settle = await bed.hosts_ready(SETTLE)
                    settles.append(settle)
                    faults.append(f"hosts back {settle:.1f} s later")

        settles: list[float] = []
        await chaos()
        await gatherResults(work, consumeErrors=True)

        # Every job ends (following its restarts) with its workload's exit.
        deadline = reactor.seconds() + 60
        while True:
            every = await all_jobs(bed)
            chains = [chain_in(every, j.id) for j in jobs]
            if all(chains):
                break
            assert reactor.seconds() < deadline, \
                [j.id for j, c in zip(jobs, chains, strict=True) if not c]
            await sleep(0.2)
        for j, chain in zip(jobs, chains, strict=True):
            j.chain = chain
            *dropped, last = chain
            assert last["termination"]["reason"] == "workload_exited", (j.id, chain, faults)
            assert last["termination"]["exit_status"] == 0
            for d in dropped:  # only the supervisor kill may drop a job (and restart it)
                assert d["termination"]["reason"] == "host_dropped_job", (j.id, chain, faults)

        # Each job was created once, however often its submission was retried.
        originals = [j for j in await all_jobs(bed) if not j.get("restart_of")]
        assert sorted(j["id"] for j in originals) == sorted(j.id for j in jobs)

        # Byte-exact consoles: the mock's line sequence, closed, as followers saw it.
        for j in jobs:
            followed = []
            for run in j.chain:
                data, closed = await console(bed, run["id"])
                assert closed or not data, (run["id"], faults)
                assert data == expected_console(run["id"], len(data)), (run["id"], faults)
                if run is j.chain[-1]:
                    minimum = int(CONSOLE_RATE * j.run_time * 0.5)
                    assert len(data) >= minimum, (run["id"], len(data), faults)
                followed.append(data.decode())
            if j.followed is not None:
                assert j.followed == "".join(followed), (j.id, faults)

        # Every pushed image is pullable with the right digests.
        client = RegistryClient(reactor, bed.store_url, credentials=("alice", bed.alice_token),
                                service=STORE_SERVICE, realm=f"{bed.url}/api/v1/registry/token")
        try:
            for p in pushes:
                manifest = await client.get_manifest(p.repo, p.tag)
                assert manifest.digest == p.digest, (p.repo, faults)
                layers = manifest.json()["layers"]
                assert [layer["digest"] for layer in layers] == \
                    ["sha256:" + hashlib.sha256(b).hexdigest() for b in p.blobs]
                for layer, blob in zip(layers, p.blobs, strict=True):
                    assert await client.get_blob(p.repo, layer["digest"],
                                                 max_size=len(blob)) == blob
        finally:
            await client.close()

        # Every host is idle and runs a job.
        async def idle() -> bool:
            return all(h["current_job"] is None for h in await bed.hosts())

        deadline = reactor.seconds() + SETTLE
        while not await idle():
            assert reactor.seconds() < deadline, (await bed.hosts(), faults)
            await sleep(0.1)
        probes = []
        for i in range(HOSTS):
            r = await bed.call(bed.admin, "POST", "/api/v1/jobs", {
                "image": DIGEST, "tags": [f"mock-{i}"],
                "parameters": {"mock.run_time": {"value": "0.1"}}})
            probes.append(Job("", 0.1, r.body["id"]))
        for probe in probes:
            deadline = reactor.seconds() + 30
            while not (chain := await chain_of(bed, probe)):
                assert reactor.seconds() < deadline, (probe.id, faults)
                await sleep(0.1)
            assert [c["termination"]["reason"] for c in chain] == ["workload_exited"]
        for name, daemon in [*bed.daemons.items(), *enumerate(bed.supervisors)]:
            assert "Traceback (most recent" not in daemon.output, (name, daemon.output)
        restarts = sum(len(j.chain) - 1 for j in jobs)
        print(f"chaos seed {SEED}: {len(jobs)} jobs ({restarts} restarted), "
              f"{sum(j.followed is not None for j in jobs)} followed, {len(pushes)} images "
              f"({sum(p.attempts for p in pushes)} push attempts), slowest settle "
              f"{max(settles):.1f} s; {faults}")
    except BaseException:
        print(f"chaos seed {SEED}; faults: {faults}")
        raise
    finally:
        await bed.stop()
        for name, daemon in [*bed.daemons.items(), *enumerate(bed.supervisors)]:
            (tmp_path / f"{name}.out").write_text(daemon.output)  # kept for a post-mortem
        await pg.stop()
        pg.remove()
