"""The fake lab's OpenVZ toolstack (tests/fake_lab.py, tests/fakes/openvz/fakevz): vzctl, vzlist
and the fake `cat`'s /proc/vz/vestat in PATH, vzmigrate-shared at /usr/local/sbin, where the
openvz driver runs it from."""

from __future__ import annotations

from pathlib import Path

from fake_lab import FAKES, Toolstack


def _install(root: Path) -> None:
    for tool in ("vzctl", "vzlist", "vestat"):
        (root / "bin" / tool).symlink_to(FAKES / "openvz" / "fakevz")
    (root / "sbin" / "vzmigrate-shared").symlink_to(FAKES / "openvz" / "fakevz")


OPENVZ = Toolstack("openvz", _install, records="cts")
