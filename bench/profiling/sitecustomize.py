"""A profiling switch for the stack `bench.calls` starts, and nothing else.

`bench.calls` puts this folder first on PYTHONPATH and sets GOZON_BENCH_PROFILE_DIR for the
stack it starts, so every Python process of it imports this module at start-up (Python's
`site` imports `sitecustomize`). Then SIGUSR2 starts a deterministic profile (cProfile) of
the process's main thread (its event loop), and the next SIGUSR2 stops it and writes it to
`$GOZON_BENCH_PROFILE_DIR/<pid>.prof` (under another name first, so that it is whole when it
appears). Without the variable it installs nothing. The interpreter's own `sitecustomize`
(Debian ships one), which this module hides, still runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _chain() -> None:
    """Runs the `sitecustomize` this one hides (the next one on sys.path), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _install(folder: str) -> None:
    import cProfile
    import signal
    from types import FrameType

    state: dict[str, cProfile.Profile] = {}

    def toggle(signum: int, frame: FrameType | None) -> None:
        profile = state.pop("on", None)
        if profile is None:
            state["on"] = profile = cProfile.Profile()
            profile.enable()
            return
        profile.disable()
        path = os.path.join(folder, f"{os.getpid()}.prof")
        profile.dump_stats(path + ".part")
        os.replace(path + ".part", path)  # whole when it appears

    signal.signal(signal.SIGUSR2, toggle)


_chain()
if _folder := os.environ.get("GOZON_BENCH_PROFILE_DIR"):
    _install(_folder)
