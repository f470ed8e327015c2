"""``tml job``: submit, list, show, cancel jobs and follow their events."""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from treadmill.cli import output
from treadmill.cli.client import Unreachable
from treadmill.cli.commands import results as results_command
from treadmill.cli.commands.connect import (
    add_connect_arguments,
    add_ssh_arguments,
    job_connect,
    job_ssh,
)
from treadmill.cli.commands.images import short_digest
from treadmill.cli.commands.logs import ConsoleWriter, job_logs, read_stream
from treadmill.cli.commands.logs import add_arguments as add_logs_arguments
from treadmill.cli.context import (
    EXIT_JOB_ABORTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    CommandError,
    Context,
    UsageError,
    add_command,
    add_group,
    duration,
    name_value,
    non_negative_int,
    positive_int,
)
from treadmill.cli.retry import Retry
from treadmill.cli.sse import SSEMessage, json_objects

STATES = ("queued", "assigned", "initializing", "ready", "terminating", "terminated")
_JOB_TIMES = (
    "created_at",
    "assigned_at",
    "started_at",
    "ready_at",
    "terminated_at",
    "updated_at",
)
_JOB_SHOWN = {
    "endpoints",
    "id",
    "label",
    "owner",
    "state",
    "stage",
    "host",
    "image",
    "tags",
    "parameters",
    "timeout",
    "queue_timeout",
    "max_restarts",
    "restarts_left",
    "restart_of",
    "termination",
    *_JOB_TIMES,
}


def image_text(image: Any) -> str | None:
    """A job's image: its catalogue name and digest, or the digest alone."""
    if not isinstance(image, dict):
        return None if image is None else str(image)
    digest = image.get("digest")
    if image.get("name"):
        return f"{image['name']} ({digest})" if digest else image["name"]
    return digest


def parameters_text(parameters: Any) -> str | None:
    """``NAME=value`` pairs; secret values as ``<secret>``."""
    if not parameters:
        return None
    if not isinstance(parameters, dict):
        return str(parameters)
    parts = []
    for name, p in parameters.items():
        if isinstance(p, dict) and p.get("secret"):
            parts.append(f"{name}=<secret>")
        elif isinstance(p, dict):
            parts.append(f"{name}={p.get('value', '')}")
        else:
            parts.append(f"{name}={p}")
    return " ".join(parts)


def render_job(job: dict[str, Any]) -> str:
    """A ``Job`` as ``key: value`` lines."""
    image = job.get("image")
    term = job.get("termination") or {}
    pairs: list[tuple[str, Any]] = [
        ("id", job.get("id")),
        ("label", job.get("label") or None),
        ("owner", job.get("owner")),
        ("state", job.get("state")),
        ("stage", job.get("stage")),
        ("host", job.get("host")),
        ("image", image_text(image)),
        ("stores", image.get("stores") if isinstance(image, dict) else None),
        ("tags", job.get("tags")),
        ("parameters", parameters_text(job.get("parameters"))),
        ("timeout", job.get("timeout")),
        ("queue_timeout", job.get("queue_timeout")),
        ("max_restarts", job.get("max_restarts")),
        ("restarts_left", job.get("restarts_left")),
        ("restart_of", job.get("restart_of")),
    ]
    if job.get("termination"):
        pairs += [
            ("reason", term.get("reason")),
            ("exit_status", term.get("exit_status")),
            ("message", term.get("message")),
        ]
    pairs += [("endpoint", text) for text in endpoints_text(job.get("endpoints"))]
    pairs += [(k, job.get(k)) for k in _JOB_TIMES if k in job]
    pairs += [(k, v) for k, v in job.items() if k not in _JOB_SHOWN]
    return output.render_fields(pairs)


def endpoints_text(endpoints: Any) -> list[str]:
    """One line per public endpoint: ``SERVICE HOST:PORT URL``."""
    lines = []
    for e in endpoints if isinstance(endpoints, list) else []:
        if not isinstance(e, dict):
            continue
        where = [f"{e.get('host')}:{e['port']}" if "port" in e else "", e.get("url") or ""]
        lines.append(" ".join([str(e.get("service")), *(w for w in where if w)]))
    return lines


def _job_detail(job: dict[str, Any]) -> str | None:
    term = job.get("termination")
    if term:
        return termination_text(term)
    return job.get("stage")


