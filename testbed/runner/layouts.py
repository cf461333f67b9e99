"""Initial placements of VMs on PMs (thesis §4.3, Figs. 4.2-4.3), for any number of VMs and PMs.

A placement is a tuple with, for each VM in order (vm1, vm2, ...), the 1-based index of the PM
it starts on. Named layouts fill PMs with contiguous runs of VMs, as the thesis numbers them:
`balanced` spreads the VMs evenly (9 on 3 PMs: 3/3/3, VMs 1-3 on PM1), `unbalanced` leaves one
VM on every PM but the first and the rest on PM1 (9 on 3: 7/1/1, VMs 1-7 on PM1). A spec can
also give per-PM counts ([7, 1, 1]) or a PM per VM ({vm1: 1, vm2: 2, ...}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

NAMED_LAYOUTS = ("balanced", "unbalanced")

#: What a spec may give as a layout: a name, per-PM counts, or a PM (1-based) per VM.
LayoutSpec = str | Sequence[int] | Mapping[str, int]


def vm_names(count: int) -> tuple[str, ...]:
    """The VMs of an experiment, `vm1`..`vmN`: one identity for a VM everywhere (thesis §3.2)."""
    return tuple(f"vm{k}" for k in range(1, count + 1))


def counts_for(name: str, vms: int, pms: int) -> tuple[int, ...]:
    """VMs per PM of a named layout; ValueError says why it cannot hold `vms` on `pms`."""
    if name == "balanced":
        base, extra = divmod(vms, pms)
        return tuple(base + (1 if k < extra else 0) for k in range(pms))
    if name == "unbalanced":
        if vms < pms:
            raise ValueError(f"unbalanced needs at least one VM per PM ({vms} VMs on {pms} PMs)")
        return (vms - (pms - 1),) + (1,) * (pms - 1)
    raise ValueError(f"unknown layout {name!r} (choose from {', '.join(NAMED_LAYOUTS)}, a list, or a mapping)")


def placement(layout: LayoutSpec, vms: int, pms: int) -> tuple[int, ...]:
    """PM index (1-based) of each VM; ValueError with a one-line reason when it does not fit."""
    if isinstance(layout, str):
        return _from_counts(counts_for(layout, vms, pms))
    if isinstance(layout, Mapping):
        return _from_mapping(layout, vms, pms)
    counts = tuple(layout)
    if len(counts) != pms:
        raise ValueError(f"{list(counts)} gives counts for {len(counts)} PMs, the experiment has {pms}")
    if any(c < 0 for c in counts):
        raise ValueError(f"{list(counts)}: VM counts must be >= 0")
    if sum(counts) != vms:
        raise ValueError(f"{list(counts)} places {sum(counts)} VMs, the experiment has {vms}")
    return _from_counts(counts)


def label(layout: LayoutSpec) -> str:
    """The layout's name in run ids and in runs.csv: `balanced`, `7-1-1`, or `at-1-2-1-2` (PM per VM)."""
    if isinstance(layout, str):
        return layout
    if isinstance(layout, Mapping):
        return "at-" + "-".join(str(layout[vm]) for vm in vm_names(len(layout)))
    return "-".join(str(c) for c in layout)


def _from_counts(counts: Sequence[int]) -> tuple[int, ...]:
    return tuple(pm for pm, count in enumerate(counts, start=1) for _ in range(count))


def _from_mapping(layout: Mapping[str, int], vms: int, pms: int) -> tuple[int, ...]:
    names = vm_names(vms)
    unknown = sorted(set(layout) - set(names))
    if unknown:
        raise ValueError(f"{unknown[0]} is not one of the experiment's VMs vm1..vm{vms}")
    missing = [vm for vm in names if vm not in layout]
    if missing:
        raise ValueError(f"no PM given for {missing[0]}")
    for vm in names:
        if not 1 <= layout[vm] <= pms:
            raise ValueError(f"{vm}: PM {layout[vm]} is not between 1 and {pms}")
    return tuple(layout[vm] for vm in names)
