"""Which techniques a lab runs, and their drivers as the runner and the Local Controllers make them.

The embedded lab runs its own techniques (qemu and container, `techniques.EMBEDDED`), every one
at once: their drivers are made from the PMs alone. A real lab runs the one technique its PMs
were provisioned with (the inventory's `testbed_technique`), and `testbed run` drives it there
only if the catalogue has a real-lab driver for it (`techniques.REAL_RUNNABLE`: kvm, openvz and
xen, their toolstacks over SSH, with what else the inventory tells the driver: the catalogue's
`driver_options`). That driver reaches the PMs as root over SSH, so it is made with a key and the
PMs' known host keys: on Ansible's machine (the runner) the inventory's own
(`ansible_ssh_private_key_file`, `testbed_known_hosts`: `Lab.ssh_key`, `Lab.known_hosts`); on a PM
(its Local Controller) the PM's root key, which the libvirt role authorizes on every PM (itself
included) for peer-to-peer migration, and root's known_hosts, which the same role fills.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.errors import InputError
from testbed.techniques import EMBEDDED, REAL_RUNNABLE, make_driver, technique

if TYPE_CHECKING:
    from testbed.drivers.base import Driver
    from testbed.lab import Lab

#: A PM's root key (roles/libvirt/tasks/peers.yml), with which its LC's driver reaches the PMs.
PM_ROOT_KEY = Path("/root/.ssh/id_ed25519")


def lab_techniques(lab: Lab) -> tuple[str, ...]:
    """The techniques `testbed run` drives on this lab: the embedded lab's own, or the real lab's
    `testbed_technique` if the catalogue has a real-lab driver for it (else none)."""
    if lab.embedded:
        return EMBEDDED
    return (lab.technique,) if lab.technique in REAL_RUNNABLE else ()


def refuse_off_lab(lab: Lab, techniques: Sequence[str], where: str) -> None:
    """InputError (before any host is touched) for a technique this lab does not run."""
    runs = lab_techniques(lab)
    for name in techniques:
        if name in runs:
            continue
        if lab.embedded:
            raise InputError(f"{where}: techniques: {name!r} runs on a real lab whose PMs run it (testbed_technique: "
                             f"{name}), not on the embedded lab (it runs {', '.join(runs)}; use --technique)")
        if lab.technique == name:
            raise InputError(f"{where}: techniques: {name!r} is not driven on a real lab yet (`testbed run` drives "
                             f"{', '.join(REAL_RUNNABLE)} there)")
        raise InputError(f"{where}: techniques: {name!r} does not run on {lab.inventory}, whose PMs run "
                         f"{lab.technique or 'no technique'} (testbed_technique; use --technique)")


def lab_drivers(lab: Lab, techniques: Sequence[str] | None = None, *, key_file: Path | None = None,
                known_hosts: Path | None = None) -> dict[str, Driver]:
    """{technique: driver} over the lab's PMs for `techniques` (default: `lab_techniques(lab)`).
    A real lab's driver reaches the PMs with `key_file` and `known_hosts` (default: the
    inventory's, `lab.ssh_key` and `lab.known_hosts`: what this machine logs in with)."""
    from testbed.drivers.base import pm_hosts

    hosts = pm_hosts(lab)
    names = lab_techniques(lab) if techniques is None else tuple(techniques)
    if lab.embedded:
        return {name: make_driver(name, hosts) for name in names}
    key = key_file or lab.ssh_key
    known = known_hosts if key_file is not None else known_hosts or lab.known_hosts
    return {name: make_driver(name, hosts, key_file=key, known_hosts=known,
                              options=technique(name).driver_options(lab)) for name in names}
