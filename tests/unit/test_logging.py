"""The JSON log lines the processes write (gozon.core.logging, JSON mode)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from gozon.core.logging import configure_logging


@pytest.fixture
def json_mode() -> Iterator[None]:
    """The processes' JSON configuration; the tests' own text logging restored after."""
    configure_logging("unit-test", json=True)
    yield
    structlog.reset_defaults()
    configure_logging("tests", level="INFO", json=False)


def test_a_field_with_int_keys_is_rendered_not_raised(json_mode: None) -> None:
    # The consumer runner logs refused offsets by partition number: a line that raised would
    # end the consumer (it did, once, in the fault suite).
    render = structlog.get_config()["processors"][-1]  # the configured JSON renderer
    line = render(None, "warning", {"event": "offset commit refused", "offsets": {0: 5, 2: 7}})
    assert json.loads(line) == {"event": "offset commit refused", "offsets": {"0": 5, "2": 7}}
