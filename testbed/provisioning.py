"""What provisioned a lab: ansible-runner's artifacts of every playbook run, kept per inventory.

A campaign's provenance names the hosts' state through their facts, but how they got there (which
tasks changed what, warnings, the exact Ansible output) is in the artifacts of the last
provisioning. `testbed lab up` keeps them here; `testbed run` archives the newest site.yml run's
into the results directory, so a result can be traced to the provisioning it ran on.

Results are shared, and ansible-runner keeps every event, task results included: a task that
shows the manager's token (the balancer role reads it with `no_log`, but any role may slip) would
carry it into every campaign's provenance. So the archive is written file by file with the
token, and the base64 that `slurp` returns of it, replaced by REDACTED.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from testbed.manager import DEFAULT_TOKEN_FILE

#: Where the artifacts live: root's state (the lab is provisioned as root), one folder per inventory.
ROOT = Path("/var/lib/testbed/provisioning")
KEEP = 5  # runs kept per playbook and inventory: enough to compare, bounded on disk
REDACTED = b"<redacted: the lab's manager token>"


def artifacts_dir(inventory: Path, root: Path = ROOT) -> Path:
    """The inventory's folder: named for its path (readable) and a hash of it (unique)."""
    resolved = Path(inventory).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    return root / f"{resolved.name}-{digest}"


def new_ident(playbook: Path) -> str:
    """A run's folder name: the playbook and the UTC time it started (sortable)."""
    return f"{playbook.stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def prune(inventory: Path, playbook: Path, root: Path = ROOT, keep: int = KEEP) -> None:
    """Drop all but the newest `keep` runs of this playbook for this inventory."""
    runs = sorted(artifacts_dir(inventory, root).glob(f"{playbook.stem}-*"))
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def archive_latest(inventory: Path, dest_dir: Path, playbook: str = "site", root: Path = ROOT,
                   token_file: Path = DEFAULT_TOKEN_FILE) -> dict[str, Any]:
    """Archive the newest run of `playbook` for `inventory` into dest_dir (tar.gz) with the lab's
    token scrubbed (token_file's); what the manifest records of it. A lab provisioned by hand
    (plain ansible-playbook) has none: say so."""
    runs = sorted(artifacts_dir(inventory, root).glob(f"{playbook}-*"))
    if not runs:
        return {"playbook": f"{playbook}.yml", "found": False,
                "note": f"no `testbed lab up` artifacts under {artifacts_dir(inventory, root)}"}
    latest = runs[-1]
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / f"provisioning-{latest.name}.tar.gz"
    redacted = None
    if not archive.exists():  # a resumed campaign keeps the archive it started with
        partial = archive.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            redacted = _add_scrubbed(tar, latest, secret_forms(token_file))
        partial.replace(archive)
    status = _read(latest / "status")
    return {"playbook": f"{playbook}.yml", "found": True, "ident": latest.name, "status": status,
            "rc": _read(latest / "rc"), "stats": _stats(latest), "archive": archive.name,
            **({} if redacted is None else {"token_occurrences_redacted": redacted})}


def secret_forms(token_file: Path) -> list[bytes]:
    """The token as the artifacts may hold it: plain, and base64 of the file (what `slurp`
    registers) or of the bare token. None when there is no token file."""
    if not token_file.exists():
        return []
    content = token_file.read_bytes()
    token = content.strip()
    if not token:
        return []
    forms = {token, base64.b64encode(content), base64.b64encode(token)}
    return sorted(forms, key=len, reverse=True)  # the longest first: none is a part of another's match


def _add_scrubbed(tar: tarfile.TarFile, run_dir: Path, secrets: list[bytes]) -> int:
    """Add run_dir's files under its name, each with every secret form replaced; the count replaced."""
    count = 0
    tar.addfile(tar.gettarinfo(run_dir, arcname=run_dir.name))
    for path in sorted(run_dir.rglob("*")):
        info = tar.gettarinfo(path, arcname=f"{run_dir.name}/{path.relative_to(run_dir)}")
        if not info.isfile():
            tar.addfile(info)
            continue
        data = path.read_bytes()
        for secret in secrets:
            count += data.count(secret)
            data = data.replace(secret, REDACTED)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return count


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _stats(run_dir: Path) -> dict[str, Any] | None:
    """The play recap (per host ok/changed/failed counts) from the run's last stats event."""
    events = (run_dir / "job_events").glob("*.json")  # named "<counter>-<uuid>.json"
    for event_file in sorted(events, key=lambda p: int(p.name.partition("-")[0]), reverse=True):
        event = json.loads(event_file.read_text())
        if event.get("event") == "playbook_on_stats":
            data = event.get("event_data", {})
            return {key: data.get(key, {}) for key in ("ok", "changed", "failures", "dark", "skipped")}
    return None
