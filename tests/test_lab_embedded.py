"""The embedded lab for real: provisioned by site.yml (the `embedded_lab` fixture), reached over
SSH, idempotent, with its CPU quotas and link rates in force, refusing bad inventories before
creating anything, and leaving nothing behind when torn down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testbed.drivers.cgroups import join_then_exec
from testbed.lab import BRIDGE, CGROUP_CONTROLLERS, CGROUP_PARENT, CGROUP_ROOT, DEFAULT_INVENTORY, Lab
from testbed.playbooks import PLAYBOOKS, run_playbook

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, cgroups, sshd)"),
]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], check=False, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def on(lab: Lab, name: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.ssh_argv(lab.host(name), list(argv)), capture_output=True, text=True,
                          timeout=timeout, check=True)


def netns_names() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def test_every_host_answers_ansible_ping_over_ssh(embedded_lab: Lab) -> None:
    out = subprocess.run([str(BIN / "ansible"), "all", "-i", str(DEFAULT_INVENTORY), "-m", "ansible.builtin.ping",
                          "-o"], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    answered = {line.split(" | ")[0] for line in out.stdout.splitlines() if '"ping": "pong"' in line}
    assert answered == {h.name for h in embedded_lab.hosts}


def test_a_second_run_changes_nothing(embedded_lab: Lab) -> None:
    result = run_playbook(PLAYBOOKS / "site.yml", DEFAULT_INVENTORY)
    print(f"second site.yml run: {result.seconds:.1f} s")
    assert result.rc == 0, result.failures
    assert {"localhost"} | {h.name for h in embedded_lab.hosts} <= {h for h, n in result.hosts.items() if n["ok"]}
    assert {host: n["changed"] for host, n in result.hosts.items() if n["changed"]} == {}


def test_ssh_lands_in_the_hosts_namespace_and_cgroups(embedded_lab: Lab) -> None:
    for host in embedded_lab.hosts:
        cgroups = on(embedded_lab, host.name, "cat", "/proc/self/cgroup").stdout
        for controller in CGROUP_CONTROLLERS:
            assert any(line.split(":")[1] == controller and line.endswith(f"/{CGROUP_PARENT}/{host.name}")
                       for line in cgroups.splitlines()), (host.name, controller, cgroups)
        addrs = json.loads(on(embedded_lab, host.name, "ip", "-j", "addr", "show", "eth0").stdout)
        assert [a["local"] for a in addrs[0]["addr_info"] if a["family"] == "inet"] == [host.address]
        # The cgroup file system stays visible to what runs on a host (it manages its VMs' cgroups).
        assert on(embedded_lab, host.name, "test", "-d", str(host.cgroup("cpu"))).returncode == 0


def test_hosts_reach_each_other_and_nothing_outside_the_lab(embedded_lab: Lab) -> None:
    pm1, pm2 = embedded_lab.pms[:2]
    probe = "import socket,sys; s=socket.create_connection((sys.argv[1], 22), 5); print(s.recv(8).decode())"
    assert on(embedded_lab, pm1.name, "python3", "-c", probe, pm2.address).stdout.startswith("SSH-")
    for host in embedded_lab.hosts:
        routes = json.loads(subprocess.run(["ip", "-n", host.name, "-j", "route", "show"], capture_output=True,
                                           text=True, check=True).stdout)
        assert [(r["dst"], r["dev"]) for r in routes] == [(embedded_lab.network, "eth0")]
        shown = subprocess.run(["ip", "-j", "route", "get", host.address], capture_output=True, text=True,
                               check=True).stdout
        assert json.loads(shown)[0]["dev"] == BRIDGE


def test_cpu_quota_holds_a_busy_pm_to_its_capacity(embedded_lab: Lab) -> None:
    for host in embedded_lab.hosts:
        quota = int((host.cgroup("cpu") / "cpu.cfs_quota_us").read_text())
        assert quota == host.cfs_quota_us
    pm = embedded_lab.pms[0]
    usage = pm.cgroup("cpuacct") / "cpuacct.usage"
    before, started = int(usage.read_text()), time.monotonic()
    # Two bounded busy loops: more than the quota allows, so the quota is what limits them.
    on(embedded_lab, pm.name, "sh", "-c", "timeout 2 sh -c 'while :; do :; done' & "
       "timeout 2 sh -c 'while :; do :; done' & wait")
    cpus = (int(usage.read_text()) - before) / 1e9 / (time.monotonic() - started)
    print(f"{pm.name}: {cpus:.3f} CPUs used under a quota of {pm.capacity} CPUs")
    assert 0.3 * pm.capacity < cpus <= 1.1 * pm.capacity


def test_link_rate_is_within_20_percent_of_configured(embedded_lab: Lab) -> None:
    sender, receiver = embedded_lab.pms[:2]
    server = subprocess.Popen(embedded_lab.ssh_argv(receiver, ["timeout", "20", "iperf3", "-s", "-1"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # until the server listens (bounded: 5 s)
            if on(embedded_lab, receiver.name, "ss", "-Htln", "sport = :5201").stdout.strip():
                break
            time.sleep(0.1)
        report = json.loads(on(embedded_lab, sender.name, "iperf3", "-c", receiver.address, "-t", "3", "-J").stdout)
    finally:
        server.wait(timeout=25)
    rate = report["end"]["sum_received"]["bits_per_second"]
    print(f"{sender.name} -> {receiver.name}: {rate / 1e6:.1f} Mbit/s at {sender.link_rate}")
    assert abs(rate - sender.link_rate_bps) <= 0.2 * sender.link_rate_bps


def test_status_reads_back_what_the_machine_has(embedded_lab: Lab) -> None:
    out = cli("lab", "status")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert [h["name"] for h in status["hosts"]] == [h.name for h in embedded_lab.hosts]
    for seen, host in zip(status["hosts"], embedded_lab.hosts, strict=True):
        assert seen["reachable"] and seen["namespace"] and seen["address"] == host.address
        assert seen["cgroup_quota_cpus"] == pytest.approx(host.capacity)
        assert seen["tc_rate_bps"] == {"bridge_side": host.link_rate_bps, "host_side": host.link_rate_bps}


def test_a_pm_memory_cgroup_swaps_beyond_its_limit(embedded_lab: Lab) -> None:
    """With lab_host_swap_mb set (swap is opt-in: roles/lab_host/defaults), the role's swap file is
    on, and a process writing 64 MB in a 32 MB memory cgroup of a PM swaps (as a container's
    compile must) instead of being OOM-killed. The swap goes again at the end of the test."""
    swap_file = embedded_lab.state_dir / "swap"
    play = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(DEFAULT_INVENTORY), str(PLAYBOOKS / "lab_hosts.yml"),
                           "-e", "lab_host_swap_mb=64"], capture_output=True, text=True, timeout=600, check=False)
    group = CGROUP_ROOT / "memory" / CGROUP_PARENT / embedded_lab.pms[0].name / "test-swap"
    try:
        assert play.returncode == 0, play.stdout[-2000:]
        swaps = subprocess.run(["swapon", "--show=NAME,SIZE", "--bytes", "--noheadings", "--raw"],
                               capture_output=True, text=True, check=True).stdout.split()
        page = os.sysconf("SC_PAGE_SIZE")  # the swap header's
        assert str(swap_file) in swaps and int(swaps[swaps.index(str(swap_file)) + 1]) == 64 * 2**20 - page
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(32 * 2**20))
        writer = "b = bytearray(64 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint(sum(b[::4096]))"
        proc = subprocess.run([*join_then_exec([group / "cgroup.procs"]), sys.executable, "-c", writer],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0 and proc.stdout.strip() == str(64 * 2**20 // 4096), proc.stderr
        assert int((group / "memory.max_usage_in_bytes").read_text()) <= 32 * 2**20
        assert int((group / "memory.failcnt").read_text()) > 0  # it did reach the limit
    finally:
        if group.exists():
            group.rmdir()
        subprocess.run(["swapoff", str(swap_file)], capture_output=True, check=False)
        swap_file.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("hosts_yml", "message", "play_message"),
    [
        ({"controller": {"hosts": {"tb-bad0": {"testbed_address": "198.18.0.60"}}}}, "group 'pms' is missing",
         "inventory: needs a 'controller' group with exactly one host and a 'pms' group"),
        ({"controller": {"hosts": {"tb-bad0": {"testbed_address": "198.18.0.60"}}},
          "pms": {"hosts": {"tb-bad1": {"testbed_address": "192.0.2.61"}}}}, "host tb-bad1: testbed_address",
         "host tb-bad1: testbed_address 192.0.2.61 is outside"),
        ({"controller": {"hosts": {"tb-bad0": {"testbed_address": "198.18.0.60"}}},
          "pms": {"hosts": {"tb-bad1": {"testbed_address": "198.18.0.61", "testbed_capacity": 0}}}},
         "host tb-bad1: testbed_capacity", "host tb-bad1: testbed_capacity must be > 0"),
    ],
)
def test_bad_inventory_fails_before_anything_is_created(tmp_path: Path, hosts_yml: dict, message: str,
                                                        play_message: str) -> None:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text((DEFAULT_INVENTORY / "group_vars" / "all.yml").read_text())
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": hosts_yml}}))
    before = netns_names()
    out = cli("lab", "up", "-i", str(tmp_path))
    assert out.returncode == 2 and out.stderr.startswith("testbed: error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # The playbook refuses it too (for whoever runs ansible-playbook directly).
    play = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path), str(PLAYBOOKS / "lab_hosts.yml")],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert play.returncode != 0 and play_message in play.stdout, play.stdout  # the role's own check refused it
    assert netns_names() == before
    assert not any(name.startswith("tb-bad") for name in netns_names())


@pytest.mark.lab_teardown
def test_teardown_leaves_nothing(embedded_lab: Lab) -> None:
    out = cli("lab", "down")
    assert out.returncode == 0, out.stderr
    assert not [n for n in netns_names() if n.startswith("tb-")]
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    assert not [c for c in CGROUP_CONTROLLERS if (CGROUP_ROOT / c / CGROUP_PARENT).exists()]
    assert not embedded_lab.state_dir.exists(), sorted(map(str, embedded_lab.state_dir.rglob("*")))
    survivors = []
    for proc in Path("/proc").iterdir():
        try:
            if str(embedded_lab.state_dir).encode() in (proc / "cmdline").read_bytes():
                survivors.append(proc.name)
        except OSError:
            continue
    assert survivors == []