def render_jobs(data: dict[str, Any]) -> str:
    """``{"jobs": [Job]}`` as a table."""
    rows = []
    for j in data.get("jobs", []):
        image = j.get("image")
        name = image.get("name") if isinstance(image, dict) else None
        digest = image.get("digest") if isinstance(image, dict) else image
        rows.append(
            (
                j.get("id"),
                j.get("state"),
                _job_detail(j),
                j.get("host"),
                j.get("owner"),
                name or short_digest(digest),
                output.fmt_time(j.get("created_at")),
                j.get("label") or None,
            )
        )
    headers = ("ID", "STATE", "DETAIL", "HOST", "OWNER", "IMAGE", "CREATED", "LABEL")
    return output.render_table(headers, rows)


def termination_text(t: dict[str, Any]) -> str:
    """``reason, exit status N: message``."""
    text = str(t.get("reason") or "unknown reason")
    if t.get("exit_status") is not None:
        text += f", exit status {t['exit_status']}"
    if t.get("message"):
        text += f": {t['message']}"
    return text


def event_line(event: dict[str, Any]) -> str:
    """One ``Event`` as a line, for following a job."""
    state = str(event.get("state") or "?")
    if event.get("stage"):
        state += f"/{event['stage']}"
    detail = ""
    if event.get("reason") or event.get("exit_status") is not None:
        detail = termination_text(event)
    elif event.get("message"):
        detail = str(event["message"])
    line = f"{output.fmt_time(event.get('at'))}  {state:<27}  {detail}".rstrip()
    return output.clean(line) + "\n"


def render_events(data: dict[str, Any]) -> str:
    """``{"events": [Event]}`` as a table."""
    rows = [
        (
            e.get("seq"),
            output.fmt_time(e.get("at")),
            e.get("state"),
            e.get("stage"),
            e.get("reason"),
            e.get("exit_status"),
            e.get("message") or None,
        )
        for e in data.get("events", [])
    ]
    headers = ("SEQ", "AT", "STATE", "STAGE", "REASON", "EXIT", "MESSAGE")
    return output.render_table(headers, rows)


def exit_status_for(termination: dict[str, Any] | None) -> int:
    """0 if the workload exited with status 0; 4 if it exited otherwise; 5 for other reasons."""
    if not termination:
        return EXIT_JOB_ABORTED
    if termination.get("reason") == "workload_exited":
        return EXIT_OK if termination.get("exit_status") == 0 else EXIT_JOB_FAILED
    return EXIT_JOB_ABORTED


class EventFollower:
    """Print a job's events as they happen until it terminates.

    If the stream ends or breaks before the ``terminated`` event, it catches up
    with ``GET .../events?after=SEQ`` and watches again from the last event it
    saw; it gives up (:class:`Unreachable`) after ``give_up_after`` seconds of
    failing to reach the switchboard.
    """

    give_up_after = 60.0
    max_delay = 10.0

    def __init__(self, ctx: Context, job_id: str, after: int | None = None) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.last_seq = after
        self.terminated: dict[str, Any] | None = None

    def accept(self, event: dict[str, Any]) -> bool:
        """Print a new event; return whether it is the last."""
        seq = event.get("seq")
        if isinstance(seq, int):
            if self.last_seq is not None and seq <= self.last_seq:
                return False
            self.last_seq = seq
        if self.ctx.json:
            output.print_json_line(self.ctx.stdout, event)
        else:
            self.ctx.write(event_line(event))
        if event.get("state") == "terminated":
            self.terminated = event
            return True
        return False

    def _on_message(self, message: SSEMessage) -> bool:
        return any(self.accept(event) for event in json_objects(message))

    async def run(self) -> dict[str, Any]:
        """Follow until the ``terminated`` event; return it."""
        retry = Retry(self.ctx.reactor, give_up_after=self.give_up_after, initial=1.0,
                      max_delay=self.max_delay)
        while True:
            try:
                await self.ctx.api.watch(
                    ("jobs", self.job_id, "events", "watch"),
                    self._on_message,
                    params={"after": self.last_seq},
                )
                if self.terminated:
                    return self.terminated
                data = await self.ctx.api.get(
                    "jobs", self.job_id, "events", params={"after": self.last_seq}
                )
                for event in data.get("events", []):
                    if self.accept(event):
                        return event
                retry.reset()
                delay = 1.0  # the stream ended early: watch again, without hurry
            except Unreachable as e:
                if self.terminated:
                    return self.terminated
                next_delay = retry.next_delay()
                if next_delay is None:
                    raise Unreachable(e.url, f"{e.reason} ({retry.summary()})") from None
                if retry.failures == 1:
                    self.ctx.note(f"tml: {e}; retrying")
                delay = next_delay
            await deferLater(self.ctx.reactor, delay, lambda: None)


