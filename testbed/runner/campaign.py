"""A campaign: a spec expanded into runs (technique x variant x repetition), executed in a seeded,
interleaved order and recorded in a results store, resumable after a crash.

Order: repetition r of every cell (technique, variant) forms round r, shuffled with a generator
seeded by (spec seed, r), so drift over a campaign (thermal, background load, the lab aging)
spreads over all variants instead of biasing the one that ran last; a round never starts with
the cell that ended the previous one, so no cell runs twice in a row.

Run ids (`qemu.synthetic1.unbalanced.mig.r3`) depend only on the technique, the
variant's axes and the repetition, so rerunning the same command finds the recorded runs and
skips them. A run that ends `invalid` or `failed` stays recorded (the figures ignore it) and the
cell gets one more repetition in its place, up to `max_reps` runs per cell; after
`max_failures` runs in a row that were not ok, the campaign stops (a lab that cannot run
anything would otherwise record failure after failure). With `ci_width`,
cells keep getting repetitions until every VM's 95 % confidence interval of its mean execution
time is within +-ci_width % (or the cap is reached).

The lab side is behind the `RunExecutor` protocol: it resets the lab, places the VMs, starts the
manager and the workloads, waits, runs the validity gate and returns a `RunResult`.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from testbed.results import CpuSample, MigrationRow, ResultsStore, RunRow, VmTime, iso
from testbed.runner.layouts import vm_names
from testbed.spec import Spec, Variant

K = TypeVar("K")

#: Without --max-reps, a cell gets at most this many times the spec's repetitions.
DEFAULT_CAP_FACTOR = 3
#: A campaign stops after this many runs in a row that were not ok (--max-failures).
DEFAULT_MAX_CONSECUTIVE_FAILURES = 3


class CampaignFailed(Exception):
    """The campaign stopped because its runs kept failing (the runs are recorded)."""


@dataclass(frozen=True)
class Cell:
    technique: str
    variant: Variant

    @property
    def key(self) -> str:
        return f"{self.technique}.{self.variant.id}"


@dataclass(frozen=True)
class Run:
    """One run to execute: everything the executor needs, and nothing that depends on order."""

    spec: Spec
    technique: str
    variant: Variant
    rep: int

    @property
    def run_id(self) -> str:
        return run_id(self.technique, self.variant, self.rep)

    @property
    def placement(self) -> dict[str, int]:
        """PM index (1-based, in the lab's PM order) each VM starts on."""
        return dict(zip(vm_names(self.spec.vms), self.variant.placement, strict=True))

    def workload_seed(self, vm: str) -> int:
        """Seed of a VM's seeded workload (Synthetic-Random): the same for a VM and repetition in
        every variant and technique, so variants are compared on the same random work."""
        digest = hashlib.sha256(f"{self.spec.seed}/{self.rep}/{vm}".encode()).digest()
        return int.from_bytes(digest[:4], "big")


@dataclass
class RunResult:
    """What an executor measured in one run. Times are host-clock seconds since the epoch."""

    status: str  # ok | invalid | failed
    started_at: float
    finished_at: float
    vm_times: list[VmTime] = field(default_factory=list)
    migrations: list[MigrationRow] = field(default_factory=list)
    cpu_samples: list[CpuSample] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # validity gate, errors, decision log path


class RunExecutor(Protocol):
    """The lab side of a campaign (implemented over the manager and the drivers)."""

    def execute(self, run: Run) -> RunResult:
        """Reset the lab, run `run` to its end, and report it. Problems the lab can name (a
        placement that did not apply, a workload that failed) come back as a result with status
        `invalid` or `failed`; an exception stops the campaign with the run unrecorded."""


@dataclass(frozen=True)
class Progress:
    done: int  # runs recorded in the store, this session and before
    total: int  # done + runs still planned (grows when a cell gets more repetitions)
    current: Run
    eta_s: float | None  # from this session's mean run duration; None before the first run ends


def run_id(technique: str, variant: Variant, rep: int) -> str:
    return f"{technique}.{variant.id}.r{rep}"


def cells(spec: Spec, techniques: Sequence[str] | None = None,
          variants: Sequence[str] | None = None) -> list[Cell]:
    """Every (technique, variant) of the spec, optionally only some techniques and variant ids
    (a campaign too long for one sitting runs its variants in parts into one results directory)."""
    chosen = spec.techniques if techniques is None else [t for t in spec.techniques if t in techniques]
    return [Cell(t, v) for t in chosen for v in spec.variants(t) if variants is None or v.id in variants]


def round_order(members: Sequence[Cell], seed: int, rep: int, previous_last: Cell | None) -> list[Cell]:
    """The cells of round `rep` in a seeded random order that does not start with `previous_last`."""
    order = sorted(members, key=lambda c: c.key)
    random.Random(f"{seed}/{rep}").shuffle(order)
    if len(order) > 1 and order[0] == previous_last:
        order[0], order[1] = order[1], order[0]
    return order


def ci_too_wide(samples: Sequence[float], width_pct: float) -> bool:
    """True when the 95 % CI half-width of the mean exceeds width_pct % of the mean (or n < 2)."""
    from testbed.analysis.stats import summarize

    if len(samples) < 2:
        return True
    s = summarize(samples)
    return s.half_width > abs(s.mean) * width_pct / 100


def needs_more_reps(samples: Mapping[K, Sequence[float]], width_pct: float, min_reps: int,
                    max_reps: int) -> set[K]:
    """Keys whose samples are too few (< min_reps) or, below max_reps, too spread for ±width_pct %."""
    return {
        key for key, values in samples.items()
        if len(values) < min_reps or (len(values) < max_reps and ci_too_wide(values, width_pct))
    }


def pending_runs(spec: Spec, chosen: Sequence[Cell], statuses: Mapping[str, str],
                 exec_times: Mapping[str, Mapping[str, float]], ci_width: float | None = None,
                 max_reps: int | None = None) -> list[Run]:
    """Runs still to execute, in execution order, given what the store has recorded.

    A pure function of the spec and the store's contents: after a crash the same call yields the
    same remaining runs in the same order."""
    cap = max_reps or DEFAULT_CAP_FACTOR * spec.repetitions
    target = {c: _target(spec, c, statuses, exec_times, ci_width, cap) for c in chosen}
    plan: list[Run] = []
    last: Cell | None = None
    for rep in range(1, max(target.values(), default=0) + 1):
        order = round_order([c for c in chosen if target[c] >= rep], spec.seed, rep, last)
        plan += [Run(spec, c.technique, c.variant, rep) for c in order
                 if run_id(c.technique, c.variant, rep) not in statuses]
        last = order[-1] if order else last
    return plan


def _target(spec: Spec, cell: Cell, statuses: Mapping[str, str],
            exec_times: Mapping[str, Mapping[str, float]], ci_width: float | None, cap: int) -> int:
    """How many repetitions a cell gets: the spec's, one more per run that was not ok, and with
    ci_width one more while its ok runs are too spread (never more than cap)."""
    ids = []
    rep = 1
    while run_id(cell.technique, cell.variant, rep) in statuses:
        ids.append(run_id(cell.technique, cell.variant, rep))
        rep += 1
    ok = [i for i in ids if statuses[i] == "ok"]
    target = min(cap, spec.repetitions + len(ids) - len(ok))
    if ci_width is None or len(ids) < target or len(ids) >= cap:
        return target
    per_vm: dict[str, list[float]] = {}
    for i in ok:
        for vm, seconds in exec_times.get(i, {}).items():
            per_vm.setdefault(vm, []).append(seconds)
    if not per_vm or needs_more_reps(per_vm, ci_width, spec.repetitions, cap):
        return len(ids) + 1
    return target


#: Balancer fields added after campaigns were recorded, and the default that keeps them out of
#: the fingerprint.
ADDED_BALANCER_FIELDS: dict[str, object] = {"compression": "none", "time_scale": None, "signal": "use"}
#: The same for the spec's own fields.
ADDED_SPEC_FIELDS: dict[str, object] = {"per_vm": {}}


def spec_fingerprint(spec: Spec) -> str:
    """What must not change between a campaign and its resumption (repetitions may grow).

    A field added to specs after campaigns were recorded is left out while at its default
    (`balancer.compression` none, `balancer.time_scale` None, `balancer.signal` use, `per_vm`
    empty), so that those campaigns still resume."""
    added: dict[str, Any] = {field: True for field, default in ADDED_SPEC_FIELDS.items()
                             if getattr(spec, field) == default}
    added["balancer"] = {field for field, default in ADDED_BALANCER_FIELDS.items()
                         if getattr(spec.balancer, field) == default}
    text = spec.model_dump_json(exclude={"repetitions": True, "description": True, **added})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def controller_provenance() -> dict[str, Any]:
    """Where the campaign ran from: git revision and dirty flag of the checkout, the controller's
    `pip freeze` and Python. The lab side adds the hosts' Ansible facts and provisioning artifacts."""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    from testbed import __version__

    top = Path(__file__).resolve().parents[2]

    def output(argv: list[str]) -> str | None:
        try:
            proc = subprocess.run(argv, cwd=top, capture_output=True, text=True, timeout=60, check=False)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "git": {"revision": output(["git", "rev-parse", "HEAD"]), "dirty": None if status is None else bool(status)},
        "testbed_version": __version__,
        "python": platform.python_version(),
        "pip_freeze": (output([sys.executable, "-m", "pip", "freeze"]) or "").splitlines(),
    }


