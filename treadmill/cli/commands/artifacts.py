"""``tml job run --artifacts DIR``: what a CI pipeline keeps of a job.

``summary.json`` (always), ``events.jsonl`` (the switchboard's events of every
job of the restart chain), ``console.log`` (the last job's console; earlier
jobs of the chain as ``console-<id>.log``) and ``results`` (the last job's
``results`` stream, as stored, if it has one). A stream with no bytes gives no
file. What an earlier run left in the directory under these names is removed first
(``clear_previous``), so a reused directory never passes another job's files off as
this one's. The layout is documented in docs/cli.md.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from treadmill.cli import output
from treadmill.cli.client import ApiError, Unreachable
from treadmill.cli.commands.follow import Followed, ran_on_a_host
from treadmill.cli.commands.logs import FileWriter, read_stream
from treadmill.cli.context import EXIT_OK, CommandError, Context

SUMMARY_VERSION = 1

OWN_FILES = frozenset({"summary.json", "events.jsonl", "console.log", "results"})
"""The artifacts' fixed names (and each with ``.tmp``, an atomic write's temporary)."""
EARLIER_CONSOLE = re.compile(r"console-[0-9a-fA-F-]{36}\.log")
"""An earlier job of a restart chain's console: ``console-<id>.log``."""


def console_file(job: dict[str, Any], last: bool) -> str:
    """The file of a job's console: ``console.log`` for the last job of the chain, else
    ``console-<id>.log``; an id that is not a UUID (from a broken or hostile switchboard:
    ``../../.bashrc``) never names a file."""
    if last:
        return "console.log"
    try:
        return f"console-{uuid.UUID(str(job['id']))}.log"
    except ValueError:
        raise CommandError(f"job id {output.clean(str(job['id']))!r} is not a UUID; "
                           "its console is not saved") from None


def clear_previous(root: Path) -> list[str]:
    """Remove the artifacts an earlier run wrote into ``root`` (the names this module
    writes; other files stay), so that a file this run does not write (a job that never
    ran has no console) cannot be mistaken for this run's. The names removed."""
    removed = []
    for entry in sorted(root.iterdir()):
        name = entry.name.removesuffix(".tmp")
        if (name in OWN_FILES or EARLIER_CONSOLE.fullmatch(name)) and (
                entry.is_symlink() or entry.is_file()):
            entry.unlink()
            removed.append(entry.name)
    return removed


def _seconds(start: Any, end: Any) -> float | None:
    """Seconds between two RFC 3339 times, or None if either is missing."""
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((b - a).total_seconds(), 3)


def _job_entry(job: dict[str, Any]) -> dict[str, Any]:
    term = job.get("termination") or {}
    return {
        "id": job.get("id"), "restart_of": job.get("restart_of"), "host": job.get("host"),
        "state": job.get("state"), "reason": term.get("reason"),
        "exit_status": term.get("exit_status"), "message": term.get("message"),
        "ran": ran_on_a_host(job),
        **{k: job.get(k) for k in ("created_at", "assigned_at", "started_at", "ready_at",
                                   "terminated_at")},
    }


def run_summary(followed: Followed, status: int, followed_for: float) -> dict[str, Any]:
    """The summary of a finished ``tml job run`` (``summary.json``, and its ``--json``)."""
    final, first = followed.final, followed.jobs[0]
    entry = _job_entry(final)
    image = final.get("image")
    return {
        "version": SUMMARY_VERSION,
        "job": final.get("id"),
        "submitted": first.get("id"),
        "state": final.get("state"),
        "reason": entry["reason"],
        "exit_status": entry["exit_status"],
        "message": entry["message"],
        "tml_exit_status": status,
        "ran": entry["ran"],
        "host": final.get("host"),
        "image": image.get("digest") if isinstance(image, dict) else image,
        "image_name": image.get("name") if isinstance(image, dict) else None,
        "label": final.get("label"),
        "timings": {
            "created_at": first.get("created_at"),
            "started_at": final.get("started_at"),
            "terminated_at": final.get("terminated_at"),
            "queued_seconds": _seconds(final.get("created_at"),
                                       final.get("started_at") or final.get("terminated_at")),
            "run_seconds": _seconds(final.get("started_at"), final.get("terminated_at")),
            "total_seconds": _seconds(first.get("created_at"), final.get("terminated_at")),
            "followed_seconds": round(followed_for, 3),
        },
        "chain": [_job_entry(job) for job in followed.jobs],
        "artifacts": {},
    }


async def _save_stream(ctx: Context, job_id: str, stream: str, path: Path) -> str | None:
    """Write a job's stream to ``path``; its file name, or None if it has no bytes."""
    with path.open("wb") as file:
        writer = FileWriter(file)
        status = await read_stream(ctx, job_id, stream, False, writer, quiet_missing=True)
    if writer.count == 0:
        path.unlink()
    if status != EXIT_OK:
        raise CommandError(f"could not read the {stream} stream of job {job_id}")
    return path.name if writer.count else None


def _save_bytes(path: Path, data: bytes) -> str | None:
    """Write a stream read already; its file name, or None if it has no bytes."""
    if not data:
        return None
    path.write_bytes(data)
    return path.name


async def _all_events(ctx: Context, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = (await ctx.api.get("jobs", job_id, "events", params={"after": after}))
        batch = [e for e in page.get("events", []) if isinstance(e, dict)]
        if not batch:
            return events
        events += batch
        seqs = [e["seq"] for e in batch if isinstance(e.get("seq"), int)]
        if not seqs or max(seqs) <= after:
            return events
        after = max(seqs)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


async def write_artifacts(ctx: Context, directory: str, followed: Followed,
                          summary: dict[str, Any], results: bytes | None = None) -> None:
    """Write the artifacts of a finished run into ``directory`` (see the module);
    ``results``: the last job's ``results`` stream if it was read already (the run's
    verdict), else it is read here."""
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        clear_previous(root)
    except OSError as e:
        raise CommandError(f"--artifacts {directory}: {e.strerror or e}") from None
    artifacts: dict[str, Any] = {"console": None, "earlier_consoles": [], "events": None,
                                 "results": None, "summary": "summary.json"}
    errors: list[str] = []
    try:
        lines = []
        for job in followed.jobs:
            lines += [json.dumps(e, separators=(",", ":")) + "\n"
                      for e in await _all_events(ctx, str(job["id"]))]
        (root / "events.jsonl").write_text("".join(lines))
        artifacts["events"] = "events.jsonl"
        final = followed.final
        for job in followed.jobs:
            if not job.get("logs") or not ran_on_a_host(job):
                continue
            last = job is final
            try:
                saved = await _save_stream(ctx, str(job["id"]), "console",
                                           root / console_file(job, last))
                if last:
                    artifacts["console"] = saved
                    artifacts["results"] = (
                        await _save_stream(ctx, str(job["id"]), "results", root / "results")
                        if results is None else _save_bytes(root / "results", results))
                elif saved:
                    artifacts["earlier_consoles"].append(saved)
            except (CommandError, ApiError, Unreachable) as e:
                errors.append(output.clean(str(e)))
    except OSError as e:
        raise CommandError(f"--artifacts {directory}: {e.strerror or e}") from None
    summary["artifacts"] = artifacts
    if errors:
        summary["artifact_errors"] = errors
        for error in errors:
            ctx.note(f"tml: artifacts: {error}")
    try:
        _write_json(root / "summary.json", summary)
    except OSError as e:
        raise CommandError(f"--artifacts {directory}: {e.strerror or e}") from None
