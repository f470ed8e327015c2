"""The store's components and the API's route classes are combined by inheritance
(``Store``, ``SwitchboardAPI``): no two may define the same name, or one would
silently replace the other (for routes, a Klein endpoint of the same name too)."""

from __future__ import annotations

import itertools

import pytest

from treadmill.switchboard.api import SwitchboardAPI
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.base import Queries


def _parts(combined: type, base: type) -> list[type]:
    return [cls for cls in combined.__mro__ if issubclass(cls, base) and cls not in
            (combined, base)]


def _own_names(cls: type) -> set[str]:
    return {name for name in vars(cls) if not (name.startswith("__") and name.endswith("__"))}


@pytest.mark.parametrize(("combined", "base"), [(Store, Queries), (SwitchboardAPI, Routes)])
def test_no_name_is_defined_twice(combined, base):
    parts = _parts(combined, base)
    assert len(parts) > 5
    for a, b in itertools.combinations(parts, 2):
        assert not _own_names(a) & _own_names(b), (a, b)
        assert not _own_names(a) & _own_names(base), (a, base)


def test_every_route_has_its_own_endpoint():
    rules = list(SwitchboardAPI.app.url_map.iter_rules())
    endpoints = {rule.endpoint for rule in rules}
    assert len(endpoints) == len(rules)
    handlers = {name for cls in _parts(SwitchboardAPI, Routes) for name in _own_names(cls)}
    assert endpoints <= handlers
