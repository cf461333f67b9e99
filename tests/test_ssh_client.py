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

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            transport = paramiko.Transport(sock)
            transport.add_server_key(key)
            try:
                transport.start_server(server=paramiko.ServerInterface())
            except (paramiko.SSHException, EOFError):
                transport.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], key
    stop.set()
    thread.join(timeout=5)
    listener.close()


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
