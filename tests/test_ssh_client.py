"""Host keys: paramiko talks only to hosts whose key the lab's known_hosts (or, for a real lab
without one, ~/.ssh/known_hosts) holds, never trusting on first use; the lab_host role writes the
embedded lab's known_hosts from its hosts' keys. Checked against a real SSH server on loopback."""

from __future__ import annotations

import base64
import importlib.util
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from testbed.drivers.ssh import Remote, SshTarget, ssh_client
from testbed.errors import InputError

FILTERS = Path(__file__).resolve().parent.parent / "roles" / "lab_host" / "filter_plugins" / "lab_host.py"


def _filters():
    spec = importlib.util.spec_from_file_location("lab_host_filters", FILTERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[int, paramiko.PKey]]:
    """An SSH server on 127.0.0.1 with its own host key that accepts no login: a client gets as far
    as authentication only if it accepted the host key."""
    key = _host_key(tmp_path_factory.mktemp("server"))
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(transport: paramiko.Transport) -> None:
        try:
            transport.start_server(server=paramiko.ServerInterface())
        except (paramiko.SSHException, EOFError):
            transport.close()

    thread = threading.Thread(target=_accept, args=(listener, key, stop, serve), daemon=True)
    thread.start()
    yield listener.getsockname()[1], key
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _accept(listener: socket.socket, key: paramiko.PKey, stop: threading.Event, serve) -> None:
    """Hand each connection to `serve` as a server-side transport with the host key, until stop."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        transport = paramiko.Transport(sock)
        transport.add_server_key(key)
        serve(transport)


def _host_key(directory: Path) -> paramiko.PKey:
    """A fresh ed25519 host key (paramiko cannot generate ed25519 keys; ssh-keygen can)."""
    import subprocess

    path = directory / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


def _known_hosts(tmp_path: Path, port: int, key: paramiko.PKey) -> Path:
    """The file as the lab_host role writes it (its filter, from a slurp result of the .pub)."""
    pub = f"{key.get_name()} {key.get_base64()} tb-pm1\n".encode()
    slurped = [{"content": base64.b64encode(pub).decode(), "item": {"name": "tb-pm1", "address": f"[127.0.0.1]:{port}"}}]
    path = tmp_path / "known_hosts"
    path.write_text(_filters().lab_host_known_hosts(slurped))
    return path


def _connect(client: paramiko.SSHClient, port: int) -> None:
    client.connect("127.0.0.1", port=port, username="root", password="x", timeout=10,
                   allow_agent=False, look_for_keys=False)


def test_the_role_writes_one_known_hosts_line_per_host():
    pub = base64.b64encode(b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA tb-pm1\n").decode()
    text = _filters().lab_host_known_hosts([{"content": pub, "item": {"name": "tb-pm1", "address": "198.18.0.2"}}])
    assert text == "198.18.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n"


def test_a_known_host_is_reached_and_the_file_is_left_alone(server, tmp_path):
    port, key = server
    known = _known_hosts(tmp_path, port, key)
    before = known.read_text()
    client = ssh_client(known)
    assert isinstance(client._policy, paramiko.RejectPolicy)
    with pytest.raises(paramiko.AuthenticationException):  # past the host key check
        _connect(client, port)
    assert known.read_text() == before


def test_a_changed_or_unknown_host_key_is_refused(server, tmp_path):
    port, _ = server
    other = _host_key(tmp_path)
    client = ssh_client(_known_hosts(tmp_path, port, other))
    with pytest.raises(paramiko.BadHostKeyException, match="does not match"):
        _connect(client, port)
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _connect(ssh_client(empty), port)


def test_without_a_lab_file_the_users_known_hosts_decide(server, tmp_path, monkeypatch):
    port, key = server
    monkeypatch.setenv("HOME", str(tmp_path))
    client = ssh_client(None)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _connect(client, port)
    (tmp_path / ".ssh").mkdir()
    _known_hosts(tmp_path / ".ssh", port, key)
    with pytest.raises(paramiko.AuthenticationException):
        _connect(ssh_client(None), port)


def test_a_missing_lab_known_hosts_is_one_line_before_any_connection(tmp_path):
    target = SshTarget("127.0.0.1", tmp_path / "id_ed25519", known_hosts=tmp_path / "absent")
    with pytest.raises(InputError, match="absent: no such known_hosts file"):
        Remote(target).run(["true"])


class _Server(paramiko.ServerInterface):
    """Accepts any key and runs `echo WORD` (the only command) on a session channel. On the
    connection numbered `stalled` it never answers a channel open: its transport thread waits,
    as a server that stopped answering one connection did on the test hosts."""

    def __init__(self, number: int, stalled: int | None, refuse: bool, stop: threading.Event, ran: list[str]):
        self.number, self.stalled, self.refuse, self.stop, self.ran = number, stalled, refuse, stop, ran

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if self.number == self.stalled:
            self.stop.wait(30)
        if self.refuse:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.ran.append(command.decode())

        def reply() -> None:
            channel.sendall(command.decode().removeprefix("echo ").encode() + b"\n")
            channel.send_exit_status(0)
            channel.close()

        # after paramiko has sent the request's success, which it does once this returns
        threading.Timer(0.2, reply).start()
        return True


@pytest.fixture
def exec_server(tmp_path):
    """Start a loopback server (stalled: which connection never answers opens; refuse: every open
    refused); yields (port, connections made, commands run) and a known_hosts for it."""
    key = _host_key(tmp_path)
    stop = threading.Event()
    started: list[threading.Thread] = []

    def start(stalled: int | None = None, refuse: bool = False):
        listener = socket.create_server(("127.0.0.1", 0))
        connections: list[paramiko.Transport] = []
        ran: list[str] = []

        def serve(transport: paramiko.Transport) -> None:
            connections.append(transport)
            transport.start_server(server=_Server(len(connections), stalled, refuse, stop, ran))

        thread = threading.Thread(target=_accept, args=(listener, key, stop, serve), daemon=True)
        thread.start()
        started.append(thread)
        port = listener.getsockname()[1]
        return port, connections, ran, _known_hosts(tmp_path, port, key)

    yield start
    stop.set()
    for thread in started:
        thread.join(timeout=5)


def _client_key(tmp_path: Path) -> Path:
    _host_key(tmp_path)  # writes tmp_path/host_key: any key logs in here
    return tmp_path / "host_key"


def test_a_connection_that_stops_answering_opens_is_made_anew_and_the_command_runs_once(
    exec_server, tmp_path, monkeypatch
):
    monkeypatch.setattr("testbed.drivers.ssh.OPEN_TIMEOUT_S", 0.5)
    port, connections, ran, known = exec_server(stalled=1)
    keys = tmp_path / "client"
    keys.mkdir()
    remote = Remote(SshTarget("127.0.0.1", _client_key(keys), known, port=port))
    assert remote.run(["echo", "hello"]) == "hello\n"
    assert len(connections) == 2 and ran == ["echo hello"]
    remote.close()


def test_a_refused_open_is_raised_without_a_new_connection(exec_server, tmp_path, monkeypatch):
    monkeypatch.setattr("testbed.drivers.ssh.OPEN_TIMEOUT_S", 0.5)
    port, connections, ran, known = exec_server(refuse=True)
    keys = tmp_path / "client"
    keys.mkdir()
    remote = Remote(SshTarget("127.0.0.1", _client_key(keys), known, port=port))
    with pytest.raises(paramiko.ChannelException):
        remote.run(["echo", "hello"])
    assert len(connections) == 1 and ran == []
    remote.close()


# --- a Local Controller on another host than its PM (`testbed manager lc --over-ssh`) -------------

class _Shell(paramiko.ServerInterface):
    """Accepts any key and runs each exec request's command with this machine's shell, as sshd
    does: the "PM" at the other end of the LC's SSH is this machine."""

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        import subprocess

        def run() -> None:
            done = subprocess.run(["sh", "-c", command.decode()], capture_output=True, timeout=30, check=False)
            channel.sendall(done.stdout)
            channel.sendall_stderr(done.stderr)
            channel.send_exit_status(done.returncode)
            channel.close()

        threading.Timer(0.05, run).start()
        return True


