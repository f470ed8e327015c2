"""Who may do what to which image repository: the registry token policy.

Image stores (``treadmill-imagestore``) answer an unauthenticated request
with ``WWW-Authenticate: Bearer realm=<switchboard>/api/v1/registry/token``.
Clients (skopeo, ``tml image``, supervisors) fetch a short-lived capability
token there, in the Docker registry token format, for the access they ask
for; the switchboard grants the subset the caller holds:

- admins: everything, including the ``registry:catalog:*`` scope;
- a user: ``pull``, ``push`` and ``delete`` on the repository named after
  them (``alice``) and every repository below it (``alice/…``);
- a user: ``pull`` on the repository of each catalogue image they may use
  (the catalogue name, lowercased), and ``push``/``delete`` too where they
  may manage it;
- a user: ``pull``, ``push`` and ``delete`` on an unclaimed repository, one
  that no catalogue image names and that is not below another user's name
  (so a first ``tml image push`` of a new image works; registering it then
  claims the repository);
- a host (by its host token): ``pull`` on the repository of the job it runs,
  and ``pull`` and ``push`` on the repository of each snapshot it was asked to
  make and has not finished (``docs/protocol.md``, ``snapshot_job``);
- anyone else: nothing (a store may still allow anonymous pulls itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from treadmill.common.captoken import Access

REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
                        r"(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
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
                if len(name) > 255 or not REPOSITORY.fullmatch(name):
                    raise ScopeError(f"scope: invalid repository name in {item[:300]!r}")
                wanted = tuple(a for a in actions.split(",") if a)
                if not wanted or any(a not in ACTIONS for a in wanted):
                    raise ScopeError(f"scope: actions must be among {', '.join(ACTIONS)}")
            elif kind == "registry" and name == "catalog" and actions == "*":
                wanted = ("*",)
            else:
                raise ScopeError(f"scope: unsupported scope {item[:300]!r}")
            scopes.append(Scope(kind, name, wanted))
    if len(scopes) > MAX_SCOPES:
        raise ScopeError(f"scope: at most {MAX_SCOPES} scopes")
    return scopes


def repository_of(image_name: str) -> str:
    """The repository a catalogue image lives in: its name, lowercased."""
    return image_name.lower()


def user_actions(scope: Scope, user: str, admin: bool,
                 images: dict[str, frozenset[str]], claimed: bool = True) -> tuple[str, ...]:
    """What a user may do of ``scope``.

    ``images`` maps repositories to the user's privileges on their catalogue
    images; ``claimed`` says whether the repository belongs to an image or a
    user at all.
    """
    if admin:
        return scope.actions
    if scope.type != "repository":
        return ()
    own = user.lower()
    if scope.name == own or scope.name.startswith(own + "/"):
        return scope.actions
    if not claimed:
        return scope.actions
    held = images.get(scope.name, frozenset())
    allowed = {"pull"} if "use" in held else set()
    if "manage" in held:
        allowed |= {"push", "delete"}
    return tuple(a for a in scope.actions if a in allowed)


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
