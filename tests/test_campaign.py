"""Campaigns: the matrix expands to technique x variant x repetition, in a seeded interleaved
order, with stable run ids; the loop resumes, replaces invalid runs and adds repetitions for
--ci-width. Runs are made up by tests/campaign_helpers.py (no lab)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from campaign_helpers import FakeExecutor, small_spec

from testbed.errors import InputError
from testbed.results import ResultsStore
from testbed.runner.campaign import (
    CampaignFailed,
    Run,
    RunResult,
    cells,
    needs_more_reps,
    pending_runs,
    run_campaign,
    shortfall,
)


def plan(spec, **kwargs):
    return pending_runs(spec, cells(spec), {}, {}, **kwargs)


def cell_of(run: Run) -> str:
    return f"{run.technique}.{run.variant.id}"


def test_matrix_expands_to_technique_variant_rep():
    spec = small_spec()
    runs = plan(spec)
    assert len(runs) == 2 * 3 * 3
    assert len({r.run_id for r in runs}) == len(runs)
    assert {r.run_id for r in runs} >= {"qemu.synthetic1.unbalanced.mig.r3", "container.synthetic1.balanced.nomig.r1"}
    per_cell = {}
    for r in runs:
        per_cell.setdefault(cell_of(r), []).append(r.rep)
    assert all(reps == [1, 2, 3] for reps in per_cell.values())
    assert {r.run_id for r in pending_runs(spec, cells(spec, ["qemu"]), {}, {})} == {
        r.run_id for r in runs if r.technique == "qemu"}


def test_order_is_seeded_deterministic_and_interleaved():
    spec = small_spec(repetitions=7)
    first = [r.run_id for r in plan(spec)]
    assert first == [r.run_id for r in plan(small_spec(repetitions=7))]
    assert first != [r.run_id for r in plan(small_spec(repetitions=7, seed=8))]
    runs = plan(spec)
    n_cells = len(cells(spec))
    for k in range(0, len(runs), n_cells):  # every round holds each cell once ...
        assert len({cell_of(r) for r in runs[k:k + n_cells]}) == n_cells
    assert all(cell_of(a) != cell_of(b) for a, b in itertools.pairwise(runs))  # ... and none runs twice in a row
    rounds = [[cell_of(r) for r in runs[k:k + n_cells]] for k in range(0, len(runs), n_cells)]
    assert len({tuple(r) for r in rounds}) > 1  # shuffled, not the same order every round


def test_run_ids_do_not_depend_on_the_order_of_the_spec():
    a = small_spec()
    b = small_spec(techniques=["container", "qemu"],
                   matrix={"layout": ["unbalanced", "balanced"], "migration": [True, False]})
    assert {r.run_id for r in plan(a)} == {r.run_id for r in plan(b)}


def test_workload_seed_is_shared_across_variants_not_reps():
    runs = plan(small_spec())
    rep1 = {r.workload_seed("vm2") for r in runs if r.rep == 1}
    assert len(rep1) == 1
    assert len({r.workload_seed("vm2") for r in runs}) == 3
    assert runs[0].workload_seed("vm1") != runs[0].workload_seed("vm2")


def test_resume_skips_recorded_runs_in_the_same_order(tmp_path):
    spec = small_spec()
    full = [r.run_id for r in plan(spec)]

    class Crashing(FakeExecutor):
        def execute(self, run):
            if len(self.executed) == 7:
                raise KeyboardInterrupt
            return super().execute(run)

    with ResultsStore(tmp_path) as store, pytest.raises(KeyboardInterrupt):
        run_campaign(spec, store, Crashing())
    with ResultsStore(tmp_path) as store:
        assert store.recorded() == set(full[:7])
        again = FakeExecutor()
        assert run_campaign(spec, store, again) == len(full) - 7
        assert again.executed == full[7:]
        assert run_campaign(spec, store, FakeExecutor()) == 0
        assert store.manifest()["finished_at"]
        assert len(store.manifest()["sessions"]) == 3


def test_a_campaign_runs_in_parts_by_variant_into_one_directory(tmp_path):
    """--variant: a campaign too long for one sitting runs some variants now, the rest later."""
    spec = small_spec()
    full = [r.run_id for r in plan(spec)]
    part = ["synthetic1.unbalanced.mig"]
    assert {c.variant.id for c in cells(spec, variants=part)} == set(part)
    with ResultsStore(tmp_path) as store:
        first = FakeExecutor()
        run_campaign(spec, store, first, variants=part)
        assert sorted(first.executed) == sorted(i for i in full if ".synthetic1.unbalanced.mig." in i)
        assert shortfall(spec, cells(spec, variants=part), store.statuses) == {}
        assert shortfall(spec, cells(spec), store.statuses)
        rest = FakeExecutor()
        run_campaign(spec, store, rest)
        assert sorted(rest.executed) == sorted(i for i in full if i not in first.executed)


def test_invalid_runs_are_kept_and_replaced(tmp_path):
    spec = small_spec()
    bad = "qemu.synthetic1.unbalanced.mig.r2"
    with ResultsStore(tmp_path) as store:
        run_campaign(spec, store, FakeExecutor(bad={bad}))
        assert store.statuses[bad] == "invalid"
        assert store.statuses["qemu.synthetic1.unbalanced.mig.r4"] == "ok"
        assert "qemu.synthetic1.unbalanced.nomig.r4" not in store.statuses
        assert len(store.statuses) == 2 * 3 * 3 + 1


@dataclass
class FailingFrom(FakeExecutor):
    """Every run from the `first`-th on fails, as a lab that cannot start VMs fails them."""

    first: int = 0

    def execute(self, run: Run) -> RunResult:
        if len(self.executed) < self.first:
            return super().execute(run)
        self.executed.append(run.run_id)
        return RunResult("failed", 0.0, 1.0, details={"error": "StateError: QMPClient is disconnecting"})


def test_a_campaign_stops_after_runs_in_a_row_fail_and_keeps_them(tmp_path):
    spec = small_spec()
    with ResultsStore(tmp_path) as store:
        with pytest.raises(CampaignFailed, match=r"stopped after 3 runs in a row .* QMPClient is disconnecting"
                                                 r" \(details: .*/runs/.*\.json\)") as stopped:
            run_campaign(spec, store, FailingFrom(first=4))
        assert list(store.statuses.values()) == ["ok"] * 4 + ["failed"] * 3  # recorded, then stopped
        assert str(tmp_path) in str(stopped.value)
        assert store.manifest()["stopped"]
    with ResultsStore(tmp_path / "one") as store, pytest.raises(CampaignFailed, match="after 1 runs"):
        run_campaign(spec, store, FailingFrom(), max_failures=1)


def test_a_failure_between_ok_runs_does_not_stop_the_campaign(tmp_path):
    spec = small_spec()
    bad = {r.run_id for r in plan(spec)[::2]}  # every other run fails: never 3 in a row
    with ResultsStore(tmp_path) as store:
        run_campaign(spec, store, FakeExecutor(bad=bad))
        assert shortfall(spec, cells(spec), store.statuses) == {}


def test_shortfall_names_the_cells_without_enough_ok_runs():
    spec = small_spec(repetitions=2)
    chosen = cells(spec)
    statuses = {r.run_id: "ok" for r in plan(spec)}
    assert shortfall(spec, chosen, statuses) == {}
    statuses["qemu.synthetic1.balanced.nomig.r2"] = "failed"
    statuses["qemu.synthetic1.balanced.nomig.r3"] = "invalid"
    assert shortfall(spec, chosen, statuses) == {"qemu.synthetic1.balanced.nomig": 1}


def test_a_different_spec_is_refused(tmp_path):
    with ResultsStore(tmp_path) as store:
        run_campaign(small_spec(repetitions=1), store, FakeExecutor())
        run_campaign(small_spec(repetitions=2), store, FakeExecutor())  # more reps: same campaign
        with pytest.raises(InputError, match="holds results of a different spec"):
            run_campaign(small_spec(scale=0.5), store, FakeExecutor())


def test_needs_more_reps_is_a_pure_rule():
    tight = [100.0, 100.5, 99.5, 100.2]
    spread = [60.0, 140.0, 90.0, 120.0]
    samples = {"tight": tight, "spread": spread, "few": [100.0, 100.1], "capped": spread * 3}
    assert needs_more_reps(samples, 5.0, min_reps=3, max_reps=10) == {"spread", "few"}
    assert needs_more_reps(samples, 80.0, min_reps=3, max_reps=10) == {"few"}
    assert needs_more_reps({"one": [5.0]}, 50.0, min_reps=1, max_reps=10) == {"one"}


def test_ci_width_adds_repetitions_up_to_the_cap(tmp_path):
    spec = small_spec(repetitions=2)
    with ResultsStore(tmp_path / "wide") as store:
        run_campaign(spec, store, FakeExecutor(), ci_width=1000.0, max_reps=5)
        assert len(store.statuses) == 6 * 2
    with ResultsStore(tmp_path / "narrow") as store:
        run_campaign(spec, store, FakeExecutor(), ci_width=0.001, max_reps=5)
        assert len(store.statuses) == 6 * 5


WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"


@pytest.fixture(scope="module")
def synthetic1(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("bin") / "synthetic1"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(WORKLOADS / "synthetic1.c"), "-lm"], check=True)
    return binary


def test_synthetic_random_follows_the_run_seed(synthetic1):
    """A run's workload seed drives Synthetic-Random: same seed, same draws; the draws pick 1, 2
    or 4 Synthetic1 or a sleep, both shortened by --scale."""
    seed = plan(small_spec())[0].workload_seed("vm1")
    argv = [sys.executable, str(WORKLOADS / "synthetic_random.py"), str(seed), "--scale", "0.002",
            "--synthetic1", str(synthetic1)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    draws = [line.split()[2] for line in first[:5]]
    assert draws == [line.split()[2] for line in again[:5]]
    assert first[-1] == "done 5 draws, 0 failed"
    for line in first[:5]:
        r = int(line.split()[2].removeprefix("r="))
        expected = "1 synthetic1" if r < 20 else "2 synthetic1" if r < 40 else "4 synthetic1" if r < 50 else "sleep 0.06 s"
        assert expected in line, line
    needs_binary = any(int(d.removeprefix("r=")) < 50 for d in draws)
    missing = subprocess.run([*argv[:-1], "/nonexistent/synthetic1"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert missing.returncode == (2 if needs_binary else 0)
    assert ("/nonexistent/synthetic1: No such file" in missing.stderr) == needs_binary


def test_progress_reports_done_total_and_eta(tmp_path):
    seen = []
    with ResultsStore(tmp_path) as store:
        run_campaign(small_spec(repetitions=2), store, FakeExecutor(), on_progress=seen.append)
    assert [p.done for p in seen] == list(range(12)) and {p.total for p in seen} == {12}
    assert seen[0].eta_s is None and all(p.eta_s is not None and p.eta_s >= 0 for p in seen[1:])
    assert seen[-1].current.run_id not in {p.current.run_id for p in seen[:-1]}


def test_controller_provenance_names_the_checkout():
    from testbed.runner.campaign import controller_provenance

    facts = controller_provenance()
    assert len(facts["git"]["revision"]) == 40 and isinstance(facts["git"]["dirty"], bool)
    assert any(line.lower().startswith("pydantic==") for line in facts["pip_freeze"])


def test_a_campaign_ends_on_sigterm_and_ignored_sigint_as_on_ctrl_c() -> None:
    """`testbed run` in the background (SIGINT ignored by the shell) or stopped with `kill`: both
    signals become KeyboardInterrupt, so the run in flight is cleaned up and records are kept."""
    import os
    import signal
    import time

    from testbed.commands.run import _interruptible

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _interruptible()
        for sig in saved:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
