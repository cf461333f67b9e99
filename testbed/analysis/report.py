"""`testbed report`: one self-contained HTML page (no external files) for a results directory:
the figures (PNG embedded as base64), the statistics per variant, each "with migration" variant
against its "no migration" twin with Welch's test, and the lab facts from the manifest."""

from __future__ import annotations

import base64
import json
import math
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from testbed.analysis.appendix_a import CAPTION, OVERHEAD_CAPTION, overhead_table, phase_table
from testbed.analysis.data import (
    Campaign,
    comparison_table,
    interval_table,
    load,
    manager_interval_s,
    variant_table,
)
from testbed.analysis.plots import FigureInfo, plot_all

#: Manifest entries shown in their own sections (the rest are the lab facts and provenance).
_OWN_SECTIONS = {"spec", "variants", "manager_times"}


def _cell(column: str, value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if not isinstance(value, float | np.floating):
        return escape(str(value))
    if math.isnan(value) or math.isinf(value):
        return "—"
    if column == "welch_p":
        return "&lt; 0.0001" if value < 1e-4 else f"{value:.2g}"
    return f"{value:.1f}" if column == "change_pct" else f"{value:.2f}"


def _table(frame: pd.DataFrame) -> str:
    """An HTML table, without the optional axes no variant sets (mode, link rate, compression)."""
    if frame.empty:
        return "<p>No completed runs with status ok.</p>"
    unused = [col for col in ("mode", "link_rate", "compression", "concurrency")
              if col in frame and frame[col].isin(["", "none", "1"]).all()]
    frame = frame.drop(columns=unused)
    head = "".join(f"<th>{escape(col)}</th>" for col in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(col, row[col])}</td>" for col in frame.columns) + "</tr>"
        for _, row in frame.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(info: FigureInfo) -> str:
    png = next(p for p in info.files if p.suffix == ".png")
    data = base64.b64encode(png.read_bytes()).decode()
    runs = ", ".join(info.run_ids)
    return (f'<figure id="{escape(info.name)}"><img alt="{escape(info.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(info.title)}<br><small>runs: {escape(runs)}</small></figcaption></figure>")


def _left_out(c: Campaign) -> str:
    """Runs recorded but not used (invalid or failed), with the reason kept in DIR/runs/<id>.json."""
    bad = c.runs[c.runs["status"] != "ok"].sort_values("run_id")
    if bad.empty:
        return "<p>None: every recorded run has status ok.</p>"
    items = "".join(f"<li><code>{escape(r.run_id)}</code>: {escape(r.status)} (see runs/{escape(r.run_id)}.json)</li>"
                    for r in bad.itertuples())
    return f"<ul>{items}</ul>"


def _validation(c: Campaign) -> str:
    """A simulated campaign's section: per variant, the lab's and the simulator's mean side by side."""
    if not c.manifest.get("simulated"):
        return ""
    from testbed.analysis.validation import BOUND_PCT, side_by_side

    found = side_by_side(c.directory, c.manifest)
    head = ("<h2>SIMULATED: the simulator against the lab</h2>\n<p>This campaign is simulated (calibration "
            f"<code>{escape(str(c.manifest.get('calibration')))}</code>). ")
    if found.table is None:
        return head + f"No lab side by side: {escape(found.note)}.</p>\n"
    table = found.table.rename(columns={"lab_s": "lab mean s", "sim_s": "simulated mean s",
                                        "diff_pct": "change_pct", "within": f"within ±{BOUND_PCT:g} %"})
    verdict = "every variant is" if bool(found.table["within"].all()) else "NOT every variant is"
    rows = "".join("<tr>" + "".join(f"<td>{_cell(col, row[col])}</td>" for col in table.columns) + "</tr>"
                   for _, row in table.iterrows())
    head_row = "".join(f"<th>{escape(col)}</th>" for col in table.columns)
    return (head + f"Against {escape(found.note)}: {verdict} within ±{BOUND_PCT:g} % (per variant, the mean "
            "over runs of the per-run mean execution time; change_pct = (simulated − lab) / lab).</p>\n"
            f"<table><thead><tr>{head_row}</tr></thead><tbody>{rows}</tbody></table>\n")


def _manager_steps(c: Campaign) -> str:
    """The §4.5 validation's three steps, per run with migration, when the spec starts its VMs in
    three groups (testbed.analysis.validation.manager_steps)."""
    from testbed.analysis.validation import AT_ONCE_INTERVALS, manager_steps

    steps = manager_steps(c)
    if steps is None or steps.empty:
        return ""
    runs = steps.groupby("run_id")["ok"].all()
    return ("<h2>The manager's three steps (thesis §4.5)</h2>\n<p>Per run with migration: (1) no migration while "
            "the first VMs run alone; (2) when the next VMs join a PM, a migration off it at once (within "
            f"{AT_ONCE_INTERVALS:g} of the CC's intervals); (3) when the last VMs join a PM, a migration off it "
            f"while every VM started before still runs. {int(runs.sum())} of {len(runs)} runs show all three "
            f"(times in s from the run's start; after_s = from the step's start).</p>\n{_table(steps)}\n")


def _manager_time(c: Campaign) -> str:
    """The manager's time scale and, per variant, how many of its rounds a run lasts (issue #16):
    a run of about one interval cannot be balanced however good the policy."""
    interval = manager_interval_s(c.manifest)
    if interval is None or c.manifest.get("spec", {}).get("kind") == "migration":
        return ""
    times = c.manifest.get("manager_times")
    if times is None:
        said = (f"No time scale (or a campaign from before <code>balancer.time_scale</code>): the CC ran the "
                f"spec's interval, {interval:g} s, and cool-down, whatever the work's scale.")
    else:
        floored = ", ".join(times.get("floored", [])) or "none"
        bounds = ", ".join(f"{k} {v:.3g} s" for k, v in sorted(times.get("floors", {}).items())) or "none (unscaled)"
        said = (f"Time scale ×{times['factor']:g}: interval {times['interval_s']:.3g} s, cool-down "
                f"{times['cooldown_s']:.3g} s, settling {times['settling_s']:.3g} s after a migration "
                f"(bounds: {escape(bounds)}; raised or capped by them: {escape(floored)}).")
    return (f"<h2>The manager's time scale</h2>\n<p>{said} run_over_interval = a run's length (its longest VM "
            "execution time, mean over ok runs) / the CC's interval: how many balancing rounds a run lasts "
            f"(thesis: ≥ 11, 113 s and more against 10 s).</p>\n{_table(interval_table(c, interval))}\n")


def _facts(manifest: dict[str, Any]) -> str:
    rows = []
    for key in sorted(k for k in manifest if k not in _OWN_SECTIONS):
        value = manifest[key]
        shown = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
        rows.append(f"<dt>{escape(key)}</dt><dd><pre>{escape(shown)}</pre></dd>")
    return "<dl>" + "".join(rows) + "</dl>" if rows else "<p>The manifest has no lab facts.</p>"


_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; }
figure { margin: 2em 0; } img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
dt { font-weight: bold; margin-top: 0.5em; }
"""


def render(c: Campaign, figures: list[FigureInfo]) -> str:
    variants = variant_table(c).drop(columns=["run_ids"])
    twins = comparison_table(c).drop(columns=["run_ids"])
    phases = phase_table(c)
    overhead = overhead_table(c) if not phases.empty else phases
    counts = c.runs["status"].value_counts().to_dict()
    name = c.manifest.get("experiment", c.directory.name)
    spec = yaml.safe_dump(c.manifest.get("spec", {}), sort_keys=False)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>testbed report — {escape(name)}</title>
<style>{_STYLE}</style></head><body>
<h1>Experiment {escape(name)}</h1>
<p>Results directory <code>{escape(str(c.directory))}</code>: {len(c.runs)} runs recorded
({escape(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))}). Statistics use runs with status ok;
one observation per run is the mean execution time over its VMs.</p>
<h2>Execution time per variant</h2>
<p>Mean, sample standard deviation and 95 % confidence interval of the mean (Student's t).</p>
{_table(variants)}
<h2>With migration against no migration</h2>
<p>Relative change of the mean execution time of each "with migration" variant against its
"no migration" twin (negative: migration shortened it), with the two-sided p-value of Welch's t-test.</p>
{_table(twins)}
{_manager_time(c)}{_manager_steps(c)}{"" if phases.empty else f"<h2>Migration phases (Table A.1)</h2><p>{escape(CAPTION)}</p>{_table(phases)}"}{"" if overhead.empty else f"<h2>Migration CPU overhead</h2><p>{escape(OVERHEAD_CAPTION)}</p>{_table(overhead)}"}
{_validation(c)}<h2>Runs left out</h2>
{_left_out(c)}
<h2>Figures</h2>
{"".join(_figure(f) for f in figures) or "<p>No figures: no completed runs.</p>"}
<h2>Spec</h2>
<pre>{escape(spec)}</pre>
<h2>Lab facts and provenance</h2>
{_facts(c.manifest)}
</body></html>
"""


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Draw the figures (into DIR/figures) and write the page (default DIR/report.html)."""
    c = load(directory)
    figures = plot_all(c)
    path = Path(out) if out is not None else c.directory / "report.html"
    path.write_text(render(c, figures), encoding="utf-8")
    return path
