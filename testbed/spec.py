"""Experiment specs (experiments/*.yml): what a campaign runs, validated before any host is touched.

A spec names the techniques, the application and how the VMs are made, then a `matrix` of
variant axes (layout x migration, and for Appendix A app x link rate x compression x mode) whose
cross product, minus `exclude`, gives the variants. Every run is technique x variant x
repetition (testbed.runner.campaign). A bad spec fails with one line naming the field, e.g.
`exp1.yml: matrix.layout.1: [7, 1] gives counts for 2 PMs, the experiment has 3`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from testbed import techniques
from testbed.errors import InputError, describe_validation_error
from testbed.manager import Signal
from testbed.runner import layouts

#: What a spec may name: the technique catalogue's (testbed.techniques) spec techniques.
Technique = Literal[techniques.SPEC_NAMES]  # type: ignore[valid-type]
#: The last five run in the Appendix A study (kind: migration) only.
App = Literal["synthetic1", "synthetic-random", "kernel", "allocator", "idle", "http", "database", "game"]
Compression = Literal["none", "bzip2", "zstd", "zlib"]
Mode = Literal["precopy", "stopcopy", "postcopy"]
LayoutValue = str | list[int] | dict[str, int]  # a name from layouts.NAMED_LAYOUTS, counts, or PM per VM
#: Durations: a delay, cooldown or interval of inf passes `ge=0` and hangs a run (or the simulator).
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: A VM larger than this (1 TiB) is a typo, not a plan; the PMs' memory is checked by the lab.
MAX_MEMORY_MB = 1 << 20

#: The thesis runs every variant at least 7 times (§4.3).
DEFAULT_REPETITIONS = 7

def _fail(loc: tuple[str | int, ...], reason: str, value: object) -> ValidationError:
    """A validation error at `loc` inside the model, so the one-line message names the exact field."""
    error = PydanticCustomError("spec", "{reason}", {"reason": reason})
    return ValidationError.from_exception_data("spec", [InitErrorDetails(type=error, loc=loc, input=value)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Balancer(_Strict):
    """The manager during "with migration" variants: policy, its parameters, the CC's interval,
    and how the CC's orders migrate (mode, compression: the defaults of the matrix' axes)."""

    policy: str = "assign-u"
    params: dict[str, float] = {}
    interval_s: float = Field(10.0, ge=1.0, allow_inf_nan=False)  # the thesis' 10 s (§4.2); the CC's minimum is 1 s
    cooldown_s: NonNegative = 60.0
    mode: Mode | None = None  # None: the technique's own (QEMU pre-copy, containers stop-and-copy)
    compression: Compression = "none"  # of every migration the CC orders (what the technique offers)
    #: What the CC balances on: each VM's CPU use (the thesis) or its demand (use + runnable wait,
    #: capped at the VM's own limit: testbed/manager/local.py), as `testbed manager cc --signal`.
    signal: Signal = "use"
    #: How the CC's interval, cool-down and settling follow the work's `scale`: None keeps them as
    #: written at every scale; "auto" multiplies them by the run's scale; a number by that factor
    #: (floored: testbed/runner/time_scale.py).
    time_scale: Literal["auto"] | float | None = None

    @field_validator("time_scale", mode="before")
    @classmethod
    def _time_scale(cls, value: object) -> object:
        """One message for every wrong value (a union would list each member's complaint)."""
        factor_ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 100
        if value is None or value == "auto" or factor_ok:
            return value
        raise PydanticCustomError("spec", "{reason}", {"reason": f"must be auto or a factor in (0, 100], not {value!r}"})

    @model_validator(mode="after")
    def _policy_exists(self) -> Balancer:
        from testbed.balancer import POLICIES, get_policy

        if self.policy not in POLICIES:
            raise _fail(("policy",), f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})",
                        self.policy)
        try:
            get_policy(self.policy, **self.params)
        except InputError as err:
            raise _fail(("params",), str(err), self.params) from None
        return self


class VmWork(_Strict):
    """One VM's own work (the spec's `per_vm`), where it departs from the spec's: its app instances
    (instead of `instances`), a multiplier of the app's work (the spec's `scale` times this; 1 if
    unset) and its vCPUs (instead of `vcpus`: a k-vCPU VM is capped at k / cores of its PM, so
    this is how a VM is made lighter or heavier than another). A VM's start delay still scales
    with the spec's `scale` only, so a VM given more work runs longer without starting later (the
    validation's steps overlap: experiments/validation.yml)."""

    instances: int | None = Field(None, ge=1, le=64)
    work: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    vcpus: int | None = Field(None, ge=1)


