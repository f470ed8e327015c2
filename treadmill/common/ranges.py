"""HTTP ``Range`` requests (RFC 9110 §14): one ``bytes=`` range, or the whole body.

:func:`parse_range` is the one parser the roles serving byte streams use
(image blobs, log streams).
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class Unsatisfiable(Exception):
    """The ``Range`` lies outside the body (answer 416 with ``Content-Range: bytes */size``)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte of a single ``bytes=`` range, or None.

    None means "send everything": no header, a malformed one, or several
    ranges (RFC 9110 lets a server ignore ``Range``).

    :raises Unsatisfiable: when no byte of the body is in the range.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable()
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise Unsatisfiable()
    return start, min(end, size - 1)
