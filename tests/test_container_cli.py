"""`testbed bench migration --technique container` refuses what containers cannot do before it
touches any lab (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("extra", "field"), [
    (["--mode", "precopy"], "--mode precopy"),
    (["--mode", "stopcopy", "--memory", "8"], "--memory 8"),
    (["--mode", "stopcopy", "--rate", "fast"], "--rate"),
])
def test_bad_container_bench_input_is_one_line(extra: list[str], field: str) -> None:
    done = subprocess.run([sys.executable, "-m", "testbed.cli", "bench", "migration", "--technique", "container",
                           *extra], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("testbed: error: ") and field in done.stderr
    assert "Traceback" not in done.stderr
