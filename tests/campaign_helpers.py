"""A deterministic RunExecutor for tests without a lab: it makes up a plausible run from the run id
(execution times, CPU samples, one migration in "with migration" variants). Used as INPUT for the
store, the campaign loop and the figures; the lab executor is tested on the lab."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from testbed.lab import parse_rate
from testbed.results import CpuSample, MigrationRow, VmTime
from testbed.runner.campaign import Run, RunResult
from testbed.spec import parse_spec

T0 = 1_790_000_000.0  # 2026-09-21, a fixed host-clock time


def small_spec(**changes):
    base = {
        "name": "tiny",
        "techniques": ["qemu", "container"],
        "vms": 5,
        "pms": 3,
        "matrix": {"layout": ["balanced", "unbalanced"], "migration": [False, True]},
        "exclude": [{"layout": "balanced", "migration": True}],
        "repetitions": 3,
        "seed": 7,
    }
    return parse_spec(base | changes)


def appendix_spec(**changes):
    base = {
        "name": "tiny-a", "kind": "migration", "techniques": ["container"], "app": "idle", "vms": 1,
        "matrix": {"layout": [[1, 0, 0]], "migration": [True], "link_rate": ["10mbit", "100mbit"],
                   "compression": ["none", "bzip2"]},
        "repetitions": 2,
    }
    return parse_spec(base | changes)


def fake_result(run: Run, status: str = "ok") -> RunResult:
    rng = random.Random(run.run_id)
    start = T0 + 1000 * run.rep + rng.random()
    pms = [f"tb-pm{k}" for k in range(1, run.spec.pms + 1)]
    loaded = 1.0 if run.variant.layout == "balanced" else 1.8
    if run.variant.migration:
        loaded = 1.3
    slow = 1.1 if run.technique == "qemu" else 1.0
    where = dict(run.placement)
    times, samples, moves = [], [], []
    for k, (vm, pm) in enumerate(where.items(), start=1):
        times.append(VmTime(vm, pms[pm - 1], pms[pm - 1], 100 * loaded * slow + k + rng.gauss(0, 2)))
    if run.variant.migration:
        sent = 73_000_000 // (3 if run.variant.compression != "none" else 1)
        seconds = sent * 8 / parse_rate(run.variant.link_rate or "100mbit") + rng.random()
        moves.append(MigrationRow("vm1", pms[0], pms[1], run.variant.mode or "precopy", start + 20, seconds,
                                  seconds / 10, sent, "completed"))
    for t in range(0, 60, 10):
        for vm, pm in where.items():
            host = pms[1] if moves and vm == "vm1" and t >= 30 else pms[pm - 1]
            samples.append(CpuSample(float(t), host, vm, 20.0 + rng.random()))
        for pm in pms:
            samples.append(CpuSample(float(t), pm, "", 40.0))
    return RunResult(status, start, start + 150, times, moves, samples, {"gate": {"placement": "ok"}})


@dataclass
class FakeExecutor:
    """Records the order it was asked to run things; `bad` run ids come back as `invalid`."""

    bad: set[str] = field(default_factory=set)
    executed: list[str] = field(default_factory=list)

    def execute(self, run: Run) -> RunResult:
        self.executed.append(run.run_id)
        return fake_result(run, "invalid" if run.run_id in self.bad else "ok")
