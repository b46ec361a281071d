"""The schema gate's rule on values (gozon.core.migrations.judge): today's orders history, the
database's revisions and the lineage it recorded."""

from __future__ import annotations

import pytest
from alembic.script import ScriptDirectory

from gozon.core.migrations import SchemaState, judge
from tests.next_release import shipped_migrations

SCRIPT = ScriptDirectory(str(shipped_migrations("orders")))
SHIPPED = {"0001": (), "0002": ("0001",)}


@pytest.mark.parametrize(
    ("found", "lineage", "state"),
    [
        ({"0002"}, {}, SchemaState.AT_HEAD),
        (set(), {}, SchemaState.BEHIND),
        ({"0001"}, {}, SchemaState.BEHIND),
        ({"0003"}, {**SHIPPED, "0003": ("0002",)}, SchemaState.AHEAD),
        ({"0004"}, {"0004": ("0003",), "0003": ("0002",)}, SchemaState.AHEAD),
        ({"0003"}, {}, SchemaState.UNRELATED),
        ({"0003"}, {"0003": ("0001",)}, SchemaState.UNRELATED),  # a branch beside our head
        ({"c0ffee"}, SHIPPED, SchemaState.UNRELATED),
    ],
    ids=[
        "head",
        "empty",
        "older",
        "child",
        "grandchild",
        "newer-without-lineage",
        "sibling-branch",
        "another-history",
    ],
)
def test_judges_a_schema_against_the_image(
    found: set[str], lineage: dict[str, tuple[str, ...]], state: SchemaState
) -> None:
    check = judge("orders", SCRIPT, found, lineage)
    assert check.state is state
    assert check.accepted is (state in (SchemaState.AT_HEAD, SchemaState.AHEAD))
    assert check.heads == ("0002",)
