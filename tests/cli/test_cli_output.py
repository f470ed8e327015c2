"""Tables, ``key: value`` lines and the job/event renderers."""

from __future__ import annotations

import io
import itertools
import json
import re
from types import SimpleNamespace

import pytest

from treadmill.cli import output
from treadmill.cli.commands.jobs import event_line, exit_status_for, render_job, render_jobs
from treadmill.cli.commands.logs import ConsoleWriter
from treadmill.protocol.logs import hold_marker


def test_table_aligns_columns_without_trailing_blanks():
    text = output.render_table(
        ("NAME", "ENABLED", "TAGS"),
        [("qemu-1", True, ["a", "b"]), ("board-long-name", False, [])],
    )
    assert text == (
        "NAME             ENABLED  TAGS\n"
        "qemu-1           yes      a,b\n"
        "board-long-name  no       -\n"
    )


def test_table_with_no_rows_is_the_header():
    assert output.render_table(("A", "B"), []) == "A  B\n"


def test_cells():
    assert output.cell(None) == "-"
    assert output.cell(0) == "0"
    assert output.cell("") == ""
    assert output.cell({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert output.cell("bell\x07 and \x1b[31mred") == "bell\\x07 and \\x1b[31mred"


@pytest.mark.parametrize(("text", "shown"), [
    ("\x1b\\", "\\x1b\\\\"),                # ESC then a backslash (ST, an OSC's end)
    ("\x1b\\x07", "\\x1b\\\\x07"),          # ESC then the text \x07 ...
    ("\x1b\x07", "\\x1b\\x07"),              # ... is not ESC then BEL
    ("\x1b\\\\x", "\\x1b\\\\\\\\x"),      # a run of backslashes: each doubled
    ("C:\\dir \\d+\x07", "C:\\dir \\d+\\x07"),  # other backslashes as they are
    ("plain \\ text", "plain \\ text"),
])
def test_clean_shows_a_backslash_after_an_escape_unambiguously(text: str, shown: str) -> None:
    assert output.clean(text) == shown


def test_clean_shows_backslashes_after_escapes_one_to_one() -> None:
    """Texts of ESC, BEL, ``x07`` and backslashes that follow a control character are each
    shown differently. (A backslash elsewhere is shown as it is: the text ``\\x07`` and BEL
    look alike, as a path or a regular expression must stay readable.)"""
    parts = ["\x1b", "\x07", "\\", "x07"]
    texts = ["".join(p) for n in range(6) for p in itertools.product(parts, repeat=n)]
    texts = [t for t in texts if not re.search(r"(?:^|[^\x00-\x1f\\])\\", t)]
    shown: dict[str, str] = {}
    for text in texts:
        assert shown.setdefault(output.clean(text), text) == text, text


def test_fmt_time_drops_fraction():
    assert output.fmt_time("2026-11-23T17:00:00.123456Z") == "2026-11-23T17:00:00Z"
    assert output.fmt_time("2026-11-23T17:00:00+01:00") == "2026-11-23T17:00:00+01:00"
    assert output.fmt_time(None) == "-"


def test_fields_and_object():
    assert output.render_fields([("a", 1), ("long_key", None)]) == "a:        1\nlong_key: -\n"
    text = output.render_object({"z": 1, "name": "n", "token": "secret"}, ("name",), ("token",))
    assert text == "name: n\nz:    1\n"


def test_json_output():
    out = io.StringIO()
    output.print_json_line(out, {"a": [1, 2]})
    assert out.getvalue() == '{"a":[1,2]}\n'
    out = io.StringIO()
    output.print_json(out, {"a": 1})
    assert json.loads(out.getvalue()) == {"a": 1}


JOB = {
    "id": "5b7c",
    "owner": "alice",
    "label": "",
    "image": {"name": "debian", "digest": "sha256:" + "ab" * 32, "stores": ["http://s"]},
    "tags": ["qemu"],
    "parameters": {"A": {"value": "1", "secret": False}, "K": {"secret": True}},
    "state": "terminated",
    "stage": None,
    "host": "qemu-1",
    "termination": {"reason": "workload_exited", "exit_status": 2, "message": "boom"},
    "created_at": "2026-11-23T17:00:00.5Z",
    "future_field": 1,
}


def test_render_job_redacts_nothing_it_did_not_get_and_keeps_unknown_fields():
    fields = dict(line.split(":", 1) for line in render_job(JOB).splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["parameters"] == "A=1 K=<secret>"
    assert fields["reason"] == "workload_exited"
    assert fields["exit_status"] == "2"
    assert fields["image"] == f"debian (sha256:{'ab' * 32})"
    assert fields["future_field"] == "1"
    assert fields["label"] == "-"


def test_render_jobs_detail_column():
    lines = render_jobs({"jobs": [JOB]}).splitlines()
    headers = ["ID", "STATE", "DETAIL", "HOST", "OWNER", "IMAGE", "CREATED", "LABEL"]
    assert lines[0].split() == headers
    assert "workload_exited, exit status 2: boom" in lines[1]


def test_a_held_job_says_until_when_its_host_is_held():
    held = {**JOB, "hold_on_failure": 7200, "held_until": "2026-11-23T19:00:00.25Z"}
    fields = dict(line.split(":", 1) for line in render_job(held).splitlines())
    assert fields["hold_on_failure"].strip() == "7200"
    assert fields["held_until"].strip() == ("2026-11-23T19:00:00Z (its host qemu-1 is held; "
                                            "tml job cancel releases it)")
    [row] = render_jobs({"jobs": [held]}).splitlines()[1:]
    assert "boom; host held until 2026-11-23T19:00:00Z" in row
    released = {**held, "held_until": None}
    assert "held" not in render_jobs({"jobs": [released]}).splitlines()[1]
    assert "held_until:" not in render_job(released)  # shown while held only


def test_event_line():
    line = event_line({"at": "2026-11-23T17:00:00Z", "state": "initializing", "stage": "booting"})
    assert line == "2026-11-23T17:00:00Z  initializing/booting\n"
    line = event_line({"at": None, "state": "terminated", "reason": "queue_timeout"})
    assert line == "-  terminated                   queue_timeout\n"


def test_exit_status_for_termination():
    assert exit_status_for({"reason": "workload_exited", "exit_status": 0}) == 0
    assert exit_status_for({"reason": "workload_exited", "exit_status": 1}) == 4
    assert exit_status_for({"reason": "workload_exited", "exit_status": None}) == 4
    for reason in ("user_terminated", "queue_timeout", "host_dropped_job", "internal_error"):
        assert exit_status_for({"reason": reason, "exit_status": 0}) == 5
    assert exit_status_for(None) == 5


def test_render_job_lists_endpoints_one_per_line():
    job = {**JOB, "state": "ready", "termination": None, "endpoints": [
        {"service": "ssh", "proxy": "ws://p", "host": "p.example", "port": 40001,
         "url": "ws://p.example:8090/v1/tunnels/abc"},
        {"service": "echo", "proxy": "ws://p", "host": "p.example", "port": 40002},
        "junk"]}
    lines = [line for line in render_job(job).splitlines() if line.startswith("endpoint:")]
    assert [line.split(None, 1)[1] for line in lines] == [
        "ssh p.example:40001 ws://p.example:8090/v1/tunnels/abc", "echo p.example:40002"]


@pytest.mark.parametrize("cut", [1, 7, 20, 47, 60])
def test_the_console_writer_sees_where_a_held_hosts_console_begins(cut: int) -> None:
    """The marker line is found whatever chunks it arrives in; the bytes pass unchanged."""
    data = b"last line of the run\n" + hold_marker("2026-11-23T19:00:00Z") + b"held\n"
    out = io.StringIO()
    writer = ConsoleWriter(SimpleNamespace(stdout=out))  # type: ignore[arg-type]
    for start in range(0, len(data), cut):
        assert not writer.held or start > data.index(b"[treadmill")
        writer(data[start:start + cut])
    assert writer.held and out.getvalue().encode() == data
    plain = ConsoleWriter(SimpleNamespace(stdout=io.StringIO()))  # type: ignore[arg-type]
    plain(b"[treadmill: the job has ended; its host is not held]\n")
    assert not plain.held


def test_how_to_get_in_prints_one_line_each_with_server_text_escaped():
    """``tml host reserve``: separate lines (not escaped ``\\x0a``), the deadline as
    ``tml host ls`` shows it, and control characters from the server escaped."""
    from treadmill.cli.commands.hosts import how_to_get_in

    job = {"id": "j1", "state": "ready", "host": "qemu-1\x1b[2J",
           "deadline": "2026-12-08T03:15:10.576362Z",
           "endpoints": [{"service": "ssh", "host": "proxy", "port": 40022,
                          "url": "ws://proxy/v1/tunnels/abc"},
                         {"service": "console", "url": "ws://proxy/v1/tunnels/def\n"}]}
    text = how_to_get_in(job)
    assert text.endswith("\n") and "\\x0a" in text  # only the console URL's own newline
    lines = text.splitlines()
    assert lines[0] == "reservation j1: ready on qemu-1\\x1b[2J, until 2026-12-08T03:15:10Z"
    assert lines[1:3] == ["  endpoint ssh proxy:40022 ws://proxy/v1/tunnels/abc",
                          "  endpoint console ws://proxy/v1/tunnels/def\\x0a"]
    assert lines[3] == "  get in:  tml job ssh j1   or   tml job connect j1 SERVICE"
    assert lines[-1] == "  release: tml job cancel j1"
    waiting = how_to_get_in({"id": "j2", "state": "queued"}).splitlines()
    assert waiting[0] == "reservation j2: queued on (no host yet), until its timeout"


def test_job_extend_says_the_deadline_as_docs_cli_md_shows_it():
    """``tml job extend``: the deadline without its fraction of a second and the
    timeout in whole seconds, as docs/cli.md's example (not ``7200.0 s``)."""
    from treadmill.cli.commands.jobs import extended_text

    job = {"id": "5b7c", "state": "ready", "deadline": "2026-11-23T20:00:00.576362Z",
           "timeout": 10800.0, "held_until": None}
    assert extended_text(job) == "job 5b7c: ready, until 2026-11-23T20:00:00Z (timeout 10800 s)\n"
    assert extended_text({**job, "timeout": 90.5}).endswith("(timeout 90.5 s)\n")
    assert extended_text({**job, "deadline": None}) == (
        "job 5b7c: ready, until its timeout (timeout 10800 s)\n")


def test_a_held_hosts_notes_say_the_hold_s_end_as_docs_cli_md_shows_it():
    """``tml job run --hold-on-failure``: the end of the hold without its fraction of a
    second, as docs/cli.md's example and ``tml job show`` show it."""
    from treadmill.cli.commands.jobs import hold_notes

    job = {"host": "vm-1", "held_until": "2026-11-23T19:03:40.197732Z",
           "endpoints": [{"service": "ssh", "host": "proxy.example", "port": 40022}]}
    lines = hold_notes("5b7c", job)
    assert lines[0] == ("tml: job 5b7c failed; its host vm-1 is held for debugging "
                        "until 2026-11-23T19:03:40Z")
    assert lines[1] == "tml:   endpoint ssh proxy.example:40022"
    assert lines[-1] == "tml:   release: tml job cancel 5b7c"
    assert hold_notes("5b7c", {**job, "held_until": None}) == []
