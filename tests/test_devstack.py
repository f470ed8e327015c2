"""``tools/devstack`` brings up a testbed where the printed commands work."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from tests.proxy.support import console, echo_client, echo_once
from tests.supervisor.qemu.conftest import qemu_processes
from tests.util.daemons import _Output, run_python
from tests.util.ports import free_port, free_range
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.protocol import supervisor as protocol
from treadmill.protocol.logs import HOLD_MARKER
from treadmill.protocol.proxy import ConsoleCloseCode
from treadmill.supervisor.drivers.qemu.driver import pid_alive

FAST = [f"mock.stages.{stage}=0" for stage in
        ("starting", "fetching_image", "allocating", "provisioning", "booting")]


@dataclass
class Stack:
    state: Path
    port: str
    env: dict[str, str]


async def devstack(stack: Stack, *options: str) -> str:
    """``tools/devstack --detach OPTIONS`` on ``stack``; its output."""
    out, err, code = await run_python("-m", "treadmill.dev.devstack", "--detach", *options,
                                      "--state", str(stack.state), "--port", stack.port)
    assert code == 0, out + err
    return out


def log_tail(env: dict[str, str], name: str, lines: int = 80) -> str:
    """The end of the devstack's log ``name`` (for a failure's message: the stack and
    its logs are removed when the module ends)."""
    path = Path(env["TREADMILL_CONFIG"]).parent / "logs" / f"{name}.log"
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"\n({path}: {e})"
    return f"\n--- the end of {path.name}:\n" + "\n".join(text.splitlines()[-lines:])


@pytest_twisted.async_yield_fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    """One devstack for the module (its tests add to it: a second run reuses everything,
    ``--serial-sim`` adds the board host); stopped at the end, its logs free of tracebacks."""
    # The postgres user must reach the state directory; pytest's are private.
    root = Path(tempfile.mkdtemp(prefix="treadmill-devstack-"))
    root.chmod(0o755)
    state = root / "stack"
    port = str(free_range(30)[0])  # the devstack uses P … P+29
    try:
        yield Stack(state, port, {"TREADMILL_CONFIG": str(state / "tml.toml")})
    finally:
        subprocess.run([sys.executable, "-m", "treadmill.dev.devstack", "stop", "--state",
                        str(state), "--port", port], capture_output=True, timeout=120,
                       env={**os.environ})
    try:
        assert not (state / "run" / "fakeboard.pid").exists()
        for log in (state / "logs").glob("*.log"):
            assert "Traceback (most recent" not in log.read_text(), log
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_devstack_runs_a_first_job(stack: Stack) -> None:
    for _ in range(2):  # Idempotent: a second run reuses everything.
        out = await devstack(stack)
    assert "tml job submit" in out
    env, port = stack.env, stack.port
    listed = io.StringIO()
    status = await tml(reactor, ["admin", "store", "ls", "--json"], listed, io.StringIO(),
                       env)
    assert status == 0 and [(s["url"], s["service"]) for s in json.loads(
        listed.getvalue())["stores"]] == [(f"http://127.0.0.1:{int(port) + 1}",
                                          "treadmill-imagestore")]  # registered, once
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["job", "submit", "sha256:" + "0" * 64, "--tag", "mock", "--follow",
            "--param", "mock.run_time=0.1", "--param", "mock.exit_status=0"]
    for param in FAST:
        argv += ["--param", param]
    status = await tml(reactor, argv, stdout, stderr, env)
    assert status == 0, stdout.getvalue() + stderr.getvalue()
    assert "workload_exited, exit status 0" in stdout.getvalue() + stderr.getvalue()
    job_id = stdout.getvalue().splitlines()[0].strip()
    # Its events went to the devstack's log server.
    out, err = io.StringIO(), io.StringIO()
    status = await tml(reactor, ["job", "logs", job_id, "--stream", "events"], out, err,
                       env)
    assert status == 0 and '"state":"terminated"' in out.getvalue(), err.getvalue()
    await reach_the_mock_echo_through_the_proxy(env)
    await run_the_demo_image(env)


@pytest_twisted.ensureDeferred
async def test_devstack_serial_sim_runs_a_board_job(stack: Stack) -> None:
    """``--serial-sim``: a serial supervisor on the simulated board runs the demo board image
    (flashed by the fake tool, its parameters asked over the agent) to its exit status."""
    out = await devstack(stack, "--serial-sim")
    assert "tml job submit board-demo --tag serial --follow" in out
    argv = ["job", "submit", "board-demo", "--follow",
            "--param", "greeting=hi"]
    stdout, stderr = io.StringIO(), io.StringIO()
    status = await tml(reactor, argv, stdout, stderr, stack.env)
    text = stdout.getvalue() + stderr.getvalue()
    assert status == 0, text
    assert "fakeflash: done" in text and "param greeting=hi" in text, text
    assert "workload_exited, exit status 0" in text, text
    await type_into_a_board_through_the_proxy(stack.state, stack.env, int(stack.port))


async def type_into_a_board_through_the_proxy(state: Path, env: dict[str, str],
                                              port: int) -> None:
    """The board's console bridge, published on the proxy: a line typed through ``tml job
    connect JOB console`` reaches the board's app, which reads it and exits."""
    app = state / "interactive.bin"
    app.write_bytes(b'agent {"type":"ready"}\nprint type a line\nread\nexit 0 typed\n')
    out, err = io.StringIO(), io.StringIO()
    argv = ["image", "push", "board-interactive", "--store", f"http://127.0.0.1:{port + 1}",
            "--firmware", str(app), "--host-tag", "serial"]
    assert await tml(reactor, argv, out, err, env) == 0, out.getvalue() + err.getvalue()
    job_id = (await tml_json(["job", "submit", "board-interactive"], env))["id"]
    await published(job_id, env, {"console"}, 60.0)

    async def typed(local: int) -> bool:
        if not await type_line(local, b"hello board\n"):
            return False
        return (await tml_json(["job", "show", job_id], env))["state"] == "terminated"

    await through_connect(job_id, "console", env, typed, 60.0)
    job = await tml_json(["job", "show", job_id], env)
    assert job["termination"]["reason"] == "workload_exited", job
    out_, err_ = io.StringIO(), io.StringIO()
    await tml(reactor, ["job", "logs", job_id], out_, err_, env)
    assert "got: hello board" in out_.getvalue(), out_.getvalue()


