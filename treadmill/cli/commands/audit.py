"""``tml audit``: the switchboard's audit log (records you may read, newest first)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from treadmill.cli import output
from treadmill.cli.context import Context, add_command


def render_entries(data: dict[str, Any]) -> str:
    """``{"entries": [AuditEntry]}`` as a table."""
    rows = [(output.fmt_time(e.get("at")), e.get("actor"), e.get("source") or None,
             e.get("action"), f"{e.get('subject_kind')}:{e.get('subject_id')}",
             json.dumps(e.get("details") or {}, sort_keys=True, separators=(",", ":"))
             if e.get("details") else None)
            for e in data.get("entries", [])]
    return output.render_table(("AT", "ACTOR", "SOURCE", "ACTION", "SUBJECT", "DETAILS"), rows)


async def audit_ls(ctx: Context) -> int:
    """List audit records; ``--all`` follows every page."""
    a = ctx.args
    params = {"user": a.user, "host": a.host, "job": a.job, "image": a.image,
              "action": a.action, "after": a.after, "limit": a.limit}
    return await ctx.emit_pages("audit", "entries", params, render_entries, "records")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``audit``."""
    p = add_command(sub, "audit", audit_ls, common,
                    help="list audit records you may read, newest first")
    subject = p.add_mutually_exclusive_group()
    subject.add_argument("--user", help="records USER acted in or that name USER")
    subject.add_argument("--host", help="records about this host")
    subject.add_argument("--job", help="records about this job (an id or a unique prefix)")
    subject.add_argument("--image", help="records about this catalogue image")
    p.add_argument("--action", help="an action (host.drain) or a prefix of actions (host)")
    p.add_argument("--after", metavar="TIME", help="only records after TIME (RFC 3339)")
    p.add_argument("--limit", type=int, help="page size (1-500)")
    p.add_argument("--all", action="store_true", help="follow every page")
    p.set_defaults(job_id_args=("job",))
