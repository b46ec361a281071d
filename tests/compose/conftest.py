"""The docker-compose stack that `scripts/test-compose` brought up (`make test-compose`).

These tests need that stack: they are not in `make test`'s paths, and they skip when
`GOZON_E2E_COMPOSE_PROJECT` does not name a running compose project.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devstack import ComposeStack
from tests.e2e.conftest import COMPOSE_PROJECT, Platform, compose_platform


@pytest.fixture(scope="session")
def stack() -> ComposeStack:
    if not COMPOSE_PROJECT:
        pytest.skip("needs the compose stack: make test-compose")
    return ComposeStack(COMPOSE_PROJECT)


@pytest.fixture(scope="session")
def platform(stack: ComposeStack, servers_dir: Path) -> Platform:
    return compose_platform(stack, servers_dir / "compose-logs")


@pytest.fixture
async def prometheus(stack: ComposeStack) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://{stack.published('prometheus', 9090)}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield client
