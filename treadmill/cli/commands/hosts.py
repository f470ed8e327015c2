"""``tml host``: list, show, tag, drain, enable and reserve hosts; their health history
and health checks."""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet.task import deferLater

from treadmill.cli import output
from treadmill.cli.commands.jobs import endpoints_text
from treadmill.cli.context import (
    CommandError,
    Context,
    UsageError,
    add_command,
    add_group,
    add_param_option,
    add_tag_option,
    duration,
)
from treadmill.cli.jobids import resolve_job_id

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
    "held_by",
    "held_until",
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
            h.get("held_by"),
            output.fmt_time(h.get("held_until")),
            h.get("tags"),
            _kinds(h),
            h.get("owner"),
            output.fmt_time(h.get("last_seen_at")),
        )
        for h in data.get("hosts", [])
    ]
    headers = ("NAME", "ENABLED", "HEALTHY", "CONNECTED", "JOB", "HELD BY", "UNTIL", "TAGS",
               "KINDS", "OWNER", "LAST SEEN")
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


def render_health(data: dict[str, Any]) -> str:
    """A host's health: its state, the check that applies, then its history as a table."""
    check = data.get("check")
    lines = [
        ("host", data.get("host")),
        ("healthy", data.get("healthy")),
        ("enabled", data.get("enabled")),
        ("consecutive_failures", data.get("consecutive_failures")),
        ("jobs_since_check", data.get("jobs_since_check")),
        ("last_check_at", output.fmt_time(data.get("last_check_at"))),
        ("check", _check_text(check) if check else "none"),
    ]
    rows = [(output.fmt_time(e.get("at")), e.get("event"), e.get("healthy"), e.get("reason"),
             e.get("job"), e.get("actor"), e.get("message"))
            for e in data.get("events", [])]
    return output.render_fields(lines) + "\n" + output.render_table(
        ("AT", "EVENT", "HEALTHY", "REASON", "JOB", "BY", "MESSAGE"), rows)


def _check_text(check: dict[str, Any]) -> str:
    image = check.get("image") or {}
    when = [f"every {check['every_jobs']} jobs" if check.get("every_jobs") else "",
            f"every {check['every_hours']:g} hours" if check.get("every_hours") else "",
            f"after {check['after_failures']} failures" if check.get("after_failures") else ""]
    return " ".join(part for part in (
        f"{check.get('scope')} {check.get('target')}:", str(image.get("name")),
        f"expect exit {check.get('expect_exit')}", *when) if part)


def render_checks(data: dict[str, Any]) -> str:
    """``{"checks": [HealthCheck]}`` as a table."""
    rows = [(c.get("scope"), c.get("target"), (c.get("image") or {}).get("name"),
             c.get("expect_exit"), c.get("after_failures"), c.get("every_jobs"),
             c.get("every_hours"), c.get("timeout"), c.get("set_by"))
            for c in data.get("checks", [])]
    return output.render_table(("SCOPE", "TARGET", "IMAGE", "EXPECT EXIT", "AFTER FAILURES",
                                "EVERY JOBS", "EVERY HOURS", "TIMEOUT", "SET BY"), rows)


async def host_health(ctx: Context) -> int:
    """Show a host's health and its history (newest first)."""
    return ctx.emit(await ctx.api.get("hosts", ctx.args.name, "health"), render_health)


def _check_target(args: argparse.Namespace) -> list[str]:
    """The path segments of the check of HOST or of ``--tag T``."""
    if (args.name is None) == (args.tag is None):
        raise UsageError("give a HOST or --tag TAG (one of them)")
    return ["hosts", args.name] if args.name is not None else ["tags", *args.tag.split("/")]


async def health_check_set(ctx: Context) -> int:
    """Set the health check of a host or of every host with a tag (admin)."""
    a = ctx.args
    body: dict[str, Any] = {"image": a.image, "expect_exit": a.expect_exit}
    for key in ("every_jobs", "every_hours", "after_failures", "timeout"):
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    if a.params:
        body["parameters"] = {name: {"value": value} for name, value in a.params}
    check = await ctx.api.put("health-checks", *_check_target(a), body=body)
    return ctx.emit(check, lambda c: output.clean(_check_text(c)) + "\n")


async def health_check_unset(ctx: Context) -> int:
    """Remove the health check of a host or of a tag (admin)."""
    kind, *target = _check_target(ctx.args)
    await ctx.api.delete("health-checks", kind, *target)
    removed = {"scope": kind[:-1], "target": "/".join(target)}
    return ctx.emit({"deleted": removed}, lambda _: output.clean(
        f"removed the health check of {removed['scope']} {removed['target']}") + "\n")


async def health_check_ls(ctx: Context) -> int:
    """List every health check (admin)."""
    return ctx.emit(await ctx.api.get("health-checks"), render_checks)


RESERVE_POLL = 1.0
"""Seconds between polls of a reservation waiting for its host."""


