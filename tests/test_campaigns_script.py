"""scripts/campaigns.sh, the matrix at the thesis' statistics: its table names real specs and
techniques they allow, with the repetitions issue #16 asks for, and a wrong name fails before any
campaign starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from testbed.spec import load_spec

TOP = Path(__file__).resolve().parents[1]
SCRIPT = TOP / "scripts" / "campaigns.sh"


def _table() -> list[list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True, timeout=30)
    return [line.split() for line in out.stdout.splitlines() if line.strip() and not line.startswith("#")]


def test_every_campaign_runs_a_spec_with_its_technique_at_the_thesis_repetitions() -> None:
    rows = _table()
    assert {"exp1-container", "exp2-container", "exp3-container", "exp1-qemu", "exp3-qemu"} <= {r[0] for r in rows}
    for name, spec_path, technique, scale, reps, time_scale, timeout in rows:
        spec = load_spec(TOP / spec_path)
        assert technique in spec.techniques, name
        assert 0 < float(scale) <= 1, name
        thesis = 5 if spec.kind == "migration" else 7
        assert int(reps) >= thesis, name
        assert time_scale in ("-", "auto") or float(time_scale) > 0, name
        assert timeout == "-" or int(timeout) > 0, name


def test_an_unknown_campaign_is_refused_before_any_runs() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "exp1-container", "exp9"], check=False, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert "no campaign named exp9" in proc.stderr
    assert "testbed run" not in proc.stdout
