"""`testbed run --technique openvz` round trip on a fake OpenVZ lab (tests/fake_lab.py with
tests/fake_openvz_lab.py):
real sshd, chronyd and VM manager on network namespaces of this machine, only vzctl, vzlist,
vzmigrate-shared and /proc/vz/vestat faked, the containers' processes real (cgroups here).

What it proves: the runner, the LCs (over SSH, the 2010 profile's way) and the CC drive the
openvz driver through its SSH command path end to end, on the inventory alone, as on a real
lab. What it cannot prove: anything of a real OpenVZ kernel (its vzctl, checkpointing, vestat
figures), none of which ever ran here."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_lab import FakeLab, lab_fixture, round_trip
from fake_openvz_lab import OPENVZ

fake_lab = lab_fixture(OPENVZ)


@pytest.mark.lab
@pytest.mark.slow
def test_testbed_run_drives_exp1_on_fake_openvz_pms_with_a_cc_ordered_stop_and_copy(
    fake_lab: FakeLab, tmp_path: Path
) -> None:
    """The runner creates the containers by layout with vzctl over SSH (their guest program copied
    from the PM into each private area), starts Synthetic1 in them with `vzctl exec2`, the LCs
    sample vestat and vzlist over SSH and the CC orders a stop-and-copy migration, which fk-pm1's
    LC runs with vzmigrate-shared on fk-pm1 (freeze, the dump sent to fk-pm2 over SSH, undump and
    resume there); the token is the one the controller holds, read over SSH. Then the CSVs,
    `testbed plot` and `testbed report`, and no container nor process left."""
    trip = round_trip(fake_lab, tmp_path, "stopcopy")
    for m in trip.completed:  # the container is suspended for the whole move
        assert 0 < float(m["downtime_s"]) <= float(m["total_time_s"]), m
    # the LC ran vzmigrate-shared on the source PM: its messages are the record's phases
    for record in trip.records:
        assert {"suspend", "dump", "copy_dump", "undump", "resume"} <= set(record["phases"]), record
        assert [line for _, line in record["details"]["log"]][-1] == "Cleaning up", record
