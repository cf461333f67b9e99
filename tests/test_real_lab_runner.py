"""`testbed run` on a real lab (issue #15), without one: what a real-lab inventory says (the key,
known hosts, technique and PM CPU source), which techniques each lab runs and the drivers made
for them (the runner's with the inventory's key, a PM's Local Controller's with the PM's root key),
where each lab's VM manager token comes from (never the embedded lab's file for another lab), the
checks `testbed run` makes before any host is touched, and the lab executor's real-lab branch
(stray VMs from the driver, disks made by the driver, PM CPU as its VMs' sum) over a fake driver.
No lab: nothing here opens a connection."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest
import yaml
from test_per_vm import CcStub, FakeDriver

from testbed.cli import build_parser
from testbed.commands import run as run_command
from testbed.commands.manager import lc_techniques
from testbed.drivers.base import CpuUse, Host, VMInfo, VMSpec, WorkloadRun
from testbed.drivers.libvirt import LibvirtDriver
from testbed.drivers.openvz import OpenVZDriver
from testbed.drivers.ssh import SshTarget
from testbed.errors import InputError
from testbed.lab import DEFAULT_INVENTORY, load_lab
from testbed.lab_drivers import PM_ROOT_KEY, lab_drivers, lab_techniques, refuse_off_lab
from testbed.manager.tokens import CONTROLLER_TOKEN_FILE, lab_token
from testbed.runner import executor
from testbed.runner.campaign import Run
from testbed.runner.executor import GateFailed, LabExecutor, _CpuSampler
from testbed.spec import parse_spec
from testbed.techniques import EMBEDDED, make_driver

REPO = Path(__file__).resolve().parents[1]
ADDRESSES = {"ctl": "198.18.0.240", "pm1": "198.18.0.241", "pm2": "198.18.0.242"}
SPEC = {"name": "kvm1", "techniques": ["kvm"], "app": "synthetic1", "instances": 1, "vms": 3, "pms": 2,
        "memory_mb": 128, "vcpus": 1, "scale": 0.01, "repetitions": 1,
        "matrix": {"layout": [[3, 0]], "migration": [True]}, "balancer": {"policy": "assign-u"}}


def real_inventory(path: Path, **settings: object) -> Path:
    """A modern-profile inventory of one controller and two PMs running `technique` (kvm)."""
    (path / "group_vars").mkdir(parents=True)
    hosts = {"controller": {"hosts": {"ctl": {"testbed_address": ADDRESSES["ctl"]}}},
             "pms": {"hosts": {name: {"testbed_address": ADDRESSES[name]} for name in ("pm1", "pm2")}}}
    (path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"lab": {"children": hosts}}}}))
    modern = yaml.safe_load((REPO / "inventory/example-modern/group_vars/all.yml").read_text())
    modern |= {"testbed_lab_network": "198.18.0.0/24", "testbed_lab_gateway": "198.18.0.250",
               "testbed_capacity": 2, "testbed_technique": "kvm"} | settings
    (path / "group_vars/all.yml").write_text(yaml.safe_dump(modern))
    lab = yaml.safe_load((REPO / "inventory/example-modern/group_vars/lab.yml").read_text())
    (path / "group_vars/lab.yml").write_text(yaml.safe_dump(lab | {"ansible_ssh_private_key_file": "/keys/lab"}))
    return path


@pytest.fixture
def kvm_lab(tmp_path: Path):
    return load_lab(real_inventory(tmp_path / "kvm", testbed_known_hosts=str(tmp_path / "known_hosts"),
                                   testbed_pm_cpu="vms"))


# --- what the inventory says ------------------------------------------------------------------

def test_a_real_labs_inventory_names_its_key_known_hosts_technique_and_pm_cpu(kvm_lab, tmp_path: Path) -> None:
    assert not kvm_lab.embedded and kvm_lab.technique == "kvm" and kvm_lab.pm_cpu == "vms"
    assert kvm_lab.ssh_key == Path("/keys/lab")  # Ansible's key: the one the playbooks log in with
    assert kvm_lab.known_hosts == tmp_path / "known_hosts"
    bare = load_lab(real_inventory(tmp_path / "bare"))
    assert bare.known_hosts is None and bare.pm_cpu == "machine"  # the user's ~/.ssh/known_hosts


def test_the_embedded_lab_keeps_its_state_directorys_key_and_known_hosts() -> None:
    lab = load_lab(DEFAULT_INVENTORY)
    assert lab.embedded and lab.technique is None and lab.pm_cpu == "machine"
    assert lab.ssh_key == lab.state_dir / "id_ed25519" and lab.known_hosts == lab.state_dir / "known_hosts"
    assert f"UserKnownHostsFile={lab.state_dir / 'known_hosts'}" in lab.ssh_argv(lab.pms[0], ["true"])


def test_an_unknown_pm_cpu_source_is_refused_with_the_inventory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"testbed_pm_cpu: 'cgroup' is not one of machine, vms"):
        load_lab(real_inventory(tmp_path / "bad", testbed_pm_cpu="cgroup"))


# --- which techniques, which drivers -----------------------------------------------------------

def test_each_lab_runs_its_own_techniques_only(kvm_lab, tmp_path: Path) -> None:
    embedded = load_lab(DEFAULT_INVENTORY)
    assert lab_techniques(embedded) == EMBEDDED and lab_techniques(kvm_lab) == ("kvm",)
    refuse_off_lab(kvm_lab, ["kvm"], "exp1")
    refuse_off_lab(embedded, ["qemu", "container"], "exp1")
    with pytest.raises(InputError, match=r"exp1: techniques: 'kvm' runs on a real lab whose PMs run it"):
        refuse_off_lab(embedded, ["kvm"], "exp1")
    with pytest.raises(InputError, match=r"'qemu' does not run on .*, whose PMs run kvm \(testbed_technique"):
        refuse_off_lab(kvm_lab, ["qemu"], "exp1")
    xen = load_lab(real_inventory(tmp_path / "xen", testbed_technique="xen"))
    assert lab_techniques(xen) == ("xen",)
    refuse_off_lab(xen, ["xen"], "exp1")
    openvz = load_lab(real_inventory(tmp_path / "openvz", testbed_technique="openvz"))
    assert lab_techniques(openvz) == ("openvz",)
    refuse_off_lab(openvz, ["openvz"], "exp1")
    (driver,) = executor.make_drivers(openvz).values()
    assert isinstance(driver, OpenVZDriver) and driver.remote("pm1").target.key_file == openvz.ssh_key


def test_the_runners_driver_reaches_the_pms_with_the_inventorys_key(kvm_lab, tmp_path: Path) -> None:
    drivers = executor.make_drivers(kvm_lab)
    assert list(drivers) == ["kvm"] and isinstance(drivers["kvm"], LibvirtDriver)
    driver = drivers["kvm"]
    assert driver.remote("pm2").target == SshTarget(ADDRESSES["pm2"], Path("/keys/lab"), tmp_path / "known_hosts")
    assert [h.name for h in driver.hosts()] == ["pm1", "pm2"] and all(h.netns is None for h in driver.hosts())
    assert driver.peer_uris["pm2"] == f"qemu+ssh://root@{ADDRESSES['pm2']}/system"


def test_a_pms_local_controller_drives_libvirt_with_the_pms_root_key(kvm_lab) -> None:
    """On the PM the inventory's key path is Ansible's machine's: the LC's driver uses the PM's
    root key (authorized on every PM by the libvirt role) and root's known_hosts."""
    assert lc_techniques(kvm_lab, None) == ["kvm"]
    (driver,) = lab_drivers(kvm_lab, ["kvm"], key_file=PM_ROOT_KEY).values()
    assert driver.remote("pm1").target == SshTarget(ADDRESSES["pm1"], PM_ROOT_KEY, None)
    assert lc_techniques(load_lab(DEFAULT_INVENTORY), None) == list(EMBEDDED)
    with pytest.raises(InputError, match=r"--technique: 'kvm' has no driver \(available: qemu, container\)"):
        lc_techniques(load_lab(DEFAULT_INVENTORY), ["kvm"])


