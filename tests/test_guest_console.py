"""The guest-init protocol's host end (testbed.drivers.guest_console) against fake guests on
loopback: the embedded QEMU driver's Unix-socket console and the libvirt driver's TCP console,
which follows a domain from its source PM's console to its destination's during a migration."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.drivers.guest_console import ConsoleError
from testbed.drivers.libvirt import TcpConsole
from testbed.drivers.qemu import QemuError, _Console

Guest = Callable[[socket.socket, list[str]], None]


def serve(listener: socket.socket, guest: Guest, heard: list[str]) -> threading.Thread:
    """Accept one client on `listener` and let `guest` talk to it (bounded by socket timeouts)."""

    def accept() -> None:
        listener.settimeout(20)
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(20)
                guest(conn, heard)
        listener.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def lines(conn: socket.socket) -> Iterator[str]:
    buffer = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


def answering_guest(conn: socket.socket, heard: list[str]) -> None:
    """Answers ping and "runs" every job at once, like echo: start, its arguments, status 0."""
    conn.sendall(b"@ready\n")
    for line in lines(conn):
        heard.append(line)
        if line == "ping":
            conn.sendall(b"@pong\n")
        elif line.startswith("run "):
            job = line.split()[1]
            conn.sendall(f"@{job} start\n@{job} out {' '.join(line.split()[3:])}\n@{job} end 0\n".encode())


def tcp_listener(address: str) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, 0))
    listener.listen(1)
    return listener


def test_the_embedded_drivers_unix_console_runs_a_workload(tmp_path: Path) -> None:
    (tmp_path / "vm.json").write_text(json.dumps({"host": "pm1"}))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "pm1.serial"))
    listener.listen(1)
    heard: list[str] = []
    serve(listener, answering_guest, heard)
    console = _Console("vm1", tmp_path)
    try:
        console.attach(tmp_path / "pm1.serial")
        console.wait_ready(timeout_s=10, listen_s=5)
        run = console.start(["echo", "hello"])
        done = console.wait_run(run.id, timeout_s=10)
        assert done.finished and done.exit_status == 0 and [text for _, text in done.output] == ["hello"]
        assert done.start is not None and done.end is not None and done.start <= done.end
        assert heard == [f"run {run.id} echo hello"]  # @ready heard: no ping needed
        with pytest.raises(QemuError, match="plain words"):
            console.start(["sh", "-c", "reboot; echo"])
        with pytest.raises(QemuError, match="no workload"):
            console.run("nope")
    finally:
        console.close()


def test_a_tcp_console_follows_a_domain_to_its_destination_and_sees_the_end_there() -> None:
    """A job starts on the source's console; the source's QEMU goes (its connection closes) and
    the job's end is written on the destination's console, same port on another address: the
    console, told of the destination before the move, is connected there when the line comes."""
    source, destination = tcp_listener("127.0.0.1"), None
    port = source.getsockname()[1]
    destination = socket.socket()
    destination.bind(("127.0.0.2", port))
    destination.listen(1)
    moved = threading.Event()
    heard: list[str] = []

    def source_guest(conn: socket.socket, heard: list[str]) -> None:
        conn.sendall(b"@ready\n")
        for line in lines(conn):
            heard.append(line)
            job = line.split()[1]
            conn.sendall(f"@{job} start\n".encode())
            moved.wait(20)
            return  # the source QEMU ends with the migration

    def destination_guest(conn: socket.socket, heard: list[str]) -> None:
        moved.set()
        job = heard[0].split()[1]
        conn.sendall(f"@{job} out after the move\n@{job} end 0\n".encode())
        with contextlib.suppress(OSError):
            conn.recv(1)  # until the console lets go

    serve(source, source_guest, heard)
    serve(destination, destination_guest, heard)
    console = TcpConsole("vm1", ("127.0.0.1", port))
    try:
        console.attach(("127.0.0.1", port))
        console.wait_ready(timeout_s=10, listen_s=5)
        run = console.start(["sleep", "20"])
        console.also(("127.0.0.2", port))
        assert moved.wait(10), "the console never reached the destination"
        console.move(("127.0.0.2", port))
        done = console.wait_run(run.id, timeout_s=10)
        assert done.exit_status == 0 and [text for _, text in done.output] == ["after the move"]
        with pytest.raises(ConsoleError, match="no workload"):
            console.run("nope")
    finally:
        console.close()


def test_a_tcp_console_follows_a_migration_it_was_not_told_of() -> None:
    """The runner's console, when a Local Controller moves the domain: it keeps trying the same
    port on every PM, so it is connected to the destination's QEMU (listening from its start)
    before the source's goes; the job's end comes there, and later commands go there."""
    source = tcp_listener("127.0.0.1")
    port = source.getsockname()[1]
    destination = socket.socket()
    destination.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    destination.bind(("127.0.0.2", port))  # not listening yet: no incoming QEMU there
    reached, left = threading.Event(), threading.Event()
    heard: list[str] = []

    def source_guest(conn: socket.socket, heard: list[str]) -> None:
        conn.sendall(b"@ready\n")
        for line in lines(conn):
            heard.append(line)
            conn.sendall(f"@{line.split()[1]} start\n".encode())
            reached.wait(20)
            left.set()
            return  # the source QEMU ends with the migration

    def destination_guest(conn: socket.socket, heard: list[str]) -> None:
        reached.set()
        assert left.wait(20)
        job = heard[0].split()[1]
        conn.sendall(f"@{job} out after the move\n@{job} end 0\n".encode())
        answering_guest(conn, heard)

    serve(source, source_guest, heard)
    everywhere = [("127.0.0.1", port), ("127.0.0.2", port)]
    console = TcpConsole("vm1", ("127.0.0.1", port), everywhere)
    try:
        console.attach(("127.0.0.1", port))
        console.wait_ready(timeout_s=10, listen_s=5)
        run = console.start(["sleep", "20"])
        destination.listen(1)  # the LC's migration starts: the incoming QEMU listens
        serve(destination, destination_guest, heard)
        done = console.wait_run(run.id, timeout_s=15)
        assert done.exit_status == 0 and [text for _, text in done.output] == ["after the move"]
        assert console.wait(lambda: list(console._sockets) == [("127.0.0.2", port)], timeout_s=5)
        after = console.start(["echo", "there"])
        assert console.wait_run(after.id, timeout_s=10).exit_status == 0
        assert heard[-1] == f"run {after.id} echo there"  # heard by the destination's guest
    finally:
        console.close()


def test_a_roaming_tcp_console_sends_where_its_driver_moved_the_domain() -> None:
    """After its own driver's migration (`move`), the console lets go of the source at once, even
    while that QEMU still answers: the next command goes to the destination."""
    source = tcp_listener("127.0.0.1")
    port = source.getsockname()[1]
    destination = socket.socket()
    destination.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    destination.bind(("127.0.0.2", port))
    destination.listen(1)
    on_source: list[str] = []
    on_destination: list[str] = []
    serve(source, answering_guest, on_source)
    serve(destination, answering_guest, on_destination)
    console = TcpConsole("vm1", ("127.0.0.1", port), [("127.0.0.1", port), ("127.0.0.2", port)])
    try:
        console.attach(("127.0.0.1", port))
        console.attach(("127.0.0.2", port))
        assert console._home() == ("127.0.0.1", port)  # connected first
        console.move(("127.0.0.2", port))
        assert console.wait(lambda: list(console._sockets) == [("127.0.0.2", port)], timeout_s=5)
        run = console.start(["echo", "moved"])
        assert console.wait_run(run.id, timeout_s=10).exit_status == 0
        assert on_destination == [f"run {run.id} echo moved"] and on_source == []
    finally:
        console.close()


def test_a_tcp_console_that_is_not_there_is_an_error() -> None:
    listener = tcp_listener("127.0.0.1")
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    console = TcpConsole("vm1", ("127.0.0.1", port))
    try:
        with pytest.raises(ConsoleError, match="cannot connect to its console"):
            console.attach(("127.0.0.1", port), timeout_s=1.5)
    finally:
        console.close()
