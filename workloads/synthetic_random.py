#!/usr/bin/env python3
"""Synthetic-Random (thesis §4.4): irregular CPU use from a seeded sequence of 5 draws.

usage: synthetic_random.py SEED [--scale S] [--synthetic1 PATH]

Each draw r in [0, 100]: r < 20 runs one Synthetic1, r < 40 two, r < 50 four (at once, waiting
for all), otherwise it sleeps 30 s. `--scale` shortens (or lengthens) both: Synthetic1 gets
round(18000 * S) blocks and the sleep lasts 30 * S s. The Synthetic1 binary is --synthetic1, else
$SYNTHETIC1, else `synthetic1` on PATH. Prints one line per draw (flushed, so a host reading the
console sees progress) and exits non-zero if any Synthetic1 failed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

DRAWS = 5
BLOCKS = 18_000  # Synthetic1's full run (thesis §4.4)
SLEEP_S = 30.0


def instances_for(r: int) -> int:
    """How many Synthetic1 run at once for draw r (0 means the 30 s sleep)."""
    if r < 20:
        return 1
    if r < 40:
        return 2
    if r < 50:
        return 4
    return 0


def draws(seed: int) -> list[int]:
    """The seed's 5 draws: the same seed gives the same work on every host and Python 3."""
    rng = random.Random(seed)
    return [rng.randint(0, 100) for _ in range(DRAWS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed", type=int)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--synthetic1", default=os.environ.get("SYNTHETIC1", "synthetic1"))
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error("--scale must be > 0")
    blocks = str(max(1, round(BLOCKS * args.scale)))
    failed = 0
    for k, r in enumerate(draws(args.seed), start=1):
        count = instances_for(r)
        began = time.monotonic()
        if count:
            try:
                procs = [subprocess.Popen([args.synthetic1, blocks], stdout=subprocess.DEVNULL)
                         for _ in range(count)]
            except OSError as err:
                print(f"synthetic_random: {args.synthetic1}: {err.strerror}", file=sys.stderr)
                return 2
            failed += sum(1 for p in procs if p.wait() != 0)
        else:
            time.sleep(SLEEP_S * args.scale)
        what = f"{count} synthetic1" if count else f"sleep {SLEEP_S * args.scale:g} s"
        print(f"draw {k} r={r} {what} {time.monotonic() - began:.2f} s", flush=True)
    print(f"done {DRAWS} draws, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
