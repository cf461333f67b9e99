"""The Central Controller (CC): every interval it collects from all LCs in parallel, builds a
balancer Snapshot, asks the policy, and orders at most one migration at a time.

Rules, in the order a round applies them (each round is logged with the rule that applied):
- an LC that does not answer is marked unreachable and its PM left out of the Snapshot (its
  VMs neither move nor receive) until it answers again; the others keep being balanced;
- `paused`: collect and log, decide nothing;
- a migration in flight: collect and log, decide nothing (the thesis' one-at-a-time); nor
  for one interval after it ends ("settling"), while the samples' window still mixes the
  loads from before the move (deciding on them would move a second VM for nothing);
- drained PMs are excluded hosts of the Snapshot, so no policy sends a VM to them; while one
  still holds VMs, the round moves one of them (to its least-marginal-cost host) instead of
  asking the policy, ignoring cool-down (drain is the operator's order);
- a VM migrated less than `cooldown` seconds ago (successfully or not) is not moved again:
  the round is logged as `cooldown` and nothing happens (no ping-pong, no retry storm);
- `dry_run`: the decision is logged as it would be ordered, never sent.
The gate and the action are testbed/manager/round_rule.py's, which the simulator's CC shares.
State that must survive a restart (drained PMs, pause, cool-down clocks, counts, and the
config set at run time when the CC comes back with the flags it had) is rebuilt from the event
log, which is the only state the CC keeps on disk."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Query

from testbed.balancer import Decision, Policy, get_policy
from testbed.balancer.assign_u import AssignU
from testbed.errors import InputError
from testbed.manager import round_rule
from testbed.manager.api import (
    CcConfig,
    CcStatus,
    HostRequest,
    HostSample,
    LcStatus,
    ManagerClient,
    MigrateOrder,
    MigrationOutcome,
    make_app,
)
from testbed.manager.events import EventLog, read_events
from testbed.manager.snapshot import decision_order, drain_decision, snapshot_from_samples, snapshot_json

MIGRATION_TIMEOUT_S = 900.0  # the driver's own timeout (300 s for QEMU) ends it first


def _policy(config: CcConfig) -> Policy:
    """The configured policy (InputError names a bad policy or parameter)."""
    return get_policy(config.policy, **config.params)


class CentralController:
    def __init__(self, lcs: dict[str, ManagerClient], config: CcConfig, event_log: Path) -> None:
        self.lcs = lcs
        self.event_log_path = event_log
        self.status_of = {host: LcStatus(url=client.url, reachable=False) for host, client in lcs.items()}
        self.paused = False
        self.drained: set[str] = set()
        self.in_flight: MigrateOrder | None = None
        self.settle_until = 0.0  # monotonic time before which no round decides
        self.migrated_at: dict[str, float] = {}
        self.rounds = 0
        self.migrations = 0
        self.failed_migrations = 0
        self.last_round: dict[str, Any] | None = None
        self.config = self._restore(list(read_events(event_log)), config)
        self.policy = _policy(self.config)
        self.events = EventLog(event_log)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(len(lcs), 1), thread_name_prefix="cc-collect")
        self._stop = threading.Event()
        self._rounds: threading.Thread | None = None
        self._closed = False
        self.events.append("cc-start", flags=config.model_dump(), config=self.config.model_dump(),
                           lcs={h: c.url for h, c in lcs.items()})

    def _restore(self, events: list[dict[str, Any]], flags: CcConfig) -> CcConfig:
        """Rebuild what the previous CC knew from its log (counts, drain, pause, cool-downs) and
        return the config to run with: the flags, unless the previous CC ran with the same flags
        (a respawn), in which case its config as last set at run time."""
        config = flags
        for event in events:
            kind = event["kind"]
            if kind == "cc-start":
                config = CcConfig(**event["config"]) if event.get("flags") == flags.model_dump() else flags
            elif kind == "config":
                config = CcConfig(**event["config"])
            elif kind == "round":
                self.rounds = event["round"]
            elif kind == "migration":
                self.migrated_at[event["vm"]] = event["t"]
                self.migrations += event["ok"]
                self.failed_migrations += not event["ok"]
            elif kind in ("drain", "undrain"):
                (self.drained.add if kind == "drain" else self.drained.discard)(event["host"])
            elif kind in ("pause", "resume"):
                self.paused = kind == "pause"
        return config

    # -- one round -------------------------------------------------------------------------

    def _collect(self, window: float) -> dict[str, HostSample | str]:
        """Every LC's sample over the last `window` seconds, or why it did not answer."""
        futures = {host: self._pool.submit(client.get, "/v1/sample", window=window)
                   for host, client in self.lcs.items()}
        answers: dict[str, HostSample | str] = {}
        for host, future in futures.items():
            try:
                answers[host] = HostSample.model_validate(future.result())
            except (httpx.HTTPError, ValueError) as err:
                answers[host] = _describe(err)
        return answers

    def _note_reachability(self, answers: dict[str, HostSample | str]) -> dict[str, HostSample]:
        """Update each LC's status, logging each change of reachability once."""
        samples = {}
        for host, answer in answers.items():
            status = self.status_of[host]
            if isinstance(answer, str):
                if status.reachable or status.error is None:
                    self.events.append("lc-unreachable", host=host, error=answer)
                status.reachable, status.error = False, answer
                continue
            if not status.reachable:
                self.events.append("lc-reachable", host=host)
            status.reachable, status.error, status.last_seen, status.sample = True, None, time.time(), answer
            samples[host] = answer
        return samples

    def run_round(self) -> dict[str, Any]:
        answers = self._collect(self.config.interval)
        with self._lock:
            samples = self._note_reachability(answers)
            config = self.config
            snapshot = snapshot_from_samples(samples, config.signal, self.drained, self.in_flight)
            decision, order, action = None, None, self._gate(snapshot is None)
            if action is None:
                drain = drain_decision(snapshot, self.policy if isinstance(self.policy, AssignU) else AssignU())
                decision = drain or self.policy(snapshot)
                order = _order(decision, config)
                action = self._action_for(order, draining=drain is not None)
                if action == "migrate":
                    self.in_flight = order
            self.rounds += 1
            self.last_round = self.events.append(
                "round", round=self.rounds, label=config.label, signal=config.signal,
                samples={host: sample.model_dump(mode="json") for host, sample in samples.items()},
                unreachable=sorted(set(self.lcs) - set(samples)), drained=sorted(self.drained),
                snapshot=snapshot_json(snapshot), decision=None if decision is None else decision.to_json(),
                action=action, order=None if order is None else order.model_dump(mode="json"))
        if action == "migrate":
            threading.Thread(target=self._migrate, args=(order, config.label), name=f"cc-migrate-{order.vm}",
                             daemon=True).start()
        return self.last_round

    def _gate(self, no_lcs: bool) -> str | None:
        """Why this round may not decide at all, or None (the rule: round_rule.gate)."""
        return round_rule.gate(no_lcs=no_lcs, paused=self.paused, in_flight=int(self.in_flight is not None),
                               now=time.monotonic(), settle_until=self.settle_until)

    def _action_for(self, order: MigrateOrder | None, draining: bool) -> str:
        """What becomes of the round's order (the rule: round_rule.action)."""
        return round_rule.action(
            order is not None, now=time.time(), cooldown=self.config.cooldown, draining=draining,
            migrated_at=float("-inf") if order is None else self.migrated_at.get(order.vm, float("-inf")),
            dry_run=self.config.dry_run)

    def _migrate(self, order: MigrateOrder, label: str | None) -> None:
        try:
            answer = self.lcs[order.source].post("/v1/migrate", order, timeout=MIGRATION_TIMEOUT_S)
            outcome = MigrationOutcome.model_validate(answer)
        except (httpx.HTTPError, ValueError) as err:
            outcome = MigrationOutcome(vm=order.vm, source=order.source, dest=order.dest, ok=False,
                                       error=_describe(err))
        with self._lock:
            if self._closed:
                return  # the CC stopped while the LC migrated: see stop()
            self.events.append("migration", label=label, **outcome.model_dump(mode="json"))
            self.migrated_at[order.vm] = time.time()
            self.migrations += outcome.ok
            self.failed_migrations += not outcome.ok
            self.in_flight = None
            self.settle_until = round_rule.settle_until(time.monotonic(), self.config.interval)

    # -- control ---------------------------------------------------------------------------

    def set_config(self, config: CcConfig) -> None:
        """Replace the config and settle for one of its intervals: the runner sets it as a run's
        workloads start, and the window the next round reads would still hold what came before
        (the VMs' creation, restored from their boot snapshots, or the previous run), on which the
        CC once moved an idle VM in the first second of every validation run (§4.5). The
        simulator's first window starts with the run, so it needs no such rule."""
        policy = _policy(config)
        with self._lock:
            self.config, self.policy = config, policy
            self.settle_until = max(self.settle_until, round_rule.settle_until(time.monotonic(), config.interval))
            self.events.append("config", config=config.model_dump())

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            self.paused = paused
            self.events.append("pause" if paused else "resume")

    def set_drained(self, host: str, drained: bool) -> None:
        if host not in self.lcs:
            raise KeyError(host)
        with self._lock:
            (self.drained.add if drained else self.drained.discard)(host)
            self.events.append("drain" if drained else "undrain", host=host)

    def status(self) -> CcStatus:
        with self._lock:
            return CcStatus(
                config=self.config, paused=self.paused, drained=sorted(self.drained),
                in_flight=self.in_flight, rounds=self.rounds, last_round=self.last_round,
                migrations=self.migrations, failed_migrations=self.failed_migrations,
                event_log=str(self.event_log_path),
                lcs={host: status.model_copy() for host, status in self.status_of.items()})

    def start(self) -> None:
        """Run rounds in the background until `stop()`."""
        self._rounds = threading.Thread(target=self._run_forever, name="cc-rounds", daemon=True)
        self._rounds.start()

    def _run_forever(self) -> None:
        """Rounds on a fixed schedule (a slow round delays the next, never doubles it up)."""
        next_round = time.monotonic()
        while not self._stop.is_set():
            self.run_round()
            next_round = max(next_round + self.config.interval, time.monotonic())
            self._stop.wait(next_round - time.monotonic())

    def stop(self) -> None:
        """Stop the rounds and close the log (a migration in flight goes on in its LC; its
        outcome is then missing from the log, and the VM is wherever the next CC finds it)."""
        self._stop.set()
        if self._rounds is not None:
            self._rounds.join()
        self._pool.shutdown(wait=False)
        with self._lock:
            self.events.append("cc-stop")
            self.events.close()
            self._closed = True


