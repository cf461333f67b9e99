"""One campaign at a time on a lab.

Two campaigns on one lab spoil each other without a sound: each one's reset destroys the other's
VMs, and each turns the Central Controller's migrations on for its own runs, so the CC moves the
other's VMs as well (seen here: a container campaign's run had the CC migrate a QEMU campaign's VMs
while it booted them). A `testbed run` holds an exclusive lock on the lab for its whole campaign; a
second one is refused at once, naming the first, before it touches any host.

A real lab's lock is named for its inventory. The embedded lab's is one per machine: every
checkout's inventory/local describes the same namespaces, bridge and addresses, so two checkouts
are one lab (seen here: a worktree's test session brought "its" embedded lab up and tore it down in
the middle of a campaign run from the main checkout, each holding the lock of its own inventory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from testbed.errors import InputError

#: Where the lock lives: beside this machine's other testbed state, one per real lab's inventory.
LOCK_DIR = Path("/var/lib/testbed/locks")
EMBEDDED_LOCK = "embedded.lock"  # the embedded lab's, whichever checkout's inventory names it
HELD_ENV = "TESTBED_LAB_LOCK"  # the lock this process (or its parent) holds


def lock_path(inventory: Path, lock_dir: Path | None = None, *, embedded: bool = False) -> Path:
    """The lab's lock file: the machine's one for the embedded lab, else named for the inventory
    (in `lock_dir`, LOCK_DIR when None: read at the call, so a test can move it)."""
    from testbed.provisioning import artifacts_dir

    lock_dir = LOCK_DIR if lock_dir is None else lock_dir
    return lock_dir / (EMBEDDED_LOCK if embedded else f"{artifacts_dir(inventory, lock_dir).name}.lock")


@contextlib.contextmanager
def campaign_lock(
    inventory: Path, what: str, lock_dir: Path | None = None, *, embedded: bool = False
) -> Iterator[None]:
    """Hold the lab's campaign lock (flock: released by the kernel if the holder dies). A process
    started by the holder (a test session's `testbed run`) finds it in HELD_ENV and runs under it."""
    path = lock_path(inventory, lock_dir, embedded=embedded)
    if os.environ.get(HELD_ENV) == str(path):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise InputError(
                f"the lab of {inventory} is busy with another campaign ({holder}); wait for it to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "what": what,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
        handle.flush()
        outer = os.environ.get(HELD_ENV)  # another lab's lock this process holds, if any
        os.environ[HELD_ENV] = str(path)
        try:
            yield
        finally:
            if outer is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = outer
            handle.truncate(0)