@pytest.fixture
def shell_server(tmp_path):
    """A loopback SSH server running commands here; yields (port, known_hosts, client key)."""
    key = _host_key(tmp_path)
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(
        target=_accept, args=(listener, key, stop, lambda t: t.start_server(server=_Shell())), daemon=True
    )
    thread.start()
    port = listener.getsockname()[1]
    keys = tmp_path / "client"
    keys.mkdir()
    yield port, _known_hosts(tmp_path, port, key), _client_key(keys)
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_an_lc_over_ssh_reads_its_pm_through_ssh_and_a_missing_tool_means_no_vms(shell_server) -> None:
    """The sampler of an LC that does not run on its PM reads the PM's /proc/stat and USER_HZ over
    SSH (here the PM is this machine, so its CPUs are this machine's); a technique's tool the PM
    lacks (virsh, vzlist and /proc/vz here) answers no VMs, as on the PM itself."""
    import os

    from testbed.drivers.base import Host
    from testbed.manager.sampler import ProcStatSampler, ssh_tool, vm_reader

    port, known, key = shell_server
    tool = ssh_tool(Remote(SshTarget("127.0.0.1", key, known, port=port)))
    assert tool(["getconf", "CLK_TCK"]).strip() == str(os.sysconf("SC_CLK_TCK"))
    pm = Host("pm1", "127.0.0.1", 1.0, 4)
    for technique in ("kvm", "openvz"):
        sampler = ProcStatSampler("pm1", vm_reader(technique, pm, tool), tool=tool)
        assert sampler.capacity == os.cpu_count()
        first, second = sampler.read(), sampler.read()
        assert first.vms == {} and second.host_total_ns >= first.host_total_ns > 0
    with pytest.raises(OSError, match="127.0.0.1: cat exited 1"):
        tool(["cat", "/proc/vz/vestat"])
