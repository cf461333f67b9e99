"""The simulator's parameters: what a calibration file holds, with defaults measured on this machine.

Every figure the model uses that is not given by the experiment (PM capacity, link rate, VM
memory) lives here, so a simulated run is fully described by its spec plus one calibration file,
and its manifest names that file. `testbed calibrate DIR` writes one from a real campaign
(testbed/calibrate.py); without one, the defaults below are used and the manifest says so.

Defaults and where they come from:
* synthetic1 CPU work: 1.22e-4 CPU-seconds per block natively (18,000 blocks in 2.2 s, measured
  here with `gcc -O2`), times QEMU TCG's 4.1x slowdown on the sqrt loop (DESIGN.md) for `qemu`.
* migration: effective rate 0.94 of the nominal link (tbf shaping within 5 %, TCP/IP headers);
  QEMU pre-copy 0.5 s fixed (connection, device state) with a 43 ms stop (DESIGN.md: 6 s at
  100 Mbit/s for 73 MB, 43 ms downtime); its 300 ms downtime limit (QEMU's default
  `downtime-limit`) and a 30-round cap (Xen's default max_iters is 29+1).
* container stop-and-copy: freeze 33 ms + cgroup move 5 ms + dump/load ~40 ms per 100 MB
  (DESIGN.md) ~ 0.1 s fixed; the dump holds the container's private memory (fraction 1.0).
* contention 0 and memory fraction 1.0 until calibrated: both are properties of the
  technique and guest that only a lab campaign shows (`testbed calibrate` fits them).
* migration CPU overhead: 0.05 CPU on the source and 0.05 on the destination (a TCP stream at
  100 Mbit/s plus the migration thread; replace with `testbed calibrate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from testbed.errors import InputError, describe_validation_error

Mode = Literal["precopy", "stopcopy", "postcopy"]
NATIVE_CPU_S_PER_BLOCK = 1.22e-4
TCG_SLOWDOWN = 4.1


class ModeCosts(BaseModel):
    """Per migration mode: fixed time outside the memory transfer, and the part of it the VM is
    stopped (stop-and-copy: all of it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fixed_s: float = Field(ge=0)
    stop_fixed_s: float = Field(ge=0)

    @model_validator(mode="after")
    def _stop_within_fixed(self) -> ModeCosts:
        if self.stop_fixed_s > self.fixed_s:
            raise ValueError("stop_fixed_s cannot exceed fixed_s (downtime is part of the total)")
        return self


class Calibration(BaseModel):
    """The simulator's parameters. `source` says where they were fitted (or `defaults`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    simulated: Literal[True] = True  # a calibration only ever drives a simulation
    source: str = "defaults"
    sources: list[str] = []  # the campaigns' results directories, absolute (the report finds the lab's)
    mimics: str = "qemu"  # the technique whose VMs the simulated ones behave like
    cpu_s_per_block: float = Field(NATIVE_CPU_S_PER_BLOCK * TCG_SLOWDOWN, gt=0)
    thread_cpus: float = Field(1.0, gt=0)  # one workload thread uses at most one core
    contention_cpus: float = Field(0.0, ge=0)  # a share s works as s x s / (s + this) CPUs (engine.py)
    link_efficiency: float = Field(0.94, gt=0, le=1)
    modes: dict[Mode, ModeCosts] = {
        "precopy": ModeCosts(fixed_s=0.5, stop_fixed_s=0.043),
        "stopcopy": ModeCosts(fixed_s=0.1, stop_fixed_s=0.1),
        "postcopy": ModeCosts(fixed_s=0.5, stop_fixed_s=0.043),
    }
    downtime_limit_s: float = Field(0.3, gt=0)
    max_rounds: int = Field(30, ge=1)
    dirty_mb_s: dict[str, float] = {"synthetic1": 0.2, "synthetic-random": 0.2, "idle": 0.0}
    # bytes a migration must move / VM memory: QEMU skips zero pages, a container dump holds only
    # its private memory (all modes; pre-copy's dirtied pages come on top)
    memory_fraction: float = Field(1.0, gt=0, le=1)
    postcopy_speed: float = Field(0.5, gt=0, le=1)  # VM progress per CPU while pages are fetched
    cpu_overhead_src: float = Field(0.05, ge=0)  # CPUs a migration takes on its source PM
    cpu_overhead_dst: float = Field(0.05, ge=0)
    fitted: dict[str, object] = {}  # how each fitted figure was obtained (rows used, residuals)

    def dirty_bytes_s(self, app: str) -> float:
        return self.dirty_mb_s.get(app, 0.0) * 1e6


def load_calibration(path: str | Path | None) -> tuple[Calibration, str]:
    """The calibration in `path` (or the defaults) and the name a manifest records for it."""
    if path is None:
        return Calibration(), "defaults"
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    try:
        return Calibration.model_validate(data), str(path)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, str(path))) from None


def save_calibration(cal: Calibration, path: str | Path) -> None:
    Path(path).write_text(cal.model_dump_json(indent=2) + "\n", encoding="utf-8")
