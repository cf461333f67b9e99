"""The lab's campaign lock: a second campaign is refused naming the first; a dead holder frees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.errors import InputError
from testbed.runner.lock import HELD_ENV, campaign_lock, lock_path

HOLD = """
import sys, time
from pathlib import Path
from testbed.runner.lock import HELD_ENV, campaign_lock, lock_path
with campaign_lock(Path(sys.argv[1]), "exp1 -> results/x", Path(sys.argv[2]), embedded=sys.argv[3:] == ["embedded"]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_campaign_is_refused_until_the_first_holder_dies(tmp_path: Path) -> None:
    inventory, locks = tmp_path / "inventory", tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(inventory), str(locks)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=r"busy with another campaign .*exp1 -> results/x"), \
                campaign_lock(inventory, "exp2", locks):
            pass
    finally:
        holder.kill()
        holder.wait()
    with campaign_lock(inventory, "exp2", locks):  # the kernel released the dead holder's lock
        assert "exp2" in lock_path(inventory, locks).read_text()


def test_a_process_started_by_the_holder_runs_under_its_lock(tmp_path: Path) -> None:
    inventory, locks = tmp_path / "inventory", tmp_path / "locks"
    with campaign_lock(inventory, "pytest", locks):
        child = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(inventory),
                                str(locks)], capture_output=True, text=True, timeout=60, check=False)
        assert child.returncode == 0 and child.stdout.strip() == "held", child.stderr


def test_holding_another_labs_lock_inside_gives_the_outer_one_back(tmp_path: Path) -> None:
    """A test session holds the embedded lab's lock; a test taking another lab's must not drop it."""
    outer, inner, locks = tmp_path / "outer", tmp_path / "inner", tmp_path / "locks"
    with campaign_lock(outer, "pytest", locks):
        with campaign_lock(inner, "exp1", locks):
            assert os.environ[HELD_ENV] == str(lock_path(inner, locks))
        assert os.environ[HELD_ENV] == str(lock_path(outer, locks))
    assert HELD_ENV not in os.environ or os.environ[HELD_ENV] != str(lock_path(outer, locks))


def test_two_checkouts_embedded_inventories_share_the_machines_one_lock(tmp_path: Path) -> None:
    """Every checkout's inventory/local is the same embedded lab: a campaign from one refuses a
    session from another; a real lab's inventory has its own lock."""
    main, worktree, locks = tmp_path / "main" / "local", tmp_path / "wt" / "local", tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(main), str(locks), "embedded"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=r"busy with another campaign .*exp1 -> results/x"), \
                campaign_lock(worktree, "pytest", locks, embedded=True):
            pass
        with campaign_lock(worktree, "a real lab", locks):
            assert lock_path(worktree, locks) != lock_path(main, locks, embedded=True)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("action", ["up", "down"])
def test_lab_up_and_down_are_refused_while_a_campaign_holds_the_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    """`testbed lab up|down` in the middle of a campaign would reset or remove its hosts: refused,
    naming the holder, before any playbook runs; with the lab free, the playbook runs under the lock."""
    from testbed.cli import main
    from testbed.commands import lab as lab_command
    from testbed.lab import DEFAULT_INVENTORY
    from testbed.runner import lock

    locks = tmp_path / "locks"
    monkeypatch.setattr(lock, "LOCK_DIR", locks)
    monkeypatch.delenv(HELD_ENV, raising=False)  # a test session's own lock is not the campaign's
    held_during: list[str] = []

    def playbook(path: Path, inventory: Path) -> object:
        held_during.append(lock_path(inventory, embedded=True).read_text())
        return SimpleNamespace(rc=0)

    monkeypatch.setattr(lab_command, "run_playbook", playbook)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(DEFAULT_INVENTORY), str(locks), "embedded"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["lab", action]) == 2
        assert "busy with another campaign" in capsys.readouterr().err and held_during == []
    finally:
        holder.kill()
        holder.wait()
    assert main(["lab", action]) == 0
    assert len(held_during) == 1 and f"testbed lab {action}" in held_during[0]
