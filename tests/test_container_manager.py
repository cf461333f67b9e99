"""Containers under the VM manager and the runner, without the lab: which driver an LC migrates
with, how the runner's drivers are made, which containers count as running, and when workload
binaries are rebuilt. The real migrations under the CC are in tests/test_container_lab.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from testbed.drivers.base import Host, MigrationMode, MigrationRecord, VMInfo, VMSpec
from testbed.drivers.container import ContainerDriver, build_workloads
from testbed.drivers.qemu import QemuDriver
from testbed.errors import InputError
from testbed.lab import DEFAULT_INVENTORY, load_lab
from testbed.manager.local import DriverDispatch
from testbed.runner import executor
from testbed.spec import load_spec
from testbed.techniques import EMBEDDED, RUNNABLE, make_driver, technique

REPO = Path(__file__).resolve().parents[1]


class Listed:
    """A driver reduced to what DriverDispatch asks of one: its VMs, and migrations it records."""

    def __init__(self, technique: str, vms: list[VMInfo]) -> None:
        self.technique = technique
        self.vms = vms
        self.orders: list[tuple[str, str, MigrationMode, str | None]] = []

    def list_vms(self) -> list[VMInfo]:
        return self.vms

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None) -> MigrationRecord:
        self.orders.append((vm, destination, mode, compression))
        return MigrationRecord(vm, "pm1", destination, mode, 0.0, "completed", 1.0, 1.0, 0)


def _vm(name: str, host: str, running: bool = True) -> VMInfo:
    return VMInfo(name, host, VMSpec(name), running)


def test_an_order_goes_to_the_driver_that_runs_the_vm_here_with_its_mode_and_compression() -> None:
    qemu = Listed("qemu", [_vm("vm1", "pm1"), _vm("vm2", "pm2")])
    container = Listed("container", [_vm("vm2", "pm1"), _vm("vm3", "pm1", running=False)])
    dispatch = DriverDispatch({"qemu": qemu, "container": container}, "pm1")
    assert dispatch("vm2", "pm3", "stopcopy", "bzip2").mode is MigrationMode.STOPCOPY
    assert container.orders == [("vm2", "pm3", MigrationMode.STOPCOPY, "bzip2")] and qemu.orders == []
    dispatch("vm1", "pm2", "precopy")
    assert qemu.orders == [("vm1", "pm2", MigrationMode.PRECOPY, None)]


@pytest.mark.parametrize(("vm", "found"), [("vm3", "no driver"), ("vm9", "no driver"),
                                           ("vm4", "the qemu and container drivers")])
def test_an_order_no_single_driver_runs_here_is_refused(vm: str, found: str) -> None:
    """vm3 is stopped, vm9 unknown, vm4 claimed by both techniques: nothing is migrated."""
    qemu = Listed("qemu", [_vm("vm4", "pm1")])
    container = Listed("container", [_vm("vm3", "pm1", running=False), _vm("vm4", "pm1")])
    dispatch = DriverDispatch({"qemu": qemu, "container": container}, "pm1")
    with pytest.raises(LookupError, match=found):
        dispatch(vm, "pm2", "stopcopy")
    assert qemu.orders == container.orders == []


def test_every_technique_has_its_driver_and_the_runner_uses_them() -> None:
    hosts = [Host("pm1", "198.18.0.11", 0.6, 4)]
    assert isinstance(make_driver("qemu", hosts), QemuDriver)
    assert isinstance(make_driver("container", hosts), ContainerDriver)
    with pytest.raises(ValueError, match="'sim' has no driver here"):
        make_driver("sim", hosts)
    with pytest.raises(ValueError, match="'xen': its driver reaches the PMs over SSH and needs a key file"):
        make_driver("xen", hosts)
    assert set(EMBEDDED) <= set(RUNNABLE)
    drivers = executor.make_drivers(load_lab(DEFAULT_INVENTORY))
    assert {t: d.technique for t, d in drivers.items()} == {"qemu": "qemu", "container": "container"}
    executor.supported(load_spec(REPO / "experiments" / "exp1.yml"), ["container"])  # no InputError
    assert technique("container").default_mode == "stopcopy"


def test_lc_refuses_an_unknown_technique_before_touching_the_pm() -> None:
    done = subprocess.run([sys.executable, "-m", "testbed.cli", "manager", "lc", "--host", "tb-pm1",
                           "--technique", "container", "--technique", "xen"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "testbed: error: --technique: 'xen' has no driver (available: qemu, container)"


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A driver state directory outside /tmp (the driver refuses one a container would hide)."""
    made = Path(tempfile.mkdtemp(prefix="testbed-ct-test-", dir="/var/tmp"))
    yield made
    shutil.rmtree(made)


