"""JSON Schemas compiled into Python predicates: a quick "valid" for a message.

:func:`compiled` turns a schema into a tree of small closures, one per keyword, for
exactly the keywords the protocols' schemas use (2020-12 semantics, as
python-jsonschema implements them: a bool is neither integer nor number, ``1.0`` is an
integer, ``True`` differs from ``1`` in ``const``/``enum``/``uniqueItems``, lengths
count code points, patterns are searched with ``$`` read as the end, as in
:mod:`treadmill.common.schema`). A schema with any other keyword, or a ``$ref`` that
is not a JSON pointer into the same document, is not compiled (``None``): its users
keep jsonschema. A predicate saying "valid" means jsonschema says valid; where it
says "invalid" the caller asks jsonschema for the verdict and the error's words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from treadmill.common.schema import pattern_regex, validator

Check = Callable[[Any], bool]

ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "$defs"})
"""Keywords that assert nothing (``$defs`` is reached through ``$ref``)."""

_MISSING = object()


class Unsupported(Exception):
    """The schema uses a keyword (or reference) the compiler does not handle."""


def _valid(value: Any) -> bool:
    return True


def _invalid(value: Any) -> bool:
    return False


def _is_integer(value: Any) -> bool:
    if isinstance(value, int):
        return not isinstance(value, bool)
    return isinstance(value, float) and value.is_integer()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_integer,
    "number": _is_number,
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def equal(one: Any, two: Any) -> bool:
    """JSON equality as jsonschema's ``equal``: ``True != 1``, ``1 == 1.0``, recursively."""
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(equal(one[k], two[k]) for k in one)
    if isinstance(one, (bool, list, dict)) or isinstance(two, (bool, list, dict)):
        return False  # Two bools that are not the same one, or a bool and a number.
    return bool(one == two)


def unique(items: list[Any]) -> bool:
    """No two of ``items`` are :func:`equal` (any pair jsonschema's ``uniq`` finds)."""
    if all(isinstance(item, str) for item in items):
        return len(set(items)) == len(items)
    return not any(equal(a, b) for i, a in enumerate(items) for b in items[i + 1:])


def _all(checks: list[Check]) -> Check:
    if not checks:
        return _valid
    if len(checks) == 1:
        return checks[0]

    def every(value: Any) -> bool:
        for check in checks:
            if not check(value):
                return False
        return True
    return every


