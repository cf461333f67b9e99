"""The VM manager's API, event log and CC rounds, against real uvicorn servers on loopback.

The CC-round tests (marked lab: they need root for cgroups) run real LC daemons over real
cgroup v1 hierarchies holding real busy processes, so sampling, collection, snapshot and
decision are all the production code paths; only the migration itself needs a driver, and
those tests run the CC in dry-run (the embedded-lab test migrates real QEMU VMs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from testbed.balancer.assign_u import AssignU
from testbed.drivers.base import CGROUP_ROOT, Host
from testbed.errors import InputError
from testbed.manager.api import (
    CcConfig,
    HostRequest,
    HostSample,
    ManagerClient,
    MigrateOrder,
    MigrationOutcome,
    VmSample,
    ensure_token,
    load_token,
)
from testbed.manager.central import CentralController
from testbed.manager.central import create_app as cc_app
from testbed.manager.events import EventLog, read_events
from testbed.manager.local import LocalController, summarize
from testbed.manager.local import create_app as lc_app
from testbed.manager.sampler import CgroupSampler, Reading, VmCounters
from testbed.manager.snapshot import drain_decision, snapshot_from_samples

TOKEN = "s3cret-token"


class Served:
    """A real uvicorn server on 127.0.0.1 (any free port) in a thread, until `stop()`."""

    def __init__(self, app, port: int = 0) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# -- token, event log ------------------------------------------------------------------------


def test_token_file_is_created_0600_once_and_refused_when_readable_by_others(tmp_path):
    path = tmp_path / "lab" / "manager.token"
    assert ensure_token(path) is True
    assert os.stat(path).st_mode & 0o777 == 0o600
    token = load_token(path)
    assert len(token) >= 32
    assert ensure_token(path) is False and load_token(path) == token
    path.chmod(0o644)
    with pytest.raises(InputError, match="must be 0600"):
        load_token(path)


def test_event_log_appends_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.append("round", round=1)
    log.append("migration", vm="vm1", ok=True)
    log.close()
    with path.open("a") as out:
        out.write('{"t": 1, "kind": "rou')  # a crash mid-write
    assert [e["kind"] for e in read_events(path)] == ["round", "migration"]


def test_cc_restart_keeps_the_log_and_what_it_implies(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.append("round", round=7)
    log.append("migration", vm="vm1", source="a", dest="b", ok=True)
    log.append("migration", vm="vm2", source="a", dest="b", ok=False, error="boom")
    log.append("drain", host="pm-b")
    log.append("pause")
    log.close()
    cc = CentralController({}, CcConfig(), path)
    try:
        status = cc.status()
        assert (status.rounds, status.migrations, status.failed_migrations) == (7, 1, 1)
        assert status.drained == ["pm-b"] and status.paused
        assert set(cc.migrated_at) == {"vm1", "vm2"}
    finally:
        cc.stop()
    kinds = [e["kind"] for e in read_events(path)]
    assert kinds[:5] == ["round", "migration", "migration", "drain", "pause"]
    assert kinds[-2:] == ["cc-start", "cc-stop"]


# -- snapshot building -----------------------------------------------------------------------


def _sample(host: str, capacity: float, vms: dict[str, float], demand: float | None = None) -> HostSample:
    return HostSample(host=host, t=0.0, window=10.0, capacity=capacity, use=sum(vms.values()),
                      demand=demand if demand is not None else sum(vms.values()),
                      vms=[VmSample(name=n, use=u, demand=u, limit=25.0, throttled=0.0) for n, u in vms.items()])


def test_snapshot_converts_percent_of_each_pm_to_one_unit_and_keeps_the_running_copy():
    samples = {"big": _sample("big", 1.2, {"vm1": 50.0}),
               "small": _sample("small", 0.6, {"vm2": 50.0, "vm1": 1.0})}  # vm1's incoming side
    snap = snapshot_from_samples(samples, "use", drained={"small", "gone"}, in_flight=None)
    vms = dict(zip(snap.vm_names.tolist(), snap.vm_cpu.tolist()))
    assert vms == {"vm1": 60.0, "vm2": 30.0}  # 50 % of 1.2 CPUs = 0.6 CPU = 60 units
    assert snap.host_names[snap.vm_host[0]] == "big"
    assert snap.load_pct.tolist() == pytest.approx([50.0, 51.0])
    assert snap.excluded == frozenset({"small"})  # an unreachable drained host is simply absent


def test_drain_moves_the_stranded_vm_to_the_least_loaded_host():
    samples = {"a": _sample("a", 0.6, {"vm1": 40.0}), "b": _sample("b", 0.6, {"vm2": 30.0}),
               "c": _sample("c", 0.6, {"vm3": 10.0})}
    snap = snapshot_from_samples(samples, "use", drained={"a"}, in_flight=None)
    move = drain_decision(snap, AssignU()).migration
    assert (move.vm, move.source, move.destination) == ("vm1", "a", "c")
    assert drain_decision(snapshot_from_samples(samples, "use", set(), None), AssignU()) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 5.0), st.integers(0, 10**10), st.integers(0, 10**10),
                          st.integers(0, 10**10)), min_size=2, max_size=12),
       st.floats(0.05, 2.0), st.floats(0.5, 60.0))
def test_summaries_keep_use_below_demand_below_the_vm_limit(steps, limit_cpus, window):
    """Whatever the counters do (threads come and go, counters jump), 0 <= use <= demand and
    demand exceeds use only up to the VM's limit."""
    t, usage, delay, host = 0.0, 0, 0, 0
    readings = []
    for dt, d_usage, d_delay, d_host in steps:
        t, usage, delay, host = t + dt, usage + d_usage, delay + d_delay, host + d_host + d_usage
        vm = VmCounters(usage_ns=usage, run_delay_ns={7: delay}, throttled_ns=0, limit_cpus=limit_cpus)
        readings.append(Reading(t=t, wall=t, host_usage_ns=host, vms={"vm1": vm}))
    sample = summarize("pm", 0.6, readings, window)
    vm = sample.vms[0]
    assert 0 <= vm.use <= vm.demand
    assert vm.demand <= max(vm.use, vm.limit) * (1 + 1e-9)
    assert sample.demand >= sample.use - 1e-9