def test_a_container_runs_while_its_tree_has_a_process_on_any_pm(state_dir: Path) -> None:
    """The freezer cgroups here are plain files (all `_procs` reads): the container's state says
    pm1 while its tasks are already in pm2's cgroup, as for an instant during a migration."""
    hosts = [Host(pm, "198.18.0.11", 0.6, 4, cgroup_root=state_dir / "cgroup") for pm in ("pm1", "pm2")]
    driver = ContainerDriver(hosts, state_dir=state_dir / "ct")
    for name, address in (("ct-a", "198.18.0.100"), ("ct-b", "198.18.0.101")):
        state = {"spec": asdict(VMSpec(name)), "host": "pm1", "address": address, "root_dir": "/x", "launcher_pid": 0}
        (state_dir / "ct" / name).mkdir(parents=True)
        (state_dir / "ct" / name / "ct.json").write_text(json.dumps(state))
    moved = hosts[1].cgroup("freezer") / "ct-a"
    moved.mkdir(parents=True)
    (moved / "cgroup.procs").write_text("4242\n")
    assert [(i.name, i.host, i.running) for i in driver.list_vms()] == [("ct-a", "pm1", True), ("ct-b", "pm1", False)]
    assert driver._free_address() == "198.18.0.102"


WORKLOAD_C = '#include "w.h"\n#include <stdio.h>\nint main(void) { printf("%d\\n", VALUE); return 0; }\n'


def test_workloads_are_rebuilt_when_any_input_changes_and_only_then(state_dir: Path) -> None:
    sources, bin_dir = state_dir / "src", state_dir / "bin"
    sources.mkdir()
    (sources / "prog.c").write_text(WORKLOAD_C)
    (sources / "w.h").write_text("#define VALUE 1\n")
    (sources / "tool.py").write_text("print('one')\n")

    def output() -> str:
        return subprocess.run([bin_dir / "prog"], capture_output=True, text=True, check=True).stdout.strip()

    build_workloads(bin_dir, sources)
    assert output() == "1" and (bin_dir / "tool").read_text() == "print('one')\n"
    built = (bin_dir / "prog").stat()
    build_workloads(bin_dir, sources)
    assert (bin_dir / "prog").stat().st_ino == built.st_ino  # nothing changed: not rebuilt

    header = sources / "w.h"
    header.write_text("#define VALUE 2\n")
    (sources / "tool.py").write_text("print('two')\n")
    for path in (header, sources / "tool.py"):  # older than the binaries: mtimes would miss it
        subprocess.run(["touch", "-d", "2001-01-01", str(path)], check=True)
    build_workloads(bin_dir, sources)
    assert output() == "2" and (bin_dir / "tool").read_text() == "print('two')\n"


def test_containers_get_the_kernel_root_only_once_it_is_prepared(tmp_path: Path) -> None:
    """A tree the kernel_root role has not finished (no marker) is not mounted: the Kernel app
    would find a half-built tree instead of failing plainly."""
    from testbed.drivers.container import KERNEL_ROOT_MARKER

    driver = ContainerDriver([Host("pm1", "198.18.0.11", 0.6, 4)], kernel_root=tmp_path)
    assert not driver.has_kernel_root()
    (tmp_path / KERNEL_ROOT_MARKER).parent.mkdir(parents=True)
    (tmp_path / KERNEL_ROOT_MARKER).write_text("x86_64_defconfig kernel/**.o from .c\n")
    assert driver.has_kernel_root()


def test_exp3_runs_in_containers_only_with_memory_or_swap_for_its_make_jobs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(REPO / "experiments" / "exp3.yml")
    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 899)  # 9 containers need 100 MB each
    executor.supported(spec, ["qemu"])  # a QEMU kernel guest swaps to its disk
    with pytest.raises(InputError, match=r"exp3: memory_mb: .* -j4 .* needs memory_mb >= 300 in a container, "
                                         r"or 900 MB of swap .* has 899 MB"):
        executor.supported(spec, ["container"])
    executor.supported(spec.model_copy(update={"memory_mb": 300}), ["container"])
    executor.supported(spec.model_copy(update={"vcpus": 1}), ["container"])  # -j2 in 200 MB
    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 900)
    executor.supported(spec, ["container"])

