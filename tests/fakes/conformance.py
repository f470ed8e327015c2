"""Checks that a fake offers what it stands for: an interface, or a class's methods."""

from __future__ import annotations

import inspect
from typing import Any

from zope.interface.verify import verifyClass


def check_interface(interface: Any, fake: type) -> None:
    """``fake`` declares and implements ``interface`` (zope.interface's ``verifyClass``)."""
    assert verifyClass(interface, fake)


def check_methods(fake: type, real: type, names: list[str] | None = None) -> None:
    """Each public method of ``fake`` (or each of ``names``) exists on ``real`` with the
    same parameter names and kinds, and both are coroutines or neither."""
    if names is None:
        names = [n for n, v in vars(fake).items() if callable(v) and not n.startswith("_")]
    for name in names:
        ours, theirs = getattr(fake, name), getattr(real, name, None)
        assert theirs is not None, f"{real.__name__} has no {name}; {fake.__name__} does"
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        params = [(p.name, p.kind) for p in inspect.signature(ours).parameters.values()]
        expected = [(p.name, p.kind) for p in inspect.signature(theirs).parameters.values()]
        assert params == expected, f"{fake.__name__}.{name}{params} != {expected}"
