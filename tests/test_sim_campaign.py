"""Simulated campaigns end to end: the runner with SimExecutor, calibration recovering the model's
own parameters, the scale study's results, validation tables, and the SIMULATED marks everywhere."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from testbed.analysis.data import load
from testbed.analysis.plots import plot_all
from testbed.calibrate import calibrate
from testbed.cli import main
from testbed.errors import InputError
from testbed.results import ResultsStore, read_manifest, write_atomic
from testbed.runner.campaign import run_campaign
from testbed.sim.calibration import Calibration, ModeCosts, load_calibration, save_calibration
from testbed.sim.executor import SimExecutor
from testbed.sim.study import PolicyChoice, Study, run_study
from testbed.sim.validate import compare
from testbed.spec import parse_spec

KNOWN = Calibration(
    cpu_s_per_block=3e-4,
    link_efficiency=0.8,
    memory_fraction=0.7,
    modes={
        "precopy": ModeCosts(fixed_s=0.7, stop_fixed_s=0.05),
        "stopcopy": ModeCosts(fixed_s=1.5, stop_fixed_s=1.5),
        "postcopy": ModeCosts(fixed_s=0.5, stop_fixed_s=0.04),
    },
)


def _spec(**changes):
    data = {
        "name": "simtest",
        "techniques": ["sim"],
        "app": "synthetic1",
        "instances": 2,
        "vms": 9,
        "pms": 3,
        "matrix": {"layout": ["balanced", "unbalanced"], "migration": [False, True]},
        "exclude": [{"layout": "balanced", "migration": True}],
        "repetitions": 2,
        "scale": 0.3,
        "seed": 3,
    }
    return parse_spec(data | changes)


def _campaign(directory, spec, cal, name="known"):
    executor = SimExecutor(cal, name)
    with ResultsStore(directory) as store:
        run_campaign(spec, store, executor, provenance=executor.manifest_fields())
    return directory


def test_calibration_recovers_the_models_own_parameters(tmp_path):
    known = KNOWN.model_copy(update={"dirty_mb_s": {"synthetic1": 2.0}})
    spec = _spec(
        matrix={
            "layout": ["balanced", "unbalanced"],
            "migration": [False, True],
            "link_rate": ["25mbit", "100mbit"],
            "mode": ["stopcopy", "precopy"],
        },
        memory_mb=200,
    )
    fitted = calibrate(_campaign(tmp_path / "c", spec, known))
    assert fitted.cpu_s_per_block == pytest.approx(3e-4, rel=1e-3)
    assert fitted.link_efficiency == pytest.approx(0.8, rel=1e-3)
    assert fitted.memory_fraction == pytest.approx(0.7, rel=1e-3)
    for mode in ("stopcopy", "precopy"):
        assert fitted.fitted[f"migration.{mode}"]["fit"] == "line"
        assert fitted.modes[mode].fixed_s == pytest.approx(known.modes[mode].fixed_s, rel=1e-3)
        assert fitted.modes[mode].stop_fixed_s == pytest.approx(known.modes[mode].stop_fixed_s, rel=1e-3)
    assert fitted.dirty_mb_s["synthetic1"] == pytest.approx(2.0, rel=1e-3)
    # the machinery's CPU is seen on both ends (diluted by 10 s samples around short migrations)
    assert 0 < fitted.cpu_overhead_src <= KNOWN.cpu_overhead_src + 1e-9


def test_sim_campaign_is_marked_simulated_everywhere_and_plots(tmp_path):
    directory = _campaign(tmp_path / "c", _spec(repetitions=1), Calibration(), "defaults")
    manifest = read_manifest(directory)
    assert manifest["simulated"] is True and manifest["calibration"] == "defaults"
    details = json.loads(next((directory / "runs").glob("*.json")).read_text())
    assert details["simulated"] is True and "SIMULATED" in details["note"]
    figures = plot_all(load(directory))
    assert figures and all(f.title.startswith("SIMULATED — ") for f in figures)
    sidecar = json.loads((directory / "figures" / f"{figures[0].name}.json").read_text())
    assert sidecar["title"].startswith("SIMULATED — ")


def test_scale_study_writes_plottable_results_summary_and_figures(tmp_path, capsys):
    study = Study(
        name="tiny",
        sizes=[6],
        policies=[PolicyChoice(policy="none"), PolicyChoice(policy="assign-u", params={"base": 1.1})],
        modes=["precopy", "stopcopy"],
        concurrency=[1, 2],
        repetitions=1,
        scale=0.3,
    )
    rows = run_study(study, tmp_path / "s", Calibration(), "defaults", log=lambda _: None)
    assert len(rows) == 1 + 2 * 2  # none runs once; assign-u once per mode and concurrency
    moved = [r for r in rows if r["policy"] == "assign-u"]
    assert all(r["migrations"] > 0 and r["bytes_moved"] > 0 for r in moved)
    assert (tmp_path / "s" / "SIMULATED").exists() and (
        tmp_path / "s" / "figures" / "scale_study.png"
    ).exists()
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["simulated"] is True
    per_policy = tmp_path / "s" / "6pms" / "assign-u-base1.1" / "stopcopy"
    assert main(["plot", str(per_policy)]) == 0
    assert main(["plot", str(per_policy.with_name("precopy-x2"))]) == 0
    titles = [json.loads(p.read_text())["title"] for p in (per_policy / "figures").glob("*.json")]
    assert titles and all(t.startswith("SIMULATED — ") for t in titles)


def test_validation_table_compares_lab_and_simulator(tmp_path):
    spec = _spec(repetitions=1)
    lab = _campaign(tmp_path / "lab", spec, KNOWN)
    # stands in for a lab campaign: the same rows without the simulated flag
    manifest = read_manifest(lab) | {"simulated": False}
    write_atomic(lab / "manifest.json", json.dumps(manifest))
    sim = _campaign(tmp_path / "sim", spec, KNOWN.model_copy(update={"cpu_s_per_block": 3.15e-4}))
    table = compare(lab, sim, 10.0)
    assert len(table) == 3 and table["within"].all()
    assert table["diff_pct"].between(0, 6).all()
    with pytest.raises(InputError, match="not a simulated campaign"):
        compare(sim, lab)


def _as_lab(directory):
    """A simulated campaign standing in for a lab one: the same rows without the simulated flag."""
    write_atomic(directory / "manifest.json", json.dumps(read_manifest(directory) | {"simulated": False}))
    return directory


def test_calibration_recovers_contention_and_precopy_memory_fraction(tmp_path):
    """Crowded and lone VMs (7/1/1) separate the work from the contention; a pre-copy-only
    campaign gives the memory fraction QEMU really sends through the downtime."""
    known = Calibration(
        contention_cpus=0.04,
        memory_fraction=0.6,
        dirty_mb_s={"synthetic1": 2.0},
        modes={**Calibration().modes, "precopy": ModeCosts(fixed_s=0.2, stop_fixed_s=0.043)},
    )
    fitted = calibrate(_campaign(tmp_path / "c", _spec(repetitions=1, balancer={"mode": "precopy"}), known))
    assert fitted.contention_cpus == pytest.approx(0.04, rel=0.02)
    assert fitted.cpu_s_per_block == pytest.approx(known.cpu_s_per_block, rel=0.01)
    assert fitted.memory_fraction == pytest.approx(0.6, rel=0.02)
    assert fitted.dirty_mb_s["synthetic1"] == pytest.approx(2.0, rel=0.05)
    assert fitted.modes["precopy"].fixed_s == pytest.approx(0.2, abs=0.01)


def test_run_technique_sim_then_plot_and_report_show_the_lab_side_by_side(tmp_path, capsys):
    """`testbed calibrate` of two lab campaigns, `testbed run SPEC --technique sim` with it, then
    `testbed plot` / `testbed report` find the lab campaign of the same experiment on their own."""
    spec = _spec(repetitions=1, techniques=["qemu"])
    lab = _as_lab(_campaign(tmp_path / "lab", spec, KNOWN))
    other = _as_lab(_campaign(tmp_path / "other", _spec(name="other", repetitions=1), KNOWN))
    cal = tmp_path / "cal.json"
    assert main(["calibrate", str(lab), str(other), "--out", str(cal)]) == 0
    assert load_calibration(cal)[0].sources == [str(lab.resolve()), str(other.resolve())]
    spec_file = tmp_path / "spec.yml"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    sim = tmp_path / "sim"
    argv = ["run", str(spec_file), "--technique", "sim", "--calibration", str(cal), "--results", str(sim)]
    assert main(argv) == 0
    assert "SIMULATED" in capsys.readouterr().out and (sim / "SIMULATED").exists()
    assert main(["plot", str(sim)]) == 0
    sidecar = json.loads((sim / "figures" / "validation.json").read_text())
    assert (
        sidecar["title"].startswith("SIMULATED — Simulator vs lab") and str(lab.resolve()) in sidecar["note"]
    )
    assert main(["report", str(sim)]) == 0
    html = (sim / "report.html").read_text()
    assert "SIMULATED: the simulator against the lab" in html and "every variant is within" in html
    assert main(["run", str(spec_file), "--technique", "sim", "--technique", "qemu"]) == 2
    assert "sim runs alone" in capsys.readouterr().err


def test_validation_names_how_much_of_their_quota_the_labs_saturated_pms_got(tmp_path):
    lab = _as_lab(_campaign(tmp_path / "lab", _spec(repetitions=1), KNOWN))
    table = compare(lab, _campaign(tmp_path / "sim", _spec(repetitions=1), KNOWN), 10.0)
    assert table["diff_pct"].abs().max() < 1e-6
    # the simulator always serves a PM its quota: 7 busy 2-vCPU VMs on a 4-core PM saturate it
    unbalanced = table[(table["layout"] == "unbalanced") & ~table["migration"]]
    assert unbalanced["lab_saturated_pct"].iloc[0] == pytest.approx(100.0, abs=0.5)


def test_calibrated_simulator_reproduces_a_recorded_lab_campaign(tmp_path):
    """Issue 9's gate on real data: calibrated from a recorded embedded-lab Exp. 1
    (tests/data/lab-exp1-qemu-s0.05), the simulator runs the same spec within 10 % per variant."""
    from pathlib import Path

    lab = Path(__file__).parent / "data" / "lab-exp1-qemu-s0.05"
    cal = calibrate(lab)
    assert cal.contention_cpus > 0 and 0 < cal.memory_fraction < 1  # crowding and zero pages seen
    spec = parse_spec(read_manifest(lab)["spec"] | {"techniques": ["sim"]})
    table = compare(lab, _campaign(tmp_path / "sim", spec, cal), 10.0)
    assert len(table) == 3 and table["within"].all(), table
    assert (table["lab_saturated_pct"] > 90).all()  # the lab's PMs got their quota


def test_a_lab_campaign_recorded_before_newer_spec_fields_is_still_the_same_experiment():
    """The recorded Exp. 1 has no balancer.compression, time_scale or signal, nor per_vm: its
    simulation, whose manifest has them at their defaults, still finds it; a set one differs."""
    from pathlib import Path

    from testbed.analysis.validation import _same_experiment

    lab = read_manifest(Path(__file__).parent / "data" / "lab-exp1-qemu-s0.05")
    assert not {"compression", "time_scale", "signal"} & set(lab["spec"]["balancer"]) and "per_vm" not in lab["spec"]
    spec = parse_spec(lab["spec"] | {"techniques": ["sim"]})
    assert _same_experiment(lab, {"spec": spec.model_dump(mode="json")})
    for change in ({"per_vm": {"vm1": {"work": 2}}}, {"balancer": lab["spec"]["balancer"] | {"signal": "demand"}}):
        assert not _same_experiment(lab, {"spec": parse_spec(lab["spec"] | change).model_dump(mode="json")})


def test_calibration_file_round_trips_and_bad_files_fail_on_one_line(tmp_path):
    path = tmp_path / "cal.json"
    save_calibration(KNOWN, path)
    cal, name = load_calibration(path)
    assert cal == KNOWN and name == str(path)
    path.write_text('{"link_efficiency": 2}')
    with pytest.raises(InputError, match="link_efficiency"):
        load_calibration(path)


def test_the_shipped_scale_study_loads() -> None:
    """experiments/studies/scale.yml is a study (not a lab spec): it parses as one."""
    from pathlib import Path

    from testbed.sim.study import load_study

    study = load_study(Path(__file__).resolve().parent.parent / "experiments" / "studies" / "scale.yml")
    assert study.sizes == [10, 100, 1000] and study.vms_per_pm == 3  # issue 9's scales
    assert {p.policy for p in study.policies} >= {"assign-u", "workload-balance", "stddev", "none"}


# --- bad input to the simulator's commands: one line, exit 2, nothing created -----------------------

LAB_DATA = Path(__file__).parent / "data" / "lab-exp1-qemu-s0.05"
STUDY = Path(__file__).resolve().parent.parent / "experiments" / "studies" / "scale.yml"


def _all_nan(tmp_path: Path) -> Path:
    """The recorded lab campaign with every measured time and CPU share nan."""
    copy = tmp_path / "nan"
    shutil.copytree(LAB_DATA, copy)
    for table, columns in (("vm_times", ["exec_time_s"]), ("cpu_samples", ["cpu_pct"]),
                           ("migrations", ["total_time_s", "downtime_s"])):
        path = copy / f"{table}.csv"
        rows = list(csv.DictReader(path.open()))
        for row in rows:
            row.update(dict.fromkeys(columns, "nan"))
        with path.open("w") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return copy


def _study_with(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(STUDY.read_text()) | changes
    path = tmp_path / "study.yml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD_SIM_COMMANDS = {
    "run --technique sim --variant unknown": (
        lambda t: ["run", str(_sim_spec(t)), "--technique", "sim", "--variant", "synthetic1.nowhere.mig"],
        "--variant: 'synthetic1.nowhere.mig' is not a variant of"),
    "sim run --results on a file": (
        lambda t: ["sim", "run", str(_sim_spec(t)), "--results", str(_a_file(t))], "exists and is not a directory"),
    "study --sizes 0": (lambda t: ["sim", "study", str(STUDY), "--sizes", "0", "--results", str(t / "out")],
                        "sizes.0: Input should be greater than or equal to 1"),
    "study --sizes -3": (lambda t: ["sim", "study", str(STUDY), "--sizes", "-3", "--results", str(t / "out")],
                         "sizes.0: Input should be greater than or equal to 1"),
    "study --reps 0": (lambda t: ["sim", "study", str(STUDY), "--reps", "0", "--results", str(t / "out")],
                       "repetitions: Input should be greater than or equal to 1"),
    "study concurrency 0": (lambda t: ["sim", "study", str(_study_with(t, concurrency=[0])), "--results",
                                       str(t / "out")], "concurrency.0: Input should be greater than or equal"),
    "validate --bound -5": (lambda t: ["sim", "validate", str(LAB_DATA), str(LAB_DATA), "--bound", "-5"],
                            "--bound: a difference in percent"),
    "calibrate all-nan times": (lambda t: ["calibrate", str(_all_nan(t)), "--out", str(t / "cal.json")],
                                "too few finite measurements"),
    "calibrate --capacity -1": (lambda t: ["calibrate", str(LAB_DATA), "--capacity", "-1", "--out",
                                           str(t / "cal.json")], "--capacity: CPUs of each PM must be"),
    "bench sim --interval 0": (lambda t: ["bench", "sim", "--interval", "0"], "--interval: must be >= 1"),
    "bench sim --interval -10": (lambda t: ["bench", "sim", "--interval", "-10"], "--interval: must be >= 1"),
    "bench sim --hours inf": (lambda t: ["bench", "sim", "--hours", "inf"], "--hours: must be > 0"),
    "bench sim --hours 0": (lambda t: ["bench", "sim", "--hours", "0"], "--hours: must be > 0"),
    "bench sim --hours -1": (lambda t: ["bench", "sim", "--hours", "-1"], "--hours: must be > 0"),
    "bench sim --scale nan": (lambda t: ["bench", "sim", "--scale", "nan"], "--scale: must be > 0"),
}


def _sim_spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yml"
    path.write_text(json.dumps(_spec(repetitions=1).model_dump(mode="json")))
    return path


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken"
    path.write_text("mine\n")
    return path


@pytest.mark.parametrize("case", list(BAD_SIM_COMMANDS))
def test_bad_simulator_input_is_one_line_and_creates_nothing(tmp_path, capsys, case):
    argv, message = BAD_SIM_COMMANDS[case]
    argv = argv(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("testbed: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before
