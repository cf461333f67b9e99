"""ansible-runner as this project calls it: with the checkout's ansible.cfg and venv, and with the
caller's signal handlers given back afterwards.

ansible-runner, run from the main thread, installs SIGINT and SIGTERM handlers of its own (to
cancel the playbook) and never restores the previous ones: after gathering the hosts' facts,
`testbed run` ignored Ctrl-C and `kill`. The handlers are still ansible-runner's while it runs, so a
Ctrl-C during a playbook still cancels it cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def envvars() -> dict[str, str]:
    """The project's ansible.cfg, and the venv's ansible-playbook even when the venv is not active."""
    return {"ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


@contextlib.contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Restore SIGINT/SIGTERM handlers on exit (only the main thread can set them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def run(**kwargs: Any):
    """ansible_runner.run with envvars() added and the caller's signal handlers kept."""
    import ansible_runner

    kwargs["envvars"] = envvars() | kwargs.get("envvars", {})
    with signal_handlers_kept():
        return ansible_runner.run(**kwargs)
