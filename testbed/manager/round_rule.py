"""The CC's round rule, once: what a balancing round may do, for the real Central Controller
(testbed/manager/central.py) and the simulator's (testbed/sim/run.py) alike.

Pure: no I/O, no clock read here. Every time is passed in, in whatever clock the caller keeps
(the real CC: monotonic for settling, Unix time for cool-downs, which it restores from its event
log; the simulator: simulated seconds), so the same rule runs on wall and on simulated time.

A round first asks `gate` whether it may decide at all; if it may, the policy (or a drain)
proposes at most one move and `action` says what becomes of it.

The two copies this replaced had diverged; the real CC's behaviour is the truth unless the
feature exists only in the simulator:
- when a VM's cool-down clock starts: the CC at the end of the migration (as its event log
  records it), the simulator at the order and again at the end. Resolved: at the end. The
  simulator's order-time stamp never changed a decision (a VM in flight is refused on its own,
  see `moving`), so nothing it simulates changes.
- migrations at once: the CC one (`in_flight` is an order or None), the simulator
  `concurrency`. Simulator-only, kept as `gate`'s `concurrency` (default 1, the thesis') and as
  `action`'s `moving` (a proposed VM that is still migrating is refused as `cooldown` whatever the
  cool-down's length: it is being moved now, and a second order for it would be an error).
- no policy: the simulator's `policy=None` counted every round `dry-run` without asking
  anything, before the in-flight and settling checks; the CC's `dry-run` means "decided, logged,
  not sent", and its runner runs a variant without migration as a dry-run with its policy.
  Resolved: the simulator has a `dry_run` like the CC's (its executor now uses it for variants
  without migration, as the lab's runner does), and `policy=None` (the scale study's `none`:
  nothing decides) is the CC's `paused`, in the CC's order.
- drain: the CC's (drained PMs, cool-down ignored); the simulator has no operator, so it passes
  `draining=False`.
- `no-lc` and `paused` gates: CC only until now; the simulator never lacks PMs.
- settling: the same rule (one interval after a migration ends) in both; the simulator kept the
  latest end over concurrent flights, the CC the last outcome it received (the same thing at
  concurrency 1). Both now compute it with `settle_until`.
The cool-down boundary was already the same: a VM moved exactly `cooldown` seconds ago may move.
"""

from __future__ import annotations

from typing import Literal

Gate = Literal["no-lc", "paused", "in-flight", "settling"]
Action = Literal["balanced", "cooldown", "dry-run", "migrate"]


def gate(*, no_lcs: bool, paused: bool, in_flight: int, now: float, settle_until: float,
         concurrency: int = 1) -> Gate | None:
    """Why this round may not decide at all, or None if it may.

    In this order (the first that holds is logged): no LC answered (nothing to decide on);
    paused by the operator (collect and log only); `concurrency` migrations already in flight
    (the thesis moves one VM at a time); or `now` is before `settle_until`, i.e. within one
    interval after a migration ended, while the samples' window still mixes the loads from before
    the move (deciding on them would move a second VM for nothing)."""
    if no_lcs:
        return "no-lc"
    if paused:
        return "paused"
    if in_flight >= concurrency:
        return "in-flight"
    if now < settle_until:
        return "settling"
    return None


def settle_until(ended_at: float, interval: float) -> float:
    """When rounds may decide again after a migration that ended at `ended_at`: one interval
    later, when every sample of the window was taken after the move."""
    return ended_at + interval


def action(proposed: bool, *, now: float, migrated_at: float, cooldown: float,
           draining: bool = False, dry_run: bool = False, moving: bool = False) -> Action:
    """What the round does with the move it was proposed (`proposed`), if any.

    `migrated_at` is when the VM's last migration ended, successful or not (-inf: never), in
    the clock of `now`. A VM still migrating (`moving`, only with concurrency > 1) is refused.
    A VM moved less than `cooldown` ago is not moved again (no ping-pong between two hosts, no
    retry storm after a failure); exactly `cooldown` ago it may. A drain ignores the cool-down:
    it is the operator's order, and a stranded VM must leave whatever it did recently. A dry run
    logs the move as it would be ordered and never sends it."""
    if not proposed:
        return "balanced"
    if moving:
        return "cooldown"
    if now - migrated_at < cooldown and not draining:
        return "cooldown"
    return "dry-run" if dry_run else "migrate"
