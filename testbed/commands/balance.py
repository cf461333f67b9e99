"""`testbed balance SNAPSHOT.json [--policy P] [--base A]`: one balancing decision as JSON.

Output (a contract other tools parse): {"balanced": true, "migration": null} or
{"balanced": false, "migration": {"vm": ..., "source": ..., "destination": ...}}, exit 0.
Bad input: one line `testbed: error: <field>: <problem>` on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math

from testbed.balancer import POLICIES, get_policy
from testbed.balancer.assign_u import DEFAULT_BASE, threshold_points
from testbed.balancer.io import load_snapshot
from testbed.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "balance",
        help="decide one migration (or none) for a load snapshot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("snapshot", metavar="SNAPSHOT.json", help="hosts and VMs with their CPU use")
    parser.add_argument("--policy", choices=list(POLICIES), default="assign-u")
    parser.add_argument(
        "--base",
        metavar="A",
        default=None,
        help=f"Assign-U base a > 1 (default {DEFAULT_BASE:.4f}: a VM moves past a "
        f"{threshold_points(DEFAULT_BASE):.0f}-point load gap); used by assign-u only",
    )
    parser.set_defaults(func=run)


def parse_base(text: str) -> float:
    try:
        base = float(text)
    except ValueError:
        raise InputError(f"--base: not a number: {text!r}") from None
    if not (math.isfinite(base) and base > 1.0):
        raise InputError(f"--base: must be a finite number greater than 1, got {text}")
    return base


def run(args: argparse.Namespace) -> int:
    params = {}
    if args.base is not None:
        base = parse_base(args.base)
        if args.policy == "assign-u":
            params["base"] = base
    policy = get_policy(args.policy, **params)
    decision = policy(load_snapshot(args.snapshot))
    print(json.dumps(decision.to_json()))
    return 0
