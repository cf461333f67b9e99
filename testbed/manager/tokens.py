"""Where a client of the VM manager (`testbed run`, `testbed manager status|drain|...`) gets the
token of the lab it talks to: never another lab's.

- `--token-file FILE`: that file (mode 0600), whatever the lab.
- The embedded lab: its state directory's `manager.token` (the balancer role makes it there).
- A real lab: the token its own controller holds (`/etc/testbed/manager.token`, which the
  balancer role installs and the CC reads), read over SSH with the inventory's key and known
  hosts. Never the embedded lab's file: it would hand this machine's lab token to other hosts,
  and it is not the token the real CC checks anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.errors import InputError
from testbed.manager.api import load_token

if TYPE_CHECKING:
    from testbed.lab import Lab

#: The token on a real lab's hosts (roles/balancer: balancer_config_dir/manager.token).
CONTROLLER_TOKEN_FILE = "/etc/testbed/manager.token"

#: Runs argv on the lab's controller as root and returns its stdout.
RunOnController = Callable[[list[str]], str]


def lab_token(lab: Lab, token_file: Path | None = None, run: RunOnController | None = None) -> str:
    """The token of `lab`'s VM manager (see the module's docstring)."""
    if token_file is not None:
        return load_token(token_file)
    if lab.embedded:
        return load_token(lab.state_dir / "manager.token")
    return controller_token(lab, run)


def controller_token(lab: Lab, run: RunOnController | None = None) -> str:
    """The token a real lab's controller holds, read there over SSH (`run`: how, by default
    with the inventory's key and known hosts)."""
    controller = lab.controller
    if run is None:
        run = _ssh_runner(lab)
    try:
        token = run(["cat", CONTROLLER_TOKEN_FILE]).strip()
    except InputError:
        raise  # e.g. the inventory's known_hosts file is missing: its own line says so
    except Exception as err:  # noqa: BLE001 - SSH or the command failed: one line, not a traceback
        raise InputError(f"{controller.name}: cannot read the VM manager's token {CONTROLLER_TOKEN_FILE} over SSH "
                         f"({type(err).__name__}: {err}); is the lab provisioned (playbooks/balancer.yml)? "
                         "Or name the token with --token-file") from None
    if not token:
        raise InputError(f"{controller.name}: {CONTROLLER_TOKEN_FILE} is empty")
    return token


def _ssh_runner(lab: Lab) -> RunOnController:
    from testbed.drivers.ssh import Remote, SshTarget

    remote = Remote(SshTarget(lab.controller.address, lab.ssh_key, lab.known_hosts))

    def run(argv: list[str]) -> str:
        try:
            return remote.run(argv, timeout_s=30)
        finally:
            remote.close()

    return run
