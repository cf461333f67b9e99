"""The Central Controller's append-only event log: one JSON object per line.

Every line is flushed and fsynced before the CC acts on what it records, so a crash or a
restart loses nothing already decided; a torn last line (a crash mid-write) is skipped when
reading. The runner turns this file into results (rounds -> cpu_samples, migrations)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"t": time.time(), "kind": kind, **fields}
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        return event

    def close(self) -> None:
        self._file.close()


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete event in the log, oldest first (nothing if the log does not exist yet)."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
