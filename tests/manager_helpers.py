"""Helpers of the tests that talk to the VM manager's daemons on the embedded lab."""

from __future__ import annotations

import time

import httpx

from testbed.manager.api import ManagerClient


def wait_answering(clients: dict[str, ManagerClient], path: str, timeout_s: float) -> None:
    """Until every daemon answers `path` (a daemon just (re)started reads the inventory first)."""
    deadline = time.monotonic() + timeout_s
    waiting = dict(clients)
    while waiting:
        for host, client in list(waiting.items()):
            try:
                client.get(path)
                del waiting[host]
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, (
            f"no manager daemon answers {path} on {sorted(waiting)}: the balancer role must run "
            "`testbed manager lc` on every PM and `testbed manager cc` on the controller (docs/manager.md)")
        time.sleep(0.5)
