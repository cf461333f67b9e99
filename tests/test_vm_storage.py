"""The VM disk area: testbed.storage's layout and the vm_storage role's shares, for real.

The lab tests use the embedded lab as site.yml provisions it (vm_storage.yml included) the way
the drivers will: QEMU on one PM opens a disk held by another PM over nfs://, and every PM reads,
through its sshfs mounts, files the owner PMs wrote in their shares.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from testbed.lab import Lab, LabHost
from testbed.storage import DEFAULT_LAYOUT, StorageLayout, create_disk_argv, disk_url, spread

ROLE_DEFAULTS = Path(__file__).resolve().parent.parent / "roles" / "vm_storage" / "defaults" / "main.yml"


def _lab() -> Lab:
    hosts = (
        LabHost("tb-ctl", "controller", "198.18.0.10", 0.6, 4, "100mbit"),
        LabHost("tb-pm1", "pm", "198.18.0.11", 0.6, 4, "100mbit"),
        LabHost("tb-pm2", "pm", "198.18.0.12", 0.6, 4, "100mbit"),
    )
    return Lab(
        Path("inventory/local"), hosts, "198.18.0.0/24", "198.18.0.1", True, Path("/var/lib/testbed/lab")
    )


def test_layout_matches_the_roles_defaults() -> None:
    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text())
    assert str(DEFAULT_LAYOUT.root) == defaults["vm_storage_root"]
    assert str(DEFAULT_LAYOUT.mount_root) == defaults["vm_storage_mount_root"]


def test_disk_url_points_at_the_owner_pms_export() -> None:
    url = disk_url(_lab(), "vm1", "tb-pm2")
    assert url == "nfs://198.18.0.12/var/lib/testbed/storage/tb-pm2/disks/vm1.qcow2"


def test_paths_seen_from_each_pm() -> None:
    layout = StorageLayout(PurePosixPath("/srv/s"), PurePosixPath("/srv/m"))
    assert layout.reach("tb-pm1", "tb-pm2") == PurePosixPath("/srv/m/tb-pm1/tb-pm2")
    assert layout.container_root("ct3", "tb-pm2", "tb-pm1") == PurePosixPath("/srv/m/tb-pm1/tb-pm2/roots/ct3")


@pytest.mark.parametrize(
    ("vm", "owner"), [("vm1", "tb-ctl"), ("../vm1", "tb-pm1"), ("vm1", ".."), ("", "tb-pm1")]
)
def test_disk_url_rejects_what_cannot_hold_a_disk(vm: str, owner: str) -> None:
    with pytest.raises(ValueError):
        disk_url(_lab(), vm, owner)


def test_spread_gives_each_pm_an_equal_share() -> None:
    owners = spread([f"vm{i}" for i in range(1, 10)], ["tb-pm1", "tb-pm2", "tb-pm3"])
    assert [list(owners.values()).count(pm) for pm in ("tb-pm1", "tb-pm2", "tb-pm3")] == [3, 3, 3]
    with pytest.raises(ValueError):
        spread(["vm1"], [])


def on(lab: Lab, host: LabHost, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command on a lab host over its sshd: in the host's namespace and cgroups."""
    ssh = [
        "ssh",
        "-i",
        str(lab.ssh_key),
        "-o",
        f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        "BatchMode=yes",
        f"root@{host.address}",
    ]
    return subprocess.run(
        [*ssh, shlex.join(argv)], input=stdin, capture_output=True, text=True, timeout=60, check=True
    )


