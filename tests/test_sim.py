"""The simulator's model: fair-share CPU, migration formulas, invariants of whole runs, the driver."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.balancer import get_policy
from testbed.drivers.base import Host, MigrationMode, VMSpec
from testbed.drivers.sim import SimDriver
from testbed.sim.calibration import Calibration, ModeCosts
from testbed.sim.engine import water_fill
from testbed.sim.executor import Cluster, scenario
from testbed.sim.migration import plan, precopy_rounds
from testbed.sim.run import simulate

CAL = Calibration()


# -- CPU sharing ---------------------------------------------------------------------------------


def test_water_fill_hand_cases():
    cap = np.array([0.6, 0.6])
    assert water_fill(np.array([0.3, 0.3, 0.3]), np.array([0, 0, 0]), cap) == pytest.approx([0.2, 0.2, 0.2])
    assert water_fill(np.array([0.1, 0.3, 0.3]), np.array([0, 0, 0]), cap) == pytest.approx([0.1, 0.25, 0.25])
    # a lone VM keeps its cap (the PM has headroom), and PMs do not share
    assert water_fill(np.array([0.3, 0.3, 0.3]), np.array([1, 0, 0]), cap) == pytest.approx([0.3, 0.3, 0.3])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 2), st.integers(0, 3)), min_size=1, max_size=30),
    st.lists(st.floats(0, 3), min_size=4, max_size=4),
)
def test_water_fill_is_max_min_fair(members, caps):
    demand = np.array([d for d, _ in members])
    group = np.array([g for _, g in members])
    cap = np.array(caps)
    got = water_fill(demand, group, cap)
    assert np.all(got <= demand + 1e-9) and np.all(got >= -1e-12)
    for g in range(4):
        mine = group == g
        used = got[mine].sum()
        assert used <= cap[g] + 1e-9
        if demand[mine].sum() > cap[g] + 1e-9:  # saturated: all capacity given, short VMs get the most
            assert used == pytest.approx(cap[g])
            short = mine & (got < demand - 1e-9)
            assert np.all(got[short][:, None] >= got[mine][None, :] - 1e-9)
        else:  # within the 1e-9 the branch allows: demand 1e-9 on a 0-CPU PM gets 0
            assert got[mine] == pytest.approx(demand[mine], abs=1e-9)


# -- migration formulas ----------------------------------------------------------------------------


def test_precopy_against_hand_computed_case():
    """V = 100 MB, rate 10 MB/s, dirty 2 MB/s (lambda 0.2), limit 0.3 s: 10 x 0.2^n <= 0.3 -> n = 3;
    bytes 100 (1 - 0.2^4) / 0.8 = 124.8 MB; downtime 0.043 + 0.8 / 10 = 0.123 s; total 0.5 + 12.48 s."""
    p = plan("precopy", 100e6, 2e6, 10e6, CAL)
    assert p.rounds == 3
    assert p.bytes == pytest.approx(124.8e6)
    assert p.downtime_s == pytest.approx(0.043 + 0.08)
    assert p.total_s == pytest.approx(0.5 + 12.48)
    assert p.live_s == pytest.approx(p.total_s - p.downtime_s)


def test_precopy_that_cannot_converge_stops_at_the_round_cap():
    p = plan("precopy", 100e6, 20e6, 10e6, CAL)  # lambda 2: each round resends all memory
    assert p.rounds == CAL.max_rounds
    assert p.bytes == pytest.approx(100e6 * (CAL.max_rounds + 1))
    assert p.downtime_s == pytest.approx(0.043 + 10.0)


def test_stopcopy_downtime_is_total_and_postcopy_stops_briefly():
    s = plan("stopcopy", 100e6, 5e6, 10e6, CAL)
    assert s.downtime_s == s.total_s == pytest.approx(0.1 + 10.0)
    p = plan("postcopy", 100e6, 5e6, 10e6, CAL)
    assert p.downtime_s == pytest.approx(0.043) and p.total_s == pytest.approx(0.5 + 10.0)


def test_every_mode_moves_only_the_memory_fraction():
    """QEMU sends a zero page as a header: a 100 MB guest with 60 % non-zero memory moves 60 MB."""
    cal = CAL.model_copy(update={"memory_fraction": 0.6})
    for mode in ("stopcopy", "postcopy"):
        assert plan(mode, 100e6, 0.0, 10e6, cal).bytes == 60_000_000
    idle = plan("precopy", 100e6, 0.0, 10e6, cal)
    assert idle.bytes == 60_000_000 and idle.total_s == pytest.approx(0.5 + 6.0)
    busy = plan("precopy", 100e6, 1e6, 10e6, cal)  # lambda 0.1: 60 MB, then 6 MB dirtied meanwhile...
    assert busy.rounds == 2 and busy.bytes == pytest.approx(60e6 * (1 + 0.1 + 0.01), abs=1)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["precopy", "stopcopy", "postcopy"]),
    st.floats(1e6, 1e10),
    st.floats(0, 1e9),
    st.floats(1e5, 1e10),
)
def test_downtime_never_exceeds_total(mode, memory, dirty, rate):
    p = plan(mode, memory, dirty, rate, CAL)
    assert 0 <= p.downtime_s <= p.total_s + 1e-9
    assert p.bytes >= memory * CAL.memory_fraction - 1
    assert 1 <= precopy_rounds(memory, dirty, rate, CAL.downtime_limit_s, CAL.max_rounds) <= CAL.max_rounds


def test_a_downtime_longer_than_the_fixed_cost_is_refused():
    with pytest.raises(ValueError, match="stop_fixed_s"):
        ModeCosts(fixed_s=0.1, stop_fixed_s=0.2)


# -- whole runs ----------------------------------------------------------------------------------------


def _unbalanced(mode: str, app: str = "synthetic1", policy: str | None = "assign-u", scale: float = 0.2):
    return scenario(
        pms=3,
        placement=[1] * 7 + [2, 3],
        app=app,
        instances=[2] * 9,
        scales=[scale] * 9,
        seeds=list(range(9)),
        start_s=[0.0] * 9,
        vcpus=[2] * 9,
        memory_mb=100,
        cal=CAL,
        cluster=Cluster(),
        link_rate=None,
        policy=policy,
        params={},
        mode=mode,
        interval_s=10.0,
        cooldown_s=60.0,
    )


@pytest.mark.parametrize("mode", ["precopy", "stopcopy"])
def test_work_is_conserved_and_no_pm_exceeds_its_capacity(mode):
    sc = _unbalanced(mode, app="synthetic-random")
    out = simulate(sc)
    assert out.migrations, "the unbalanced start must trigger migrations"
    asked = sum(s.threads * s.amount for vm in sc.vms for chain in vm.chains for s in chain)
    from testbed.sim.run import build_engine  # the same VMs, to read their CPU use after the run

    assert np.isfinite(out.vm_end).all()
    used = sum(
        float(np.sum(pct / 100 * sc.capacity[hosts] * w))
        for pct, hosts, w in zip(
            [p for p, _ in out.vm_pct],
            [h for _, h in out.vm_pct],
            np.diff(np.append(out.sample_t, out.sim_s)),
            strict=True,
        )
    )
    assert used == pytest.approx(asked, rel=1e-6)
    assert max(float(p.max()) for p in out.host_pct) <= 100 + 1e-6
    assert build_engine(sc).vm_used.sum() == 0


def test_contention_slows_a_squeezed_vm_more_than_in_proportion():
    """A share s does s^2 / (s + c) CPUs of work: alone (s = 0.3) and one of 7 (s = 0.6 / 7)."""
    cal = CAL.model_copy(update={"contention_cpus": 0.04})
    blocks = 1000
    work = 2 * blocks * cal.cpu_s_per_block  # two instances per VM

    def exec_times(placement):
        sc = scenario(
            pms=3,
            placement=placement,
            app="synthetic1",
            instances=[2] * len(placement),
            scales=[blocks / 18_000] * len(placement),
            seeds=[0] * len(placement),
            start_s=[0.0] * len(placement),
            vcpus=[2] * len(placement),
            memory_mb=100,
            cal=cal,
            cluster=Cluster(),
            link_rate=None,
            policy=None,
            params={},
            mode="precopy",
            interval_s=10.0,
            cooldown_s=60.0,
        )
        return simulate(sc).exec_time_s

    for s, t in ((0.3, exec_times([1])[0]), (0.6 / 7, exec_times([1] * 7)[0])):
        assert t == pytest.approx(work * (s + 0.04) / s**2, rel=1e-6)


def _four_vms(signal: str, vcpus: list[int], instances: list[int] | None = None, scales: list[float] | None = None):
    """vm1 on PM1, vm2 and vm4 on PM2, vm3 on PM3, all busy from the start."""
    return scenario(
        pms=3, placement=[1, 2, 3, 2], app="synthetic1", instances=instances or [1] * 4,
        scales=scales or [2.0] * 4, seeds=[0] * 4, start_s=[0.0] * 4, vcpus=vcpus, memory_mb=100, cal=CAL,
        cluster=Cluster(), link_rate=None, policy="assign-u", params={}, mode="precopy", interval_s=10.0,
        cooldown_s=60.0, signal=signal,
    )


def test_each_vm_gets_its_own_instances_work_and_vcpus():
    sc = _four_vms("use", vcpus=[1, 2, 2, 4], instances=[1, 2, 1, 3], scales=[0.1, 0.2, 0.4, 0.1])
    assert [vm.vcpus for vm in sc.vms] == [1, 2, 2, 4]
    assert [len(vm.chains) for vm in sc.vms] == [1, 2, 1, 3]
    work = [sum(s.amount for chain in vm.chains for s in chain) for vm in sc.vms]
    per_block = CAL.cpu_s_per_block
    assert work == pytest.approx([1800 * per_block, 2 * 3600 * per_block, 7200 * per_block, 3 * 1800 * per_block])


def test_the_demand_signal_sees_a_vm_squeezed_below_its_cap():
    """vm4 (4 vCPUs: the whole PM) shares PM2 with vm2: each uses half of PM2, as vm1 and vm3 use
    half of theirs, so by use every PM holds 50 + 50 or 50 and no move can help; by demand vm4 wants
    all of PM2 (PM2 at 150 %), and vm2 moves off it, as the real CC decides with `--signal demand`."""
    by_use = simulate(_four_vms("use", vcpus=[2, 2, 2, 4]))
    assert not by_use.migrations and by_use.rounds.get("migrate", 0) == 0
    by_demand = simulate(_four_vms("demand", vcpus=[2, 2, 2, 4]))
    first = by_demand.migrations[0]
    assert (first.vm, first.source, first.start) == (1, 1, 10.0)  # vm2 off PM2 at the first round
    # the samples (the figures) are use either way: PM2 at 100 % before the move, not 150
    assert by_demand.host_pct[0][1] == pytest.approx(100.0)


def test_no_vm_is_in_two_places_and_a_stopped_vm_uses_nothing():
    sc = _unbalanced("stopcopy")
    out = simulate(sc)
    for t, (pct, hosts) in zip(out.sample_t, out.vm_pct, strict=True):
        assert hosts.shape == (len(sc.vms),)  # one PM per VM at every sample
        for f in out.migrations:  # a window inside a stop-and-copy: the VM used no CPU at all
            if f.start <= t and t + sc.interval_s <= f.start + f.plan.downtime_s:
                assert pct[f.vm] == 0
    for f in out.migrations:
        assert f.plan.downtime_s <= f.plan.total_s
        assert out.end_host[f.vm] != sc.host_names[f.source] or any(
            g.vm == f.vm and g.start > f.start for g in out.migrations
        )


def test_balancing_shortens_the_unbalanced_run_like_the_thesis():
    """Exp. 1's shape: migrating cuts the mean execution time of the 7/1/1 start."""
    without = simulate(_unbalanced("precopy", policy=None, scale=1.0))
    with_mig = simulate(_unbalanced("precopy", scale=1.0))
    assert with_mig.exec_time_s.mean() < 0.8 * without.exec_time_s.mean()
    assert not without.migrations and without.time_to_balance_s is None


