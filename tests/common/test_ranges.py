"""The shared HTTP ``Range`` parser (treadmill.common.ranges)."""

from __future__ import annotations

import pytest

from treadmill.common.ranges import Unsatisfiable, parse_range


@pytest.mark.parametrize("header,size,expected", [
    (None, 10, None), ("", 10, None), ("bytes=0-0", 10, (0, 0)), ("bytes=5-", 10, (5, 9)),
    ("bytes=-3", 10, (7, 9)), ("bytes=-30", 10, (0, 9)), ("bytes=3-100", 10, (3, 9)),
    ("bytes=0-1,3-4", 10, None), ("items=0-1", 10, None), ("bytes=5-2", 10, None),
    ("bytes=-", 10, None), (" bytes = 2 - 4 ", 10, (2, 4)), ("bytes=x-4", 10, None)])
def test_ranges(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header,size", [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0),
                                         ("bytes=-5", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)
