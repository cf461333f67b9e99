"""Time sync: the ntp role's chronyds and testbed.clock's reading of them.

The lab tests use the embedded lab as site.yml provisions it (ntp.yml included) and check what
the thesis needed (App. B.4): every PM follows the controller, within a small bound of its clock.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.clock import Tracking, clock_offsets, parse_tracking, tracking
from testbed.lab import Lab

# Captured from a client chronyd (-x) of the embedded lab: 2.659 µs slow of NTP time.
CLIENT_LINE = (
    "C612000A,198.18.0.10,11,1795950342.771917725,0.000002659,0.000000098,0.000001953,"
    "-0.267,0.006,4.038,0.000030922,0.000008844,1.0,Normal"
)
SERVER_LINE = (
    "7F7F0101,,10,1795950336.000000000,0.000000000,0.000000000,0.000000000,"
    "0.000,0.000,0.000,0.000000000,0.000000000,0.0,Normal"
)
UNSYNCED_LINE = (
    "00000000,,0,0.000000000,0.000000001,0.000000000,0.000000000,"
    "-0.003,0.000,0.000,1.000000000,1.000000000,0.0,Not synchronised"
)

# One shared kernel clock: what is measured is the measurement's own error (µs when idle), far
# below the bound; a host whose chronyd does not follow the server fails the test anyway.
OFFSET_BOUND_S = 0.01


def test_parse_tracking_reads_reference_stratum_and_offset_sign() -> None:
    report = parse_tracking("tb-pm1", CLIENT_LINE)
    assert report == Tracking("tb-pm1", "198.18.0.10", 11, -0.000002659, "Normal")
    assert report.synchronised


def test_parse_tracking_server_and_unsynchronised() -> None:
    assert parse_tracking("tb-ctl", SERVER_LINE).reference == ""
    assert not parse_tracking("tb-pm1", UNSYNCED_LINE).synchronised


@pytest.mark.parametrize("line", ["", "506 Cannot talk to daemon", CLIENT_LINE + ",extra"])
def test_parse_tracking_rejects_other_output(line: str) -> None:
    with pytest.raises(ValueError, match="tb-pm1"):
        parse_tracking("tb-pm1", line)


@pytest.mark.lab
def test_every_pm_follows_the_controller_within_bound(embedded_lab: Lab) -> None:
    reports = tracking(embedded_lab)
    server = reports[embedded_lab.controller.name]
    assert server.synchronised and server.reference == "" and server.stratum == 10
    for pm in embedded_lab.pms:
        report = reports[pm.name]
        assert report.synchronised, report
        assert report.reference == embedded_lab.controller.address, report
        assert report.stratum == server.stratum + 1, report
        assert abs(report.offset) < OFFSET_BOUND_S, report
    offsets = clock_offsets(embedded_lab)
    assert set(offsets) == {host.name for host in embedded_lab.hosts}
    print("clock offsets (s):", {name: f"{offset:+.2e}" for name, offset in offsets.items()})


@pytest.mark.lab
def test_each_chronyd_lives_in_its_hosts_namespace_and_cgroup(embedded_lab: Lab) -> None:
    for host in embedded_lab.hosts:
        pid = (embedded_lab.state_dir / "hosts" / host.name / "chrony" / "chronyd.pid").read_text().strip()
        proc = Path("/proc") / pid
        assert (proc / "comm").read_text().strip() == "chronyd"
        assert os.stat(proc / "ns" / "net").st_ino == os.stat(Path("/run/netns") / host.name).st_ino
        assert f"cpu:/testbed/{host.name}\n" in (proc / "cgroup").read_text()
        # Embedded hosts share the machine's clock: chronyd must leave it alone.
        assert b"-x" in (proc / "cmdline").read_bytes().split(b"\0")