async def tml_json(argv: list[str], env: dict[str, str]) -> Any:
    out, err = io.StringIO(), io.StringIO()
    status = await tml(reactor, [*argv, "--json"], out, err, env)
    assert status == 0, err.getvalue()
    return json.loads(out.getvalue())


async def reach_the_mock_echo_through_the_proxy(env: dict[str, str]) -> None:
    """A running mock job's echo service, published on the devstack's proxy: it does not
    authenticate its users, so it has no public port and its WebSocket refuses a client
    without a console token; ``tml job connect`` fetches one and types through it,
    ``--read-only`` watches only; the job's end closes it."""
    argv = ["job", "submit", "sha256:" + "0" * 64, "--tag", "mock",
            "--param", "mock.run_time=inf"]
    for param in FAST:
        argv += ["--param", param]
    job_id = (await tml_json(argv, env))["id"]
    endpoint = (await published(job_id, env, {"echo"}, 30.0))["echo"]
    assert endpoint["auth"] == "token" and "port" not in endpoint, endpoint
    anonymous = await console(endpoint["url"])
    await anonymous.opened
    anonymous.type(b"let me in")
    assert (await anonymous.closed)[0] == ConsoleCloseCode.UNAUTHORIZED
    assert anonymous.output == b""

    async def answers(local: int) -> bool:
        try:
            return await echo_once(local, b"via websocket") == b"via websocket"
        except (ConnectError, AssertionError):
            return False

    await through_connect(job_id, "echo", env, answers, 30.0)

    def proxy_log() -> str:
        return (Path(env["TREADMILL_CONFIG"]).parent / "logs" / "proxy.log").read_text()

    assert f"console_opened: admin opened echo of job {job_id} to manage" in proxy_log()

    async def watches_only(local: int) -> bool:
        try:
            client = await echo_client(local)
        except ConnectError:
            return False
        client.transport.write(b"typed while watching")
        await deferLater(reactor, 0.5, lambda: None)
        client.transport.loseConnection()
        assert client.data == b""  # the proxy dropped it: no echo
        # ... and it did go through the proxy, with a read token of the user.
        return f"console_opened: admin opened echo of job {job_id} to read" in proxy_log()

    await through_connect(job_id, "echo", env, watches_only, 30.0, "--read-only")
    await tml_json(["job", "cancel", job_id], env)

    async def closed() -> bool:
        client = await console(endpoint["url"])
        try:
            await client.opened
        except AssertionError:
            return True  # 404: the tunnel is gone
        client.sendClose(1000)
        return False

    await eventually(closed, 30.0, interval=0.2)


