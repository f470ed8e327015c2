"""Who may do what: principals, privileges and how they combine.

Admins hold every privilege. Owners hold every privilege on what they own.
Anyone else holds what grants give them; a grant to ``*`` (every user) counts
for all. ``manage`` implies the other privileges of its kind, and any privilege
implies the weakest (``read``, ``use``): what a list shows its holder, the holder
may read (the lists show every owned or granted resource).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PRIVILEGES: dict[str, tuple[str, ...]] = {
    "host": ("read", "start", "manage"),
    "job": ("read", "stop", "manage"),
    "image": ("use", "manage"),
    "namespace": ("use", "manage"),  # repository namespaces; granted by admins only
}
"""The privileges of each kind of resource, weakest first."""

KIND_OF_COLLECTION = {"hosts": "host", "jobs": "job", "images": "image"}


@dataclass(frozen=True)
class Principal:
    """An authenticated user."""

    user_id: int
    name: str
    admin: bool
    token_id: str | None = None


def effective(kind: str, principal: Principal, owner_id: int | None,
              granted: Iterable[str]) -> frozenset[str]:
    """The privileges ``principal`` holds on one resource."""
    every = PRIVILEGES[kind]
    if principal.admin or (owner_id is not None and owner_id == principal.user_id):
        return frozenset(every)
    held = set(granted) & set(every)
    if "manage" in held:
        return frozenset(every)
    return frozenset(held | {every[0]}) if held else frozenset()
