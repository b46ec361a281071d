"""Crash-loop back-off: a worker that keeps crashing soon after it starts waits longer each
time before it starts its work again, and says so in its metrics.

`make up`'s supervisord restarts a process that ran longer than its `startsecs` at once, for
ever: a process that crashes on the same input (a message, a row) after a few seconds is
restarted into the same crash as fast as it can start, and nothing counts it. (Docker's restart
policy and the kubelet's CrashLoopBackOff do back off; this makes every supervisor do so.)

With `GOZON_CRASH_STATE_DIR` set, a worker remembers its crashes in
`<dir>/<process>.json`: how many in a row (a crash counts as "in a row" when the process had
run less than `HEALTHY_AFTER_S` since its start), and the last one's time and error. At start
it waits `backoff_s(crashes)` — 1 s, doubling, at most `MAX_BACKOFF_S` — before its work
(live and not ready meanwhile, its `/metrics` served), logs why, and exports
`gozon_process_crashes_in_a_row` (0 again once it has run `HEALTHY_AFTER_S`) and
`gozon_process_restart_backoff_seconds`. A clean stop forgets the crashes. Without the
setting nothing is remembered (each start is a first one).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Gauge

HEALTHY_AFTER_S = 300.0
BASE_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0

CRASHES_IN_A_ROW = Gauge(
    "gozon_process_crashes_in_a_row",
    "Crashes in a row before this start, each within HEALTHY_AFTER_S (300 s) of its start; "
    "0 once the process has run that long (GOZON_CRASH_STATE_DIR unset: always 0).",
)
RESTART_BACKOFF = Gauge(
    "gozon_process_restart_backoff_seconds",
    "How long this start waited before its work, because of the crashes in a row before it.",
)


def backoff_s(crashes: int) -> float:
    """The wait before starting after `crashes` crashes in a row: 0, then 1 s doubling, capped."""
    if crashes <= 0:
        return 0.0
    return float(min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (crashes - 1)))


@dataclass
class CrashMemory:
    """One process's crashes, read at its start (`load`) and written when it ends."""

    path: Path | None
    crashes: int = 0  # in a row, before this start
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def load(cls, directory: Path | None, process: str) -> CrashMemory:
        if directory is None:
            memory = cls(None)
        else:
            path = directory / f"{process}.json"
            try:
                state = json.loads(path.read_text())
                memory = cls(path, int(state["crashes"]), str(state.get("last_error") or ""))
            except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable
                memory = cls(path)
        CRASHES_IN_A_ROW.set_function(memory._in_a_row_now)
        RESTART_BACKOFF.set(memory.backoff_s)
        return memory

    @property
    def backoff_s(self) -> float:
        return backoff_s(self.crashes)

    def _in_a_row_now(self) -> float:
        return 0.0 if self.uptime_s() >= HEALTHY_AFTER_S else float(self.crashes)

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def crashed(self, error: BaseException) -> None:
        """Records this run's crash: one more in a row, or the first after a healthy run."""
        if self.path is None:
            return
        crashes = self.crashes + 1 if self.uptime_s() < HEALTHY_AFTER_S else 1
        state = {
            "crashes": crashes,
            "last_at": datetime.now(UTC).isoformat(),
            "last_error": " ".join(repr(error).split())[:1000],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(state))
        except OSError:  # best effort: a crash must not be hidden by its bookkeeping
            pass

    def stopped_cleanly(self) -> None:
        """A clean stop: the next start is a first one."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
