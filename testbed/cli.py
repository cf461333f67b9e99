"""`testbed` command line: a thin layer that parses arguments and hands off to the packages."""

from __future__ import annotations

import argparse
import importlib
import sys

from testbed import __version__
from testbed.commands import COMMAND_MODULES
from testbed.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"testbed {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"testbed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the commands clean up on the way out (finally blocks)
        print(f"testbed: {args.command} interrupted; what was recorded is kept "
              "(rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