@pytest.mark.lab
def test_qemu_on_one_pm_writes_and_reads_a_disk_held_by_another(embedded_lab: Lab) -> None:
    user, owner = embedded_lab.pms[0], embedded_lab.pms[1]
    vm = f"test-{secrets.token_hex(4)}"
    url = disk_url(embedded_lab, vm, owner.name)
    local = Path(str(DEFAULT_LAYOUT.disk(vm, owner.name)))
    try:
        on(embedded_lab, user, "qemu-img", "create", "-q", "-f", "qcow2", url, "64M")
        written = on(embedded_lab, user, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 32M", url)
        assert "wrote 33554432/33554432 bytes" in written.stdout
        print(f"qemu-io over nfs:// from {user.name} to {owner.name}'s share: {written.stdout.strip()}")
        # -P makes qemu-io compare what it reads with the pattern (a mismatch fails the command).
        read = on(embedded_lab, user, "qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 1M", url)
        assert "read 1048576/1048576 bytes" in read.stdout
        # The image lives in the owner's share, where the owner's NFS server keeps it.
        assert local.read_bytes()[:4] == b"QFI\xfb"
    finally:
        local.unlink(missing_ok=True)


@pytest.mark.lab
def test_every_pm_reaches_every_share(embedded_lab: Lab) -> None:
    token = secrets.token_hex(8)
    name = f"test-{token}"
    pms = embedded_lab.pms
    try:
        for owner in pms:  # each owner PM writes a file in its own share
            on(
                embedded_lab,
                owner,
                "tee",
                str(DEFAULT_LAYOUT.share(owner.name) / "roots" / name),
                stdin=token,
            )
        for pm in pms:  # and every PM reads all of them where it reaches the shares
            seen = [str(DEFAULT_LAYOUT.reach(pm.name, owner.name) / "roots" / name) for owner in pms]
            assert on(embedded_lab, pm, "cat", *seen).stdout == token * len(pms)
            table = on(
                embedded_lab, pm, "findmnt", "--raw", "--noheadings", "--output", "TARGET,FSTYPE"
            ).stdout
            mounts = dict(line.split(" ", 1) for line in table.splitlines())
            for owner in pms:
                if owner != pm:
                    assert mounts[str(DEFAULT_LAYOUT.reach(pm.name, owner.name))] == "fuse.sshfs"
    finally:
        for owner in pms:
            Path(str(DEFAULT_LAYOUT.share(owner.name) / "roots" / name)).unlink(missing_ok=True)


def _sshfs_mounting_for(pm: str) -> list[Path]:
    """/proc entries of the sshfs processes that serve `pm`'s mounts of the other shares."""
    mine = f"{DEFAULT_LAYOUT.mount_root / pm}/".encode()
    return [
        proc
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit() and _comm(proc) == "sshfs" and mine in (proc / "cmdline").read_bytes()
    ]


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:  # gone meanwhile
        return ""


@pytest.mark.lab
def test_each_pms_storage_daemons_live_in_its_namespace_and_cgroup(embedded_lab: Lab) -> None:
    for pm in embedded_lab.pms:
        pid = (embedded_lab.state_dir / "hosts" / pm.name / "ganesha" / "ganesha.pid").read_text().strip()
        ganesha = Path("/proc") / pid
        assert _comm(ganesha) == "ganesha.nfsd"
        sshfs = _sshfs_mounting_for(pm.name)
        assert len(sshfs) == len(embedded_lab.pms) - 1
        for proc in (ganesha, *sshfs):
            assert os.stat(proc / "ns" / "net").st_ino == os.stat(Path("/run/netns") / pm.name).st_ino
            assert f"cpu:/testbed/{pm.name}\n" in (proc / "cgroup").read_text()


def test_a_vm_disk_is_born_at_its_full_size(tmp_path: Path) -> None:
    """QEMU's nfs:// driver never rereads a file's length, so a disk that grew during a pre-copy
    read as zeros past its old end on the destination: every VM disk is created at its full size
    (preallocated metadata), an overlay still reading its backing file where it wrote nothing."""
    backing = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(backing), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 64k", str(backing)], check=True, capture_output=True)
    overlay, blank = tmp_path / "vm.qcow2", tmp_path / "blank.qcow2"
    subprocess.run(create_disk_argv(str(overlay), backing=str(backing)), check=True)
    subprocess.run(create_disk_argv(str(blank), size="64M"), check=True)
    assert overlay.stat().st_size >= 64 << 20 and blank.stat().st_size >= 64 << 20
    read = subprocess.run(["qemu-io", "-c", "read -P 0x5a 1M 64k", str(overlay)], capture_output=True, text=True,
                          check=False)
    assert "Pattern verification failed" not in read.stdout and read.returncode == 0, read.stdout
    size = overlay.stat().st_size
    subprocess.run(["qemu-io", "-c", "write -P 0x33 40M 1M", str(overlay)], check=True, capture_output=True)
    assert overlay.stat().st_size == size  # a write does not grow it
    with pytest.raises(ValueError, match="either a size or a backing file"):
        create_disk_argv(str(overlay))
