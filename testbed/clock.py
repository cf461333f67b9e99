"""Each lab host's clock offset to the lab's time server, as the host's own chronyd measures it.

The ntp role runs chronyd on every host: the controller serves the lab's time, the PMs follow
it (thesis App. B.4: a VM migrated to a host whose clock was behind ran extremely slowly). On
the embedded lab all hosts share one kernel clock, so the PMs' chronyds run with -x: they
measure their offset to the server and never adjust the clock; on real labs they discipline it.
Either way the reading is `chronyc -c tracking` against the host's chronyd on its loopback,
run over SSH on the host, exactly as on a real lab.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from testbed.drivers.ssh import ssh_client
from testbed.lab import Lab, LabHost

#: Monitoring queries are allowed from the host's loopback by default, on every lab kind.
TRACKING_COMMAND = ("chronyc", "-h", "127.0.0.1", "-n", "-c", "tracking")
SSH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Tracking:
    """A host's chronyd's view of its clock (one `chronyc -c tracking` line)."""

    host: str
    reference: str  # address of the source it follows; "" for a server on its own clock
    stratum: int
    offset: float  # seconds the host clock is ahead of its reference (negative: behind)
    leap_status: str  # "Normal" once synchronised, "Not synchronised" before

    @property
    def synchronised(self) -> bool:
        return self.leap_status != "Not synchronised"


def parse_tracking(host: str, line: str) -> Tracking:
    """Read chronyc's CSV tracking report (chrony 4: 14 fields, leap status last).

    Field 5 is chrony's correction, NTP time minus system time ("slow" when positive); the
    offset reported here is its negation, so a host whose clock is ahead has a positive offset.
    """
    fields = line.strip().split(",")
    if len(fields) != 14:
        raise ValueError(f"{host}: not a chronyc tracking line: {line!r}")
    return Tracking(
        host=host,
        reference=fields[1],
        stratum=int(fields[2]),
        offset=0.0 - float(fields[4]),  # (not -x: a server's 0 stays 0.0, not -0.0)
        leap_status=fields[13],
    )


def tracking(lab: Lab) -> dict[str, Tracking]:
    """Every host's tracking report, read from its chronyd over SSH (hosts in parallel: an SSH
    login costs up to a second on a busy embedded lab)."""
    with ThreadPoolExecutor(max_workers=len(lab.hosts)) as pool:
        lines = pool.map(lambda host: _run(lab, host, TRACKING_COMMAND), lab.hosts)
        return {
            host.name: parse_tracking(host.name, line) for host, line in zip(lab.hosts, lines, strict=True)
        }


def clock_offsets(lab: Lab) -> dict[str, float]:
    """Seconds each host's clock is ahead of the source it follows (the controller, for a PM)."""
    return {name: report.offset for name, report in tracking(lab).items()}


def _run(lab: Lab, host: LabHost, argv: tuple[str, ...]) -> str:
    """Run a command on a lab host as root with the lab key; its stdout, or an error with stderr."""
    with ssh_client(lab.known_hosts) as client:
        client.connect(
            host.address,
            username="root",
            key_filename=str(lab.ssh_key),
            timeout=SSH_TIMEOUT_S,
            allow_agent=False,
            look_for_keys=False,
        )
        _, stdout, stderr = client.exec_command(shlex.join(argv), timeout=SSH_TIMEOUT_S)
        out = stdout.read().decode()
        if stdout.channel.recv_exit_status() != 0:
            raise RuntimeError(f"{host.name}: {shlex.join(argv)} failed: {stderr.read().decode().strip()}")
        return out
