"""Every figure kind of the thesis, drawn from a results directory alone (one function per kind).

Each figure is written as NAME.png and NAME.svg beside a sidecar NAME.json naming the runs it
was drawn from, so a figure can always be traced back to rows of the CSV tables. Only runs with
status ok are drawn. Figures are built on matplotlib's object API (no pyplot state, Agg canvas),
so plotting works without a display.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from testbed.analysis.appendix_a import phase_figure
from testbed.analysis.data import Campaign, variant_label, varying_axes
from testbed.lab import parse_rate

FORMATS = ("png", "svg")
#: Above this many VMs a figure shows each variant's distribution over VMs instead of a bar per VM
#: (3,000 bars are unreadable), and above this many PMs a CPU timeline shows the spread of the
#: PMs' load instead of a panel per PM; the sidecar says so.
PER_VM_UP_TO = 40
PER_PM_UP_TO = 12
#: Variants in the thesis' order: balanced before unbalanced, no migration before migration.
VARIANT_ORDER = ["layout", "migration", "variant"]


@dataclass(frozen=True)
class FigureInfo:
    name: str
    kind: str
    title: str
    files: tuple[Path, ...]
    run_ids: tuple[str, ...]


def _natural(name: str) -> tuple[str, int]:
    """`vm10` after `vm9`; `tb-pm2` before `tb-pm10`."""
    match = re.match(r"^(.*?)(\d+)$", name)
    return (match[1], int(match[2])) if match else (name, -1)


def vm_colours(vms: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per VM for the whole campaign, so a VM keeps its colour across migrations."""
    palette = colormaps["tab10" if len(vms) <= 10 else "tab20"]
    return {vm: palette(k % palette.N) for k, vm in enumerate(sorted(vms, key=_natural))}


