"""The manager's times at a run's scale (`balancer.time_scale`, issue #16): the pure function,
its floors, the spec field, and that the simulator and the manifest use it."""

from __future__ import annotations

import json

import pytest

from testbed.cli import main
from testbed.errors import InputError
from testbed.runner.campaign import Run
from testbed.runner.time_scale import INTERVAL_FLOOR_S, copy_time_s, manager_times
from testbed.sim.calibration import Calibration
from testbed.sim.executor import SimExecutor
from testbed.spec import parse_spec

MBIT_100 = 100_000_000


def _spec(scale: float = 1.0, **balancer):
    return parse_spec({"name": "t", "techniques": ["sim"], "scale": scale, "balancer": balancer})


def test_without_a_time_scale_the_manager_keeps_the_specs_times_at_any_scale():
    times = manager_times(_spec(0.05), MBIT_100)
    assert (times.factor, times.interval_s, times.cooldown_s, times.settling_s) == (1.0, 10.0, 60.0, 10.0)
    assert times.floors == {} and times.floored == ()


def test_auto_follows_the_runs_scale_and_settling_follows_the_interval():
    times = manager_times(_spec(0.5, time_scale="auto"), MBIT_100)
    assert (times.factor, times.interval_s, times.cooldown_s, times.settling_s) == (0.5, 5.0, 30.0, 5.0)
    assert times.floored == ()


def test_a_number_scales_by_itself_whatever_the_runs_scale():
    times = manager_times(_spec(0.5, time_scale=0.3), MBIT_100)
    assert (times.interval_s, times.cooldown_s) == (3.0, 18.0)


def test_small_scales_are_floored_by_sampling_and_by_one_migrations_copy_time():
    times = manager_times(_spec(0.1, time_scale="auto"), MBIT_100)  # 1 s and 6 s unfloored
    copy = copy_time_s(100, MBIT_100)
    assert copy == pytest.approx(8.39, abs=0.01)  # 100 MiB at 100 Mbit/s
    assert (times.interval_s, times.settling_s, times.cooldown_s) == (INTERVAL_FLOOR_S, INTERVAL_FLOOR_S, copy)
    assert times.floored == ("interval_s", "cooldown_s")
    assert times.floors["cooldown_s"] == copy and times.floors["interval_s"] == INTERVAL_FLOOR_S


def test_the_cooldown_floor_is_at_least_the_interval_on_a_fast_link():
    times = manager_times(_spec(0.01, time_scale="auto"), 100 * MBIT_100)  # copy 0.08 s
    assert times.cooldown_s == times.interval_s == INTERVAL_FLOOR_S


def test_a_floor_never_raises_a_time_above_the_specs_own():
    times = manager_times(_spec(0.1, time_scale="auto", interval_s=1.5, cooldown_s=0), MBIT_100)
    assert (times.interval_s, times.cooldown_s) == (1.5, 0.0)
    slow_link = manager_times(_spec(0.5, time_scale="auto"), 10**7)  # copying 100 MB takes 84 s
    assert slow_link.cooldown_s == 60.0 and slow_link.floored == ("cooldown_s",)


def test_scaling_up_stops_at_the_longest_window_an_lc_keeps():
    times = manager_times(_spec(20, time_scale="auto"), MBIT_100)
    assert times.interval_s == 120.0 and times.cooldown_s == 1200.0 and times.floored == ("interval_s",)


@pytest.mark.parametrize("value", [0, -1, 101, "0.5", True, float("nan"), "fast"])
def test_bad_time_scales_are_refused_in_one_line(value):
    with pytest.raises(InputError, match=r"^x.yml: balancer.time_scale: must be auto or a factor in \(0, 100\]"):
        parse_spec({"name": "t", "techniques": ["sim"], "balancer": {"time_scale": value}}, "x.yml")


