"""The HTTP+JSON API between the Central Controller, the Local Controllers and the runner.

FastAPI publishes the schema of both daemons at /openapi.json, on purpose without the token: it
describes the routes (what the source code says), never state or secrets, and a client can check
what it talks to before it holds a token. The interactive /docs and /redoc pages are off (they load
their scripts from a CDN; the lab network has no browser). Every other route requires
`Authorization: Bearer <token>`, the per-lab secret in a 0600 file. Names of VMs and
hosts are validated here, at the boundary, so that nothing unvalidated ever reaches a driver's
command line."""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from testbed.errors import InputError
from testbed.manager import MAX_WINDOW, Signal

if TYPE_CHECKING:
    from testbed.lab import LabHost

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:+-]{1,200}$")]
MigrationMode = Literal["precopy", "stopcopy", "postcopy"]
#: What a migration's stream may be compressed with (None: not at all); each technique's driver
#: takes some of them (QEMU: zstd, zlib; containers: bzip2, zstd) and refuses the others.
MigrationCompression = Literal["zstd", "zlib", "bzip2"]


def _compressible(mode: MigrationMode, compression: MigrationCompression | None) -> None:
    """Refuse compression with post-copy, which no driver can combine (QEMU 7.2's multifd
    compression is pre-copy only; containers migrate by stop-and-copy)."""
    if compression is not None and mode == "postcopy":
        raise ValueError(f"compression {compression} cannot go with a post-copy migration")


class VmSample(BaseModel):
    """One VM's CPU over a sampling window, in percent of its PM's capacity.

    `use` is what the thesis measured; `demand` adds the time the VM's threads were runnable
    but waiting (capped at the VM's own CPU limit, so a VM cannot demand more than its vCPUs)."""

    name: Name
    use: float = Field(ge=0)
    demand: float = Field(ge=0)
    limit: float = Field(ge=0, description="the VM's own CPU cap, % of host capacity")
    throttled: float = Field(ge=0, description="seconds the VM's cgroup was throttled in the window")


class HostSample(BaseModel):
    """A PM's CPU over a window ending at `t` (Unix time), in percent of its capacity."""

    host: Name
    t: float
    window: float = Field(ge=0, description="seconds covered")
    capacity: float = Field(gt=0, description="CPUs the PM stands for (its cgroup quota)")
    use: float = Field(ge=0)
    demand: float = Field(ge=0)
    vms: list[VmSample]


class MigrateOrder(BaseModel):
    """Move `vm` to `dest`. `source`, if given, is where the sender believes the VM is; the LC
    refuses (409) an order whose source is not itself, rather than act on a stale belief.
    `mode` and `compression` reach the VM's driver unchanged; one that lacks them fails the
    migration with its reason (the runner's spec validation keeps such orders from being made)."""

    vm: Name
    dest: Name
    source: Name | None = None
    mode: MigrationMode = "precopy"
    compression: MigrationCompression | None = None

    @model_validator(mode="after")
    def _compression_fits_mode(self) -> MigrateOrder:
        _compressible(self.mode, self.compression)
        return self


class MigrationOutcome(BaseModel):
    """What an LC answers to an order: the driver's MigrationRecord, or why it failed."""

    vm: Name
    source: Name
    dest: Name
    ok: bool
    error: str | None = None
    record: dict[str, Any] | None = None


class HostRequest(BaseModel):
    host: Name


class LcStatus(BaseModel):
    url: str
    reachable: bool
    last_seen: float | None = None
    error: str | None = None
    sample: HostSample | None = None


class CcConfig(BaseModel):
    """How the CC balances; set at start (`testbed manager cc` flags) and changeable at run
    time (`PUT /v1/config`), e.g. by the runner before each run. `label` (a run id, say) is
    copied into every round and migration event, so a run's events are found by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = "assign-u"
    params: dict[str, float] = {}
    interval: float = Field(10.0, ge=1.0, le=MAX_WINDOW, description="seconds between rounds (thesis: 10)")
    signal: Signal = "use"
    cooldown: float = Field(60.0, ge=0, description="seconds before a moved VM may move again")
    mode: MigrationMode = "precopy"
    compression: MigrationCompression | None = None
    dry_run: bool = False
    label: Label | None = None

    @model_validator(mode="after")
    def _compression_fits_mode(self) -> CcConfig:
        _compressible(self.mode, self.compression)
        return self


class CcStatus(BaseModel):
    config: CcConfig
    paused: bool
    drained: list[str]
    in_flight: MigrateOrder | None
    rounds: int
    last_round: dict[str, Any] | None
    migrations: int
    failed_migrations: int
    event_log: str
    lcs: dict[str, LcStatus]


def load_token(path: Path) -> str:
    """Read the lab's token, refusing a file that others could read (it authorises migrations)."""
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as err:
        raise InputError(f"token file {path}: {err.strerror}") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"token file {path}: mode {stat.S_IMODE(mode):o}, must be 0600")
    if not token:
        raise InputError(f"token file {path}: empty")
    return token


def ensure_token(path: Path) -> bool:
    """Create the token file (mode 0600, never world-readable even briefly) unless it exists.

    Returns whether it was created, so Ansible can report `changed` truthfully."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        load_token(path)
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return True


def bearer_guard(token: str):
    """A FastAPI dependency that turns away (401) any request without the exact token.

    Installed app-wide, it runs before the body is parsed, so a bad request with a bad
    token gets 401, never 422, and nothing changes."""
    expected = f"Bearer {token}".encode()

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def make_app(title: str, token: str, start: Callable[[], None], stop: Callable[[], None]) -> FastAPI:
    """An app whose daemon work (sampling, rounds) runs exactly while it serves.

    The work is stopped in the lifespan, not after `uvicorn.run` returns, because uvicorn
    re-raises SIGTERM once it has shut down and the process would die before any cleanup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start()
        yield
        await asyncio.to_thread(stop)

    return FastAPI(title=title, version="1", lifespan=lifespan, dependencies=[Depends(bearer_guard(token))],
                   docs_url=None, redoc_url=None)


class ManagerClient:
    """A client of one daemon (LC or CC): base URL + token; raises httpx errors on failure."""

    def __init__(self, url: str, token: str, timeout: float = 5.0) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    def get(self, path: str, **params: Any) -> Any:
        response = self._http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: BaseModel | None = None, timeout: float | None = None) -> Any:
        return self._send("POST", path, body, timeout)

    def put(self, path: str, body: BaseModel) -> Any:
        return self._send("PUT", path, body, None)

    def _send(self, method: str, path: str, body: BaseModel | None, timeout: float | None) -> Any:
        extra = {} if timeout is None else {"timeout": timeout}
        payload = None if body is None else body.model_dump(mode="json")
        response = self._http.request(method, path, json=payload, **extra)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self._http.close()


def url_for(address: str, port: int) -> str:
    return f"http://{address}:{port}"


def lc_url(pm: LabHost, port: int) -> str:
    """A PM's Local Controller: on the PM at `port`, or where its inventory's testbed_lc_endpoint
    says (an LC run on another host, `testbed manager lc --over-ssh`)."""
    return f"http://{pm.lc_endpoint}" if pm.lc_endpoint else url_for(pm.address, port)
