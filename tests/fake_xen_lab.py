"""The fake lab's Xen toolstack (tests/fake_lab.py, tests/fakes/xen/fakexl): xl and xentop in
PATH, the guests' kernel and image where the inventory says (under /var/lib/testbed, the fake
PMs' own), /etc/xen per PM (where the driver writes its domain configs), and one guest host
(a network namespace whose sshd `xl create` starts) per address of testbed_xen_guests."""

from __future__ import annotations

import json
from pathlib import Path

from fake_lab import FAKES, Toolstack

VMS = 4
#: The inventory's guests: vm1 at 198.18.1.101, ..., each its own fake guest host fk-g1, ...
ADDRESSES = {f"vm{i}": f"198.18.1.{100 + i}" for i in range(1, VMS + 1)}
IMAGES = "/var/lib/testbed/images/xen"


def _install(root: Path) -> None:
    for tool in ("xl", "xentop"):
        (root / "bin" / tool).symlink_to(FAKES / "xen" / "fakexl")
    images = root / "varlib" / Path(IMAGES).relative_to("/var/lib/testbed")
    images.mkdir(parents=True)
    (images / "vmlinuz").write_text("a fake guest kernel: xl create checks that it is there\n")
    (images / "guest.img").write_text("a fake guest image: each VM's disk is a copy\n")
    (root / "guests.json").write_text(json.dumps({address: f"fk-g{vm.removeprefix('vm')}"
                                                  for vm, address in ADDRESSES.items()}))


XEN = Toolstack(
    "xen", _install, records="domains",
    settings={"testbed_xen_kernel": f"{IMAGES}/vmlinuz", "testbed_xen_image": f"{IMAGES}/guest.img",
              "testbed_xen_guests": ADDRESSES},
    guests={f"fk-g{vm.removeprefix('vm')}": address for vm, address in ADDRESSES.items()},
    mount_points=("/etc/xen",),
)