def open_campaign(spec: Spec, store: ResultsStore, provenance: Mapping[str, Any] | None = None) -> None:
    """Write the manifest of a new campaign, or check that `store` holds this spec's campaign."""
    from testbed.errors import InputError

    manifest = store.manifest()
    fingerprint = spec_fingerprint(spec)
    if manifest and manifest.get("spec_fingerprint") != fingerprint:
        raise InputError(f"{store.dir}: holds results of a different spec ({manifest.get('experiment')});"
                         " use another --results directory")
    now = iso(time.time())
    store.update_manifest(
        experiment=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_fingerprint=fingerprint,
        variants={v.id: v.as_dict() for v in spec.variants()},
        started_at=manifest.get("started_at", now),
        sessions=[*manifest.get("sessions", []), now],
        finished_at=None,
        **(provenance or {}),
    )


def run_campaign(spec: Spec, store: ResultsStore, executor: RunExecutor, *,
                 techniques: Sequence[str] | None = None, variants: Sequence[str] | None = None,
                 ci_width: float | None = None,
                 max_reps: int | None = None, provenance: Mapping[str, Any] | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 max_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES) -> int:
    """Execute every pending run and record it; returns the number of runs executed now. Raises
    CampaignFailed, the runs recorded, after `max_failures` runs in a row that were not ok."""
    open_campaign(spec, store, provenance)
    chosen = cells(spec, techniques, variants)
    durations: list[float] = []
    failed_in_a_row = 0
    while pending := pending_runs(spec, chosen, store.statuses, store.exec_times, ci_width, max_reps):
        run = pending[0]
        if on_progress:
            eta = sum(durations) / len(durations) * len(pending) if durations else None
            done = len(store.statuses)
            on_progress(Progress(done, done + len(pending), run, eta))
        began = time.monotonic()
        result = executor.execute(run)
        store.record(
            RunRow(run.run_id, spec.name, run.technique, run.variant.app, run.variant.layout,
                   run.variant.migration, run.rep, result.started_at, result.finished_at, result.status),
            result.vm_times, result.migrations, result.cpu_samples,
            {"run_id": run.run_id, "variant": run.variant.as_dict(), **result.details},
        )
        durations.append(time.monotonic() - began)
        failed_in_a_row = 0 if result.status == "ok" else failed_in_a_row + 1
        if failed_in_a_row >= max_failures:
            store.update_manifest(finished_at=iso(time.time()), stopped=f"{failed_in_a_row} runs in a row not ok")
            raise CampaignFailed(
                f"{spec.name}: stopped after {failed_in_a_row} runs in a row that were not ok; the last, "
                f"{run.run_id}, was {result.status}: {result.details.get('error', 'no error recorded')} "
                f"(details: {store.dir / 'runs' / (run.run_id + '.json')})")
    store.update_manifest(finished_at=iso(time.time()))
    return len(durations)


def shortfall(spec: Spec, chosen: Sequence[Cell], statuses: Mapping[str, str]) -> dict[str, int]:
    """Cells that ended with fewer ok runs than the spec's repetitions: cell key -> ok runs."""
    ok = Counter(run_id.rsplit(".r", 1)[0] for run_id, status in statuses.items() if status == "ok")
    return {c.key: ok[c.key] for c in chosen if ok[c.key] < spec.repetitions}
