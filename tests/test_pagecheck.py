"""pagecheck (workloads/pagecheck.c), the dirtier that checks its own pages: a migration that
loses a dirty page leaves an older copy of it on the destination, and pagecheck must see that
from inside the guest. Here the "migration" is played from outside through /proc/PID/mem: pages
read at one moment are put back later, stale, exactly what a lost dirty page looks like."""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from testbed.drivers.container import build_workloads

PAGE = 4096
SIZE_MB, RATE_MBPS = 4, 20  # 1,024 pages, each rewritten every 0.2 s


@pytest.fixture(scope="module")
def pagecheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workloads(tmp_path_factory.mktemp("bin")) / "pagecheck"


def test_an_undisturbed_run_finds_no_bad_page(pagecheck: Path) -> None:
    out = subprocess.run([str(pagecheck), str(SIZE_MB), str(RATE_MBPS), "1.5"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    assert lines[0] == f"allocated {SIZE_MB}" and re.fullmatch(r"checked \d+ bad 0", lines[1])
    checked = int(lines[-1].split()[1])
    assert lines[-1] == f"done {checked} bad 0" and checked >= 1.5 * RATE_MBPS * 256 + SIZE_MB * 256 * 0.9


def _pages(pid: int) -> int:
    """The address of page 0 of pagecheck's buffer: the anonymous mapping whose words at
    base + k pages read k (each page starts with its index)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) > 5 or "rw" not in fields[1] or end - start < SIZE_MB << 20:
            continue
        with open(f"/proc/{pid}/mem", "rb") as mem:
            for base in range(start, start + PAGE, 8):
                if all(_word(mem, base + k * PAGE) == k for k in (1, 2, 3, 500)):
                    return base
    raise AssertionError(f"pagecheck {pid}: no buffer found in its maps")


def _word(mem, address: int) -> int:
    mem.seek(address)
    return struct.unpack("<Q", mem.read(8))[0]


def test_a_page_put_back_stale_is_found_and_named(pagecheck: Path) -> None:
    proc = subprocess.Popen([str(pagecheck), str(SIZE_MB), str(RATE_MBPS), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == f"allocated {SIZE_MB}\n"
        base = _pages(proc.pid)
        with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(base + 100 * PAGE)
            old = mem.read(10 * PAGE)  # pages 100..109 as they are now
            time.sleep(0.5)  # each has been rewritten twice since
            mem.seek(base + 100 * PAGE)
            mem.write(old)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    bad = [tuple(map(int, m.groups())) for m in
           re.finditer(r"^bad page (\d+) generation (\d+) found index (\d+) generation (\d+)$", out, re.MULTILINE)]
    assert bad and all(100 <= page <= 109 and found == page and stale < gen for page, gen, found, stale in bad), out
    assert re.search(rf"^done \d+ bad {len(bad)}$", out, re.MULTILINE), out


@pytest.mark.parametrize("argv", [[], ["4", "20"], ["0", "20", "1"], ["4", "x", "1"], ["4", "20", "-1"]])
def test_bad_arguments_are_a_usage_error(pagecheck: Path, argv: list[str]) -> None:
    out = subprocess.run([str(pagecheck), *argv], capture_output=True, text=True, timeout=10, check=False)
    assert out.returncode == 2 and out.stderr.startswith(("pagecheck: ", "usage: pagecheck ")), out.stderr
