"""The HTTP processes' server: uvicorn's, with a main loop that does not wake ten times a second.

uvicorn's `Server.main_loop` sleeps 0.1 s between ticks; a tick refreshes the `date` header
once a second (every tenth tick), checks the request limit and whether a signal asked it to
stop. An idle API or gateway would wake ten times a second to do nothing nine times out of
ten (docs/adr/0011-development-broker.md: the idle platform's budget).

Guarantees:
- A tick every `TICK` (1 s): the `date` header is refreshed at every tick, so it is as fresh
  as uvicorn's own (once a second).
- A stop is not delayed by the longer tick: SIGTERM and SIGINT (uvicorn's `handle_exit`) also
  wake the loop at once, so a graceful shutdown starts as soon as the signal arrives. Setting
  `should_exit` by hand (no signal) is seen at the next tick, within `TICK`.
- Everything else is uvicorn's: the same `Config`, signals, shutdown and `on_tick`; `serve`
  ends as `uvicorn.run` does (status 3 when the server never started).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn

# One tick a second. uvicorn's on_tick refreshes the date header when counter % 10 == 0, so the
# counter advances by 10 per tick.
TICK = 1.0
_COUNTS_PER_TICK = 10


class Server(uvicorn.Server):
    """`uvicorn.Server` whose main loop ticks once a second and wakes at once on a signal."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self.should_exit:  # a signal came before the loop existed
            self._wake.set()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + _COUNTS_PER_TICK) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs between two bytecodes of the loop's thread: hand the wake-up
        # to the loop rather than touching the event from here.
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)


# uvicorn.run's exit status when the server did not start (its port taken, say).
STARTUP_FAILURE = 3


def serve(config: uvicorn.Config) -> None:
    """Runs the app as `uvicorn.run` does for one process without reload, on `Server`: a
    Ctrl-C ends it quietly, and a server that never started exits with status 3."""
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
