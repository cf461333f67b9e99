"""A fake OpenVZ lab on this machine: a controller and PMs that are real hosts to everything
that talks to them, with only the OpenVZ toolstack faked (tests/fakes/openvz).

Each host is a network namespace (tbfk-<host>) on the bridge tbfk0 (198.18.1.0/24: the
embedded lab's 198.18.0.0/24 and its bridge are left alone), running a real sshd (its own
config, host key and ForceCommand, `login`) and a real chronyd (-x: one shared clock, as on the
embedded lab). The testbed reaches them exactly as it reaches a real lab: paramiko with the
inventory's key and known hosts, Ansible for the facts, chronyc over SSH for the clock gate.
The VM manager runs as on the 2010 profile: the CC and one `testbed manager lc --over-ssh` per
PM on the controller, each LC reading its PM (/proc/stat, vzlist, /proc/vz/vestat) and running
its migrations over SSH, found by the CC at the inventory's testbed_lc_endpoint.

The hosts share this machine's file system. What a fake host writes goes under the fixture's
directory: its state (containers' records) in $FAKE_ROOT/hosts/<host>, the PMs' shared storage
and guest programs in $FAKE_ROOT/varlib (bound on /var/lib/testbed for the fake hosts' commands
only), the token in the controller's state (the fake `cat` answers /etc/testbed/manager.token
from there). The containers' cgroups are under tbfk-<pid> in cpuacct and freezer.

Everything made is undone by the context manager's exit, in reverse order, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbed.lab import reachable
from testbed.manager import CC_PORT
from testbed.manager.api import ensure_token

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests" / "fakes" / "openvz"
BRIDGE = "tbfk0"
NETWORK = "198.18.1.0/24"
GATEWAY = "198.18.1.1"
CONTROLLER = "fk-ctl"  # at 198.18.1.10, the PMs fk-pm1, fk-pm2, ... at .11, .12, ...
LC_BASE_PORT = 7431  # the PMs' LCs on the controller: 7431, 7432, ...
TOOLS = ("vzctl", "vzlist", "cat")
START_WAIT_S = 30.0
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class FakeLab:
    """A fake lab that is up: where its files are, how `testbed` reaches it."""

    root: Path
    inventory: Path
    key: Path
    known_hosts: Path
    token: Path
    pms: tuple[str, ...]
    addresses: dict[str, str]
    cgroup: str  # the containers' parent cgroup (cpuacct, freezer)

    def env(self) -> dict[str, str]:
        """The environment of a `testbed` command on this worktree's code against the fake lab."""
        return os.environ | {
            "PYTHONPATH": str(REPO),
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }

    def testbed(self, *args: str) -> list[str]:
        """argv of `testbed ARGS` on this checkout's code (the venv's console script imports the
        checkout the venv was installed from, which need not be this one)."""
        return [sys.executable, "-c", "import sys; from testbed.cli import main; sys.exit(main())", *args]

    def records(self, pm: str) -> list[str]:
        """The containers a fake PM's toolstack holds (their CTIDs)."""
        return sorted(p.stem for p in (self.root / "hosts" / pm / "cts").glob("*.json"))


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")


def _netns(host: str) -> str:
    return f"tbfk-{host.removeprefix('fk-')}"


def _in_netns(host: str, argv: list[str]) -> list[str]:
    """argv in the host's network namespace only: nsenter, not `ip netns exec`, which remounts /sys
    and would hide /sys/fs/cgroup (docs/DESIGN.md) from the containers' cgroups. Niced: this
    machine runs other work, which the fake lab's load must not crowd out."""
    return ["nice", "-n", "19", "nsenter", f"--net=/run/netns/{_netns(host)}", *argv]


def _wait(what: str, ready: Callable[[], bool], timeout_s: float = START_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fake OpenVZ lab: {what} not ready in {timeout_s:g} s")
        time.sleep(0.2)


def _kill_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(path.read_text().split()[0]), signal.SIGTERM)


