"""Shared fixtures: the embedded lab, provisioned once per test session.

`embedded_lab` runs playbooks/site.yml (as `testbed lab up` does) the first time a test asks for
it and tears the lab down (playbooks/teardown.yml) at the end of the session; it returns the
`testbed.lab.Lab` read from inventory/local. `run_playbook("ntp.yml")` runs one more playbook
against it and fails the test when the playbook fails. TESTBED_KEEP_LAB=1 leaves the lab up at the
end (when others test on it at the same time). Tests marked `lab_teardown` run after all
others, since they take the lab down.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest

from testbed.drivers.qemu import IMAGE_DIR
from testbed.drivers.qemu_snapshot import snapshot_dir
from testbed.errors import InputError
from testbed.lab import DEFAULT_INVENTORY, Lab, load_lab
from testbed.playbooks import PLAYBOOKS
from testbed.playbooks import run_playbook as _run
from testbed.runner.lock import campaign_lock

LOCK_WAIT_S = 3600.0  # a campaign on the lab (the main job) may hold it this long before tests give up


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab_teardown: takes the embedded lab down; runs after all other tests")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("lab_teardown") is not None)


def _playbook(name: str):
    """Run playbooks/<name> on the embedded lab; fail with Ansible's own failure lines."""
    result = _run(PLAYBOOKS / name, DEFAULT_INVENTORY)
    assert result.rc == 0, f"{name} failed (exit {result.rc}); see the captured output"
    return result


@pytest.fixture(scope="session")
def embedded_lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("the embedded lab needs root (namespaces, cgroups, sshd)")
    lab = load_lab(DEFAULT_INVENTORY)
    with _campaign_lock(lab):
        # Start cold: boot snapshots an earlier run left once hid a main job that failed every run
        # on a fresh machine (issue #13). The image and the kernel root are rebuilt by their roles
        # whenever their inputs change, so they are left.
        shutil.rmtree(snapshot_dir(IMAGE_DIR), ignore_errors=True)
        started = time.monotonic()
        _playbook("site.yml")
        print(f"embedded lab provisioned in {time.monotonic() - started:.1f} s")
        yield lab
        if os.environ.get("TESTBED_KEEP_LAB") == "1":  # several people testing on one lab at once
            print("TESTBED_KEEP_LAB=1: the embedded lab is left up")
            return
        _playbook("teardown.yml")


@contextmanager
def _campaign_lock(lab: Lab) -> Iterator[None]:
    """Hold the lab as a campaign does (testbed.runner.lock) for the whole session: tests would
    spoil a campaign running on it (and it them); wait for one to end, up to LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    with ExitStack() as held:
        while True:
            try:
                held.enter_context(campaign_lock(lab.inventory, f"pytest (pid {os.getpid()})", embedded=lab.embedded))
                break
            except InputError as busy:
                if time.monotonic() > deadline:
                    raise
                print(f"waiting: {busy}", flush=True)
                time.sleep(30)
        yield


@pytest.fixture(scope="session")
def run_playbook(embedded_lab: Lab) -> Callable[[str], object]:
    return _playbook
