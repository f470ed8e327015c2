"""The light client and the CI recipes, checked from a real install.

The wheel installed alone (no ``server`` extra) into a clean virtual environment:
no server-only package is there or imported, ``tml`` starts and talks to a real
switchboard (docs/cli.md, "Installing tml alone"). The recipes in examples/ci/
run as written from that environment (their install line, then their ``tml``
steps, with the environment they set) against a real switchboard, log server and
mock supervisor; their artifacts must exist and parse.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import mock_supervisor, start_switchboard
from tests.wheels import ROOT, new_venv, run
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.logserver.service import LogServerConfig, LogServerService
from treadmill.switchboard.api import Limits

RECIPES = ROOT / "examples" / "ci"
DIGEST = "sha256:" + "c" * 64
# Import names of what only the daemons need (the `server` extra and its dependencies).
SERVER_ONLY = ("klein", "werkzeug", "txpostgres", "psycopg2", "prometheus_client", "serial",
               "jwt")
pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory,
          built_wheel: Path) -> tuple[Path, Path]:
    """(the wheel, a clean virtual environment holding it without the server extra)."""
    base = tmp_path_factory.mktemp("light")
    venv = new_venv(base / "venv", pip=False)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet",
        "--no-compile", "--disable-pip-version-check", built_wheel, cwd=base)
    return built_wheel, venv


def clean_env(home: Path, venv: Path, **extra: str) -> dict[str, str]:
    """A CI runner's environment: the light venv first on PATH, no Treadmill settings."""
    return {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
            "LANG": "C.UTF-8", **extra}


