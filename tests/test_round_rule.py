"""The CC's round rule (testbed/manager/round_rule.py), and that the real CC and the simulator's
both follow it."""

from __future__ import annotations

import itertools
import time

import pytest

from testbed.balancer import Decision, Snapshot
from testbed.manager import round_rule
from testbed.manager.api import CcConfig, MigrateOrder
from testbed.manager.central import CentralController
from testbed.sim.calibration import Calibration
from testbed.sim.executor import Cluster, scenario
from testbed.sim.run import simulate

CLEAR = {"no_lcs": False, "paused": False, "in_flight": 0, "now": 100.0, "settle_until": 0.0}
MOVE = {"now": 1000.0, "migrated_at": float("-inf"), "cooldown": 60.0}


# -- the gate ------------------------------------------------------------------------------------


def test_a_clear_round_may_decide():
    assert round_rule.gate(**CLEAR) is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"no_lcs": True}, "no-lc"),
    ({"paused": True}, "paused"),
    ({"in_flight": 1}, "in-flight"),
    ({"settle_until": 100.5}, "settling"),
])
def test_each_gate_reason(change, reason):
    assert round_rule.gate(**CLEAR | change) == reason


def test_the_gate_reasons_apply_in_the_cc_order():
    everything = {"no_lcs": True, "paused": True, "in_flight": 1, "now": 0.0, "settle_until": 10.0}
    assert round_rule.gate(**everything) == "no-lc"
    assert round_rule.gate(**everything | {"no_lcs": False}) == "paused"
    assert round_rule.gate(**everything | {"no_lcs": False, "paused": False}) == "in-flight"


def test_settling_ends_exactly_one_interval_after_the_migration_ended():
    until = round_rule.settle_until(ended_at=50.0, interval=10.0)
    assert until == 60.0
    assert round_rule.gate(**CLEAR | {"now": 59.999, "settle_until": until}) == "settling"
    assert round_rule.gate(**CLEAR | {"now": 60.0, "settle_until": until}) is None


def test_concurrency_allows_more_flights_before_the_gate_closes():
    assert round_rule.gate(**CLEAR | {"in_flight": 2}, concurrency=3) is None
    assert round_rule.gate(**CLEAR | {"in_flight": 3}, concurrency=3) == "in-flight"


# -- the action ----------------------------------------------------------------------------------


def test_no_proposed_move_is_balanced_whatever_else_holds():
    assert round_rule.action(False, **MOVE | {"migrated_at": 999.0}, draining=True, dry_run=True) == "balanced"


def test_a_vm_never_moved_migrates():
    assert round_rule.action(True, **MOVE) == "migrate"


def test_the_cooldown_boundary():
    """Moved less than `cooldown` ago: refused; exactly `cooldown` ago: allowed."""
    assert round_rule.action(True, **MOVE | {"migrated_at": 1000.0 - 59.5}) == "cooldown"
    assert round_rule.action(True, **MOVE | {"migrated_at": 1000.0 - 60.0}) == "migrate"
    assert round_rule.action(True, **MOVE | {"migrated_at": 1000.0 - 60.5}) == "migrate"


def test_draining_overrides_the_cooldown_but_not_the_dry_run():
    recent = MOVE | {"migrated_at": 999.0}
    assert round_rule.action(True, **recent, draining=True) == "migrate"
    assert round_rule.action(True, **recent, draining=True, dry_run=True) == "dry-run"


def test_dry_run_logs_the_move_and_cooldown_comes_first():
    assert round_rule.action(True, **MOVE, dry_run=True) == "dry-run"
    assert round_rule.action(True, **MOVE | {"migrated_at": 999.0}, dry_run=True) == "cooldown"


def test_a_vm_still_migrating_is_refused_even_without_cooldown_or_with_a_drain():
    assert round_rule.action(True, **MOVE | {"cooldown": 0.0}, moving=True, draining=True) == "cooldown"


# -- both CCs call it ----------------------------------------------------------------------------


@pytest.fixture
def cc(tmp_path):
    cc = CentralController({}, CcConfig(interval=10.0, cooldown=60.0), tmp_path / "events.jsonl")
    yield cc
    cc.stop()


def test_the_real_cc_follows_the_rule(cc):
    assert cc.run_round()["action"] == "no-lc"
    assert cc._gate(no_lcs=False) is None
    cc.settle_until = time.monotonic() + 100.0
    assert cc._gate(no_lcs=False) == "settling"
    order = MigrateOrder(vm="vm1", source="a", dest="b")
    assert cc._action_for(order, draining=False) == "migrate"
    cc.migrated_at["vm1"] = time.time() - 30.0
    assert (cc._action_for(order, draining=False), cc._action_for(order, draining=True)) == ("cooldown", "migrate")
    assert cc._action_for(None, draining=False) == "balanced"


def test_the_real_cc_settles_for_one_interval_after_a_new_config(cc):
    """The window of the first round after a run's config must not hold the VMs' creation."""
    assert cc._gate(no_lcs=False) is None
    before = time.monotonic()
    cc.set_config(CcConfig(interval=5.0, cooldown=60.0, label="r1"))
    assert cc._gate(no_lcs=False) == "settling"
    assert before + 5.0 <= cc.settle_until <= time.monotonic() + 5.0
    cc.settle_until = time.monotonic() + 100.0  # a migration's settling is never cut short
    cc.set_config(CcConfig(interval=1.0, label="r2"))
    assert cc.settle_until > time.monotonic() + 90.0


def _scenario(policy: str | None, dry_run: bool = False):
    """The 7/1/1 start: assign-u moves VMs off PM1 unless told otherwise."""
    return scenario(pms=3, placement=[1] * 7 + [2, 3], app="synthetic1", instances=[2] * 9,
                    scales=[0.2] * 9, seeds=list(range(9)), start_s=[0.0] * 9, vcpus=[2] * 9, memory_mb=100, cal=Calibration(),
                    cluster=Cluster(), link_rate=None, policy=policy, params={}, mode="precopy",
                    interval_s=10.0, cooldown_s=60.0, dry_run=dry_run)


def test_the_simulator_without_a_policy_is_paused_and_in_dry_run_decides_but_moves_nothing():
    without = simulate(_scenario(None))
    assert set(without.rounds) == {"paused"} and not without.migrations
    dry = simulate(_scenario("assign-u", dry_run=True))
    assert not dry.migrations and dry.rounds.get("dry-run", 0) > 0
    assert set(dry.rounds) <= {"dry-run", "balanced"}


def _ping_pong(snap: Snapshot) -> Decision:
    """Always move vm1 to the next PM: only the cool-down keeps it from moving every round."""
    vm = snap.vm_index("vm1")
    return Decision(snap.migration(vm, (int(snap.vm_host[vm]) + 1) % len(snap.host_names)))


def test_the_simulator_starts_the_cooldown_at_the_end_of_a_migration():
    sc = _scenario(None)
    sc.policy, sc.horizon_s = _ping_pong, 300.0
    out = simulate(sc)
    moves = sorted(out.migrations, key=lambda f: f.start)
    assert len(moves) >= 3 and out.rounds["cooldown"] > 0
    for done, then in itertools.pairwise(moves):  # each order the first round a cool-down from the END allows
        waited = then.start - done.end_at
        assert sc.cooldown_s <= waited < sc.cooldown_s + sc.interval_s
