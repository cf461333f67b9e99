"""The lab executor and the libvirt driver together, over two fake PMs: virsh answered in memory,
each domain's serial console a TCP server on the PM's loopback address, and a live migration made
behind the runner's back, as a PM's Local Controller makes the CC's. The runner must boot the
domains by layout (console ports chosen one at a time), run the workloads over the consoles, follow
the moved domain to its destination's console without being told, and record where it ended.
No lab: nothing here leaves this machine's loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from test_real_lab_runner import SPEC, real_inventory

from testbed.drivers.base import Host
from testbed.drivers.libvirt import CPU_READ, LibvirtDriver, console_port_of
from testbed.lab import load_lab
from testbed.runner.campaign import Run
from testbed.runner.executor import LabExecutor
from testbed.spec import parse_spec

ADDRESSES = {"pm1": "127.0.0.1", "pm2": "127.0.0.2"}
WORK_S = 2.0  # how long a workload (any but the one-block probe) runs in a fake guest
PROC_STAT = "cpu  100 0 0 100 0 0 0 0 0 0\ncpu0 50 0 0 50 0 0 0 0 0 0\ncpu1 50 0 0 50 0 0 0 0 0 0\n"


class Console:
    """A domain's QEMU console on one PM: a TCP server taking one client at a time. What the
    guest writes while no client is connected is lost, as with QEMU."""

    def __init__(self, guest: Guest, address: str, port: int) -> None:
        self.guest, self.conn = guest, None
        self.listener = socket.create_server((address, port), reuse_port=False)
        self.listener.settimeout(0.2)
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.conn = conn
            self.guest.connected(self)
            with contextlib.suppress(OSError), conn:
                buffer = b""
                while chunk := conn.recv(4096):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        self.guest.heard(line.decode())
            self.conn = None

    def write(self, line: str) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sendall(line.encode() + b"\n")

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)


class Guest:
    """guest-init's side: @ready on the first client, @pong to ping, a job's start and its end."""

    def __init__(self) -> None:
        self.console: Console | None = None  # where the guest runs now
        self.ready_said = False

    def connected(self, console: Console) -> None:
        if console is self.console and not self.ready_said:
            self.ready_said = True
            console.write("@ready")

    def heard(self, line: str) -> None:
        if line == "ping":
            self.write("@pong")
        elif line.startswith("run "):
            _, job, *argv = line.split()
            self.write(f"@{job} start")
            threading.Timer(0.05 if argv[1:2] == ["1"] else WORK_S, self.write, [f"@{job} end 0"]).start()

    def write(self, line: str) -> None:
        if self.console is not None:
            self.console.write(line)


class FakePms:
    """Two PMs' libvirt: domains in memory, their consoles on loopback."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.domains: dict[str, dict[str, Any]] = {}  # name -> host, xml, port, guest, console
        self.ports: list[int] = []  # every console port a domain was created with

    def run(self, host: str, argv: list[str], stdin: bytes | None = None) -> str:
        if argv[:2] == ["virsh", "create"]:
            time.sleep(0.3)  # QEMU starting: another creation may read the domains meanwhile
        with self.lock:
            here = {name: d for name, d in self.domains.items() if d["host"] == host}
            if argv[0] in ("qemu-img", "chown", "rm") or argv[:1] == ["cat"] and argv[1].endswith("/accel"):
                return "tcg\n" if argv[0] == "cat" else ""
            if argv[:2] == ["virsh", "create"]:
                xml = stdin.decode()
                name, port = ET.fromstring(xml).findtext("name"), console_port_of(xml)
                self.ports.append(port)
                assert all(d["port"] != port for d in self.domains.values()), f"port {port} taken twice"
                guest = Guest()
                guest.console = Console(guest, ADDRESSES[host], port)
                self.domains[name] = {"host": host, "xml": xml, "port": port, "guest": guest}
                return ""
            if argv[:2] == ["virsh", "domstats"] or argv == CPU_READ:
                stats = "".join(f"Domain: '{name}'\n  vcpu.current=1\n  vcpu.0.time={int(time.time() * 1e8)}\n"
                                f"  balloon.maximum=131072\n\n" for name in here)
                return (PROC_STAT if argv == CPU_READ else "") + stats
            if argv[:2] == ["virsh", "dumpxml"]:
                return here[argv[2]]["xml"]
            if argv[:2] == ["virsh", "destroy"]:
                self.domains.pop(argv[2])["guest"].console.close()
                return ""
        raise AssertionError(f"{host}: unexpected command {argv}")

    def migrate(self, vm: str, destination: str) -> None:
        """A live migration another process ordered: the destination's QEMU listens from its
        start, the guest goes on there, the source's QEMU ends."""
        domain = self.domains[vm]
        incoming = Console(domain["guest"], ADDRESSES[destination], domain["port"])
        time.sleep(1.0)  # the pre-copy: the runner's console finds the new one meanwhile
        with self.lock:
            source, domain["guest"].console = domain["guest"].console, incoming
            domain["host"] = destination
        source.close()


