"""Following a job to its end: its events, its console, and the jobs that restart it.

:class:`JobFollower` is the one follower behind ``tml job submit --follow``,
``job run``, ``job wait``, ``job events --follow`` and ``job logs --follow``.
It ends when the job ends, whatever state it ended in:

- the switchboard's ``terminated`` event ends the events (:class:`EventFollower`);
- a console stream follower is then stopped at once if the job never reached a
  host (no supervisor will ever write or close its streams), or else once the
  stream closes, or after ``CONSOLE_TAIL_WAIT`` seconds without a new byte;
- a failed job whose host is held keeps its streams open until the hold ends: a
  follower ``through_hold`` (``tml job logs --follow``) follows them until then
  (it asks the switchboard every ``HOLD_POLL`` seconds whether the hold is over),
  any other stops once the console reached the line where the held host's console
  begins (``protocol.logs.HOLD_MARKER``), or as above;
- a job that ended for a host-side reason with restarts left was enqueued
  again by the switchboard (its successor records ``restart_of``): the
  follower says so on stderr and follows the successor in the same way.

The exit status is the last job's (:func:`exit_status_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater

from treadmill.cli import output
from treadmill.cli.client import ApiError, Unreachable
from treadmill.cli.commands.logs import ConsoleWriter, read_stream
from treadmill.cli.context import EXIT_ERROR, EXIT_JOB_ABORTED, EXIT_JOB_FAILED, EXIT_OK, Context
from treadmill.cli.retry import Retry
from treadmill.cli.sse import SSEMessage, json_objects

CONSOLE_TAIL_WAIT = 10.0
"""Seconds a console follower waits for a new byte (or the stream's close) after
its job ended, before it stops."""

HOLD_POLL = 5.0
"""Seconds between a ``through_hold`` follower's questions whether the hold is over."""


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


def exit_status_for(termination: dict[str, Any] | None) -> int:
    """0 if the workload exited with status 0; 4 if it exited otherwise; 5 for other reasons."""
    if not termination:
        return EXIT_JOB_ABORTED
    if termination.get("reason") == "workload_exited":
        return EXIT_OK if termination.get("exit_status") == 0 else EXIT_JOB_FAILED
    return EXIT_JOB_ABORTED


class EventFollower:
    """Print a job's events as they happen (unless ``show`` is false) until it terminates.

    If the stream ends or breaks before the ``terminated`` event, it catches up
    with ``GET .../events?after=SEQ`` and watches again from the last event it
    saw; it gives up (:class:`Unreachable`) after ``give_up_after`` seconds of
    failing to reach the switchboard. With ``console``, a console that stopped
    mid-line gets its line ended before an event line is printed.
    """

    give_up_after = 60.0
    max_delay = 10.0

    def __init__(self, ctx: Context, job_id: str, after: int | None = None, *,
                 show: bool = True, console: ConsoleWriter | None = None) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.last_seq = after
        self.show = show
        self.console = console
        self.terminated: dict[str, Any] | None = None

    def accept(self, event: dict[str, Any]) -> bool:
        """Print a new event; return whether it is the last."""
        seq = event.get("seq")
        if isinstance(seq, int):
            if self.last_seq is not None and seq <= self.last_seq:
                return False
            self.last_seq = seq
        if self.show and self.ctx.json:
            output.print_json_line(self.ctx.stdout, event)
        elif self.show:
            if self.console is not None:
                self.console.end_line()
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
                if not data.get("events"):
                    # Nothing new: maybe it ended before the events asked for (--after).
                    job = await self.ctx.api.get("jobs", self.job_id)
                    if job.get("state") == "terminated":
                        self.terminated = {"job": self.job_id, "state": "terminated",
                                           **(job.get("termination") or {})}
                        return self.terminated
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


@dataclass
class Followed:
    """What following a job found: the jobs of its restart chain, first to last, as
    they ended, and how reading their stream went (0, or 1 if it could not be read)."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    stream_status: int = EXIT_OK

    @property
    def final(self) -> dict[str, Any]:
        """The last job of the chain."""
        return self.jobs[-1]

    @property
    def status(self) -> int:
        """The exit status for the last job's end (0, 4 or 5)."""
        return exit_status_for(self.final.get("termination"))


def ran_on_a_host(job: dict[str, Any]) -> bool:
    """Whether an ended job ever reached a host (else no supervisor writes its logs)."""
    return bool(job.get("assigned_at") or job.get("started_at"))


class JobFollower:
    """Follow a job and its successors to the end (see the module's docstring).

    ``events``: print the events (as lines, or JSON lines with ``--json``);
    ``stream``: print that log stream (``console``) as it happens;
    ``notes``: say on stderr how each job ended;
    ``through_hold``: follow a failed job's held host's stream until the hold ends.
    """

    def __init__(self, ctx: Context, job_id: str, *, events: bool, stream: str | None,
                 after: int | None = None, job: dict[str, Any] | None = None,
                 notes: bool = True, through_hold: bool = False) -> None:
        self.ctx = ctx
        self.through_hold = through_hold
        self.job_id = job_id
        self.events = events
        self.stream = stream
        self.after = after
        self.job = job
        self.notes = notes
        self.current = job_id  # the job being followed now
        self.gave_up = False  # the stream could not be read (without events shown)
        self.followed = Followed()

    async def run(self) -> Followed:
        """Follow to the end of the last job of the chain."""
        job_id, after, job = self.job_id, self.after, self.job
        while True:
            self.current = job_id
            ended = await self._follow_one(job_id, after, job)
            self.followed.jobs.append(ended)
            if self.gave_up:
                return self.followed
            successor = await self._successor(ended)
            if successor is None:
                break
            self.ctx.note(output.clean(
                f"tml: job {job_id} ended ({termination_text(ended.get('termination') or {})})"
                f"; restarted as {successor['id']}"))
            job_id, after, job = str(successor["id"]), None, successor
        final = self.followed.final
        if self.notes and not self.ctx.json:
            term = final.get("termination")
            text = termination_text(term) if term else "no termination recorded"
            if not ran_on_a_host(final):
                text += " (it never ran on a host)"
            self.ctx.note(output.clean(f"tml: job {final['id']} terminated: {text}"))
        return self.followed

    async def _follow_one(self, job_id: str, after: int | None,
                          job: dict[str, Any] | None) -> dict[str, Any]:
        writer: ConsoleWriter | None = None
        reader: Deferred[None] | None = None
        if self.stream is not None:
            if job is None:
                job = await self.ctx.api.get("jobs", job_id)
            if job.get("logs"):
                writer = ConsoleWriter(self.ctx)
                reader = Deferred.fromCoroutine(self._read(job_id, writer))
            elif not self.events:
                self.ctx.note(f"tml: job {job_id} has no log servers "
                              "(the switchboard configures none)")
                self.followed.stream_status = EXIT_ERROR
                self.gave_up = True
                return job
        following = Deferred.fromCoroutine(EventFollower(
            self.ctx, job_id, after, show=self.events,
            console=writer if self.events else None).run())
        if reader is not None and not self.events:
            # Only the stream is shown: if it cannot be read, stop there.
            def read(result: Any) -> Any:
                if self.followed.stream_status != EXIT_OK and not following.called:
                    self.gave_up = True
                    following.cancel()
                return result

            reader.addBoth(read)
        last: dict[str, Any] | None = None
        try:
            try:
                last = await following
            except CancelledError:
                if not self.gave_up or self.ctx.interrupted:
                    raise
            ended = await self.ctx.api.get("jobs", job_id)
            if not ended.get("termination") and last and last.get("reason"):
                ended["termination"] = {k: last.get(k) for k in
                                        ("reason", "exit_status", "message")}
            if (self.stream is not None and not self.events and not self.gave_up
                    and not ran_on_a_host(ended)):
                self.ctx.note(f"tml: job {job_id} ended without running on a host: "
                              f"it has no {self.stream}")
            if reader is not None and writer is not None:
                await self._tail(job_id, ended, reader, writer)
            return ended
        finally:
            if reader is not None and not reader.called:
                reader.cancel()
            if writer is not None and (self.events or self.ctx.interrupted):
                writer.end_line()  # what follows (an event, tml's last words) starts a line

    async def _read(self, job_id: str, writer: ConsoleWriter) -> None:
        assert self.stream is not None
        try:
            status = await read_stream(self.ctx, job_id, self.stream, True, writer)
        except CancelledError:
            return
        except (ApiError, Unreachable) as e:
            self.ctx.note(output.clean(f"tml: the {self.stream} of job {job_id} is "
                                       f"unavailable: {e}"))
            status = EXIT_ERROR
        if status != EXIT_OK:
            self.followed.stream_status = status

    async def _tail(self, job_id: str, ended: dict[str, Any], reader: Deferred[None],
                    writer: ConsoleWriter) -> None:
        """Let the stream follower finish after the job ended, or stop it."""
        if not ran_on_a_host(ended):
            return  # Nothing will ever be written: the finally of _follow_one stops it.
        if ended.get("held_until"):
            if not self.through_hold:
                await self._until_hold(reader, writer)
                return  # the held host's console goes on: the hold's note says where
            await self._through_hold(job_id, reader)
        while not reader.called:
            before = writer.count
            await _either(self.ctx.reactor, reader, CONSOLE_TAIL_WAIT)
            if not reader.called and writer.count == before:
                self.ctx.note(f"tml: the {self.stream} of job {job_id} was not closed "
                              f"within {CONSOLE_TAIL_WAIT:g} s of the job's end; "
                              "stopped reading it")
                return

    async def _until_hold(self, reader: Deferred[None], writer: ConsoleWriter) -> None:
        """The run's end of a held job's console: up to the held host's marker line (or
        the stream's close, or ``CONSOLE_TAIL_WAIT`` seconds without a new byte, or three
        times that in all: a supervisor that writes no marker)."""
        quiet, waited, count = 0.0, 0.0, writer.count
        while (not reader.called and not writer.held and quiet < CONSOLE_TAIL_WAIT
               and waited < 3 * CONSOLE_TAIL_WAIT):
            await _either(self.ctx.reactor, reader, 1.0)
            quiet = 0.0 if writer.count != count else quiet + 1.0
            waited += 1.0
            count = writer.count

    async def _through_hold(self, job_id: str, reader: Deferred[None]) -> None:
        """Follow while the job's host is held: until the stream closes or the switchboard
        says the hold is over (then the usual tail wait for the rest)."""
        while not reader.called:
            await _either(self.ctx.reactor, reader, HOLD_POLL)
            if reader.called:
                return
            try:
                job = await self.ctx.api.get("jobs", job_id)
            except (ApiError, Unreachable):
                continue  # the stream goes on; ask again later
            if not job.get("held_until"):
                return

    async def _successor(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The job that restarted ``job``, if the switchboard made one."""
        term = job.get("termination") or {}
        if not job.get("restarts_left") or term.get("reason") in (
                "workload_exited", "user_terminated"):
            return None
        data = await self.ctx.api.get("jobs", params={"restart_of": job["id"], "limit": 1})
        for candidate in data.get("jobs", []):
            if isinstance(candidate, dict) and candidate.get("restart_of") == job["id"]:
                return candidate
        return None


def _either(reactor: Any, d: Deferred[Any], seconds: float) -> Deferred[None]:
    """Fire once ``d`` fired or ``seconds`` passed (``d`` is left alone, and not consumed)."""

    def cancel(_: Deferred[None]) -> None:
        if call.active():
            call.cancel()

    done: Deferred[None] = Deferred(cancel)

    def fire(_: Any = None) -> None:
        if not done.called:
            done.callback(None)

    call = reactor.callLater(seconds, fire)

    def fired(result: Any) -> Any:
        if call.active():
            call.cancel()
        fire()
        return result

    d.addBoth(fired)
    return done
