"""testbed.lab: reading and validating lab inventories (no root needed, nothing is created)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import InputError
from testbed.lab import DEFAULT_INVENTORY, load_lab, machine_cores, parse_rate, tbf_options


def write_inventory(root: Path, pms: dict[str, dict] | None, controller: dict | None = None,
                    **lab_vars: object) -> Path:
    """An inventory directory shaped like inventory/local, with the given hosts and variables."""
    groups: dict[str, dict] = {}
    groups["controller"] = {"hosts": {"tb-ctl": controller or {"testbed_address": "198.18.0.10"}}}
    if pms is not None:
        groups["pms"] = {"hosts": pms}
    (root / "group_vars").mkdir(parents=True)
    (root / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": groups}}))
    defaults = {"testbed_embedded": True, "testbed_lab_network": "198.18.0.0/24",
                "testbed_lab_gateway": "198.18.0.1", "testbed_capacity": 0.1} | lab_vars
    (root / "group_vars" / "all.yml").write_text(yaml.safe_dump(defaults))
    return root


def test_local_inventory_is_the_contract_lab() -> None:
    lab = load_lab(DEFAULT_INVENTORY)
    assert lab.embedded and lab.network == "198.18.0.0/24" and lab.gateway == "198.18.0.1"
    assert lab.controller.name == "tb-ctl" and lab.controller.address == "198.18.0.10"
    assert [(pm.name, pm.address) for pm in lab.pms] == [(f"tb-pm{i}", f"198.18.0.{10 + i}") for i in (1, 2, 3)]
    expected = round(0.3 * machine_cores(), 2)
    for host in lab.hosts:
        assert host.capacity == pytest.approx(expected)
        assert (host.cores, host.link_rate, host.link_rate_bps) == (4, "100mbit", 100_000_000)
        assert host.cfs_quota_us == round(expected * 100_000)
    assert lab.host("tb-pm2").veth == "tbv-pm2"
    assert str(lab.host("tb-pm2").cgroup("cpuacct")) == "/sys/fs/cgroup/cpuacct/testbed/tb-pm2"


def test_pm_count_is_the_range_bound(tmp_path: Path) -> None:
    text = (DEFAULT_INVENTORY / "hosts.yml").read_text().replace("tb-pm[1:3]", "tb-pm[1:2]")
    (tmp_path / "hosts.yml").write_text(text)
    (tmp_path / "group_vars").symlink_to(DEFAULT_INVENTORY / "group_vars")
    assert [pm.address for pm in load_lab(tmp_path).pms] == ["198.18.0.11", "198.18.0.12"]


@pytest.mark.parametrize(
    ("pms", "lab_vars", "message"),
    [
        (None, {}, "group 'pms' is missing"),
        ({}, {}, "group 'pms' is missing"),
        ({"tb-pm1": {"testbed_address": "198.18.1.11"}}, {}, "host tb-pm1: testbed_address: 198.18.1.11 is outside"),
        ({"tb-pm1": {"testbed_address": "10.0.0.1"}}, {}, "host tb-pm1: testbed_address: 10.0.0.1 is outside"),
        ({"tb-pm1": {"testbed_address": "198.18.0.255"}}, {}, "host tb-pm1: testbed_address"),
        ({"tb-pm1": {"testbed_address": "bogus"}}, {}, "host tb-pm1: testbed_address: 'bogus' is not an address"),
        ({"tb-pm1": {"testbed_address": "198.18.0.1"}}, {}, "host tb-pm1: testbed_address: 198.18.0.1 is the lab gateway"),
        ({"tb-pm1": {"testbed_address": "198.18.0.10"}}, {}, "host tb-pm1: testbed_address: 198.18.0.10 is also tb-ctl's"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_capacity": 0}}, {}, "host tb-pm1: testbed_capacity: must be > 0"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_capacity": -0.5}}, {}, "host tb-pm1: testbed_capacity"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_capacity": "x"}}, {}, "testbed_capacity: 'x' is not a number"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_cores": 0}}, {}, "host tb-pm1: testbed_cores"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_link_rate": "fast"}}, {}, "host tb-pm1: testbed_link_rate"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11"}}, {"testbed_lab_network": "nonsense"}, "testbed_lab_network"),
        ({"tb-averyverylongname": {"testbed_address": "198.18.0.11"}}, {}, "host tb-averyverylongname: name"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_lc_endpoint": "198.18.0.10"}}, {},
         "host tb-pm1: testbed_lc_endpoint: '198.18.0.10' is not ADDRESS:PORT"),
        ({"tb-pm1": {"testbed_address": "198.18.0.11", "testbed_lc_endpoint": "198.18.0.10:70000"}}, {},
         "host tb-pm1: testbed_lc_endpoint"),
    ],
)
def test_bad_inventory_is_refused_naming_host_and_field(tmp_path: Path, pms, lab_vars, message) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        load_lab(write_inventory(tmp_path, pms, **lab_vars))
    assert "\n" not in str(err.value)


def test_pm_capacities_must_fit_on_the_machine(tmp_path: Path) -> None:
    per_pm = machine_cores() / 2 + 0.01
    pms = {f"tb-pm{i}": {"testbed_address": f"198.18.0.{10 + i}", "testbed_capacity": per_pm} for i in (1, 2)}
    with pytest.raises(InputError, match="PMs' capacities add up to"):
        load_lab(write_inventory(tmp_path, pms))


def test_missing_inventory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_lab(tmp_path / "nope")


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["bit", "kbit", "mbit", "gbit", "Mbit"]))
def test_parse_rate_uses_tc_si_units(value: int, unit: str) -> None:
    scale = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}[unit.lower()]
    assert parse_rate(f"{value}{unit}") == value * scale


@pytest.mark.parametrize("rate", ["", "100", "mbit", "100 mb", "100mbps", "-1mbit"])
def test_parse_rate_refuses_what_tc_would_not_take(rate: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(rate)


def test_a_failed_task_is_reported_with_its_commands_last_error_line() -> None:
    """"non-zero return code" alone sends the reader to the artifacts; the command's first stderr
    line naming an error (else its last line) usually says what went wrong."""
    from testbed.playbooks import Progress

    progress = Progress()
    progress.handle({"event": "runner_on_failed", "event_data": {
        "host": "tb-pm1", "task": "Build the guest image",
        "res": {"msg": "non-zero return code", "stderr": "In file included from x.c:1:\nx.h:3: error: 'f' defined but not used\n"
                                                       "cc1: all warnings being treated as errors"}}})
    progress.handle({"event": "runner_on_failed", "event_data": {
        "host": "tb-pm3", "task": "Probe", "res": {"msg": "non-zero return code", "stderr": "no kvm\n"}}})
    progress.handle({"event": "runner_on_failed", "event_data": {
        "host": "tb-pm2", "task": "Copy", "res": {"msg": "Destination not writable"}}})
    assert progress.failures == [
        "tb-pm1: Build the guest image: non-zero return code (x.h:3: error: 'f' defined but not used)",
        "tb-pm3: Probe: non-zero return code (no kvm)",
        "tb-pm2: Copy: Destination not writable"]


def test_tbf_options_are_the_embedded_labs_bucket_and_queue() -> None:
    """What link_shaping and the bench install is what lab_host installs (its defaults)."""
    defaults = yaml.safe_load((Path(__file__).parent.parent / "roles/lab_host/defaults/main.yml").read_text())
    assert tbf_options(100_000_000) == ["rate", "100000000bit", "burst", "125000", "latency", "50ms"]
    assert tbf_options(1_000_000)[3] == str(defaults["lab_host_tbf_min_burst_bytes"])
    assert tbf_options(800_000_000)[3] == str(int(800_000_000 / 8 * defaults["lab_host_tbf_burst_seconds"]))
    assert tbf_options(1)[5] == defaults["lab_host_tbf_latency"]


def test_a_pms_lc_is_on_the_pm_unless_the_inventory_puts_it_elsewhere(tmp_path: Path) -> None:
    """`testbed_lc_endpoint` (the 2010 profile's PMs cannot run the LC: it runs on another host and
    reaches its PM over SSH) is where the CC and `manager status` find the PM's LC."""
    from testbed.manager.api import lc_url

    pms = {"tb-pm1": {"testbed_address": "198.18.0.11"},
           "tb-pm2": {"testbed_address": "198.18.0.12", "testbed_lc_endpoint": "198.18.0.10:7422"}}
    lab = load_lab(write_inventory(tmp_path, pms))
    assert [lc_url(pm, 7420) for pm in lab.pms] == ["http://198.18.0.11:7420", "http://198.18.0.10:7422"]
