"""Commands on a real lab's hosts over SSH (paramiko), built from argument lists.

The real-lab drivers (xen, openvz, libvirt) run the technique's own tools on the PMs, where no
local API reaches. Every command is an argv list joined with `shlex.join`, so a VM name or a path
reaches the remote shell as one quoted word, never as shell syntax. One connection per host is
kept open (paramiko multiplexes channels), so the Local Controller's periodic `xentop`/`vestat`
reads do not pay an SSH handshake each time.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from testbed.errors import InputError

CONNECT_TIMEOUT_S = 10.0
OPEN_TIMEOUT_S = 20.0  # a busy PM's sshd (TCG guests on every core) answers an open in well under this
KEEPALIVE_S = 15.0


def ssh_client(known_hosts: Path | None) -> paramiko.SSHClient:
    """A client that talks only to hosts whose key it already knows (RejectPolicy): a host that
    answers with an unknown key is refused, never trusted on first use, since the token and root
    commands go over these connections. The keys: the lab's known_hosts (the embedded lab's is
    written by the lab_host role from the hosts' keys), or with None the user's ~/.ssh/known_hosts,
    where a real lab's hosts are once ssh or Ansible has been told to trust them."""
    client = paramiko.SSHClient()
    if known_hosts is None:
        client.load_system_host_keys()
    elif known_hosts.exists():
        # Read-only: load_host_keys would make paramiko rewrite ssh's file.
        client.get_host_keys().load(str(known_hosts))
    else:
        raise InputError(f"{known_hosts}: no such known_hosts file; provision the lab first (testbed lab up)")
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


class RemoteError(RuntimeError):
    """A remote command exited non-zero; carries what it printed on stderr."""

    def __init__(self, host: str, argv: Sequence[str], status: int, stderr: str) -> None:
        self.host, self.argv, self.status, self.stderr = host, tuple(argv), status, stderr
        last = stderr.strip().splitlines()[-1:] or ["no message"]
        super().__init__(f"{host}: {argv[0]} exited {status}: {last[0]}")


@dataclass(frozen=True)
class SshTarget:
    """How to reach a host: the lab's address, root, the lab key, the host keys (ssh_client)."""

    address: str
    key_file: Path
    known_hosts: Path | None = None
    user: str = "root"
    port: int = 22


class Remote:
    """One host reached over SSH; thread-safe (the LC samples while a migration runs)."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    def _connected(self) -> paramiko.SSHClient:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                client = ssh_client(self.target.known_hosts)
                client.connect(
                    self.target.address,
                    port=self.target.port,
                    username=self.target.user,
                    key_filename=str(self.target.key_file),
                    timeout=CONNECT_TIMEOUT_S,
                    allow_agent=False,
                    look_for_keys=False,
                )
                client.get_transport().set_keepalive(KEEPALIVE_S)
                self._client = client
            return self._client

    def run(
        self, argv: Sequence[str], timeout_s: float = 60.0, check: bool = True, stdin: bytes | None = None
    ) -> str:
        """Run argv on the host and return its stdout; RemoteError when it fails (if `check`)."""
        status, out, err = self.call(argv, timeout_s, stdin)
        if check and status != 0:
            raise RemoteError(self.target.address, argv, status, err)
        return out

    def call(
        self, argv: Sequence[str], timeout_s: float = 60.0, stdin: bytes | None = None
    ) -> tuple[int, str, str]:
        """Run argv on the host: (exit status, stdout, stderr)."""
        channel = self._session(timeout_s)
        channel.exec_command(shlex.join(argv))
        if stdin is not None:
            channel.sendall(stdin)
        channel.shutdown_write()
        with channel.makefile("rb") as chan_out, channel.makefile_stderr("rb") as chan_err:
            out = chan_out.read().decode()
            err = chan_err.read().decode()
        return channel.recv_exit_status(), out, err

    def _session(self, timeout_s: float) -> paramiko.Channel:
        """A new session channel, its reads bounded by `timeout_s`. Opening it waits at most
        OPEN_TIMEOUT_S, not the command's time (paramiko's exec_command waits the whole timeout
        for both). A connection whose server does not answer an open is dropped and made anew,
        once: no command has run on it yet, so trying again runs nothing twice. (On the test
        hosts one connection once stopped answering opens mid-run and the next 60 s call failed
        the run; keepalives now find a dead connection between calls too.)"""
        for attempt in (1, 2):
            transport = self._connected().get_transport()
            assert transport is not None  # _connected returns a connected client
            try:
                channel = transport.open_session(timeout=OPEN_TIMEOUT_S)
            except paramiko.ChannelException:
                raise  # the server answered: it refused (MaxSessions, say), and would again
            except paramiko.SSHException:
                if attempt == 2:
                    raise
                self.close()
                continue
            channel.settimeout(timeout_s)
            return channel
        raise AssertionError("unreachable")

    def stream(self, argv: Sequence[str], timeout_s: float = 3600.0) -> Iterator[tuple[float, str]]:
        """Run argv and yield (local clock, line) for each stdout line as it arrives (stderr
        merged), so a tool's progress messages get the time they were printed; raises
        RemoteError at the end if the command failed."""
        channel = self._session(timeout_s)
        channel.set_combine_stderr(True)
        channel.exec_command(shlex.join(argv))
        lines: list[str] = []
        buffer = b""
        for chunk in iter(lambda: channel.recv(65536), b""):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                yield time.time(), line
        if buffer:
            lines.append(buffer.decode(errors="replace"))
            yield time.time(), lines[-1]
        status = channel.recv_exit_status()
        if status != 0:
            raise RemoteError(self.target.address, argv, status, "\n".join(lines))

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file on the host over SFTP (a VM's config, say), no shell involved."""
        with self._connected().open_sftp() as sftp, sftp.open(path, "wb") as handle:
            handle.write(data)
            handle.chmod(mode)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
