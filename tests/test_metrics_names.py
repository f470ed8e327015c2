"""Every role's ``/metrics``, scraped over loopback, against the tables of docs/operations.md.

Real services in this process (a switchboard on the test's PostgreSQL, a log
server, an image store and an image cache, a proxy and a mock supervisor that
runs a job with console output shipped to the log server), each registry
served by the shared metrics listener on a loopback port and scraped over
HTTP. The documented names, types and labels must be exactly those scraped,
``promtool check metrics`` (when installed) must accept every scrape, and the
example Grafana dashboard may only use exported metrics and their labels, in
queries ``promtool check rules`` accepts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.imagestore.support import Keys as StoreKeys
from tests.imagestore.support import start_cache, start_store
from tests.logserver.support import start_logserver
from tests.proxy.support import Keys as ProxyKeys
from tests.proxy.support import start_proxy
from tests.support import final, mock_host, mock_job, start_switchboard
from tests.util.metricnames import documented, scraped
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.common.metrics import metrics_service
from treadmill.supervisor.drivers import STAGES
from treadmill.switchboard.api import Limits

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc" / "grafana" / "treadmill.json"
ROLES = ("Switchboard", "Image store", "Image cache", "Log server", "Proxy", "Supervisor")
# The labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


def test_the_docs_have_a_table_per_role() -> None:
    tables = documented()
    assert set(ROLES) <= set(tables), tables.keys()
    assert all(tables[role] for role in ROLES)


async def _scrape(registry: Any) -> str:
    service = metrics_service(reactor, ["tcp:0:interface=127.0.0.1"], registry)
    service.startService()
    try:
        child = next(iter(service))
        port = (await child._waitingForPort).getHost().port
        response = await treq.get(f"http://127.0.0.1:{port}/metrics")
        assert response.code == 200
        return (await response.content()).decode()
    finally:
        await service.stopService()


async def _promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    out, err, code = await _run_with_stdin(promtool, text.encode())
    assert code == 0, (out + err).decode()


async def _run_with_stdin(executable: str, data: bytes) -> tuple[bytes, bytes, int]:
    """``executable check metrics`` with ``data`` on its standard input."""

    class Collect(ProcessProtocol):
        def __init__(self) -> None:
            self.out, self.err = b"", b""
            self.done: Deferred[int] = Deferred()

        def connectionMade(self) -> None:
            self.transport.write(data)
            self.transport.closeStdin()

        def outReceived(self, chunk: bytes) -> None:
            self.out += chunk

        def errReceived(self, chunk: bytes) -> None:
            self.err += chunk

        def processEnded(self, reason: Any) -> None:
            self.done.callback(reason.value.exitCode)

    proto = Collect()
    reactor.spawnProcess(proto, executable, [executable, "check", "metrics"], env={})
    code = await proto.done
    return proto.out, proto.err, code


@pytest_twisted.ensureDeferred
async def test_every_role_exports_what_the_docs_list(migrated_database: str,
                                                     tmp_path: Path) -> None:
    key = tmp_path / "capability-key.pem"  # the switchboard's; the log server trusts it
    load_or_create_signing_key(str(key))
    logs = await start_logserver(tmp_path / "logs", key)
    (tmp_path / "keys").mkdir()
    (tmp_path / "store-keys").mkdir()
    store_keys = StoreKeys(tmp_path / "store-keys")
    store = await start_store(tmp_path / "store", store_keys)
    cache = await start_cache(tmp_path / "cache", store_keys, [store.url])
    proxy = await start_proxy(ProxyKeys(tmp_path / "keys"))
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 limits=Limits(log_servers=(logs.url,), log_replicas=1))
    supervisor = await mock_host(sb, tmp_path / "sup", run_time=0.3, console_rate=20_000)
    try:
        await supervisor.connected()
        job_id = await mock_job(sb.admin)

        await final(sb.admin, job_id, timeout=20)
        await sb.service._count_jobs()
        registries = {
            "Switchboard": sb.service.metrics.registry,
            "Image store": store.service.metrics.registry,
            "Image cache": cache.service.metrics.registry,
            "Log server": logs.service.metrics.registry,
            "Proxy": proxy.service.metrics.registry,
            "Supervisor": supervisor.metrics.registry,
        }
        tables = documented()
        texts, wrong = {}, {}
        for role, registry in registries.items():
            texts[role] = text = await _scrape(registry)
            expected = dict(tables.get(role, {}))
            if role == "Image cache":  # a cache exports the store's metrics too
                expected.update(tables.get("Image store", {}))
            found = {name: (kind, expected[name][1] if labels is None and name in expected
                            else labels) for name, (kind, labels) in scraped(text).items()}
            if found != expected:
                wrong[role] = {"undocumented": sorted(set(found.items()) - set(expected.items())),
                               "not exported": sorted(set(expected.items()) - set(found.items()))}
            await _promtool(text)
        assert not wrong, "\n".join(
            f"{role}: {what}: `{name}{{{','.join(sorted(labels or ()))}}}` | {kind}"
            for role, found in wrong.items() for what, rows in found.items()
            for name, (kind, labels) in rows)
        # The job's work shows, once.
        sup = texts["Supervisor"]
        assert re.search(r"^treadmill_supervisor_console_bytes_total [1-9]", sup, re.M)
        assert "treadmill_supervisor_link_up 1.0" in sup
        for stage in (*STAGES, "ready"):
            assert re.search(rf'^treadmill_supervisor_job_stage_seconds_count\{{driver="mock",'
                             rf'stage="{stage}"\}} 1\.0$', sup, re.M), stage
        assert 'treadmill_supervisor_image_layers_total{source="store"} 0.0' in sup
        swb = texts["Switchboard"]
        assert 'treadmill_jobs_terminated_total{reason="workload_exited"} 1.0' in swb
        assert "treadmill_job_queue_wait_seconds_count 1.0" in swb
        assert "treadmill_job_dispatch_seconds_count 1.0" in swb
        assert 'treadmill_hosts{state="connected"} 1.0' in swb
    finally:
        await supervisor.stopService()
        await sb.stop()
        for running in (proxy, cache, store, logs):
            await running.stop()


def _expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in _expressions(value)]
    return []


def test_the_grafana_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is PromQL that ``promtool check rules`` accepts (as a recording
    rule, the dashboard's variables replaced by what they may match)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool")
    exprs = _expressions(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"treadmill:dashboard:{n}", "expr": re.sub(r"\$[a-z_]+", ".+", expr)}
        for n, expr in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout


def test_the_grafana_dashboard_selects_the_documented_scrape_jobs() -> None:
    """The dashboard's job variables default to the ``job_name``s of operations.md's
    ``prometheus.yml``, so that a site scraping as documented sees every panel filled."""
    variables = {v["name"]: v["query"] for v in json.loads(DASHBOARD.read_text())
                 ["templating"]["list"] if v["type"] == "custom"}
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("```yaml\n# prometheus.yml")
    jobs = re.findall(r"job_name:\s*(\S+)", text[start:text.index("```", start + 3)])
    assert sorted(variables.values()) == sorted(jobs)


def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _expressions(dashboard)
    assert exprs
    names = set()
    for kind_labels in documented().values():
        for name, (kind, _) in kind_labels.items():
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    used = set()
    for expr in exprs:
        for word in re.findall(r"\btreadmill_[a-z0-9_]+", expr):
            used.add(word)
            assert word in names, (word, expr)
    # Label matchers and groupings name the metric's documented labels (or the
    # target labels Prometheus adds).
    labels: dict[str, frozenset[str]] = {}
    for kind_labels in documented().values():
        for name, (kind, names) in kind_labels.items():
            labels[name] = names
            if kind == "histogram":
                labels.update({f"{name}_bucket": names | {"le"}, f"{name}_sum": names,
                               f"{name}_count": names})
    for expr in exprs:
        for metric, selector in re.findall(r"\b(treadmill_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector):
                assert label in labels[metric] | TARGET_LABELS, (metric, label, expr)
        grouped = set(TARGET_LABELS)
        for word in re.findall(r"\btreadmill_[a-z0-9_]+", expr):
            grouped |= labels[word]
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (part.strip() for part in clause.split(","))):
                assert label in grouped, (label, expr)
    roles = documented()
    for role in ("Switchboard", "Supervisor", "Log server", "Image store", "Proxy"):
        assert used & set(roles[role]) or any(
            u.rsplit("_", 1)[0] in roles[role] for u in used), role

