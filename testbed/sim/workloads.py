"""The thesis' workloads as simulated chains of steps, from the same definitions the lab runs.

Synthetic1 (§4.4) is one thread doing `blocks` blocks of CPU work: blocks x cpu_s_per_block
CPU-seconds (the calibration's figure). Synthetic-Random takes its 5 seeded draws from
workloads/synthetic_random.py itself (loaded as the lab executor loads it), so a VM with the
same seed does the same work in the lab and here: one, two or four Synthetic1 at once, or a
30 s sleep, per draw. `scale` shortens both as `testbed run --scale` does.
"""

from __future__ import annotations

from testbed.sim.calibration import Calibration
from testbed.sim.engine import Step

SYNTHETIC1_BLOCKS = 18_000
APPS = ("synthetic1", "synthetic-random", "idle")


def vm_chains(app: str, instances: int, scale: float, seed: int, cal: Calibration) -> list[list[Step]]:
    """One chain per app instance (instance k of Synthetic-Random uses seed + k, as in the lab)."""
    work = max(1, round(SYNTHETIC1_BLOCKS * scale)) * cal.cpu_s_per_block
    if app == "synthetic1":
        return [[Step(1, work)] for _ in range(instances)]
    if app == "idle":
        return []
    if app != "synthetic-random":
        raise ValueError(f"app {app!r} has no simulated profile (simulated: {', '.join(APPS)})")
    from testbed.runner.executor import _synthetic_random

    sr = _synthetic_random()
    chains = []
    for k in range(instances):
        steps = []
        for r in sr.draws(seed + k):
            count = sr.instances_for(r)
            steps.append(Step(count, work) if count else Step(0, sr.SLEEP_S * scale))
        chains.append(steps)
    return chains