def _order(decision: Decision | None, config: CcConfig) -> MigrateOrder | None:
    """The decision's migration as an order, in the configured mode and compression."""
    order = decision_order(decision, config.mode)
    return None if order is None else MigrateOrder(**order.model_dump() | {"compression": config.compression})


def _describe(err: Exception) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}: {err.response.text[:200]}"
    return f"{type(err).__name__}: {err}"


def create_app(cc: CentralController, token: str) -> FastAPI:
    app = make_app("testbed Central Controller", token, cc.start, cc.stop)

    @app.get("/v1/status", response_model=CcStatus)
    def status() -> CcStatus:
        return cc.status()

    @app.put("/v1/config", response_model=CcStatus)
    def config(config: CcConfig) -> CcStatus:
        """Replace the whole config (what the runner does before each run)."""
        try:
            cc.set_config(config)
        except InputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        return cc.status()

    @app.get("/v1/events")
    def events(since: float = Query(0.0, description="Unix time"), label: str | None = None) -> list[dict]:
        """The event log from `since` on, only events of `label` if given."""
        return [e for e in read_events(cc.event_log_path)
                if e["t"] >= since and (label is None or e.get("label") == label)]

    @app.post("/v1/pause", response_model=CcStatus)
    def pause() -> CcStatus:
        cc.set_paused(True)
        return cc.status()

    @app.post("/v1/resume", response_model=CcStatus)
    def resume() -> CcStatus:
        cc.set_paused(False)
        return cc.status()

    def drain_route(drained: bool):
        def route(request: HostRequest) -> CcStatus:
            try:
                cc.set_drained(request.host, drained)
            except KeyError as err:
                raise HTTPException(status_code=404, detail=f"no LC for host {request.host}") from err
            return cc.status()
        return route

    app.post("/v1/drain", response_model=CcStatus)(drain_route(True))
    app.post("/v1/undrain", response_model=CcStatus)(drain_route(False))
    return app
