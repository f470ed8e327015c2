"""``tml job``: submit, list, show, cancel jobs and follow their events."""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import deferLater

from treadmill.cli import output
from treadmill.cli.client import ApiError, Unreachable
from treadmill.cli.commands import results as results_command
from treadmill.cli.commands.artifacts import run_summary, write_artifacts
from treadmill.cli.commands.connect import (
    add_connect_arguments,
    add_ssh_arguments,
    job_connect,
    job_ssh,
)
from treadmill.cli.commands.follow import (
    EventFollower,
    JobFollower,
    event_line,
    exit_status_for,
    termination_text,
)
from treadmill.cli.commands.images import short_digest
from treadmill.cli.commands.logs import add_arguments as add_logs_arguments
from treadmill.cli.commands.logs import job_logs
from treadmill.cli.context import (
    EXIT_OK,
    EXIT_WAIT_TIMEOUT,
    CommandError,
    Context,
    UsageError,
    add_command,
    add_group,
    add_job_id,
    add_param_option,
    add_tag_option,
    duration,
    name_value,
    non_negative_int,
    positive_int,
)

__all__ = ["EventFollower", "event_line", "exit_status_for", "register", "render_job",
           "render_jobs", "termination_text"]

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
    "hold_on_failure",
    "held_until",
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
        ("hold_on_failure", job.get("hold_on_failure")),
    ]
    if job.get("termination"):
        pairs += [
            ("reason", term.get("reason")),
            ("exit_status", term.get("exit_status")),
            ("message", term.get("message")),
        ]
    if job.get("held_until"):  # its host is held for debugging (--hold-on-failure)
        pairs.append(("held_until", f"{output.fmt_time(job['held_until'])} (its host "
                                    f"{job.get('host')} is held; tml job cancel releases it)"))
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
    if term and job.get("held_until"):
        return f"{termination_text(term)}; host held until {output.fmt_time(job['held_until'])}"
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


def _secret_value(name: str, value: str, stdin: Any, warn: Any) -> str:
    """The value of ``--secret-param NAME=VALUE``: ``@PATH`` a file, ``-`` stdin."""
    if value == "-":
        if stdin is None:
            raise UsageError(f"--secret-param {name}=-: only one value can come from stdin")
        return stdin.read().removesuffix("\n").removesuffix("\r")
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().removesuffix("\n").removesuffix("\r")
        except OSError as e:
            raise UsageError(f"--secret-param {name}=@{path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--secret-param {name}=@{path}: not UTF-8 text") from None
    if warn is not None:
        warn(f"tml: warning: --secret-param {name}=VALUE puts the secret on the command "
             f"line, where other local users can read it; use {name}=@FILE, {name}=- "
             f"(stdin), --secret-param-env {name}=VAR or {name} alone (${name})")
    return value


def parameters_body(args: argparse.Namespace, env: Any, stdin: Any = None,
                    warn: Any = None) -> dict[str, Any]:
    """The ``parameters`` of a job request from ``--param``, ``--secret-param`` and
    ``--secret-param-env``; ``warn`` is told of secrets given on the command line."""
    parameters: dict[str, Any] = {}

    def add(name: str, value: str, secret: bool) -> None:
        if name in parameters:
            raise UsageError(f"parameter {name} given twice")
        parameters[name] = {"value": value, "secret": secret}

    for name, value in args.params:
        add(name, value, False)
    for spec in args.secret_params:
        name, sep, value = spec.partition("=")
        if not name:
            raise UsageError(f"expected NAME, NAME=@FILE, NAME=- or NAME=VALUE, got {spec!r}")
        if not sep:
            if name not in env:
                raise UsageError(f"--secret-param {name}: no environment variable {name}")
            value = env[name]
        else:
            from_stdin = value == "-"
            value = _secret_value(name, value, stdin, warn)
            if from_stdin:
                stdin = None
        add(name, value, True)
    for name, variable in getattr(args, "secret_param_envs", []):
        if variable not in env:
            raise UsageError(f"--secret-param-env {name}: no environment variable {variable}")
        add(name, env[variable], True)
    return parameters


def submit_body(ctx: Context) -> dict[str, Any]:
    """The ``POST /api/v1/jobs`` body from the options of ``job submit`` and ``job run``."""
    a = ctx.args
    body: dict[str, Any] = {"image": a.image}
    if a.tags:
        body["tags"] = list(a.tags)
    parameters = parameters_body(a, ctx.env, ctx.stdin, ctx.note)
    if parameters:
        body["parameters"] = parameters
    for key in ("timeout", "queue_timeout", "max_restarts", "label", "hold_on_failure"):
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    if (patterns := results_command.patterns_from(a)) is not None:
        body["results"] = patterns
    return body