def test_one_migration_at_a_time_unless_concurrency_allows_more():
    sc = _unbalanced("precopy")
    out = simulate(sc)
    spans = sorted((f.start, f.end_at) for f in out.migrations)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans))
    sc.concurrency = 3
    sc.policy = get_policy("assign-u")
    spans = sorted((f.start, f.end_at) for f in simulate(sc).migrations)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))


# -- the driver ----------------------------------------------------------------------------------------


def test_driver_runs_workloads_and_migrates_on_simulated_time():
    hosts = [Host(f"tb-pm{k}", f"198.18.0.{10 + k}", 0.6, 4) for k in (1, 2)]
    driver = SimDriver(hosts, CAL, origin=1000.0)
    for vm in ("vm1", "vm2"):
        driver.create_vm(VMSpec(vm, memory_mb=100, vcpus=2), "tb-pm1")
    runs = [driver.start_workload(vm, ["synthetic1", "1000"]) for vm in ("vm1", "vm2")]
    use = driver.cpu_use(1.0)
    assert use.hosts["tb-pm1"] == pytest.approx(100.0) and use.vms["vm1"] == pytest.approx(50.0)
    record = driver.migrate("vm2", "tb-pm2", MigrationMode.STOPCOPY)
    assert record.status == "completed" and record.downtime_s == record.total_time_s
    assert {v.name: v.host for v in driver.list_vms()} == {"vm1": "tb-pm1", "vm2": "tb-pm2"}
    done = driver.wait_workload("vm1", runs[0].id, 3600)
    # 1000 blocks of work at 0.3 CPU (2 of 4 cores of a 0.6-CPU PM): the migration never slowed vm1,
    # as its 0.05-CPU overhead only cut into the PM's headroom (vm1 + vm2 = 0.6, minus 0.05)
    assert done.finished and done.duration_s == pytest.approx(1000 * CAL.cpu_s_per_block / 0.3, rel=0.05)
    driver.destroy_vm("vm1")
    driver.create_vm(VMSpec("vm1"), "tb-pm2")  # the executor's reset recreates the same names
    assert sorted(v.name for v in driver.list_vms()) == ["vm1", "vm2"]
    with pytest.raises(ValueError, match="synthetic1"):
        driver.start_workload("vm1", ["stress"])
    assert math.isfinite(driver.origin)