async def finish_following(ctx: Context, job_id: str, last: dict[str, Any]) -> int:
    """The exit status for a followed job that terminated with event ``last``."""
    termination: dict[str, Any] | None = last
    if not last.get("reason"):
        job = await ctx.api.get("jobs", job_id)
        termination = job.get("termination")
    status = exit_status_for(termination)
    if not ctx.json:
        text = termination_text(termination) if termination else "no termination recorded"
        ctx.note(output.clean(f"tml: job {job_id} terminated: {text}"))
    return status


def parameters_body(args: argparse.Namespace, env: Any) -> dict[str, Any]:
    """The ``parameters`` of a job request from ``--param`` and ``--secret-param``."""
    parameters: dict[str, Any] = {}
    for name, value in args.params:
        if name in parameters:
            raise UsageError(f"parameter {name} given twice")
        parameters[name] = {"value": value, "secret": False}
    for spec in args.secret_params:
        name, sep, value = spec.partition("=")
        if not name:
            raise UsageError(f"expected NAME=VALUE or NAME, got {spec!r}")
        if not sep:
            if name not in env:
                raise UsageError(f"--secret-param {name}: no environment variable {name}")
            value = env[name]
        if name in parameters:
            raise UsageError(f"parameter {name} given twice")
        parameters[name] = {"value": value, "secret": True}
    return parameters


async def job_submit(ctx: Context) -> int:
    """Submit a job; print its id; with ``--follow``, watch it to the end."""
    a = ctx.args
    body: dict[str, Any] = {"image": a.image}
    if a.tags:
        body["tags"] = list(a.tags)
    parameters = parameters_body(a, ctx.env)
    if parameters:
        body["parameters"] = parameters
    for key in ("timeout", "queue_timeout", "max_restarts", "label"):
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    job = await ctx.api.post("jobs", body=body)
    if not a.follow:
        return ctx.emit(job, lambda j: f"{j['id']}\n")
    if ctx.json:
        output.print_json_line(ctx.stdout, job)
    else:
        ctx.write(f"{job['id']}\n")
    console = None
    if job.get("logs") and not ctx.json and not a.no_console:
        # The console as it happens, beside the events.
        console = Deferred.fromCoroutine(
            read_stream(ctx, job["id"], "console", True, ConsoleWriter(ctx)))
        console.addErrback(lambda f: ctx.note(f"tml: console unavailable: {f.value}"))
    last = await EventFollower(ctx, job["id"]).run()
    if console is not None:
        # The supervisor closes the stream once it shipped the tail.
        console.addTimeout(CONSOLE_TAIL_WAIT, ctx.reactor)
        console.addErrback(lambda f: None)
        await console
    return await finish_following(ctx, job["id"], last)


async def job_ls(ctx: Context) -> int:
    """List jobs, newest first; ``--all`` follows every page."""
    a = ctx.args
    params = {"state": a.state, "owner": a.owner, "limit": a.limit}
    data = await ctx.api.get("jobs", params=params)
    if a.all:
        jobs = list(data.get("jobs", []))
        seen: set[str] = set()
        while (cursor := data.get("next_cursor")) and cursor not in seen:
            seen.add(cursor)
            data = await ctx.api.get("jobs", params={**params, "cursor": cursor})
            jobs += data.get("jobs", [])
        data = {"jobs": jobs}
    status = ctx.emit(data, render_jobs)
    if data.get("next_cursor") and not ctx.json:
        ctx.note("tml: there are more jobs; use --all to list them all")
    return status


async def job_show(ctx: Context) -> int:
    """Show a job."""
    return ctx.emit(await ctx.api.get("jobs", ctx.args.id), render_job)


async def job_cancel(ctx: Context) -> int:
    """Ask for a job to be terminated."""
    job = await ctx.api.post("jobs", ctx.args.id, "terminate")
    return ctx.emit(job, lambda j: f"job {j.get('id')}: {j.get('state')}\n")


async def job_events(ctx: Context) -> int:
    """List a job's events; ``--follow`` watches until it terminates."""
    a = ctx.args
    if not a.follow:
        data = await ctx.api.get("jobs", a.id, "events", params={"after": a.after})
        return ctx.emit(data, render_events)
    await EventFollower(ctx, a.id, a.after).run()
    return EXIT_OK


SNAPSHOT_POLL = 1.0
"""Seconds between polls of a pending snapshot."""


def render_snapshot(snapshot: dict[str, Any]) -> str:
    """A ``Snapshot`` as ``key: value`` lines."""
    error = snapshot.get("error") or {}
    return output.render_fields([
        ("id", snapshot.get("id")), ("job", snapshot.get("job")),
        ("name", snapshot.get("name")), ("state", snapshot.get("state")),
        ("digest", snapshot.get("digest")), ("store", snapshot.get("store")),
        ("error", f"{error.get('code')}: {error.get('message')}" if error else None),
    ])


