"""Boot snapshots: a QEMU guest saved right after a fresh boot, so that later VMs start from it.

A guest of one image, memory size and vCPU count, booted with a blank disk of one size, always
reaches the same state: its init waiting on the console. Saving that state once (QEMU's own
migration, to a file) and starting later VMs from it (`migrate-incoming` from the file) gives each
run the clean VM a boot gives, in about a second: under TCG, seven boots one after another on a
0.6-CPU PM took about four minutes of every unbalanced run. Nothing in an experiment's measurement
depends on how its VMs came to be running; each still gets its own QEMU process, disk and cgroups.

The key holds everything the guest could have seen at boot: the image's inputs, the accelerator,
the QEMU binary, memory, vCPUs and the disk's virtual size. A disk with a backing file (a root file
system the guest mounts at boot) or one with data written is not blank: such VMs always boot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

FORMAT = 1  # bump when what a snapshot holds changes in a way the key cannot see
SUFFIX = ".state"


@dataclass(frozen=True)
class BootSnapshots:
    """The snapshots of one image, kept beside it (shared by the PMs of the embedded lab)."""

    image_dir: Path
    accel: str
    qemu: str

    @property
    def directory(self) -> Path:
        return self.image_dir / "boot-snapshots"

    def path_for(self, memory_mb: int, vcpus: int, disk: str) -> Path | None:
        """Where the snapshot of such a VM is (or would be); None when it must boot."""
        size = _blank_disk_size(disk)
        if size is None:
            return None
        key = json.dumps([FORMAT, self._image_id(), self.accel, self._qemu_id(), memory_mb, vcpus, size])
        name = f"{self._image_id()[:12]}-{memory_mb}m-{vcpus}c-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return self.directory / f"{name}{SUFFIX}"

    async def save(self, qmp: QMPClient, dest: Path) -> None:
        """Save the running guest of `qmp` to `dest` (stop, migrate to a file, continue); other
        images' snapshots are removed, as nothing can use them any more."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = dest.with_suffix(f".{os.getpid()}.partial")  # PMs booting at once each write their own
        await qmp.execute("stop")
        try:
            await qmp.execute("migrate", {"uri": f"exec:cat > {partial}"})
            while (info := await qmp.execute("query-migrate")).get("status") not in ("completed", "failed",
                                                                                       "cancelled"):
                await asyncio.sleep(0.02)
        finally:
            await qmp.execute("cont")
        if info["status"] != "completed":
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"saving the boot snapshot: {info.get('error-desc', info['status'])}")
        partial.replace(dest)
        for other in self.directory.glob(f"*{SUFFIX}"):
            if not other.name.startswith(self._image_id()[:12]):
                other.unlink(missing_ok=True)

    def _image_id(self) -> str:
        """The image's own fingerprint of its inputs (the qemu role's build-guest.sh writes it)."""
        try:
            return (self.image_dir / "inputs.sha256").read_text().split()[0]
        except (FileNotFoundError, IndexError):
            return "unknown-image"

    def _qemu_id(self) -> str:
        binary = shutil.which(self.qemu)
        if binary is None:
            return "no-qemu"
        stat = Path(binary).stat()
        return f"{Path(binary).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _blank_disk_size(disk: str) -> int | None:
    """The virtual size of a disk that holds no data (no backing file, nothing written), else None."""

    def query(*argv: str) -> object:
        proc = subprocess.run(["qemu-img", *argv, "--output=json", disk], capture_output=True, text=True,
                              timeout=60, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    info = query("info")
    if not isinstance(info, dict) or info.get("backing-filename"):
        return None
    extents = query("map")
    if not isinstance(extents, list) or any(extent.get("data") for extent in extents):
        return None
    return int(info["virtual-size"])