class FakeRemote:
    def __init__(self, pms: FakePms, host: str) -> None:
        self.pms, self.host = pms, host

    def run(self, argv: list[str], timeout_s: float = 60.0, check: bool = True, stdin: bytes | None = None) -> str:
        return self.pms.run(self.host, list(argv), stdin)


class MigratingCc:
    """The CC as the runner sees it; when a run turns migration on, vm1 goes to pm2 (its LC's
    move, which the runner's driver never hears of), logged as the CC logs it."""

    def __init__(self, pms: FakePms) -> None:
        self.pms, self.events, self.in_flight = pms, [], None

    def put(self, path: str, config: Any) -> None:
        if not config.dry_run:
            self.in_flight = threading.Thread(target=self._move, args=(config.label,))
            self.in_flight.start()

    def _move(self, label: str) -> None:
        time.sleep(0.3)
        start = time.time()
        self.pms.migrate("vm1", "pm2")
        record = {"mode": "precopy", "start": start, "total_time_s": time.time() - start, "downtime_s": 0.01,
                  "bytes": 1 << 20, "status": "completed"}
        self.events.append({"kind": "migration", "label": label, "t": start, "vm": "vm1", "source": "pm1",
                            "dest": "pm2", "ok": True, "record": record})
        self.in_flight = None

    def get(self, path: str, **query: Any) -> Any:
        if path == "/v1/events":
            return [e for e in self.events if e["label"] == query.get("label")]
        return {"in_flight": None if self.in_flight is None else "vm1"}


def free_base(count: int = 8) -> int:
    """A port from which `count` ports are free on both loopback addresses."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            with contextlib.ExitStack() as held:
                for address in ADDRESSES.values():
                    for port in range(base, base + count):
                        held.enter_context(socket.create_server((address, port)))
            return base
        except OSError:
            continue
    pytest.skip("no run of free ports on loopback")


def test_the_runner_follows_a_domain_its_driver_never_moved(tmp_path: Path) -> None:
    lab = load_lab(real_inventory(tmp_path / "kvm", testbed_pm_cpu="vms"))
    pms = FakePms(free_base())
    hosts = [Host(name, address, 2.0, 4) for name, address in ADDRESSES.items()]
    driver = LibvirtDriver(hosts, Path("/keys/lab"), console_base=pms.base, boot_timeout_s=20)
    driver._remotes = {name: FakeRemote(pms, name) for name in ADDRESSES}  # virsh in memory
    cc = MigratingCc(pms)
    runner = LabExecutor(lab, {"kvm": driver}, cc, sample_period_s=0.2, reset_wait_s=0)
    runner._check_clocks = lambda: {"offsets_s": {}}  # chronyd is a host's: not here
    spec = parse_spec(SPEC | {"matrix": {"layout": [[2, 1]], "migration": [True]}})  # both PMs boot at once
    try:
        result = runner.execute(Run(spec, "kvm", spec.variants()[0], 1))
    finally:
        runner.close()
    assert result.status == "ok", result.details
    placed = result.details["gate"]["placement"]
    assert placed["placement"] == {"vm1": "pm1", "vm2": "pm1", "vm3": "pm2"} and placed["recreated"] == {}
    assert pms.domains == {} and sorted(pms.ports) == [pms.base, pms.base + 1, pms.base + 2]  # destroyed
    ended = {t.vm: (t.start_host, t.end_host) for t in result.vm_times}
    assert ended == {"vm1": ("pm1", "pm2"), "vm2": ("pm1", "pm1"), "vm3": ("pm2", "pm2")}
    (move,) = result.migrations
    assert (move.vm, move.source, move.destination, move.status) == ("vm1", "pm1", "pm2", "completed")
    # vm1's work ended after the move, on pm2's console, which the runner found by itself
    (work,) = [w for w in result.details["workloads"]["vm1"] if w["argv"][0] == "synthetic1"]
    assert work["exit_status"] == 0 and work["end"] > move.started_at
    hosts_sampled = {s.host for s in result.cpu_samples if not s.vm}
    assert hosts_sampled == {"pm1", "pm2"}
