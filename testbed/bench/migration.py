"""`testbed bench migration`: one VM migrated PM1 -> PM2 on the lab, measured for real.

The VM runs Synthetic1 (and, with --dirty-mbps, workloads/pagecheck.c dirtying half the memory its
kernel leaves at that many MB/s while checking every page it rewrites), so the migration moves a busy guest;
afterwards the bench checks that Synthetic1's block counter kept climbing on the destination and
that the guest never booted again (`continued`), and reads pagecheck's own count of pages it found
stale or damaged (`guest_pages_bad`: a page a pre-copy lost, seen from inside the guest). The links of
both PMs run at --rate for the bench's duration (their lab rate is restored afterwards), and
the record is printed as one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from testbed.drivers.base import Driver, Host, MigrationMode, MigrationRecord, VMSpec, WorkloadRun, pm_hosts
from testbed.drivers.qemu import MIN_MEMORY_MB, QemuDriver
from testbed.errors import InputError
from testbed.lab import DEFAULT_INVENTORY, Lab, LabHost, load_lab, parse_rate, tbf_options

#: Synthetic1 blocks for the bench's CPU loop: far more than a bench lasts, still bounded.
BENCH_BLOCKS = 2_000_000
REPORT_EVERY = 100
MAX_MIGRATIONS = 200  # --migrations: bounded, as every loop here
#: The memory dirtier stops by itself after this long (s), whatever happens to the bench.
WRITER_SECONDS = 900
#: What the guest's Debian 6.1 kernel keeps of its RAM (measured: 64,412 kB reserved of 130,548 kB,
#: 46 MB free in a 128 MB guest): pagecheck gets half of the rest, since half of all of it (64 MB of
#: a 128 MB guest) was OOM-killed in the guest before dirtying anything.
GUEST_KERNEL_MB = 64
_BLOCK = re.compile(r"^block (\d+)$")
_PAGECHECK = re.compile(r"^(checked|done) (\d+) bad (\d+)$")
D = TypeVar("D", bound=Driver)


def run(args: argparse.Namespace) -> int:
    """The QEMU bench (the technique catalogue's for qemu)."""
    if args.compress == "bzip2":
        raise InputError("--compress bzip2: QEMU compresses migration streams with zstd only")
    if args.memory < MIN_MEMORY_MB:
        raise InputError(f"--memory {args.memory}: the guest needs at least {MIN_MEMORY_MB} MB")
    if not 1 <= args.migrations <= MAX_MIGRATIONS:
        raise InputError(f"--migrations {args.migrations}: must be within 1..{MAX_MIGRATIONS}")
    if args.verify_memory and args.mode == "postcopy":
        raise InputError("--verify-memory: in post-copy the destination runs before it holds every page")
    return bench(args, QemuDriver, _migrate_busy_vm, _summary, extra=_integrity)


def bench(args: argparse.Namespace, make_driver: Callable[[list[Host]], D],
          migrate_busy: Callable[[D, str, Host, argparse.Namespace], tuple[MigrationRecord, bool]],
          summary: Callable[[dict], None],
          extra: Callable[[MigrationRecord], dict[str, object]] = lambda record: {}) -> int:
    """What every technique's bench does around its own migration (after its own option
    checks): check the shared options, provision the lab if absent, create the VM on PM1 with
    both PMs' links at --rate, always destroy it, and print the summary then the JSON last line
    (the record, `continued`, the options, and the technique's `extra` fields). Exits 1 when
    the migration failed, the guest did not go on, or pages were lost."""
    if args.dirty_mbps < 0:
        raise InputError(f"--dirty-mbps {args.dirty_mbps}: must be >= 0")
    try:
        parse_rate(args.rate)
    except ValueError as err:
        raise InputError(f"--rate: {err}") from None
    lab = _lab(args.inventory)
    if len(lab.pms) < 2:
        raise InputError(f"inventory {lab.inventory}: a migration needs two PMs, it has {len(lab.pms)}")

    driver = make_driver(pm_hosts(lab))
    source, destination = driver.hosts()[:2]
    vm = f"bench-{uuid.uuid4().hex[:6]}"
    with links_at(lab, lab.pms[:2], args.rate):
        driver.create_vm(VMSpec(vm, memory_mb=args.memory), source.name)
        try:
            record, continued = migrate_busy(driver, vm, destination, args)
        finally:
            driver.destroy_vm(vm)
    result = record.as_dict() | {"continued": continued, "rate": args.rate,
                                 "dirty_mbps": args.dirty_mbps, "compress": args.compress} | extra(record)
    summary(result)
    lost = bool(result.get("pages_differ") or result.get("guest_pages_bad"))
    if lost:
        print(f"bench: the migrations lost pages: {result.get('pages_differ', '-')} differed host-side, "
              f"{result.get('guest_pages_bad', '-')} found bad by the guest", file=sys.stderr)
    unchecked = "guest_pages_checked" in result and result["guest_pages_checked"] is None
    if unchecked:
        print(f"bench: the guest's page checker did not go round its buffer after the last migration "
              f"(its last line: {result.get('guest_last_line')!r})", file=sys.stderr)
    print(json.dumps(result))
    return 0 if record.status == "completed" and continued and not lost and not unchecked else 1


def _migrate_busy_vm(driver: QemuDriver, vm: str, destination: Host,
                     args: argparse.Namespace) -> tuple[MigrationRecord, bool]:
    """Migrate the busy VM --migrations times, PM1 -> PM2 -> PM1 ...; the last record, with the
    RAM comparison of every migration (--verify-memory) in its details."""
    loop = driver.start_workload(vm, ["synthetic1", str(BENCH_BLOCKS), str(REPORT_EVERY)])
    dirtier, size = None, dirtier_mb(args.memory)
    if args.dirty_mbps > 0:
        dirtier = driver.start_workload(vm, ["pagecheck", str(size), f"{args.dirty_mbps:g}", str(WRITER_SECONDS)])
        wait_progress(driver, dirtier, _pagecheck_reports, after=0.0, count=1)  # dirtying when the migration starts
    wait_blocks(driver, loop, after=0.0, count=2)
    compression = None if args.compress == "none" else args.compress
    ends = [destination.name, driver.hosts()[0].name]
    checks: list[object] = []
    for k in range(args.migrations):
        record = driver.migrate(vm, ends[k % 2], MigrationMode(args.mode), compression=compression,
                                verify_memory=args.verify_memory)
        checks.append(record.details.get("ram_check"))
        if record.status != "completed":
            break
        wait_blocks(driver, loop, after=record.start + record.total_time_s, count=1)
    record.details["ram_checks"] = checks
    if record.status != "completed":
        return record, False
    went_on = continued(driver, loop, record)
    if dirtier is not None:
        record.details["guest_pages"] = guest_pages(driver, dirtier, size, args.dirty_mbps,
                                                    after=record.start + record.total_time_s)
    return record, went_on


def dirtier_mb(memory_mb: int) -> int:
    """pagecheck's buffer in a guest of `memory_mb`: half of what the guest's kernel leaves (16 MB
    at the smallest guest, MIN_MEMORY_MB)."""
    return (memory_mb - GUEST_KERNEL_MB) // 2


def guest_pages(driver: Driver, dirtier: WorkloadRun, size_mb: int, rate_mbps: float,
                after: float) -> dict[str, int | None]:
    """pagecheck's own counts once it has gone round its whole buffer after `after` (the last
    migration's end), so that a page any migration lost has been checked again: pages checked
    so far and pages found stale or damaged. Its last line ("done": a check of every page as it
    ends) counts as a round too, since a slow lab can outlast its SECONDS. None when neither
    came after `after` (pagecheck ended before, or the guest died); its last line says which."""
    rounds = math.ceil(size_mb / rate_mbps) + 2  # it reports once a second
    wait_progress(driver, dirtier, _pagecheck_reports, after, count=rounds, timeout_s=rounds + 60)
    reports = [(m[1], int(m[2]), int(m[3])) for t, line in list(dirtier.output)
               if t > after and (m := _PAGECHECK.match(line))]
    whole = len(reports) >= rounds or any(kind == "done" for kind, _, _ in reports)
    checked, bad = reports[-1][1:] if whole else (None, None)
    last = dirtier.output[-1][1] if dirtier.output else None
    return {"guest_pages_checked": checked, "guest_pages_bad": bad, "guest_last_line": last}


def _pagecheck_reports(run: WorkloadRun) -> list[tuple[float, int]]:
    return [(t, int(m[2])) for t, line in list(run.output) if (m := _PAGECHECK.match(line))]


def _integrity(record: MigrationRecord) -> dict[str, object]:
    """The JSON line's integrity figures: pagecheck's own counts (--dirty-mbps), and the host's
    RAM comparisons summed over the migrations (--verify-memory)."""
    guest = record.details.get("guest_pages", {})
    checks = [c for c in record.details.get("ram_checks", []) if isinstance(c, dict)]
    if not checks:
        return guest
    return guest | {"pages_compared": sum(c["pages_compared"] for c in checks),
            "pages_differ": sum(c["pages_differ"] for c in checks),
            "migrations_verified": len(checks),
            "migrations_losing_pages": sum(1 for c in checks if c["pages_differ"]),
            "first_differing": next((c["first_differing"] for c in checks if c["pages_differ"]), [])}


def continued(driver: QemuDriver, run: WorkloadRun, record: MigrationRecord) -> bool:
    """Whether Synthetic1 went on where it was: its block counter, read on the destination
    after the migration, is above the last value read before the migration ended, and the
    guest never booted again (a restarted workload would count from the start)."""
    end = record.start + record.total_time_s
    before = [n for t, n in synthetic1_blocks(run) if t <= end]
    after = wait_blocks(driver, run, after=end, count=2)
    return (bool(before) and len(after) >= 2 and after[0] > before[-1]
            and after == sorted(after) and driver.reboots(run.vm) == 0)


def synthetic1_blocks(run: WorkloadRun) -> list[tuple[float, int]]:
    """Synthetic1's progress lines as (host time, block number)."""
    return [(t, int(m[1])) for t, line in list(run.output) if (m := _BLOCK.match(line))]


def wait_blocks(driver: Driver, run: WorkloadRun, after: float, count: int,
                timeout_s: float = 120) -> list[int]:
    """Block numbers the guest reported after `after` (waits until `count` arrived)."""
    return wait_progress(driver, run, synthetic1_blocks, after, count, timeout_s)


def wait_progress(driver: Driver, run: WorkloadRun, progress: Callable[[WorkloadRun], list[tuple[float, int]]],
                  after: float, count: int, timeout_s: float = 120) -> list[int]:
    """The numbers of a workload's progress lines reported after `after`: waits until `count`
    arrived, the workload ended or timeout_s passed, reading its output first so that lines
    already there count at once."""
    deadline = time.monotonic() + timeout_s
    driver.wait_workload(run.vm, run.id, timeout_s=0)
    while (len(seen := [n for t, n in progress(run) if t > after]) < count and not run.finished
           and time.monotonic() < deadline):
        driver.wait_workload(run.vm, run.id, timeout_s=0.5)
    return seen


def _lab(inventory: str | None) -> Lab:
    """The lab, provisioned first (`testbed lab up`'s playbooks) when its PMs or the guest
    image are not there."""
    from testbed.drivers.qemu import IMAGE_DIR
    from testbed.playbooks import PLAYBOOKS, run_playbook

    path = Path(inventory) if inventory else DEFAULT_INVENTORY
    lab = load_lab(path)
    for playbook, ready in (("site.yml", lambda: not lab.embedded or _hosts_up(lab)),
                            ("qemu.yml", lambda: (IMAGE_DIR / "vmlinux").exists())):
        if not ready():
            print(f"bench: running {playbook} on {path}", file=sys.stderr)
            if run_playbook(PLAYBOOKS / playbook, path).rc != 0 or not ready():
                raise InputError(f"inventory {path}: {playbook} failed; the lab is not ready")
    return lab


def _hosts_up(lab: Lab) -> bool:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return all(pm.name in names and pm.cgroup("cpu").is_dir() for pm in lab.pms)


@contextmanager
def links_at(lab: Lab, pms: tuple[LabHost, ...], rate: str) -> Iterator[None]:
    """Shape both ends of each PM's link at `rate` (tbf, as the lab does); restore them after."""
    ends = [(pm.veth, None) for pm in pms] + [("eth0", pm.name) for pm in pms] if lab.embedded else []
    saved = [(dev, netns, _qdisc(dev, netns)) for dev, netns in ends]
    try:
        for dev, netns, _ in saved:
            _tc(netns, ["qdisc", "replace", "dev", dev, "root", "tbf", *tbf_options(parse_rate(rate))])
        yield
    finally:
        for dev, netns, qdisc in saved:
            if qdisc and qdisc.get("kind") == "tbf":
                opts = qdisc["options"]
                _tbf(dev, netns, opts["rate"] * 8, opts["burst"], f"{opts['lat']}us")
            else:
                _tc(netns, ["qdisc", "del", "dev", dev, "root"], check=False)


def _qdisc(dev: str, netns: str | None) -> dict | None:
    shown = _tc(netns, ["-j", "qdisc", "show", "dev", dev])
    roots = [q for q in json.loads(shown.stdout or "[]") if q.get("root")]
    return roots[0] if roots else None


def _tbf(dev: str, netns: str | None, rate_bps: int, burst: int, latency: str) -> None:
    _tc(netns, ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bps}bit",
                "burst", str(burst), "latency", latency])


def _tc(netns: str | None, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["tc", "-n", netns] if netns else ["tc"]
    return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True)


def _summary(result: dict) -> None:
    """The figures a reader wants first, before the JSON line (on stdout, above it)."""
    wire = result["details"].get("wire_bytes") or result["bytes"]
    rate = wire * 8 / max(result["phases"].get("transfer_s", 0), 1e-9) / 1e6
    downtime = result["downtime_s"]
    print(f"{result['mode']} {result['vm']} {result['source']} -> {result['destination']} at {result['rate']}: "
          f"{result['status']}, total {result['total_time_s']:.3f} s, downtime "
          f"{'-' if downtime is None else f'{downtime:.3f} s'}, {result['bytes'] / 2**20:.1f} MiB of memory, "
          f"{wire / 2**20:.1f} MiB on the wire at {rate:.1f} Mbit/s, {result['rounds']} rounds, continued={result['continued']}"
          + (f", error: {result['error']}" if result["error"] else ""))
