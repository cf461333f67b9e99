"""Provisioning artifacts: `testbed lab up`'s ansible-runner output is kept per inventory, pruned,
and archived into a campaign's results with the play recap and the lab's token scrubbed; the
caller's signal handlers survive."""

from __future__ import annotations

import shutil
import signal
import tarfile
from pathlib import Path

import pytest

from testbed import provisioning
from testbed.playbooks import run_playbook

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


@pytest.mark.lab  # keeps its artifacts under /var/lib/testbed, as `testbed lab up` does
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


def test_the_archive_never_holds_the_token_even_when_a_task_leaked_it(tmp_path: Path) -> None:
    """A run whose events and stdout show the token (as a `slurp` without no_log registers it,
    base64, and as a task printing it): the archive has every occurrence replaced, the recap
    is still read, and the artifacts on disk are left as they are."""
    import base64
    import json

    token_file = tmp_path / "manager.token"
    token = "k7Qm2-x_Vd9Lr0aZp4Ws8NcEy1Uo3Tb6Hj5Gf0Ki2Ml"
    token_file.write_text(token + "\n")
    run_dir = provisioning.artifacts_dir(tmp_path / "inventory", tmp_path / "root") / "site-20261204T000000Z"
    (run_dir / "job_events").mkdir(parents=True)
    slurped = {"event": "runner_on_ok", "event_data": {"res": {
        "content": base64.b64encode((token + "\n").encode()).decode(), "encoding": "base64"}}}
    stats = {"event": "playbook_on_stats", "event_data": {"ok": {"pm1": 3}, "changed": {"pm1": 1}}}
    (run_dir / "job_events" / "1-a.json").write_text(json.dumps(slurped))
    (run_dir / "job_events" / "2-b.json").write_text(json.dumps(stats))
    (run_dir / "stdout").write_text(f"ok: [pm1] => {{\"msg\": \"{token}\"}}\n")
    (run_dir / "status").write_text("successful")

    got = provisioning.archive_latest(tmp_path / "inventory", tmp_path / "out", root=tmp_path / "root",
                                      token_file=token_file)
    assert got["found"] and got["token_occurrences_redacted"] == 2 and got["stats"]["changed"] == {"pm1": 1}
    with tarfile.open(tmp_path / "out" / got["archive"]) as tar:
        names = tar.getnames()
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert run_dir.name in names and f"{run_dir.name}/job_events/1-a.json" in names
    forms = [token.encode(), base64.b64encode((token + "\n").encode()), base64.b64encode(token.encode())]
    assert not [name for name, data in contents.items() if any(form in data for form in forms)]
    assert provisioning.REDACTED in contents[f"{run_dir.name}/stdout"]
    assert json.loads(contents[f"{run_dir.name}/job_events/2-b.json"]) == stats
    assert token in (run_dir / "stdout").read_text()  # the root-only artifacts are not rewritten


ROLES = Path(__file__).resolve().parent.parent / "roles"


def _tasks(node: object):
    """Every task (a mapping with a name) in a tasks file, blocks included."""
    if isinstance(node, list):
        for item in node:
            yield from _tasks(item)
    elif isinstance(node, dict):
        if "name" in node:
            yield node
        for key in ("block", "rescue", "always"):
            yield from _tasks(node.get(key))


def test_every_task_that_reads_or_writes_the_token_has_no_log() -> None:
    """A task whose arguments name the token (a slurp of the token file, content built from it)
    would have ansible-runner keep its result, token included, in the artifacts campaigns archive."""
    import yaml

    leaky = []
    for path in sorted(ROLES.glob("*/tasks/*.yml")):
        for task in _tasks(yaml.safe_load(path.read_text())):
            args = {k: v for k, v in task.items() if k not in ("name", "register", "changed_when", "when", "notify")}
            mentions = "token" in yaml.safe_dump(args) and any(
                key.endswith(("slurp", "copy", "template")) for key in args)
            if mentions and task.get("no_log") is not True:
                leaky.append(f"{path.relative_to(ROLES)}: {task['name']}")
    assert not leaky
    assert any("token" in p.read_text() for p in ROLES.glob("*/tasks/*.yml"))  # the check looks at something


def test_every_playbook_the_repository_names_exists() -> None:
    """Docs, inventories and roles tell users which playbook to run: each one they name is a file
    (the 2010 inventory once told them to run a bootstrap-python.yml that was bootstrap_python.yml)."""
    import re
    import subprocess

    repo = ROLES.parent
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split()
    named = {(path, name) for path in files if path.endswith((".md", ".yml", ".py", ".cfg", ".sh", ".j2"))
             for name in re.findall(r"playbooks/([\w.-]+\.yml)", (repo / path).read_text(encoding="utf-8"))}
    missing = sorted(f"{path}: playbooks/{name}" for path, name in named if not (repo / "playbooks" / name).is_file())
    assert missing == []
    assert any(name == "site.yml" for _, name in named)  # the search finds the names there are
