"""The real-lab profiles: both example inventories lint, syntax-check and load as labs; the roles'
OS checks refuse what they do not support; and (marked `lab`) the Debian 12 paths provision fresh
Debian test hosts for real, twice, the second run changing nothing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from run_checks import SMALL_EXP1, check_cc_moves, check_runs

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLES = ("example-2010", "example-modern")
ENV = os.environ | {
    "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
}


def run(argv: list[str], timeout: int = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=REPO, env=ENV, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_playbooks_and_roles_pass_ansible_lint_production() -> None:
    proc = run([str(BIN / "ansible-lint"), "--profile", "production", "playbooks", "roles"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("inventory", EXAMPLES)
def test_site_playbook_syntax_checks_on_each_example(inventory: str) -> None:
    proc = run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            f"inventory/{inventory}",
            "playbooks/site.yml",
            "--syntax-check",
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("inventory", "technique"), [("example-2010", "xen"), ("example-modern", "kvm")])
def test_examples_describe_one_controller_and_three_pms(inventory: str, technique: str) -> None:
    proc = run([str(BIN / "ansible-inventory"), "-i", f"inventory/{inventory}", "--list"])
    assert proc.returncode == 0, proc.stderr
    import json

    data = json.loads(proc.stdout)
    assert data["controller"]["hosts"] == ["ctl"] and data["pms"]["hosts"] == ["pm1", "pm2", "pm3"]
    pm1 = data["_meta"]["hostvars"]["pm1"]
    assert pm1["testbed_embedded"] is False and pm1["testbed_technique"] == technique


def test_the_2010_profile_bootstraps_python_26() -> None:
    """CentOS 5's Python 2.4 is beyond every ansible-core: the 2010 inventory names EPEL's
    python2.6 and asks for the raw bootstrap; the modern one uses Debian's python3."""
    old = (REPO / "inventory/example-2010/group_vars/lab.yml").read_text()
    assert "ansible_python_interpreter: /usr/bin/python2.6" in old
    assert (
        "testbed_python_bootstrap: true" in (REPO / "inventory/example-2010/group_vars/all.yml").read_text()
    )
    assert "/usr/bin/python3" in (REPO / "inventory/example-modern/group_vars/lab.yml").read_text()


def local_pm_inventory(path: Path, technique: str) -> Path:
    """A real-lab inventory whose one PM (and controller) is this machine, reached locally: the OS
    checks then judge this Debian 12 machine, without touching it (they fail first)."""
    path.write_text(
        "[controller]\nlocal-ctl ansible_connection=local\n[pms]\nlocal-pm ansible_connection=local\n"
        f"[all:vars]\ntestbed_embedded=false\ntestbed_technique={technique}\n"
        f"ansible_python_interpreter={sys.executable}\n"
    )
    return path


@pytest.mark.lab  # technique.yml against this machine: if the refusal broke, it would provision it
@pytest.mark.parametrize(
    ("technique", "message"),
    [
        ("openvz", "testbed_technique openvz needs the 2010 profile (CentOS 5"),
        ("bogus", "testbed_technique must be xen, openvz (CentOS 5), kvm or container"),
    ],
)
def test_unsupported_combinations_fail_early_with_a_clear_message(
    tmp_path: Path, technique: str, message: str
) -> None:
    proc = run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(local_pm_inventory(tmp_path / "hosts", technique)),
            "playbooks/technique.yml",
        ]
    )
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-3000:]
    assert "changed=0" in proc.stdout  # refused before changing anything


def test_os_facts_names_this_debian_and_refuses_an_unlisted_os(tmp_path: Path) -> None:
    playbook = tmp_path / "os.yml"
    playbook.write_text(
        "- hosts: local-pm\n  gather_facts: false\n  roles: [os_facts]\n"
        "  post_tasks:\n    - ansible.builtin.debug: {msg: 'profile={{ os_facts_profile }}'}\n"
    )
    inventory = local_pm_inventory(tmp_path / "hosts", "kvm")
    proc = run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)])
    assert proc.returncode == 0 and "profile=debian12" in proc.stdout, proc.stdout[-3000:]
    proc = run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(inventory),
            str(playbook),
            "-e",
            '{"os_facts_supported": {"CentOS5": "centos5"}}',
        ]
    )
    assert proc.returncode != 0 and "local-pm: Debian 12 is not supported" in proc.stdout, proc.stdout[-3000:]


