"""The Appendix A study's server apps (testbed/runner/services.py): the commands they run in the
VM and on the controller, how the load tools' summaries read (outputs recorded on the embedded
lab, tests/data/services/), and on the lab a container serving each app under its load, migrated
by stop-and-copy, still answering that load on its new PM."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from testbed.drivers.base import MigrationMode, VMSpec
from testbed.drivers.container import ContainerDriver
from testbed.lab import Lab
from testbed.manager.local import lab_driver_hosts
from testbed.runner.services import (
    HTTP_CALLS,
    HTTP_RATE,
    PG_DATA,
    PG_HBA_LINE,
    ROUND_S,
    SERVICES,
    Database,
    Http,
    start,
)

DATA = Path(__file__).with_name("data") / "services"


def _recorded(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize("service", SERVICES.values(), ids=SERVICES)
def test_what_the_vm_runs_is_plain_words(service) -> None:
    """The container's init takes one line of words: none may be empty or hold white space."""
    for argv in (*service.setup, service.server):
        assert argv and all(word and not any(c.isspace() for c in word) for word in argv), argv


def test_httperf_sends_the_thesis_load_for_the_round() -> None:
    argv = Http().load("198.18.0.100", 5)
    options = dict(zip(argv[2::2], argv[3::2]))
    assert argv[:2] == ("httperf", "--hog")
    assert options["--server"] == "198.18.0.100" and options["--rate"] == str(HTTP_RATE) == "150"
    assert options["--num-calls"] == str(HTTP_CALLS) == "20" and options["--num-conns"] == str(150 * 5)


def test_pgbench_is_rate_limited_and_bounded_in_time() -> None:
    argv = Database().load("198.18.0.101", 5)
    assert argv[0] == "pgbench" and argv[-1] == "postgres"
    assert argv[argv.index("--time") + 1] == "5" and "--rate" in argv and "--host" in argv
    (init,) = Database().prepare("198.18.0.101")
    assert init[init.index("--init-steps") + 1] == "dtGvp"  # G: generated in the server, not sent


def test_the_hba_writer_appends_the_lab_network_line(tmp_path: Path) -> None:
    """The setup's Python one-liner, run for real with its file redirected into tmp_path."""
    (code,) = [argv[2] for argv in Database.setup if argv[:2] == ("python3", "-c")]
    hba = tmp_path / "pg_hba.conf"
    hba.write_text("local all all trust\n")

    def redirected(path: str, mode: str):
        assert path == f"{PG_DATA}/pg_hba.conf" and mode == "a"
        return hba.open(mode)

    exec(code, {"open": redirected})  # noqa: S102 - the command the container runs
    assert hba.read_text().splitlines() == ["local all all trust", "host\tall\tall\tsamenet\ttrust"]
    assert PG_HBA_LINE.split() == ["host", "all", "all", "samenet", "trust"]


def test_httperf_summary_of_the_round_a_migration_fell_in() -> None:
    summary = Http().parse(_recorded("httperf-migration.txt"))
    assert (summary.done, summary.errors, summary.rate) == (14278, 60, 150.2)
    assert summary.figures["connections"] == 750 and summary.figures["requests"] == 14338
    assert summary.figures["errors_connreset"] == 60 and summary.figures["status_2xx"] == 14278
    assert summary.figures["duration_s"] == pytest.approx(4.994)


def test_httperf_probe_answered_or_not() -> None:
    http = Http()
    probe = _recorded("httperf-probe.txt")
    assert http.answered(subprocess.CompletedProcess([], 0, probe, ""))
    assert not http.answered(subprocess.CompletedProcess([], 0, probe.replace("replies 1 ", "replies 0 "), ""))
    assert not http.answered(subprocess.CompletedProcess([], 124, "", ""))  # killed by `timeout`
    assert http.summary("ssh: connect to host 198.18.0.10 port 22: Connection refused") is None


def test_pgbench_summary_of_the_round_a_migration_fell_in() -> None:
    summary = Database().parse(_recorded("pgbench-migration.txt"))
    assert (summary.done, summary.errors) == (496, 0)
    assert summary.rate == pytest.approx(99.395889) and summary.figures["latency_avg_ms"] > 0


def test_pgbench_counts_clients_the_server_dropped_as_errors() -> None:
    summary = Database().parse(_recorded("pgbench-server-killed.txt"))  # postgres killed mid-round
    assert (summary.done, summary.errors, summary.figures["aborted_clients"]) == (157, 4, 4)


@pytest.mark.lab
@pytest.mark.parametrize("app", sorted(SERVICES))
def test_server_answers_its_load_after_a_stop_and_copy_migration(embedded_lab: Lab, app: str) -> None:
    driver = ContainerDriver(lab_driver_hosts(embedded_lab).values())
    name = f"svc-{app}"
    driver.destroy_vm(name)  # a leftover of an interrupted run
    driver.create_vm(VMSpec(name, memory_mb=256, vcpus=2), "tb-pm1")
    try:
        began = time.monotonic()
        server, load = start(SERVICES[app], driver, name, embedded_lab, deadline=time.time() + 120)
        ready = time.monotonic() - began
        time.sleep(ROUND_S + 1)  # one whole round before the migration
        record = driver.migrate(name, "tb-pm2", MigrationMode.STOPCOPY, compression="zstd")
        assert record.status == "completed", record.error
        end = record.start + record.total_time_s
        assert load.answered_after(end, timeout_s=60)
        summary = load.stop(after=end)
        print(app, f"ready in {ready:.1f} s, downtime {record.downtime_s:.2f} s, {record.bytes} B sent;",
              summary["total"], summary["after_migration"])
        after = summary["after_migration"]
        assert summary["total"]["failed_rounds"] == 0 and summary["total"]["rounds"] >= 3
        assert after["rounds"] >= 1 and after["done"] > 0
        # Serving on the new PM: per round, at least half the answers of the rounds begun before
        # the migration's end. Not an error bound: http's connection resets grow round by round
        # on this 2-core machine with or without a migration (resets per 5 s round of 750
        # connections, measured: 0, 0, 82, 156 without; 81, 179, 254, 214 with), and a fixed 1 %
        # of errors per answer failed CI (913 of 49033 over four rounds, 327 after the migration).
        before = [r["summary"] for r in summary["rounds"] if r["start"] < end and r["summary"]]
        assert before, summary["rounds"]
        per_round = sum(s["done"] for s in before) / len(before)
        assert after["done"] / after["rounds"] >= 0.5 * per_round, (per_round, after)
        assert not driver.workload(name, server.id).finished  # the same server, not a restarted one
        assert {vm.name: vm.host for vm in driver.list_vms()}[name] == "tb-pm2"
    finally:
        driver.destroy_vm(name)
