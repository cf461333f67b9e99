"""The Appendix A migration study (`testbed run` on a spec of kind migration): what the spec expands
to, what is refused before any host is touched, Table A.1 and its figure from recorded results,
and, on the embedded lab, one tiny variant end to end through `testbed run`, `plot` and `report`.

The refusals are checked through `testbed run` only with specs that must be refused whatever the
lab can do (so the command never reaches the lab); the rest call the checks themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed.analysis.appendix_a import overhead_table, phase_table
from testbed.analysis.data import load
from testbed.cli import main
from testbed.drivers.base import MigrationMode, MigrationOrder
from testbed.errors import InputError
from testbed.lab import Lab, parse_rate, tc_rate_bps
from testbed.results import CpuSample, MigrationRow, ResultsStore, read_table
from testbed.runner import executor, services
from testbed.runner.campaign import Run, RunResult, cells, run_campaign
from testbed.runner.executor import APPS, chains
from testbed.runner.migration_study import (
    ALLOCATOR_SHARE,
    MIGRATION_TIMEOUT_BASE_S,
    OWN_APPS,
    app_argvs,
    migration_timeout,
    supported,
)
from testbed.runner.services import SERVICES
from testbed.spec import App, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
APPENDIX_A = REPO / "experiments" / "appendix_a.yml"
TINY = {"name": "tiny-a", "kind": "migration", "techniques": ["container"], "app": "idle", "vms": 1,
        "memory_mb": 64, "vcpus": 2, "warmup_s": 2, "matrix": {"layout": [[1, 0, 0]], "migration": [True]},
        "repetitions": 1, "seed": 1}


def test_appendix_a_sweeps_the_idle_vm_and_runs_the_apps_at_full_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 0)  # the embedded lab's default
    spec = load_spec(APPENDIX_A)
    variants = spec.variants()
    assert {v.placement for v in variants} == {(1,)} and all(v.migration for v in variants)
    assert all(v.mode is None for v in variants)  # each technique's own: QEMU pre-copy, containers stop-and-copy
    rates = spec.matrix.link_rate
    full = max(rates, key=parse_rate)
    assert len(rates) >= 4
    compressions = {"container": ("none", "bzip2", "zstd"), "qemu": ("none", "zstd")}  # QEMU has no bzip2
    apps = {"container": {"allocator", "http", "database", "game"}, "qemu": {"allocator", "kernel"}}  # kernel: swap
    for technique in ("container", "qemu"):
        mine = spec.variants(technique)
        idle = {(v.link_rate, v.compression) for v in mine if v.app == "idle"}
        assert idle == {(r, c) for r in rates for c in compressions[technique]}
        assert {(v.app, v.link_rate) for v in mine if v.app != "idle"} == {(a, full) for a in apps[technique]}
        monkeypatch.setattr(services, "game_missing", lambda: None)  # the game's package is opt-in
        supported(spec, [technique])
    assert len(cells(spec)) * spec.repetitions == (3 * len(rates) + 12 + 2 * len(rates) + 4) * 5


def test_exclude_rules_may_name_a_technique() -> None:
    spec = parse_spec(TINY | {"techniques": ["container", "qemu"], "matrix": TINY["matrix"] | {
        "compression": ["none", "bzip2"]}, "exclude": [{"technique": "qemu", "compression": "bzip2"}]})
    assert len(spec.variants()) == 2 and len(spec.variants("container")) == 2 and len(spec.variants("qemu")) == 1
    assert [c.key for c in cells(spec)] == ["container.idle.1-0-0.mig", "container.idle.1-0-0.mig.bzip2",
                                            "qemu.idle.1-0-0.mig"]
    for exclude, message in (([{"technique": "xen"}], "exclude.0.technique: not one of the spec's techniques"),
                             ([{"technique": "container"}], "exclude: excludes every variant of container")):
        with pytest.raises(InputError, match=message):
            parse_spec(TINY | {"techniques": ["container", "qemu"], "exclude": exclude})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"techniques": ["qemu"], "matrix": {"compression": ["none", "bzip2"]}},
         "matrix.compression.1: bzip2: technique qemu compresses migrations with zstd or zlib only"),
        ({"techniques": ["container"], "matrix": {"mode": ["precopy"]}},
         "matrix.mode.0: precopy: technique container migrates by stopcopy only"),
        ({"techniques": ["container", "qemu"], "balancer": {"mode": "postcopy"}},
         "balancer.mode: postcopy: technique container migrates by stopcopy only"),
        ({"techniques": ["qemu"], "matrix": {"mode": ["postcopy"], "compression": ["zstd"]}},
         "matrix.compression.0: zstd: QEMU cannot compress a post-copy migration"),
    ],
)
def test_spec_refuses_what_a_technique_cannot_migrate_with(change: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        parse_spec({"name": "t"} | change, "x.yml")
    assert str(err.value) == f"x.yml: {message}"


def test_compression_each_technique_has_is_accepted() -> None:
    spec = parse_spec(TINY | {"techniques": ["container", "qemu"],
                              "matrix": TINY["matrix"] | {"compression": ["none", "zstd"]}})
    assert [v.compression for v in spec.variants()] == ["none", "zstd"]
    parse_spec(TINY | {"matrix": TINY["matrix"] | {"compression": ["bzip2"]}})  # containers: the thesis' bzip2


@pytest.mark.parametrize("app", typing.get_args(App))
def test_study_runs_its_own_apps_and_the_programs_the_vms_have(app: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 0)
    spec = parse_spec(TINY | {"app": app, "memory_mb": 256})
    if app not in (*OWN_APPS, *APPS):  # e.g. `kernel` before the kernel-compile workload existed
        with pytest.raises(InputError, match=rf"tiny-a: matrix.app: '{app}' has no program in the VMs yet"):
            supported(spec, ["container"])
    elif app == "kernel":
        supported(spec, ["qemu"])
        with pytest.raises(InputError, match="needs memory_mb >= 300 in a container"):
            supported(spec, ["container"])  # -j4 in 256 MB: OOM-killed without swap
        supported(spec.model_copy(update={"memory_mb": 300}), ["container"])
        monkeypatch.setattr(executor, "machine_swap_mb", lambda: 44)  # what -j4 needs beyond 256 MB
        supported(spec, ["container"])
    elif app in SERVICES:
        monkeypatch.setattr(services, "game_missing", lambda: None)  # the game's package is opt-in
        supported(spec, ["container"])
        with pytest.raises(InputError, match=rf"matrix.app: '{app}' runs in containers only"):
            supported(spec, ["qemu"])  # a busybox guest has no apache2 or postgres
    else:
        supported(spec, ["container", "qemu"])


@pytest.mark.parametrize(
    ("change", "techniques", "message"),
    [
        ({"kind": "balancing", "matrix": {"layout": [[1, 0, 0]]}}, ["qemu"], "kind: the migration study runs"),
        ({"vms": 2, "matrix": {"layout": [[2, 0, 0]], "migration": [True]}}, ["qemu"],
         "vms: the migration study moves one VM per run"),
        ({"techniques": ["sim"]}, ["sim"], "techniques: 'sim' is not run by the migration study"),
        ({"app": "allocator", "memory_mb": 128}, ["qemu"], "memory_mb: .* QEMU guest keeps ~96 MB .* >= 192"),
    ],
)
def test_study_refuses_what_it_cannot_run(change: dict, techniques: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        supported(parse_spec(TINY | change), techniques)


@pytest.mark.parametrize(
    ("change", "flags", "message"),
    [
        ({"vms": 2, "matrix": {"layout": [[2, 0, 0]], "migration": [True]}}, [],
         "tiny-a: vms: the migration study moves one VM per run (thesis App. A), not 2"),
        ({}, ["--ci-width", "5"], "--ci-width: it widens on execution times, which a migration study does not"),
    ],
)
def test_testbed_run_refuses_a_study_before_touching_the_lab(tmp_path: Path, capsys, change: dict,
                                                              flags: list[str], message: str) -> None:
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(TINY | change))
    assert main(["run", str(spec), "--results", str(tmp_path / "r"), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"testbed: error: {message}")
    assert not (tmp_path / "r").exists()


def test_app_programs() -> None:
    spec = parse_spec(TINY | {"memory_mb": 256, "scale": 0.5})
    variant = spec.variants()[0]
    assert app_argvs(Run(spec, "container", variant, 1), "vm1", 100) == []
    allocator = parse_spec(TINY | {"memory_mb": 256, "app": "allocator"})
    (argv,) = app_argvs(Run(allocator, "qemu", allocator.variants()[0], 1), "vm1", 100.2)
    assert argv[:3] == ("memwriter", str(int(256 * ALLOCATOR_SHARE)), "0") and int(argv[3]) > 100.2
    s1 = parse_spec(TINY | {"app": "synthetic1", "instances": 2, "scale": 0.5})
    run = Run(s1, "qemu", s1.variants()[0], 1)
    assert app_argvs(run, "vm1", 100) == [step.argvs[0] for chain in chains(run, "vm1") for step in chain[:1]]


def test_migration_timeout_covers_the_memory_twice_at_the_link_rate() -> None:
    assert migration_timeout(256, "5mbit") == pytest.approx(MIGRATION_TIMEOUT_BASE_S + 2 * 256 * 2**20 * 8 / 5e6)
    assert migration_timeout(256, "5mbit") > migration_timeout(256, "100mbit") > MIGRATION_TIMEOUT_BASE_S


# --- Table A.1 from recorded results ----------------------------------------------------------

WARMUP_S, SAMPLE_S = 12.0, 0.5
BEFORE = {"tb-pm1": 8.0, "tb-pm2": 1.5}  # each PM's CPU % before the migration
EXTRA = {"tb-pm1": 0.9, "tb-pm2": 0.4}  # the CPU-seconds the migration costs each


@dataclass
class RecordedStudy:
    """Study runs as the executor records them: a record per run (its phases sum to the total,
    the copy takes the dump's time at the link rate), used as INPUT for the analysis."""

    def execute(self, run: Run) -> RunResult:
        start = 1_790_000_000.0 + 100 * run.rep
        dump = 3_000_000 if run.variant.app == "idle" else 130_000_000
        wire = dump // 4 if run.variant.compression != "none" else dump
        copy = wire * 8 / parse_rate(run.variant.link_rate or "100mbit")
        phases = {"suspend": 0.03, "dump": dump / 5e8, "copy": copy, "undump": dump / 6e8, "resume": 0.01 * run.rep}
        total = sum(phases.values())
        order = MigrationOrder("vm1", "tb-pm1", "tb-pm2", MigrationMode.STOPCOPY, start + WARMUP_S)
        record = order.record(total, downtime_s=total, bytes_sent=wire, phases=phases,
                              details={"dump_bytes": dump, "memory_mb": run.spec.memory_mb})
        row = MigrationRow("vm1", "tb-pm1", "tb-pm2", "stopcopy", start + WARMUP_S, total, total, wire, "completed")
        return RunResult("ok", start, start + WARMUP_S + total + 5, migrations=[row], cpu_samples=self.cpu(total),
                         details={"migration": record.as_dict()})

    @staticmethod
    def cpu(total: float) -> list[CpuSample]:
        """Each PM at its BEFORE rate, plus its EXTRA CPU-seconds spread over the samples that
        overlap the migration (WARMUP_S to WARMUP_S + total)."""
        starts = [SAMPLE_S * k for k in range(int((WARMUP_S + total + 5) / SAMPLE_S))]
        during = [t for t in starts if t < WARMUP_S + total and t + SAMPLE_S > WARMUP_S]
        return [CpuSample(t, pm, "", BEFORE[pm] + (100 * EXTRA[pm] / (len(during) * SAMPLE_S) if t in during else 0))
                for t in starts for pm in BEFORE]


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    spec = parse_spec(TINY | {"repetitions": 2, "matrix": TINY["matrix"] | {
        "app": ["idle", "allocator"], "link_rate": ["10mbit", "100mbit"], "compression": ["none", "bzip2"]}})
    with ResultsStore(tmp_path) as store:
        run_campaign(spec, store, RecordedStudy())
    return tmp_path


def test_phase_table_means_each_phase_per_variant(study_dir: Path) -> None:
    table = phase_table(load(study_dir))
    assert len(table) == 2 * 2 * 2 and (table["runs"] == 2).all()
    assert list(table.columns[:6]) == ["technique", "mode", "app", "link_rate", "compression", "runs"]
    assert [c for c in table.columns if c.endswith("_s")] == [
        "suspend_s", "dump_s", "copy_s", "undump_s", "resume_s", "total_time_s", "downtime_s"]
    row = table[(table["app"] == "allocator") & (table["link_rate"] == "10mbit") & (table["compression"] == "none")]
    assert row["copy_s"].item() == pytest.approx(130_000_000 * 8 / 10e6)
    assert row["resume_s"].item() == pytest.approx(0.015)  # the mean of reps 1 and 2
    assert row["moved_mb"].item() == pytest.approx(130_000_000 / 2**20)
    compressed = table[table["compression"] == "bzip2"]
    assert (compressed["wire_mb"] < compressed["moved_mb"]).all()
    assert table["link_rate"].tolist()[:2] == ["10mbit", "10mbit"]  # slowest first within an app


def test_overhead_table_finds_the_cpu_each_pm_spent_on_the_migration(study_dir: Path) -> None:
    table = overhead_table(load(study_dir))
    assert len(table) == 2 * 2 * 2 and (table["runs"] == 2).all()
    assert table["source_cpu_s"].to_numpy() == pytest.approx(EXTRA["tb-pm1"], rel=1e-4)  # the CSV keeps 6 digits
    assert table["destination_cpu_s"].to_numpy() == pytest.approx(EXTRA["tb-pm2"], rel=1e-4)
    assert table["source_before_pct"].to_numpy() == pytest.approx(BEFORE["tb-pm1"])
    assert table["source_cpu_s_sd"].to_numpy() == pytest.approx(0, abs=1e-5)
    assert table["link_rate"].tolist()[:2] == ["10mbit", "10mbit"]


def test_plot_and_report_show_table_a1(study_dir: Path) -> None:
    assert main(["plot", str(study_dir)]) == 0
    sidecar = json.loads((study_dir / "figures" / "migration_phases.json").read_text())
    assert len(sidecar["runs"]) == 16 and (study_dir / "figures" / "migration_phases.png").stat().st_size > 5000
    assert (study_dir / "figures" / "migration_vs_link_rate.png").exists()
    assert main(["report", str(study_dir)]) == 0
    page = (study_dir / "report.html").read_text()
    assert "<h2>Migration phases (Table A.1)</h2>" in page and "<th>undump_s</th>" in page
    assert "<h2>Migration CPU overhead</h2>" in page and "<th>destination_cpu_s_sd</th>" in page


# --- on the embedded lab ------------------------------------------------------------------------

RATE = "20mbit"


def _testbed(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _link_rates(lab: Lab) -> set[int | None]:
    return {rate for pm in lab.pms for rate in (tc_rate_bps(pm.veth), tc_rate_bps("eth0", pm.name))}


@pytest.mark.lab
def test_idle_container_migrates_through_testbed_run_then_plots(embedded_lab: Lab, tmp_path: Path) -> None:
    spec_file = tmp_path / "tiny.yml"
    spec_file.write_text(yaml.safe_dump(TINY | {"matrix": TINY["matrix"] | {"link_rate": [RATE],
                                                                             "compression": ["zstd"]}}))
    results = tmp_path / "results"
    began = time.monotonic()
    ran = _testbed("run", str(spec_file), "--results", str(results), timeout=600)
    print(f"testbed run (App. A, container, idle, {RATE}, zstd, 1 rep): {time.monotonic() - began:.0f} s")
    assert ran.returncode == 0, ran.stderr[-3000:]
    (run,) = read_table(results, "runs")
    details = json.loads((results / "runs" / f"{run['run_id']}.json").read_text())
    assert run["status"] == "ok", details.get("error")
    (move,) = read_table(results, "migrations")
    record = details["migration"]
    print(json.dumps({k: record[k] for k in ("total_time_s", "downtime_s", "bytes", "phases")}),
          record["details"].get("dump_bytes"))
    assert (move["source"], move["destination"], move["mode"], move["status"]) == (
        "tb-pm1", "tb-pm2", "stopcopy", "completed")
    assert list(record["phases"]) == ["suspend", "dump", "copy", "undump", "resume"]
    assert record["details"]["compression"] == "zstd" and details["continued"] is True
    # The variant's rate was on the links (read back) and shaped the copy; the lab's came back.
    rate = parse_rate(RATE) // 8 * 8
    assert {r for sides in details["links"]["rates_bps"].values() for r in sides.values()} == {rate}
    assert record["phases"]["copy"] >= 0.9 * int(move["bytes"]) * 8 / rate
    assert float(move["downtime_s"]) == pytest.approx(sum(record["phases"].values()), rel=1e-3)
    assert _link_rates(embedded_lab) == {pm.link_rate_bps // 8 * 8 for pm in embedded_lab.pms}
    (cost,) = overhead_table(load(results)).itertuples()  # the dump agent's work, seen in the PMs' CPU
    print(f"migration CPU: source {cost.source_cpu_s:.2f} CPU-s, destination {cost.destination_cpu_s:.2f} CPU-s")
    assert cost.source_cpu_s > 0 and cost.destination_cpu_s > 0

    assert _testbed("plot", str(results), timeout=120).returncode == 0
    for figure in ("migration_vs_link_rate", "migration_phases"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 5000
    assert _testbed("report", str(results), timeout=120).returncode == 0
    assert "Table A.1" in (results / "report.html").read_text()
