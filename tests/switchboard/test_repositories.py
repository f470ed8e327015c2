"""The registry token policy as pure functions: scopes and who may write where."""

from __future__ import annotations

import pytest

from treadmill.switchboard.repositories import (
    Scope,
    ScopeError,
    may_write,
    parse_scopes,
    user_actions,
)

ALL = ("pull", "push", "delete")


@pytest.mark.parametrize(("value", "actions"), [
    ("repository:a/b:*", ALL),
    ("repository:a/b:pull,*", ALL),
    ("repository:a/b:pull", ("pull",)),
    ("repository:a/b:delete,pull", ("delete", "pull")),
    ("registry:catalog:*", ("*",)),
])
def test_scopes(value: str, actions: tuple[str, ...]) -> None:
    [scope] = parse_scopes([value])
    assert scope.actions == actions


@pytest.mark.parametrize("value", ["repository:a:**", "repository:a:*x", "repository:A:*",
                                   "registry:gc:*", "repository:a:"])
def test_bad_scopes(value: str) -> None:
    with pytest.raises(ScopeError):
        parse_scopes([value])


@pytest.mark.parametrize(("repository", "user", "granted", "expected"), [
    ("alice", "alice", {}, True),
    ("alice/fw", "Alice", {}, True),
    ("alice/x/y", "ALICE", {}, True),
    ("alice2/fw", "alice", {}, False),  # a prefix of the name is not the namespace
    ("alice-img", "alice", {}, False),
    ("alic/fw", "alice", {}, False),
    ("demo", "alice", {}, False),
    ("team/fw", "alice", {"team": frozenset({"use"})}, False),
    ("team/fw", "alice", {"team": frozenset({"manage"})}, True),
    ("team", "alice", {"team": frozenset({"manage"})}, True),
    ("teams/fw", "alice", {"team": frozenset({"manage"})}, False),
])
def test_may_write(repository: str, user: str, granted: dict, expected: bool) -> None:
    assert may_write(repository, user, False, granted) is expected
    assert may_write(repository, user, True, {}) is True


def test_images_lend_pull_only() -> None:
    scope = Scope("repository", "alice/fw", ALL)
    assert user_actions(scope, "bob", False, {"alice/fw"}, {}) == ("pull",)
    assert user_actions(scope, "bob", False, set(), {"alice": frozenset({"use"})}) == ("pull",)
    assert user_actions(scope, "bob", False, set(), {}) == ()
    assert user_actions(Scope("repository", "alice/fw", ("push",)), "bob", False,
                        {"alice/fw"}, {}) == ()
    assert user_actions(Scope("registry", "catalog", ("*",)), "bob", False, set(), {}) == ()
    assert user_actions(Scope("registry", "catalog", ("*",)), "root", True, set(), {}) == ("*",)