def how_to_get_in(job: dict[str, Any]) -> str:
    """A reservation's host, deadline, endpoints and the commands to use it."""
    job_id = job.get("id")
    until = output.fmt_time(job["deadline"]) if job.get("deadline") else "its timeout"
    lines = [f"reservation {job_id}: {job.get('state')} on {job.get('host') or '(no host yet)'}"
             f", until {until}"]
    lines += [f"  endpoint {text}" for text in endpoints_text(job.get("endpoints"))]
    lines += [f"  get in:  tml job ssh {job_id}   or   tml job connect {job_id} SERVICE",
              f"  console: tml job logs -f {job_id}",
              f"  extend:  tml job extend {job_id} DURATION",
              f"  release: tml job cancel {job_id}"]
    # Each line cleaned on its own: clean() escapes the newlines between them too.
    return "".join(output.clean(line) + "\n" for line in lines)


async def host_reserve(ctx: Context) -> int:
    """Hold a matching host for interactive work (a reservation job); wait until it is
    ready and print how to get in. ``--extend JOB DURATION`` extends one instead."""
    a = ctx.args
    if a.extend is not None:
        text, by_text = a.extend
        try:
            by = duration(by_text)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--extend: {e}") from None
        job_id = await resolve_job_id(ctx, text)
        job = await ctx.api.post("jobs", job_id, "extend", body={"by": by})
        return ctx.emit(job, how_to_get_in)
    if a.duration is None:
        raise UsageError("give --for (or --extend JOB DURATION)")
    body: dict[str, Any] = {"reservation": True, "timeout": a.duration}
    if a.image is not None:  # else the switchboard's jobs.reservation_image
        body["image"] = a.image
    if a.tags:
        body["tags"] = list(a.tags)
    if a.params:
        body["parameters"] = {name: {"value": value} for name, value in a.params}
    if a.queue_timeout is not None:
        body["queue_timeout"] = a.queue_timeout
    if a.label is not None:
        body["label"] = a.label
    job = await ctx.api.post("jobs", body=body)
    if not a.no_wait:
        if not ctx.json:
            ctx.note(f"tml: waiting for a host for reservation {job['id']} "
                     f"(tml job cancel {job['id']} to give up)")
        while job.get("state") not in ("ready", "terminating", "terminated"):
            await deferLater(ctx.reactor, RESERVE_POLL, lambda: None)
            job = await ctx.api.get("jobs", job["id"])
        if job.get("state") != "ready":
            term = job.get("termination") or {}
            raise CommandError(output.clean(
                f"reservation {job['id']} ended before it was ready: {term.get('reason')}"
                f"{': ' + term['message'] if term.get('message') else ''}"))
    return ctx.emit(job, how_to_get_in)


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
    p = add_command(host, "health", host_health, common,
                    help="show a host's health, its health check and its history")
    p.add_argument("name", metavar="NAME")
    checks = add_group(host, "health-check",
                       help="set, remove and list the operators' health checks (admin)")
    p = add_command(checks, "set", health_check_set, common,
                    help="set the health check of HOST or of every host with --tag (only a "
                    "failing check takes a host out of service)")
    _check_target_args(p)
    p.add_argument("--image", required=True, metavar="IMAGE",
                   help="the check job's image (a catalogue name or sha256:… digest)")
    p.add_argument("--expect-exit", type=int, default=0, metavar="N",
                   help="the exit status that passes (default 0)")
    p.add_argument("--every-jobs", type=int, metavar="N",
                   help="also run after every N jobs of the host")
    p.add_argument("--every-hours", type=float, metavar="H",
                   help="also run on the idle host H hours after its last check")
    p.add_argument("--after-failures", type=int, metavar="N",
                   help="run after N host-side failures in a row (default: the "
                   "switchboard's hosts.max_failures)")
    p.add_argument("--timeout", type=duration, metavar="S",
                   help="how long the check job may run (default 10m)")
    add_param_option(p, "a parameter of the check job (repeat)")
    p = add_command(checks, "unset", health_check_unset, common,
                    help="remove the health check of HOST or of --tag")
    _check_target_args(p)
    add_command(checks, "ls", health_check_ls, common, help="list every health check")
    p = add_command(host, "reserve", host_reserve, common,
                    help="hold a matching host for interactive work (queued like a job) and "
                    "print how to get in; released by tml job cancel or at its end")
    p.add_argument("--image", metavar="IMAGE",
                   help="the image to boot (a catalogue name or sha256:… digest); default: "
                   "the switchboard's reservation image, if it has one")
    p.add_argument("--for", dest="duration", type=duration, metavar="DURATION",
                   help="how long to hold the host once it is assigned (90, 15m, 2h, 1d)")
    add_tag_option(p)
    add_param_option(p, "a job parameter (repeat)")
    p.add_argument("--queue-timeout", type=duration, metavar="S",
                   help="how long to wait for a host")
    p.add_argument("--label", metavar="TEXT")
    p.add_argument("--no-wait", action="store_true",
                   help="print the reservation at once, without waiting for its host")
    p.add_argument("--extend", nargs=2, metavar=("JOB", "DURATION"),
                   help="extend reservation JOB by DURATION instead (tml job extend)")


def _check_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="HOST", nargs="?", help="the host")
    parser.add_argument("--tag", metavar="TAG", help="every host with this tag instead")
