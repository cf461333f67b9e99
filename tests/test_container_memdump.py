"""The dump/load machinery of the container migration on a plain child process: a dump holds the
pages the process really has, and loading it writes them back (undoing later changes), so a
migrated container's memory is whatever crossed the network, not whatever stayed behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.drivers import memdump

SIZE = 8 << 20
CHILD = f"""
import ctypes, mmap, sys
data = bytearray(b"A" * {SIZE})
reserved = mmap.mmap(-1, 256 << 20)  # never touched: no pages to dump
print(ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data)), flush=True)
for line in sys.stdin:
    print(chr(data[0]) + chr(data[-1]), data.count(data[:1]) == len(data), flush=True)
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield proc
    proc.kill()
    proc.wait()


def ask(proc: subprocess.Popen, line: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_load_writes_the_dumped_pages_back(child: subprocess.Popen, tmp_path: Path) -> None:
    """Stopped throughout, as a frozen container is: dump, damage the buffer from outside
    (through /proc/PID/mem, not this module), load; the buffer is whole again."""
    address = int(child.stdout.readline())
    assert ask(child, "get") == "AA True"
    os.kill(child.pid, signal.SIGSTOP)
    dumped = memdump.dump([child.pid], tmp_path / "dump")
    assert SIZE <= dumped["data_bytes"] < 64 << 20  # the 256 MiB untouched mapping is skipped
    assert dumped["dump_bytes"] == (tmp_path / "dump").stat().st_size
    with open(f"/proc/{child.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        mem.write(b"B" * SIZE)
    loaded = memdump.load(tmp_path / "dump")
    os.kill(child.pid, signal.SIGCONT)
    assert loaded["data_bytes"] == dumped["data_bytes"]
    assert ask(child, "get") == "AA True"


def test_a_truncated_dump_is_refused(child: subprocess.Popen, tmp_path: Path) -> None:
    child.stdout.readline()
    os.kill(child.pid, signal.SIGSTOP)
    memdump.dump([child.pid], tmp_path / "dump")
    os.kill(child.pid, signal.SIGCONT)
    whole = (tmp_path / "dump").read_bytes()
    (tmp_path / "dump").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(memdump.DumpError, match="truncated"):
        memdump.load(tmp_path / "dump")
    os.kill(child.pid, signal.SIGCONT)