def _kill_netns(netns: str) -> None:
    """Kill whatever still runs in the namespace (an sshd session a client left open, a chronyd
    slow to stop): the namespace, and its veth, live until its last process exits."""
    deadline = time.monotonic() + 10
    while pids := subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                                 check=False).stdout.split():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{netns}: processes {pids} left after SIGKILL")
        time.sleep(0.1)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def fake_openvz_lab(root: Path, pm_count: int = 2) -> Iterator[FakeLab]:
    """The fake lab under `root` (made here: it must not exist), torn down on exit."""
    root.mkdir(mode=0o700)
    # the mount point the fake hosts' commands bind their own /var/lib/testbed on (what `testbed lab
    # up` makes on this machine anyway); nothing in it is read or written
    Path("/var/lib/testbed").mkdir(mode=0o755, exist_ok=True)
    pms = tuple(f"fk-pm{i}" for i in range(1, pm_count + 1))
    hosts = (CONTROLLER, *pms)
    addresses = {host: f"198.18.1.{10 + i}" for i, host in enumerate(hosts)}
    cgroup = f"tbfk-{os.getpid()}"
    with contextlib.ExitStack() as undo:
        key = root / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        _write(root / "authorized_keys", (root / "id_ed25519.pub").read_text(), 0o600)
        _tools(root)
        for controller in ("cpuacct", "freezer"):
            (CGROUP / controller / cgroup).mkdir()
            undo.callback(_remove_cgroups, CGROUP / controller / cgroup)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        undo.callback(subprocess.run, ["ip", "link", "del", BRIDGE], check=False, capture_output=True)
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        known = []
        for host in hosts:
            undo.enter_context(_host(root, host, addresses[host], cgroup))
            pub = (root / "hosts" / host / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{addresses[host]} {pub[0]} {pub[1]}\n")
        known_hosts = _write(root / "known_hosts", "".join(known))
        for host in hosts:
            _wait(f"{host}'s sshd", lambda host=host: reachable(addresses[host]))
        token = root / "hosts" / CONTROLLER / "manager.token"
        ensure_token(token)
        inventory = _inventory(root / "inventory", addresses, key, known_hosts)
        lab = FakeLab(root, inventory, key, known_hosts, token, pms, addresses, cgroup)
        for host in hosts:
            undo.enter_context(_chronyd(root, host, addresses))
        undo.enter_context(_manager(lab))
        yield lab


def _tools(root: Path) -> None:
    """The fake toolstack in PATH ($FAKE_ROOT/bin) and at /usr/local/sbin ($FAKE_ROOT/sbin); the
    shared storage and the guest programs under $FAKE_ROOT/varlib (/var/lib/testbed), synthetic1
    built as the openvz role's handler builds it."""
    for directory in ("bin", "sbin", "varlib/workloads"):
        (root / directory).mkdir(parents=True)
    for tool in TOOLS:
        (root / "bin" / tool).symlink_to(FAKES / "fakevz")
    (root / "sbin" / "vzmigrate-shared").symlink_to(FAKES / "fakevz")
    _run("gcc", "-std=gnu99", "-O2", "-static", "-o", str(root / "varlib/workloads/synthetic1"),
         str(REPO / "workloads/synthetic1.c"), "-lrt", "-lm")


@contextlib.contextmanager
def _host(root: Path, host: str, address: str, cgroup: str) -> Iterator[None]:
    """A network namespace on the bridge with its own sshd."""
    netns, veth, state = _netns(host), f"tbfkv-{host.removeprefix('fk-')}", root / "hosts" / host
    state.mkdir(parents=True)
    _run("ip", "netns", "add", netns)
    try:
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        _run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / "ssh_host_ed25519_key"))
        env = {"FAKE_HOST": host, "FAKE_ROOT": str(root), "FAKE_CGROUP": cgroup,
               "FAKE_KEY": str(root / "id_ed25519"), "FAKE_KNOWN_HOSTS": str(root / "known_hosts")}
        config = _write(state / "sshd_config", "\n".join([
            f"ListenAddress {address}:22",
            f"HostKey {state / 'ssh_host_ed25519_key'}",
            f"PidFile {state / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "StrictModes no",  # the key is in the test's temporary directory, under the sticky /tmp
            "MaxStartups 64:30:128",
            "MaxSessions 64",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
            f"ForceCommand {FAKES / 'login'}",
            "Subsystem sftp internal-sftp",
            "",
        ]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        _run(*_in_netns(host, ["/usr/sbin/sshd", "-f", str(config), "-E", str(state / "sshd.log")]))
        try:
            yield
        finally:
            _kill_pidfile(state / "sshd.pid")
    finally:
        _kill_netns(netns)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        # the pair goes with its namespace, but only once the kernel lets the namespace go
        # (seen: seconds after its last process, with its TCP connections closing): not waited for
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)


@contextlib.contextmanager
def _chronyd(root: Path, host: str, addresses: dict[str, str]) -> Iterator[None]:
    """The host's chronyd, as the ntp role runs the embedded lab's: the controller serves its
    clock, the PMs follow it, none touches the clock (-x)."""
    state = root / "hosts" / host / "chrony"
    state.mkdir(mode=0o750)
    if host == CONTROLLER:
        role = ["local stratum 10", f"allow {NETWORK}"]
    else:
        role = [f"server {addresses[CONTROLLER]} iburst minpoll 0 maxpoll 2"]
    config = _write(state / "chrony.conf", "\n".join([
        *role, "user root", f"pidfile {state}/chronyd.pid", f"bindcmdaddress {state}/chronyd.sock",
        f"driftfile {state}/chrony.drift", f"dumpdir {state}", f"logdir {state}", "",
    ]))
    _run(*_in_netns(host, ["chronyd", "-f", str(config), "-x"]))
    try:
        yield
    finally:
        _kill_pidfile(state / "chronyd.pid")


@contextlib.contextmanager
def _manager(lab: FakeLab) -> Iterator[None]:
    """The CC and one LC per PM (over SSH), on the controller; up when the CC answers."""
    import httpx

    from testbed.manager.api import ManagerClient, url_for

    logs = lab.root / "manager"
    logs.mkdir()
    common = ["-i", str(lab.inventory), "--token-file", str(lab.token)]
    commands = {
        "cc": ["manager", "cc", *common, "--event-log", str(logs / "events.jsonl"), "--dry-run",
               "--interval", "2"],
        # every 2 s: a reading is three commands over SSH on a busy machine (stale after 5 periods)
        **{pm: ["manager", "lc", *common, "--host", pm, "--over-ssh", "--vm-cpu", "openvz", "--period", "2"]
           for pm in lab.pms},
    }
    procs = []
    try:
        for name, args in commands.items():
            with (logs / f"{name}.log").open("w") as log:
                procs.append(subprocess.Popen(_in_netns(CONTROLLER, lab.testbed(*args)), env=lab.env(),
                                              stdout=log, stderr=subprocess.STDOUT))
        cc = ManagerClient(url_for(lab.addresses[CONTROLLER], CC_PORT), lab.token.read_text().strip())

        def answers() -> bool:
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError(f"a manager daemon exited; see {logs}")
            with contextlib.suppress(httpx.HTTPError):
                return all(lc["reachable"] for lc in cc.get("/v1/status")["lcs"].values())
            return False

        _wait("the VM manager", answers, 60)
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _inventory(path: Path, addresses: dict[str, str], key: Path, known_hosts: Path) -> Path:
    """The fake lab as a 2010-profile OpenVZ inventory: the LCs off their PMs (testbed_lc_endpoint),
    the PMs sharing one kernel (testbed_pm_cpu: vms) and this machine's CPUs as their capacity."""
    pms = [host for host in addresses if host != CONTROLLER]
    hosts = {
        "all": {"children": {"lab": {"children": {
            "controller": {"hosts": {CONTROLLER: {"testbed_address": addresses[CONTROLLER]}}},
            "pms": {"hosts": {pm: {"testbed_address": addresses[pm],
                                   "testbed_lc_endpoint": f"{addresses[CONTROLLER]}:{LC_BASE_PORT + i}"}
                              for i, pm in enumerate(pms)}},
        }}}}
    }
    settings = {
        "testbed_embedded": False,
        "testbed_technique": "openvz",
        "testbed_lab_network": NETWORK,
        "testbed_lab_gateway": GATEWAY,
        "testbed_lab_state_dir": str(path.parent / "state"),
        "testbed_capacity": os.cpu_count(),  # what the PMs' /proc/stat counts (the LCs' capacity)
        "testbed_cores": 4,
        "testbed_link_rate": "100mbit",
        "testbed_pm_cpu": "vms",
        "testbed_known_hosts": str(known_hosts),
        "ansible_host": "{{ testbed_address }}",
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes",
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    _write(path / "hosts.yml", yaml.safe_dump(hosts))
    _write(path / "group_vars" / "all.yml", yaml.safe_dump(settings))
    return path


def _remove_cgroups(parent: Path) -> None:
    """Kill whatever is left in the containers' cgroups (thawed first), then remove them."""
    for group in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            (group / "freezer.state").write_text("THAWED")
        for pid in (group / "cgroup.procs").read_text().split() if (group / "cgroup.procs").exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for group in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [parent]:
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