def _save(c: Campaign, fig: Figure, out_dir: Path, name: str, kind: str, title: str,
          run_ids: Sequence[str], note: str | None = None, drawn: list[dict[str, Any]] | None = None) -> FigureInfo:
    """Write the figure and its sidecar; `drawn`, when given, lists the values drawn (a bar each)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if c.manifest.get("simulated"):  # a simulator's campaign (testbed/sim) says so on every figure
        title = f"SIMULATED — {title}"
    fig.suptitle(title)
    files = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=110, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        files.append(path)
    ids = tuple(sorted(set(run_ids)))
    sidecar = {"figure": name, "kind": kind, "title": title, "files": [p.name for p in files], "runs": list(ids)}
    if note:
        sidecar["note"] = note
    if drawn is not None:
        sidecar["drawn"] = drawn
    (out_dir / f"{name}.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return FigureInfo(name, kind, title, tuple(files), ids)


def cpu_timeline(c: Campaign, run_id: str, out_dir: Path) -> FigureInfo:
    """Fig. 4.4: a panel per PM with the CPU % of its VMs stacked over time, a fixed colour per
    VM (kept when it migrates), and each migration marked from its start to its end."""
    run = c.runs.set_index("run_id").loc[run_id]
    samples = c.cpu_samples[c.cpu_samples["run_id"] == run_id]
    moves = c.migrations[c.migrations["run_id"] == run_id]
    per_vm = samples[samples["vm"] != ""]
    hosts = sorted(set(samples["host"]) | set(moves["source"]) | set(moves["destination"]), key=_natural)
    title = f"CPU use per PM — {run['technique']}, {variant_label(run, varying_axes(c.runs))}, rep {run['rep']}"
    if len(hosts) > PER_PM_UP_TO:
        return _load_spread(c, run_id, samples, moves, len(hosts), out_dir, title)
    colours = vm_colours(sorted(set(c.vm_times["vm"]) | set(per_vm["vm"])))
    times = np.sort(samples["t_s"].unique())
    fig = Figure(figsize=(9, 2.2 * max(len(hosts), 1) + 0.6), layout="constrained")
    axes = fig.subplots(max(len(hosts), 1), 1, sharex=True, squeeze=False)[:, 0]
    for ax, host in zip(axes, hosts, strict=False):
        on_host = per_vm[per_vm["host"] == host].pivot_table(index="t_s", columns="vm", values="cpu_pct",
                                                              aggfunc="sum")
        on_host = on_host.reindex(index=times, fill_value=0.0).fillna(0.0)
        vms = sorted(on_host.columns, key=_natural)
        if vms:
            ax.stackplot(times, *(on_host[vm].to_numpy() for vm in vms), labels=vms,
                         colors=[colours[vm] for vm in vms], step="post")
        total = samples[(samples["host"] == host) & (samples["vm"] == "")]
        if not total.empty:
            ax.plot(total["t_s"], total["cpu_pct"], color="black", linewidth=0.8, label="PM total")
        _mark_migrations(ax, host, moves, run["started_at"])
        ax.set_ylabel(f"{host}\nCPU %")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time since the run started (s)")
    note = None
    if len(colours) <= PER_VM_UP_TO:
        fig.legend([_patch(colours[vm]) for vm in colours], list(colours), loc="outside right upper", title="VM")
    else:
        note = f"{len(colours)} VMs: no legend (more than {PER_VM_UP_TO}); colours repeat"
    return _save(c, fig, out_dir, f"cpu_timeline.{run_id}", "cpu_timeline", title, [run_id], note)


def _load_spread(c: Campaign, run_id: str, samples: pd.DataFrame, moves: pd.DataFrame, pms: int, out_dir: Path,
                 title: str) -> FigureInfo:
    """The CPU timeline of a run with more PMs than panels can show: the spread of the PMs' load
    over time (min, quartiles, median, max, mean) and the migrations in flight."""
    totals = samples[samples["vm"] == ""].pivot_table(index="t_s", columns="host", values="cpu_pct")
    times = totals.index.to_numpy()
    q = np.nanpercentile(totals.to_numpy(), [0, 25, 50, 75, 100], axis=1)
    fig = Figure(figsize=(9, 5), layout="constrained")
    load, flying = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    load.fill_between(times, q[0], q[4], step="post", alpha=0.2, label="min–max")
    load.fill_between(times, q[1], q[3], step="post", alpha=0.4, label="quartiles")
    load.step(times, q[2], where="post", label="median")
    load.step(times, totals.mean(axis=1).to_numpy(), where="post", linestyle="--", label="mean")
    load.set_ylabel(f"PM CPU % ({pms} PMs)")
    load.set_ylim(bottom=0)
    load.grid(alpha=0.3)
    load.legend(fontsize=8)
    run_start = c.runs.set_index("run_id").loc[run_id, "started_at"]
    starts = np.array([(m - run_start).total_seconds() for m in moves["started_at"]])
    ends = starts + moves["total_time_s"].to_numpy(float)
    flying.step(times, [int(((starts <= t) & (ends > t)).sum()) for t in times], where="post")
    flying.set_ylabel("migrations\nin flight")
    flying.set_xlabel("time since the run started (s)")
    flying.grid(alpha=0.3)
    note = f"{pms} PMs: the spread of the PMs' load instead of a panel per PM (more than {PER_PM_UP_TO})"
    return _save(c, fig, out_dir, f"cpu_timeline.{run_id}", "cpu_timeline", title.replace("per PM", "across PMs"),
                 [run_id], note)


def _patch(colour: tuple[float, ...]):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour)


def _mark_migrations(ax: Axes, host: str, moves: pd.DataFrame, run_start: pd.Timestamp) -> None:
    for move in moves.itertuples():
        if host not in (move.source, move.destination):
            continue
        start = (move.started_at - run_start).total_seconds()
        ax.axvspan(start, start + move.total_time_s, color="grey", alpha=0.2, linewidth=0)
        ax.axvline(start, color="black", linestyle="--", linewidth=0.8)
        arrow = f"{move.vm} → {move.destination}" if host == move.source else f"{move.vm} ← {move.source}"
        ax.annotate(arrow, (start, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7)


def _grouped_bars(ax: Axes, table: pd.DataFrame, x: str, group: str, order: Sequence[str],
                  xs: Sequence[str] | None = None) -> None:
    """Bars of `mean` with `std` error bars: one cluster per value of x (VMs in natural order
    unless `xs` is given), one bar per group."""
    xs = list(xs) if xs is not None else sorted(table[x].unique(), key=_natural)
    width = 0.8 / max(len(order), 1)
    for k, name in enumerate(order):
        part = table[table[group] == name].set_index(x).reindex(xs)
        ax.bar(np.arange(len(xs)) + (k - (len(order) - 1) / 2) * width, part["mean"], width,
               yerr=part["std"].fillna(0), capsize=2, label=name)
    ax.set_xticks(np.arange(len(xs)), xs)
    ax.grid(axis="y", alpha=0.3)


def _per_vm(c: Campaign) -> pd.DataFrame:
    """Mean, std and count of each VM's execution time per technique and variant, over ok runs."""
    times = c.ok(c.vm_times)
    varying = varying_axes(c.runs)
    times["label"] = [variant_label(r, varying) for _, r in times.iterrows()] if not times.empty else []
    return times.groupby(["technique", "app", "variant", "label", *VARIANT_ORDER[:2], "vm"], as_index=False).agg(
        mean=("exec_time_s", "mean"), std=("exec_time_s", "std"), n=("exec_time_s", "count"),
        run_ids=("run_id", lambda s: sorted(set(s))))