async def published(job_id: str, env: dict[str, str], services: set[str],
                    timeout: float) -> dict[str, dict[str, Any]]:
    """The job's public endpoints by service, once ``services`` are all published."""
    found: dict[str, dict[str, Any]] = {}

    async def check() -> bool:
        job = await tml_json(["job", "show", job_id], env)
        found.update({e["service"]: e for e in job.get("endpoints") or []})
        return services <= set(found)

    await eventually(check, timeout, interval=0.2)
    return found


async def through_connect(job_id: str, service: str, env: dict[str, str],
                          check: Any, timeout: float, *options: str) -> None:
    """Run ``tml job connect JOB SERVICE --local-port P`` until ``check(P)`` holds."""
    local = free_port()
    output = _Output(io.BytesIO())
    argv = [sys.executable, "-m", "treadmill.cli.main", "job", "connect", job_id, service,
            "--local-port", str(local), *options]
    process = reactor.spawnProcess(output, argv[0], argv, env={**os.environ, **env})
    try:
        await eventually(lambda: check(local), timeout, interval=0.2)
    finally:
        process.signalProcess("TERM")
        await output.ended


async def type_line(port: int, line: bytes) -> bool:
    """Send ``line`` to a local port (False if nothing listens yet)."""
    try:
        client = await echo_client(port)
    except ConnectError:
        return False
    client.transport.write(line)
    await deferLater(reactor, 0.5, lambda: None)
    client.transport.loseConnection()
    return True


async def run_the_demo_image(env: dict[str, str]) -> None:
    """The devstack's demo image: the mock host really fetches it, the QEMU host boots it."""
    if not (shutil.which("qemu-img") and shutil.which("busybox")):
        return  # the devstack said it has no demo image
    images = await tml_json(["image", "ls"], env)
    assert any(i["name"] == "demo" for i in images["images"]), images
    argv = ["job", "submit", "demo", "--tag", "mock", "--follow", "--param",
            "mock.run_time=0.1"]
    out, err = io.StringIO(), io.StringIO()
    assert await tml(reactor, argv, out, err, env) == 0, out.getvalue() + err.getvalue()
    job_id = out.getvalue().splitlines()[0].strip()
    events = await tml_json(["job", "events", job_id], env)
    assert "fetching_image" in [e.get("stage") for e in events["events"]], events
    if not shutil.which("qemu-system-x86_64"):
        return
    # No --tag: the demo image's host tag (qemu) sends it to the QEMU host.
    argv = ["job", "submit", "demo", "--follow", "--param", "exit_status=3",
            "--param", "message=from the guest"]
    out, err = io.StringIO(), io.StringIO()
    status = await tml(reactor, argv, out, err, env)
    text = out.getvalue() + err.getvalue()
    assert "workload_exited, exit status 3" in text, text
    assert status == 4, text  # tml: the workload failed
    await snapshot_round_trip(env)
    await reach_a_vm_through_the_proxy(env)