async def _submit(ctx: Context) -> dict[str, Any]:
    """Submit the job of the command line; print its id (a JSON line with ``--json``)."""
    try:
        job = await ctx.api.post("jobs", body=submit_body(ctx))
    except CancelledError:
        if ctx.interrupted:
            ctx.note("tml: interrupted while submitting: the job may have been created "
                     "(see tml job ls)")
        raise
    if ctx.json:
        output.print_json_line(ctx.stdout, job)
    else:
        ctx.write(f"{job['id']}\n")
    return job


def _follower(ctx: Context, job: dict[str, Any]) -> JobFollower:
    stream = None if ctx.json or ctx.args.no_console else "console"
    return JobFollower(ctx, job["id"], events=True, stream=stream, job=job)


async def job_submit(ctx: Context) -> int:
    """Submit a job; print its id; with ``--follow``, watch it to the end."""
    if not ctx.args.follow:
        job = await ctx.api.post("jobs", body=submit_body(ctx))
        return ctx.emit(job, lambda j: f"{j['id']}\n")
    job = await _submit(ctx)
    if not ctx.json:
        ctx.note(f"tml: following job {job['id']} (interrupting tml leaves it running); "
                 "to cancel it:")
        ctx.note(f"tml job cancel {job['id']}")
    follower = _follower(ctx, job)
    try:
        followed = await follower.run()
    except CancelledError:
        if ctx.interrupted:
            ctx.note(f"tml: interrupted; job {follower.current} keeps running; to cancel it:")
            ctx.note(f"tml job cancel {follower.current}")
        raise
    if followed.status != 0 and ctx.args.hold_on_failure:
        await _note_hold(ctx, follower.current)
    status, _ = await results_command.verdict(ctx, followed)
    return status


CANCEL_WAIT = 15.0
"""Seconds ``tml job run`` gives the switchboard to take a cancellation on interrupt."""


async def job_run(ctx: Context) -> int:
    """Submit a job, follow it to the end (restarts too), write its artifacts; exit with
    its outcome. An interrupt cancels the job unless ``--keep-on-interrupt``."""
    a = ctx.args
    job = await _submit(ctx)
    if a.keep_on_interrupt:
        ctx.note(f"tml: following job {job['id']}; interrupting tml leaves it running "
                 f"(--keep-on-interrupt); to cancel it: tml job cancel {job['id']}")
    else:
        ctx.note(f"tml: following job {job['id']}; interrupting tml cancels it "
                 "(--keep-on-interrupt to keep it)")
    follower = _follower(ctx, job)
    started = ctx.reactor.seconds()
    try:
        followed = await follower.run()
    except CancelledError:
        if ctx.interrupted:
            await _on_interrupt(ctx, follower.current, a.keep_on_interrupt)
        raise
    if followed.status != 0 and a.hold_on_failure:
        await _note_hold(ctx, follower.current)
    status, results = await results_command.verdict(ctx, followed)
    summary = run_summary(followed, status, ctx.reactor.seconds() - started)
    if a.artifacts:
        await write_artifacts(ctx, a.artifacts, followed, summary, results)
    if ctx.json:
        output.print_json_line(ctx.stdout, summary)
    return status


async def _note_hold(ctx: Context, job_id: str) -> None:
    """The failed job's host is held (``--hold-on-failure``): say how to get in and out."""
    try:
        job = await ctx.api.get("jobs", job_id)
    except (ApiError, Unreachable):
        return
    for line in hold_notes(job_id, job):
        ctx.note(line)


def hold_notes(job_id: str, job: dict[str, Any]) -> list[str]:
    """The lines saying how to get into and out of a failed ``job``'s held host
    (none when it is not held: a driver that cannot hold, or an older supervisor)."""
    if not job.get("held_until"):
        return []
    lines = [output.clean(
        f"tml: job {job_id} failed; its host {job.get('host')} is held for debugging until "
        f"{output.fmt_time(job['held_until'])}")]
    lines += [output.clean(f"tml:   endpoint {text}")
              for text in endpoints_text(job.get("endpoints"))]
    lines += [
        f"tml:   get in:  tml job ssh {job_id}   or   tml job connect {job_id} SERVICE",
        f"tml:   console: tml job logs {job_id} --follow   (the held host's, until the "
        "hold ends)",
        f"tml:   extend:  tml job extend {job_id} DURATION",
        f"tml:   release: tml job cancel {job_id}"]
    return lines


