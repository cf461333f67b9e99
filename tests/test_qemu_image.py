"""The guest image build (the qemu role's script) and the cgroup-joining launcher, without a lab."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "roles/qemu/files/build-guest.sh"
INIT = ROOT / "roles/qemu/files/guest-init"


def _build(workloads: Path, out: Path) -> str:
    done = subprocess.run(["bash", str(BUILD), "", str(workloads), str(INIT), str(out)],
                          check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(os.geteuid() != 0, reason="the image holds a /dev/console node (mknod needs root)")
def test_image_is_built_once_and_rebuilt_when_an_input_changes(tmp_path: Path) -> None:
    workloads = tmp_path / "workloads"
    shutil.copytree(ROOT / "workloads", workloads)
    out = tmp_path / "image"
    assert _build(workloads, out) == "changed"
    assert (out / "vmlinux").read_bytes()[:4] == b"\x7fELF"  # uncompressed: QEMU boots it via PVH
    listing = subprocess.run(["cpio", "-it"], stdin=(out / "initramfs.cpio").open("rb"),
                             capture_output=True, text=True, check=True).stdout.split()
    for member in ("init", "bin/busybox", "usr/bin/synthetic1", "usr/bin/memwriter",
                   "lib/modules/virtio_pci.ko", "lib/modules/virtio_blk.ko", "etc/modules.order"):
        assert member in listing
    assert _build(workloads, out) == "unchanged"
    (workloads / "synthetic1.c").write_text((workloads / "synthetic1.c").read_text() + "\n")
    assert _build(workloads, out) == "changed"
    assert _build(workloads, out) == "unchanged"
    (workloads / "workload.h").write_text((workloads / "workload.h").read_text() + "\n")
    assert _build(workloads, out) == "changed"  # a header the workloads include is an input too

    good = (out / "vmlinux").read_bytes()
    with (out / "vmlinux").open("r+b") as damaged:  # a cache damaged after it was built ...
        damaged.truncate(len(good) // 2)
    assert _build(workloads, out) == "changed"  # ... is rebuilt, not reused
    assert (out / "vmlinux").read_bytes() == good
    (out / "outputs.sha256").unlink()  # an image without the record of its outputs is not trusted
    assert _build(workloads, out) == "changed"
    assert _build(workloads, out) == "unchanged"
    assert not list(out.glob("*.new"))

