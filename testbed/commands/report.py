"""`testbed report DIR [--out FILE]`: one self-contained HTML page for a campaign: its figures,
mean / std / 95 % CI per variant, with-vs-without migration changes with Welch's test, and the
lab facts of the manifest. Needs no lab; also (re)writes the figures into DIR/figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.commands.plot import file_errors, import_analysis
from testbed.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write an HTML report of a results directory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", metavar="DIR", help="a campaign's results directory")
    parser.add_argument("--out", metavar="FILE", default=None, help="the page (default DIR/report.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _, _, report = import_analysis()
    if args.out is not None and Path(args.out).is_dir():
        raise InputError(f"--out {args.out}: is a directory (name the page's file)")
    with file_errors():
        print(report.write_report(args.results, args.out))
    return 0
