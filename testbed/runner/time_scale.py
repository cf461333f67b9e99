"""The manager's times at a run's scale: how `balancer.time_scale` turns a spec's interval and
cool-down into the ones the Central Controller gets (the lab's runner and the simulator alike).

`--scale S` shrinks the work; without a time scale the CC's 10 s interval, 60 s cool-down and
one-interval settling stay, so at S = 0.1 a balancer round weighs ten times more against a VM's
run than in the thesis (issue #16). With `time_scale` ("auto" = the run's scale, or a factor) the
interval and the cool-down are multiplied by it, and settling follows (the CC settles one interval
after a migration). Scaling cannot shrink what does not scale, hence the floors:
- interval >= INTERVAL_FLOOR_S (2 s): an LC reads its counters once a second, so a 1 s window
  rests on one pair of readings and its sleep and HTTP jitter; two readings per window halve
  that, and stay above the CC's own minimum of 1 s. Never above MAX_WINDOW (what an LC keeps).
- cool-down >= max(interval, the time to copy the VM's memory over the PMs' link): a VM must not
  be moved again before it has run one round where it landed, nor sooner than one move of it
  takes: migration time depends on memory and link, which `scale` leaves as they are.
A floor never raises a time above the spec's own value (a spec's cool-down of 0 stays 0), and
with no time scale nothing changes, so campaigns recorded before the field keep their meaning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from testbed.manager import MAX_WINDOW
from testbed.spec import Spec

INTERVAL_FLOOR_S = 2.0


@dataclass(frozen=True)
class ManagerTimes:
    """The CC's effective times for one spec on one lab, and the bounds that shaped them.

    `floors` holds each bound in force (seconds); `floored` names the times a bound changed."""

    factor: float  # 1.0 when the spec has no time scale
    interval_s: float
    cooldown_s: float
    settling_s: float  # the CC settles one interval after each migration
    floors: dict[str, float]
    floored: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"floored": list(self.floored)}


def time_factor(spec: Spec) -> float | None:
    """The factor the spec asks for: None (unscaled), its scale ("auto"), or its number."""
    asked = spec.balancer.time_scale
    return spec.scale if asked == "auto" else asked


def copy_time_s(memory_mb: float, link_bps: float) -> float:
    """Seconds to send a VM's whole memory over a link: the length of a stop-and-copy, and of a
    pre-copy's first round."""
    return memory_mb * 2**20 * 8 / link_bps


def _bounded(base: float, scaled: float, low: float, high: float = float("inf")) -> float:
    """`scaled` kept within [low, high], but never moved past the spec's own `base` by a bound."""
    return min(max(scaled, min(low, base)), max(high, base))


def manager_times(spec: Spec, link_bps: float) -> ManagerTimes:
    """The interval, cool-down and settling the CC runs `spec` with on PMs linked at `link_bps`."""
    b = spec.balancer
    factor = time_factor(spec)
    if factor is None:
        return ManagerTimes(1.0, b.interval_s, b.cooldown_s, b.interval_s, {}, ())
    interval = _bounded(b.interval_s, b.interval_s * factor, INTERVAL_FLOOR_S, MAX_WINDOW)
    cooldown_floor = max(interval, copy_time_s(spec.memory_mb, link_bps))
    cooldown = _bounded(b.cooldown_s, b.cooldown_s * factor, cooldown_floor)
    floored = tuple(name for name, got, plain in (("interval_s", interval, b.interval_s * factor),
                                                  ("cooldown_s", cooldown, b.cooldown_s * factor))
                    if got != plain)
    floors = {"interval_s": INTERVAL_FLOOR_S, "interval_s_max": MAX_WINDOW, "cooldown_s": cooldown_floor}
    return ManagerTimes(factor, interval, cooldown, interval, floors, floored)
