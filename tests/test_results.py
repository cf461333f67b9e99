"""The results store: the exact CSV contract, and crash safety for real: a writer process is
SIGKILLed between tables, in the middle of a write, and at random instants of a campaign; the
store reopened holds no partial or duplicate rows and a rerun resumes where it stopped."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from campaign_helpers import FakeExecutor, fake_result, small_spec

from testbed.errors import InputError
from testbed.results import TABLES, ResultsStore, read_table
from testbed.runner.campaign import cells, pending_runs, run_campaign

TESTS = Path(__file__).resolve().parent

CONTRACT = {
    "runs": "run_id,experiment,technique,app,layout,migration,rep,started_at,finished_at,status",
    "vm_times": "run_id,vm,start_host,end_host,exec_time_s",
    "migrations": "run_id,vm,source,destination,mode,started_at,total_time_s,downtime_s,bytes,status",
    "cpu_samples": "run_id,t_s,host,vm,cpu_pct",
}


def rows(directory: Path, table: str) -> list[dict[str, str]]:
    with (directory / f"{table}.csv").open() as f:
        return list(csv.DictReader(f))


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_tables_have_the_contract_headers_and_rows(tmp_path):
    spec = small_spec(repetitions=1, techniques=["qemu"])
    with ResultsStore(tmp_path) as store:
        run_campaign(spec, store, FakeExecutor())
    for table, header in CONTRACT.items():
        assert (tmp_path / f"{table}.csv").read_text().splitlines()[0] == header
    runs = rows(tmp_path, "runs")
    assert len(runs) == 3 and {r["status"] for r in runs} == {"ok"}
    first = next(r for r in runs if r["run_id"] == "qemu.synthetic1.unbalanced.mig.r1")
    assert first["migration"] == "true" and first["layout"] == "unbalanced" and first["rep"] == "1"
    assert first["started_at"].startswith("2026-") and first["started_at"].endswith("+00:00")
    assert len(rows(tmp_path, "vm_times")) == 3 * 5
    (move,) = rows(tmp_path, "migrations")
    assert move["run_id"] == first["run_id"] and move["bytes"] == "73000000" and move["mode"] == "precopy"
    assert float(move["downtime_s"]) == pytest.approx(float(move["total_time_s"]) / 10, abs=1e-5)
    assert (tmp_path / "runs" / f"{first['run_id']}.json").exists()
    manifest = store.manifest()
    assert manifest["experiment"] == "tiny" and manifest["spec"]["vms"] == 5
    assert set(manifest["variants"]) == {"synthetic1.balanced.nomig", "synthetic1.unbalanced.nomig",
                                         "synthetic1.unbalanced.mig"}


def test_a_second_writer_is_refused(tmp_path):
    with ResultsStore(tmp_path), pytest.raises(InputError, match="another runner is writing"):
        ResultsStore(tmp_path)


def test_a_foreign_header_is_refused(tmp_path):
    (tmp_path / "runs.csv").write_text("id,when\n")
    with pytest.raises(InputError, match="runs.csv: header id,when is not the results contract"):
        ResultsStore(tmp_path)


# The writer process: records rep 1 of one cell, then dies by SIGKILL at `where` while recording
# rep 2 -- after a table's append (between tables) or in the middle of a write (a torn line).
_KILLED_WRITER = """
    import os, resource, signal, sys
    from campaign_helpers import fake_result, small_spec
    from testbed import results
    from testbed.runner.campaign import cells, pending_runs
    from testbed.results import ResultsStore, RunRow

    where = sys.argv[1] if len(sys.argv) > 1 else {where!r}
    spec = small_spec()
    run1, run2 = [r for r in pending_runs(spec, cells(spec), {{}}, {{}}) if r.run_id.startswith("qemu.synthetic1.unbalanced.mig")][:2]

    def record(store, run):
        res = fake_result(run)
        store.record(RunRow(run.run_id, spec.name, run.technique, run.variant.app, run.variant.layout,
                            run.variant.migration, run.rep, res.started_at, res.finished_at, res.status),
                     res.vm_times, res.migrations, res.cpu_samples)

    store = ResultsStore({directory!r})
    record(store, run1)
    append = ResultsStore._append
    def dying_append(self, table, rows):
        if where == "torn:" + table:
            # The store's own write, cut short by the kernel (the file may grow by only half of
            # the rows, as on a full disk), and the process dies before it can cut the fragment back.
            half = self.path(table).stat().st_size + len(results._csv_text(rows).encode()) // 2
            resource.setrlimit(resource.RLIMIT_FSIZE, (half, resource.RLIM_INFINITY))
            os.truncate = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        append(self, table, rows)
        if where == "after:" + table:
            os.kill(os.getpid(), signal.SIGKILL)
    ResultsStore._append = dying_append
    record(store, run2)