class Matrix(_Strict):
    """Variant axes; their cross product (minus the spec's `exclude`) is the list of variants.

    `app`, `link_rate`, `compression` and `mode` default to the spec's app, the lab's link
    rate, the balancer's compression and mode; list them to vary them (Appendix A).
    """

    layout: list[LayoutValue] = Field(["balanced"], min_length=1)
    migration: list[bool] = Field([False, True], min_length=1)
    app: list[App] | None = Field(None, min_length=1)
    link_rate: list[str] | None = Field(None, min_length=1)
    compression: list[Compression] | None = Field(None, min_length=1)
    mode: list[Mode] | None = Field(None, min_length=1)

    @field_validator("link_rate")
    @classmethod
    def _rates_parse(cls, rates: list[str] | None) -> list[str] | None:
        from testbed.lab import parse_rate

        for k, rate in enumerate(rates or ()):
            try:
                parse_rate(rate)
            except ValueError as err:
                raise _fail((k,), str(err), rate) from None
        return rates


@dataclass(frozen=True)
class Variant:
    """One cell of the matrix. `link_rate` None: the lab's own; `placement`: PM (1-based) per VM."""

    layout: str  # label: balanced, unbalanced, 7-1-1, at-1-2-1-2
    placement: tuple[int, ...]
    migration: bool
    app: str
    link_rate: str | None
    compression: str
    mode: str | None  # None: the technique's own

    @property
    def order_compression(self) -> str | None:
        """The compression as a driver and the CC's orders take it (None: uncompressed)."""
        return None if self.compression == "none" else self.compression

    @property
    def id(self) -> str:
        """Stable name of the variant in run ids, e.g. `synthetic1.unbalanced.mig`: its axes only
        (axes left at their default are omitted), never its position in the spec."""
        parts = [self.app, self.layout, "mig" if self.migration else "nomig", self.mode, self.link_rate,
                 None if self.compression == "none" else self.compression]
        return ".".join(p for p in parts if p is not None)

    def as_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "placement": list(self.placement), "migration": self.migration,
                "app": self.app, "link_rate": self.link_rate, "compression": self.compression,
                "mode": self.mode}