class _Compiler:
    """One schema document's compilation (its ``$ref`` targets compiled once each)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, Check | None] = {}

    def schema(self, schema: Any) -> Check:
        if schema is True:
            return _valid
        if schema is False:
            return _invalid
        if not isinstance(schema, dict):
            raise Unsupported(f"a schema is an object or a bool, not {schema!r:.40}")
        if "$id" in schema and schema is not self.root:
            raise Unsupported("an embedded $id")
        checks = []
        for keyword in sorted(schema, key=lambda k: k != "type"):
            if keyword in ANNOTATIONS:
                continue
            build = _KEYWORDS.get(keyword)
            if build is None:
                raise Unsupported(f"keyword {keyword!r}")
            check = build(self, schema[keyword], schema)
            if check is not None:
                checks.append(check)
        return _all(checks)

    def ref(self, target: Any, schema: dict[str, Any]) -> Check:
        if not isinstance(target, str) or not (target == "#" or target.startswith("#/")):
            raise Unsupported(f"$ref {target!r:.80}")
        if target not in self.refs:
            self.refs[target] = None  # Under way: a recursive reference looks it up later.
            node = self.root
            for token in target[2:].split("/") if target != "#" else []:
                token = unquote(token).replace("~1", "/").replace("~0", "~")
                if isinstance(node, list) and token.isdigit() and int(token) < len(node):
                    node = node[int(token)]
                elif isinstance(node, dict) and token in node:
                    node = node[token]
                else:
                    raise Unsupported(f"$ref {target!r:.80} points nowhere")
            self.refs[target] = self.schema(node)
        found = self.refs[target]
        if found is not None:
            return found
        refs = self.refs
        return lambda v: refs[target](v)


def _type(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(name in _TYPES for name in names):
        raise Unsupported(f"type {value!r:.80}")
    checks = [_TYPES[name] for name in names]
    return checks[0] if len(checks) == 1 else (lambda v: any(t(v) for t in checks))


def _properties(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    subs = [(name, c.schema(sub)) for name, sub in value.items()]

    def properties(v: Any) -> bool:
        if isinstance(v, dict):
            for name, check in subs:
                item = v.get(name, _MISSING)
                if item is not _MISSING and not check(item):
                    return False
        return True
    return properties


def _additional(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    known = frozenset(schema.get("properties", {}))
    if value is False:
        return lambda v: not isinstance(v, dict) or v.keys() <= known
    check = c.schema(value)
    return lambda v: not isinstance(v, dict) or all(
        check(item) for name, item in v.items() if name not in known)


def _required(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    names = tuple(value)
    return lambda v: not isinstance(v, dict) or all(name in v for name in names)


def _const(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    if isinstance(value, str):
        return lambda v: isinstance(v, str) and v == value
    return lambda v: equal(v, value)


def _enum(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    if all(isinstance(each, str) for each in value):
        names = frozenset(value)
        return lambda v: isinstance(v, str) and v in names
    return lambda v: any(equal(v, each) for each in value)


def _pattern(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    search = pattern_regex(value).search
    return lambda v: not isinstance(v, str) or search(v) is not None


def _items(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    check = c.schema(value)
    return lambda v: not isinstance(v, list) or all(check(item) for item in v)


def _unique(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check | None:
    return (lambda v: not isinstance(v, list) or unique(v)) if value else None


def _one_of(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    subs = [c.schema(sub) for sub in value]
    return lambda v: sum(1 for check in subs if check(v)) == 1


def _all_of(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
    return _all([c.schema(sub) for sub in value])


def _if(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check | None:
    condition = c.schema(value)
    if "then" not in schema:
        return None
    then = c.schema(schema["then"])
    return lambda v: not condition(v) or then(v)


def _bound(test: Callable[[Any, Any], bool], kind: Check) -> Callable[..., Check]:
    """A keyword whose ``test(instance, value)`` applies to instances of one ``kind``."""
    def build(c: _Compiler, value: Any, schema: dict[str, Any]) -> Check:
        return lambda v: not kind(v) or test(v, value)
    return build


_KEYWORDS: dict[str, Callable[[_Compiler, Any, dict[str, Any]], Check | None]] = {
    "type": _type,
    "$ref": lambda c, value, schema: c.ref(value, schema),
    "properties": _properties,
    "additionalProperties": _additional,
    "required": _required,
    "const": _const,
    "enum": _enum,
    "pattern": _pattern,
    "minLength": _bound(lambda v, n: len(v) >= n, _TYPES["string"]),
    "maxLength": _bound(lambda v, n: len(v) <= n, _TYPES["string"]),
    "minimum": _bound(lambda v, n: v >= n, _is_number),
    "maximum": _bound(lambda v, n: v <= n, _is_number),
    "exclusiveMinimum": _bound(lambda v, n: v > n, _is_number),
    "maxItems": _bound(lambda v, n: len(v) <= n, _TYPES["array"]),
    "items": _items,
    "uniqueItems": _unique,
    "minProperties": _bound(lambda v, n: len(v) >= n, _TYPES["object"]),
    "maxProperties": _bound(lambda v, n: len(v) <= n, _TYPES["object"]),
    "oneOf": _one_of,
    "allOf": _all_of,
    "if": _if,
    "then": lambda c, value, schema: None,  # Applied by "if"; alone it does nothing.
}


def compile_schema(schema: dict[str, Any]) -> Check:
    """``schema`` as a predicate; :class:`Unsupported` if it uses another keyword."""
    return _Compiler(schema).schema(schema)


_COMPILED: dict[int, tuple[dict[str, Any], Check | None]] = {}


def compiled(schema: dict[str, Any]) -> Check | None:
    """A cached predicate for ``schema`` (which must stay alive and unchanged), or None
    if it cannot be compiled. The schema is checked once, as by
    :func:`~treadmill.common.schema.validator`."""
    found = _COMPILED.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    validator(schema)
    try:
        check: Check | None = compile_schema(schema)
    except Unsupported:
        check = None
    _COMPILED[id(schema)] = (schema, check)
    return check