"""


@pytest.mark.parametrize("where", ["after:vm_times", "after:migrations", "after:cpu_samples",
                                   "torn:cpu_samples", "torn:runs"])
def test_killed_mid_record_leaves_no_partial_run(tmp_path, where):
    proc = run_python(_KILLED_WRITER.format(where=where, directory=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if where.startswith("torn:"):  # the kernel left a fragment of a line
        assert not (tmp_path / f"{where[5:]}.csv").read_bytes().endswith(b"\n")
    raw = {t: rows(tmp_path, t) for t in TABLES}
    assert any(r["run_id"].endswith(".r2") for t in TABLES for r in raw[t]) or where.startswith("torn")
    assert read_table(tmp_path, "vm_times") == [r for r in raw["vm_times"] if r["run_id"].endswith(".r1")]

    spec = small_spec()
    with ResultsStore(tmp_path) as store:
        assert store.recorded() == {"qemu.synthetic1.unbalanced.mig.r1"}
        for table in TABLES:  # the cut-short run's rows are gone from disk
            assert {r["run_id"] for r in rows(tmp_path, table)} == {"qemu.synthetic1.unbalanced.mig.r1"}
        run_campaign(spec, store, FakeExecutor())
    runs = rows(tmp_path, "runs")
    assert len(runs) == len({r["run_id"] for r in runs}) == 2 * 3 * 3
    assert_complete_and_unique(tmp_path, spec)


_FULL_DISK_WRITER = """
    import resource, signal
    from campaign_helpers import fake_result, small_spec
    from testbed.results import ResultsStore, RunRow
    from testbed.runner.campaign import cells, pending_runs

    spec = small_spec()
    run1, run2, run3 = pending_runs(spec, cells(spec), {{}}, {{}})[:3]

    def record(store, run):
        res = fake_result(run)
        store.record(RunRow(run.run_id, spec.name, run.technique, run.variant.app, run.variant.layout,
                            run.variant.migration, run.rep, res.started_at, res.finished_at, res.status),
                     res.vm_times, res.migrations, res.cpu_samples)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
    with ResultsStore({directory!r}) as store:
        record(store, run1)
        append = ResultsStore._append
        def full_disk(self, table, rows):
            if table == "cpu_samples":  # vm_times went in; cpu_samples gets a few bytes only
                resource.setrlimit(resource.RLIMIT_FSIZE, (self.path(table).stat().st_size + 7, resource.RLIM_INFINITY))
            try:
                append(self, table, rows)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        ResultsStore._append = full_disk
        try:
            record(store, run2)
        except OSError as err:
            print("full:", err)
        ResultsStore._append = append
        record(store, run2)  # the store stays in use: the same run again, then the next
        record(store, run3)
"""


def test_a_failed_write_leaves_no_fragment_for_a_store_still_in_use(tmp_path):
    """A record that fails on a real short write (the file size limit standing in for a full
    disk) cuts every table back, so recording on with the same store glues nothing onto a
    fragment and leaves no second copy of the failed run's rows."""
    proc = run_python(_FULL_DISK_WRITER.format(directory=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("full: ") and "short write" in proc.stdout
    assert len(rows(tmp_path, "runs")) == 3
    assert_complete_and_unique(tmp_path, small_spec())


def assert_complete_and_unique(directory: Path, spec) -> None:
    """Every recorded run has all of its rows exactly once, and no table has other rows."""
    recorded = {r["run_id"] for r in rows(directory, "runs")}
    by_id = {r.run_id: r for r in pending_runs(spec, cells(spec), {}, {})}
    vm_rows = Counter((r["run_id"], r["vm"]) for r in rows(directory, "vm_times"))
    assert set(vm_rows.values()) == {1}
    assert {run_id for run_id, _ in vm_rows} == recorded
    samples = Counter(r["run_id"] for r in rows(directory, "cpu_samples"))
    moves = Counter(r["run_id"] for r in rows(directory, "migrations"))
    for run_id in recorded:
        expected = fake_result(by_id[run_id])
        assert samples[run_id] == len(expected.cpu_samples)
        assert moves[run_id] == len(expected.migrations)
    assert set(samples) == recorded and set(moves) <= recorded


_CAMPAIGN = """
    from campaign_helpers import FakeExecutor, small_spec
    from testbed.results import ResultsStore
    from testbed.runner.campaign import run_campaign
    with ResultsStore({directory!r}) as store:
        run_campaign(small_spec(repetitions=15), store, FakeExecutor())
"""


def test_killed_at_random_instants_then_resumed(tmp_path):
    """SIGKILL a real campaign several times at random moments; each restart resumes, and the
    final store is exactly the full campaign."""
    spec = small_spec(repetitions=15)
    env = os.environ | {"PYTHONPATH": str(TESTS)}
    code = textwrap.dedent(_CAMPAIGN.format(directory=str(tmp_path)))
    rng = random.Random(3)
    counts = []
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        runs_csv = tmp_path / "runs.csv"
        before = len(rows(tmp_path, "runs")) if runs_csv.exists() else 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not runs_csv.exists() or len(rows(tmp_path, "runs")) <= before):
            time.sleep(0.01)  # wait for the campaign to be under way ...
        time.sleep(rng.uniform(0.0, 0.05))  # ... then kill it at a random instant
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        counts.append(len(rows(tmp_path, "runs")))
    print("runs recorded at each kill:", counts)
    assert counts == sorted(counts) and counts[-1] < 2 * 3 * 15, counts
    final = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, check=False)
    assert final.returncode == 0
    assert len(rows(tmp_path, "runs")) == 2 * 3 * 15
    assert_complete_and_unique(tmp_path, spec)
