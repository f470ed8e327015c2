"""``tml job run --artifacts DIR``'s file names: into a directory an earlier run left
files in, only this run's artifacts remain under the artifacts' names, and nothing else is
touched; an earlier job's console is named by its UUID, never by a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadmill.cli.commands.artifacts import clear_previous, console_file
from treadmill.cli.context import CommandError

EARLIER = "console-5b7c0c9e-8a41-4f7e-b1b4-3c2d9e0f1a22.log"


def test_an_earlier_runs_artifacts_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in ("summary.json", "events.jsonl", "console.log", "results", EARLIER,
                 "summary.json.tmp", "junit.xml", "console-notes.log", "results.txt"):
        (tmp_path / name).write_text("earlier run\n")
    (tmp_path / "keep").mkdir()
    (tmp_path / "outside").write_text("not an artifact\n")
    (tmp_path / "console-00000000-0000-0000-0000-000000000000.log").symlink_to(
        tmp_path / "outside")

    removed = clear_previous(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "console-notes.log", "junit.xml", "keep", "outside", "results.txt"]
    assert sorted(removed) == sorted([
        "summary.json", "events.jsonl", "console.log", "results", EARLIER, "summary.json.tmp",
        "console-00000000-0000-0000-0000-000000000000.log"])
    assert (tmp_path / "outside").read_text() == "not an artifact\n"  # a link, not its target


def test_a_directory_under_an_artifacts_name_stays(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    assert clear_previous(tmp_path) == []
    assert (tmp_path / "results").is_dir()


def test_an_earlier_jobs_console_is_named_by_its_uuid_and_nothing_else() -> None:
    job_id = "5B7C0C9E-8A41-4F7E-B1B4-3C2D9E0F1A22"
    assert console_file({"id": job_id}, last=False) == f"console-{job_id.lower()}.log"
    assert console_file({"id": "../../.bashrc"}, last=True) == "console.log"
    for bad in ("../../.bashrc", "x/../../y", "", None):
        with pytest.raises(CommandError, match="not a UUID"):
            console_file({"id": bad}, last=False)
