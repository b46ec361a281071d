"""JSON text read exactly: numbers as `Decimal`, never through a float, and the rules every
JSON the platform accepts keeps (HTTP bodies in `gozon.core.inputs`, event values in
`gozon.messaging.consumer`).

`loads` refuses, with `Refused` (a ValueError naming the rule), an object key given twice,
`NaN`/`Infinity`, values nested deeper than `MAX_DEPTH`, and a string holding NUL or a lone
surrogate (PostgreSQL stores neither). Text that is not JSON raises json's own ValueError (or
RecursionError, or ValueError for an integer of 4300+ digits). A number with a fraction or an
exponent comes back as the `Decimal` of its text, so `20.999999999999999999` reaches a money
rule as written and is refused for its places, instead of becoming 21.0 on the way.

The checks cost C-speed passes over the text unless the text can break a rule: strings are
walked only when it holds a `\\u` escape (the only way a decoded string gets a NUL or a lone
surrogate out of valid UTF-8), and the tree only when it has more brackets than `MAX_DEPTH`.
A body of thousands of keys costs about what `json.loads` does (`gozon.core.inputs`).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

MAX_DEPTH = 32


class Refused(ValueError):
    """The JSON text breaks one of the rules above; the message says which."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Refused(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return result


def _no_constants(name: str) -> Any:
    raise Refused(f"{name} is not a JSON number")


def _check_tree(value: Any, strings: bool, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise Refused(f"values nest deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if strings:
            _check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if strings:
                _check_text(key)
            _check_tree(item, strings, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_tree(item, strings, depth + 1)


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise Refused("a string holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Refused("a string holds a lone surrogate (\\ud800-\\udfff)") from exc


def loads(text: str) -> Any:
    """Parses JSON text under the rules above (numbers with a fraction or exponent as
    `Decimal`, integers as int)."""
    value = json.loads(
        text,
        parse_float=Decimal,
        parse_constant=_no_constants,
        object_pairs_hook=_no_duplicates,
    )
    # Only `\\u` escapes put NUL or a lone surrogate into a decoded string (a raw NUL is
    # refused by json, and `text` itself is checked whole); and text with at most MAX_DEPTH
    # brackets, inside strings or not, cannot nest deeper than MAX_DEPTH.
    strings = "\\u" in text
    if not strings:
        _check_text(text)
    if strings or text.count("{") + text.count("[") > MAX_DEPTH:
        _check_tree(value, strings)
    return value
