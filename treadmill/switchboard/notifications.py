"""The payloads of the database's notifications, parsed and formatted in one place.

Triggers in ``migrations/`` send them when a row changes; each instance's
LISTEN connection (:class:`~treadmill.switchboard.database.Listener`) hands the
payload text to its observers, which parse it here:

- ``treadmill_jobs``: ``"<job id> <state> <host id or ->"`` (:class:`JobNote`), for
  every insert or update of a job row, and with the state :data:`EXTENDED` for a job
  on a host whose timeout grew (``Store.extend_job``) or whose held host's hold did
  (``Store.extend_hold``): its host needs fresh tokens;
- ``treadmill_hosts``: ``"<host id> <session or ->"`` (:class:`HostNote`), for every
  change of a host row (``-``: no link, or the host was deleted);
- ``treadmill_snapshots``: ``"<host id or ->"`` (:class:`SnapshotNote`), for a snapshot
  requested;
- ``treadmill_auth``: the name of the table whose users or tokens changed (read by
  :mod:`treadmill.switchboard.auth`, which only drops its cache).

A payload that does not parse (``parse`` returns None) is ignored by its observers.
"""

from __future__ import annotations

from dataclasses import dataclass

_NONE = "-"

EXTENDED = "extended"
"""The :class:`JobNote` state of a job on a host that was extended (not a job state)."""


def _host_id(text: str) -> int | None:
    """A host id field: an integer, or ``-`` for none (ValueError otherwise)."""
    return None if text == _NONE else int(text)


@dataclass(frozen=True)
class JobNote:
    """A job row changed: its ``state`` now and the host holding it (None: none)."""

    job_id: str
    state: str
    host_id: int | None

    @classmethod
    def parse(cls, payload: str) -> JobNote | None:
        parts = payload.split(" ")
        if len(parts) != 3:
            return None
        try:
            return cls(parts[0], parts[1], _host_id(parts[2]))
        except ValueError:
            return None

    def format(self) -> str:
        host = _NONE if self.host_id is None else str(self.host_id)
        return f"{self.job_id} {self.state} {host}"


@dataclass(frozen=True)
class HostNote:
    """A host row changed: the link ``session`` holding it now (None: no link, or the
    host was deleted)."""

    host_id: int
    session: str | None

    @classmethod
    def parse(cls, payload: str) -> HostNote | None:
        parts = payload.split(" ")
        if len(parts) != 2:
            return None
        try:
            host_id = int(parts[0])
        except ValueError:
            return None
        return cls(host_id, None if parts[1] == _NONE else parts[1])

    def format(self) -> str:
        return f"{self.host_id} {self.session or _NONE}"


@dataclass(frozen=True)
class SnapshotNote:
    """A snapshot was requested of the job on ``host_id`` (None: no host recorded)."""

    host_id: int | None

    @classmethod
    def parse(cls, payload: str) -> SnapshotNote | None:
        try:
            return cls(_host_id(payload))
        except ValueError:
            return None

    def format(self) -> str:
        return _NONE if self.host_id is None else str(self.host_id)