def test_a_real_labs_driver_needs_a_key_and_compresses_nothing() -> None:
    hosts = [Host("pm1", ADDRESSES["pm1"], 2.0, 4), Host("pm2", ADDRESSES["pm2"], 2.0, 4)]
    with pytest.raises(ValueError, match="'kvm': its driver reaches the PMs over SSH and needs a key file"):
        make_driver("kvm", hosts)
    make_driver("kvm", hosts, key_file=Path("/keys/lab"))  # compression: test_drivers_real


# --- the token --------------------------------------------------------------------------------

def test_a_real_labs_token_comes_from_its_controller_never_the_embedded_labs_file(kvm_lab, tmp_path: Path) -> None:
    asked: list[list[str]] = []

    def on_controller(argv: list[str]) -> str:
        asked.append(argv)
        return "the-real-labs-token\n"

    # its testbed_lab_state_dir is the embedded lab's default, /var/lib/testbed/lab: not read
    assert kvm_lab.state_dir == Path("/var/lib/testbed/lab")
    assert lab_token(kvm_lab, run=on_controller) == "the-real-labs-token"
    assert asked == [["cat", CONTROLLER_TOKEN_FILE]]
    own = tmp_path / "token"
    own.write_text("from-the-file\n")
    own.chmod(0o600)
    assert lab_token(kvm_lab, own, run=on_controller) == "from-the-file" and len(asked) == 1

    def unreachable(argv: list[str]) -> str:
        raise OSError("No route to host")

    with pytest.raises(InputError, match=r"ctl: cannot read the VM manager's token .*No route to host.*--token-file"):
        lab_token(kvm_lab, run=unreachable)
    with pytest.raises(InputError, match="is empty"):
        lab_token(kvm_lab, run=lambda argv: "\n")


