"""What every lab's `testbed run` round trip (the fake labs', the libvirt test hosts') runs and
checks in its results: one place, so that what "the VMs really moved" means is the same for all."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

#: Exp. 1 at a small lab's size: 4 one-vCPU VMs on 2 PMs, unbalanced (3/1), without and with
#: migration, one repetition (each lab adds its technique, balancer and scale).
SMALL_EXP1 = {
    "instances": 1,
    "vms": 4,
    "pms": 2,
    "memory_mb": 128,
    "vcpus": 1,
    "matrix": {"layout": ["unbalanced"], "migration": [False, True]},
    "repetitions": 1,
}


def check_runs(results: Path, ran: subprocess.CompletedProcess[str], technique: str,
               vms: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`testbed run` of an unbalanced Exp. 1 without and with migration passed: (its ok runs, their
    VMs' times), every VM timed in both. A run the campaign replaced with another repetition is
    printed with why."""
    from testbed.results import read_table

    for row in read_table(results, "runs") if (results / "runs.csv").exists() else []:
        if row["status"] != "ok":
            details = json.loads((results / "runs" / f"{row['run_id']}.json").read_text())
            print(row["run_id"], row["status"], details.get("error"), details.get("gate"))
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    runs = [r for r in read_table(results, "runs") if r["status"] == "ok"]
    assert {r["technique"] for r in runs} == {technique}
    assert sorted((r["layout"], r["migration"]) for r in runs) == [("unbalanced", "false"), ("unbalanced", "true")]
    times = [t for t in read_table(results, "vm_times") if t["run_id"] in {r["run_id"] for r in runs}]
    assert len(times) == 2 * vms and all(float(t["exec_time_s"]) > 0 for t in times), times
    return runs, times


def check_cc_moves(results: Path, completed: Sequence[dict[str, str]], times: Sequence[dict[str, str]],
                   mig: str) -> None:
    """The VMs really moved: each moved VM's completed migrations (migrations.csv rows of run `mig`)
    chain from where the layout put it (each one run by the LC of the PM the toolstack listed it
    on, so a move that did not happen breaks the chain) to where the toolstack lists it at the end
    (vm_times.csv); a VM may come back. And the run's record shows the CC ordering them, not in a
    dry run."""
    in_order = sorted(completed, key=lambda m: datetime.fromisoformat(m["started_at"]))  # ISO 8601 in the store
    hosts = {t["vm"]: (t["start_host"], t["end_host"]) for t in times if t["run_id"] == mig}
    for vm in {m["vm"] for m in in_order}:
        chain = [m for m in in_order if m["vm"] == vm]
        assert [m["source"] for m in chain] == [hosts[vm][0], *(m["destination"] for m in chain[:-1])], chain
        assert chain[-1]["destination"] == hosts[vm][1], (chain, times)
    details = json.loads((results / "runs" / f"{mig}.json").read_text())
    assert any(r["action"] == "migrate" and r["order"] for r in details["manager_rounds"]), details
    assert details["manager_config"]["dry_run"] is False