def test_the_simulator_runs_its_cc_at_the_scaled_interval():
    """More rounds in the same simulated run: the engine's CC ticks at the scaled interval."""
    executor = SimExecutor(Calibration(), "defaults")
    for time_scale, interval in ((None, 10.0), ("auto", INTERVAL_FLOOR_S)):
        spec = _spec(0.2, time_scale=time_scale)
        variant = next(v for v in spec.variants() if v.migration)
        details = executor.execute(Run(spec, "sim", variant, 1)).details
        assert details["sim_s"] > INTERVAL_FLOOR_S
        assert sum(details["rounds"].values()) == int(details["sim_s"] // interval)


def test_the_campaigns_manifest_records_the_effective_times_and_floors(tmp_path, capsys):
    spec = tmp_path / "s.yml"
    spec.write_text("name: s\ntechniques: [sim]\nvms: 3\npms: 3\nrepetitions: 1\n")
    out = tmp_path / "r"
    assert main(["run", str(spec), "--scale", "0.1", "--time-scale", "auto", "--results", str(out)]) == 0
    recorded = json.loads((out / "manifest.json").read_text())
    assert recorded["spec"]["balancer"]["time_scale"] == "auto"
    assert recorded["manager_times"] == {
        "factor": 0.1, "interval_s": 2.0, "cooldown_s": pytest.approx(8.388608), "settling_s": 2.0,
        "floors": {"interval_s": 2.0, "interval_s_max": 120.0, "cooldown_s": pytest.approx(8.388608)},
        "floored": ["interval_s", "cooldown_s"]}


def test_the_report_states_the_time_scale_and_each_variants_rounds_per_run(tmp_path, capsys):
    from testbed.analysis.data import interval_table, load, manager_interval_s

    spec = tmp_path / "s.yml"
    spec.write_text("name: s\ntechniques: [sim]\nvms: 3\npms: 3\nrepetitions: 1\n"
                    "matrix: {layout: [balanced], migration: [false]}\n")
    out = tmp_path / "r"
    assert main(["run", str(spec), "--scale", "0.2", "--time-scale", "auto", "--results", str(out)]) == 0
    c = load(out)
    assert manager_interval_s(c.manifest) == 2.0
    table = interval_table(c, 2.0)
    longest = c.vm_times["exec_time_s"].max()
    assert table["run_over_interval"].tolist() == [pytest.approx(longest / 2.0)]
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "The manager's time scale" in html and "Time scale ×0.2: interval 2 s" in html
    assert f"<td>{longest / 2.0:.2f}</td>" in html


def test_a_campaign_from_before_the_time_scale_reads_its_specs_interval():
    from testbed.analysis.data import manager_interval_s

    assert manager_interval_s({"spec": {"balancer": {"interval_s": 10.0}}}) == 10.0
    assert manager_interval_s({"spec": {"balancer": {"interval_s": 10.0}}, "manager_times": {"interval_s": 3}}) == 3
    assert manager_interval_s({}) is None
    assert manager_interval_s({"spec": {"balancer": {"interval_s": 10.0, "time_scale": "auto"}}}) is None


def test_the_lab_runner_gives_the_cc_the_scaled_times_and_asks_events_one_scaled_interval_back():
    from types import SimpleNamespace

    from testbed.runner.executor import LabExecutor

    class CcStub:
        def put(self, path, config):
            self.config = config

        def get(self, path, **query):
            self.query = query
            return []

    executor = LabExecutor.__new__(LabExecutor)
    executor.cc = CcStub()
    executor.lab = SimpleNamespace(pms=[SimpleNamespace(link_rate_bps=MBIT_100), SimpleNamespace(link_rate_bps=5 * 10**7)])
    spec = parse_spec({"name": "t", "techniques": ["qemu"], "scale": 0.5, "balancer": {"time_scale": "auto"}})
    run = Run(spec, "qemu", next(v for v in spec.variants() if v.migration), 1)
    config = executor._configure_cc(run, quiet=False)
    assert (config.interval, config.cooldown) == (5.0, 30.0) and executor.cc.config == config
    assert executor.manager_times(spec).floors["cooldown_s"] == copy_time_s(100, 5 * 10**7)  # the slowest link
    executor._run_events(run, since=1000.0)
    assert executor.cc.query["since"] == 995.0
