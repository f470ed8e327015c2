"""``tml host``: list, show, tag, drain and enable hosts."""

from __future__ import annotations

import argparse
from typing import Any

from treadmill.cli import output
from treadmill.cli.context import Context, UsageError, add_command, add_group

HOST_FIELDS = (
    "name",
    "tags",
    "kinds",
    "owner",
    "description",
    "enabled",
    "healthy",
    "consecutive_failures",
    "connected",
    "last_seen_at",
    "current_job",
    "created_at",
)


def render_host(host: dict[str, Any]) -> str:
    """A ``Host`` as ``key: value`` lines (never its token)."""
    return output.render_object({**host, "kinds": _kinds(host)}, HOST_FIELDS, skip=("token",))


def _kinds(host: dict[str, Any]) -> Any:
    """The image kinds a host runs; "any" for a supervisor that reports none."""
    kinds = host.get("kinds")
    return "any" if kinds is None else kinds


def render_hosts(data: dict[str, Any]) -> str:
    """``{"hosts": [Host]}`` as a table."""
    rows = [
        (
            h.get("name"),
            h.get("enabled"),
            h.get("healthy"),
            h.get("connected"),
            h.get("current_job"),
            h.get("tags"),
            _kinds(h),
            h.get("owner"),
            output.fmt_time(h.get("last_seen_at")),
        )
        for h in data.get("hosts", [])
    ]
    headers = ("NAME", "ENABLED", "HEALTHY", "CONNECTED", "JOB", "TAGS", "KINDS", "OWNER",
               "LAST SEEN")
    return output.render_table(headers, rows)


async def host_ls(ctx: Context) -> int:
    """List the hosts the user may read."""
    return ctx.emit(await ctx.api.get("hosts"), render_hosts)


async def host_show(ctx: Context) -> int:
    """Show one host."""
    return ctx.emit(await ctx.api.get("hosts", ctx.args.name), render_host)


async def host_tags(ctx: Context) -> int:
    """Replace a host's tags, or show them when none are given."""
    args = ctx.args
    if args.clear and args.tags:
        raise UsageError("give tags or --clear, not both")
    if not args.tags and not args.clear:
        host = await ctx.api.get("hosts", args.name)
        return ctx.emit(host, lambda h: "".join(f"{output.clean(t)}\n" for t in h.get("tags", [])))
    host = await ctx.api.put("hosts", args.name, "tags", body={"tags": list(args.tags)})
    return ctx.emit(host, render_host)


async def host_drain(ctx: Context) -> int:
    """Take a host out of service: it finishes its job and takes no new one."""
    return ctx.emit(await ctx.api.post("hosts", ctx.args.name, "drain"), render_host)


async def host_enable(ctx: Context) -> int:
    """Put a host back in service and reset its failure count."""
    return ctx.emit(await ctx.api.post("hosts", ctx.args.name, "enable"), render_host)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``host``."""
    host = add_group(sub, "host", help="list and manage hosts")
    add_command(host, "ls", host_ls, common, help="list hosts")
    p = add_command(host, "show", host_show, common, help="show a host")
    p.add_argument("name", metavar="NAME")
    p = add_command(
        host, "tags", host_tags, common, help="set a host's tags (replacing them), or show them"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("tags", metavar="TAG", nargs="*", help="the new tags")
    p.add_argument("--clear", action="store_true", help="remove every tag")
    p = add_command(host, "drain", host_drain, common, help="take a host out of service")
    p.add_argument("name", metavar="NAME")
    p = add_command(host, "enable", host_enable, common, help="put a host back in service")
    p.add_argument("name", metavar="NAME")
