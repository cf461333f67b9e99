"""Boot snapshots of the QEMU driver, for real, outside the embedded lab: three PMs in the root
namespace (loopback) with cgroups of their own; the guest image is the qemu role's (provisioned by
the embedded lab), the snapshots this test's own, starting from none (issue #13: three PMs booting
their first VMs at once once wrote one snapshot together, and every later run failed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.drivers import cgroups
from testbed.drivers.base import Host, MigrationMode, VMSpec
from testbed.drivers.qemu import IMAGE_DIR, QemuDriver
from testbed.drivers.qemu_snapshot import BootSnapshots
from testbed.lab import Lab

CONTROLLERS = ("cpu", "cpuacct", "memory", "freezer")


def _disk(path: Path, written: bool = False) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "256M"], check=True)
    if written:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(path)], check=True,
                       capture_output=True)
    return str(path)


def test_only_a_disk_with_nothing_in_it_can_start_from_a_snapshot(tmp_path: Path) -> None:
    if not shutil.which("qemu-img"):
        pytest.skip("needs qemu-utils (deps/apt-packages.txt)")
    snapshots = BootSnapshots(tmp_path, "tcg", "qemu-system-x86_64")
    blank = snapshots.path_for(128, 2, _disk(tmp_path / "blank.qcow2"))
    assert blank is not None and blank.parent == tmp_path / "boot-snapshots"
    assert snapshots.path_for(128, 1, _disk(tmp_path / "other.qcow2")) != blank  # the vCPUs are in the key
    assert snapshots.path_for(128, 2, _disk(tmp_path / "written.qcow2", written=True)) is None
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "blank.qcow2"),
                    "-F", "qcow2", str(tmp_path / "overlay.qcow2")], check=True)
    assert snapshots.path_for(128, 2, str(tmp_path / "overlay.qcow2")) is None


@pytest.fixture
def driver(embedded_lab: Lab, tmp_path: Path) -> Iterator[QemuDriver]:
    assert (IMAGE_DIR / "vmlinux").exists(), f"the qemu role left no guest image in {IMAGE_DIR}"
    parent = f"tsnap{os.getpid()}"
    hosts = [Host(pm, "127.0.0.1", 1.0, 4, cgroup_parent=parent) for pm in ("pma", "pmb", "pmc")]
    for host in hosts:
        for controller in CONTROLLERS:
            host.cgroup(controller).mkdir(parents=True, exist_ok=True)
        (host.cgroup("cpu") / "cpu.cfs_quota_us").write_text("100000")
    image = tmp_path / "image"  # the role's image, but snapshots of this test's own
    image.mkdir()
    for name in ("vmlinux", "initramfs.cpio", "inputs.sha256"):
        (image / name).symlink_to(IMAGE_DIR / name)
    made = QemuDriver(hosts, state_dir=tmp_path / "vms", image_dir=image, accel="tcg")  # snapshots by default
    yield made
    for info in made.list_vms():
        made.destroy_vm(info.name)
    for group in {host.cgroup(c).parent for host in hosts for c in CONTROLLERS}:  # the PMs' parents
        cgroups.remove(group, timeout_s=10)  # a QEMU that just exited may still be leaving its cgroup


def _snapshots(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "image" / "boot-snapshots").glob("*.state"))


def _booted(tmp_path: Path, vm: str) -> bool:
    """Whether the VM booted (its init announced itself) rather than starting from a snapshot."""
    return "@ready" in (tmp_path / "vms" / vm / "console.log").read_text()


@pytest.mark.lab
@pytest.mark.slow
def test_three_pms_booting_at_once_save_one_sound_snapshot_that_later_vms_start_from(
        driver: QemuDriver, tmp_path: Path) -> None:
    specs = [VMSpec(f"first-{k}", 128, 2, _disk(tmp_path / f"first-{k}.qcow2")) for k in range(3)]
    with ThreadPoolExecutor(3) as pool:  # as the runner places the first VM of each PM
        list(pool.map(driver.create_vm, specs, ("pma", "pmb", "pmc")))
    assert all(_booted(tmp_path, spec.name) for spec in specs)
    (saved,) = _snapshots(tmp_path)  # first one wins; the others only booted
    digest = (saved.parent / (saved.name + ".sha256")).read_text().split()[0]
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == digest
    assert not list(saved.parent.glob("*.partial"))

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(driver.create_vm, [VMSpec(f"next-{k}", 128, 2, _disk(tmp_path / f"next-{k}.qcow2"))
                                         for k in range(3)], ("pma", "pmb", "pmc")))
    assert not any(_booted(tmp_path, f"next-{k}") for k in range(3))  # all three restored
    run = driver.start_workload("next-1", ["synthetic1", "5"])
    assert driver.wait_workload("next-1", run.id, 120).exit_status == 0
    assert _snapshots(tmp_path) == [saved]


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped byte", "garbage with its digest"])
def test_a_damaged_snapshot_is_discarded_and_the_vm_boots(driver: QemuDriver, tmp_path: Path,
                                                          damage: str) -> None:
    driver.create_vm(VMSpec("save", 128, 1, _disk(tmp_path / "save.qcow2")), "pma")
    (saved,) = _snapshots(tmp_path)
    data = bytearray(saved.read_bytes())
    if damage == "flipped byte":  # the digest no longer matches: never handed to QEMU
        data[len(data) // 2] ^= 0xFF
    else:  # a digest that matches a bad stream: QEMU refuses it, whatever error that raises
        data = bytearray(b"\0" * len(data))
        (saved.parent / (saved.name + ".sha256")).write_text(f"{hashlib.sha256(data).hexdigest()}  x\n")
    saved.write_bytes(bytes(data))

    driver.create_vm(VMSpec("after", 128, 1, _disk(tmp_path / "after.qcow2")), "pmb")
    assert _booted(tmp_path, "after")
    run = driver.start_workload("after", ["synthetic1", "5"])
    assert driver.wait_workload("after", run.id, 120).exit_status == 0
    (again,) = _snapshots(tmp_path)  # the bad one discarded, a good one saved from this boot
    assert hashlib.sha256(again.read_bytes()).hexdigest() == (
        again.parent / (again.name + ".sha256")).read_text().split()[0]
    assert again.read_bytes() != bytes(data)


@pytest.mark.lab
@pytest.mark.slow
def test_a_second_vm_starts_from_the_first_ones_boot_and_works_and_migrates(driver: QemuDriver,
                                                                            tmp_path: Path) -> None:
    began = time.monotonic()
    driver.create_vm(VMSpec("snap-a", 128, 2, _disk(tmp_path / "a.qcow2")), "pma")
    booted_s = time.monotonic() - began
    assert len(_snapshots(tmp_path)) == 1

    began = time.monotonic()
    driver.create_vm(VMSpec("snap-b", 128, 2, _disk(tmp_path / "b.qcow2")), "pmb")
    restored_s = time.monotonic() - began
    print(f"boot {booted_s:.1f} s, start from the snapshot {restored_s:.1f} s")
    assert not _booted(tmp_path, "snap-b")
    assert {(i.name, i.host, i.running) for i in driver.list_vms()} == {("snap-a", "pma", True),
                                                                       ("snap-b", "pmb", True)}
    quota = int((driver.hosts()[1].cgroup("cpu") / "snap-b" / "cpu.cfs_quota_us").read_text())
    assert quota == 2 / 4 * 100_000  # capped like a booted VM

    run = driver.start_workload("snap-b", ["synthetic1", "20"])
    done = driver.wait_workload("snap-b", run.id, 120)
    assert done.exit_status == 0 and [text for _, text in done.output][-1] == "done 20"

    record = driver.migrate("snap-b", "pma", MigrationMode.PRECOPY)
    assert record.status == "completed", record
    again = driver.start_workload("snap-b", ["synthetic1", "5"])
    assert driver.wait_workload("snap-b", again.id, 120).exit_status == 0


@pytest.mark.lab
@pytest.mark.slow
def test_a_vm_that_died_by_itself_leaves_its_logs(driver: QemuDriver, tmp_path: Path) -> None:
    driver.create_vm(VMSpec("snap-c", 128, 1, _disk(tmp_path / "c.qcow2")), "pma")
    pid = int((tmp_path / "vms" / "snap-c" / "pma.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # as a guest panic ends QEMU (-no-reboot), from outside the driver
    deadline = time.monotonic() + 10
    while any(i.running for i in driver.list_vms()) and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.destroy_vm("snap-c")
    (kept,) = (tmp_path / "vms" / "crashed").iterdir()
    assert kept.name.startswith("snap-c-") and (kept / "console.log").exists() and (kept / "pma.log").exists()

    driver.create_vm(VMSpec("snap-d", 128, 1, _disk(tmp_path / "d.qcow2")), "pma")
    driver.destroy_vm("snap-d")  # destroyed while it ran: nothing to keep
    assert len(list((tmp_path / "vms" / "crashed").iterdir())) == 1