async def job_snapshot(ctx: Context) -> int:
    """Upload an ended job's disk as a new image; wait for the outcome unless --no-wait."""
    a = ctx.args
    body: dict[str, Any] = {"name": a.name}
    if a.store:
        body["store"] = a.store
    if a.description:
        body["description"] = a.description
    snapshot = await ctx.api.post("jobs", a.id, "snapshots", body=body)
    deadline = ctx.reactor.seconds() + a.wait
    while not a.no_wait and snapshot.get("state") == "pending":
        if ctx.reactor.seconds() >= deadline:
            raise CommandError(f"snapshot {snapshot['id']} is still pending after "
                               f"{a.wait:g} s; see tml job snapshots {a.id}")
        await deferLater(ctx.reactor, SNAPSHOT_POLL, lambda: None)
        snapshot = await ctx.api.get("jobs", a.id, "snapshots", snapshot["id"])
    status = ctx.emit(snapshot, render_snapshot)
    if snapshot.get("state") == "failed":
        error = snapshot.get("error") or {}
        raise CommandError(f"snapshot failed: {error.get('code')}: {error.get('message')}")
    return status


async def job_snapshots(ctx: Context) -> int:
    """List a job's snapshots."""
    data = await ctx.api.get("jobs", ctx.args.id, "snapshots")
    return ctx.emit(data, lambda d: "".join(render_snapshot(s) + "\n"
                                            for s in d.get("snapshots", [])))


CONSOLE_TAIL_WAIT = 10.0
"""Seconds ``submit --follow`` waits for the console's last bytes after the end."""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``job``."""
    job = add_group(sub, "job", help="submit and watch jobs")

    p = add_command(job, "submit", job_submit, common, help="submit a job and print its id")
    p.add_argument("image", metavar="IMAGE", help="a catalogue name or sha256:… digest")
    p.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="a tag the host must have (repeat)",
    )
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        type=name_value,
        metavar="NAME=VALUE",
        help="a parameter (repeat)",
    )
    p.add_argument(
        "--secret-param",
        dest="secret_params",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="a secret parameter (repeat); with NAME alone, the value of $NAME",
    )
    p.add_argument("--timeout", type=duration, metavar="S", help="execution timeout")
    p.add_argument("--queue-timeout", type=duration, metavar="S", help="time allowed queued")
    p.add_argument("--max-restarts", type=non_negative_int, metavar="N")
    p.add_argument("--label", metavar="TEXT")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="watch the job's events (and its console) until it terminates; exit 0 only "
        "if the workload exited with status 0 (4: non-zero exit status, 5: any other "
        "termination)",
    )
    p.add_argument("--no-console", action="store_true",
                   help="with --follow, show the events only, not the console")

    p = add_command(job, "ls", job_ls, common, help="list jobs, newest first")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--owner", metavar="USER")
    p.add_argument("--limit", type=positive_int, metavar="N", help="jobs per page (1-500)")
    p.add_argument("--all", action="store_true", help="follow every page")

    p = add_command(job, "show", job_show, common, help="show a job")
    p.add_argument("id", metavar="ID")
    p = add_command(job, "cancel", job_cancel, common, help="terminate a job")
    p.add_argument("id", metavar="ID")
    p = add_command(job, "logs", job_logs, common,
                    help="print (or follow) a job's console from its log servers")
    add_logs_arguments(p)
    results_command.register(job, common)
    p = add_command(job, "ssh", job_ssh, common,
                    help="ssh to a job's public SSH endpoint (options for tml before the ID)")
    add_ssh_arguments(p)
    p = add_command(job, "connect", job_connect, common,
                    help="forward a local port to a job's service through a proxy")
    add_connect_arguments(p)
    p = add_command(job, "snapshot", job_snapshot, common,
                    help="upload an ended job's disk as a new image (QEMU hosts)")
    p.add_argument("id", metavar="ID")
    p.add_argument("name", metavar="NAME", help="the new catalogue image's name")
    p.add_argument("--store", metavar="URL",
                   help="the image store (default: the job image's first store)")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--wait", type=duration, default=3600.0, metavar="S",
                   help="how long to wait for the upload [3600]")
    p.add_argument("--no-wait", action="store_true", help="print the pending snapshot and exit")
    p = add_command(job, "snapshots", job_snapshots, common, help="list a job's snapshots")
    p.add_argument("id", metavar="ID")
    p = add_command(job, "events", job_events, common, help="list or follow a job's events")
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="watch until the job terminates")
    p.add_argument("--after", type=non_negative_int, metavar="SEQ", help="only later events")
