"""Who may do what to which image repository: the registry token policy.

Image stores (``treadmill-imagestore``) answer an unauthenticated request
with ``WWW-Authenticate: Bearer realm=<switchboard>/api/v1/registry/token``.
Clients (skopeo, ``tml image``, supervisors) fetch a short-lived capability
token there, in the Docker registry token format, for the access they ask
for; the switchboard grants the subset the caller holds.

Names are canonical: user and image names are unique regardless of case, and
the repository of a catalogue image is its name lowercased. A repository's
*namespace* is its first path component (``alice`` for ``alice/fw`` and for
``alice``); namespaces are owned:

- admins: everything, including the ``registry:catalog:*`` scope, and they
  alone write top-level repositories (``demo``) and other users' namespaces;
- a user: ``pull``, ``push`` and ``delete`` in their own namespace (the user
  ``alice`` or ``Alice`` owns ``alice`` and ``alice/…``) and in each namespace
  an admin granted them ``manage`` on; ``pull`` in each namespace granted
  ``use``;
- a user: ``pull`` on the repository of each catalogue image they may use
  (that is how others run alice's shared image). Managing an image gives
  nothing more: push and delete come from the namespace alone, so registering
  a name never opens a repository that holds someone else's content. An image
  whose repository lies in another user's namespace that its owner may not
  write (registered before namespaces were owned) lends nothing
  (``Store.readable_repositories``), and no job may run it;
- a host (by its host token): ``pull`` on the repository of the job it runs,
  and ``pull`` and ``push`` on the repository of each snapshot it was asked to
  make and has not finished (``docs/protocol.md``, ``snapshot_job``; a
  snapshot's name must be one its requester may write);
- anyone else: nothing (a store may still allow anonymous pulls itself).

The action ``*`` (``skopeo delete`` asks for ``repository:NAME:*``) stands
for every action; the token lists the concrete ones the caller holds.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from treadmill.common.captoken import Access
from treadmill.images.oci import is_repository

SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ACTIONS = ("pull", "push", "delete")
MAX_SCOPES = 32
TOKEN_TTL = 300.0


class ScopeError(ValueError):
    """A requested scope is malformed."""


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]


def parse_scopes(values: list[str]) -> list[Scope]:
    """``type:name:actions`` scopes; several may share one value, space-separated."""
    scopes = []
    for value in values:
        for item in value.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository":
                if not is_repository(name):
                    raise ScopeError(f"scope: invalid repository name in {item[:300]!r}")
                wanted = tuple(a for a in actions.split(",") if a)
                if not wanted or any(a not in ACTIONS and a != "*" for a in wanted):
                    raise ScopeError(f"scope: actions must be among {', '.join(ACTIONS)} or *")
                if "*" in wanted:
                    wanted = ACTIONS
            elif kind == "registry" and name == "catalog" and actions == "*":
                wanted = ("*",)
            else:
                raise ScopeError(f"scope: unsupported scope {item[:300]!r}")
            scopes.append(Scope(kind, name, wanted))
    if len(scopes) > MAX_SCOPES:
        raise ScopeError(f"scope: at most {MAX_SCOPES} scopes")
    return scopes


def namespace_of(repository: str) -> str:
    """A repository's namespace: its first path component."""
    return repository.split("/", 1)[0]


def may_write(repository: str, user: str, admin: bool,
              namespaces: Mapping[str, frozenset[str]]) -> bool:
    """Whether a user may push to and delete in ``repository``, and register or
    snapshot catalogue images whose repository it is.

    Admins anywhere; others in their own namespace and in namespaces granted
    them ``manage`` (``namespaces`` maps a namespace to the privileges the user
    holds on it).
    """
    if admin:
        return True
    namespace = namespace_of(repository)
    return namespace == user.lower() or "manage" in namespaces.get(namespace, frozenset())


def user_actions(scope: Scope, user: str, admin: bool, images: Collection[str],
                 namespaces: Mapping[str, frozenset[str]]) -> tuple[str, ...]:
    """What a user may do of ``scope``.

    ``images`` holds the repositories of the catalogue images the user may
    use; ``namespaces`` the user's privileges on namespaces, from grants.
    """
    if admin:
        return scope.actions
    if scope.type != "repository":
        return ()
    if may_write(scope.name, user, admin, namespaces):
        return scope.actions
    readable = scope.name in images or bool(namespaces.get(namespace_of(scope.name)))
    return ("pull",) if readable and "pull" in scope.actions else ()


def host_actions(scope: Scope, repositories: frozenset[str],
                 snapshots: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """What a host may do of ``scope``: pull its job's image, push its pending snapshots."""
    if scope.type != "repository":
        return ()
    if scope.name in snapshots:
        return tuple(a for a in scope.actions if a in ("pull", "push"))
    if scope.name in repositories and "pull" in scope.actions:
        return ("pull",)
    return ()


def access(scope: Scope, actions: tuple[str, ...]) -> Access | None:
    return Access(scope.type, scope.name, actions) if actions else None