async def _on_interrupt(ctx: Context, job_id: str, keep: bool) -> None:
    if keep:
        ctx.note(f"tml: interrupted; job {job_id} keeps running (--keep-on-interrupt); "
                 "to cancel it:")
        ctx.note(f"tml job cancel {job_id}")
        return
    asked = Deferred.fromCoroutine(ctx.api.post("jobs", job_id, "terminate"))
    asked.addTimeout(CANCEL_WAIT, ctx.reactor)
    try:
        job = await asked
    except (ApiError, Unreachable, DeferredTimeoutError) as e:
        why = ("no answer in time" if isinstance(e, DeferredTimeoutError)
               else output.clean(str(e)))
        ctx.note(f"tml: interrupted; could not cancel job {job_id} ({why}); to cancel it:")
        ctx.note(f"tml job cancel {job_id}")
        return
    ctx.note(output.clean(f"tml: interrupted; cancelled job {job_id} "
                          f"(now {job.get('state')})"))


async def job_wait(ctx: Context) -> int:
    """Wait for a job (and the jobs that restart it) to end; exit with its outcome (its
    test results considered, as ``job run``'s)."""
    a = ctx.args
    waiting = Deferred.fromCoroutine(
        JobFollower(ctx, a.id, events=False, stream=None, notes=not ctx.json).run())
    if a.timeout is not None:
        waiting.addTimeout(a.timeout, ctx.reactor)
    try:
        followed = await waiting
    except DeferredTimeoutError:
        job = await ctx.api.get("jobs", a.id)
        ctx.note(output.clean(f"tml: job {a.id} is still {job.get('state')} after "
                              f"{a.timeout:g} s"))
        return EXIT_WAIT_TIMEOUT
    status, _ = await results_command.verdict(ctx, followed)
    if ctx.json:
        output.print_json(ctx.stdout, followed.final)
    return status


async def job_ls(ctx: Context) -> int:
    """List jobs, newest first; ``--all`` follows every page."""
    a = ctx.args
    params = {"state": a.state, "owner": a.owner, "limit": a.limit}
    return await ctx.emit_pages("jobs", "jobs", params, render_jobs, "jobs")


async def job_show(ctx: Context) -> int:
    """Show a job."""
    return ctx.emit(await ctx.api.get("jobs", ctx.args.id), render_job)


async def job_cancel(ctx: Context) -> int:
    """Ask for a job to be terminated (an ended job's held host is released)."""
    job = await ctx.api.post("jobs", ctx.args.id, "terminate")
    return ctx.emit(job, lambda j: f"job {j.get('id')}: {j.get('state')}"
                    f"{', releasing its held host' if j.get('held_until') else ''}\n")


async def job_extend(ctx: Context) -> int:
    """Move a job's deadline (a reservation's end) later, or its held host's hold."""
    job = await ctx.api.post("jobs", ctx.args.id, "extend", body={"by": ctx.args.by})
    return ctx.emit(job, extended_text)


def extended_text(job: dict[str, Any]) -> str:
    """What ``tml job extend`` says of the extended ``job``."""
    if job.get("held_until"):
        return output.clean(f"job {job.get('id')}: {job.get('state')}; its host "
                            f"{job.get('host')} is held until "
                            f"{output.fmt_time(job['held_until'])}") + "\n"
    until = output.fmt_time(job["deadline"]) if job.get("deadline") else "its timeout"
    timeout = job.get("timeout")
    seconds = f"{timeout:g}" if isinstance(timeout, (int, float)) else timeout
    return output.clean(f"job {job.get('id')}: {job.get('state')}, until {until} "
                        f"(timeout {seconds} s)") + "\n"