def test_the_embedded_labs_token_is_its_state_directorys(tmp_path: Path) -> None:
    lab = SimpleNamespace(embedded=True, state_dir=tmp_path)
    (tmp_path / "manager.token").write_text("embedded\n")
    (tmp_path / "manager.token").chmod(0o600)
    assert lab_token(lab, run=lambda argv: pytest.fail("no SSH for the embedded lab")) == "embedded"


# --- `testbed run`'s checks, before any host ----------------------------------------------------

def checked(tmp_path: Path, inventory: Path, spec: dict, *flags: str):
    path = tmp_path / "spec.yml"
    path.write_text(yaml.safe_dump(spec))
    args = build_parser().parse_args(["run", str(path), "-i", str(inventory), "--results", str(tmp_path / "r"),
                                      *flags])
    return run_command._checked(args)


def test_testbed_run_accepts_kvm_on_a_kvm_lab_and_refuses_what_the_lab_does_not_run(tmp_path: Path) -> None:
    inventory = real_inventory(tmp_path / "kvm")
    spec, lab, techniques, _ = checked(tmp_path, inventory, SPEC, "--technique", "kvm")
    assert techniques == ["kvm"] and lab.technique == "kvm" and spec.pms == 2
    with pytest.raises(InputError, match="'qemu' does not run on"):
        checked(tmp_path, inventory, SPEC | {"techniques": ["qemu"]})
    with pytest.raises(InputError, match="'kvm' runs on a real lab whose PMs run it"):
        checked(tmp_path, DEFAULT_INVENTORY, SPEC | {"pms": 3, "matrix": {"layout": [[3, 0, 0]],
                                                                           "migration": [True]}})
    with pytest.raises(InputError, match="kernel app's root disk is built on the embedded lab's shares only"):
        checked(tmp_path, inventory, SPEC | {"app": "kernel", "memory_mb": 300})


def test_testbed_run_names_its_token_file_on_the_command_line(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "x.yml", "--token-file", str(tmp_path / "t")])
    assert args.token_file == tmp_path / "t"
    assert build_parser().parse_args(["run", "x.yml"]).token_file is None


