"""Pre-copy keeps every page: the host compares source and destination RAM page by page
(testbed.drivers.qemu_memcheck) while the guest dirties memory fast (workloads/pagecheck.c, which
also checks each page it rewrites, from inside) and runs Synthetic1's hot loop, trusting neither
the guest nor QEMU (QEMU < 9.0 is known to lose pages dirtied under TCG:
docs/DESIGN.md). The comparison itself is checked on dumps with known differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.bench.migration import guest_pages, wait_blocks
from testbed.cli import main
from testbed.drivers.base import MigrationMode, VMSpec, WorkloadRun, pm_hosts
from testbed.drivers.qemu import QemuDriver, past_xen_bounds
from testbed.drivers.qemu_memcheck import PAGE, compare_dumps
from testbed.lab import Lab

MIGRATIONS = 4  # back and forth; each verified
DIRTY_MB, DIRTY_MBPS = 32, 30  # of the 46 MB a 128 MB guest has free (48 MB was OOM-killed)
DIRTY_S = 900  # outlasts the migrations on a slow lab; its end is a full check anyway


def test_compare_dumps_names_the_pages_that_differ(tmp_path: Path) -> None:
    memory = np.random.default_rng(1).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    (tmp_path / "a").write_bytes(memory.tobytes())
    changed = memory.copy()
    changed[5 * PAGE + 17] ^= 1  # one bit of page 5
    changed[40 * PAGE:41 * PAGE] = 0  # all of page 40
    (tmp_path / "b").write_bytes(changed.tobytes())
    same = compare_dumps(tmp_path / "a", tmp_path / "a")
    assert (same.pages_compared, same.pages_differ, same.first_differing) == (64, 0, [])
    diff = compare_dumps(tmp_path / "a", tmp_path / "b")
    assert (diff.pages_compared, diff.pages_differ, diff.first_differing) == (64, 2, [hex(5 * PAGE), hex(40 * PAGE)])
    (tmp_path / "short").write_bytes(memory[:-1].tobytes())
    with pytest.raises(ValueError, match="not equal whole pages"):
        compare_dumps(tmp_path / "a", tmp_path / "short")


@pytest.mark.parametrize(("ram", "past"), [
    ({"total": 100, "transferred": 299, "dirty-sync-count": 29}, False),
    ({"total": 100, "transferred": 300, "dirty-sync-count": 2}, True),  # 3x the RAM sent
    ({"total": 100, "transferred": 10, "dirty-sync-count": 30}, True),  # 29 rounds done
    ({}, False),  # before QEMU counts anything
])
def test_precopy_stops_at_xens_bounds(ram: dict, past: bool) -> None:
    assert past_xen_bounds(ram) is past


class _Finished:
    """A driver whose workloads have already ended: guest_pages reads what they printed."""

    def wait_workload(self, vm: str, run_id: str, timeout_s: float) -> None:
        return None


@pytest.mark.parametrize(("lines", "expected"), [
    ([(5.0, "checked 100 bad 0"), (11.0, "checked 700 bad 0"), (12.0, "checked 800 bad 0"),
      (13.0, "checked 900 bad 2"), (14.0, "checked 990 bad 2")], (990, 2)),  # a whole round after 10 s
    ([(11.0, "checked 700 bad 0"), (11.5, "done 950 bad 0")], (950, 0)),  # ended after 10 s: its last full check
    ([(9.0, "checked 700 bad 0"), (9.5, "done 950 bad 0")], (None, None)),  # ended before the last migration
    ([(11.0, "checked 700 bad 0"), (12.0, "checked 800 bad 0")], (None, None)),  # died before a whole round
    ([(3.0, "Killed")], (None, None)),  # the guest's OOM killer ended it at once
])
def test_guest_pages_needs_a_whole_round_after_the_last_migration(
        lines: list[tuple[float, str]], expected: tuple[int | None, int | None]) -> None:
    run = WorkloadRun("vm", "1", ("pagecheck", "8", "4", "900"), start=0.0, end=20.0, exit_status=0, output=lines)
    seen = guest_pages(_Finished(), run, size_mb=8, rate_mbps=4, after=10.0)  # type: ignore[arg-type]
    assert (seen["guest_pages_checked"], seen["guest_pages_bad"]) == expected
    assert seen["guest_last_line"] == lines[-1][1]


@pytest.mark.lab
@pytest.mark.slow
def test_precopy_of_a_guest_dirtying_memory_keeps_every_page(embedded_lab: Lab) -> None:
    pms = pm_hosts(embedded_lab)[:2]
    driver = QemuDriver(pms)
    driver.destroy_vm("test-dirty")  # a leftover of an interrupted run
    driver.create_vm(VMSpec("test-dirty", memory_mb=128), pms[0].name)
    try:
        loop = driver.start_workload("test-dirty", ["synthetic1", "1000000", "100"])
        dirtier = driver.start_workload("test-dirty", ["pagecheck", str(DIRTY_MB), str(DIRTY_MBPS), str(DIRTY_S)])
        wait_blocks(driver, loop, after=0.0, count=2)
        checks, bounded = [], []
        for k in range(MIGRATIONS):
            record = driver.migrate("test-dirty", pms[(k + 1) % 2].name, MigrationMode.PRECOPY, verify_memory=True)
            assert record.status == "completed", record
            checks.append(record.details["ram_check"])
            bounded.append(record.details["precopy_bounded"])
            print(f"migration {k + 1}: {record.rounds} rounds, {record.bytes / 2**20:.0f} MiB, "
                  f"{record.downtime_s:.2f} s down, bounded {bounded[-1]}, {checks[-1]}")
        assert all(c["pages_compared"] == (128 * 1024 + driver.ram_pad_kib) // 4 for c in checks)
        assert [c["pages_differ"] for c in checks] == [0] * MIGRATIONS, checks
        assert any(bounded), "dirtying faster than the link, pre-copy should have reached Xen's bounds"
        assert wait_blocks(driver, loop, after=record.start + record.total_time_s, count=1)  # still running
        seen = guest_pages(driver, dirtier, DIRTY_MB, DIRTY_MBPS, after=record.start + record.total_time_s)
        assert seen["guest_pages_bad"] == 0 and seen["guest_pages_checked"] > DIRTY_MB * 256, (seen, dirtier.output[-5:])
    finally:
        driver.destroy_vm("test-dirty")


@pytest.mark.parametrize(("argv", "message"), [
    (["--technique", "container", "--mode", "stopcopy", "--verify-memory"], "--verify-memory: QEMU only"),
    (["--migrations", "0"], "--migrations 0: must be within 1..200"),
    (["--mode", "postcopy", "--verify-memory"], "--verify-memory: in post-copy"),
])
def test_bench_migration_refuses_what_it_cannot_verify(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "migration", *argv]) == 2
    assert message in capsys.readouterr().err
