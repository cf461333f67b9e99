"""`testbed run` end to end: Exp. 1 on the embedded lab at a small scale, with each technique, then
plots and report; and what `testbed run` refuses before it touches any host.

The lab test runs experiments/exp1.yml with 1 repetition at a small scale (E2E) and a 5 s
balancer interval, so the unbalanced run lasts long enough for the CC to migrate at least once
(QEMU pre-copy, containers stop-and-copy, through the role's LCs). Every variant must end with an
ok run (a failed or invalid run is replaced by another repetition, as in any campaign; the test
prints why). It needs the embedded lab with the VM manager running (playbooks/site.yml).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testbed.cli import main
from testbed.lab import Lab
from testbed.results import read_table
from testbed.runner import executor
from testbed.runner.campaign import Run
from testbed.runner.executor import SYNTHETIC1_BLOCKS, chains, make_drivers
from testbed.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
EXP1 = REPO / "experiments" / "exp1.yml"
E2E_TIMEOUT_S = 900


def _testbed(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_run_refuses_a_technique_the_spec_does_not_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXP1), "--technique", "xen"]) == 2
    assert "--technique: 'xen' is not one of" in capsys.readouterr().err


def test_run_refuses_an_app_the_lab_executor_cannot_run(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Never a spec the executor runs here: a passing check would start a campaign on the lab.
    # Without swap for their compiles, Exp. 3's 200 MB containers cannot run (swap on, they can).
    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 0)
    assert main(["run", str(REPO / "experiments" / "exp3.yml"), "--technique", "container"]) == 2
    assert "kernel" in capsys.readouterr().err


def test_run_refuses_max_failures_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXP1), "--technique", "qemu", "--max-failures", "0"]) == 2
    assert "--max-failures: must be >= 1" in capsys.readouterr().err


def test_run_refuses_results_of_another_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text('{"experiment": "exp2", "spec_fingerprint": "0"}')
    assert main(["run", str(EXP1), "--technique", "qemu", "--results", str(tmp_path)]) == 2
    assert "holds results of another spec" in capsys.readouterr().err


def test_synthetic1_instances_run_at_once_with_scaled_blocks() -> None:
    spec = load_spec(EXP1)
    variant = spec.variants()[0]
    run = Run(spec.model_copy(update={"scale": 0.5}), "qemu", variant, 1)
    assert chains(run, "vm1") == chains(run, "vm9")
    (first,), (second,) = chains(run, "vm1")  # two instances, one step each
    assert first.argvs == second.argvs == (("synthetic1", str(SYNTHETIC1_BLOCKS // 2)),)


def test_synthetic_random_draws_follow_the_vm_seed() -> None:
    spec = load_spec(REPO / "experiments" / "exp2.yml")
    nomig, mig = spec.variants()
    steps = chains(Run(spec, "qemu", nomig, 1), "vm3")
    assert steps == chains(Run(spec, "qemu", mig, 1), "vm3")  # same work with and without migration
    assert steps != chains(Run(spec, "qemu", nomig, 2), "vm3")  # another repetition draws anew
    (chain,) = steps
    assert len(chain) == 5
    for step in chain:
        assert step.argvs in ((("sleep", "30"),), *((("synthetic1", "18000"),) * n for n in (1, 2, 4)))


#: Per technique: the scale (QEMU guests run Synthetic1 4x slower under TCG than containers do
#: natively) and the migration mode the runner picks for it.
E2E = {"qemu": (0.05, "precopy"), "container": (0.5, "stopcopy")}


@pytest.mark.lab
@pytest.mark.parametrize("technique", sorted(E2E))
def test_exp1_runs_end_to_end_then_plots_and_report(embedded_lab: Lab, tmp_path: Path, technique: str) -> None:
    scale, mode = E2E[technique]
    spec = yaml.safe_load(EXP1.read_text())
    spec |= {"balancer": {"policy": "assign-u", "interval_s": 5, "cooldown_s": 30}}
    spec_file = tmp_path / "exp1.yml"
    spec_file.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    began = time.monotonic()
    ran = _testbed("run", str(spec_file), "--technique", technique, "--reps", "1", "--scale", str(scale),
                   "--results", str(results), timeout=E2E_TIMEOUT_S)
    print(f"testbed run (Exp. 1, {technique}, scale {scale}, 1 rep): {time.monotonic() - began:.0f} s")
    assert ran.returncode == 0, ran.stderr[-3000:]

    recorded = read_table(results, "runs")
    for r in recorded:
        if r["status"] != "ok":  # the campaign replaced it with another repetition; say why
            print(r["run_id"], r["status"], json.loads((results / "runs" / f"{r['run_id']}.json").read_text())["error"])
    assert {r["technique"] for r in recorded} == {technique}
    runs = [r for r in recorded if r["status"] == "ok"]
    assert sorted((r["layout"], r["migration"]) for r in runs) == [
        ("balanced", "false"), ("unbalanced", "false"), ("unbalanced", "true")]
    ok = {r["run_id"] for r in runs}
    times = [t for t in read_table(results, "vm_times") if t["run_id"] in ok]
    assert len(times) == 3 * 9
    for row in times:
        print(row["run_id"], row["vm"], row["start_host"], row["end_host"], row["exec_time_s"])
        assert float(row["exec_time_s"]) > 0
        if ".nomig." in row["run_id"]:
            assert row["end_host"] == row["start_host"]
    moves = [m for m in read_table(results, "migrations") if m["run_id"] in ok]
    for m in moves:
        print(m["run_id"], m["vm"], m["source"], m["destination"], m["mode"], m["status"], m["total_time_s"],
              m["bytes"])
    assert {m["run_id"] for m in moves} == {r["run_id"] for r in runs if r["migration"] == "true"}, moves
    completed = [m for m in moves if m["status"] == "completed"]
    assert completed and {m["mode"] for m in completed} == {mode}, moves
    moved = {(m["vm"], m["destination"]) for m in completed}
    assert any((t["vm"], t["end_host"]) in moved for t in times if t["run_id"] in {m["run_id"] for m in completed})
    samples = read_table(results, "cpu_samples")
    for r in runs:
        assert {s["host"] for s in samples if s["run_id"] == r["run_id"]} == {pm.name for pm in embedded_lab.pms}
    driver = make_drivers(embedded_lab)[technique]
    assert not [i.name for i in driver.list_vms() if i.name.startswith("vm")]  # every run destroyed its VMs

    plotted = _testbed("plot", str(results))
    assert plotted.returncode == 0, plotted.stderr
    assert len(list((results / "figures").glob("cpu_timeline.*.png"))) == 3
    reported = _testbed("report", str(results))
    assert reported.returncode == 0, reported.stderr
    assert (results / "report.html").stat().st_size > 0
