"""The technique catalogue (testbed/techniques.py) is the one place that lists techniques, and
what it says is what spec validation, the runner, the LC, the sampler, the simulator and the bench
do. No lab: nothing here makes a driver that touches a host."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from testbed.drivers.base import Host, MigrationMode
from testbed.errors import InputError
from testbed.manager.sampler import vm_reader
from testbed.runner import executor, migration_study
from testbed.sim.calibration import Calibration
from testbed.sim.executor import SimExecutor
from testbed.spec import Compression, Mode, Technique, parse_spec
from testbed.techniques import (
    BENCHED,
    CATALOGUE,
    EMBEDDED,
    REAL_LAB,
    REAL_RUNNABLE,
    RUNNABLE,
    SIMULATOR,
    SPEC_NAMES,
    make_driver,
    technique,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "testbed"
CATALOGUE_MODULE = PACKAGE / "techniques.py"
BASE = {"name": "t", "techniques": ["qemu"], "matrix": {"layout": ["balanced"], "migration": [True]}}


def technique_collections(path: Path, root: Path = REPO) -> list[str]:
    """Tuples, lists, sets and dict keys in `path` that spell two or more technique names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [key for key in node.keys if key is not None]
        else:
            continue
        names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in CATALOGUE]
        if len(names) >= 2:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {names}")
    return found


def test_the_technique_list_is_spelled_in_the_catalogue_only() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != CATALOGUE_MODULE
             for hit in technique_collections(path)]
    assert found == []
    assert technique_collections(CATALOGUE_MODULE) == []  # it lists entries, and derives the name lists
    assert list(CATALOGUE) == ["qemu", "container", "xen", "openvz", "kvm", "sim"]


def test_the_grep_finds_lists_of_technique_names(tmp_path: Path) -> None:
    module = tmp_path / "elsewhere.py"
    module.write_text('TECHNIQUES = ("qemu", "container")\nMODES = {"xen": 1, "openvz": 2}\nONE = ["sim"]\n'
                      'if mimics in {"kvm", "other"}:\n    pass\n')  # one name among others: no list
    assert technique_collections(module, tmp_path) == ["elsewhere.py:1: ['qemu', 'container']",
                                                       "elsewhere.py:2: ['xen', 'openvz']"]


def test_every_entry_is_consistent_and_names_its_driver() -> None:
    modes, compressions = set(typing.get_args(Mode)), set(typing.get_args(Compression))
    for name, entry in CATALOGUE.items():
        assert entry.name == name
        assert entry.driver_class().technique == name  # the driver reports the catalogue's name
        assert entry.default_mode in entry.modes and set(entry.modes) <= modes == {m.value for m in MigrationMode}
        assert "none" in entry.compressions and set(entry.compressions) <= compressions
    assert set(RUNNABLE) == set(EMBEDDED) | set(REAL_RUNNABLE) and SIMULATOR not in RUNNABLE
    assert typing.get_args(Technique) == SPEC_NAMES


def test_the_embedded_techniques_xen_libvirt_and_openvz_are_runnable_and_the_simulator_says_why() -> None:
    assert EMBEDDED == BENCHED == ("qemu", "container")
    assert REAL_RUNNABLE == ("xen", "openvz", "kvm") and RUNNABLE == (*EMBEDDED, *REAL_RUNNABLE)
    assert set(REAL_RUNNABLE) <= set(REAL_LAB) <= set(SPEC_NAMES)  # a real lab's own; in specs
    assert "testbed sim run" in technique(SIMULATOR).unrunnable


