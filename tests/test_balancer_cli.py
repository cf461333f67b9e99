"""`testbed balance` and `testbed bench balancer` as a user runs them: the installed console
script in a subprocess, its stdout contract, its one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTBED = Path(sys.executable).with_name("testbed")

THREE_PMS = [{"name": f"pm{k}", "capacity": 100} for k in (1, 2, 3)]


def run_testbed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TESTBED), *args], capture_output=True, text=True, timeout=120, check=False)


def write(tmp_path: Path, doc: object) -> str:
    path = tmp_path / "snapshot.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_balance_prints_one_migration_as_json(tmp_path):
    vms = [
        {"name": "vm1", "host": "pm1", "cpu": 20},
        {"name": "vm2", "host": "pm1", "cpu": 20},
        {"name": "vm3", "host": "pm2", "cpu": 20},
    ]
    result = run_testbed("balance", write(tmp_path, {"hosts": THREE_PMS, "vms": vms}))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "balanced": False,
        "migration": {"vm": "vm1", "source": "pm1", "destination": "pm3"},
    }


@pytest.mark.parametrize("policy", ["assign-u", "workload-balance", "stddev", "none"])
def test_balance_prints_balanced_exactly(tmp_path, policy):
    vms = [{"name": "vm1", "host": "pm1", "cpu": 20}, {"name": "vm2", "host": "pm2", "cpu": 20}]
    result = run_testbed(
        "balance", write(tmp_path, {"hosts": THREE_PMS, "vms": vms}), "--policy", policy, "--base", "1.5"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"balanced": true, "migration": null}\n'


def test_base_changes_the_threshold(tmp_path):
    """pm1 at 30 % without its 5 % VM, pm2 at 15 %: a 15-point gap moves it at a = 1.5
    (threshold 1.7 points) but not at a = 1.03 (threshold 23 points)."""
    hosts = [{"name": "pm1", "capacity": 100}, {"name": "pm2", "capacity": 100, "cpu": 15}]
    vms = [{"name": "big", "host": "pm1", "cpu": 30}, {"name": "small", "host": "pm1", "cpu": 5}]
    path = write(tmp_path, {"hosts": hosts, "vms": vms})
    assert json.loads(run_testbed("balance", path, "--base", "1.03").stdout)["balanced"] is True
    assert json.loads(run_testbed("balance", path, "--base", "1.5").stdout)["balanced"] is False


GOOD_VM = {"name": "vm1", "host": "pm1", "cpu": 10}
BAD_INPUTS = {
    "unknown host": ({"hosts": THREE_PMS, "vms": [{**GOOD_VM, "host": "pm9"}]}, [], "vms.0.host"),
    "duplicate host": ({"hosts": [*THREE_PMS, THREE_PMS[0]], "vms": []}, [], "hosts.3.name"),
    "duplicate vm": ({"hosts": THREE_PMS, "vms": [GOOD_VM, GOOD_VM]}, [], "vms.1.name"),
    "negative cpu": ({"hosts": THREE_PMS, "vms": [{**GOOD_VM, "cpu": -1}]}, [], "vms.0.cpu"),
    "negative capacity": ({"hosts": [{"name": "pm1", "capacity": -5}], "vms": []}, [], "hosts.0.capacity"),
    "zero capacity": ({"hosts": [{"name": "pm1", "capacity": 0}], "vms": []}, [], "hosts.0.capacity"),
    "missing cpu": ({"hosts": THREE_PMS, "vms": [{"name": "vm1", "host": "pm1"}]}, [], "vms.0.cpu"),
    "typo field": ({"hosts": THREE_PMS, "vms": [{**GOOD_VM, "cpus": 3}]}, [], "vms.0.cpus"),
    "no hosts": ({"hosts": [], "vms": []}, [], "hosts"),
    "excluded unknown": ({"hosts": THREE_PMS, "excluded": ["pm7"]}, [], "excluded.0"),
    "malformed json": ('{"hosts": [', [], "Invalid JSON"),
    "base one": ({"hosts": THREE_PMS}, ["--base", "1"], "--base"),
    "base below one": ({"hosts": THREE_PMS}, ["--base", "0.5"], "--base"),
    "base not a number": ({"hosts": THREE_PMS}, ["--base", "two"], "--base"),
    "base nan": ({"hosts": THREE_PMS}, ["--base", "nan"], "--base"),
    "cpu as a string": ({"hosts": THREE_PMS, "vms": [{**GOOD_VM, "cpu": "10"}]}, [], "vms.0.cpu"),
    "cpu as a boolean": ({"hosts": THREE_PMS, "vms": [{**GOOD_VM, "cpu": True}]}, [], "vms.0.cpu"),
    "capacity as a string": ({"hosts": [{"name": "pm1", "capacity": "100"}]}, [], "hosts.0.capacity"),
    "name as a number": ({"hosts": [{"name": 1, "capacity": 100}]}, [], "hosts.0.name"),
    "duplicate key": ('{"hosts": [{"name": "pm1", "capacity": 100, "capacity": 5}]}', [], "'capacity' is given twice"),
    "cpu NaN constant": ('{"hosts": [{"name": "pm1", "capacity": 100, "cpu": NaN}]}', [], "hosts.0.cpu"),
    "sum past float's range": ({"hosts": THREE_PMS, "vms": [{**GOOD_VM, "cpu": 1e308},
                                                            {**GOOD_VM, "name": "vm2", "cpu": 1e308}]}, [], "vms.0.cpu"),
    "capacity too small": ({"hosts": [{"name": "pm1", "capacity": 1e-300}, THREE_PMS[1]], "vms": [GOOD_VM]}, [],
                           "hosts.0.capacity"),
    "capacity too large": ({"hosts": [{"name": "pm1", "capacity": 1e308}]}, [], "hosts.0.capacity"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_the_field(tmp_path, case):
    doc, extra, field = BAD_INPUTS[case]
    result = run_testbed("balance", write(tmp_path, doc), *extra)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error: "), result.stderr
    assert field in lines[0]


@pytest.mark.parametrize("policy", ["assign-u", "workload-balance", "stddev"])
def test_the_bounds_keep_every_policy_quiet(tmp_path, policy):
    """At the extremes the bounds allow, no policy warns (numpy would print on stderr) and the
    decision is an ordinary one."""
    hosts = [{"name": "pm1", "capacity": 1e-3}, {"name": "pm2", "capacity": 1e6}]
    vms = [{"name": f"vm{k}", "host": "pm1", "cpu": 1e6} for k in range(50)]
    result = run_testbed("balance", write(tmp_path, {"hosts": hosts, "vms": vms}), "--policy", policy)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout)["balanced"] in (True, False)


def test_an_endless_file_is_refused_after_a_bounded_read():
    result = run_testbed("balance", "/dev/zero")
    assert result.returncode == 2 and result.stderr == "testbed: error: /dev/zero: larger than 64 MiB, not a snapshot\n"


def test_missing_file_is_one_line(tmp_path):
    result = run_testbed("balance", str(tmp_path / "absent.json"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "absent.json" in result.stderr


def test_bench_prints_a_row_per_policy_with_the_ratio():
    result = run_testbed("bench", "balancer", "--hosts", "40", "--vms", "300", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"ratio size 40 hosts x 300 VMs", out)
    assert re.search(r"triple loop .* at ratio size: [\d.]+ ms, balanced", out)
    for name in ("assign-u", "workload-balance", "stddev"):
        row = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+.+?\s+([\d.]+)\s+(\d+)x$", out, re.MULTILINE)
        assert row, out
        assert float(row.group(4)) > 0
    assert re.search(r"^none\s+.*-$", out, re.MULTILINE)
