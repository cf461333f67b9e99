"""Host-side proof that a QEMU migration kept every page: compare the source's and the
destination's guest RAM page by page, trusting neither the guest nor QEMU's own counters.

The destination is started paused (`-S`), so after the migration both sides hold the same
instant of the guest: the source stopped in `postmigrate`, the destination not yet running.
Each QEMU dumps its guest-physical memory (QMP `pmemsave`) into a file, and the two dumps are
compared page by page. A page that differs is one the migration never (re)sent: QEMU < 9.0
under TCG loses dirty pages this way (docs/DESIGN.md, "Known facts").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from qemu.qmp import QMPClient

PAGE = 4096
FIRST_KEPT = 8  # differing page addresses kept in a report


@dataclass(frozen=True)
class RamComparison:
    pages_compared: int
    pages_differ: int
    first_differing: list[str]  # guest-physical addresses, hex

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def compare_ram(src: QMPClient, dst: QMPClient, workdir: Path) -> RamComparison:
    """Dump both sides' guest RAM into `workdir` and compare them (the dumps are removed)."""
    size = int((await src.execute("query-memory-size-summary"))["base-memory"])
    dumps = (workdir / "ram.source", workdir / "ram.destination")
    try:
        for side, dump in zip((src, dst), dumps, strict=True):
            await side.execute("pmemsave", {"val": 0, "size": size, "filename": str(dump)})
        return compare_dumps(*dumps)
    finally:
        for dump in dumps:
            dump.unlink(missing_ok=True)


def compare_dumps(a: Path, b: Path) -> RamComparison:
    """Pages of two equally long memory dumps that differ."""
    left, right = (np.fromfile(path, dtype=np.uint8) for path in (a, b))
    if left.size != right.size or left.size % PAGE:
        raise ValueError(f"memory dumps of {left.size} and {right.size} bytes: not equal whole pages")
    differ = np.flatnonzero((left.reshape(-1, PAGE) != right.reshape(-1, PAGE)).any(axis=1))
    return RamComparison(left.size // PAGE, int(differ.size), [hex(int(p) * PAGE) for p in differ[:FIRST_KEPT]])
