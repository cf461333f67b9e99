"""Dump, send, receive and load the private memory of a frozen process tree (shared kernel).

The container driver's stop-and-copy migration without CRIU: with the tree frozen, `dump`
writes every present page of every private writable mapping of its processes to a dump file;
`send` streams that file (optionally through bzip2 or zstd) over TCP to a `receive` on the
destination PM, which writes it to a file there; `load` writes the pages back into the same
processes (the kernel is shared, so they are the same processes at the same addresses).

Run as `python -m testbed.drivers.memdump`, this module is the migration agent: the driver starts
one on each PM, inside that PM's cgroups and network namespace, so the PMs pay for the dump, the
compression and the transfer as they do in the thesis. The agent reads one JSON command per stdin
line and answers one JSON line on stdout: {"ok": true, ...figures} or {"ok": false, "error": ...}.

Dump file: b"TBDUMP1\\n", then records <pid u32, address u64, length u64> + `length` bytes,
ended by a record with pid 0.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"TBDUMP1\n"
RECORD = struct.Struct("<IQQ")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Bytes moved per process_vm_readv/writev call (and the agent's buffer size).
CHUNK = 16 * 2**20
IOV_MAX = 1024
#: Compressors for `send`/`receive`: the thesis compressed dump files with bzip2.
COMPRESSORS = {"bzip2": (["bzip2", "-c"], ["bzip2", "-dc"]), "zstd": (["zstd", "-qc"], ["zstd", "-qdc"])}
_PRESENT_OR_SWAPPED = np.uint64(3 << 62)


class DumpError(RuntimeError):
    """A dump, transfer or load step failed; the message says which process or peer and why."""


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    getattr(_libc, _name).restype = ctypes.c_ssize_t
    getattr(_libc, _name).argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                      ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]


@dataclass(frozen=True)
class Region:
    """A run of present pages of one process."""

    pid: int
    start: int
    length: int


def private_writable_mappings(pid: int) -> list[tuple[int, int]]:
    """The (start, end) of a process's private writable mappings: what a migration must carry
    (code and read-only data come back from files on shared storage; shared mappings live in
    files or shm, not in the process)."""
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        perms, name = fields[1], fields[5] if len(fields) > 5 else ""
        if perms[1] == "w" and perms[3] == "p" and name != "[vsyscall]":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def present_regions(pid: int) -> list[Region]:
    """Runs of pages the process really has (present or swapped, from /proc/PID/pagemap), so a
    large reserved but untouched heap or stack costs nothing, as in CRIU and OpenVZ dumps."""
    regions = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for start, end in private_writable_mappings(pid):
            first, count = start // PAGE, (end - start) // PAGE
            raw = os.pread(pagemap.fileno(), count * 8, first * 8)
            present = (np.frombuffer(raw, dtype=np.uint64) & _PRESENT_OR_SWAPPED) != 0
            edges = np.flatnonzero(np.diff(np.concatenate(([False], present, [False])).astype(np.int8)))
            for run_start, run_end in zip(edges[0::2], edges[1::2], strict=True):
                regions.append(Region(pid, start + int(run_start) * PAGE, int(run_end - run_start) * PAGE))
    return regions


def _transfer(call, pid: int, buffer: ctypes.Array, remote: list[tuple[int, int]]) -> None:
    """One process_vm_readv/writev of `remote` spans to/from the start of `buffer`."""
    total = sum(length for _, length in remote)
    local = (_Iovec * 1)(_Iovec(ctypes.addressof(buffer), total))
    iov = (_Iovec * len(remote))(*(_Iovec(addr, length) for addr, length in remote))
    done = call(pid, local, 1, iov, len(remote), 0)
    if done != total:
        err = ctypes.get_errno()
        raise DumpError(f"pid {pid}: moved {done} of {total} bytes ({os.strerror(err) if done < 0 else 'short'})")


def _batches(regions: list[Region]) -> Iterator[list[Region]]:
    """Regions (split to CHUNK) grouped so one syscall moves at most CHUNK bytes of one pid."""
    batch: list[Region] = []
    size = 0
    for region in regions:
        for offset in range(0, region.length, CHUNK):
            piece = Region(region.pid, region.start + offset, min(CHUNK, region.length - offset))
            if batch and (batch[0].pid != piece.pid or size + piece.length > CHUNK or len(batch) == IOV_MAX):
                yield batch
                batch, size = [], 0
            batch.append(piece)
            size += piece.length
    if batch:
        yield batch


def dump(pids: list[int], path: Path) -> dict[str, int]:
    """Write the present private writable pages of `pids` (a frozen tree) to `path`."""
    buffer = ctypes.create_string_buffer(CHUNK)
    view = memoryview(buffer).cast("B")
    regions = [region for pid in pids for region in present_regions(pid)]
    data = 0
    with open(path, "wb") as out:
        out.write(MAGIC)
        for batch in _batches(regions):
            _transfer(_libc.process_vm_readv, batch[0].pid, buffer, [(r.start, r.length) for r in batch])
            offset = 0
            for region in batch:
                out.write(RECORD.pack(region.pid, region.start, region.length))
                out.write(view[offset:offset + region.length])
                offset += region.length
            data += offset
        out.write(RECORD.pack(0, 0, 0))
    return {"regions": len(regions), "data_bytes": data, "dump_bytes": path.stat().st_size}


def _records(dump_file: BinaryIO) -> Iterator[tuple[int, int, int]]:
    if dump_file.read(len(MAGIC)) != MAGIC:
        raise DumpError(f"{dump_file.name}: not a testbed memory dump")
    while True:
        header = dump_file.read(RECORD.size)
        if len(header) != RECORD.size:
            raise DumpError(f"{dump_file.name}: truncated (no end record)")
        pid, start, length = RECORD.unpack(header)
        if pid == 0:
            return
        yield pid, start, length


def load(path: Path) -> dict[str, int]:
    """Write every page of a dump back into its process (at the same address)."""
    buffer = ctypes.create_string_buffer(CHUNK)
    view = memoryview(buffer).cast("B")
    data = regions = 0
    with open(path, "rb") as dump_file:
        for pid, start, length in _records(dump_file):
            for offset in range(0, length, CHUNK):
                piece = min(CHUNK, length - offset)
                if dump_file.readinto(view[:piece]) != piece:
                    raise DumpError(f"{path}: truncated in pid {pid}'s pages at {start + offset:#x}")
                _transfer(_libc.process_vm_writev, pid, buffer, [(start + offset, piece)])
            data += length
            regions += 1
    return {"regions": regions, "data_bytes": data}


# --- transfer over the lab network -------------------------------------------------------------

def send(path: Path, address: str, port: int, compress: str | None, connect_timeout_s: float,
         timeout_s: float) -> dict[str, int]:
    """Stream a dump file to a receiver, through `compress` if given; counts bytes on the wire.
    An unreachable receiver fails within `connect_timeout_s`; a stalled transfer, `timeout_s`."""
    wire = 0
    with socket.create_connection((address, port), timeout=connect_timeout_s) as sock, open(path, "rb") as src:
        sock.settimeout(timeout_s)
        stream: BinaryIO = src
        compressor = None
        if compress:
            compressor = subprocess.Popen([*COMPRESSORS[compress][0], str(path)], stdout=subprocess.PIPE)
            stream = compressor.stdout
        try:
            while chunk := stream.read(2**20):
                sock.sendall(chunk)
                wire += len(chunk)
        finally:
            if compressor is not None:
                compressor.stdout.close()
                if compressor.wait() != 0:
                    raise DumpError(f"{compress} exited with {compressor.returncode}")
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(16) != b"ok":  # the receiver has the whole file on its disk
            raise DumpError(f"receiver {address}:{port} did not confirm the dump")
    return {"wire_bytes": wire}


class Receiver:
    """The destination's end of `send`: listens on the PM's lab address, writes one dump file."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]

    def receive(self, path: Path, compress: str | None, timeout_s: float) -> dict[str, int]:
        self.sock.settimeout(timeout_s)
        conn, _ = self.sock.accept()
        wire = 0
        with conn, open(path, "wb") as out:
            conn.settimeout(timeout_s)
            decompressor = None
            sink: BinaryIO = out
            if compress:
                decompressor = subprocess.Popen(COMPRESSORS[compress][1], stdin=subprocess.PIPE, stdout=out)
                sink = decompressor.stdin
            try:
                while chunk := conn.recv(2**20):
                    sink.write(chunk)
                    wire += len(chunk)
            finally:
                if decompressor is not None:
                    decompressor.stdin.close()
                    if decompressor.wait() != 0:
                        raise DumpError(f"{compress} -d exited with {decompressor.returncode}")
            out.flush()
            conn.sendall(b"ok")
        return {"wire_bytes": wire, "dump_bytes": path.stat().st_size}


# --- the agent -------------------------------------------------------------------------------

def _serve() -> None:
    """Answer commands until stdin closes; every failure is an answer, never a traceback."""
    receiver: Receiver | None = None
    for line in sys.stdin:
        command = json.loads(line)
        started = time.monotonic()
        try:
            match command["cmd"]:
                case "dump":
                    answer = dump(command["pids"], Path(command["file"]))
                case "load":
                    answer = load(Path(command["file"]))
                case "listen":
                    receiver = Receiver(command["address"])
                    answer = {"port": receiver.port}
                case "receive":
                    if receiver is None:
                        raise DumpError("receive before listen")
                    answer = receiver.receive(Path(command["file"]), command["compress"], command["timeout_s"])
                case "send":
                    answer = send(Path(command["file"]), command["address"], command["port"],
                                  command["compress"], command["connect_timeout_s"], command["timeout_s"])
                case other:
                    raise DumpError(f"unknown command {other!r}")
            answer = {"ok": True, **answer, "seconds": time.monotonic() - started}
        except (OSError, DumpError, KeyError) as err:
            answer = {"ok": False, "error": f"{command.get('cmd')}: {err or type(err).__name__}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve()