def _with_n(table: pd.DataFrame) -> pd.DataFrame:
    """The variant labels with their number of runs, `unbalanced, migration (n=7)`, as the thesis'
    figures are read: a bar's spread means little without it."""
    runs = table.groupby("label")["run_ids"].agg(lambda ids: len({i for run_ids in ids for i in run_ids}))
    return table.assign(label=[f"{label} (n={runs[label]})" for label in table["label"]])


def _drawn_bars(table: pd.DataFrame, order: Sequence[str]) -> list[dict[str, Any]]:
    """The bars of a per-VM figure in drawing order (VM, then variant), for its sidecar."""
    drawn = [{"vm": row.vm, "variant": row.label, "mean_s": float(row.mean),
              "sd_s": None if pd.isna(row.std) else float(row.std), "n": int(row.n)} for row in table.itertuples()]
    return sorted(drawn, key=lambda bar: (_natural(bar["vm"]), order.index(bar["variant"])))


def exec_time_by_variant(c: Campaign, technique: str, app: str, out_dir: Path) -> FigureInfo:
    """Figs. 4.5/4.6/4.9/4.10/4.13/4.14 as the thesis draws them: VM1…VMn in order on x, one bar
    per variant at each VM, the mean over repetitions with the sample standard deviation as error
    bar (the thesis' mean ± sd; none when n = 1), n per variant in the legend. The sidecar lists
    every bar drawn."""
    table = _per_vm(c)
    table = _with_n(table[(table["technique"] == technique) & (table["app"] == app)])
    order = list(dict.fromkeys(table.sort_values(VARIANT_ORDER)["label"]))
    ids = [i for ids in table["run_ids"] for i in ids]
    name = f"exec_time.{technique}.{app}"
    vms = table["vm"].nunique()
    if vms > PER_VM_UP_TO:
        fig = Figure(figsize=(max(6, 1.5 * len(order) + 2), 4), layout="constrained")
        ax = fig.subplots()
        ax.boxplot([table.loc[table["label"] == label, "mean"].to_numpy() for label in order], showmeans=True)
        ax.set_xticks(np.arange(1, len(order) + 1), order, rotation=15, fontsize=8)
        ax.set_ylabel("execution time per VM (s)")
        ax.grid(axis="y", alpha=0.3)
        return _save(c, fig, out_dir, name, "exec_time_by_variant",
                     f"Execution time of {vms} VMs — {app} on {technique} (distribution of the VMs' means)", ids,
                     f"{vms} VMs: a box per variant over the VMs' mean times, not a bar per VM "
                     f"(more than {PER_VM_UP_TO})")
    fig = Figure(figsize=(max(6, 0.9 * vms + 3), 4), layout="constrained")
    ax = fig.subplots()
    _grouped_bars(ax, table, "vm", "label", order)
    ax.set_xlabel("VM")
    ax.set_ylabel("execution time (s)")
    fig.legend(loc="outside right upper", fontsize=8, title="variant (n = runs)")
    return _save(c, fig, out_dir, name, "exec_time_by_variant",
                 f"Execution time per VM — {app} on {technique} (mean ± sd over the runs)", ids,
                 "error bars: sample standard deviation over the variant's runs (none when n = 1)",
                 _drawn_bars(table, order))


