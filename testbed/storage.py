"""Where VM disks and container roots live: the VM disk area spread over the PMs (thesis §4.2).

As in the thesis' lab, each PM holds a share of the VM disk area and every PM reaches all of it,
so a VM runs on one PM with its files on another and migration never copies a disk. The
vm_storage role builds this layout (its defaults name the same directories as StorageLayout):

    <root>/<pm>/disks/<vm>.qcow2       QEMU disk images, opened over nfs://<pm address>/...
    <root>/<pm>/roots/<vm>/            container root file systems
    <mount_root>/<pm>/<owner>/         where <pm> reaches <owner>'s share (its own: a symlink)

Each PM serves its share over NFS (ganesha on the embedded lab, the kernel server on real labs);
QEMU's nfs:// block driver is a user-space client, so disk URLs work on both. Container roots
need a mounted file system: sshfs on the embedded lab (no kernel NFS client), NFSv4 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from testbed.lab import Lab

STORAGE_ROOT = PurePosixPath("/var/lib/testbed/storage")
MOUNT_ROOT = PurePosixPath("/var/lib/testbed/mnt")


@dataclass(frozen=True)
class StorageLayout:
    """The VM disk area's directories (the vm_storage role's vm_storage_root/_mount_root)."""

    root: PurePosixPath = STORAGE_ROOT
    mount_root: PurePosixPath = MOUNT_ROOT

    def share(self, owner_pm: str) -> PurePosixPath:
        """The owner's share on its own file system, which is also the path its NFS server exports."""
        return self.root / _name("pm", owner_pm)

    def disk(self, vm_name: str, owner_pm: str) -> PurePosixPath:
        """A VM's disk image in its owner's share (the path within the export)."""
        return self.share(owner_pm) / "disks" / f"{_name('vm', vm_name)}.qcow2"

    def reach(self, pm: str, owner_pm: str) -> PurePosixPath:
        """Where `pm` sees `owner_pm`'s share (a mount of it, or a symlink to its own)."""
        return self.mount_root / _name("pm", pm) / _name("pm", owner_pm)

    def container_root(self, vm_name: str, owner_pm: str, on_pm: str) -> PurePosixPath:
        """A container's root file system as seen from the PM it runs on."""
        return self.reach(on_pm, owner_pm) / "roots" / _name("vm", vm_name)


DEFAULT_LAYOUT = StorageLayout()


def disk_url(lab: Lab, vm_name: str, owner_pm: str, layout: StorageLayout = DEFAULT_LAYOUT) -> str:
    """The nfs:// URL QEMU opens a VM's disk with, from any PM: `nfs://198.18.0.12/.../vm1.qcow2`."""
    try:
        owner = lab.host(owner_pm)
    except KeyError:
        raise ValueError(f"{owner_pm!r} is not a host of the lab") from None
    if owner.role != "pm":
        raise ValueError(f"{owner_pm} is the {owner.role}, not a PM: it holds no VM disks")
    return f"nfs://{owner.address}{layout.disk(vm_name, owner_pm)}"


#: qemu-img options of every VM disk. The image is born at its full size (preallocated metadata:
#: L2 tables for the whole disk; with a backing file, extended L2 marks every subcluster
#: unallocated, so reads still fall through to the backing file) and never grows. QEMU's nfs://
#: driver reads a file's length once, when it opens it, and never again (block/nfs.c has no
#: getlength), and the block layer returns zeros past that length: a migration's destination
#: opens the disk when it starts, so whatever the source appended during a pre-copy read as zeros
#: there. Measured here: 24 MB written and fsynced by a kernel guest during a pre-copy read back
#: as zeros on the destination (docs/DESIGN.md, "Known facts").
DISK_OPTIONS = ("-o", "extended_l2=on,preallocation=metadata")


def create_disk_argv(url: str, size: str | None = None, backing: str | None = None) -> list[str]:
    """The qemu-img command that creates a VM disk at `url` (nfs:// or a path): blank of `size`,
    or an overlay of the qcow2 `backing` (the backing file's size)."""
    if (size is None) == (backing is None):
        raise ValueError("a VM disk has either a size or a backing file")
    tail = [size] if size is not None else []
    over = ["-b", backing, "-F", "qcow2"] if backing is not None else []
    return ["qemu-img", "create", "-q", "-f", "qcow2", *DISK_OPTIONS, *over, url, *tail]


def spread(vm_names: Sequence[str], pms: Sequence[str]) -> dict[str, str]:
    """Owner PM of each VM's files, spread evenly in turn (thesis: 9 VMs on 3 PMs, 3 each)."""
    if not pms:
        raise ValueError("no PMs to hold the VMs' files")
    return {vm: pms[i % len(pms)] for i, vm in enumerate(vm_names)}


def _name(kind: str, name: str) -> str:
    """A name used as one path component: it must not climb or split the layout."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{kind} name {name!r} cannot name a directory")
    return name