def test_snapshot_balances_on_demand_when_asked():
    sample = HostSample(host="a", t=0.0, window=10.0, capacity=0.6, use=100.0, demand=175.0,
                        vms=[VmSample(name=f"vm{i}", use=100 / 7, demand=25.0, limit=25.0, throttled=5.0)
                             for i in range(7)])
    other = _sample("b", 0.6, {})
    use = snapshot_from_samples({"a": sample, "b": other}, "use", set(), None)
    demand = snapshot_from_samples({"a": sample, "b": other}, "demand", set(), None)
    assert use.load_pct[0] == pytest.approx(100.0) and demand.load_pct[0] == pytest.approx(175.0)
    assert demand.vm_cpu.tolist() == pytest.approx([15.0] * 7)  # 25 % of 0.6 CPU each


# -- API: authentication and validation, on a real server -------------------------------------


@pytest.fixture
def cc_url(tmp_path):
    cc = CentralController({}, CcConfig(interval=1.0), tmp_path / "events.jsonl")
    served = Served(cc_app(cc, TOKEN))  # serving runs the rounds (no LCs here)
    yield served.url
    served.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_api_refuses_missing_or_wrong_token_with_401_and_changes_nothing(cc_url, headers):
    assert httpx.get(f"{cc_url}/v1/status", headers=headers).status_code == 401
    answer = httpx.post(f"{cc_url}/v1/pause", headers=headers)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    # a malformed body with a bad token is still 401: authentication comes first
    assert httpx.post(f"{cc_url}/v1/drain", headers=headers, content=b"{").status_code == 401
    assert httpx.put(f"{cc_url}/v1/config", headers=headers, json={"policy": "none"}).status_code == 401
    status = ManagerClient(cc_url, TOKEN).get("/v1/status")
    assert status["paused"] is False and status["config"]["policy"] == "assign-u"


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"hots": "x"}', b'{"host": "pm1; rm -rf /"}',
                                  json.dumps({"host": "x" * 65}).encode()])
