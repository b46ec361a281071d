"""The dev stack is used through its public names: nothing outside `devstack/` imports, reads
or patches a `_private` name of it, so its insides can change without breaking a test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import devstack

ROOT = Path(__file__).resolve().parents[2]
USERS = ("tests", "bench", "scripts", "services")
PRIVATE_PATH = re.compile(r"^devstack(\.\w+)*\._(?!_)")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """`from devstack… import _x`, `<devstack or one of its modules>._x`, "devstack…._x"."""
    tree = ast.parse(source)
    modules = set()  # local names bound to devstack or one of its modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "devstack":
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)  # a module or not: harmless either way
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "devstack":
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append(ast.unparse(node))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and PRIVATE_PATH.match(node.value)
        ):
            found.append(repr(node.value))
    return found


def test_nothing_outside_the_dev_stack_uses_its_private_names() -> None:
    offenders = {
        str(path.relative_to(ROOT)): uses
        for folder in USERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != Path(__file__).resolve() and (uses := private_uses(path.read_text()))
    }
    assert offenders == {}


def test_the_check_finds_each_kind_of_private_use() -> None:
    assert private_uses("from devstack.platform import _migrate") == [
        "from devstack.platform import _migrate"
    ]
    assert private_uses("from devstack import system\nsystem._child") == ["system._child"]
    assert private_uses("import devstack.kafka\ndevstack.kafka._jars()") == ["devstack.kafka._jars"]
    assert private_uses("patch('devstack.system._tail')") == ["'devstack.system._tail'"]
    assert private_uses("from devstack import Kafka, system\nsystem.cmdline\nKafka.__name__") == []


def test_every_public_name_is_there() -> None:
    assert all(hasattr(devstack, name) for name in devstack.__all__)
