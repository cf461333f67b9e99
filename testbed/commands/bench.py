"""`testbed bench balancer|migration`: benchmarks that print their figures (never timed tests)."""

from __future__ import annotations

import argparse

from testbed.techniques import BENCHED


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print measured figures")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="KIND")

    balancer = kinds.add_parser("balancer", help="decision time of each policy vs the thesis' triple loop")
    balancer.add_argument("--hosts", type=int, default=10_000)
    balancer.add_argument("--vms", type=int, default=100_000)
    balancer.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is printed")
    balancer.add_argument("--seed", type=int, default=1)
    balancer.set_defaults(func=_run_balancer)

    migration = kinds.add_parser("migration", help="migrate one VM PM1 -> PM2 on the embedded lab")
    migration.add_argument("--technique", choices=BENCHED, default=BENCHED[0])
    migration.add_argument("--mode", choices=["precopy", "stopcopy", "postcopy"], default="precopy")
    migration.add_argument("--rate", default="100mbit", help="link rate, tc syntax (e.g. 100mbit)")
    migration.add_argument("--memory", type=int, default=128, help="guest memory, MB")
    migration.add_argument("--dirty-mbps", type=float, default=0.0, help="memory dirtied per second, MB")
    migration.add_argument("--compress", choices=["none", "bzip2", "zstd"], default="none")
    migration.add_argument("--verify-memory", action="store_true",
                           help="QEMU: compare source and destination RAM page by page after each migration")
    migration.add_argument("--migrations", type=int, default=1, metavar="N",
                           help="QEMU: migrate N times, back and forth between PM1 and PM2 (default 1)")
    migration.add_argument("-i", "--inventory", default=None, help="lab inventory (default: inventory/local)")
    migration.set_defaults(func=_run_migration)

    sim = kinds.add_parser("sim", help="wall time of a simulated hour, 1,000 PMs x 3,000 VMs (SIMULATED)")
    sim.add_argument("--pms", type=int, default=1_000)
    sim.add_argument("--vms", type=int, default=3_000)
    sim.add_argument("--hours", type=float, default=1.0, help="simulated hours per run")
    sim.add_argument("--interval", type=float, default=10.0, help="the CC's interval, simulated seconds")
    sim.add_argument("--scale", type=float, default=10.0, help="Synthetic-Random work multiplier")
    sim.add_argument("--repeats", type=int, default=3, help="runs; the median is printed")
    sim.set_defaults(func=_run_sim)


def _run_balancer(args: argparse.Namespace) -> int:
    from testbed.bench.balancer import run

    return run(args)


def _run_migration(args: argparse.Namespace) -> int:
    from testbed.techniques import technique

    return technique(args.technique).run_bench(args)


def _run_sim(args: argparse.Namespace) -> int:
    from testbed.bench.sim import run

    return run(args)
