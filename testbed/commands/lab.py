"""`testbed lab up|down|status`: provision, tear down and inspect a lab.

`up` and `down` run the same playbooks as `ansible-playbook -i inventory/local playbooks/site.yml`
(and teardown.yml), through the playbook runner (testbed.playbooks) and its live progress display.
The inventory is validated with testbed.lab.load_lab first, so a bad one fails with one line before
anything is created. Both hold the lab's campaign lock (testbed.runner.lock) while their playbook
runs: a `lab up` in the middle of a campaign resets hosts under its runs, a `lab down` removes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed.lab import DEFAULT_INVENTORY, host_status, load_lab
from testbed.playbooks import PLAYBOOKS, run_playbook
from testbed.runner.lock import campaign_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    lab = subparsers.add_parser("lab", help="provision, tear down or inspect a lab")
    actions = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, text in (
        ("up", _up, "provision the lab (playbooks/site.yml); idempotent"),
        ("down", _down, "tear the embedded lab down (playbooks/teardown.yml)"),
        ("status", _status, "print the lab's hosts and what they really have, as JSON"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("-i", "--inventory", type=Path, default=DEFAULT_INVENTORY,
                            help="lab inventory (default: inventory/local, the embedded lab)")
        action.set_defaults(func=func)


def _up(args: argparse.Namespace) -> int:
    return _locked_playbook(args.inventory, "site.yml", "testbed lab up")


def _down(args: argparse.Namespace) -> int:
    return _locked_playbook(args.inventory, "teardown.yml", "testbed lab down")


def _locked_playbook(inventory: Path, playbook: str, what: str) -> int:
    """Run `playbook` on the lab under its campaign lock; refused (InputError, exit 2) before any
    host is touched while a campaign, a test session or another `lab up|down` holds it."""
    lab = load_lab(inventory)
    with campaign_lock(lab.inventory, what, embedded=lab.embedded):
        return 0 if run_playbook(PLAYBOOKS / playbook, inventory).rc == 0 else 1


def _status(args: argparse.Namespace) -> int:
    """Exit status 0 when every host answers SSH, 1 otherwise (so scripts can wait on it)."""
    lab = load_lab(args.inventory)
    hosts = [host_status(h) for h in lab.hosts]
    report = {"inventory": str(lab.inventory), "embedded": lab.embedded, "network": lab.network,
              "gateway": lab.gateway, "hosts": hosts}
    print(json.dumps(report, indent=2))
    return 0 if all(h["reachable"] for h in hosts) else 1
