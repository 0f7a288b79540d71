"""The ``pyswitch`` command line. Until the training issue lands, ``pyswitch bench`` is the only
working subcommand; ``train``, ``eval`` and ``generate`` say so and exit with status 2."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyswitch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information")
    for name in ("train", "eval", "generate", "bench"):
        sub.add_parser(name, help=f"{name} (not available in this version)")
    args = parser.parse_args(argv)
    if args.command == "info":
        import json

        import pyswitch

        print(json.dumps(pyswitch.build_info(), indent=2))
        return 0
    print(
        f"pyswitch {args.command}: not implemented yet in this version; "
        "see README.md (run benchmarks/bench_router.py for the router benchmark)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
