"""What the real-lab drivers (xen, openvz, libvirt) share: PMs reached over SSH, workloads run
inside a VM through the PM, a parallel per-PM read for the Local Controller's samples, SSH into
full-system guests, and a migration's record (for vzmigrate and xl/xm, also the streamed,
timed toolstack command and the bytes the source PM sent).

A technique's driver says how to run a command inside one of its VMs from the VM's PM
(`guest_argv`: `vzctl exec2 CTID ...` for OpenVZ, SSH to the guest for Xen and KVM); the
workload bookkeeping is then the same for all: a constant launcher script records the start
time, the exit status and the end time in a per-run directory inside the VM, and reads come back
with `tail`, no shell text built from data.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from testbed.drivers.base import (
    Host,
    VMInfo,
    VMSpec,
    WorkloadRun,
)
from testbed.drivers.ssh import Remote, RemoteError, SshTarget
from testbed.lab_drivers import PM_ROOT_KEY

T = TypeVar("T")

#: Runs "$@" detached inside the VM, recording start, output, status and end in directory $1.
#: A constant: the workload's argv reaches it as arguments, never as shell text.
LAUNCHER = (
    'd=$1; shift; mkdir -p "$d" && '
    '( date +%s.%N > "$d/start"; "$@" > "$d/output" 2>&1; echo $? > "$d/status"; '
    'date +%s.%N > "$d/end" ) < /dev/null > /dev/null 2>&1 & echo started'
)
RUN_FILES = ("start", "end", "status", "output")
WORKLOAD_ROOT = "/var/tmp/testbed-workloads"


def parse_run_files(text: str) -> dict[str, str]:
    """Split `tail -n +1 FILE...` output (`==> path <==` headers) into {file name: content}."""
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("==> ") and line.endswith(" <=="):
            current = files.setdefault(Path(line[4:-4]).name, [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip("\n") for name, lines in files.items()}


class RemoteDriverBase:
    """PMs over SSH and workloads inside VMs; subclasses add the technique's VM operations."""

    technique = "remote"

    def __init__(self, hosts: Sequence[Host], key_file: Path, known_hosts: Path | None = None) -> None:
        self.key_file = key_file
        self._hosts = {h.name: h for h in hosts}
        self._remotes = {h.name: Remote(SshTarget(h.address, key_file, known_hosts)) for h in hosts}
        self._runs: dict[tuple[str, str], WorkloadRun] = {}
        #: The specs of the VMs this driver created: what was asked, where the toolstack's
        #: listing would give only what it rounded the VM to.
        self._specs: dict[str, VMSpec] = {}

    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    def remote(self, host: str) -> Remote:
        return self._remotes[host]

    def on_every_pm(self, read: Callable[[str], T]) -> dict[str, T]:
        """read(host) on all PMs at once: a sample's instants differ by one SSH round trip,
        not by one per PM."""
        with ThreadPoolExecutor(max_workers=len(self._hosts)) as pool:
            return dict(zip(self._hosts, pool.map(read, self._hosts)))

    def created(self, spec: VMSpec, host: str) -> VMInfo:
        """Remember a VM the technique has just started on `host`, and describe it."""
        self._specs[spec.name] = spec
        return VMInfo(spec.name, host, spec, True)

    # --- technique-specific --------------------------------------------------------------------
    def vm_host(self, vm: str) -> str:
        """The PM a VM runs on."""
        raise NotImplementedError

    def guest_argv(self, vm: str, argv: Sequence[str]) -> list[str]:
        """The command, run on the VM's PM, that runs argv inside the VM."""
        raise NotImplementedError

    # --- workloads ------------------------------------------------------------------------------
    def start_workload(self, vm: str, argv: list[str]) -> WorkloadRun:
        run = WorkloadRun(vm=vm, id=uuid.uuid4().hex[:12], argv=tuple(argv))
        run_dir = f"{WORKLOAD_ROOT}/{run.id}"
        self.remote(self.vm_host(vm)).run(
            self.guest_argv(vm, ["sh", "-c", LAUNCHER, "launcher", run_dir, *argv])
        )
        self._runs[(vm, run.id)] = run
        return self.workload(vm, run.id)

    def workload(self, vm: str, workload_id: str) -> WorkloadRun:
        run = self._runs[(vm, workload_id)]
        run_dir = f"{WORKLOAD_ROOT}/{workload_id}"
        # tail exits 1 while some files do not exist yet: read whatever is there.
        _, out, _ = self.remote(self.vm_host(vm)).call(
            self.guest_argv(vm, ["tail", "-n", "+1", *(f"{run_dir}/{name}" for name in RUN_FILES)])
        )
        files = parse_run_files(out)
        now = time.time()
        if files.get("start"):
            run.start = float(files["start"])
        if files.get("status"):
            run.exit_status = int(files["status"])
        if files.get("end"):
            run.end = float(files["end"])
        if "output" in files:
            known = len(run.output)
            run.output.extend((now, line) for line in files["output"].splitlines()[known:])
        return run

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        deadline = time.monotonic() + timeout_s
        run = self.workload(vm, workload_id)
        while not run.finished and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            run = self.workload(vm, workload_id)
        return run