# --- Fresh Debian 12 hosts, provisioned for real --------------------------------------------------
# scripts/debian-test-hosts.sh boots the cached debootstrap root (built by
# scripts/debian-test-root.sh when absent: ~65 s here) as systemd-nspawn hosts in namespaces tr-*.
TEST_HOSTS = {"tr-ctl": "198.18.0.240", "tr-pm1": "198.18.0.241", "tr-pm2": "198.18.0.242"}
HOSTS_SCRIPT = REPO / "scripts" / "debian-test-hosts.sh"
KEY = Path("/var/lib/testbed-tr/id_ed25519")
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=\d+\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


def write_inventory(
    path: Path, technique: str, pms: tuple[str, ...] = ("tr-pm1",), settings: dict | None = None
) -> Path:
    """The modern profile's settings for the test hosts (the example's addresses are a real
    site's), PMs `pms` (tr-pm2 is booted but only in the inventories that name it). chronyd runs
    with -x: the hosts share this machine's clock. The VM manager's token on this machine is the
    test's own (`token_file(path)`), not the embedded lab's. `settings` go to group_vars/all."""
    import yaml

    (path / "group_vars").mkdir(parents=True, exist_ok=True)
    hosts = {name: {"testbed_address": address} for name, address in TEST_HOSTS.items()}
    (path / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "lab": {
                            "children": {
                                "controller": {"hosts": {"tr-ctl": hosts["tr-ctl"]}},
                                "pms": {"hosts": {name: hosts[name] for name in pms}},
                            }
                        }
                    }
                }
            }
        )
    )
    modern = yaml.safe_load((REPO / "inventory/example-modern/group_vars/all.yml").read_text())
    modern |= {
        "testbed_lab_network": "198.18.0.0/24",
        "testbed_lab_gateway": "198.18.0.250",
        "testbed_capacity": 0.5,
        "testbed_technique": technique,
        "ntp_discipline": False,
        "balancer_local_token_file": str(token_file(path)),
    } | (settings or {})
    (path / "group_vars/all.yml").write_text(yaml.safe_dump(modern))
    lab = yaml.safe_load((REPO / "inventory/example-modern/group_vars/lab.yml").read_text())
    lab |= {
        "ansible_ssh_private_key_file": str(KEY),
        "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
    }
    (path / "group_vars/lab.yml").write_text(yaml.safe_dump(lab))
    return path


def token_file(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".token")


def play(
    inventory: Path,
    *playbooks: str,
    check: bool = False,
    limit: str | None = None,
) -> dict[str, int]:
    """Run playbooks in order; per host, the tasks they changed in all (fails on a failure)."""
    changed: dict[str, int] = {}
    for playbook in playbooks:
        proc = run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(inventory),
                f"playbooks/{playbook}",
                *(["--check"] if check else []),
                *(["--limit", limit] if limit else []),
            ],
            timeout=1200,
        )
        recap = {m["host"]: m for m in RECAP.finditer(proc.stdout)}
        assert proc.returncode == 0 and recap, (
            f"{playbook}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}{failed_hosts_logs(recap)}"
        )
        for host, match in recap.items():
            changed[host] = changed.get(host, 0) + int(match["changed"])
    return changed


# What a failed play leaves on a test host that its output does not show: systemd's reasons (a unit
# that did not start) and the logs of daemons that write their own (ganesha's FATAL lines).
HOST_LOGS = (
    "journalctl --no-pager -n 40 -p notice | grep -v 'Failed to kill control group'; "
    "tail -n 25 /var/log/ganesha/ganesha.log 2>/dev/null"
)


def failed_hosts_logs(recap: dict[str, re.Match[str]]) -> str:
    """The recent logs of the test hosts where a play failed, so that CI's output says why."""
    logs = []
    for host, match in recap.items():
        if int(match["failed"]) and host in TEST_HOSTS:
            try:
                out = run([*on_host(host), HOST_LOGS], timeout=30).stdout
            except subprocess.TimeoutExpired:
                out = "(no answer in 30 s)"
            logs.append(f"\n--- {host}'s logs ---\n{out[-3000:]}")
    return "".join(logs)


