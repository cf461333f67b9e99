"""Boot snapshots: a QEMU guest saved right after a fresh boot, so that later VMs start from it.

A guest of one image, memory size and vCPU count, booted with a blank disk of one size, always
reaches the same state: its init waiting on the console. Saving that state once (QEMU's own
migration, to a file) and starting later VMs from it (`migrate-incoming` from the file) gives each
run the clean VM a boot gives, in about a second: under TCG, seven boots one after another on a
0.6-CPU PM took about four minutes of every unbalanced run. Nothing in an experiment's measurement
depends on how its VMs came to be running; each still gets its own QEMU process, disk and cgroups.

The key holds everything the guest could have seen at boot: the image's inputs, the accelerator,
the QEMU binary, memory (with the driver's padding), vCPUs and the disk's virtual size. A disk with a backing file (a root file
system the guest mounts at boot) or one with data written is not blank: such VMs always boot.

A snapshot is a cache, and a damaged one must never be used nor kept (issue #13: three PMs booting
at once once wrote one file together, and every later run failed restoring it). So:
- QEMU writes the state itself into a file descriptor of ours (`getfd` + `fd:` migration, no `cat`
  in between): when `query-migrate` says `completed`, every byte has been written; we fsync it;
- each save writes its own temporary file, and only one save per key runs at a time (a lock file
  per key, taken without waiting: the others simply boot, first one wins);
- the file is published by rename after its SHA-256 (a `.sha256` file beside it), and a restore
  reads it through one descriptor that it first checks against that digest;
- whatever goes wrong in a restore, the caller discards the snapshot and boots instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from qemu.qmp import QMPClient

from testbed.results import write_atomic

FORMAT = 2  # bump when what a snapshot holds changes in a way the key cannot see
SUFFIX = ".state"
_FD_NAME = "boot-snapshot"
_CHUNK = 1 << 20


def snapshot_dir(image_dir: Path) -> Path:
    """Where the boot snapshots of the image in `image_dir` are kept."""
    return image_dir / "boot-snapshots"


class SnapshotError(RuntimeError):
    """A boot snapshot could not be saved."""


@dataclass(frozen=True)
class BootSnapshots:
    """The snapshots of one image, kept beside it (shared by the PMs of the embedded lab)."""

    image_dir: Path
    accel: str
    qemu: str
    ram_pad_kib: int = 0  # KiB the driver adds to every guest's RAM (testbed.drivers.qemu)
    #: Files already checked against their digest, by (path, inode, size, mtime): a published
    #: snapshot is never rewritten in place (a new one is a new inode), so one check suffices.
    _verified: set[tuple[str, int, int, int]] = field(default_factory=set, compare=False, repr=False)
    _verified_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def directory(self) -> Path:
        return snapshot_dir(self.image_dir)

    def path_for(self, memory_mb: int, vcpus: int, disk: str) -> Path | None:
        """Where the snapshot of such a VM is (or would be); None when it must boot."""
        size = _blank_disk_size(disk)
        if size is None:
            return None
        key = json.dumps([FORMAT, self._image_id(), self.accel, self._qemu_id(), memory_mb, self.ram_pad_kib,
                          vcpus, size])
        name = f"{self._image_id()[:12]}-{memory_mb}m-{vcpus}c-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return self.directory / f"{name}{SUFFIX}"

    async def save(self, qmp: QMPClient, dest: Path) -> bool:
        """Save the running guest of `qmp` as `dest` (stop, migrate into a file, continue) unless
        another save of this key runs or has published it; True when this call published it.
        Snapshots of other images are removed, as nothing can use them any more."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with _first_of_key(dest) as ours:
            if not ours or dest.exists():
                return False
            self._remove_abandoned()
            handle, name = tempfile.mkstemp(dir=self.directory, prefix=f"{dest.name}.{os.getpid()}.",
                                            suffix=".partial")
            partial = Path(name)
            try:
                with os.fdopen(handle, "w+b") as out:
                    await _migrate_into(qmp, out.fileno())
                    os.fsync(out.fileno())
                    digest = _sha256(out)
                write_atomic(_digest_path(dest), f"{digest}  {dest.name}\n")
                partial.replace(dest)  # a rename lost to a power cut leaves no snapshot: VMs boot
            finally:
                partial.unlink(missing_ok=True)
        self._remove_other_images()
        return True

    def open_verified(self, path: Path) -> BinaryIO | None:
        """The snapshot at `path` opened for reading, checked against its digest; None when there
        is none, and None (the snapshot discarded) when it does not match."""
        try:
            stream = path.open("rb")
        except FileNotFoundError:
            return None
        stat = os.fstat(stream.fileno())
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._verified_lock:
            known = key in self._verified
        if not known:
            if _sha256(stream) != _recorded_digest(path):
                stream.close()
                self.discard(path, stat.st_ino)
                return None
            with self._verified_lock:
                self._verified.add(key)
        stream.seek(0)
        return stream

    def discard(self, path: Path, inode: int) -> None:
        """Remove the snapshot at `path` if it is still the file `inode` (another thread may have
        published a good one since), with its digest."""
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino != inode:
                return
            path.unlink()
        _digest_path(path).unlink(missing_ok=True)

    def _remove_abandoned(self) -> None:
        """Temporary files of saves whose process is gone (killed mid-save)."""
        for partial in self.directory.glob("*.partial"):
            pid = partial.name.split(".")[-3]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                partial.unlink(missing_ok=True)

    def _remove_other_images(self) -> None:
        prefix = self._image_id()[:12]
        for other in self.directory.glob(f"*{SUFFIX}"):
            if not other.name.startswith(prefix):
                other.unlink(missing_ok=True)
                _digest_path(other).unlink(missing_ok=True)

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


async def pass_fd(qmp: QMPClient, fd: int) -> str:
    """Hand QEMU a copy of descriptor `fd` (SCM_RIGHTS + `getfd`); the `fd:` migration URI that
    names it. QEMU closes its copy when the migration ends; `fd` stays the caller's."""
    qmp.send_fd_scm(fd)
    await qmp.execute("getfd", {"fdname": _FD_NAME})
    return f"fd:{_FD_NAME}"


async def _migrate_into(qmp: QMPClient, fd: int) -> None:
    """QEMU's migration stream of the stopped guest, written by QEMU itself into `fd`."""
    uri = await pass_fd(qmp, fd)
    await qmp.execute("stop")
    try:
        await qmp.execute("migrate", {"uri": uri})
        while (info := await qmp.execute("query-migrate")).get("status") not in ("completed", "failed",
                                                                                   "cancelled"):
            await asyncio.sleep(0.02)
    finally:
        await qmp.execute("cont")
    if info["status"] != "completed":
        raise SnapshotError(f"saving the boot snapshot: {info.get('error-desc', info['status'])}")


@contextlib.contextmanager
def _first_of_key(dest: Path) -> Iterator[bool]:
    """Hold the key's lock if nobody else does (an flock, so threads of one process exclude each
    other too); yields False at once when another save holds it."""
    with open(dest.with_name(dest.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(stream: BinaryIO) -> str:
    stream.seek(0)
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _digest_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + ".sha256")


def _recorded_digest(snapshot: Path) -> str | None:
    try:
        return _digest_path(snapshot).read_text().split()[0]
    except (FileNotFoundError, IndexError):
        return None


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