class SshGuestDriverBase(RemoteDriverBase):
    """Full-system guests (Xen): a workload reaches its VM by SSH from the VM's PM, at the guest's
    own address (`guest_addresses`: VM name -> address) with the PM's root key (the driver's
    `key_file` is a path on the machine the driver runs on, not on the PM), which the guest
    image authorizes."""

    def __init__(
        self,
        hosts: Sequence[Host],
        key_file: Path,
        guest_addresses: Mapping[str, str] | None = None,
        known_hosts: Path | None = None,
    ) -> None:
        super().__init__(hosts, key_file, known_hosts)
        self.guest_addresses = dict(guest_addresses or {})

    def guest_argv(self, vm: str, argv: Sequence[str]) -> list[str]:
        return ssh_guest_argv(self.guest_addresses[vm], str(PM_ROOT_KEY), argv)


@dataclass
class StreamedMigration:
    """A toolstack's migration command (vzmigrate, xl/xm migrate) as run on the source PM."""

    start: float  # host clock when the command started
    total_s: float = 0.0
    sent_bytes: int = 0  # what the source PM sent meanwhile (all interfaces but lo)
    log: list[tuple[float, str]] = field(default_factory=list)  # (host time, line) as it arrived
    error: str | None = None  # the command's failure; None when it exited 0

    def relative_log(self) -> list[tuple[float, str]]:
        """The log with times in seconds since the start (for a record's details)."""
        return [(round(t - self.start, 3), line) for t, line in self.log]


def stream_migration(remote: Remote, argv: Sequence[str]) -> StreamedMigration:
    """Run a migration command on the source PM, stamping each output line as it arrives and
    counting the PM's sent bytes around it; a failure is kept as the run's error, not raised
    (the VM stays on its source and the record says so)."""
    sent_before = parse_proc_net_dev(remote.run(["cat", "/proc/net/dev"]))
    run = StreamedMigration(start=time.time())
    try:
        run.log.extend(remote.stream(argv))
    except RemoteError as err:
        run.error = str(err)
    run.total_s = time.time() - run.start
    run.sent_bytes = parse_proc_net_dev(remote.run(["cat", "/proc/net/dev"])) - sent_before
    return run


def ssh_guest_argv(address: str, key_file: str, argv: Sequence[str]) -> list[str]:
    """Run argv in a full-system guest (Xen, KVM) from its PM: `ssh` to the guest's address.
    The remote shell receives argv as one shlex-quoted string, each word intact."""
    import shlex

    return [
        "ssh",
        "-i",
        key_file,
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        f"root@{address}",
        "--",
        shlex.join(argv),
    ]


def parse_proc_net_dev(text: str) -> int:
    """Bytes sent by every interface but loopback, from /proc/net/dev (the PM's side of a
    migration's traffic: read before and after, the difference bounds what it sent)."""
    total = 0
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() and name.strip() != "lo":
            total += int(counters.split()[8])  # receive has 8 fields; transmit bytes come first
    return total