@pytest.fixture(scope="module")
def debian_hosts() -> Iterator[None]:
    missing = [tool for tool in ("debootstrap", "systemd-nspawn", "apt-cacher-ng") if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root and {', '.join(missing) or 'nothing else'} (deps/apt-packages.txt)")
    hosts = [f"{name.removeprefix('tr-')}={address}" for name, address in TEST_HOSTS.items()]
    proc = subprocess.run(
        ["bash", str(HOSTS_SCRIPT), "up", *hosts], capture_output=True, text=True, timeout=900, check=False
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield
    finally:
        subprocess.run(["bash", str(HOSTS_SCRIPT), "down"], capture_output=True, timeout=120, check=False)


def on_host(name: str) -> list[str]:
    """`ssh` to a test host as root; append one shell command line."""
    return [
        "ssh",
        "-i",
        str(KEY),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=error",
        "root@" + TEST_HOSTS[name],
    ]


def host_state(name: str) -> Path:
    """What scripts/debian-test-hosts.sh keeps of a test host on this machine: its root file
    system (merged/), the pid of its systemd-nspawn (nspawn.pid)."""
    return KEY.parent / name.removeprefix("tr-")


def host_cgroups(name: str) -> dict[str, str]:
    """A test host's cgroups (hierarchy → path) as this machine's /proc shows its init: the
    systemd child of the host's systemd-nspawn, not what the host's own systemd reports."""
    nspawn = (host_state(name) / "nspawn.pid").read_text().strip()
    init = subprocess.run(
        ["pgrep", "-P", nspawn, "-x", "systemd"], capture_output=True, text=True, check=False
    )
    assert init.stdout.strip(), f"{name}: no init under systemd-nspawn {nspawn}"
    lines = Path(f"/proc/{init.stdout.split()[0]}/cgroup").read_text().splitlines()
    return {hierarchy: path for _, hierarchy, path in (line.split(":", 2) for line in lines)}


@pytest.mark.lab
def test_each_test_host_runs_in_a_cgroup_of_its_own(debian_hosts: None) -> None:
    """Shared (all in /payload), the hosts' systemd managed one cgroup per unit name between them:
    starts failed with 219/CGROUP and a stopped nfs-ganesha kept running (docs/DESIGN.md)."""
    cgroups = {name: host_cgroups(name) for name in TEST_HOSTS}
    for hierarchy in ("name=systemd", ""):  # "" is the cgroup2 hierarchy's line, 0::PATH
        paths = {name: groups[hierarchy] for name, groups in cgroups.items()}
        assert len(set(paths.values())) == len(paths), paths
        for name, path in paths.items():
            assert path.startswith(f"/testbed-{name}/"), paths


@pytest.mark.lab
@pytest.mark.slow
def test_debian_paths_provision_fresh_hosts_idempotently(debian_hosts: None, tmp_path: Path) -> None:
    """common, ntp and the container and kvm techniques (criu, libvirt) on fresh Debian 12 hosts:
    the first run changes them, the second changes nothing."""
    for technique in ("container", "kvm"):
        # The guest image and the KVM probe: test_libvirt_live_migrates_a_tcg_domain_between_test_hosts
        inventory = write_inventory(tmp_path / technique, technique, settings={"libvirt_guest_image": False})
        first = play(inventory, "common.yml", "ntp.yml", "technique.yml")
        assert first["tr-pm1"] > 0
        assert play(inventory, "common.yml", "ntp.yml", "technique.yml") == {"tr-ctl": 0, "tr-pm1": 0}
    state = run([*on_host("tr-pm1"), "cat /var/lib/testbed/criu-check; systemctl is-active libvirtd chrony"])
    assert state.stdout.split() in (["ok", "active", "active"], ["fail", "active", "active"]), state


@pytest.mark.lab
@pytest.mark.slow
def test_debian_paths_that_cannot_run_here_pass_check_mode(debian_hosts: None, tmp_path: Path) -> None:
    """Kernel NFS (no nfsd here) and Xen (no hypervisor to boot) are covered in --check mode."""
    inventory = write_inventory(tmp_path / "xen", "xen")
    assert play(inventory, "common.yml", "vm_storage.yml", "technique.yml", check=True)["tr-pm1"] > 0


# The real-lab branch of the balancer role: tr-ctl's Central Controller as a systemd unit. The
# limits keep every play off this machine's embedded lab (teardown.yml's localhost play).
CC_STATUS = f"http://{TEST_HOSTS['tr-ctl']}:7421/v1/status"
LC_SAMPLE = f"http://{TEST_HOSTS['tr-pm1']}:7420/v1/sample"


@pytest.mark.lab
@pytest.mark.slow
def test_balancer_runs_the_central_controller_as_a_systemd_unit(debian_hosts: None, tmp_path: Path) -> None:
    """The package from a wheelhouse (no package index on the host), the inventory and the 0600
    token under /etc/testbed, the CC as an enabled unit that answers only with the token and
    that `testbed manager status` reaches; a second run changes nothing; teardown stops it."""
    import json

    import httpx

    inventory = write_inventory(tmp_path / "lab", "container")
    assert play(inventory, "balancer.yml", limit="tr-ctl")["tr-ctl"] > 0
    assert play(inventory, "balancer.yml", limit="tr-ctl") == {"tr-ctl": 0}
    state = run(
        [
            *on_host("tr-ctl"),
            "systemctl is-active testbed-cc; systemctl is-enabled testbed-cc; stat -c %a /etc/testbed/manager.token",
        ]
    )
    assert state.stdout.split() == ["active", "enabled", "600"], state
    assert httpx.get(CC_STATUS, timeout=10).status_code == 401
    assert httpx.get(CC_STATUS, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    status = run(
        [
            str(BIN / "testbed"),
            "manager",
            "status",
            "-i",
            str(inventory),
            "--token-file",
            str(token_file(inventory)),
        ]
    )
    assert status.returncode == 0, status.stdout + status.stderr
    cc = json.loads(status.stdout)["cc"]
    assert cc["reachable"] and cc["config"]["dry_run"] and list(cc["lcs"]) == ["tr-pm1"], cc
    assert play(inventory, "teardown.yml", limit="tr-ctl")["tr-ctl"] == 1
    state = run([*on_host("tr-ctl"), "systemctl is-active testbed-cc; systemctl is-enabled testbed-cc"])
    assert state.stdout.split() == ["inactive", "disabled"], state


@pytest.mark.lab
@pytest.mark.slow
def test_balancer_runs_a_local_controller_on_a_real_pm(debian_hosts: None, tmp_path: Path) -> None:
    """tr-pm1's LC as a systemd unit answering only with the token, sampling the real host (no
    lab cgroup there): its CPU use from /proc/stat, in percent of its CPUs, and no VMs. While
    a busy loop spins on the host at least one of its CPUs is never idle, so the sample shows
    at least about half of a 2-CPU machine busy, whatever else the machine runs."""
    import json

    import httpx

    inventory = write_inventory(tmp_path / "lab", "container")
    proc = run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(inventory),
            "playbooks/balancer.yml",
            "--limit",
            "tr-pm1",
            "--extra-vars",
            json.dumps({"balancer_wait_timeout": 60}),
        ],
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    token = {"Authorization": f"Bearer {token_file(inventory).read_text().strip()}"}
    assert httpx.get(LC_SAMPLE, timeout=10).status_code == 401
    time.sleep(2.5)  # the LC has just started: let it sample two seconds
    sample = httpx.get(LC_SAMPLE, params={"window": 2}, headers=token, timeout=10)
    assert sample.status_code == 200, sample.text
    first = sample.json()
    assert first["host"] == "tr-pm1" and first["vms"] == [] and first["capacity"] >= 1, first
    assert isinstance(first["use"], float) and 0 <= first["use"] <= 100 and first["window"] >= 1.5, first
    cpus = first["capacity"]
    with subprocess.Popen([*on_host("tr-pm1"), "timeout 8 sh -c 'while :; do :; done'"]) as loop:
        time.sleep(6)
        busy = httpx.get(LC_SAMPLE, params={"window": 4}, headers=token, timeout=10).json()
        loop.wait(timeout=30)
    assert 100 / cpus * 0.8 <= busy["use"] <= 100 and busy["window"] >= 3, (first, busy)


# --- libvirt live migration between two test hosts -----------------------------------------------
# No /dev/kvm in the test hosts: the KVM probe answers tcg and the domain is type qemu. Each PM
# serves its share with nfs-ganesha (no kernel NFS here) and QEMU opens the disk over nfs://; the
# guest's serial console is a TCP server on whichever PM runs it (the guest's workload channel:
# roles/qemu/files/guest-init).
KVM_SETTINGS = {
    "vm_storage_nfs_server": "ganesha",
    # libvirt cannot create cgroups inside a systemd-nspawn host (read-only cgroup v1 hierarchies).
    "libvirt_qemu_settings": {"cgroup_controllers": "[ ]"},
}
def known_hosts(path: Path, hosts: tuple[str, ...]) -> Path:
    """The test hosts' keys, read from their own root file systems, not over the network: the
    drivers refuse hosts whose key they do not know (testbed.drivers.ssh.ssh_client)."""
    rows = []
    for name in hosts:
        pub = host_state(name) / "merged/etc/ssh/ssh_host_ed25519_key.pub"
        kind, key = pub.read_text().split()[:2]
        rows.append(f"{TEST_HOSTS[name]} {kind} {key}\n")
    path.write_text("".join(rows))
    return path


def qemu_pids(host: str, vm: str) -> list[int]:
    """The host's QEMU processes of domain `vm`, read from its process table, not from libvirt."""
    # [q]: the pattern does not match the shell running pgrep, whose command line holds it.
    proc = run([*on_host(host), f"pgrep -f '[q]emu-system-x86_64 -name guest={vm},' || true"])
    return [int(pid) for pid in proc.stdout.split()]


@pytest.mark.lab
@pytest.mark.slow
def test_libvirt_live_migrates_a_tcg_domain_between_test_hosts(debian_hosts: None, tmp_path: Path) -> None:
    """The kvm technique's roles on two fresh test hosts (storage over nfs-ganesha, libvirt, the
    PMs' root keys, the guest image and the KVM probe), idempotent; then the libvirt driver boots
    a domain on tr-pm1 from that image with a disk it makes on tr-pm1's share, starts a job in it
    over its serial console, and moves it to tr-pm2 with `virsh migrate --live` while the job
    runs: libvirt's figures come back in the record, the domain's QEMU process leaves tr-pm1 and
    runs on tr-pm2 (read from the process tables, not from libvirt), and the job ends after the
    move with its status, seen on tr-pm2's console."""
    from testbed.drivers.base import Host, MigrationMode, VMSpec
    from testbed.drivers.libvirt import LibvirtDriver

    pms = ("tr-pm1", "tr-pm2")
    inventory = write_inventory(tmp_path / "kvm", "kvm", pms, KVM_SETTINGS)
    started = time.monotonic()
    assert play(inventory, "vm_storage.yml", "technique.yml")["tr-pm2"] > 0
    provisioned = time.monotonic()
    assert play(inventory, "vm_storage.yml", "technique.yml") == {"tr-pm1": 0, "tr-pm2": 0}
    again = time.monotonic()

    vm, src, dst = "tbvm1", "tr-pm1", "tr-pm2"
    hosts = [Host(name, TEST_HOSTS[name], capacity=0.5, cores=2) for name in pms]
    driver = LibvirtDriver(hosts, KEY, known_hosts=known_hosts(tmp_path / "known_hosts", pms))
    try:
        driver.create_vm(VMSpec(vm, 128, 1), src)
        booted = time.monotonic()
        assert "type='qemu'" in driver.virsh(src, "dumpxml", vm)  # TCG: no /dev/kvm in the test hosts
        job = driver.start_workload(vm, ["sleep", "20"])
        use = driver.cpu_use(1.0)
        assert set(use.hosts) == set(pms) and vm in use.vms and use.vms[vm] >= 0, use
        source_pids = qemu_pids(src, vm)
        assert len(source_pids) == 1 and qemu_pids(dst, vm) == []
        record = driver.migrate(vm, dst, MigrationMode.PRECOPY)
        assert record.error is None, record.error
        assert qemu_pids(src, vm) == [] and len(qemu_pids(dst, vm)) == 1
        assert driver.vm_host(vm) == dst
        # libvirt's own figures: the whole migration, and the pause it measured.
        assert record.total_time_s > 0 and record.downtime_s is not None and 0 < record.downtime_s < record.total_time_s
        assert record.bytes > 0 and record.rounds >= 1, record
        done = driver.wait_workload(vm, job.id, timeout_s=60)
        # The same guest, not a new one: the sleep it began on tr-pm1 ends on tr-pm2, after the
        # move. (Not 20 s of host time: the TCG guest's jiffies clock ran fast on this busy
        # machine, 20 s in 11.8 s once; 5 s sleeps took 5.2 s.)
        assert done.exit_status == 0 and done.end is not None and done.end > record.start + record.total_time_s, done
    finally:  # a failure above stays the test's error
        with contextlib.suppress(Exception):
            driver.destroy_vm(vm)
    assert qemu_pids(src, vm) == qemu_pids(dst, vm) == []
    print(
        f"provision {provisioned - started:.0f} s, again {again - provisioned:.0f} s,"
        f" boot to console {booted - again:.0f} s, migration {record.total_time_s:.2f} s"
        f" (downtime {record.downtime_s * 1000:.0f} ms, {record.bytes} bytes, {record.rounds} rounds),"
        f" job {done.duration_s:.1f} s"
    )



# --- `testbed run` on the test hosts: Exp. 1 with libvirt, the CC ordering the migration ----------
EXP1 = REPO / "experiments" / "exp1.yml"
#: Exp. 1 at the test hosts' size: 4 one-vCPU TCG domains on 2 PMs, unbalanced (3/1) without and
#: with migration, one repetition. The 4 guests share this 2-core machine (~0.5 core each), so
#: Synthetic1 at scale 0.8 (14,400 blocks) runs for about a minute: time for the CC (5 s rounds)
#: to order a move from tr-pm1 (3 VMs) to tr-pm2 (1 VM) and for it to end (~3 s) while they run.
KVM_EXP1 = SMALL_EXP1 | {
    "name": "exp1-kvm",
    "techniques": ["kvm"],
    "balancer": {"policy": "assign-u", "interval_s": 5, "cooldown_s": 30},
    "scale": 0.8,
}


@pytest.mark.lab
@pytest.mark.slow
def test_testbed_run_drives_exp1_on_libvirt_test_hosts_with_a_cc_ordered_live_migration(
    debian_hosts: None, tmp_path: Path
) -> None:
    """`testbed run --technique kvm` on two libvirt test hosts and a controller, provisioned by the
    playbooks (storage, libvirt with the guest image, chrony, the VM manager as systemd units):
    the runner boots the domains by layout through the libvirt driver, starts Synthetic1 in them
    over their consoles, the PMs' LCs sample them with `virsh domstats` (each PM's CPU is its
    VMs' sum: the test hosts share this machine's /proc/stat) and the CC orders `virsh migrate
    --live`, which tr-pm1's LC runs; the token is the one tr-ctl holds, read over SSH. Then the
    CSVs, `testbed plot` and `testbed report` as on the embedded lab."""

    from testbed.lab import load_lab
    from testbed.manager.tokens import lab_token
    from testbed.results import read_table

    pms = ("tr-pm1", "tr-pm2")
    known = known_hosts(tmp_path / "known_hosts", tuple(TEST_HOSTS))
    settings = KVM_SETTINGS | {
        "testbed_pm_cpu": "vms",
        "testbed_capacity": os.cpu_count(),  # what the PMs' /proc/stat counts (the LCs' capacity)
        "testbed_known_hosts": str(known),
    }
    inventory = write_inventory(tmp_path / "kvm-run", "kvm", pms, settings)
    started = time.monotonic()
    play(inventory, "common.yml", "ntp.yml", "vm_storage.yml", "technique.yml", "balancer.yml")
    provisioned = time.monotonic()
    lab = load_lab(inventory)
    assert lab.technique == "kvm" and lab.ssh_key == KEY and lab.known_hosts == known
    # the runner's token is the one the controller holds, the test's own (never the embedded lab's)
    assert lab_token(lab) == token_file(inventory).read_text().strip()

    spec = yaml_spec(tmp_path / "exp1-kvm.yml")
    results = tmp_path / "results"
    try:
        ran = run(
            [
                str(BIN / "testbed"),
                "run",
                str(spec),
                "-i",
                str(inventory),
                "--technique",
                "kvm",
                "--results",
                str(results),
                "--timeout",
                "420",
            ],
            timeout=1500,
        )
        measured = time.monotonic()
        runs, times = check_runs(results, ran, "kvm", 4)
        ok = {r["run_id"] for r in runs}
        moves = [m for m in read_table(results, "migrations") if m["run_id"] in ok]
        for m in moves:
            print(m["run_id"], m["vm"], m["source"], m["destination"], m["mode"], m["status"], m["total_time_s"],
                  m["downtime_s"], m["bytes"])
        mig = next(r["run_id"] for r in runs if r["migration"] == "true")
        assert {m["run_id"] for m in moves} <= {mig}, moves  # the CC orders nothing in a dry run
        completed = [m for m in moves if m["status"] == "completed"]
        assert completed and {m["mode"] for m in completed} == {"precopy"}, moves
        assert all(m["source"] in pms and m["destination"] in pms and int(m["bytes"]) > 0 for m in completed)
        # the domains really moved (CI once saw vm1 go to tr-pm2 and back)
        check_cc_moves(results, completed, times, mig)
        samples = read_table(results, "cpu_samples")
        for r in runs:
            assert {s["host"] for s in samples if s["run_id"] == r["run_id"]} == set(pms)
            assert {s["vm"] for s in samples if s["run_id"] == r["run_id"]} >= {"vm1", "vm2", "vm3", "vm4"}

        plotted = run([str(BIN / "testbed"), "plot", str(results)])
        assert plotted.returncode == 0, plotted.stderr
        assert len(list((results / "figures").glob("cpu_timeline.*.png"))) == 2
        assert (results / "figures" / "exec_time.kvm.synthetic1.png").exists(), plotted.stdout
        reported = run([str(BIN / "testbed"), "report", str(results)])
        assert reported.returncode == 0, reported.stderr
        assert (results / "report.html").stat().st_size > 0
        left = run([*on_host("tr-pm1"), "virsh list --name"]).stdout.split() + run(
            [*on_host("tr-pm2"), "virsh list --name"]
        ).stdout.split()
        assert left == [], left  # every run destroyed its domains
    finally:
        with contextlib.suppress(Exception):  # stop the VM manager; a failure above stays the error
            play(inventory, "teardown.yml", limit="tr-ctl:tr-pm1:tr-pm2")
    print(
        f"provision {provisioned - started:.0f} s, testbed run {measured - provisioned:.0f} s,"
        f" {len(completed)} CC-ordered migration(s)"
    )


def yaml_spec(path: Path) -> Path:
    """Exp. 1's spec (experiments/exp1.yml) at the test hosts' size (KVM_EXP1)."""
    import yaml

    spec = yaml.safe_load(EXP1.read_text())
    spec.pop("exclude", None)  # the balanced layout is not run: nothing to exclude
    path.write_text(yaml.safe_dump(spec | KVM_EXP1))
    return path


ANSIBLE_2010 = Path("/var/cache/testbed/ansible-2.12")


@pytest.mark.slow
def test_the_pinned_ansible_core_2_12_reads_the_2010_site_playbook() -> None:
    """The 2010 profile's own ansible-core (deps/ansible-2010.txt, built once into a cached venv)
    parses site.yml and every role with the 2010 inventory."""
    if not (ANSIBLE_2010 / "bin" / "ansible-playbook").exists():
        subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_2010)], check=True, timeout=120)
        subprocess.run(
            [str(ANSIBLE_2010 / "bin" / "pip"), "install", "-q", "-r", str(REPO / "deps/ansible-2010.txt")],
            check=True,
            timeout=600,
        )
    version = run([str(ANSIBLE_2010 / "bin" / "ansible-playbook"), "--version"]).stdout
    assert version.startswith("ansible-playbook [core 2.12."), version
    proc = run(
        [
            str(ANSIBLE_2010 / "bin" / "ansible-playbook"),
            "-i",
            "inventory/example-2010",
            "playbooks/site.yml",
            "--list-tasks",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "openvz : Install vzmigrate adapted to shared storage" in proc.stdout


@pytest.mark.lab
@pytest.mark.slow
def test_link_shaping_shapes_a_real_pm_and_removes_only_its_own_qdisc(debian_hosts: None, tmp_path: Path) -> None:
    """link_shaping on tr-pm1, read back over SSH (not from Ansible): a tbf root qdisc with the
    role's handle at the set rate on the interface holding testbed_address, nothing changed the
    second time, a new rate replaces it, and turned off it goes, while a root qdisc the site set
    on another device stays as it was."""
    import json

    def qdiscs(dev: str) -> list[dict]:
        proc = run([*on_host("tr-pm1"), f"tc -j qdisc show dev {dev}"])
        assert proc.returncode == 0, proc.stderr
        return [q for q in json.loads(proc.stdout) if q.get("root")]

    site = "ip link add tbsite0 type veth peer name tbsite1 && tc qdisc add dev tbsite0 root handle 1: tbf rate 5mbit burst 16000 latency 50ms"
    proc = run([*on_host("tr-pm1"), f"ip link del tbsite0 2>/dev/null; {site}"])
    assert proc.returncode == 0, proc.stderr
    before = qdiscs("tbsite0")
    try:
        for rate, bytes_per_s in (("100mbit", 12_500_000), ("10mbit", 1_250_000)):
            inventory = write_inventory(tmp_path / "inventory", "kvm", settings={"link_shaping_rate": rate})
            assert play(inventory, "link_shaping.yml")["tr-pm1"] > 0
            [ours] = qdiscs("eth0")
            assert (ours["kind"], ours["handle"], ours["options"]["rate"]) == ("tbf", "7462:", bytes_per_s), ours
            assert ours["options"]["burst"] == max(bytes_per_s // 100, 16_000), ours
            if rate == "100mbit":
                assert play(inventory, "link_shaping.yml") == {"tr-pm1": 0}
        inventory = write_inventory(tmp_path / "inventory", "kvm", settings={"link_shaping_rate": None})
        assert play(inventory, "link_shaping.yml")["tr-pm1"] > 0
        assert [q["handle"] for q in qdiscs("eth0")] == ["0:"]
        assert qdiscs("tbsite0") == before and before[0]["handle"] == "1:"
        assert play(inventory, "link_shaping.yml") == {"tr-pm1": 0}

        def refused(*extra: str) -> str:
            argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), "playbooks/link_shaping.yml", *extra]
            proc = run(argv)
            assert proc.returncode != 0 and "changed=0" in proc.stdout, proc.stdout[-3000:]
            return proc.stdout

        assert "is not a rate like 100mbit" in refused("-e", "link_shaping_rate=100mbps")
        # The 2010 profile's refusal, on a Debian host told it is CentOS 5: before anything changes.
        assert "not supported on the 2010 profile" in refused(
            "-e", "link_shaping_rate=10mbit", "-e", "link_shaping_os=centos5")
        # A root qdisc the site set on the lab interface itself: the role fails and leaves it be.
        site_eth0 = "tc qdisc add dev eth0 root handle 2: tbf rate 50mbit burst 16000 latency 50ms"
        assert run([*on_host("tr-pm1"), site_eth0]).returncode == 0
        [theirs] = qdiscs("eth0")
        assert "already has a root qdisc the site set" in refused("-e", "link_shaping_rate=10mbit")
        assert qdiscs("eth0") == [theirs] and theirs["handle"] == "2:"
    finally:
        run([*on_host("tr-pm1"), "ip link del tbsite0; tc qdisc del dev eth0 root 2>/dev/null; true"])


@pytest.mark.lab
def test_remote_commands_and_workloads_on_a_debian_host(debian_hosts: None, tmp_path: Path) -> None:
    """The real-lab drivers' SSH layer on a real host: argv words arrive intact (no shell
    interpretation), and the workload launcher records start, output, status and end. The
    drivers refuse a host whose key they do not know (`known_hosts`)."""
    from testbed.drivers.base import Host
    from testbed.drivers.remote_base import RemoteDriverBase
    from testbed.errors import InputError

    class OnThePM(RemoteDriverBase):  # the PM itself stands in for the VM
        def vm_host(self, vm: str) -> str:
            return "tr-pm1"

        def guest_argv(self, vm: str, argv: list[str]) -> list[str]:
            return list(argv)

    pm = [Host("tr-pm1", TEST_HOSTS["tr-pm1"], 0.5, 4)]
    known = known_hosts(tmp_path / "known_hosts", ("tr-pm1",))
    with pytest.raises(InputError, match="no such known_hosts"):
        OnThePM(pm, KEY, tmp_path / "absent").remote("tr-pm1").run(["true"])
    driver = OnThePM(pm, KEY, known)
    remote = driver.remote("tr-pm1")
    assert remote.run(["printf", "%s|", "a b", "$(id)", "; echo no"]) == "a b|$(id)|; echo no|"
    assert [line for _, line in remote.stream(["sh", "-c", "echo one; echo two >&2"])] == ["one", "two"]
    run = driver.start_workload("vm1", ["sh", "-c", "echo started work; sleep 1; exit 3"])
    done = driver.wait_workload("vm1", run.id, timeout_s=20)
    assert done.finished and done.exit_status == 3 and [line for _, line in done.output] == ["started work"]
    assert 0.9 < done.duration_s < 5
    remote.close()


@pytest.mark.parametrize("inventory", EXAMPLES)
def test_real_lab_inventories_load_without_the_embedded_labs_machine_limits(inventory: str) -> None:
    """4-CPU PMs exceed this 2-core machine, but a real lab's PMs bring their own cores."""
    from testbed.lab import load_lab

    lab = load_lab(REPO / "inventory" / inventory)
    assert not lab.embedded
    assert [pm.capacity for pm in lab.pms] == [4.0, 4.0, 4.0]