def test_importing_the_catalogue_or_a_spec_imports_no_driver() -> None:
    code = ("import sys, testbed.spec, testbed.techniques; "
            "print(sorted(m for m in sys.modules if m.startswith('testbed.drivers.') and m != 'testbed.drivers.base'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=60)
    assert done.stdout.strip() == "[]"


def test_an_unknown_technique_is_an_input_error_naming_the_known_ones() -> None:
    with pytest.raises(InputError, match=r"unknown technique 'vmware' \(known: qemu, container, xen, openvz, kvm, sim\)"):
        technique("vmware")
    with pytest.raises(InputError, match="techniques.0: Input should be 'qemu', 'container', 'xen', 'openvz', 'kvm' or 'sim'"):
        parse_spec(BASE | {"techniques": ["vmware"]})
    with pytest.raises(ValueError, match="'vmware' has no driver here"):
        make_driver("vmware", [])


@pytest.mark.parametrize("runner", [executor, migration_study])
def test_the_runners_refuse_what_the_catalogue_cannot_run_before_any_host(runner) -> None:
    change = {"kind": "migration", "vms": 1, "matrix": {"layout": [[1, 0, 0]], "migration": [True]}} \
        if runner is migration_study else {}
    spec = parse_spec(BASE | {"techniques": [SIMULATOR]} | change)
    with pytest.raises(InputError, match=r"techniques: 'sim' is not run by .* yet: it is simulated: `testbed sim run "
                                         r"SPEC`.*\(available: qemu, container, xen, openvz, kvm; use --technique\)"):
        runner.supported(spec, [SIMULATOR])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"techniques": ["xen"], "balancer": {"mode": "postcopy"}},
         "balancer.mode: postcopy: technique xen migrates by precopy or stopcopy only"),
        ({"techniques": ["openvz"], "matrix": BASE["matrix"] | {"mode": ["stopcopy", "precopy"]}},
         "matrix.mode.1: precopy: technique openvz migrates by stopcopy only"),
        ({"techniques": ["openvz"], "balancer": {"compression": "bzip2"}},
         "balancer.compression: bzip2: technique openvz does not compress migrations"),
        ({"techniques": ["qemu"], "balancer": {"compression": "zstd", "mode": "postcopy"}},
         "balancer.compression: zstd: QEMU cannot compress a post-copy migration"),
    ],
)
def test_a_spec_is_checked_against_the_catalogues_modes_and_compressions(change: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_spec(BASE | change)


def test_the_simulator_accepts_every_mode_and_compression_of_a_lab_spec() -> None:
    """It models the modes and not compression: a lab spec simulates unchanged."""
    for mode in typing.get_args(Mode):
        for compression in typing.get_args(Compression):
            parse_spec(BASE | {"techniques": [SIMULATOR], "balancer": {"mode": mode, "compression": compression}})


@pytest.mark.parametrize(("mimics", "mode"), [("qemu", "precopy"), ("container", "stopcopy"),
                                              ("openvz", "stopcopy"), ("xen", "precopy"), ("unknown", "precopy")])
def test_the_simulator_migrates_in_the_mimicked_techniques_mode(mimics: str, mode: str) -> None:
    assert SimExecutor(Calibration(mimics=mimics), "test").default_mode() == mode


def test_the_real_lab_techniques_are_the_inventorys_and_the_samplers() -> None:
    """playbooks/technique.yml accepts exactly the catalogue's real-lab techniques, and the sampler
    reads the VMs of those only (test_sampler: each has a reader), Xen's through its own PM sampler
    (dom0's /proc/stat does not see the guests)."""
    play = yaml.safe_load((REPO / "playbooks" / "technique.yml").read_text())[0]
    check = play["pre_tasks"][0]["ansible.builtin.assert"]["that"]
    variable, _, accepted = check.partition(" in ")
    assert variable == "testbed_technique | default('')" and set(ast.literal_eval(accepted)) == set(REAL_LAB)
    with pytest.raises(ValueError, match=r"no VM CPU source for 'qemu' \(known: container, openvz, kvm, none\)"):
        vm_reader("qemu", Host("pm1", "198.18.0.11", 1.0, 4))
    assert [name for name in REAL_LAB if technique(name).pm_sampler] == ["xen"]
