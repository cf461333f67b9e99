"""The host end of a full-system guest's serial console, speaking the guest-init protocol
(roles/qemu/files/guest-init): "run ID ARGV..." starts a program, the guest answers "@ID start",
"@ID out LINE" and "@ID end STATUS"; "ping" is answered "@pong"; "@ready" says it booted.

One class serves both QEMU drivers: the embedded one reaches a QEMU's console as a Unix socket
on this machine (testbed.drivers.qemu), the libvirt one as a TCP server on the PM that runs the
domain (testbed.drivers.libvirt). They differ only in which consoles a VM has now and how one is
opened (`_follow`, `_open`, `_home`); the reading, the timestamps (host time of a line's arrival)
and the workload bookkeeping are this module's.
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Hashable

from testbed.drivers.base import WorkloadRun

ATTACH_TIMEOUT_S = 10.0  # a console socket appears within ~1 s of QEMU starting
START_TIMEOUT_S = 120.0  # a workload's "@ID start" on a busy guest
_WORD = re.compile(r"^[A-Za-z0-9._/=:,+-]+$")


class ConsoleError(RuntimeError):
    """A console that cannot be reached or a guest that does not answer."""


class GuestConsole:
    """Timestamps the guest's `@` lines on arrival, from every console the VM has now.

    During a migration it may hold connections to both QEMU processes' consoles, so no line is
    lost whichever side the guest runs on when it writes; commands go to the one where the VM
    lives (`_home`). One process at a time holds a VM's console (QEMU serves one client).

    Only the console's own thread connects, reads and closes sockets; other threads ask and
    wait. Two threads connecting the same console once left a second connection queued
    unaccepted in QEMU's backlog with commands sent into it (seen in CI after a migration).
    """

    error: type[Exception] = ConsoleError  # what a driver's callers expect to catch

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.runs: dict[str, WorkloadRun] = {}
        self.ready_lines = 0  # "@ready" seen: more than one means the guest rebooted
        self.pongs = 0
        self._cond = threading.Condition()
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[Hashable, socket.socket] = {}
        self._buffers: dict[socket.socket, bytes] = {}
        self._errors: dict[Hashable, str] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"console-{vm}", daemon=True)
        self._thread.start()  # subclasses set what their _follow reads before this __init__

    # --- what a kind of console says ------------------------------------------------------------

    def _home(self) -> Hashable:
        """The console of the QEMU process where the VM lives now."""
        raise NotImplementedError

    def _follow(self) -> None:
        """Connect (`_connect`) to the VM's consoles not yet connected, let go of stale ones."""
        raise NotImplementedError

    def _open(self, key: Hashable) -> socket.socket:
        """A socket connected to console `key` (OSError when it is not there)."""
        raise NotImplementedError

    # --- used by the drivers ------------------------------------------------------------------

    def attach(self, key: Hashable, timeout_s: float = ATTACH_TIMEOUT_S) -> None:
        """Wait until the console thread has connected to console `key`."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._sockets, timeout=timeout_s):
                raise self.error(
                    f"VM {self.vm}: cannot connect to its console {key}: {self._errors.get(key, 'no socket')}"
                )

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        for sock in list(self._buffers):
            self._close(sock)

    def send(self, line: str) -> None:
        """Send a command to the QEMU process where the VM lives, waiting for the console
        thread to reach it if the VM just moved."""
        home = self._home()
        with self._cond:
            if not self._cond.wait_for(lambda: home in self._sockets, timeout=ATTACH_TIMEOUT_S):
                raise self.error(f"VM {self.vm}: console not connected ({home})")
            sock = self._sockets[home]
            sock.setblocking(True)
            try:
                sock.sendall(line.encode() + b"\n")
            finally:
                sock.setblocking(False)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout=timeout_s)

    def wait_ready(self, timeout_s: float, listen_s: float) -> None:
        """Wait until the guest's init serves the console: listen for its `@ready` for up to
        listen_s first, and only then ask with `ping` (in case the line was missed). Pings sent
        while the guest boots pile up in its UART before ttyS0 is opened and arrive as garbled
        commands, after which some guests stopped answering (seen with 7 guests booting on one
        PM)."""
        deadline = time.monotonic() + timeout_s

        def answered() -> bool:
            return bool(self.ready_lines or self.pongs)

        if self.wait(answered, timeout_s=max(0.0, listen_s)):
            return
        while time.monotonic() < deadline:
            self.send("ping")
            if self.wait(answered, timeout_s=2.0):
                return
        raise self.error(f"VM {self.vm}: guest not ready after {timeout_s:.0f} s")

    def start(self, argv: list[str]) -> WorkloadRun:
        """Start argv in the guest and wait for its "@ID start". The guest splits the command
        at blanks, so only plain words pass (no shell text, no quoting to get wrong)."""
        bad = [word for word in argv if not _WORD.match(word)]
        if not argv or bad:
            raise self.error(f"VM {self.vm}: workload argv must be plain words, not {bad or argv}")
        run = WorkloadRun(self.vm, uuid.uuid4().hex[:8], tuple(argv))
        with self._cond:
            self.runs[run.id] = run
        self.send(" ".join(["run", run.id, *argv]))
        if not self.wait(lambda: run.start is not None, timeout_s=START_TIMEOUT_S):
            raise self.error(f"VM {self.vm}: workload {argv[0]} did not start within {START_TIMEOUT_S:.0f} s")
        return run

    def run(self, workload_id: str) -> WorkloadRun:
        try:
            return self.runs[workload_id]
        except KeyError:
            raise self.error(f"VM {self.vm}: no workload {workload_id}") from None

    def wait_run(self, workload_id: str, timeout_s: float) -> WorkloadRun:
        run = self.run(workload_id)
        self.wait(lambda: run.finished, timeout_s=timeout_s)
        return run

    # --- the console thread -------------------------------------------------------------------

    def _connect(self, key: Hashable) -> None:
        try:
            sock = self._open(key)
        except OSError as err:  # a QEMU that is gone or not listening yet
            self._errors[key] = str(err)
            return
        sock.setblocking(False)
        with self._cond:
            self._sockets[key] = sock
            self._buffers[sock] = b""
            self._selector.register(sock, selectors.EVENT_READ, key)
            self._cond.notify_all()

    def _close(self, sock: socket.socket) -> None:
        with self._cond:
            for key, held in list(self._sockets.items()):
                if held is sock:
                    del self._sockets[key]
            if self._buffers.pop(sock, None) is not None:
                self._selector.unregister(sock)
            sock.close()

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._step()
            except Exception as err:  # noqa: BLE001 - the console must outlive any one bad read
                self._errors[self.vm] = f"{type(err).__name__}: {err}"
                time.sleep(0.05)

    def _step(self) -> None:
        self._follow()
        if not self._sockets:
            time.sleep(0.05)
            return
        ready = self._selector.select(timeout=0.05)
        now = time.time()
        for key, _ in ready:
            self._read(key.fileobj, now)  # type: ignore[arg-type]

    def _read(self, sock: socket.socket, now: float) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # that QEMU process ended
            self._close(sock)
            return
        with self._cond:
            *lines, rest = (self._buffers.get(sock, b"") + data).split(b"\n")
            self._buffers[sock] = rest
            for raw in lines:
                self._handle(raw.decode(errors="replace").strip("\r"), now)
            self._cond.notify_all()

    def _handle(self, line: str, now: float) -> None:
        if line == "@ready":
            self.ready_lines += 1
        elif line == "@pong":
            self.pongs += 1
        elif line.startswith("@") and " " in line:
            workload_id, _, rest = line[1:].partition(" ")
            run = self.runs.get(workload_id)
            if run is None:
                return
            kind, _, text = rest.partition(" ")
            if kind == "start":
                run.start = now
            elif kind == "out":
                run.output.append((now, text))
            elif kind == "end":
                run.end = now
                run.exit_status = int(text) if text.lstrip("-").isdigit() else None


class ConsoleWorkloads:
    """The Driver protocol's workload methods for a driver whose guests run them through
    guest-init on their console (`_console(vm)`: the VM's, connected where it runs)."""

    def _console(self, vm: str) -> GuestConsole:
        raise NotImplementedError

    def start_workload(self, vm: str, argv: list[str]) -> WorkloadRun:
        return self._console(vm).start(argv)

    def workload(self, vm: str, workload_id: str) -> WorkloadRun:
        return self._console(vm).run(workload_id)

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        return self._console(vm).wait_run(workload_id, timeout_s)
