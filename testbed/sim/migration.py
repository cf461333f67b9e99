"""How long a simulated migration takes, how long the VM stops and how many bytes it sends, per mode.

Every mode moves V = memory x memory_fraction (the pages that are not zero: QEMU sends a zero page
as a header only; a container's dump holds its private memory), not the VM's whole memory size.
* stop-and-copy (OpenVZ, App. A): the VM stops first; the dump (V) crosses the link;
  downtime = total = fixed + V / rate.
* pre-copy (Xen, QEMU; Clark et al., NSDI 2005): with lambda = dirty rate / rate, live round i
  sends V lambda^i (round 0 the whole memory V); after n live rounds the remaining dirty set
  V lambda^n is sent with the VM stopped. n is the least n >= 1 with V lambda^n / rate <=
  downtime limit, capped at max_rounds (lambda >= 1 never converges: the cap decides, and a
  round never sends more than V). In all, V (1 - lambda^(n+1)) / (1 - lambda) bytes, and
  downtime = stop_fixed + V lambda^n / rate. Not CloudSim's constant RAM / (bandwidth / 2).
* post-copy: the VM stops only for stop_fixed, resumes at the destination and fetches its
  memory (V bytes) meanwhile, running at `postcopy_speed` until the last page arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from testbed.sim.calibration import Calibration


@dataclass(frozen=True)
class Plan:
    mode: str
    total_s: float
    downtime_s: float
    live_s: float  # seconds from the order to the stop, the VM running at the source
    bytes: int
    rounds: int  # live pre-copy rounds (0 for the other modes)


def precopy_rounds(memory: float, dirty: float, rate: float, limit_s: float, max_rounds: int) -> int:
    """Live rounds before the stop: least n >= 1 with memory lambda^n / rate <= limit_s, capped."""
    lam = dirty / rate
    if memory / rate <= limit_s or lam <= 0:
        return 1
    if lam >= 1:
        return max_rounds
    n = math.ceil(math.log(limit_s * rate / memory) / math.log(lam) - 1e-12)
    return min(max(n, 1), max_rounds)


def plan(mode: str, memory_bytes: float, dirty_bytes_s: float, rate_bytes_s: float, cal: Calibration) -> Plan:
    """The migration of a VM of `memory_bytes` dirtying `dirty_bytes_s`, over `rate_bytes_s`."""
    costs = cal.modes[mode]  # type: ignore[index]
    v, r = float(memory_bytes) * cal.memory_fraction, float(rate_bytes_s)
    if mode == "stopcopy":
        total = costs.fixed_s + v / r
        return Plan(mode, total, total, 0.0, round(v), 0)
    if mode == "postcopy":
        total = costs.fixed_s + v / r
        return Plan(mode, total, costs.stop_fixed_s, costs.fixed_s - costs.stop_fixed_s, round(v), 0)
    n = precopy_rounds(v, dirty_bytes_s, r, cal.downtime_limit_s, cal.max_rounds)
    lam = min(dirty_bytes_s / r, 1.0)
    live_bytes = v * n if lam == 1.0 else v * (1 - lam**n) / (1 - lam)
    final = v * lam**n
    downtime = costs.stop_fixed_s + final / r
    total = costs.fixed_s + (live_bytes + final) / r
    return Plan(mode, total, downtime, total - downtime, round(live_bytes + final), n)
