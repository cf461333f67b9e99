"""The policy registry: every policy is a pure callable Snapshot -> Decision, built by name.

The Central Controller, the simulator, `testbed balance` and the benchmarks all get their
policy here, so a name means the same rule everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from testbed.balancer.assign_u import AssignU
from testbed.balancer.snapshot import Decision, Snapshot
from testbed.balancer.stddev import StdDev
from testbed.balancer.workload_balance import WorkloadBalance
from testbed.errors import InputError

Policy = Callable[[Snapshot], Decision]


@dataclass(frozen=True)
class NoMigration:
    """`none`: never migrates (the thesis' "no migration" variants)."""

    def __call__(self, snap: Snapshot) -> Decision:
        return Decision()


POLICIES: dict[str, type] = {
    "assign-u": AssignU,
    "workload-balance": WorkloadBalance,
    "stddev": StdDev,
    "none": NoMigration,
}


def get_policy(name: str, **params: float) -> Policy:
    """The policy called `name` with its parameters (assign-u: base; workload-balance:
    threshold; stddev: trigger). Unknown names or parameters and bad values -> InputError."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise InputError(f"policy: unknown policy {name!r} (choose from {', '.join(POLICIES)})") from None
    accepted = set(inspect.signature(cls).parameters)
    for param in params:
        if param not in accepted:
            raise InputError(f"{param}: not a parameter of policy {name!r}")
    try:
        return cls(**params)
    except ValueError as err:
        raise InputError(str(err)) from None
