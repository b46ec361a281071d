"""gozon.core.jsontext: the rules every accepted JSON keeps, whichever path the check takes."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from gozon.core import jsontext
from gozon.core.jsontext import MAX_DEPTH, Refused


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ('{"a": 1, "a": 2}', "appears twice"),
        ('{"a": {"b": 1, "c": 2, "b": 3}}', "'b' appears twice"),
        ('[{"k": 1}, {"k": 1, "k": 1}]', "appears twice"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ("[Infinity]", "Infinity is not a JSON number"),
        (nested(MAX_DEPTH + 2), "nest deeper"),
        ('{"d": "a\\u0000b"}', "NUL"),
        ('{"a\\u0000": 1}', "NUL"),
        ('{"d": "\\ud800"}', "lone surrogate"),
        ('{"\\udfff": 1}', "lone surrogate"),
        ('["ok", ["\\ud83d"]]', "lone surrogate"),
        ('"\ud800"', "lone surrogate"),  # a str that never was UTF-8, given whole
    ],
)
def test_refused(text: str, rule: str) -> None:
    with pytest.raises(Refused, match=rule):
        jsontext.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"d": "\\ud83d\\ude00 \\u00e9 \\\\u0000"}',  # a pair, an accent, an escaped backslash
        '{"d": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # brackets inside a string
        nested(MAX_DEPTH),
        json.dumps({f"k{n}": n for n in range(5000)}),
    ],
)
def test_accepted_as_json_reads_it(text: str) -> None:
    assert jsontext.loads(text) == json.loads(text)


def test_numbers_keep_their_text() -> None:
    value = jsontext.loads('{"a": 20.999999999999999999, "b": 1e2, "c": 7}')
    assert value == {"a": Decimal("20.999999999999999999"), "b": Decimal("1E+2"), "c": 7}
    assert type(value["c"]) is int


def test_not_json_is_json_s_own_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        jsontext.loads('{"a": 1,}')