def technique_comparison(c: Campaign, app: str, out_dir: Path) -> FigureInfo:
    """Figs. 4.7/4.8/4.11/4.12/4.15: per variant, each VM's time per technique; last panel, the
    mean over all VMs per technique and variant."""
    table = _per_vm(c)
    table = table[table["app"] == app]
    labels = list(dict.fromkeys(table.sort_values(VARIANT_ORDER)["label"]))
    techniques = sorted(table["technique"].unique())
    vms = table["vm"].nunique()
    per_vm = vms <= PER_VM_UP_TO  # above: only the mean panel (a bar per VM would be unreadable)
    panels = len(labels) + 1 if per_vm else 1
    fig = Figure(figsize=(10, 3 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    for ax, label in zip(axes[:-1], labels if per_vm else [], strict=False):
        _grouped_bars(ax, table[table["label"] == label], "vm", "technique", techniques)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("execution time (s)")
    times = c.ok(c.vm_times)
    times = times[times["app"] == app]
    varying = varying_axes(c.runs)
    times["label"] = [variant_label(r, varying) for _, r in times.iterrows()] if not times.empty else []
    means = times.groupby(["technique", "label"], as_index=False).agg(mean=("exec_time_s", "mean"),
                                                                     std=("exec_time_s", "std"))
    _grouped_bars(axes[-1], means, "label", "technique", techniques, xs=labels)
    axes[-1].set_title("mean over all VMs", fontsize=10)
    axes[-1].set_ylabel("execution time (s)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="technique")
    note = None if per_vm else f"{vms} VMs: per-VM panels left out (more than {PER_VM_UP_TO}); the mean panel only"
    return _save(c, fig, out_dir, f"techniques.{app}", "technique_comparison",
                 f"Techniques compared — {app} (mean ± std)", times["run_id"].tolist(), note)


def migration_vs_link_rate(c: Campaign, out_dir: Path) -> FigureInfo:
    """Figs. A.1/A.2: total migration time and downtime versus link rate, one line per technique,
    migration mode, app and compression (mean ± std over the runs of each point). Only what was
    swept over several rates is drawn (App. A: the idle VM); an app run at one rate is a point
    of the phase figure (Table A.1), and a dozen lone points here would only crowd the lines."""
    moves = c.ok(c.migrations)
    moves = moves[(moves["link_rate"] != "") & (moves["status"] == "completed")].copy()
    moves["rate_mbit"] = [parse_rate(r) / 1e6 for r in moves["link_rate"]]
    keys = ["technique", "mode", "app", "compression"]
    swept = moves.groupby(keys)["rate_mbit"].transform("nunique") > 1
    note = None
    if swept.any() and not swept.all():
        left = sorted(set(moves.loc[~swept, "app"]))
        moves, note = moves[swept], f"apps run at one rate only ({', '.join(left)}): in the phase figure"
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for (technique, mode, app, compression), line in moves.groupby(keys):
        stats = line.groupby("rate_mbit").agg(total=("total_time_s", "mean"), total_std=("total_time_s", "std"),
                                              down=("downtime_s", "mean"), down_std=("downtime_s", "std"))
        name = f"{technique} {mode}, {app}, {compression}"
        marker = "o" if compression == "none" else "s"
        axes[0].errorbar(stats.index, stats["total"], yerr=stats["total_std"].fillna(0), marker=marker,
                         capsize=2, label=name)
        axes[1].errorbar(stats.index, stats["down"], yerr=stats["down_std"].fillna(0), marker=marker,
                         capsize=2, label=name)
    for ax, what in zip(axes, ("total migration time (s)", "downtime (s)"), strict=True):
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel(what)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8)
    return _save(c, fig, out_dir, "migration_vs_link_rate", "migration_vs_link_rate",
                 "Migration time and downtime vs link rate", moves["run_id"].tolist(), note)


def timeline_runs(c: Campaign) -> list[str]:
    """One run per technique and variant for the CPU timeline: its first ok repetition with samples."""
    sampled = set(c.cpu_samples["run_id"])
    runs = c.ok_runs[c.ok_runs["run_id"].isin(sampled)].sort_values(["technique", "variant", "rep"])
    return runs.groupby(["technique", "variant"])["run_id"].first().tolist()


def plot_all(c: Campaign, out_dir: str | Path | None = None) -> list[FigureInfo]:
    """Every figure the results support (each kind only where its data exists), default in DIR/figures."""
    out = Path(out_dir) if out_dir is not None else c.directory / "figures"
    figures = [cpu_timeline(c, run_id, out) for run_id in timeline_runs(c)]
    timed = c.ok(c.vm_times)
    for technique, app in sorted(set(zip(timed["technique"], timed["app"], strict=True))):
        figures.append(exec_time_by_variant(c, technique, app, out))
    for app in sorted(set(timed["app"])):
        figures.append(technique_comparison(c, app, out))
    if not c.ok(c.migrations).query("link_rate != ''").empty:
        figures.append(migration_vs_link_rate(c, out))
    if (phases := phase_figure(c)) is not None:  # a migration study's Table A.1, drawn
        figures.append(_save(c, phases[0], out, "migration_phases", "migration_phases",
                             "Migration phases (Table A.1, mean per variant)", phases[1]))
    if c.manifest.get("simulated"):
        figures += validation(c, out)
    return figures


def validation(c: Campaign, out_dir: Path) -> list[FigureInfo]:
    """A simulated campaign against its lab counterpart (testbed.analysis.validation), when it has one."""
    from testbed.analysis.validation import side_by_side, validation_figure

    found = side_by_side(c.directory, c.manifest)
    if found.table is None or found.lab_dir is None:
        return []
    verdict = "all within" if bool(found.table["within"].all()) else "NOT all within"
    return [_save(c, validation_figure(found.table, found.lab_dir), out_dir, "validation", "validation",
                  f"Simulator vs lab — mean execution time per variant ({verdict} ±10 %)",
                  c.ok_runs["run_id"].tolist(), f"lab counterpart: {found.lab_dir}")]
