"""Statistics against textbook values, and `testbed plot` / `testbed report` from a small results
directory written by the store (runs made up by tests/campaign_helpers.py): every figure kind
exists as valid PNG and SVG, sidecars name exactly the runs drawn, the HTML holds the tables."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from campaign_helpers import FakeExecutor, appendix_spec, small_spec
from scipy import stats as scipy_stats

from testbed.analysis.data import comparison_table, load, variant_table
from testbed.analysis.stats import relative_change, summarize, welch_p
from testbed.cli import main
from testbed.results import ResultsStore
from testbed.runner.campaign import run_campaign

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INVALID = "qemu.synthetic1.unbalanced.mig.r2"


def test_summary_matches_the_t_interval():
    s = summarize([10.0, 12.0, 14.0])
    assert (s.n, s.mean, s.std) == (3, 12.0, 2.0)
    assert s.half_width == pytest.approx(4.302653 * 2.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    assert (s.ci_low, s.ci_high) == pytest.approx((12.0 - s.half_width, 12.0 + s.half_width))
    one = summarize([5.0])
    assert math.isnan(one.std) and math.isinf(one.half_width)


def test_welch_and_relative_change():
    a, b = [61.0, 63.0, 60.0, 62.0], [100.0, 104.0, 98.0, 101.0]
    assert welch_p(a, b) == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert welch_p(a, b) < 0.001 and welch_p(a, a) == pytest.approx(1.0)
    assert math.isnan(welch_p([1.0], b))
    assert relative_change([61.0, 63.0], [100.0, 100.0]) == pytest.approx(-0.38)


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("results")
    with ResultsStore(directory) as store:
        run_campaign(small_spec(), store, FakeExecutor(bad={INVALID}), provenance={"lab": {"pms": 3}})
    return directory


def test_tables_use_ok_runs_only(campaign_dir):
    c = load(campaign_dir)
    table = variant_table(c)
    assert len(table) == 6 and set(table["runs"]) == {3}
    row = table[(table["technique"] == "qemu") & (table["layout"] == "unbalanced") & table["migration"]].iloc[0]
    assert INVALID not in row["run_ids"] and "qemu.synthetic1.unbalanced.mig.r4" in row["run_ids"]
    assert row["ci_low_s"] < row["mean_s"] < row["ci_high_s"]
    twins = comparison_table(c)
    assert len(twins) == 2 and (twins["layout"] == "unbalanced").all()
    assert (twins["change_pct"] < -20).all() and (twins["welch_p"] < 0.01).all()


def check_figure_files(figdir: Path, name: str) -> dict:
    png = (figdir / f"{name}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    root = ET.parse(figdir / f"{name}.svg").getroot()
    assert root.tag.endswith("svg")
    return json.loads((figdir / f"{name}.json").read_text())


def test_testbed_plot_draws_every_kind_with_sidecars(campaign_dir, capsys):
    assert main(["plot", str(campaign_dir)]) == 0
    figdir = campaign_dir / "figures"
    c = load(campaign_dir)
    ok = set(c.ok_runs["run_id"])
    timeline = check_figure_files(figdir, "cpu_timeline.qemu.synthetic1.unbalanced.mig.r1")
    assert timeline["runs"] == ["qemu.synthetic1.unbalanced.mig.r1"] and timeline["kind"] == "cpu_timeline"
    assert len(list(figdir.glob("cpu_timeline.*.json"))) == 6
    qemu = check_figure_files(figdir, "exec_time.qemu.synthetic1")
    assert set(qemu["runs"]) == {r for r in ok if r.startswith("qemu.")} and INVALID not in qemu["runs"]
    both = check_figure_files(figdir, "techniques.synthetic1")
    assert set(both["runs"]) == ok
    assert "migration_vs_link_rate" not in capsys.readouterr().out  # no link-rate variants here


def test_link_rate_figure_for_appendix_a(tmp_path):
    with ResultsStore(tmp_path) as store:
        run_campaign(appendix_spec(), store, FakeExecutor())
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    sidecar = check_figure_files(tmp_path / "figs", "migration_vs_link_rate")
    assert len(sidecar["runs"]) == 2 * 2 * 2
    assert load(tmp_path).runs["link_rate"].tolist().count("10mbit") == 4


def test_testbed_report_is_one_self_contained_page(campaign_dir, tmp_path):
    out = tmp_path / "page.html"
    assert main(["report", str(campaign_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<table>") == 3 and "<th>ci_low_s</th>" in page and "<th>welch_p</th>" in page
    assert "<th>run_over_interval</th>" in page and "No time scale" in page  # the manager's rounds per run (#16)
    assert page.count('src="data:image/png;base64,') == len(list((campaign_dir / "figures").glob("*.png")))
    assert "src=\"http" not in page and "<link" not in page
    assert "invalid: 1, ok: 18" in page and "&quot;pms&quot;: 3" in page
    assert f"<li><code>{INVALID}</code>: invalid" in page  # listed as left out, drawn nowhere


def test_variant_label_names_mode_and_concurrency_only_when_they_vary():
    from testbed.analysis.data import variant_label, varying_axes

    row = {"layout": "unbalanced", "migration": True, "mode": "precopy", "link_rate": "",
           "compression": "none", "concurrency": "10"}
    assert variant_label(row) == "unbalanced, migration"
    assert variant_label(row, frozenset({"mode", "concurrency"})) == "unbalanced, migration, precopy, 10 at once"
    import pandas as pd

    runs = pd.DataFrame({"mode": ["", "precopy", "stopcopy"], "concurrency": ["1", "1", "1"]})
    assert varying_axes(runs) == {"mode"}


def test_plot_aggregates_above_the_per_vm_and_per_pm_limits(tmp_path):
    """60 VMs on 20 PMs (simulated, seconds): a box per variant instead of 60 bars, the PMs' load
    spread instead of 20 panels, and each sidecar says so; labels tell the two modes apart."""
    from testbed.analysis.plots import PER_PM_UP_TO, PER_VM_UP_TO, plot_all
    from testbed.sim.calibration import Calibration
    from testbed.sim.executor import SimExecutor
    from testbed.spec import parse_spec

    spec = parse_spec({"name": "wide", "techniques": ["sim"], "app": "synthetic-random", "vms": 60, "pms": 20,
                       "matrix": {"layout": ["unbalanced"], "migration": [True], "mode": ["precopy", "stopcopy"]},
                       "repetitions": 1, "scale": 0.1})
    assert spec.vms > PER_VM_UP_TO and spec.pms > PER_PM_UP_TO
    executor = SimExecutor(Calibration(), "defaults")
    with ResultsStore(tmp_path / "wide") as store:
        run_campaign(spec, store, executor, provenance=executor.manifest_fields())
    drawn = plot_all(load(tmp_path / "wide"))
    figures = {f.kind: f for f in drawn}
    notes = {kind: json.loads(f.files[0].with_suffix(".json").read_text()).get("note", "") for kind, f in
             figures.items()}
    assert "a box per variant" in notes["exec_time_by_variant"]
    assert "per-VM panels left out" in notes["technique_comparison"]
    assert "spread of the PMs' load" in notes["cpu_timeline"]
    timelines = [f.title for f in drawn if f.kind == "cpu_timeline"]
    assert any("precopy" in t for t in timelines) and any("stopcopy" in t for t in timelines)


# --- hostile results directories: one line on stderr, exit 2, nothing written -------------------

def _edit_cell(directory: Path, table: str, column: str, value: str) -> None:
    """Set `column` of the table's first row to `value`."""
    path = directory / f"{table}.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index(column)] = value
    lines[1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def _duplicate_first_run(directory: Path) -> None:
    lines = (directory / "runs.csv").read_text().splitlines()
    (directory / "runs.csv").write_text("\n".join([*lines, lines[1]]) + "\n")


def _drop_status_column(directory: Path) -> None:
    lines = (directory / "runs.csv").read_text().splitlines()
    (directory / "runs.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")


def _rename_run_everywhere(directory: Path, new: str) -> None:
    old = "qemu.synthetic1.unbalanced.mig.r1"
    for table in ("runs", "vm_times", "migrations", "cpu_samples"):
        path = directory / f"{table}.csv"
        path.write_text(path.read_text().replace(old, new))


HOSTILE = {
    "exec_time_s not a number": (lambda d: _edit_cell(d, "vm_times", "exec_time_s", "abc"),
                                 "vm_times.csv: exec_time_s: 'abc'"),
    "rep x": (lambda d: _edit_cell(d, "runs", "rep", "x"), "runs.csv: rep: 'x'"),
    "bad timestamp": (lambda d: _edit_cell(d, "runs", "started_at", "yesterday"), "runs.csv: started_at:"),
    "timestamp without offset": (lambda d: _edit_cell(d, "runs", "finished_at", "2026-01-01T00:00:00"),
                                 "no UTC offset"),
    "bytes lots": (lambda d: _edit_cell(d, "migrations", "bytes", "lots"), "migrations.csv: bytes: 'lots'"),
    "unknown status": (lambda d: _edit_cell(d, "runs", "status", "great"), "runs.csv: status: 'great'"),
    "duplicate run rows": (_duplicate_first_run, "is recorded twice"),
    "missing status column": (_drop_status_column, "runs.csv: header"),
    "variants not a mapping": (lambda d: (d / "manifest.json").write_text('{"variants": [1]}'),
                               "manifest.json: must be a JSON object whose variants"),
    "manifest not an object": (lambda d: (d / "manifest.json").write_text("[1]"), "manifest.json: must be"),
    "run id escaping the figure directory": (lambda d: _rename_run_everywhere(d, "../../../escaped"),
                                             "run_id: '../../../escaped' is not a name"),
}


@pytest.mark.parametrize("command", ["plot", "report"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_results_directory_is_one_line_and_writes_nothing(campaign_dir, tmp_path, capsys, command,
                                                                     case):
    directory = tmp_path / "deep" / "er" / "results"
    shutil.copytree(campaign_dir, directory, ignore=shutil.ignore_patterns("figures", "report.html"))
    edit, message = HOSTILE[case]
    edit(directory)
    before = sorted(tmp_path.rglob("*"))
    assert main([command, str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("testbed: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no figure, no page, nothing outside either


def test_an_out_that_is_the_wrong_kind_of_file_is_one_line(campaign_dir, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("mine\n")
    assert main(["plot", str(campaign_dir), "--out", str(a_file)]) == 2
    assert main(["report", str(campaign_dir), "--out", str(tmp_path)]) == 2
    assert main(["report", str(campaign_dir), "--out", str(tmp_path / "no" / "such" / "dir.html")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["testbed"] * 3, lines
    assert "not a directory" in lines[0] and "is a directory" in lines[1] and "No such file" in lines[2]
    assert a_file.read_text() == "mine\n"


def test_the_report_escapes_what_the_results_directory_says(tmp_path):
    with ResultsStore(tmp_path) as store:
        run_campaign(small_spec(repetitions=1), store, FakeExecutor())
        store.update_manifest(experiment="<script>alert(1)</script>", lab={"note": "<img src=x onerror=y>"})
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_non_finite_numbers_survive_the_store(tmp_path):
    """A NaN execution time and an infinite migration time are written as float() reads them, so
    reopening the store and loading the campaign work (they used to be written as empty cells)."""
    from campaign_helpers import fake_result

    from testbed.results import MigrationRow, RunRow, VmTime
    from testbed.runner.campaign import cells, pending_runs

    spec = small_spec(repetitions=1)
    run = pending_runs(spec, cells(spec), {}, {})[0]
    res = fake_result(run)
    move = MigrationRow("vm1", "tb-pm1", "tb-pm2", "precopy", res.started_at, math.inf, None, 10, "failed")
    with ResultsStore(tmp_path) as store:
        store.record(RunRow(run.run_id, spec.name, run.technique, run.variant.app, run.variant.layout,
                            run.variant.migration, run.rep, res.started_at, res.finished_at, "ok"),
                     [VmTime("vm1", "tb-pm1", "tb-pm1", math.nan)], [move], res.cpu_samples)
    with ResultsStore(tmp_path) as store:
        assert math.isnan(store.exec_times[run.run_id]["vm1"])
    c = load(tmp_path)
    assert math.isnan(c.vm_times["exec_time_s"].iloc[0]) and math.isinf(c.migrations["total_time_s"].iloc[0])
    assert math.isnan(c.migrations["downtime_s"].iloc[0])
