"""`testbed bench migration --technique container`: one container migrated PM1 -> PM2 by
stop-and-copy on the lab, measured for real.

The container runs Synthetic1 and a memory checker holding half its memory size in
incompressible bytes (the dump is then about that large), plus the memory writer with
--dirty-mbps. Afterwards `continued` says whether Synthetic1's block counter and the checker's
pass counter kept climbing on the destination, the checker never found its buffer changed, and
the container's processes are the same ones (a restarted container would count from the start).
The links of both PMs run at --rate for the bench's duration, and the record is printed as one
JSON object on the last stdout line, with `phases` (name -> seconds) and `dump_bytes`.
"""

from __future__ import annotations

import argparse

from testbed.bench.migration import (
    BENCH_BLOCKS,
    REPORT_EVERY,
    WRITER_SECONDS,
    bench,
    wait_blocks,
    wait_progress,
)
from testbed.drivers.base import Host, MigrationMode, MigrationRecord, WorkloadRun
from testbed.drivers.container import ContainerDriver
from testbed.errors import InputError

#: The memory checker stops by itself after this long (s), whatever happens to the bench.
CHECK_SECONDS = 900
MIN_MEMORY_MB = 32


def run(args: argparse.Namespace) -> int:
    if args.mode != "stopcopy":
        raise InputError(f"--mode {args.mode}: containers migrate by stop-and-copy only (--mode stopcopy)")
    if args.memory < MIN_MEMORY_MB:
        raise InputError(f"--memory {args.memory}: a container needs at least {MIN_MEMORY_MB} MB")
    for flag, given in (("--verify-memory", args.verify_memory), ("--migrations", args.migrations != 1)):
        if given:
            raise InputError(f"{flag}: QEMU only")
    return bench(args, ContainerDriver, _migrate_busy_container, _summary,
                 extra=lambda record: {"dump_bytes": record.details.get("dump_bytes")})


def _migrate_busy_container(driver: ContainerDriver, vm: str, destination: Host,
                            args: argparse.Namespace) -> tuple[MigrationRecord, bool]:
    loop = driver.start_workload(vm, ["synthetic1", str(BENCH_BLOCKS), str(REPORT_EVERY)])
    check = driver.start_workload(vm, ["memcheck", str(args.memory // 2), str(CHECK_SECONDS)])
    if args.dirty_mbps > 0:
        driver.start_workload(vm, ["memwriter", "8", f"{args.dirty_mbps:g}", str(WRITER_SECONDS)])
    wait_blocks(driver, loop, after=0.0, count=2)
    wait_checks(driver, check, after=0.0, count=1)
    pids = driver.pids(vm)
    compression = None if args.compress == "none" else args.compress
    record = driver.migrate(vm, destination.name, MigrationMode.STOPCOPY, compression=compression)
    if record.status != "completed":
        return record, False
    return record, continued(driver, loop, check, record) and driver.pids(vm) == pids


def continued(driver: ContainerDriver, loop: WorkloadRun, check: WorkloadRun, record: MigrationRecord) -> bool:
    """Whether both counters went on past their last value before the migration, and every
    memory check after it passed."""
    end = record.start + record.total_time_s
    blocks_before = [n for t, n in _counts(loop, "block") if t <= record.start]
    checks_before = [n for t, n in _counts(check, "check") if t <= record.start]
    blocks_after = wait_blocks(driver, loop, after=end, count=2)
    checks_after = wait_checks(driver, check, after=end, count=2)
    bad = any(" bad " in line for _, line in check.output)
    return (bool(blocks_before) and len(blocks_after) >= 2 and blocks_after[0] > blocks_before[-1]
            and bool(checks_before) and len(checks_after) >= 2 and checks_after[0] > checks_before[-1]
            and not bad)


def wait_checks(driver: ContainerDriver, run: WorkloadRun, after: float, count: int,
                timeout_s: float = 120) -> list[int]:
    """memcheck pass numbers reported after `after` (waits until `count` arrived)."""
    return wait_progress(driver, run, lambda r: _counts(r, "check"), after, count, timeout_s)


def _counts(run: WorkloadRun, word: str) -> list[tuple[float, int]]:
    """(host time, N) of a workload's "WORD N ..." progress lines."""
    return [(t, int(parts[1])) for t, line in list(run.output)
            if len(parts := line.split()) >= 2 and parts[0] == word and parts[1].isdigit()]


def _summary(result: dict) -> None:
    """The figures a reader wants first, before the JSON line (on stdout, above it)."""
    copy_s = result["phases"].get("copy") or 0.0
    rate = result["bytes"] * 8 / copy_s / 1e6 if copy_s else 0.0
    phases = ", ".join(f"{name} {seconds:.3f}" for name, seconds in result["phases"].items())
    downtime = result["downtime_s"]
    print(f"container stopcopy {result['vm']} {result['source']} -> {result['destination']} at {result['rate']} "
          f"(compress {result['compress']}): {result['status']}, total {result['total_time_s']:.3f} s, downtime "
          f"{'-' if downtime is None else f'{downtime:.3f} s'}, dump {(result['dump_bytes'] or 0) / 2**20:.1f} MiB, "
          f"{result['bytes'] / 2**20:.1f} MiB on the wire at {rate:.1f} Mbit/s; phases (s): {phases}; "
          f"continued={result['continued']}" + (f", error: {result['error']}" if result["error"] else ""))