def test_a_refused_technique_is_one_line_and_exit_2(tmp_path: Path) -> None:
    inventory = real_inventory(tmp_path / "kvm")
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(SPEC | {"techniques": ["qemu"]}))
    done = subprocess.run([sys.executable, "-m", "testbed.cli", "run", str(spec), "-i", str(inventory),
                           "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("testbed: error: kvm1: techniques: 'qemu' does not run on") and \
        len(done.stderr.strip().splitlines()) == 1


# --- the lab executor's real-lab branch, over a fake driver --------------------------------------

class FakeLibvirt(FakeDriver):
    """test_per_vm's fake driver as a libvirt lab's: domains `others` already running, and some
    CPU each (the PMs' figures are the machine's, 90 %, on PMs sharing one kernel)."""

    technique = "kvm"

    def __init__(self, others: dict[str, str] | None = None) -> None:
        super().__init__()
        for vm, pm in (others or {}).items():
            self.create_vm(VMSpec(vm, 128, 1), pm)

    def cpu_use(self, interval_s: float) -> CpuUse:
        time.sleep(interval_s)
        return CpuUse(interval_s, {"pm1": 90.0, "pm2": 90.0}, {vm: 10.0 for vm in self.created})


def kvm_run() -> Run:
    spec = parse_spec(SPEC)
    return Run(spec, "kvm", spec.variants()[0], 1)


def test_a_real_labs_reset_destroys_its_vms_and_refuses_anyone_elses(kvm_lab) -> None:
    driver = FakeLibvirt({"vm1": "pm1", "vm7": "pm2"})
    lab_executor = LabExecutor(kvm_lab, {"kvm": driver}, CcStub(), reset_wait_s=0)
    found = lab_executor._reset(driver)
    assert sorted(found["destroyed"]) == ["vm1", "vm7"] and driver.created == {}
    assert found["idle_cpu_pct"] == {"pm1": 0.0, "pm2": 0.0}  # testbed_pm_cpu vms: no VM, no load
    driver.create_vm(VMSpec("someones-vm", 128, 1), "pm2")
    with pytest.raises(GateFailed, match=r"stray VMs left on the PMs after the reset: \{'pm2': \['someones-vm'\]\}"):
        lab_executor._reset(driver)


def test_a_real_labs_pms_are_checked_idle_from_the_driver_where_they_have_their_own_kernel(tmp_path: Path) -> None:
    lab = load_lab(real_inventory(tmp_path / "kvm"))  # pm_cpu machine: the driver's /proc/stat figures
    driver = FakeLibvirt()
    with pytest.raises(GateFailed, match=r"PMs busy with no VM on them .*'pm1': 90.0"):
        LabExecutor(lab, {"kvm": driver}, CcStub(), reset_wait_s=0)._reset(driver)


def test_on_a_real_lab_the_driver_makes_the_disks_where_the_vms_boot(kvm_lab) -> None:
    driver = FakeLibvirt()
    lab_executor = LabExecutor(kvm_lab, {"kvm": driver}, CcStub())
    run = kvm_run()
    disks = lab_executor._prepare_disks(run)
    assert disks["disks"] == {} and "driver" in disks["made_by"]
    placed = lab_executor._create_vms(driver, run, disks["disks"])
    assert placed["placement"] == {"vm1": "pm1", "vm2": "pm1", "vm3": "pm1"}
    assert all(spec.disk is None and spec.memory_mb == 128 for spec in driver.created.values())


def test_a_pm_sharing_its_kernel_is_sampled_as_its_vms_sum() -> None:
    driver = FakeLibvirt({"vm1": "pm1", "vm2": "pm1", "vm3": "pm2"})
    sampler = _CpuSampler(driver, 0.02, pm_is_its_vms=True)
    sampler.start(time.time())
    time.sleep(0.1)
    samples = sampler.stop()
    pms = {(s.host, s.cpu_pct) for s in samples if not s.vm}
    assert pms == {("pm1", 20.0), ("pm2", 10.0)}  # not the machine's 90 %


def test_the_lab_executor_runs_a_kvm_run_on_a_real_lab_over_the_driver(kvm_lab) -> None:
    driver = FakeLibvirt()
    lab_executor = LabExecutor(kvm_lab, {"kvm": driver}, CcStub(), sample_period_s=0.05, reset_wait_s=0)
    lab_executor._check_clocks = lambda: {"offsets_s": {}}  # chronyd is a host's: not here
    result = lab_executor.execute(kvm_run())
    assert result.status == "ok", result.details
    assert sorted(t.vm for t in result.vm_times) == ["vm1", "vm2", "vm3"]
    assert result.details["gate"]["storage"]["disks"] == {} and driver.created == {}  # cleaned up



class Unreachable(FakeLibvirt):
    """A PM that stops answering SSH once the VMs are up: every listing after `answers` fails as
    paramiko fails when a channel cannot be opened."""

    def __init__(self, answers: int) -> None:
        super().__init__()
        self.answers = answers

    def list_vms(self) -> list[VMInfo]:
        self.answers -= 1
        if self.answers < 0:
            raise paramiko.SSHException("Timeout opening channel.")
        return super().list_vms()


def test_a_pm_that_stops_answering_fails_its_run_in_one_line_and_the_next_reset_refuses(kvm_lab) -> None:
    driver = Unreachable(answers=3)  # the reset's two listings and the placement's
    lab_executor = LabExecutor(kvm_lab, {"kvm": driver}, CcStub(), sample_period_s=0.05, reset_wait_s=0)
    lab_executor._check_clocks = lambda: {"offsets_s": {}}
    result = lab_executor.execute(kvm_run())  # no traceback out of the cleanup
    assert result.status in ("failed", "invalid") and result.details["cleanup"]["errors"] == {
        "kvm:list": "SSHException: Timeout opening channel."
    }
    again = lab_executor.execute(kvm_run())
    assert again.status == "invalid" and "Timeout opening channel" in again.details["error"]


class Switchover(FakeLibvirt):
    """A domain that no PM lists running for `gaps` checks (a live migration's switchover: paused
    on its source, not yet resumed on its destination), whose workload ends after `polls` waits."""

    def __init__(self, gaps: int, polls: int) -> None:
        super().__init__({"vm1": "pm1"})
        self.gaps, self.polls = gaps, polls

    def list_vms(self) -> list[VMInfo]:
        if self.gaps:
            self.gaps -= 1
            return []
        return super().list_vms()

    def wait_workload(self, vm: str, workload_id: str, timeout_s: float) -> WorkloadRun:
        self.polls -= 1
        run = WorkloadRun(vm, workload_id, ("synthetic1", "9"), time.time())
        if self.polls <= 0:
            run.end, run.exit_status = time.time(), 0
        return run


def test_a_vm_missing_once_is_a_switchover_and_twice_a_crash() -> None:
    workload = WorkloadRun("vm1", "w", ("synthetic1", "9"))
    deadline = time.time() + 60
    assert executor._wait(Switchover(gaps=1, polls=3), "vm1", workload, deadline).exit_status == 0
    with pytest.raises(RuntimeError, match="the VM stopped running during synthetic1 9"):
        executor._wait(Switchover(gaps=2, polls=5), "vm1", workload, deadline)


def test_a_real_pms_venv_holds_what_its_lcs_driver_imports() -> None:
    """The balancer role installs the `manager` extra on a real lab's hosts; a kvm PM's LC makes the
    libvirt driver, which imports paramiko (testbed.drivers.ssh): without it the LC would not start."""
    import re
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    manager = {re.split(r"[<>=\[ ]", requirement)[0].lower() for requirement in extras["manager"]}
    code = ("import sys, testbed.drivers.libvirt; "
            "print(' '.join(m for m in ('paramiko', 'fastapi', 'httpx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=True)
    assert set(done.stdout.split()) <= manager and "paramiko" in done.stdout.split()


def test_a_kvm_pms_local_controller_starts_from_the_inventory_and_samples_its_vms_sum(
        kvm_lab, tmp_path: Path) -> None:
    """`testbed manager lc` as the balancer role starts it on a kvm PM (--vm-cpu kvm), here on
    loopback: it makes the libvirt driver (nothing is reached before an order), and with the
    inventory's `testbed_pm_cpu: vms` its PM is as busy as its VMs, none here (no virsh on this
    machine), whatever this machine is doing; an order for a VM it does not run is refused."""
    import socket

    import httpx

    token = tmp_path / "token"
    token.write_text("lc-test-token\n")
    token.chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "manager", "lc", "-i", str(kvm_lab.inventory),
                           "--host", "pm1", "--vm-cpu", "kvm", "--token-file", str(token), "--listen", "127.0.0.1",
                           "--port", str(port), "--period", "0.2"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer lc-test-token"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sample = httpx.get(f"{url}/v1/sample", params={"window": 1}, headers=auth, timeout=5)
                break
            except httpx.TransportError:
                assert lc.poll() is None and time.monotonic() < deadline, lc.communicate(timeout=10)
                time.sleep(0.3)
        assert sample.status_code == 200, sample.text
        assert sample.json()["host"] == "pm1" and sample.json()["vms"] == [] and sample.json()["use"] == 0.0
        order = httpx.post(f"{url}/v1/migrate", json={"vm": "vm1", "dest": "pm2"}, headers=auth, timeout=10)
        assert order.status_code == 404 and "no VM named vm1" in order.text
    finally:
        lc.terminate()
        lc.communicate(timeout=30)


def test_a_xen_labs_driver_gets_its_guests_kernel_image_and_addresses_from_the_inventory(tmp_path: Path) -> None:
    """The driver hands each guest its inventory address on the kernel's command line and
    reaches it from its PM with the PM's root key; a missing or misplaced setting is refused
    with the inventory before any host is touched."""
    from testbed.drivers.base import VMSpec
    from testbed.drivers.xen import XenDriver

    guests = {"vm1": "198.18.0.101", "vm2": "198.18.0.102"}
    xen = load_lab(real_inventory(tmp_path / "xen", testbed_technique="xen", testbed_xen_kernel="/boot/guest",
                                  testbed_xen_image="/srv/guest.img", testbed_xen_guests=guests))
    (driver,) = executor.make_drivers(xen).values()
    assert isinstance(driver, XenDriver) and driver.guest_addresses == guests and driver.toolstack == "xl"
    assert driver.guest_argv("vm2", ["true"])[:3] == ["ssh", "-i", str(PM_ROOT_KEY)]
    assert "root@198.18.0.102" in driver.guest_argv("vm2", ["true"])
    written = {}
    calls = []

    class FakeRemote:
        def run(self, argv, timeout_s=60.0):
            calls.append(argv)
            return ""

        def write_file(self, path, data):
            written[path] = data.decode()

    driver._remotes["pm1"] = FakeRemote()
    driver.create_vm(VMSpec("vm1", 128, 1), "pm1")
    disk = "/var/lib/testbed/shared/pm1/disks/vm1.img"
    assert ["cp", "--sparse=always", "/srv/guest.img", disk] in calls
    config = written["/etc/xen/testbed/vm1.cfg"]
    assert 'kernel = "/boot/guest"' in config and f'"file:{disk},xvda,w"' in config
    assert "ip=198.18.0.101::255.255.255.0::eth0:off" in config
    with pytest.raises(ValueError, match="'vm3': no guest address"):
        driver.create_vm(VMSpec("vm3", 128, 1), "pm1")
    for settings, message in [
        ({"testbed_xen_guests": guests}, "testbed_xen_kernel: not set"),
        ({"testbed_xen_kernel": "/k", "testbed_xen_image": "/i", "testbed_xen_guests": {"vm1": "10.0.0.1"}},
         r"testbed_xen_guests: vm1: '10.0.0.1' is not a free address of 198.18.0.0/24"),
        ({"testbed_xen_kernel": "/k", "testbed_xen_image": "/i", "testbed_xen_guests": {"vm1": ADDRESSES["pm1"]}},
         "is not a free address"),
    ]:
        bad = load_lab(real_inventory(tmp_path / f"bad{len(message)}", testbed_technique="xen", **settings))
        with pytest.raises(InputError, match=message):
            executor.make_drivers(bad)
