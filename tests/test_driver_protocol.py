"""Every driver class implements the Driver protocol by signature, not by name only: a
runtime_checkable Protocol's isinstance() checks that the methods exist, so a driver whose
migrate() took (vm, mode) would pass it. No lab: the classes are inspected, not instantiated."""

from __future__ import annotations

import inspect

import pytest

from testbed.drivers.base import Driver
from testbed.drivers.sim import SimDriver
from testbed.techniques import CATALOGUE

DRIVERS = [technique.driver_class() for technique in CATALOGUE.values()]
METHODS = sorted(name for name, member in vars(Driver).items() if inspect.isfunction(member)
                 and not name.startswith("_"))


def protocol_mismatches(cls: type) -> list[str]:
    """How `cls` departs from Driver: missing methods, parameters named, ordered or passed
    otherwise, extra parameters without a default, another return type, no `technique` string."""
    problems = [] if isinstance(getattr(cls, "technique", None), str) else ["technique: not a str class attribute"]
    for name in METHODS:
        method = getattr(cls, name, None)
        if not callable(method):
            problems.append(f"{name}: missing")
            continue
        want, got = inspect.signature(getattr(Driver, name)), inspect.signature(method)
        wanted = [(p.name, p.kind) for p in want.parameters.values()]
        given = list(got.parameters.values())
        if [(p.name, p.kind) for p in given[: len(wanted)]] != wanted:
            problems.append(f"{name}{got}: parameters are not {want}")
        elif any(p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 for p in given[len(wanted):]):
            problems.append(f"{name}{got}: extra parameters without a default")
        if str(got.return_annotation) != str(want.return_annotation):
            problems.append(f"{name}: returns {got.return_annotation}, not {want.return_annotation}")
    return problems


def test_the_protocol_has_the_methods_the_runner_calls():
    assert METHODS == ["cpu_use", "create_vm", "destroy_vm", "hosts", "list_vms", "migrate", "start_workload",
                       "wait_workload", "workload"]


@pytest.mark.parametrize("cls", DRIVERS, ids=lambda c: c.__name__)
def test_driver_implements_the_protocol(cls):
    assert protocol_mismatches(cls) == []


def test_a_driver_with_the_right_names_and_wrong_signatures_is_caught():
    class Sloppy(SimDriver):
        technique = "sloppy"

        def migrate(self, vm: str, mode) -> None:  # no destination, nothing returned
            return None

        def wait_workload(self, vm: str, workload_id: str, timeout_s: float, poll_s: float):
            return super().wait_workload(vm, workload_id, timeout_s)

    assert isinstance(Sloppy.__new__(Sloppy), Driver)  # what the old test checked: names only
    problems = protocol_mismatches(Sloppy)
    assert [p.split("(")[0].split(":")[0] for p in problems] == ["migrate", "migrate", "wait_workload",
                                                                   "wait_workload"], problems
