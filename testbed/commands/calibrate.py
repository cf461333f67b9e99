"""`testbed calibrate DIR... [--out FILE]`: fit the simulator's parameters from real campaigns (pooled)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit the simulator's parameters from a campaign's results", description=__doc__
    )
    parser.add_argument(
        "dirs",
        metavar="DIR",
        type=Path,
        nargs="+",
        help="results directories of real campaigns (pooled, e.g. Exp. 1 and Exp. 2)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        type=Path,
        default=None,
        help="calibration file to write (default: the first DIR/calibration.json)",
    )
    parser.add_argument(
        "--capacity", type=float, default=None, help="CPUs of each PM (default: the manifest's, else 0.6)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from testbed.calibrate import calibrate
    from testbed.results import read_manifest
    from testbed.sim.calibration import save_calibration

    for directory in args.dirs:
        if read_manifest(directory).get("simulated"):
            print(f"note: {directory} is SIMULATED; a calibration from it only checks the fit")
    cal = calibrate(args.dirs, capacity=args.capacity)
    out = args.out or args.dirs[0] / "calibration.json"
    save_calibration(cal, out)
    modes = ", ".join(
        f"{m} fixed {c.fixed_s:.3f} s / stop {c.stop_fixed_s:.3f} s" for m, c in cal.modes.items()
    )
    print(f"calibration for the simulator (mimics {cal.mimics}) -> {out}")
    print(
        f"  cpu per Synthetic1 block {cal.cpu_s_per_block:.3e} s; contention {cal.contention_cpus:.3f} CPUs;"
        f" link efficiency {cal.link_efficiency:.3f}; memory sent {100 * cal.memory_fraction:.0f} %"
    )
    print(f"  {modes}")
    print(f"  migration CPU overhead src {cal.cpu_overhead_src:.3f} / dst {cal.cpu_overhead_dst:.3f} CPUs")
    return 0
