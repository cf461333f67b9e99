"""`testbed run --technique xen` round trip on a fake Xen lab (tests/fake_lab.py with
tests/fake_xen_lab.py): real sshd, chronyd and VM manager on network namespaces of this machine,
only xl and xentop faked; each domain's guest a real sshd at the address the inventory gives it
(testbed_xen_guests, handed to the guest's kernel as `ip=`), started by `xl create`, its
sessions (the workloads) real processes in the domain's cgroups.

What it proves: the runner, the LCs (over SSH, XenSampler reading `xl list`) and the CC drive
the xen driver through its SSH command path end to end on the inventory alone: the domain
configs, the guest disks copied from the image, workloads reaching each guest by SSH from its PM
with the PM's root key, a CC-ordered `xl migrate` run on the source PM. What it cannot prove:
anything of Xen itself (a hypervisor booting that kernel and image, the guest's network on the
bridge, pre-copy's rounds, xl's real output), none of which ever ran here."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_lab import FakeLab, lab_fixture, round_trip
from fake_xen_lab import ADDRESSES, XEN

from testbed.lab import reachable

fake_lab = lab_fixture(XEN)


@pytest.mark.lab
@pytest.mark.slow
def test_testbed_run_drives_exp1_on_fake_xen_pms_with_a_cc_ordered_precopy(fake_lab: FakeLab, tmp_path: Path) -> None:
    """The runner writes each domain's config to its PM's /etc/xen/testbed over SFTP, copies the
    guest image to the VM's disk and runs `xl create`, which starts the guest at its inventory
    address; Synthetic1 starts in each guest over SSH from its PM; the LCs sample `xl list` over
    SSH and the CC orders a pre-copy migration, which the source PM's LC runs with `xl migrate`
    (pause, the domain's record to the destination over SSH with the PM's root key, unpause
    there), the guest answering at the same address after it. Then the CSVs, `testbed plot` and
    `testbed report`, and no domain, guest nor process left."""
    trip = round_trip(fake_lab, tmp_path, "precopy")
    for m in trip.completed:  # xl does not report the pause
        assert m["downtime_s"] == "" and float(m["total_time_s"]) > 0, m
    for record in trip.records:  # xl migrate ran on the source PM, its messages streamed back
        log = [line for _, line in record["details"]["log"]]
        assert record["details"]["toolstack"] == "xl" and set(record["phases"]) == {"migrate"}, record
        assert "migration sender: Target has acknowledged transfer." in log and log[-1] == "Migration successful.", log
    root = fake_lab.root
    for vm, address in ADDRESSES.items():
        guest = root / "hosts" / f"fk-g{vm.removeprefix('vm')}"
        # the workloads ran in the guest (its own /var/tmp is its sessions' alone) and ended well
        statuses = [p.read_text().strip() for p in (guest / "vartmp/testbed-workloads").glob("*/status")]
        assert statuses and set(statuses) == {"0"}, (vm, statuses)
        assert not reachable(address), f"{vm}'s guest still answers at {address} after xl destroy"
    for pm in fake_lab.pms:  # the driver's configs on the PMs' own /etc/xen, its disks on the share
        assert sorted(p.name for p in (root / "hosts" / pm / "xen" / "testbed").glob("*.cfg")) == []
    disks = sorted(p.name for p in (root / "varlib" / "shared").glob("*/disks/*.img"))
    assert disks and set(disks) <= {f"{vm}.img" for vm in ADDRESSES}, disks
