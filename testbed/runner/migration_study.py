"""The RunExecutor of the Appendix A migration study (specs of kind `migration`): one VM, one
forced migration per run, measured phase by phase at the variant's link rate and compression.

A run goes through the balancing LabExecutor's own steps and validity gate (it is a subclass:
the CC quieted so that nothing else moves the VM, the reset, clocks, VM storage, the VM created
on PM1 with its placement read back, the VM destroyed at the end however the run went); what it
measures instead of a balancing run is, in this order:
1. the PMs' links must be at the inventory's rate (`gate.links`): a runner killed while a
   variant's rate was set leaves them otherwise, and the campaign then stops, asking for
   `testbed lab up`, rather than measure at a rate nobody chose;
2. the variant's link rate is set on both ends of every PM's link with tc exactly as the lab_host
   role shapes them (testbed.bench.migration.links_at: tbf, 10 ms bucket, 50 ms queue) and read
   back; the inventory's rate comes back when the run ends, whatever ended it;
3. the app starts: `idle` runs nothing; `allocator` is workloads/memwriter.c (the thesis'
   Allocator) writing every byte of ALLOCATOR_SHARE of the VM's memory once, then holding it;
   `http`, `database` and `game` are servers in the VM under a bounded load from the controller
   host (testbed.runner.services: Apache2 + httperf, PostgreSQL + pgbench, OpenArena with bots
   + a getstatus prober; containers only);
   any other app is the first step of the balancing experiments' program for it (chains());
4. after warmup_s x scale, the VM migrates to the next PM in the technique's mode (the
   variant's, else QEMU pre-copy and containers stop-and-copy) with the variant's compression
   (QEMU: multifd zstd; containers: the dump through bzip2 or zstd), with a migration timeout
   long enough to send the VM's whole memory at the variant's rate;
5. the VM must then run on the destination (a one-block Synthetic1 answers there) and its app
   must have gone on (the allocator keeps reporting; a server answers its load's first round
   after the migration; any other program has not failed). A server's load, round by round, goes
   into the run's details under `load`.

The record becomes the run's migrations.csv row; its phases (containers: suspend, dump, copy,
undump, resume; QEMU: prepare, transfer, resume) and counters go into the run's details under
`migration`, which testbed.analysis.appendix_a reads for Table A.1. CPU is sampled all along, so
the CPU timeline shows what the migration cost each PM.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from testbed.bench.migration import links_at, wait_progress
from testbed.drivers.base import Driver, MigrationMode, MigrationRecord, WorkloadRun
from testbed.errors import InputError
from testbed.lab import LabHost, parse_rate, tc_rate_bps
from testbed.results import MigrationRow
from testbed.runner import services
from testbed.runner.campaign import Run, RunResult
from testbed.runner.executor import (
    APPS,
    PROBE,
    PROBE_TIMEOUT_S,
    LabExecutor,
    _CpuSampler,
    chains,
    kernel_fits,
    runnable,
)
from testbed.spec import Spec
from testbed.techniques import technique

#: Apps of the study besides the balancing experiments' programs (executor.APPS).
OWN_APPS = ("idle", "allocator", *services.SERVICES)
#: The allocator writes this share of the VM's memory (the thesis: 500 MB of a 545 MB VM; half
#: leaves a QEMU guest's kernel and a container's init their room under the memory limit).
ALLOCATOR_SHARE = 0.5
#: MB/s the allocator rewrites after its first pass: none, as the thesis' Allocator.
ALLOCATOR_DIRTY_MBPS = 0
#: A migration may take this long plus the time to send the VM's whole memory twice at the link rate.
MIGRATION_TIMEOUT_BASE_S = 300.0
READY_TIMEOUT_S = 120.0  # the allocator's first pass over its memory (TCG guests are slow)
CONTINUE_TIMEOUT_S = 60.0  # how long the app has to report again on the destination
#: CPU sampling period: a migration's phases last a second or less, so finer than a balancing run's.
SAMPLE_PERIOD_S = 0.5


def supported(spec: Spec, techniques: Sequence[str]) -> None:
    """Refuse (InputError, before any host is touched) what the study cannot run."""
    where = spec.name
    if spec.kind != "migration":
        raise InputError(f"{where}: kind: the migration study runs kind 'migration', not {spec.kind!r}")
    if spec.vms != 1:
        raise InputError(f"{where}: vms: the migration study moves one VM per run (thesis App. A), not {spec.vms}")
    runnable(where, "the migration study", techniques)
    available = (*OWN_APPS, *APPS)
    for name in techniques:
        can = technique(name)
        for variant in spec.variants(name):
            if variant.app not in available:
                raise InputError(f"{where}: matrix.app: {variant.app!r} has no program in the VMs yet "
                                 f"(available: {', '.join(available)})")
            if variant.app == "allocator" and spec.memory_mb * (1 - ALLOCATOR_SHARE) < can.guest_footprint_mb:
                raise InputError(f"{where}: memory_mb: the allocator writes {ALLOCATOR_SHARE:.0%} of the VM's memory "
                                 f"and {can.vm_noun} keeps ~{can.guest_footprint_mb} MB for itself: use memory_mb >= "
                                 f"{can.guest_footprint_mb / (1 - ALLOCATOR_SHARE):.0f}")
            if variant.app == "kernel":
                kernel_fits(spec, [name])
            if variant.app in services.SERVICES and not can.services:
                raise InputError(f"{where}: matrix.app: {variant.app!r} runs in containers only ({can.vm_noun} "
                                 "has no apache2, postgres or openarena-server: exclude it for that technique)")
            if variant.app == "game" and (missing := services.game_missing()):
                raise InputError(f"{where}: matrix.app: 'game': {missing}")


class MigrationStudyExecutor(LabExecutor):
    """LabExecutor's run, gate and clean-up, measuring one forced migration instead of balancing."""

    def __init__(self, *args: Any, sample_period_s: float = SAMPLE_PERIOD_S, **kwargs: Any) -> None:
        super().__init__(*args, sample_period_s=sample_period_s, **kwargs)
        self._load: services.Load | None = None  # the run's server load, if its app is a service

    def _measure(self, driver: Driver, run: Run, details: dict[str, Any]) -> RunResult:
        rate = run.variant.link_rate
        details["gate"]["links"] = {"ok": True, **self._check_links(rate)}
        (vm, pm), = run.placement.items()
        source, destination = self._pm(pm), self._pm(pm % len(self.lab.pms) + 1)
        timeout = self.timeout_s or migration_timeout(run.spec.memory_mb, rate or self.lab.pms[0].link_rate)
        details["migration_timeout_s"] = timeout
        sampler = _CpuSampler(driver, self.sample_period_s)
        started_at = time.time()
        sampler.start(started_at)
        record: MigrationRecord | None = None
        continued = False
        try:
            with self._links(rate) as links, _migration_timeout(driver, timeout):
                details["links"] = links
                app = self._start_app(driver, run, vm, timeout, details)
                self.log("migrate")
                mode = MigrationMode(run.variant.mode or technique(run.technique).default_mode)
                record = driver.migrate(vm, destination, mode, compression=run.variant.order_compression)
                details["migration"] = record.as_dict()
                details["continued"] = continued = self._continued(driver, vm, destination, app, record)
        except Exception as err:  # noqa: BLE001 - a VM or app that failed fails this run only
            details["error"] = f"{type(err).__name__}: {err}"
        if self._load is not None:
            ended = record.start + record.total_time_s if record is not None else None
            details["load"], self._load = self._load.stop(after=ended), None
        finished_at = time.time()
        samples = sampler.stop()
        details["sampler_errors"] = sampler.errors[:20]
        if record is not None and record.status != "completed":
            details["error"] = f"migration {source} -> {destination} failed: {record.error}"
        elif record is not None and not continued:
            details.setdefault("error", f"the VM or its app did not go on at {destination} after the migration")
        rows = [] if record is None else [MigrationRow(
            record.vm, record.source, record.destination, str(record.mode), record.start, record.total_time_s,
            record.downtime_s, record.bytes, record.status)]
        status = "failed" if "error" in details else "ok"
        return RunResult(status, started_at, finished_at, migrations=rows, cpu_samples=samples, details=details)

    def _start_app(self, driver: Driver, run: Run, vm: str, timeout: float,
                   details: dict[str, Any]) -> list[WorkloadRun]:
        """Start the app and let it warm up (the allocator's warm-up starts once its memory is
        written, so that the migration always moves it; a server's once it answers the controller
        and its load has started)."""
        self.log("app")
        warmup = run.spec.warmup_s * run.spec.scale
        if (service := services.SERVICES.get(run.variant.app)) is not None:
            server, self._load = services.start(service, driver, vm, self.lab,
                                                deadline=time.time() + warmup + timeout + CONTINUE_TIMEOUT_S)
            details["app"] = [{"argv": list(server.argv), "start": server.start}]
            time.sleep(warmup)
            return [server]
        app = [driver.start_workload(vm, list(argv)) for argv in app_argvs(run, vm, warmup + timeout)]
        for workload in app:
            if workload.argv[0] == "memwriter" and not wait_progress(
                    driver, workload, _reports("allocated"), after=0.0, count=1, timeout_s=READY_TIMEOUT_S):
                said = [line for _, line in workload.output[-3:]]
                raise RuntimeError(f"the allocator ({' '.join(workload.argv)}) did not write its memory: "
                                   + (f"exit status {workload.exit_status}, {said}" if workload.finished
                                      else f"not in {READY_TIMEOUT_S:g} s"))
        details["app"] = [{"argv": list(w.argv), "start": w.start} for w in app]
        time.sleep(warmup)
        return app

    def _continued(self, driver: Driver, vm: str, destination: str, app: Sequence[WorkloadRun],
                   record: MigrationRecord) -> bool:
        """After a completed migration: the VM runs at the destination and answers there, and
        every app program went on (the allocator reports twice more; others have not failed)."""
        if record.status != "completed":
            return False
        self.log("check")
        where = {info.name: (info.host, info.running) for info in driver.list_vms()}
        if where.get(vm) != (destination, True):
            return False
        probe = driver.start_workload(vm, list(PROBE))
        if driver.wait_workload(vm, probe.id, PROBE_TIMEOUT_S).exit_status != 0:
            return False
        end = record.start + record.total_time_s
        for workload in app:
            driver.wait_workload(vm, workload.id, timeout_s=0)
            if workload.finished and workload.exit_status != 0:
                return False
            if workload.argv[0] == "memwriter" and len(wait_progress(
                    driver, workload, _reports("written"), after=end, count=2, timeout_s=CONTINUE_TIMEOUT_S)) < 2:
                return False
        return self._load is None or self._load.answered_after(end, CONTINUE_TIMEOUT_S)

    def _check_links(self, rate: str | None) -> dict[str, Any]:
        """Every PM's link, both ends, at its inventory rate (as tc keeps it: whole bytes per s).
        Raises, stopping the campaign, when the runner cannot set or trust the variant's rate."""
        if not self.lab.embedded:
            if rate is not None:
                raise InputError(f"link_rate {rate}: the runner shapes only the embedded lab's links; on a "
                                 "real lab set link_shaping_rate (playbooks/link_shaping.yml) and leave link_rate out of the spec")
            return {}
        found = {pm.name: _link_rates(pm) for pm in self.lab.pms}
        wrong = {pm.name: found[pm.name] for pm in self.lab.pms
                 if set(found[pm.name].values()) != {pm.link_rate_bps // 8 * 8}}
        if wrong:
            raise InputError(f"the PMs' links are not at the inventory's rate ({wrong} bit/s), as a runner "
                             "killed mid-run leaves them: run `testbed lab up`, then this command again")
        return {"rates_bps": found}

    @contextlib.contextmanager
    def _links(self, rate: str | None) -> Iterator[dict[str, Any]]:
        """The variant's rate on every PM's link for the run (None: the lab's own), read back."""
        if rate is None:
            yield {"rate": None}
            return
        with links_at(self.lab, self.lab.pms, rate):
            yield {"rate": rate, "rates_bps": {pm.name: _link_rates(pm) for pm in self.lab.pms}}


def app_argvs(run: Run, vm: str, seconds: float) -> list[tuple[str, ...]]:
    """The programs the VM runs during a study run; `seconds` bounds the allocator's life."""
    app = run.variant.app
    if app == "idle":
        return []
    if app == "allocator":
        size = max(1, int(run.spec.memory_mb * ALLOCATOR_SHARE))
        return [("memwriter", str(size), str(ALLOCATOR_DIRTY_MBPS), str(math.ceil(seconds + CONTINUE_TIMEOUT_S)))]
    return [argv for chain in chains(run, vm) for argv in chain[0].argvs]


def migration_timeout(memory_mb: int, rate: str) -> float:
    """Seconds a migration may take: a base, plus the VM's whole memory sent twice at `rate` (a
    pre-copy resends what the guest dirtied; a 5 Mbit/s link needs 7 min for 256 MB once)."""
    return MIGRATION_TIMEOUT_BASE_S + 2 * memory_mb * 2**20 * 8 / parse_rate(rate)


@contextlib.contextmanager
def _migration_timeout(driver: Driver, seconds: float) -> Iterator[None]:
    """The drivers' migration timeout (an attribute of both study drivers) for one run."""
    before = driver.migration_timeout_s
    driver.migration_timeout_s = seconds
    try:
        yield
    finally:
        driver.migration_timeout_s = before


def _link_rates(pm: LabHost) -> dict[str, int | None]:
    return {"bridge_side": tc_rate_bps(pm.veth), "host_side": tc_rate_bps("eth0", pm.name)}


def _reports(word: str):
    """A progress reader of a workload's `WORD N` lines: (host time, N)."""
    def read(run: WorkloadRun) -> list[tuple[float, int]]:
        return [(t, int(float(parts[1]))) for t, line in list(run.output)
                if len(parts := line.split()) >= 2 and parts[0] == word]
    return read