def test_light_install_lacks_the_server_packages(light: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    _, venv = light
    python = venv / "bin" / "python"
    found = run(python, "-c", "import importlib.util as u, sys; "
                "print(' '.join(n for n in sys.argv[1:] if u.find_spec(n)))", *SERVER_ONLY,
                cwd=tmp_path).stdout.split()
    assert found == []
    # Every module of tml imports (commands run lazily-imported code only when used),
    # and none of them pulls in a server-side module of the tree either.
    loaded = run(python, "-c", """if 1:
        import importlib, pkgutil, sys
        import treadmill.cli
        for m in pkgutil.walk_packages(treadmill.cli.__path__, "treadmill.cli."):
            importlib.import_module(m.name)
        print(" ".join(sorted(sys.modules)))""", cwd=tmp_path).stdout.split()
    roles = ("switchboard", "imagestore", "logserver", "supervisor", "dev")
    assert [m for m in loaded if m.split(".")[0] in SERVER_ONLY
            or m.startswith(tuple(f"treadmill.{r}" for r in roles))] == []
    tml = venv / "bin" / "tml"
    for argv in ([], ["job", "submit"], ["job", "run"], ["image", "push"]):
        proc = run(tml, *argv, "--help", cwd=tmp_path)
        assert proc.stdout.startswith("usage: tml"), (argv, proc.stdout)


@pytest_twisted.ensureDeferred
async def test_light_tml_whoami_against_a_real_switchboard(
        light: tuple[Path, Path], migrated_database: str, tmp_path: Path) -> None:
    _, venv = light
    sb = await start_switchboard(migrated_database, tmp_path)
    try:
        tml = str(venv / "bin" / "tml")
        env = clean_env(tmp_path, venv, TREADMILL_URL=sb.url, TREADMILL_TOKEN=sb.admin_token)
        out, err, code = await getProcessOutputAndValue(tml, ["whoami", "--json"], env=env,
                                                        path=str(tmp_path))
        assert code == 0, err
        assert json.loads(out)["name"] == "admin"
        # A token the switchboard does not know: a clear error, and the token is not echoed.
        bad = "tml_" + "0" * 40
        out, err, code = await getProcessOutputAndValue(
            tml, ["whoami"], env={**env, "TREADMILL_TOKEN": bad}, path=str(tmp_path))
        assert code == 1 and b"error" in err, (out, err)
        assert bad.encode() not in out + err
    finally:
        await sb.stop()


# -- the CI recipes --------------------------------------------------------------------


def github_steps(doc: dict[str, Any]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(the job's env, [(step name, run script)]) of the recipe's only job."""
    (job,) = doc["jobs"].values()
    return dict(job["env"]), [(s.get("name", "?"), s["run"]) for s in job["steps"] if "run" in s]


def gitlab_steps(doc: dict[str, Any]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    (job,) = doc.values()
    steps = [(part, "\n".join(job[part])) for part in ("before_script", "script", "after_script")]
    return dict(job["variables"]), steps


def tml_lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if "tml " in line]


@pytest_twisted.async_yield_fixture
async def testbed(migrated_database: str, tmp_path: Path):
    """A switchboard, a log server and a mock host tagged ``mock``."""
    key = tmp_path / "capability-key.pem"
    load_or_create_signing_key(str(key))
    logs = LogServerService(reactor, LogServerConfig(
        root=str(tmp_path / "logs"), listen=["tcp:0:interface=127.0.0.1"],
        auth={"auth.keys_file": str(key)}, fsync="never", access_log=False))
    logs.startService()
    await logs.ready()
    log_url = f"http://127.0.0.1:{logs.ports()[0].getHost().port}"
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 limits=Limits(log_servers=(log_url,), log_replicas=1))
    r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    await sb.admin.post("/api/v1/hosts/mock-1/grants", {"user": "*", "privilege": "start"})
    supervisor = mock_supervisor(sb.url, r.body["token"], tmp_path / "mock-1",
                                 run_time=0.3, console_rate=2000)
    try:
        await supervisor.connected()
        yield sb
    finally:
        await supervisor.stopService()
        await sb.stop()
        await logs.stopService()


# The job's console patterns (--results-pattern KEY=REGEX), by what its results say.
PATTERNS = {"pass": "pass=mock.console", "none": "",
            # test cases whose result is no outcome (errors), in a workload that exits 0
            "failed": r"test_case=^mock.(?P<name>console)(?P<result>)"}


def assert_no_workflow_commands(log: str) -> None:
    """Every line of a GitHub step's log that starts with ``::`` falls between
    ``::stop-commands::TOKEN`` and ``::TOKEN::``, with a random token of this run."""
    rows = log.splitlines()
    starts = [i for i, row in enumerate(rows) if row.startswith("::stop-commands::")]
    assert len(starts) == 1, log
    token = rows[starts[0]].removeprefix("::stop-commands::")
    assert re.fullmatch("[0-9a-f]{32,}", token), token
    end = rows.index(f"::{token}::")
    assert [row for i, row in enumerate(rows) if row.startswith("::")
            and not starts[0] <= i <= end] == [], log
    assert any(row.startswith("::error::forged") for row in rows[starts[0]:end]), log


@pytest.mark.parametrize("results", list(PATTERNS))
@pytest.mark.parametrize(("recipe", "parse"), [("github-actions.yml", github_steps),
                                               ("gitlab-ci.yml", gitlab_steps)])
@pytest_twisted.ensureDeferred
async def test_ci_recipe_runs_against_real_daemons(light: tuple[Path, Path], testbed: Any,
                                                  tmp_path: Path, recipe: str,
                                                  parse: Any, results: str) -> None:
    """Every step of the recipe passes for a job that passed, whether or not it has test
    results (most jobs have none: no console patterns, no agent reporting); failed test
    cases of a workload that exited 0 fail the run's step, and GitHub's JUnit step
    (GitLab's after_script cannot fail). GitHub reads no workflow command from the
    job's console (it prints ``::error::forged``)."""
    wheel, venv = light
    text = (RECIPES / recipe).read_text()
    recipe_env, steps = parse(yaml.safe_load(text))
    # The token comes from the CI's secrets, into the environment: never in argv or the file.
    assert "TREADMILL_TOKEN" not in recipe_env or recipe_env["TREADMILL_TOKEN"] == (
        "${{ secrets.TREADMILL_TOKEN }}")
    lines = [line for _, script in steps for line in tml_lines(script)]
    assert any(line.startswith("tml job run ") and "--artifacts out/" in line
               for line in lines), lines
    assert not [line for _, script in steps for line in script.splitlines()
                if "--token" in line or "TREADMILL_TOKEN" in line]
    # Their install line is the fixture's: the client alone, no extra.
    install, steps = steps[0][1], steps[1:]
    assert "pip install" in install and '"$TREADMILL_CLIENT"' in install, install
    assert "[" not in install and "tml" not in install, install

    user = await testbed.user("ci")
    # A console pattern gives the job a results stream, which the JUnit step renders.
    run_args = "--param mock.run_time=0.3 --param mock.console=::error::forged" + (
        f" --results-pattern {PATTERNS[results]}" if PATTERNS[results] else "")
    failing = {"Run the board job", "JUnit report", "script"} if results == "failed" else set()
    env = clean_env(tmp_path / "home", venv, **{
        **{k: str(v) for k, v in recipe_env.items()},
        "TREADMILL_URL": testbed.url, "TREADMILL_TOKEN": user.token or "",
        "TREADMILL_RETRY_FOR": "10", "TREADMILL_CLIENT": str(wheel),
        "TREADMILL_IMAGE": DIGEST, "TREADMILL_TAG": "mock", "TREADMILL_RUN_ARGS": run_args})
    work = tmp_path / "checkout"
    work.mkdir()
    said = b""
    for name, script in steps:
        out, err, code = await getProcessOutputAndValue(
            "/bin/bash", ["-e", "-o", "pipefail", "-c", script], env=env, path=str(work))
        said += out + err
        if b"::error::forged" in out and recipe.startswith("github"):
            assert_no_workflow_commands(out.decode())
        if name in failing:
            assert code == 4, (recipe, name, out.decode(), err.decode())
            continue
        assert code == 0, (recipe, name, out.decode(), err.decode())
    assert b"::error::forged" in said
    assert user.token and user.token.encode() not in said

    out = work / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "terminated" and summary["exit_status"] == 0, summary
    assert (out / "console.log").stat().st_size > 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events and events[-1]["state"] == "terminated"
    report = ET.parse(out / "junit.xml").getroot()
    assert report.tag == "testsuites" and report.find("testsuite") is not None, report
    expected = {"pass": b"summary: pass", "none": b'tests="0"', "failed": b'errors="'}
    assert expected[results] in ET.tostring(report), ET.tostring(report)
    if results == "failed":
        assert report.get("errors") not in (None, "0"), ET.tostring(report)