async def reach_a_vm_through_the_proxy(env: dict[str, str]) -> None:
    """A failed QEMU job held for debugging (``--hold-on-failure``): its SSH port and
    console stay published on the proxy after its end, so the guest's SSH banner answers
    on the public port, ``tml job ssh JOB -- uname -a`` logs in, and a line typed through
    ``tml job connect JOB console`` reaches the guest, whose echo comes back; ``tml job
    cancel`` releases it: the VM is gone, its console of the hold (that line and the echo)
    is in ``tml job logs``, and the host runs the next job."""
    keys = Path(tempfile.mkdtemp(prefix="tml-ssh-test-"))
    ssh_keys = SSH_KEYS_FLOW and shutil.which("ssh") and shutil.which("ssh-keygen")
    if ssh_keys:  # registered before the job starts: its start carries them
        await register_ssh_key(keys, env)
    job_id = (await tml_json(["job", "submit", "demo", "--param", "exit_status=3",
                              "--hold-on-failure", "10m"], env))["id"]
    found = await published(job_id, env, {"ssh", "console"}, 60.0)

    async def held() -> bool:  # the guest failed; it stays up (its agent was told)
        job = await tml_json(["job", "show", job_id], env)
        return job["state"] == "terminated" and job["held_until"] is not None

    await eventually(held, 60.0, interval=0.2)
    assert (await tml_json(["job", "show", job_id], env))["termination"]["exit_status"] == 3
    assert (await banner(found["ssh"]["port"])).startswith(b"SSH-2.0-dropbear")
    if ssh_keys:
        await ssh_into_the_vm(job_id, keys, env)
    shutil.rmtree(keys, ignore_errors=True)

    async def echoed(local: int) -> bool:
        try:
            client = await echo_client(local)
        except ConnectError:
            return False
        try:
            client.transport.write(b"hello from the proxy\n")
            await deferLater(reactor, 1.0, lambda: None)
            return b"treadmill-test-image: input hello from the proxy" in client.data
        finally:
            client.transport.loseConnection()

    await through_connect(job_id, "console", env, echoed, 60.0)
    [pid] = qemu_processes(f"treadmill-{job_id}")
    await tml_json(["job", "cancel", job_id], env)

    async def released() -> bool:
        return (await tml_json(["job", "show", job_id], env))["held_until"] is None

    await eventually(released, 60.0, interval=0.2)
    assert not pid_alive(pid)  # torn down before the hold was over
    # The held VM's console (the line typed at it, echoed) is in the job's log, closed.
    out, err, code = await run_tml(["job", "logs", job_id, "--follow"], env)
    assert code == 0, err
    _, marker, held = out.partition(HOLD_MARKER.decode())
    assert marker and "treadmill-test-image: input hello from the proxy" in held, out[-2000:]
    assert out.endswith("[treadmill: the hold is over: the hold was released "
                        "(tml job cancel)]\r\n"), out[-2000:]
    argv = ["job", "submit", "demo", "--follow"]  # the host takes the next job
    out, err = io.StringIO(), io.StringIO()
    assert await tml(reactor, argv, out, err, env) == 0, \
        out.getvalue() + err.getvalue() + log_tail(env, "supervisor-qemu-1")


SSH_KEYS_FLOW = protocol.MINOR >= protocol.SSH_KEYS_MINOR
"""Keys reach jobs (and host keys come back) from protocol minor 5 on."""


