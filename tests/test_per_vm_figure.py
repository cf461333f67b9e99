"""The per-VM execution-time figure as the thesis draws it (Figs. 4.5/4.6/4.9/4.10/4.13/4.14):
VM1…VMn in natural order, one bar per variant, mean ± sd over the runs, n per variant; checked
against the CSV tables of a synthetic results directory, computed here independently."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from campaign_helpers import FakeExecutor, small_spec

from testbed.analysis.data import load
from testbed.analysis.plots import exec_time_by_variant
from testbed.results import ResultsStore
from testbed.runner.campaign import run_campaign

DROPPED = "container.synthetic1.unbalanced.mig.r2"  # its runs.csv row removed: that variant has n = 2


def _results(directory: Path) -> Path:
    with ResultsStore(directory) as store:
        run_campaign(small_spec(vms=11, techniques=["container"]), store, FakeExecutor(), provenance={})
    runs = (directory / "runs.csv").read_text().splitlines(keepends=True)
    (directory / "runs.csv").write_text("".join(line for line in runs if not line.startswith(DROPPED + ",")))
    return directory


def _expected(directory: Path) -> dict[tuple[str, str], list[float]]:
    """(variant id, vm) -> execution times of the committed ok runs, read with the csv module."""
    with (directory / "runs.csv").open() as f:
        ok = {row["run_id"] for row in csv.DictReader(f) if row["status"] == "ok"}
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    with (directory / "vm_times.csv").open() as f:
        for row in csv.DictReader(f):
            if row["run_id"] in ok:
                variant = row["run_id"].removeprefix("container.").rsplit(".r", 1)[0]
                times[variant, row["vm"]].append(float(row["exec_time_s"]))
    return times


def test_bars_are_each_vms_mean_and_sd_over_the_runs_in_natural_order_with_n(tmp_path):
    directory = _results(tmp_path / "r")
    info = exec_time_by_variant(load(directory), "container", "synthetic1", tmp_path / "fig")
    sidecar = json.loads((tmp_path / "fig" / f"{info.name}.json").read_text())
    labels = {"synthetic1.balanced.nomig": "balanced, no migration (n=3)",
              "synthetic1.unbalanced.nomig": "unbalanced, no migration (n=3)",
              "synthetic1.unbalanced.mig": "unbalanced, migration (n=2)"}
    expected = _expected(directory)
    vms = [f"vm{k}" for k in range(1, 12)]  # vm10 and vm11 after vm9
    want = [(vm, labels[variant]) for vm in vms for variant in labels]  # the thesis' variant order at each VM
    assert [(bar["vm"], bar["variant"]) for bar in sidecar["drawn"]] == want
    for bar in sidecar["drawn"]:
        variant = next(v for v, label in labels.items() if label == bar["variant"])
        times = expected[variant, bar["vm"]]
        assert bar["n"] == len(times) == int(bar["variant"][-2])
        assert abs(bar["mean_s"] - statistics.mean(times)) < 1e-9
        assert abs(bar["sd_s"] - statistics.stdev(times)) < 1e-9
    assert "mean ± sd" in sidecar["title"] and "standard deviation" in sidecar["note"]
    assert DROPPED not in sidecar["runs"] and len(sidecar["runs"]) == 8


def test_a_single_run_draws_no_spread(tmp_path):
    directory = tmp_path / "r"
    with ResultsStore(directory) as store:
        run_campaign(small_spec(techniques=["container"], repetitions=1), store, FakeExecutor(), provenance={})
    info = exec_time_by_variant(load(directory), "container", "synthetic1", tmp_path / "fig")
    drawn = json.loads((tmp_path / "fig" / f"{info.name}.json").read_text())["drawn"]
    assert drawn and all(bar["n"] == 1 and bar["sd_s"] is None and bar["variant"].endswith("(n=1)") for bar in drawn)
