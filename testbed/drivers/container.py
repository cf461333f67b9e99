"""Containers on the lab's PMs (OpenVZ-like, shared kernel), migrated by stop-and-copy.

A container is a process tree in its own PID, mount, UTS, IPC and network namespaces. Its
network namespace has a veth straight to the lab bridge with an address of its own (like
OpenVZ's venet), so the address survives a migration. Its root is the machine's root, read-only
in its mount namespace, with a private writable directory (on the lab's VM storage when the
vm_storage layout exists) bound at /root and /tmp; where the Kernel app's Debian root has been
built (KERNEL_ROOT), it is mounted at /mnt as an overlay whose writable layer is in that private
directory, so a compile there writes to the container's own storage. Its cgroups (cpu, cpuacct, memory, freezer)
are nested in its current PM's: capped at vcpus/cores of the PM's capacity and at its memory
size, so its CPU comes out of that PM's capacity. Its PID 1 is container_init.py, which starts
workloads and logs their output with kernel-clock (= host-clock) times.

Migration (mode stop-and-copy only, as OpenVZ's) takes CRIU's dump/restore where `criu check`
passes. Where it does not (Debian's CRIU 3.17 on kernel 6.18), it is stop-and-copy on the shared
kernel: freeze the container's freezer cgroup → dump the present pages of all its processes'
private writable mappings to a file on the source PM's storage → send the file (optionally
through bzip2 or zstd) over the lab network to the destination PM → load the pages back into the
processes there → move every task into the destination PM's cgroups → thaw. The dump, send,
receive and load run in agents (memdump.py) started inside the source and destination PMs'
cgroups and network namespaces, so the PMs pay for them and the bytes cross the shaped links.
What this is not: the processes never leave the kernel, so the pages they hold are still in
place while frozen and the load writes the received copy over them; docs/container.md says
what that does and does not show.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.drivers import cgroups
from testbed.drivers.base import (
    CpuUse,
    Host,
    MigrationMode,
    MigrationRecord,
    VMInfo,
    VMSpec,
    WorkloadRun,
)
from testbed.drivers.cgroups import CONTROLLERS
from testbed.lab import BRIDGE
from testbed.storage import DEFAULT_LAYOUT, StorageLayout

STATE_DIR = Path("/var/lib/testbed/containers")
WORKLOAD_SOURCES = Path(__file__).resolve().parents[2] / "workloads"
#: Container addresses on the lab network (198.18.0.100-.199 on the embedded lab).
ADDRESSES = range(100, 200)
INIT = Path(__file__).with_name("container_init.py")
#: The init runs stdlib-only (-I -S) under the system's python3, from a copy in the container's
#: state directory: the checkout and its venv may live under /tmp or /root, which the
#: container's own /tmp and /root hide.
INIT_PYTHON = "/usr/bin/python3"
#: The Kernel app's Debian root with its prepared linux-source tree (docs/workloads.md), as the
#: kernel_root role keeps it on every PM: the QEMU kernel guest's disk image is made from it.
KERNEL_ROOT = Path("/var/cache/testbed/kernel-root")
#: What the role writes into the tree once it is prepared: a tree without it is not mounted.
KERNEL_ROOT_MARKER = "usr/src/linux/.testbed-prepared"
#: Mounts in the container's own mount namespace: the host's root read-only, its private
#: directory at /root and /tmp, its state directory writable (the init's socket and logs), and
#: (KERNELROOT set) the Kernel app's root at /mnt, as an overlay whose upper layer is in the
#: private directory, with the container's /dev and its own PID namespace's /proc: the app's
#: command is then `chroot /mnt /usr/local/bin/kernel JOBS COUNT` as in a QEMU kernel guest,
#: whose init mounts its root disk at /mnt.
_SETUP = """
mount --make-rprivate /
mkdir -p "$ROOTDIR/home" "$ROOTDIR/tmp"
mount --bind "$ROOTDIR/home" /root
mount --bind "$ROOTDIR/tmp" /tmp
mount --bind "$STATEDIR" "$STATEDIR"
if [ -n "$KERNELROOT" ]; then
    mkdir -p "$ROOTDIR/kernel/upper" "$ROOTDIR/kernel/work"
    mount -t overlay overlay \
        -o "lowerdir=$KERNELROOT,upperdir=$ROOTDIR/kernel/upper,workdir=$ROOTDIR/kernel/work" /mnt
    mount --rbind /dev /mnt/dev
    mount -t proc proc /mnt/proc
