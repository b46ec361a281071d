"""Process plumbing for workers: their event loop, and a stop event set by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_worker(main: Coroutine[Any, Any, T]) -> T:
    """Runs a long-lived worker (relay, consumer) to completion on uvloop, as uvicorn runs the
    APIs: its event loop costs less CPU per turn than asyncio's own, and these processes are
    all event-loop turns (a socket read or write per round trip). See
    docs/adr/0003-workers-on-uvloop.md."""
    import uvloop

    return uvloop.run(main)


def stop_on_signals() -> asyncio.Event:
    """An event set on SIGTERM/SIGINT; the worker finishes what it holds, then returns."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleeps `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
