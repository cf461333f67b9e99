"""Running an Ansible playbook on a lab, as `testbed lab up|down`, the bench and the tests do.

ansible-runner drives the playbook (the same one `ansible-playbook -i INVENTORY playbooks/site.yml`
runs) so that a live progress display can be built from Ansible's event stream; its artifacts are
kept per inventory (testbed.provisioning), where a campaign's provenance archives the newest.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from testbed import ansible, provisioning

REPO = Path(__file__).resolve().parents[1]
PLAYBOOKS = REPO / "playbooks"
OUTCOMES = ("ok", "changed", "failed", "skipped", "unreachable")


@dataclass
class Progress:
    """Ansible's event stream folded into what a person wants to see while a playbook runs."""

    play: str = ""
    task: str = ""
    tasks_done: int = 0
    hosts: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def handle(self, event: dict) -> bool:
        """ansible-runner's event_handler; returns True so that the events are also stored (the
        provisioning's artifacts, which campaigns archive: testbed.provisioning)."""
        data = event.get("event_data", {})
        kind = event.get("event", "")
        if kind == "playbook_on_play_start":
            self.play = data.get("play", "")
        elif kind == "playbook_on_task_start":
            self.task = data.get("task", "")
            self.tasks_done += 1
        elif kind.startswith("runner_on_") and kind.removeprefix("runner_on_") in OUTCOMES:
            self._count(kind.removeprefix("runner_on_"), data)
        return True

    def _count(self, outcome: str, data: dict) -> None:
        host = data.get("host", "?")
        result = data.get("res", {})
        if outcome == "ok" and result.get("changed"):
            outcome = "changed"
        if outcome == "failed" and data.get("ignore_errors"):
            outcome = "ok"
        self.hosts.setdefault(host, Counter())[outcome] += 1
        if outcome in ("failed", "unreachable"):
            message = str(result.get("msg") or result.get("stderr") or "failed").strip()
            errors = [line.strip() for line in str(result.get("stderr") or "").splitlines() if line.strip()]
            said = next((line for line in errors if "error" in line.lower()), errors[-1] if errors else "")
            if said and said not in message:  # a command's own words say more than "non-zero return code"
                message += f" ({said})"
            self.failures.append(f"{host}: {data.get('task', self.task)}: {message}")

    def render(self) -> Group:
        table = Table(title=None, box=None, pad_edge=False)
        table.add_column("host")
        for outcome in OUTCOMES:
            table.add_column(outcome, justify="right")
        for host, counts in sorted(self.hosts.items()):
            table.add_row(host, *(str(counts[o]) for o in OUTCOMES),
                          style="red" if counts["failed"] or counts["unreachable"] else None)
        header = Text.assemble(("play ", "dim"), self.play, ("  task ", "dim"),
                               f"{self.task} (#{self.tasks_done})")
        return Group(header, table)


@dataclass(frozen=True)
class PlaybookResult:
    """How a playbook run ended: ansible-playbook's exit status and per-host task outcomes."""

    rc: int
    hosts: dict[str, Counter[str]]
    failures: list[str]
    seconds: float


def run_playbook(playbook: Path, inventory: Path, console: Console | None = None) -> PlaybookResult:
    """Run a playbook with ansible-runner, showing its progress live (or, off a terminal, its plays
    as they start and the final counts)."""
    console = console or Console(stderr=True)
    progress = Progress()
    live = Live(progress.render(), console=console, refresh_per_second=4) if console.is_terminal else None

    def handle(event: dict) -> bool:
        play = progress.play
        keep = progress.handle(event)
        if live:
            live.update(progress.render())
        elif progress.play != play:
            console.print(f"play: {progress.play}")
        return keep

    started = time.monotonic()
    artifacts = provisioning.artifacts_dir(inventory)
    ident = provisioning.new_ident(playbook)
    with tempfile.TemporaryDirectory(prefix="testbed-runner-") as tmp, live or nullcontext():
        result = ansible.run(
            private_data_dir=tmp,
            artifact_dir=str(artifacts),  # kept: a campaign's provenance archives the newest
            ident=ident,
            project_dir=str(REPO),
            playbook=str(playbook),
            inventory=str(Path(inventory).resolve()),
            event_handler=handle,
            quiet=True,
        )
    provisioning.prune(inventory, playbook)
    if not live:
        console.print(progress.render())
    for failure in progress.failures:
        console.print(f"[red]failed[/red] {failure}")
    seconds = time.monotonic() - started
    verdict = "done" if result.rc == 0 else f"failed (ansible-playbook exit {result.rc}; its whole output: {artifacts / ident / 'stdout'})"
    console.print(f"{playbook.name}: {verdict} in {seconds:.1f} s")
    return PlaybookResult(result.rc, progress.hosts, progress.failures, seconds)
