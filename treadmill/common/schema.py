"""JSON Schema validation that reads patterns the way the standard does.

JSON Schema patterns are ECMA-262 regular expressions, where ``$`` matches
only at the end of the string. Python's ``re`` also lets ``$`` match before
a final newline, so ``"alice\\n"`` would pass ``^[a-z]+$``. The validators
made here evaluate patterns with ``$`` at the end read as ``\\Z``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from jsonschema.validators import extend


@lru_cache(maxsize=256)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled, a final ``$`` read as the end of the string (``\\Z``)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any
             ) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not pattern_regex(pattern).search(instance):
        yield ValidationError(f"does not match {pattern!r}")


HIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Zl", "Zp"))
"""Unicode categories that are not printable text: controls, format characters
(bidirectional overrides, zero-width characters: they make a listing show another text
than it holds), surrogates, private use, line and paragraph separators."""


def _printable(validator: Any, wanted: bool, instance: Any, schema: Any
               ) -> Iterator[ValidationError]:
    if wanted and validator.is_type(instance, "string") and any(
            unicodedata.category(c) in HIDDEN_CATEGORIES for c in instance):
        yield ValidationError("holds a character that is not printable")


StrictValidator = extend(Draft202012Validator, {"pattern": _pattern, "x-printable": _printable})
"""Draft 2020-12 with standard (ECMA-262) end-of-string anchors, and ``x-printable``:
a string without :data:`HIDDEN_CATEGORIES` characters."""


_VALIDATORS: dict[int, Any] = {}


def validator(schema: dict[str, Any]) -> Any:
    """A cached validator for ``schema`` (which must stay alive and unchanged)."""
    key = id(schema)
    found = _VALIDATORS.get(key)
    if found is None:
        StrictValidator.check_schema(schema)
        found = _VALIDATORS[key] = StrictValidator(schema)
    return found
