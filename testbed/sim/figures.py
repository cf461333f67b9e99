"""The scale study's figures: each metric against the number of PMs, one line per policy and mode.

Titles start with "SIMULATED — " and each figure has a JSON sidecar saying so, like testbed plot's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

LINESTYLES = {"precopy": "-", "stopcopy": "--", "postcopy": ":"}
METRICS = (
    ("mean_exec_time_s", "mean execution time (s)"),
    ("migrations", "migrations"),
    ("bytes_moved", "data moved (GB)"),
    ("time_to_balance_s", "time to balance (s)"),
)


def study_figures(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """One figure with a panel per metric, a line per (policy, mode, concurrency): colour = policy,
    line style = mode, marker = concurrency; each point the mean over repetitions (time to
    balance: over the runs that balanced)."""
    lines: dict[tuple[str, str, int], dict[int, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        lines[(row["label"], row["mode"], row["concurrency"])][row["pms"]].append(row)
    labels = sorted({key[0] for key in lines})
    palette = colormaps["tab10"]
    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        for (policy, mode, conc), by_size in sorted(lines.items()):
            sizes = sorted(by_size)
            values = []
            for size in sizes:
                got = [r[metric] for r in by_size[size] if r[metric] is not None]
                mean = float(np.mean(got)) if got else np.nan
                values.append(mean / 1e9 if metric == "bytes_moved" else mean)
            name = " ".join([policy, mode or "", f"x{conc}" if conc != 1 else ""]).split()
            ax.plot(
                sizes,
                values,
                color=palette(labels.index(policy) % palette.N),
                linestyle=LINESTYLES.get(mode, "-"),
                marker="o" if conc == 1 else "s",
                label=" ".join(name),
            )
        ax.set_xscale("log")
        ax.set_xlabel("PMs (3 VMs per PM)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=7, title="policy, mode (x10: 10 at once)")
    title = "SIMULATED — scale study: balancer policies and migration modes"
    fig.suptitle(title)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt in ("png", "svg"):
        path = fig_dir / f"scale_study.{fmt}"
        fig.savefig(
            path, format=fmt, dpi=110, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None
        )
        files.append(path)
    sidecar = {
        "figure": "scale_study",
        "simulated": True,
        "title": title,
        "files": [p.name for p in files],
        "source": "summary.csv",
    }
    (fig_dir / "scale_study.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return files
