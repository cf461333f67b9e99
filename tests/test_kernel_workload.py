"""The Kernel app (thesis Exp. 3): how the runner asks for it, and, on the embedded lab, a real
compile in a QEMU kernel guest whose disk is an overlay of the root disk on the PM's share.

The lab test compiles one object (the smallest compile the app runs) in one VM, to keep its CI
time small; docs/workloads.md has the per-object times measured at 1 and 2 vCPUs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.drivers.base import Host, VMSpec, pm_hosts
from testbed.drivers.qemu import QemuDriver
from testbed.errors import InputError
from testbed.lab import Lab
from testbed.runner.campaign import Run
from testbed.runner.executor import (
    KERNEL_JOBS_PER_VCPU,
    KERNEL_OBJECTS,
    KERNEL_PROGRAM,
    KERNEL_ROOT,
    chains,
    supported,
)
from testbed.spec import load_spec
from testbed.storage import DEFAULT_LAYOUT, create_disk_argv, disk_url

REPO = Path(__file__).resolve().parents[1]
EXP3 = REPO / "experiments" / "exp3.yml"
VM = "test-kernel"


def test_kernel_compiles_scaled_objects_with_two_jobs_per_vcpu() -> None:
    spec = load_spec(EXP3).model_copy(update={"scale": 0.1, "vcpus": 3})
    run = Run(spec, "qemu", spec.variants()[0], 1)
    objects = str(round(KERNEL_OBJECTS * 0.1))
    assert chains(run, "vm1") == chains(run, "vm9")  # the same compile in every VM
    ((step,),) = chains(run, "vm1")
    assert step.argvs == ((*KERNEL_PROGRAM, str(KERNEL_JOBS_PER_VCPU * 3), objects),)
    tiny = Run(spec.model_copy(update={"scale": 0.001}), "qemu", spec.variants()[0], 1)
    assert chains(tiny, "vm1")[0][0].argvs[0][-1] == "1"  # never less than one object


def test_kernel_app_compiles_one_tree_per_vm() -> None:
    """(Its memory in containers: tests/test_container_manager.py.)"""
    spec = load_spec(EXP3)
    supported(spec, ["qemu"])
    with pytest.raises(InputError, match="instances"):
        supported(spec.model_copy(update={"instances": 2}), ["qemu"])


@pytest.mark.parametrize("argv", [[], ["2"], ["0", "1"], ["2", "x"], ["2", "1", "3"]])
def test_workload_refuses_bad_arguments(argv: list[str]) -> None:
    proc = subprocess.run(["bash", str(REPO / "workloads" / "kernel" / "kernel"), *argv],
                          capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == 2
    assert "usage: kernel JOBS COUNT" in proc.stderr


@pytest.fixture(scope="module")
def pm(embedded_lab: Lab) -> Host:
    return pm_hosts(embedded_lab)[0]


@pytest.fixture(scope="module")
def kernel_vm(embedded_lab: Lab, pm: Host) -> Iterator[tuple[QemuDriver, Path]]:
    """A 200 MB kernel guest on PM1 (4 vCPUs: its cap is then the whole PM's, which keeps the
    compile short), its disk an overlay made as the executor makes it; returns the driver and
    the disk's file in PM1's share (the machine's file system holds the embedded shares)."""
    driver = QemuDriver([pm])
    driver.destroy_vm(VM)  # a leftover of an interrupted run
    url = disk_url(embedded_lab, VM, pm.name)
    root = f"nfs://{pm.address}{DEFAULT_LAYOUT.share(pm.name) / KERNEL_ROOT}"
    subprocess.run(create_disk_argv(url, backing=root), check=True, timeout=60)
    driver.create_vm(VMSpec(VM, memory_mb=200, vcpus=4, disk=url), pm.name)
    yield driver, Path(str(DEFAULT_LAYOUT.disk(VM, pm.name)))
    driver.destroy_vm(VM)
    Path(str(DEFAULT_LAYOUT.disk(VM, pm.name))).unlink(missing_ok=True)


@pytest.mark.lab
def test_kernel_compile_writes_its_objects_to_the_vm_disk(kernel_vm: tuple[QemuDriver, Path]) -> None:
    driver, disk = kernel_vm
    before = disk.stat().st_blocks
    run = driver.wait_workload(VM, driver.start_workload(VM, [*KERNEL_PROGRAM, "2", "1"]).id, timeout_s=600)
    text = "\n".join(line for _, line in run.output)
    assert run.exit_status == 0, text
    assert "compiled 1 objects with -j2" in text
    print(f"1 object, -j2, 4 vCPUs capped at PM1's capacity: {run.end - run.start:.1f} s (host clock)")
    listed = driver.wait_workload(VM, driver.start_workload(
        VM, ["chroot", "/mnt", "/usr/bin/head", "-n", "1", "/usr/src/linux/testbed-objects.list"]).id, 30)
    first = listed.output[0][1]
    found = driver.wait_workload(VM, driver.start_workload(
        VM, ["chroot", "/mnt", "/usr/bin/wc", "-c", f"/usr/src/linux/{first}"]).id, 30)
    assert found.exit_status == 0 and int(found.output[0][1].split()[0]) > 0  # in the guest's tree
    # The backing file is read-only to QEMU: the compile's writes grew the VM's own overlay.
    assert disk.stat().st_blocks > before