class Spec(_Strict):
    """One experiment: see experiments/*.yml and the README's "Experiment specs" section."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
    description: str = ""
    kind: Literal["balancing", "migration"] = "balancing"  # migration: App. A, one forced move per run
    techniques: list[Technique] = Field(min_length=1)
    app: App = "synthetic1"
    instances: int = Field(1, ge=1, le=64)  # copies of the app started at once in every VM
    vms: int = Field(9, ge=1, le=1000)
    pms: int = Field(3, ge=1, le=1000)
    memory_mb: int = Field(100, ge=32, le=MAX_MEMORY_MB)
    vcpus: int = Field(2, ge=1)
    start_delay_s: dict[str, NonNegative] = {}  # per VM; scaled with `scale` (validation, §4.5)
    per_vm: dict[str, VmWork] = {}  # per VM: its instances and work multiplier (VmWork)
    warmup_s: NonNegative = 0.0  # kind migration: the app runs this long before the move
    matrix: Matrix = Matrix()
    exclude: list[dict[str, Any]] = []
    balancer: Balancer = Balancer()
    repetitions: int = Field(DEFAULT_REPETITIONS, ge=1, le=1000)
    scale: float = Field(1.0, gt=0, le=100)  # multiplies the work of every app (and delays); per_vm work on top
    seed: int = 0

    @field_validator("techniques")
    @classmethod
    def _unique(cls, techniques: list[str]) -> list[str]:
        for k, technique in enumerate(techniques):
            if technique in techniques[:k]:
                raise _fail((k,), f"{technique} is listed twice", technique)
        return techniques

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        names = layouts.vm_names(self.vms)
        for field in ("start_delay_s", "per_vm"):
            for vm in getattr(self, field):
                if vm not in names:
                    raise _fail((field, vm), f"not one of the VMs vm1..vm{self.vms}", vm)
        for k, layout in enumerate(self.matrix.layout):
            try:
                layouts.placement(layout, self.vms, self.pms)
            except ValueError as err:
                raise _fail(("matrix", "layout", k), str(err), layout) from None
        if self.kind == "migration" and False in self.matrix.migration:
            raise _fail(("matrix", "migration"), "a migration experiment always migrates (use [true])",
                        self.matrix.migration)
        for k, rule in enumerate(self.exclude):
            self._check_exclude(k, rule)
        seen: set[str] = set()
        for variant in self.variants():
            if variant.id in seen:
                raise _fail(("matrix",), f"variant {variant.id} appears twice", variant.id)
            seen.add(variant.id)
        for technique in self.techniques:
            if not (variant_list := self.variants(technique)):
                raise _fail(("exclude",), f"excludes every variant of {technique}", self.exclude)
            for variant in variant_list:
                self._technique_can(technique, variant)
        return self

    def vm_instances(self, vm: str) -> int:
        """Copies of the app `vm` runs at once: its `per_vm` instances, else the spec's."""
        own = self.per_vm.get(vm)
        return self.instances if own is None or own.instances is None else own.instances

    def vm_scale(self, vm: str) -> float:
        """What multiplies the app's work in `vm`: the spec's scale times its `per_vm` work."""
        own = self.per_vm.get(vm)
        return self.scale * (1.0 if own is None or own.work is None else own.work)

    def vm_vcpus(self, vm: str) -> int:
        """vCPUs of `vm`: its `per_vm` vcpus, else the spec's."""
        own = self.per_vm.get(vm)
        return self.vcpus if own is None or own.vcpus is None else own.vcpus

    def vm_delay_s(self, vm: str) -> float:
        """Seconds from a run's start to `vm`'s first workload: its start delay times the scale."""
        return self.start_delay_s.get(vm, 0.0) * self.scale

    def max_vm_scale(self) -> float:
        """The largest work multiplier of any VM (what bounds a run's length)."""
        return max(self.vm_scale(vm) for vm in layouts.vm_names(self.vms))

    def _check_exclude(self, k: int, rule: dict[str, Any]) -> None:
        """Each key of an exclude rule is an axis and its value one that axis takes, strictly (a
        value of another type would match no variant, or break matching: `{layout: 5}`)."""
        axes = set(Matrix.model_fields) | {"technique"}
        for key, value in rule.items():
            if key not in axes:
                raise _fail(("exclude", k, key), f"not a matrix axis ({', '.join(sorted(axes))})", key)
            if key == "technique":
                if value not in self.techniques:
                    raise _fail(("exclude", k, key), "not one of the spec's techniques", value)
                continue
            if value is None and key in ("link_rate", "mode"):  # the lab's rate, the technique's mode
                continue
            try:
                Matrix.model_validate({key: [value]}, strict=True)
                if key == "layout":
                    layouts.placement(value, self.vms, self.pms)
            except ValidationError as err:
                raise _fail(("exclude", k, key), f"not a valid {key}: {err.errors()[0]['msg']}", value) from None
            except ValueError as err:
                raise _fail(("exclude", k, key), str(err), value) from None

    def _technique_can(self, technique: str, variant: Variant) -> None:
        """Refuse a variant whose compression or mode the technique's migration does not have (its
        driver would refuse it at migration time; the technique catalogue says what it has)."""
        m = self.matrix
        at_compression = (("matrix", "compression", m.compression.index(variant.compression)) if m.compression
                          else ("balancer", "compression"))
        can = techniques.technique(technique)
        if reason := can.refuses_compression(variant.compression, variant.mode):
            raise _fail(at_compression, f"{variant.compression}: {reason}", variant.compression)
        if variant.mode is not None and (reason := can.refuses_mode(variant.mode)):
            where = ("matrix", "mode", m.mode.index(variant.mode)) if m.mode else ("balancer", "mode")
            raise _fail(where, f"{variant.mode}: {reason}", variant.mode)

    def variants(self, technique: str | None = None) -> list[Variant]:
        """The matrix' cross product minus `exclude`, in the spec's order (run order is shuffled
        later); a rule naming a technique (e.g. {technique: qemu, compression: bzip2}) removes
        the variant for that technique only, so it counts only when `technique` is given."""
        m = self.matrix
        axes = {
            "layout": m.layout,
            "migration": m.migration,
            "app": m.app or [self.app],
            "link_rate": m.link_rate or [None],
            "compression": m.compression or [self.balancer.compression],
            "mode": m.mode or [self.balancer.mode],
        }
        result = []
        for values in itertools.product(*axes.values()):
            cell = dict(zip(axes, values, strict=True))
            if any(_matches(rule, cell | {"technique": technique}) for rule in self.exclude):
                continue
            layout = cell.pop("layout")
            result.append(Variant(layout=layouts.label(layout),
                                  placement=layouts.placement(layout, self.vms, self.pms), **cell))
        return result

    def check_against_lab(self, pm_count: int, pm_cores: int | None = None, source: str = "spec") -> None:
        """Refuse a spec the lab cannot run (PM count, vCPUs per PM) before any host is touched."""
        if pm_count != self.pms:
            raise InputError(f"{source}: pms: the spec places VMs on {self.pms} PMs, the lab has {pm_count}")
        if pm_cores is None:
            return
        if self.vcpus > pm_cores:
            raise InputError(f"{source}: vcpus: {self.vcpus} vCPUs per VM, the lab's PMs stand for {pm_cores} cores")
        for vm, own in self.per_vm.items():
            if own.vcpus is not None and own.vcpus > pm_cores:
                raise InputError(f"{source}: per_vm.{vm}.vcpus: {own.vcpus} vCPUs, the lab's PMs stand for "
                                 f"{pm_cores} cores")


def _matches(rule: dict[str, Any], cell: dict[str, Any]) -> bool:
    """An exclude rule matches a cell when every axis it names has the cell's value."""
    for key, value in rule.items():
        have = cell[key]
        if key == "layout":
            value, have = layouts.label(value), layouts.label(have)
        if value != have:
            return False
    return True


def parse_spec(data: object, source: str = "spec") -> Spec:
    """Validate a spec already read (a mapping); InputError names the first bad field."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: (top level): must be a mapping of spec fields")
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, source)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate experiments/NAME.yml."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(top level)"
        raise InputError(f"{path}: {where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return parse_spec(data, str(path))


def spec_with(spec: Spec, **changes: Any) -> Spec:
    """The spec with command-line overrides (--reps, --scale), validated again."""
    return parse_spec(spec.model_dump() | changes, f"{spec.name} (command line)")

