"""The drivers' shared cgroup operations (testbed.drivers.cgroups), on plain directories and on
real cgroup v1 hierarchies of this machine (outside the lab's tree: other tests use that)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.drivers import cgroups

CGROUP_ROOT = Path("/sys/fs/cgroup")


def test_launcher_joins_every_cgroup_before_it_execs(tmp_path: Path) -> None:
    procs = [tmp_path / "cpu.procs", tmp_path / "cpuacct.procs"]
    for path in procs:
        path.write_text("")
    done = subprocess.run([*cgroups.join_then_exec(procs), "sh", "-c", "echo $$"],
                          capture_output=True, text=True, check=True)
    pid = done.stdout.strip()
    assert [p.read_text().strip() for p in procs] == [pid, pid]


def test_removing_a_missing_cgroup_is_a_no_op(tmp_path: Path) -> None:
    cgroups.remove(tmp_path / "gone")  # the old helper retried 5 s, then raised
    assert tmp_path.is_dir()


def test_a_tree_is_removed_deepest_first(tmp_path: Path) -> None:
    (tmp_path / "vm" / "vcpu0" / "inner").mkdir(parents=True)
    (tmp_path / "vm" / "vcpu1").mkdir()
    cgroups.remove(tmp_path / "vm")
    assert not (tmp_path / "vm").exists()


def test_create_never_makes_a_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cgroups.create(tmp_path / "no-pm" / "vm")
    assert cgroups.create(tmp_path / "vm") == tmp_path / "vm"
    assert cgroups.create(tmp_path / "vm").is_dir()  # a second time is fine


@pytest.fixture
def parents() -> Iterator[dict[str, Path]]:
    """A parent cgroup of this test's own under cpu and cpuacct (removed afterwards)."""
    if os.geteuid() != 0 or not (CGROUP_ROOT / "cpu" / "cgroup.procs").exists():
        pytest.skip("needs root and writable cgroup v1 cpu and cpuacct hierarchies")
    made = {c: cgroups.create(CGROUP_ROOT / c / f"tbtest-cgroups-{os.getpid()}") for c in ("cpu", "cpuacct")}
    yield made
    for group in made.values():
        cgroups.remove(group)


@pytest.mark.lab  # creates cgroups under the machine's cpu and cpuacct hierarchies
def test_quota_usage_and_removal_once_the_tasks_are_gone(parents: dict[str, Path]) -> None:
    vm = {c: cgroups.create(parent / "vm") for c, parent in parents.items()}
    cgroups.set_quota(vm["cpu"], 0.25)
    assert (vm["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "25000"
    assert (vm["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    cgroups.set_quota(vm["cpu"], 0.0001)
    assert (vm["cpu"] / "cpu.cfs_quota_us").read_text().strip() == str(cgroups.MIN_QUOTA_US)
    cgroups.set_quota(vm["cpu"], 1.0)

    busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo busy-done; exec sleep 30"
    proc = subprocess.Popen([*cgroups.join_then_exec([g / "cgroup.procs" for g in vm.values()]),
                             "sh", "-c", busy], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "busy-done"
        used = cgroups.usage_ns(vm["cpuacct"])
        assert used > 0
        assert cgroups.usage_ns(parents["cpuacct"]) >= used  # a PM's count includes its VMs'
        assert cgroups.usage_ns(parents["cpuacct"] / "gone") == 0

        with pytest.raises(OSError) as busy_error:  # a task is still in it
            cgroups.remove(parents["cpuacct"], timeout_s=0.1)
        assert busy_error.value.errno == errno.EBUSY
        assert vm["cpuacct"].is_dir()

        def end() -> None:
            proc.kill()
            proc.wait()

        threading.Timer(0.2, end).start()
        for group in parents.values():
            cgroups.remove(group)  # waits out EBUSY until the task has exited and was reaped
        assert not any(group.exists() for group in parents.values())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
