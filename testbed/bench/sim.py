"""`testbed bench sim`: wall time of one simulated hour at 1,000 PMs x 3,000 VMs (SIMULATED).

The scenario is the scale study's hardest: Synthetic-Random in every VM at `--scale` 10 (each
Synthetic1 ~90 CPU-s, each sleep 300 s, so VMs stay busy for most of the hour), all VMs on the
first third of the PMs, Assign-U balancing with pre-copy every 10 s. The figure is the median
wall time of `--repeats` runs, on one core (numpy single-threaded), with the events processed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

from testbed.errors import InputError

#: (flag, attribute, least, most) of the float options: an interval of 0 or an infinite horizon never ends,
#: a horizon of 0 divides by zero, and the interval's floor is the CC's (as a spec's interval_s).
FLOAT_RANGES = (("--hours", "hours", 0.0, 1000.0), ("--interval", "interval", 1.0, 3600.0),
                ("--scale", "scale", 0.0, 100.0))


def check(args: argparse.Namespace) -> None:
    """Refuse options the simulation cannot run (or finish), before it starts."""
    for flag, value in (("--pms", args.pms), ("--vms", args.vms), ("--repeats", args.repeats)):
        if value < 1:
            raise InputError(f"{flag}: must be >= 1, not {value}")
    for flag, name, least, most in FLOAT_RANGES:
        value = getattr(args, name)
        if not (math.isfinite(value) and least <= value <= most and value > 0):
            low = "> 0" if least == 0 else f">= {least:g}"
            raise InputError(f"{flag}: must be {low} and <= {most:g}, not {value:g}")


def run(args: argparse.Namespace) -> int:
    check(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from testbed.sim.calibration import Calibration
    from testbed.sim.executor import Cluster, scenario
    from testbed.sim.run import simulate

    cal = Calibration()
    loaded = max(1, args.pms // 3)
    placement = [1 + k % loaded for k in range(args.vms)]
    walls, last = [], None
    for rep in range(args.repeats):
        sc = scenario(
            pms=args.pms,
            placement=placement,
            app="synthetic-random",
            instances=[1] * args.vms,
            scales=[args.scale] * args.vms,
            seeds=[rep * 100_003 + k for k in range(args.vms)],
            start_s=[0.0] * args.vms,
            vcpus=[2] * args.vms,
            memory_mb=100,
            cal=cal,
            cluster=Cluster(),
            link_rate=None,
            policy="assign-u",
            params={},
            mode="precopy",
            interval_s=args.interval,
            cooldown_s=60.0,
            horizon_s=args.hours * 3600,
            record_cpu=False,
        )
        last = simulate(sc)
        walls.append(last.wall_s)
    assert last is not None
    print(
        f"SIMULATED bench: {args.pms} PMs x {args.vms} VMs, {args.hours:g} simulated h at a "
        f"{args.interval:g} s interval (Synthetic-Random x{args.scale:g}, Assign-U, pre-copy)"
    )
    print(
        f"  wall time per simulated hour: median {statistics.median(walls) / args.hours:.2f} s "
        f"(runs: {', '.join(f'{w:.2f}' for w in walls)} s); target < 60 s"
    )
    print(
        f"  last run: {last.events} events, {len(last.migrations)} migrations, "
        f"{int((last.vm_end != last.vm_end).sum())} VMs still running at the end"
    )
    return 0
