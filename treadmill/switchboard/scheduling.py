"""Matching queued jobs to free hosts, fairly. Pure: no I/O.

Fairness: among users who have a job some free host can run, the least-served
user goes first (the fewest jobs holding hosts or recently assigned: the
caller counts them; ties go to the user whose oldest runnable job is oldest),
and each user's jobs go oldest first. A job may run
on a host when the host's tags are a superset of the job's and the job's
owner may start jobs there (admin, host owner, or a ``start``/``manage``
grant to them or to every user), and the host runs the job's image kind (a
job of unknown kind, or a host that reports no kinds: any). Among the hosts a
job may use, the one with the fewest tags is taken, keeping specialised hosts
for jobs that need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedJob:
    id: str
    seq: int
    owner_id: int
    owner_admin: bool
    tags: frozenset[str]
    kind: str | None = None
    """The image's kind (``qemu``, ``board``); None: unknown, any host."""


@dataclass(frozen=True)
class FreeHost:
    id: int
    name: str
    owner_id: int | None
    tags: frozenset[str]
    starters: frozenset[int | None]
    """Users granted start or manage; ``None`` stands for every user."""
    kinds: frozenset[str] | None = None
    """The image kinds its driver runs; None: any kind."""


def may_run(job: QueuedJob, host: FreeHost) -> bool:
    if not job.tags <= host.tags:
        return False
    if job.kind is not None and host.kinds is not None and job.kind not in host.kinds:
        return False
    return (job.owner_admin or host.owner_id == job.owner_id or None in host.starters
            or job.owner_id in host.starters)


def assign(jobs: Iterable[QueuedJob], hosts: Iterable[FreeHost],
           active: dict[int, int]) -> list[tuple[QueuedJob, FreeHost]]:
    """Pairs of (job, host) to assign now; ``active`` is each user's share so far."""
    free = sorted(hosts, key=lambda h: (len(h.tags), h.name))
    queues: dict[int, list[QueuedJob]] = {}
    for job in sorted(jobs, key=lambda j: j.seq):
        queues.setdefault(job.owner_id, []).append(job)
    served = dict(active)
    pairs: list[tuple[QueuedJob, FreeHost]] = []
    while free and queues:
        best: tuple[tuple[int, int], QueuedJob, FreeHost] | None = None
        for owner, queue in queues.items():
            for job in queue:
                host = next((h for h in free if may_run(job, h)), None)
                if host is None:
                    continue
                key = (served.get(owner, 0), job.seq)
                if best is None or key < best[0]:
                    best = (key, job, host)
                break  # Only this user's oldest runnable job competes.
        if best is None:
            break
        _, job, host = best
        pairs.append((job, host))
        free.remove(host)
        queues[job.owner_id].remove(job)
        if not queues[job.owner_id]:
            del queues[job.owner_id]
        served[job.owner_id] = served.get(job.owner_id, 0) + 1
    return pairs
