"""`testbed plot DIR [--out FIGDIR]`: regenerate every figure of a campaign from its CSV tables.

Needs no lab: it reads DIR/manifest.json and DIR/*.csv only. Writes NAME.png, NAME.svg and a
sidecar NAME.json (the runs drawn) per figure into FIGDIR (default DIR/figures) and prints one
line per figure.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testbed.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plot", help="regenerate every figure from a results directory",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", metavar="DIR", help="a campaign's results directory")
    parser.add_argument("--out", metavar="FIGDIR", default=None, help="where figures go (default DIR/figures)")
    parser.set_defaults(func=run)


def import_analysis():
    """The analysis modules, or a one-line error when the [analysis] extra is not installed."""
    try:
        from testbed.analysis import data, plots, report
    except ImportError as err:
        raise InputError(f"{err.name} is missing: install the analysis extra (pip install 'testbed[analysis]')") from None
    return data, plots, report


@contextmanager
def file_errors() -> Iterator[None]:
    """A file that cannot be read or written (permissions, a full disk, a file where a directory
    belongs) is one line naming it, not a traceback."""
    try:
        yield
    except OSError as err:
        raise InputError(f"{err.filename or 'output'}: {err.strerror or err}") from None


def run(args: argparse.Namespace) -> int:
    data, plots, _ = import_analysis()
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out}: not a directory")
    with file_errors():
        figures = plots.plot_all(data.load(args.results), args.out)
    for figure in figures:
        print(f"{figure.files[0].with_suffix('')}.{{png,svg,json}}  {figure.kind}  ({len(figure.run_ids)} runs)")
    if not figures:
        print(f"{args.results}: no completed runs with status ok, no figures")
    return 0
