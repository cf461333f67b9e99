"""Provisioning artifacts: `testbed lab up`'s ansible-runner output is kept per inventory, pruned,
and archived into a campaign's results with the play recap; the caller's signal handlers survive."""

from __future__ import annotations

import shutil
import signal
import tarfile
from pathlib import Path

import pytest

from testbed import provisioning
from testbed.commands.lab import run_playbook

PLAYBOOK = """\
- name: Touch a file
  hosts: local
  gather_facts: false
  tasks:
    - name: Write the marker
      ansible.builtin.copy:
        content: "{{ inventory_hostname }}\\n"
        dest: "{{ marker }}"
        mode: "0644"
"""


@pytest.fixture
def local_inventory(tmp_path: Path):
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    (inventory / "hosts.yml").write_text(
        "all:\n  children:\n    local:\n      hosts:\n        here:\n"
        "          ansible_connection: local\n"
        "          ansible_python_interpreter: '{{ ansible_playbook_python }}'\n"
        f"          marker: {tmp_path / 'marker'}\n")
    yield inventory
    shutil.rmtree(provisioning.artifacts_dir(inventory), ignore_errors=True)


def test_a_run_is_kept_archived_with_its_recap_and_pruned(local_inventory: Path, tmp_path: Path) -> None:
    playbook = tmp_path / "site.yml"
    playbook.write_text(PLAYBOOK)
    assert provisioning.archive_latest(local_inventory, tmp_path / "out")["found"] is False

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    assert run_playbook(playbook, local_inventory).rc == 0
    # ansible-runner installs its own, for good: Ctrl-C must still reach the caller afterwards
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    got = provisioning.archive_latest(local_inventory, tmp_path / "out")
    assert got["found"] and got["status"] == "successful" and got["rc"] == "0"
    assert got["stats"]["changed"] == {"here": 1}
    with tarfile.open(tmp_path / "out" / got["archive"]) as tar:
        names = tar.getnames()
    assert f"{got['ident']}/stdout" in names and any("/job_events/" in n for n in names)

    for _ in range(provisioning.KEEP):  # the idents are per second: make each run's distinct
        # oldest first, so that each new name is free (two runs within one second share one)
        for run in sorted(provisioning.artifacts_dir(local_inventory).glob("site-*")):
            run.rename(run.with_name(f"site-0{run.name.removeprefix('site-')}"))
        assert run_playbook(playbook, local_inventory).rc == 0
    kept = sorted(provisioning.artifacts_dir(local_inventory).glob("site-*"))
    assert len(kept) == provisioning.KEEP
    assert provisioning.archive_latest(local_inventory, tmp_path / "out2")["stats"]["changed"] == {}
