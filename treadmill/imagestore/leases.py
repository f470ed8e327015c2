"""Leases: an image cache never evicts a blob that a running job uses.

A lease names digests (blobs, or manifests: a leased manifest protects every
blob and child manifest it references, recursively, as far as they are in
the cache), a holder (a host or job id, for operators) and an expiry time.
Each lease is a small JSON file, ``ROOT/cache/leases/<id>.json``, written
atomically (temporary file, fsync, rename), so that a cache restart keeps
them; expired leases are removed by the cache's periodic maintenance.

The file holds::

    {"lease": "<id>", "holder": "...", "digests": ["sha256:..."],
     "repository": "lab/fw" or null, "owner": "<token subject>" or null,
     "created_at": <epoch seconds>, "expires_at": <epoch seconds>}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

from treadmill.images.format import is_digest
from treadmill.images.oci import is_repository
from treadmill.imagestore.storage import Storage

LEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HOLDER_MAX = 256
DIGESTS_MAX = 1024
#: Active leases one subject may hold through repository pull tokens (a host holds one per
#: job it runs; a cache lease token is not bounded).
PER_OWNER_MAX = 64


def rfc3339(when: float) -> str:
    """Seconds since the epoch as an RFC 3339 UTC time."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_lease_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Lease:
    id: str
    holder: str
    digests: list[str]
    created_at: float
    expires_at: float
    repository: str | None = None
    owner: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def active(self, now: float) -> bool:
        return self.expires_at > now

    def to_json(self) -> dict[str, Any]:
        return {"lease": self.id, "holder": self.holder, "digests": list(self.digests),
                "repository": self.repository, "owner": self.owner,
                "created_at": self.created_at, "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, value: Any) -> Lease:
        if not isinstance(value, dict):
            raise ValueError("not an object")
        lease_id, holder, digests = value.get("lease"), value.get("holder"), value.get("digests")
        if not isinstance(lease_id, str) or not LEASE_ID.fullmatch(lease_id):
            raise ValueError("bad lease id")
        if not isinstance(holder, str) or not holder:
            raise ValueError("bad holder")
        if not isinstance(digests, list) or not all(isinstance(d, str) and is_digest(d)
                                                    for d in digests):
            raise ValueError("bad digests")
        repository = value.get("repository")
        if repository is not None and not (isinstance(repository, str)
                                           and is_repository(repository)):
            raise ValueError("bad repository")
        owner = value.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise ValueError("bad owner")
        times = [value.get("created_at"), value.get("expires_at")]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise ValueError("bad times")
        return cls(lease_id, holder, list(digests), float(times[0]), float(times[1]),
                   repository, owner)


class Leases:
    """The leases of a cache: in memory, and one file each under ``ROOT/cache/leases/``.

    The disk methods (:meth:`load`, :meth:`save`, :meth:`delete_file`) block:
    call them in the store's thread pool.
    """

    log = Logger()

    def __init__(self, storage: Storage):
        self.storage = storage
        self.directory = os.path.join(storage.cache, "leases")
        self.leases: dict[str, Lease] = {}

    def path(self, lease_id: str) -> str:
        assert LEASE_ID.fullmatch(lease_id), lease_id
        return os.path.join(self.directory, lease_id + ".json")

    def load(self) -> list[Lease]:
        """Read every lease file (blocking); unreadable ones are logged and left alone."""
        self.storage.ensure_private_dir(self.storage.cache)
        self.storage.ensure_private_dir(self.directory)
        found: list[Lease] = []
        for entry in sorted(os.listdir(self.directory)):
            if not entry.endswith(".json"):
                continue
            path = os.path.join(self.directory, entry)
            try:
                with open(path, "rb") as f:
                    lease = Lease.from_json(json.load(f))
                if entry != lease.id + ".json":
                    raise ValueError("file name and lease id differ")
            except (OSError, ValueError) as e:
                self.log.warn("Ignoring lease file {path}: {error}", path=path, error=str(e))
                continue
            found.append(lease)
        return found

    def save(self, lease: Lease) -> None:
        data = json.dumps(lease.to_json(), sort_keys=True).encode() + b"\n"
        self.storage.write_atomic(self.path(lease.id), data, 0o600)

    def delete_file(self, lease_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(lease_id))

    # -- in memory (the reactor thread) ------------------------------------------

    def get(self, lease_id: str, now: float) -> Lease | None:
        lease = self.leases.get(lease_id)
        return lease if lease is not None and lease.active(now) else None

    def active(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.active(now)]

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values() if not lease.active(now)]

    def digests(self, now: float) -> set[str]:
        """Every digest named by an active lease."""
        found: set[str] = set()
        for lease in self.leases.values():
            if lease.active(now):
                found.update(lease.digests)
        return found
