"""`testbed plot DIR [--out FIGDIR]`: regenerate every figure of a campaign from its CSV tables.

Needs no lab: it reads DIR/manifest.json and DIR/*.csv only. Writes NAME.png, NAME.svg and a
sidecar NAME.json (the runs drawn) per figure into FIGDIR (default DIR/figures) and prints one
line per figure.
"""

from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    data, plots, _ = import_analysis()
    figures = plots.plot_all(data.load(args.results), args.out)
    for figure in figures:
        print(f"{figure.files[0].with_suffix('')}.{{png,svg,json}}  {figure.kind}  ({len(figure.run_ids)} runs)")
    if not figures:
        print(f"{args.results}: no completed runs with status ok, no figures")
    return 0
