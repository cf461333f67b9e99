"""Snapshot JSON <-> Snapshot, validated with pydantic at the boundary.

Format (the `testbed balance` contract):
    {"hosts": [{"name": "pm1", "capacity": 100, "cpu": 35.0}, ...],
     "vms":   [{"name": "vm1", "host": "pm1", "cpu": 12.5}, ...],
     "excluded": ["pm3"]}
cpu is in percent of a capacity-100 host; a host's load is the sum of its VMs' cpu unless the
optional host "cpu" (a measured load, same units) is given; "excluded" (optional) lists hosts
that must receive no VM. Unknown fields are rejected, so a typo never silently means 0; types
are strict (`"cpu": "10"` or `true` is not a number) and a key given twice is refused (JSON
parsers disagree on which one wins). Numbers are bounded so that every policy's arithmetic stays
finite: capacity in [MIN_CAPACITY, MAX_AMOUNT], cpu in [0, MAX_AMOUNT] (two VMs at 1e308 would
sum to inf). A file is read up to MAX_SNAPSHOT_BYTES (`/dev/zero` is not a snapshot).
Every problem becomes one InputError line naming the field, e.g. `s.json: vms.2.cpu: ...`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from testbed.balancer.snapshot import Snapshot
from testbed.errors import InputError, describe_validation_error

#: A million percent of a reference host (ten thousand hosts' worth): above any real cpu or
#: capacity, and far enough below float's range that sums and squares over 100,000 VMs stay finite.
MAX_AMOUNT = 1e6
#: A thousandth of a percent of a reference host: smaller capacities blow one VM up past float's range.
MIN_CAPACITY = 1e-3
MAX_SNAPSHOT_BYTES = 64 << 20  # ~40 times the size of a 100,000-VM snapshot

Name = Annotated[str, Field(min_length=1, pattern=r"^[^\x00-\x1f]+$")]
Percent = Annotated[float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class HostIn(_Strict):
    name: Name
    capacity: Annotated[float, Field(ge=MIN_CAPACITY, le=MAX_AMOUNT, allow_inf_nan=False)]
    cpu: Percent | None = None


class VmIn(_Strict):
    name: Name
    host: Name
    cpu: Percent


class SnapshotIn(_Strict):
    hosts: Annotated[list[HostIn], Field(min_length=1)]
    vms: list[VmIn] = []
    excluded: list[Name] = []


def snapshot_from_json(text: str | bytes, source: str = "snapshot") -> Snapshot:
    """Parse and check a snapshot document; `source` prefixes error messages."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise InputError(f"{source}: (top level): Invalid JSON: {err.msg} at line {err.lineno}") from None
    except (UnicodeDecodeError, ValueError) as err:  # a repeated key, bytes that are not text
        raise InputError(f"{source}: (top level): {err}") from None
    try:
        doc = SnapshotIn.model_validate(data)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, source).replace("\n", " ")) from None
    _check_names(doc, source)
    return Snapshot.create(
        capacities={h.name: h.capacity for h in doc.hosts},
        vms=[(vm.name, vm.host, vm.cpu) for vm in doc.vms],
        measured_loads={h.name: h.cpu for h in doc.hosts if h.cpu is not None},
        excluded=doc.excluded,
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"key {key!r} is given twice in one object")
    return dict(pairs)


def load_snapshot(path: str | Path) -> Snapshot:
    try:
        with Path(path).open("rb") as snapshot:
            text = snapshot.read(MAX_SNAPSHOT_BYTES + 1)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror}") from None
    if len(text) > MAX_SNAPSHOT_BYTES:
        raise InputError(f"{path}: larger than {MAX_SNAPSHOT_BYTES >> 20} MiB, not a snapshot")
    return snapshot_from_json(text, str(path))


def _check_names(doc: SnapshotIn, source: str) -> None:
    """Cross-field rules pydantic's per-field checks cannot express."""
    hosts: set[str] = set()
    for k, host in enumerate(doc.hosts):
        if host.name in hosts:
            raise InputError(f"{source}: hosts.{k}.name: duplicate host name {host.name!r}")
        hosts.add(host.name)
    vms: set[str] = set()
    for k, vm in enumerate(doc.vms):
        if vm.name in vms:
            raise InputError(f"{source}: vms.{k}.name: duplicate VM name {vm.name!r}")
        if vm.host not in hosts:
            raise InputError(f"{source}: vms.{k}.host: unknown host {vm.host!r}")
        vms.add(vm.name)
    for k, name in enumerate(doc.excluded):
        if name not in hosts:
            raise InputError(f"{source}: excluded.{k}: unknown host {name!r}")
