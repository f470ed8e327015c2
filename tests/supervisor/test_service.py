"""The supervisor's service tree: its named children are the tree drawn in the
``service.py`` docstring; the runner's observers implement ``IJobObserver`` and
the fetcher ``IImageFetcher``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.application.service import IService
from zope.interface.verify import verifyObject

from tests.supervisor.peer import FakeSwitchboard
from treadmill.common.daemon import RoleService, add_operator_services
from treadmill.supervisor import service as service_module
from treadmill.supervisor.fetch import IImageFetcher
from treadmill.supervisor.observers import IJobObserver
from treadmill.supervisor.service import SupervisorService

Make = Callable[..., SupervisorService]
TREE_LINE = re.compile(r"^\s*[├└]── (\S+)\s+(.*)$", re.MULTILINE)


def drawn_tree() -> list[tuple[str, bool]]:
    """The docstring's children of the root: (name, optional), in order."""
    doc = service_module.__doc__ or ""
    return [(name, text.startswith("optional")) for name, text in TREE_LINE.findall(doc)]


def test_the_docstring_draws_a_tree() -> None:
    names = [name for name, _ in drawn_tree()]
    assert names[:4] == ["logs", "exposure", "runner", "fetcher"] and names[-1] == "link"


@pytest_twisted.ensureDeferred
async def test_the_running_tree_is_the_drawn_one(peer: FakeSwitchboard, supervisors: Make,
                                                 tmp_path: Path) -> None:
    for operator in (False, True):
        service = supervisors(state=f"state-{operator}", start=False)
        if operator:  # what makeService adds: the manhole and the metrics listeners
            values: dict[str, Any] = {
                "manhole.listen": ["tcp:0:interface=127.0.0.1"],
                "manhole.authorized_keys": str(tmp_path / "keys"),
                "manhole.host_key": str(tmp_path / "host_key"),
                "metrics.listen": ["tcp:0:interface=127.0.0.1"]}
            (tmp_path / "keys").write_text("")
            add_operator_services(service.reactor, service, values, service.namespace(),
                                  service.metrics.registry)
        service.startService()
        await service.ready()
        assert isinstance(service, RoleService)
        running = [child.name for child in service]
        assert all(IService.providedBy(child) for child in service)
        expected = [name for name, optional in drawn_tree() if operator or not optional]
        assert running == expected
        await service.stopService()
        assert not any(child.running for child in service)


def test_the_observers_are_job_observers(supervisors: Make) -> None:
    service = supervisors(start=False)
    assert service.runner.observers == [service.logs, service.exposure,
                                        service.console_notices, service.metrics]
    for observer in service.runner.observers:
        assert verifyObject(IJobObserver, observer)


def test_the_drivers_fetcher_is_an_image_fetcher(supervisors: Make) -> None:
    service = supervisors(start=False)
    assert service.driver.fetcher is service.fetcher
    assert verifyObject(IImageFetcher, service.fetcher)
