"""Pre-copy keeps every page: the host compares source and destination RAM page by page
(testbed.drivers.qemu_memcheck) while the guest dirties memory fast and runs Synthetic1's hot
loop, trusting neither the guest nor QEMU (QEMU < 9.0 is known to lose pages dirtied under TCG:
docs/DESIGN.md). The comparison itself is checked on dumps with known differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.bench.migration import wait_blocks
from testbed.cli import main
from testbed.drivers.base import MigrationMode, VMSpec, pm_hosts
from testbed.drivers.qemu import QemuDriver
from testbed.drivers.qemu_memcheck import PAGE, compare_dumps
from testbed.lab import Lab

MIGRATIONS = 4  # back and forth; each verified
DIRTY_MB, DIRTY_MBPS = 48, 30


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


@pytest.mark.lab
@pytest.mark.slow
def test_precopy_of_a_guest_dirtying_memory_keeps_every_page(embedded_lab: Lab) -> None:
    pms = pm_hosts(embedded_lab)[:2]
    driver = QemuDriver(pms)
    driver.destroy_vm("test-dirty")  # a leftover of an interrupted run
    driver.create_vm(VMSpec("test-dirty", memory_mb=128), pms[0].name)
    try:
        loop = driver.start_workload("test-dirty", ["synthetic1", "1000000", "100"])
        driver.start_workload("test-dirty", ["memwriter", str(DIRTY_MB), str(DIRTY_MBPS), "300"])
        wait_blocks(driver, loop, after=0.0, count=2)
        checks = []
        for k in range(MIGRATIONS):
            record = driver.migrate("test-dirty", pms[(k + 1) % 2].name, MigrationMode.PRECOPY, verify_memory=True)
            assert record.status == "completed", record
            checks.append(record.details["ram_check"])
            print(f"migration {k + 1}: {record.rounds} rounds, {record.bytes / 2**20:.0f} MiB, {checks[-1]}")
        assert all(c["pages_compared"] == (128 * 1024 + driver.ram_pad_kib) // 4 for c in checks)
        assert [c["pages_differ"] for c in checks] == [0] * MIGRATIONS, checks
        assert wait_blocks(driver, loop, after=record.start + record.total_time_s, count=1)  # still running
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