def test_api_rejects_malformed_bodies_and_bad_names_with_422(cc_url, body):
    answer = httpx.post(f"{cc_url}/v1/drain", content=body,
                        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert answer.status_code == 422


@pytest.mark.parametrize("config", [{"interval": 0.5}, {"policy": "nope"}, {"params": {"bse": 2}},
                                    {"signal": "memory"}, {"label": "run 1"}, {"dry-run": True}])
def test_config_is_validated_before_it_applies(cc_url, config):
    answer = httpx.put(f"{cc_url}/v1/config", json=config, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 422
    assert ManagerClient(cc_url, TOKEN).get("/v1/status")["config"] == CcConfig(interval=1.0).model_dump()


def test_events_of_a_run_are_found_by_its_label(cc_url):
    client = ManagerClient(cc_url, TOKEN)
    since = time.time()
    client.put("/v1/config", CcConfig(interval=1.0, label="qemu.validation.r1"))
    deadline = time.monotonic() + 5
    while not (rounds := client.get("/v1/events", label="qemu.validation.r1")):
        assert time.monotonic() < deadline, "no round in 5 s at a 1 s interval"
        time.sleep(0.2)
    assert rounds[0]["kind"] == "round" and rounds[0]["action"] == "no-lc" and rounds[0]["t"] >= since
    recent = client.get("/v1/events", since=since)
    config_at = next(e["t"] for e in recent if e["kind"] == "config")
    assert config_at <= rounds[0]["t"]


def test_config_set_at_run_time_survives_a_respawn_but_not_new_flags(tmp_path):
    path = tmp_path / "events.jsonl"
    flags = CcConfig(interval=5.0)
    cc = CentralController({}, flags, path)
    cc.set_config(CcConfig(policy="none", interval=2.0, label="qemu.exp1.r3"))
    cc.stop()
    respawned = CentralController({}, flags, path)  # same flags: the supervisor restarted it
    assert respawned.config.policy == "none" and respawned.config.label == "qemu.exp1.r3"
    respawned.stop()
    restarted = CentralController({}, CcConfig(interval=3.0), path)  # new flags win
    assert restarted.config == CcConfig(interval=3.0)
    restarted.stop()


def test_api_publishes_its_openapi_schema_and_drain_unknown_host_is_404(cc_url):
    schema = httpx.get(f"{cc_url}/openapi.json").json()  # public on purpose (testbed.manager.api)
    assert {"/v1/status", "/v1/config", "/v1/events", "/v1/drain", "/v1/pause"} <= set(schema["paths"])
    assert [httpx.get(f"{cc_url}/{page}").status_code for page in ("docs", "redoc")] == [404, 404]
    client = ManagerClient(cc_url, TOKEN)
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        client.post("/v1/drain", HostRequest(host="tb-pm9"))


# -- real cgroups, real LC daemons, CC rounds (root) --------------------------------------------

CPU_PER_PM = 0.4  # three fake-free PMs of 0.4 CPU each fit in CI's 2 cores
VM_LIMIT = CPU_PER_PM / 4  # a 1-vCPU VM on a PM standing for 4 cores: 25 % of the PM
BUSY_LOOP = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass"
BUSY = [sys.executable, "-c", BUSY_LOOP, "60"]  # bounded: a minute at most


class CgroupPMs:
    """PMs as the lab contract lays them out (<parent>/<pm>[/<vm>] under cpu and cpuacct, with
    quotas) under a parent cgroup of their own, holding real busy processes; removed after."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen] = []
        self.dirs: list[Path] = [CGROUP_ROOT / c / parent for c in ("cpu", "cpuacct")]

    def _cgroup(self, host: Host, vm: str | None, cpus: float) -> list[Path]:
        made = [host.cgroup(c) / (vm or "") for c in ("cpu", "cpuacct")]
        for directory in made:
            directory.mkdir(parents=True, exist_ok=True)
            self.dirs.append(directory)
        (made[0] / "cpu.cfs_quota_us").write_text(str(round(cpus * 100_000)))
        return made

    def add_pm(self, pm: str, cpus: float = CPU_PER_PM) -> Host:
        host = self.hosts[pm] = Host(pm, "127.0.0.1", cpus, 4, cgroup_parent=self.parent)
        self._cgroup(host, None, cpus)
        return host

    def start_vm(self, pm: str, vm: str, cpus: float = VM_LIMIT) -> None:
        proc = subprocess.Popen(BUSY)
        self.procs.append(proc)
        for directory in self._cgroup(self.hosts[pm], vm, cpus):
            (directory / "cgroup.procs").write_text(str(proc.pid))

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for directory in sorted(set(self.dirs), key=lambda d: len(d.parts), reverse=True):
            if directory.exists():
                directory.rmdir()


@pytest.fixture
def pms():
    if os.geteuid() != 0:
        pytest.skip("needs root for cgroups")
    made = CgroupPMs(f"tmgr{os.getpid()}")
    yield made
    made.cleanup()


@contextmanager
def lc_daemons(pms: CgroupPMs, names: list[str]):
    """One LC daemon per PM on loopback, without a driver; yields {pm: Served}."""
    with ExitStack() as stack:
        servers = {}
        for name in names:
            lc = LocalController(CgroupSampler(pms.hosts[name]), migrate=None, period=0.5)
            servers[name] = Served(lc_app(lc, TOKEN))
            stack.callback(servers[name].stop)
        yield servers


def _make_cc(urls: dict[str, str], tmp_path: Path, **config) -> CentralController:
    clients = {name: ManagerClient(url, TOKEN, timeout=2.0) for name, url in urls.items()}
    return CentralController(clients, CcConfig(interval=2.0, dry_run=True, **config), tmp_path / "events.jsonl")


def _sample_after(host: Host, seconds: float) -> HostSample:
    lc = LocalController(CgroupSampler(host), migrate=None, period=0.5)
    lc.start()
    time.sleep(seconds + 0.5)
    lc.stop()
    return lc.sample(seconds)


@pytest.mark.lab
def test_lc_samples_use_of_real_cgroups_and_demand_stops_at_the_vm_limit(pms):
    pms.add_pm("a")
    pms.start_vm("a", "vm1")
    pms.start_vm("a", "vm2")
    sample = _sample_after(pms.hosts["a"], 2.0)
    assert sample.capacity == pytest.approx(CPU_PER_PM) and sample.window >= 2.0
    assert [vm.name for vm in sample.vms] == ["vm1", "vm2"]
    for vm in sample.vms:
        assert vm.limit == pytest.approx(25.0)
        assert 20.0 < vm.use <= 27.5  # a busy loop held at its quota (± one CFS period)
        assert vm.throttled > 0.5
        assert vm.demand == pytest.approx(max(vm.use, vm.limit))  # wants more, but only its vCPU
    assert sample.use == pytest.approx(sum(vm.use for vm in sample.vms), abs=2.0)


@pytest.mark.lab
def test_demand_sees_what_use_hides_on_a_saturated_pm(pms):
    """Two VMs that could each use the whole PM share it: use says 100 %, demand 200 %."""
    pms.add_pm("small", cpus=0.1)
    pms.start_vm("small", "vm1", cpus=0.1)
    pms.start_vm("small", "vm2", cpus=0.1)
    sample = _sample_after(pms.hosts["small"], 3.0)
    # A 10 ms quota per 100 ms period: one period more or less in the window, plus the sampler
    # thread's own lateness on a busy 2-core host, is worth ~10 points of this tiny PM (CI saw 108).
    assert sample.use == pytest.approx(100.0, abs=15.0)
    assert sample.demand == pytest.approx(200.0, abs=25.0)
    for vm in sample.vms:  # each gets a share, each wants the whole PM (its limit)
        assert 20.0 < vm.use < 80.0 and vm.demand == pytest.approx(100.0, abs=15.0)


@pytest.mark.lab
def test_cc_round_collects_decides_in_dry_run_and_survives_a_dead_lc(pms, tmp_path):
    for pm in ("a", "b", "c"):
        pms.add_pm(pm)
    pms.start_vm("a", "vm1")  # one VM at 25 % on a and one on b: no move can help (§4.5, t=25 s)
    pms.start_vm("b", "vm4")
    with lc_daemons(pms, ["a", "b", "c"]) as servers:
        time.sleep(2.2)
        cc = _make_cc({p: s.url for p, s in servers.items()}, tmp_path)
        first = cc.run_round()
        assert first["action"] == "balanced" and first["unreachable"] == []
        assert [vm["name"] for vm in first["samples"]["a"]["vms"]] == ["vm1"]

        pms.start_vm("a", "vm2")
        pms.start_vm("a", "vm3")  # a 75 %, b 25 %, c 0 %: a move from a to c helps
        time.sleep(2.2)
        second = cc.run_round()
        assert second["action"] == "dry-run"
        assert second["order"]["source"] == "a" and second["order"]["dest"] == "c"
        assert cc.in_flight is None and cc.migrations == 0  # dry-run never migrates

        servers["c"].stop()
        third = cc.run_round()
        assert third["unreachable"] == ["c"]
        assert third["action"] == "dry-run" and third["order"]["dest"] == "b"  # c left out
        status = cc.status()
        assert not status.lcs["c"].reachable and status.lcs["b"].reachable

        back = Served(servers["c"].app, port=servers["c"].port)  # the LC answers again
        try:
            fourth = cc.run_round()
        finally:
            back.stop()
        assert fourth["unreachable"] == [] and fourth["order"]["dest"] == "c"
        cc.stop()
    kinds = [e["kind"] for e in read_events(tmp_path / "events.jsonl")]
    assert kinds.count("round") == 4 and "migration" not in kinds
    assert kinds.index("lc-unreachable") < kinds.index("lc-reachable", kinds.index("lc-unreachable"))


@pytest.mark.lab
def test_cooldown_and_drain_hold_across_a_cc_restart(pms, tmp_path):
    pms.add_pm("a")
    pms.add_pm("b")
    for vm in ("vm1", "vm2", "vm3"):
        pms.start_vm("a", vm)  # a 75 %, b 0 %: the policy wants one of them moved
    log = EventLog(tmp_path / "events.jsonl")
    for vm in ("vm1", "vm2", "vm3"):  # ... but each moved moments ago (a previous CC's log)
        log.append("migration", vm=vm, source="b", dest="a", ok=True)
    log.close()
    with lc_daemons(pms, ["a", "b"]) as servers:
        time.sleep(2.2)
        urls = {p: s.url for p, s in servers.items()}
        cc = _make_cc(urls, tmp_path, cooldown=60.0)
        assert cc.run_round()["action"] == "cooldown"
        cc.set_drained("a", True)
        drain = cc.run_round()  # the operator's drain overrides the cool-down
        assert drain["action"] == "dry-run" and drain["order"]["source"] == "a"
        assert drain["order"]["dest"] == "b" and drain["snapshot"]["excluded"] == ["a"]
        cc.stop()

        again = _make_cc(urls, tmp_path, cooldown=60.0)  # a restarted CC remembers both
        assert again.status().drained == ["a"] and again.run_round()["action"] == "dry-run"
        again.set_drained("a", False)
        assert again.run_round()["action"] == "cooldown"
        again.stop()


@pytest.mark.parametrize("model", [MigrateOrder, CcConfig])
def test_compression_is_a_name_drivers_take_and_never_goes_with_post_copy(model):
    base = {"vm": "vm1", "dest": "pm2"} if model is MigrateOrder else {}
    for mode, compression in (("precopy", "zstd"), ("precopy", "zlib"), ("stopcopy", "bzip2"), ("postcopy", None)):
        assert model(**base, mode=mode, compression=compression).compression == compression
    assert model(**base).compression is None  # uncompressed unless asked
    for bad in ({"compression": "lz4"}, {"compression": "zstd", "mode": "postcopy"}):
        with pytest.raises(ValidationError):
            model(**base, **bad)


class _LcStub:
    """An LC as the CC sees it: a fixed sample, and the orders it is posted."""

    def __init__(self, sample: HostSample) -> None:
        self.url = f"stub://{sample.host}"
        self.sample = sample
        self.orders: list[dict] = []

    def get(self, path, **params):
        return self.sample.model_dump(mode="json")

    def post(self, path, body, timeout=None):
        self.orders.append(body.model_dump(mode="json"))
        return MigrationOutcome(vm=body.vm, source=self.sample.host, dest=body.dest, ok=True,
                                record={"details": {"compression": body.compression}}).model_dump(mode="json")


def test_cc_orders_migrations_in_its_configured_mode_and_compression(tmp_path):
    lcs = {"a": _LcStub(_sample("a", 0.6, {"vm1": 45.0, "vm2": 45.0})), "b": _LcStub(_sample("b", 0.6, {}))}
    cc = CentralController(lcs, CcConfig(interval=1.0, mode="stopcopy", compression="bzip2"), tmp_path / "ev.jsonl")
    try:
        ordered = cc.run_round()
        assert ordered["action"] == "migrate", ordered
        deadline = time.monotonic() + 10
        while cc.in_flight is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        cc.stop()
    assert ordered["order"]["compression"] == "bzip2"  # in the decision log, beside the mode
    (order,) = lcs["a"].orders
    assert (order["mode"], order["compression"], order["source"], order["dest"]) == ("stopcopy", "bzip2", "a", "b")
    (event,) = [e for e in read_events(tmp_path / "ev.jsonl") if e["kind"] == "migration"]
    assert event["ok"] and event["record"]["details"]["compression"] == "bzip2"