fi
mount -o remount,bind,ro /
hostname "$NAME"
cd /root
exec "$@"
"""
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class ContainerError(RuntimeError):
    """A container could not be created, reached, migrated or removed; the message says why."""


@dataclass(frozen=True)
class _State:
    """What the driver keeps of a container in STATE/<name>/ct.json (any driver object reads it)."""

    spec: VMSpec
    host: str
    address: str
    root_dir: str
    launcher_pid: int  # `unshare`, the container tree's outermost process (host PID namespace)

    @property
    def netns(self) -> str:
        return f"tbc-{self.spec.name}"

    @property
    def veth(self) -> str:
        return f"tbc{self.address.rsplit('.', 1)[1]}"


class ContainerDriver:
    """The Driver protocol (testbed.drivers.base) for containers on the given PMs."""

    technique = "container"

    def __init__(
        self,
        hosts: Iterable[Host],
        *,
        bridge: str = BRIDGE,
        network: str = "198.18.0.0/24",
        addresses: range = ADDRESSES,
        state_dir: Path = STATE_DIR,
        storage: StorageLayout = DEFAULT_LAYOUT,
        connect_timeout_s: float = 5.0,
        migration_timeout_s: float = 300.0,
        kernel_root: Path = KERNEL_ROOT,
    ) -> None:
        if any(state_dir.resolve().is_relative_to(p) for p in (Path("/tmp"), Path("/root"))):
            raise ContainerError(f"state dir {state_dir}: a container's own /tmp and /root would hide it")
        self._hosts = {h.name: h for h in hosts}
        self.bridge = bridge
        self.network = ipaddress.ip_network(network)
        self.addresses = addresses
        self.state_dir = state_dir
        self.storage = storage
        self.connect_timeout_s = connect_timeout_s
        self.migration_timeout_s = migration_timeout_s
        self.kernel_root = kernel_root
        self._runs: dict[tuple[str, str], WorkloadRun] = {}

    # --- inventory ---------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    def list_vms(self) -> list[VMInfo]:
        return [self._info(state) for state in self._states()]

    def _states(self) -> Iterator[_State]:
        """Every container's state, leaving out one destroyed while being listed (the runner
        destroys containers in parallel, and the LCs read the same directory)."""
        for path in sorted(self.state_dir.glob("*/ct.json")):
            with contextlib.suppress(ContainerError):
                yield self._load(path.parent.name)

    def _info(self, state: _State) -> VMInfo:
        """Running: its tree has a process on some PM. Its own PM's cgroup alone would say no for
        the instant a migration has moved the tasks but not yet saved the new PM (or the reverse),
        and a runner watching would take the container for dead."""
        name = state.spec.name
        hosts = [state.host, *(h for h in self._hosts if h != state.host)]
        running = any(_procs(self._cgroup(host, name, "freezer")) for host in hosts)
        return VMInfo(name, state.host, state.spec, running)

    def _host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise ContainerError(f"unknown PM {name!r} (known: {', '.join(self._hosts)})") from None

    def _dir(self, vm: str) -> Path:
        return self.state_dir / vm

    def _load(self, vm: str) -> _State:
        try:
            data = json.loads((self._dir(vm) / "ct.json").read_text())
        except FileNotFoundError:
            raise ContainerError(f"unknown container {vm!r}") from None
        return _State(**(data | {"spec": VMSpec(**data["spec"])}))

    def _save(self, state: _State) -> None:
        path = self._dir(state.spec.name) / "ct.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(path)  # atomic: a reader never sees half a location

    def address(self, vm: str) -> str:
        """The container's own address on the lab network (the same on every PM)."""
        return self._load(vm).address

    def pids(self, vm: str) -> list[int]:
        """Every process of the container (its freezer cgroup's members)."""
        state = self._load(vm)
        return _procs(self._cgroup(state.host, vm, "freezer"))

    def _cgroup(self, host: str, vm: str, controller: str) -> Path:
        return self._host(host).cgroup(controller) / vm

    # --- CPU ---------------------------------------------------------------------------------

    def cpu_use(self, interval_s: float) -> CpuUse:
        return cgroups.cpu_use(self, interval_s)

    # --- life cycle --------------------------------------------------------------------------

    def create_vm(self, spec: VMSpec, host: str) -> VMInfo:
        if not spec.name or set(spec.name) - _NAME_OK or len(spec.name) > 40:
            raise ContainerError(f"container name {spec.name!r}: letters, digits, '-' and '_' only")
        if spec.memory_mb < 16 or spec.vcpus < 1:
            raise ContainerError(f"container {spec.name}: memory_mb must be >= 16 and vcpus >= 1")
        pm = self._host(host)
        bin_dir = build_workloads(self.state_dir / "bin")
        with _locked(self.state_dir / ".lock"):  # containers created at once get distinct addresses
            if (self._dir(spec.name) / "ct.json").exists():
                raise ContainerError(f"container {spec.name} already exists (destroy it first)")
            self._dir(spec.name).mkdir(parents=True, exist_ok=True)
            state = _State(spec, host, self._free_address(), str(self._root_dir(spec.name, host)), 0)
            self._save(state)
        try:
            self._plug(state)
            self._make_cgroups(pm, spec, frozen=False)
            state = _State(spec, host, state.address, state.root_dir, self._launch(state, pm, bin_dir))
            self._save(state)
            self._wait_ready(spec.name)
        except BaseException:
            self.destroy_vm(spec.name)
            raise
        return self._info(self._load(spec.name))

    def _free_address(self) -> str:
        taken = {state.address for state in self._states()}
        for last in self.addresses:
            address = str(self.network.network_address + last)
            if address not in taken:
                return address
        raise ContainerError(f"no free container address in {self.network} ({self.addresses})")

    def _root_dir(self, vm: str, owner: str) -> Path:
        """The container's private writable directory: in its owner PM's share of the VM storage
        (every PM reaches it, so migration copies no files), else next to its state."""
        share = Path(self.storage.share(owner))
        return share / "roots" / vm if share.is_dir() else self._dir(vm) / "root"

    def _plug(self, state: _State) -> None:
        """The container's network namespace, with a veth to the lab bridge and its address."""
        netns = state.netns
        prefix = self.network.prefixlen
        _run(["ip", "netns", "add", netns])
        _run(["ip", "link", "add", state.veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        _run(["ip", "link", "set", state.veth, "master", self.bridge, "up"])
        for argv in (["addr", "add", f"{state.address}/{prefix}", "dev", "eth0"],
                     ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            _run(["ip", "-n", netns, *argv])

    def _make_cgroups(self, pm: Host, spec: VMSpec, frozen: bool) -> None:
        """The container's cgroups under a PM: vcpus/cores of its capacity, its memory size."""
        for controller in CONTROLLERS:
            cgroups.create(pm.cgroup(controller) / spec.name)
        cgroups.set_quota(pm.cgroup("cpu") / spec.name, spec.vcpus / pm.cores * pm.capacity)
        (pm.cgroup("memory") / spec.name / "memory.limit_in_bytes").write_text(str(spec.memory_mb * 2**20))
        if frozen:
            _freeze(pm.cgroup("freezer") / spec.name)

    def _launch(self, state: _State, pm: Host, bin_dir: Path) -> int:
        """Start the container's tree: join its cgroups, then its network namespace, then new
        PID/mount/UTS/IPC namespaces whose PID 1 is the init (cgroups first: joining them from
        inside would need /sys/fs/cgroup, which a new mount namespace may hide)."""
        name = state.spec.name
        procs = [pm.cgroup(c) / name / "cgroup.procs" for c in CONTROLLERS]
        Path(state.root_dir).mkdir(parents=True, exist_ok=True)
        init = self._dir(name) / INIT.name
        shutil.copyfile(INIT, init)
        env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "ROOTDIR": state.root_dir,
               "STATEDIR": str(self._dir(name)), "NAME": name, "SYNTHETIC1": str(bin_dir / "synthetic1"),
               "HOME": "/root", "KERNELROOT": str(self.kernel_root) if self.has_kernel_root() else ""}
        argv = [*cgroups.join_then_exec(procs), "nsenter", f"--net=/run/netns/{state.netns}",
                "unshare", "--pid", "--fork", "--mount-proc", "--mount", "--uts", "--ipc", "--kill-child",
                "sh", "-ec", _SETUP, "sh", INIT_PYTHON, "-I", "-S", str(init), str(self._dir(name))]
        with open(self._dir(name) / "container.log", "ab") as log:
            launcher = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        return launcher.pid

    def has_kernel_root(self) -> bool:
        """Whether containers get the Kernel app's root at /mnt (its tree is built and prepared)."""
        return (self.kernel_root / KERNEL_ROOT_MARKER).is_file()

    def _wait_ready(self, vm: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self._ask(vm, "ping") == "pong":
                    return
            if not _alive(self._load(vm).launcher_pid):
                break
            time.sleep(0.05)
        log = (self._dir(vm) / "container.log").read_text(errors="replace")[-500:]
        raise ContainerError(f"container {vm}: init not ready after {timeout_s:.0f} s: {log.strip()}")

    def _ask(self, vm: str, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self._dir(vm) / "init.sock"))
            sock.sendall(line.encode() + b"\n")
            return sock.makefile("r").readline().strip()

    def destroy_vm(self, vm: str) -> None:
        vm_dir = self._dir(vm)
        if not vm_dir.is_dir():
            return
        with contextlib.suppress(RuntimeError):
            state = self._load(vm)
            self._kill_tree(state)
            for pm in self._hosts.values():
                _remove_cgroups(pm, vm)
            subprocess.run(["ip", "netns", "del", state.netns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", state.veth], capture_output=True, check=False)
            if not Path(state.root_dir).is_relative_to(vm_dir):
                shutil.rmtree(state.root_dir, ignore_errors=True)
        shutil.rmtree(vm_dir, ignore_errors=True)
        self._runs = {key: run for key, run in self._runs.items() if key[0] != vm}

    def _kill_tree(self, state: _State) -> None:
        for pm in self._hosts.values():
            _kill_group(pm.cgroup("freezer") / state.spec.name)
        _reap(state.launcher_pid)

    # --- workloads ---------------------------------------------------------------------------

    def start_workload(self, vm: str, argv: list[str]) -> WorkloadRun:
        bad = [word for word in argv if not word or any(c.isspace() for c in word)]
        if not argv or bad:
            raise ContainerError(f"container {vm}: workload argv must be plain words, not {bad or argv}")
        run_id = uuid.uuid4().hex[:8]
        answer = self._ask(vm, " ".join(["run", run_id, *argv]))
        if answer != "ok":
            raise ContainerError(f"container {vm}: {answer}")
        deadline = time.monotonic() + 30
        while (run := self._read_run(vm, run_id, argv)).start is None:
            if time.monotonic() > deadline:
                raise ContainerError(f"container {vm}: workload {argv[0]} did not start within 30 s")
            time.sleep(0.02)
        return run

    def workload(self, vm: str, workload_id: str) -> WorkloadRun:
        return self._read_run(vm, workload_id, None)

    def _read_run(self, vm: str, run_id: str, argv: list[str] | None) -> WorkloadRun:
        """The run as its log says now, updated in place: like the QEMU driver's runs, one object
        per run that a caller may keep and watch."""
        try:
            lines = (self._dir(vm) / "runs" / f"{run_id}.log").read_text().splitlines()
        except FileNotFoundError:
            if argv is None:
                raise ContainerError(f"container {vm}: no workload {run_id}") from None
            lines = []
        run = self._runs.setdefault((vm, run_id), WorkloadRun(vm, run_id, tuple(argv or ())))
        output: list[tuple[float, str]] = []
        for line in lines:
            with contextlib.suppress(ValueError):  # a line the init is still writing
                when, kind, *rest = json.loads(line)
                if kind == "start":
                    run.start = when
                elif kind == "out":
                    output.append((when, rest[0]))
                elif kind == "end":
                    run.end, run.exit_status = when, rest[0]
        run.output[:] = output
        return run

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        deadline = time.monotonic() + timeout_s
        while not (run := self.workload(vm, workload_id)).finished and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return run

    # --- migration ---------------------------------------------------------------------------

    def migrate(self, vm: str, destination: str, mode: MigrationMode, *,
                compression: str | None = None) -> MigrationRecord:
        """Stop-and-copy `vm` to `destination`; `compression` (bzip2 or zstd) applies to the dump
        on the wire. On failure the container runs on, thawed, on its source."""
        mode = MigrationMode(mode)
        if mode is not MigrationMode.STOPCOPY:
            raise ContainerError(f"mode {mode}: containers migrate by stop-and-copy only")
        if compression not in (None, "bzip2", "zstd"):
            raise ContainerError(f"compression {compression!r}: bzip2 or zstd")
        state = self._load(vm)
        if destination == state.host:
            raise ContainerError(f"container {vm} already runs on {destination}")
        source, dest = self._host(state.host), self._host(destination)
        if not _procs(source.cgroup("freezer") / vm):
            raise ContainerError(f"container {vm} is not running (no processes on {state.host})")
        migration = _CriuStopCopy if criu_works() else _StopCopy
        return migration(self, state, source, dest, compression).run()

    def _dump_path(self, vm: str, pm: str) -> Path:
        """Where a PM keeps a container's dump file: its own storage share, else the state dir."""
        share = Path(self.storage.share(pm))
        if share.is_dir():
            (share / "dumps").mkdir(exist_ok=True)
            return share / "dumps" / f"{vm}.dump"
        return self._dir(vm) / f"dump-{pm}.bin"


class _Agent:
    """A memdump agent on one PM: in its cgroups and network namespace, one JSON line each way."""

    def __init__(self, host: Host, log: Path) -> None:
        argv = [sys.executable, "-m", "testbed.drivers.memdump"]
        if host.netns:
            argv = ["ip", "netns", "exec", host.netns, *argv]
        procs = [host.cgroup(c) / "cgroup.procs" for c in CONTROLLERS]
        self.host = host.name
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([*cgroups.join_then_exec(procs), *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)

    def post(self, **command: object) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float) -> dict:
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                raise ContainerError(f"{self.host}'s migration agent: no answer in {timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise ContainerError(f"{self.host}'s migration agent exited ({self.proc.poll()})")
        answer = json.loads(line)
        if not answer["ok"]:
            raise ContainerError(f"{self.host}: {answer['error']}")
        return answer

    def ask(self, wait_s: float, **command: object) -> dict:
        self.post(**command)
        return self.reply(wait_s)

    def close(self, kill: bool) -> None:
        """End the agent: at once (`kill`, after a failure it may be stuck waiting for a peer), or
        by closing its stdin, which it takes as the end of its commands."""
        if kill:
            self.proc.kill()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class _StopCopy:
    """One shared-kernel stop-and-copy; every failure ends in `_fail` with the tree thawed on
    its source and nothing left on the destination."""

    mechanism = "shared-kernel stop-and-copy"

    def __init__(self, driver: ContainerDriver, state: _State, source: Host, destination: Host,
                 compression: str | None) -> None:
        self.driver = driver
        self.state = state
        self.vm = state.spec.name
        self.source = source
        self.destination = destination
        self.compression = compression
        self.timeout_s = driver.migration_timeout_s
        self.start = time.time()
        self.frozen_at: float | None = None
        self.phases: dict[str, float] = {}
        self.details: dict[str, object] = {"mechanism": self.mechanism, "compression": compression or "none",
                                           "memory_mb": state.spec.memory_mb}
        self.src_dump = driver._dump_path(self.vm, source.name)
        self.dst_dump = driver._dump_path(self.vm, destination.name)
        self.agents: list[_Agent] = []
        self.launcher_pid = state.launcher_pid

    def run(self) -> MigrationRecord:
        record: MigrationRecord | None = None
        try:
            record = self._migrate()
        except Exception as err:  # noqa: BLE001 - every failure becomes a failed record
            record = self._fail(str(err) or type(err).__name__)
        finally:
            for agent in self.agents:
                agent.close(kill=record is None or record.status != "completed")
            self._remove_dumps()
        return record

    def _remove_dumps(self) -> None:
        self.src_dump.unlink(missing_ok=True)
        self.dst_dump.unlink(missing_ok=True)

    def _cgroup(self, host: Host, controller: str) -> Path:
        return host.cgroup(controller) / self.vm

    def _phase(self, name: str, since: float) -> float:
        now = time.time()
        self.phases[name] = now - since
        return now

    def _migrate(self) -> MigrationRecord:
        t = time.time()
        log = self.driver._dir(self.vm) / "migration.log"
        src, dst = _Agent(self.source, log), _Agent(self.destination, log)
        self.agents = [src, dst]
        port = dst.ask(self.timeout_s, cmd="listen", address=self.destination.address)["port"]
        self._prepare_destination()
        self.details["prepare_s"] = time.time() - t

        # The migration proper starts with the freeze, so that total time and downtime share
        # one origin (as the QEMU driver's stop-and-copy does).
        self.start = self.frozen_at = t = time.time()
        _freeze(self._cgroup(self.source, "freezer"))
        t = self._phase("suspend", t)

        self._dump(src)
        t = self._phase("dump", t)

        dst.post(cmd="receive", file=str(self.dst_dump), compress=self.compression, timeout_s=self.timeout_s)
        sent = src.ask(self.timeout_s, cmd="send", file=str(self.src_dump), address=self.destination.address,
                       port=port, compress=self.compression, connect_timeout_s=self.driver.connect_timeout_s,
                       timeout_s=self.timeout_s)
        self.details["received_bytes"] = dst.reply(self.timeout_s)["dump_bytes"]
        t = self._phase("copy", t)

        self._undump(dst)
        t = self._phase("undump", t)

        self._resume()
        end = self._phase("resume", t)

        self.driver._save(_State(self.state.spec, self.destination.name, self.state.address,
                                 self.state.root_dir, self.launcher_pid))
        _remove_cgroups(self.source, self.vm)
        return self._record("completed", end, sent["wire_bytes"])

    def _prepare_destination(self) -> None:
        """The container's cgroups on the destination, frozen: tasks moved in stay frozen."""
        self.driver._make_cgroups(self.destination, self.state.spec, frozen=True)

    def _dump(self, src: _Agent) -> None:
        pids = _procs(self._cgroup(self.source, "freezer"))
        dumped = src.ask(self.timeout_s, cmd="dump", pids=pids, file=str(self.src_dump))
        self.details |= {"dump_bytes": dumped["dump_bytes"], "regions": dumped["regions"], "processes": len(pids)}

    def _undump(self, dst: _Agent) -> None:
        self.details["data_bytes"] = dst.ask(self.timeout_s, cmd="load", file=str(self.dst_dump))["data_bytes"]

    def _resume(self) -> None:
        for controller in CONTROLLERS:
            _move_tasks(self._cgroup(self.source, controller), self._cgroup(self.destination, controller))
        _thaw(self._cgroup(self.destination, "freezer"))

    def _fail(self, reason: str) -> MigrationRecord:
        """Put every task back in the source's cgroups, thaw it there, drop the destination's."""
        try:
            self._restore_source()
            _remove_cgroups(self.destination, self.vm)
        except (OSError, RuntimeError) as err:
            reason = f"{reason}; restoring the source: {err}"
        return self._record("failed", time.time(), 0, error=reason)

    def _restore_source(self) -> None:
        for controller in CONTROLLERS:
            if self._cgroup(self.destination, controller).is_dir():
                _move_tasks(self._cgroup(self.destination, controller), self._cgroup(self.source, controller))
        _thaw(self._cgroup(self.source, "freezer"))

    def _record(self, status: str, end: float, wire_bytes: int, error: str | None = None) -> MigrationRecord:
        return MigrationRecord(
            vm=self.vm, source=self.source.name, destination=self.destination.name,
            mode=MigrationMode.STOPCOPY, start=self.start, status=status,
            total_time_s=end - self.start,
            downtime_s=None if self.frozen_at is None else end - self.frozen_at,
            bytes=wire_bytes, phases=dict(self.phases), error=error, details=dict(self.details))


class _CriuStopCopy(_StopCopy):
    """Stop-and-copy with CRIU where `criu check` passes: `criu dump` of the frozen tree (which
    ends the source's processes) into an image directory sent as one tar file, `criu restore` on
    the destination inside the container's cgroups there, joining its network namespace. A
    failure after the dump restores the tree on the source from the source's images.

    Not run on this machine (CRIU 3.17 fails `criu check` on kernel 6.18); docs/container.md."""

    mechanism = "criu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dumped = False

    def _images(self, dump: Path) -> Path:
        return dump.with_suffix(".criu")

    def _remove_dumps(self) -> None:
        super()._remove_dumps()
        for dump in (self.src_dump, self.dst_dump):
            shutil.rmtree(self._images(dump), ignore_errors=True)

    def _prepare_destination(self) -> None:
        # Thawed: criu restore runs in these cgroups so that the tree it rebuilds lands there.
        self.driver._make_cgroups(self.destination, self.state.spec, frozen=False)

    def _dump(self, src: _Agent) -> None:
        images = self._images(self.src_dump)
        images.mkdir(parents=True, exist_ok=True)
        netns = os.stat(f"/run/netns/{self.state.netns}").st_ino
        self._criu(self.source, list(CONTROLLERS), [
            "dump", "--tree", str(_ns_init(self._cgroup(self.source, "freezer"))), "--images-dir", str(images),
            "--freeze-cgroup", str(self._cgroup(self.source, "freezer")), "--manage-cgroups=ignore",
            "--external", f"net[{netns}]:ctnet"])
        self.dumped = True
        _run(["tar", "-C", str(images), "-cf", str(self.src_dump), "."])
        self.details["dump_bytes"] = self.src_dump.stat().st_size

    def _undump(self, dst: _Agent) -> None:
        self.launcher_pid = self._restore(self.destination, self._images(self.dst_dump), self.dst_dump)

    def _resume(self) -> None:
        """The restored tree already runs in the destination's cgroups; left on the source is
        the dumped tree's launcher (outside the container's PID namespace), which goes."""
        _kill_group(self._cgroup(self.source, "freezer"))
        _reap(self.state.launcher_pid)

    def _restore_source(self) -> None:
        if not self.dumped:
            super()._restore_source()
            return
        _thaw(self._cgroup(self.source, "freezer"))
        self.launcher_pid = self._restore(self.source, self._images(self.src_dump), None)
        self.driver._save(_State(self.state.spec, self.source.name, self.state.address,
                                 self.state.root_dir, self.launcher_pid))

    def _restore(self, host: Host, images: Path, tar: Path | None) -> int:
        """Rebuild the tree from `images` (unpacked from `tar` first) in the container's cgroups
        on `host`; returns the restored init's PID."""
        if tar is not None:
            images.mkdir(parents=True, exist_ok=True)
            _run(["tar", "-C", str(images), "-xf", str(tar)])
        pidfile = images / "restored.pid"
        self._criu(host, None, ["restore", "--images-dir", str(images), "--restore-detached",
                                "--pidfile", str(pidfile), "--manage-cgroups=ignore",
                                "--join-ns", f"net:/run/netns/{self.state.netns}"])
        return int(pidfile.read_text())

    def _criu(self, host: Host, pm_controllers: list[str] | None, argv: list[str]) -> None:
        """Run criu in the PM's cgroups (dump) or in the container's cgroups on it (restore)."""
        groups = ([host.cgroup(c) / "cgroup.procs" for c in pm_controllers] if pm_controllers is not None
                  else [self._cgroup(host, c) / "cgroup.procs" for c in CONTROLLERS])
        done = subprocess.run([*cgroups.join_then_exec(groups), "criu", *argv, "--log-file", "criu.log"],
                              capture_output=True, text=True, check=False, timeout=self.timeout_s,
                              cwd=argv[argv.index("--images-dir") + 1])
        if done.returncode != 0:
            raise ContainerError(f"criu {argv[0]} on {host.name} failed (exit {done.returncode}); "
                                 f"see criu.log in its images directory")


# --- CRIU, cgroups, processes, workload binaries ----------------------------------------------

@functools.cache
def criu_works() -> bool:
    """Whether `criu check` passes on this kernel (it does not with CRIU 3.17 on kernel 6.18)."""
    try:
        return subprocess.run(["criu", "check"], capture_output=True, check=False, timeout=60).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _procs(group: Path) -> list[int]:
    try:
        return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _ns_init(group: Path) -> int:
    """The host PID of a container's init (PID 1 in its own PID namespace)."""
    for pid in _procs(group):
        status = Path(f"/proc/{pid}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
        if nspid[-1] == "1" and len(nspid) > 1:
            return pid
    raise ContainerError(f"{group}: no PID namespace init among its processes")


def _kill_group(freezer: Path) -> None:
    """SIGKILL every process of a freezer cgroup (thawed first: a frozen task cannot die)."""
    if not freezer.is_dir():
        return
    for pid in _procs(freezer):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _thaw(freezer)
    deadline = time.monotonic() + 10
    while _procs(freezer) and time.monotonic() < deadline:
        time.sleep(0.02)


def _remove_cgroups(pm: Host, vm: str) -> None:
    """Remove a container's cgroups under a PM (those it has there; none is a no-op)."""
    for controller in CONTROLLERS:
        cgroups.remove(pm.cgroup(controller) / vm)


def _move_tasks(source: Path, destination: Path) -> None:
    """Move every process of a cgroup (all its threads) into another."""
    for pid in _procs(source):
        with contextlib.suppress(ProcessLookupError):
            (destination / "cgroup.procs").write_text(str(pid))


def _freeze(group: Path, timeout_s: float = 30.0) -> None:
    _set_freezer(group, "FROZEN", timeout_s)


def _thaw(group: Path, timeout_s: float = 30.0) -> None:
    _set_freezer(group, "THAWED", timeout_s)


def _set_freezer(group: Path, target: str, timeout_s: float) -> None:
    """Write a freezer state and wait until the kernel reports it (FREEZING until every task is)."""
    deadline = time.monotonic() + timeout_s
    (group / "freezer.state").write_text(target)
    while (group / "freezer.state").read_text().strip() != target:
        if time.monotonic() > deadline:
            raise ContainerError(f"{group}: not {target} after {timeout_s:.0f} s")
        (group / "freezer.state").write_text(target)
        time.sleep(0.001)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and pid > 0


def _reap(pid: int) -> None:
    """Collect the launcher's exit status if this process started it (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        deadline = time.monotonic() + 5
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ContainerError(f"{' '.join(argv)}: {done.stderr.strip()}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (flock), against other threads and other processes alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


#: How a workload is compiled: `gcc <COMPILE> -o BINARY SOURCE <LINK>`; part of its build key.
COMPILE = ("-O2",)
LINK = ("-lm",)


def build_key(source: Path) -> str:
    """What a workload binary is built from: its source, every header beside it (any may be
    included) and the compiler flags. A changed key rebuilds it; mtimes would not see an
    edited header, and a fresh checkout's mtimes say when it was cloned, not what it holds."""
    digest = hashlib.sha256(repr((COMPILE, LINK)).encode())
    for path in (source, *sorted(source.parent.glob("*.h"))):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_workloads(bin_dir: Path, sources: Path = WORKLOAD_SOURCES) -> Path:
    """The workload programs containers run (the QEMU guests' set): workloads/*.c built with the
    host's compiler when their build key changed (the key is kept beside the binary as
    NAME.key), workloads/*.py copied when their content differs. Each lands by rename, so a
    container running the old one is undisturbed; the lock keeps concurrent creates from
    building the same program at once."""
    with _locked(bin_dir / ".lock"):
        for source in sorted(sources.glob("*.c")):
            target, stamp = bin_dir / source.stem, bin_dir / f"{source.stem}.key"
            key = build_key(source)
            if target.exists() and stamp.exists() and stamp.read_text() == key:
                continue
            tmp = target.with_suffix(".tmp")
            _run(["gcc", *COMPILE, "-o", str(tmp), str(source), *LINK])
            tmp.replace(target)
            _write_atomically(stamp, key.encode())
        for script in sorted(sources.glob("*.py")):
            target = bin_dir / script.stem
            if not target.exists() or target.read_bytes() != script.read_bytes():
                _write_atomically(target, script.read_bytes(), mode=0o755)
    return bin_dir


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)
