"""``tml grant`` and ``tml revoke``: privileges on hosts, jobs and images."""

from __future__ import annotations

import argparse
from typing import Any

from treadmill.cli import output
from treadmill.cli.context import Context, UsageError, add_command
from treadmill.cli.jobids import resolve_job_id

KINDS = {
    "host": "hosts",
    "hosts": "hosts",
    "job": "jobs",
    "jobs": "jobs",
    "image": "images",
    "images": "images",
    "namespace": "namespaces",  # repository namespaces; admins only
    "namespaces": "namespaces",
}


def _kind(text: str) -> str:
    try:
        return KINDS[text]
    except KeyError:
        raise UsageError(f"unknown kind {text!r}: expected host, job, image or namespace"
                         ) from None


async def _ident(ctx: Context, kind: str, ident: str) -> str:
    """A host or image name as given; a job id, or a unique prefix of one, as a whole id."""
    return await resolve_job_id(ctx, ident) if _kind(kind) == "jobs" else ident


def render_grants(data: dict[str, Any]) -> str:
    """``{"grants": [Grant]}`` as a table."""
    rows = [
        (g.get("user"), g.get("privilege"), output.fmt_time(g.get("created_at")))
        for g in data.get("grants", [])
    ]
    return output.render_table(("USER", "PRIVILEGE", "CREATED"), rows)


async def grant(ctx: Context) -> int:
    """``grant KIND ID USER PRIVILEGE`` or ``grant ls KIND ID``."""
    words = ctx.args.words
    if words and words[0] == "ls":
        if len(words) != 3:
            raise UsageError("usage: tml grant ls KIND ID")
        data = await ctx.api.get(_kind(words[1]), await _ident(ctx, words[1], words[2]),
                                 "grants")
        return ctx.emit(data, render_grants)
    if len(words) != 4:
        raise UsageError("usage: tml grant KIND ID USER PRIVILEGE")
    kind, ident, user, privilege = words
    ident = await _ident(ctx, kind, ident)
    created = await ctx.api.post(
        _kind(kind), ident, "grants", body={"user": user, "privilege": privilege}
    )
    return ctx.emit(
        created,
        lambda _: (
            f"granted {output.clean(privilege)} on {kind} {output.clean(ident)}"
            f" to {output.clean(user)}\n"
        ),
    )


async def revoke(ctx: Context) -> int:
    """``revoke KIND ID USER PRIVILEGE``."""
    a = ctx.args
    a.id = await _ident(ctx, a.kind, a.id)
    await ctx.api.delete(_kind(a.kind), a.id, "grants", a.user, a.privilege)
    result = {"kind": _kind(a.kind), "id": a.id, "user": a.user, "privilege": a.privilege}
    return ctx.emit(
        result,
        lambda _: (
            f"revoked {output.clean(a.privilege)} on {a.kind} {output.clean(a.id)}"
            f" from {output.clean(a.user)}\n"
        ),
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``grant`` and ``revoke``."""
    p = add_command(
        sub,
        "grant",
        grant,
        common,
        help="grant a privilege on a host, job or image; 'grant ls KIND ID' lists grants",
        usage="tml grant [options] KIND ID USER PRIVILEGE\n       tml grant [options] ls KIND ID",
        epilog="KIND is host, job, image or namespace. USER '*' means every user. Privileges: "
        "hosts read, start, manage; jobs read, stop, manage; images and namespaces use, manage.",
    )
    p.add_argument("words", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    p = add_command(sub, "revoke", revoke, common, help="revoke a granted privilege")
    p.add_argument("kind", metavar="KIND", help="host, job or image")
    p.add_argument("id", metavar="ID", help="host name, job id (or a unique prefix) or image name")
    p.add_argument("user", metavar="USER")
    p.add_argument("privilege", metavar="PRIVILEGE")