async def job_events(ctx: Context) -> int:
    """List a job's events; ``--follow`` watches until it (or its last restart) ends."""
    a = ctx.args
    if not a.follow:
        data = await ctx.api.get("jobs", a.id, "events", params={"after": a.after})
        return ctx.emit(data, render_events)
    await JobFollower(ctx, a.id, events=True, stream=None, after=a.after, notes=False).run()
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


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``job``."""
    job = add_group(sub, "job", help="submit and watch jobs")

    p = add_command(job, "submit", job_submit, common, help="submit a job and print its id")
    p.add_argument("image", metavar="IMAGE", help="a catalogue name or sha256:… digest")
    add_tag_option(p)
    add_param_option(p)
    p.add_argument(
        "--secret-param",
        dest="secret_params",
        action="append",
        default=[],
        metavar="NAME[=@FILE|=-]",
        help="a secret parameter (repeat): NAME alone takes $NAME, NAME=@FILE the file's "
        "content, NAME=- standard input (NAME=VALUE works but shows the secret to "
        "other local users)",
    )
    p.add_argument(
        "--secret-param-env",
        dest="secret_param_envs",
        action="append",
        default=[],
        type=name_value,
        metavar="NAME=VAR",
        help="a secret parameter NAME whose value is the environment variable VAR (repeat)",
    )
    p.add_argument("--timeout", type=duration, metavar="S", help="execution timeout")
    p.add_argument("--queue-timeout", type=duration, metavar="S", help="time allowed queued")
    p.add_argument("--max-restarts", type=non_negative_int, metavar="N")
    p.add_argument("--label", metavar="TEXT")
    p.add_argument("--hold-on-failure", type=duration, metavar="DURATION",
                   help="if the job fails (non-zero exit status, execution timeout), keep its "
                   "host (and VM or board) as it is this long (15m, 2h) for debugging; "
                   "tml job cancel releases it")
    results_command.add_patterns_option(p, "the job (instead of its image's)")
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
    _add_run(job, common, p)

    p = add_command(job, "ls", job_ls, common, help="list jobs, newest first")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--owner", metavar="USER")
    p.add_argument("--limit", type=positive_int, metavar="N", help="jobs per page (1-500)")
    p.add_argument("--all", action="store_true", help="follow every page")

    p = add_command(job, "show", job_show, common, help="show a job")
    add_job_id(p)
    p = add_command(job, "cancel", job_cancel, common, help="terminate a job")
    add_job_id(p)
    p = add_command(job, "extend", job_extend, common,
                    help="move a job's deadline (a reservation's end), or the end of its "
                    "held host's hold, later")
    add_job_id(p)
    p.add_argument("by", metavar="DURATION", type=duration,
                   help="how much later (90, 15m, 2h, 1d)")
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
    add_job_id(p)
    p.add_argument("name", metavar="NAME", help="the new catalogue image's name")
    p.add_argument("--store", metavar="URL",
                   help="the image store (default: the job image's first store)")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--wait", type=duration, default=3600.0, metavar="S",
                   help="how long to wait for the upload [3600]")
    p.add_argument("--no-wait", action="store_true", help="print the pending snapshot and exit")
    p = add_command(job, "snapshots", job_snapshots, common, help="list a job's snapshots")
    add_job_id(p)
    p = add_command(job, "events", job_events, common, help="list or follow a job's events")
    add_job_id(p)
    p.add_argument("--follow", "-f", action="store_true",
                   help="watch until the job (or the last job restarting it) terminates")
    p.add_argument("--after", type=non_negative_int, metavar="SEQ", help="only later events")
    p = add_command(job, "wait", job_wait, common,
                    help="wait until a job (and any job restarting it) ends; exit 0 if its "
                    "workload exited with status 0, 4 if with another, 5 if the job ended "
                    "otherwise, 6 after --timeout")
    add_job_id(p)
    p.add_argument("--timeout", type=duration, metavar="S",
                   help="give up after this long (exit status 6); default: wait for ever")


def _add_run(job: Any, common: argparse.ArgumentParser, submit: argparse.ArgumentParser) -> None:
    """``job run``: the options of ``job submit`` (but ``--follow``), and its own."""
    p = add_command(job, "run", job_run, common,
                    help="submit a job, follow its console and events to the end (restarts "
                    "too), write its artifacts; exit with its outcome (for CI pipelines)")
    for action in submit._actions:
        if action.dest in ("help", "follow", "no_console") or any(
                o in p._option_string_actions for o in action.option_strings):
            continue
        p._add_action(action)
    p.add_argument("--artifacts", metavar="DIR",
                   help="write console.log, events.jsonl, results (if the job has a results "
                   "stream) and summary.json here (created if missing)")
    p.add_argument("--no-console", action="store_true",
                   help="print the events only (the console is still saved with --artifacts)")
    p.add_argument("--keep-on-interrupt", action="store_true",
                   help="leave the job running when tml is interrupted (SIGINT, SIGTERM); "
                   "by default it is cancelled")