async def run_tml(argv: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """``tml ARGV`` in a child process (its ssh writes to the real standard output)."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "treadmill.cli.main", *argv], env={**os.environ, **env})
    return out.decode(errors="replace"), err.decode(errors="replace"), code


async def register_ssh_key(keys: Path, env: dict[str, str]) -> None:
    await deferToThread(subprocess.run, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                                         "-f", str(keys / "id")], check=True)
    out, err, code = await run_tml(["key", "add", str(keys / "id.pub")], env)
    assert code == 0, out + err


async def ssh_into_the_vm(job_id: str, keys: Path, env: dict[str, str]) -> None:
    """Through the proxy: ``tml job ssh JOB -- uname -a`` runs in the guest; ``scp`` of
    10 MB with ``--proxy-command`` arrives whole; a tampered host key is refused."""
    async def host_keys() -> bool:
        return bool((await tml_json(["job", "show", job_id], env))["ssh_host_keys"])

    await eventually(host_keys, 60.0, interval=0.2)
    login = ["-i", str(keys / "id"), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "ConnectTimeout=30"]
    out, err, code = await run_tml(["job", "ssh", job_id, *login, "uname", "-a"], env)
    assert code == 0, err
    assert out.startswith("Linux ") and "cloud-amd64" in out, out
    out, err, code = await run_tml(["job", "ssh", job_id, *login, "exit 5"], env)
    assert code == 5, err  # the remote command's status

    known, err, code = await run_tml(["job", "ssh", "--known-hosts", job_id], env)
    assert code == 0, err
    (keys / "known_hosts").write_text(known)
    blob = keys / "blob"
    await deferToThread(blob.write_bytes, os.urandom(10 * 1024 * 1024))
    tml_cmd = f"{sys.executable} -m treadmill.cli.main job ssh --proxy-command %h"
    scp = ["scp", "-O", "-q", *login, "-F", "/dev/null", "-o", f"ProxyCommand={tml_cmd}",
           "-o", f"UserKnownHostsFile={keys / 'known_hosts'}",
           "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes"]
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/scp", [*scp[1:], str(blob), f"root@{job_id}:/tmp/blob"],
        env={**os.environ, **env})
    assert code == 0, err.decode(errors="replace")
    out, err, code = await run_tml(["job", "ssh", job_id, *login, "sha256sum /tmp/blob"], env)
    assert code == 0, err
    assert out.split()[0] == hashlib.sha256(blob.read_bytes()).hexdigest()

    # Tamper with the published host key: ssh refuses the guest before logging in.
    other = await deferToThread(subprocess.run, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                                                 "-f", str(keys / "other")], check=True)
    assert other.returncode == 0
    wrong = " ".join((keys / "other.pub").read_text().split()[:2])
    (keys / "known_hosts").write_text(f"{job_id} {wrong}\n")
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/ssh", [*scp[3:], f"root@{job_id}", "echo logged-in"],
        env={**os.environ, **env})
    assert code == 255 and b"logged-in" not in out, err
    assert b"Host key verification failed" in err or b"CHANGED" in err, err


async def banner(port: int) -> bytes:
    client = await echo_client(port)
    try:
        return await client.wait_for(10, timeout=10.0)
    finally:
        client.transport.loseConnection()


async def snapshot_round_trip(env: dict[str, str]) -> None:
    """A QEMU job writes to its disk; tml job snapshot makes it an image; a job booted
    from that image sees what the first one wrote."""
    argv = ["job", "submit", "demo", "--follow", "--param", "write_marker=hello-snapshot"]
    out, err = io.StringIO(), io.StringIO()
    assert await tml(reactor, argv, out, err, env) == 0, out.getvalue() + err.getvalue()
    job_id = out.getvalue().splitlines()[0].strip()
    snapshot = await tml_json(["job", "snapshot", job_id, "admin/demo-snap",
                               "--description", "demo plus a marker"], env)
    assert snapshot["state"] == "done" and snapshot["digest"].startswith("sha256:"), snapshot
    image = await tml_json(["image", "show", "admin/demo-snap"], env)
    assert image["digest"] == snapshot["digest"]
    argv = ["job", "submit", "admin/demo-snap", "--tag", "qemu", "--follow"]
    out, err = io.StringIO(), io.StringIO()
    status = await tml(reactor, argv, out, err, env)
    text = out.getvalue() + err.getvalue()
    assert status == 0, text
    assert "treadmill-test-image: disk: treadmill-base-layer | treadmill-top-layer | " \
           "hello-snapshot" in text, text
