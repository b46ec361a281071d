"""`gozon …`: the only place that picks a process to run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gozon import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gozon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gozon {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
