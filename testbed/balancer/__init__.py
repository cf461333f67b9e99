"""Pure balancing decisions (no I/O): a Snapshot in, a Decision out. See docs/balancer.md."""

from testbed.balancer.policies import POLICIES, Policy, get_policy
from testbed.balancer.snapshot import Decision, Migration, Snapshot

__all__ = ["POLICIES", "Decision", "Migration", "Policy", "Snapshot", "get_policy"]
