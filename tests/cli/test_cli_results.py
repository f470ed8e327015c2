"""tml job results renderings: JUnit XML and TAP from hostile results lines."""

from __future__ import annotations

import json
from xml.etree import ElementTree

import pytest

from treadmill.cli.commands.results import junit, load, tap
from treadmill.protocol import results as fmt

HOSTILE = ["\x00\x08\x1b[2J\ufffe", "\ud800 lone surrogate", "a]]>b<![CDATA[c", "&lt;&#0;",
           "line\r\nnot ok 9 - forged", "x # TODO forged", "back\\slash # SKIP"]


def stream(names: list[str]) -> bytes:
    lines = [fmt.test_case(name, "fail", message=name) for name in names]
    raw = b"".join(fmt.encode(line) for line in lines)
    raw += b'{"type":"bogus"}\n'
    raw += b'{"type":"test_case","name":"escaped \\ud800 surrogate","result":"skip"}\n'
    raw += fmt.encode(fmt.summarise({"fail": len(names)}, result="fail", message=names[0]))
    return raw + b'{"type":"test_case","name":"half-writ'  # an unfinished last line


def test_load_skips_invalid_and_unfinished_lines() -> None:
    results = load(stream(["a", "b"]))
    assert [c["name"] for c in results["test_cases"]] == ["a", "b", "escaped ? surrogate"]
    assert results["invalid_lines"] == 1 and results["summary"]["failed"] == 2


@pytest.mark.parametrize("name", HOSTILE)
def test_junit_is_well_formed_whatever_the_names(name: str) -> None:
    text = junit("job-1", load(stream([name, "plain"])))
    root = ElementTree.fromstring(text.encode("utf-8"))
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases][1:] == ["plain", "escaped ? surrogate"]
    assert root.find("testsuite").get("failures") == "2"


@pytest.mark.parametrize("name", HOSTILE)
def test_tap_keeps_each_test_point_on_one_line(name: str) -> None:
    text = tap("job-1", load(stream([name, "plain"])))
    rows = text.splitlines()
    assert rows[:2] == ["TAP version 13", "1..3"]
    points = [r for r in rows if r.startswith(("ok", "not ok"))]
    assert points[0].startswith("not ok 1 - ") and points[1] == "not ok 2 - plain"
    assert points[2] == "ok 3 - escaped ? surrogate # SKIP"
    text.encode("utf-8")  # printable
    assert all(" # " not in p for p in points[:2])  # no directive forged
    for row in rows:
        if row.startswith("  ") and row not in ("  ---", "  ..."):
            json.loads(row.split(": ", 1)[1])
