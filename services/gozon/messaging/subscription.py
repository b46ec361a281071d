"""A service's subscription: what its consumer process reads and how it handles it.

Each service declares its own in its `consumer.py` (as eShop's services declare theirs), and
`gozon … consumer` only picks which one to run:
- `topic` and `schema`: the one topic it reads, and the event type every message there must
  validate against (anything else is dead-lettered);
- `handler`: builds the batch handler (a partition's fetched messages in one transaction, see
  `gozon.messaging.consumer`) from the consumer's asyncpg pool (`gozon.core.pg.worker_pool`:
  one connection per partition handled side by side, each batch on one held by
  `gozon.core.pg.batch_connection`) and a `notify` callback;
- `outbox`: the outbox table the handler writes, if any. The handler then calls `notify()`
  once after each commit that added rows, which wakes that outbox's relay at once;
- `scrape_hooks`: refresh the service's own gauges at each `/metrics` scrape, on the same
  pool (a hook that fails leaves its gauge stale and never fails the scrape).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

import asyncpg
from pydantic import BaseModel
from sqlalchemy import Table

from gozon.messaging.consumer import BatchHandler

E = TypeVar("E", bound=BaseModel)

Notify: TypeAlias = Callable[[], None]
ScrapeHook: TypeAlias = Callable[[asyncpg.Pool], Awaitable[object]]


def no_notify() -> None:
    """The `notify` of a handler that writes no outbox."""


@dataclass(frozen=True)
class Subscription(Generic[E]):
    topic: str
    schema: type[E]
    handler: Callable[[asyncpg.Pool, Notify], BatchHandler[E]]
    outbox: Table | None = None
    scrape_hooks: tuple[ScrapeHook, ...] = ()
