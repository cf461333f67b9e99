"""The Appendix A study's server apps: a web server, a database and a game server in the VM, each
under a bounded load sent from the lab's controller host, as the thesis' Http-server (Apache2
under httperf at 150 conn/s, 20 calls per connection), Mysql-server (sql-bench) and Game (an
OpenArena server with 2 clients).

- `http`: Debian's stock Apache2 (its own /etc/apache2, mpm_event) serving one of its stock
  icons, /icons/compressed.png (1108 bytes): at the thesis' 3,000 requests/s Debian's 10.7 kB
  default page would need ~260 Mbit/s, more than the embedded lab's 100 Mbit/s links. Apache
  runs from the container's read-only root because its Debian config takes its run, lock and log
  directories and pid file from the environment (what /etc/apache2/envvars sets for apache2ctl):
  they are pointed at the container's private /tmp. The load is httperf.
- `database`: PostgreSQL 15 (Debian's, /usr/lib/postgresql/15/bin), initdb'd into the
  container's private /tmp, run as user postgres (it refuses root), listening on the container's
  address and trusting the lab network (`samenet`); its dynamic shared memory in the data
  directory, so nothing is left in the host's /dev/shm when the container is destroyed. The load
  is pgbench (TPC-B-like), rate-limited, on tables pgbench -i generated in the server.
- `game`: Debian's OpenArena dedicated server (openarena-server: ioquake3's ioq3ded with
  OpenArena's data, run as the package's wrapper runs it, its home in the container's private
  /tmp), a free-for-all match on oa_dm1 without time or frag limit, played by GAME_BOTS
  server-side bots: they stand in for the thesis' 2 human clients, as a real client needs a
  display and speaks Quake 3's Huffman-coded protocol. The load is testbed/runner/q3probe.py on
  the controller: out-of-band `getstatus` queries at GAME_RATE, each matched to its reply, a
  round reporting queries answered, late and lost, latency and the players listed. The package
  is opt-in (~420 MB of game data): game_missing() says what to install, and the study refuses a
  `game` spec without it.

Everything the VM runs goes through the Driver's start_workload, whose words must hold no white
space (the container's init takes one line of words): the one file to write (the pg_hba.conf
line) is written by a Python one-liner whose text carries its white space as escapes.

The load runs on the controller (over the lab's ssh, so inside its namespace and cgroups on the
embedded lab) in consecutive rounds of ROUND_S, each bounded by its own count or duration and by
`timeout` there, all of them by the run's deadline. Rounds make the load's summary a timeline: the
first round that starts after the migration has ended shows whether the server answers on its new
PM, which one summary of one long run could not tell.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from testbed.drivers.base import Driver, WorkloadRun
from testbed.lab import Lab

Argv = tuple[str, ...]

#: Seconds of one load round: a few, so that one round starts soon after the migration ends.
ROUND_S = 5
#: Seconds a load round may overrun its own bound (connections timing out, ssh) before it is killed.
ROUND_SLACK_S = 15
SETUP_TIMEOUT_S = 120.0  # initdb on a busy 2-core machine takes ~5 s
READY_TIMEOUT_S = 60.0  # until the server answers the controller (measured: 0.5 s Apache, 5 s PostgreSQL)

HTTP_RATE = 150  # connections/s (thesis App. A)
HTTP_CALLS = 20  # requests per connection (thesis App. A)
HTTP_URI = "/icons/compressed.png"
HTTP_TIMEOUT_S = 5  # httperf's --timeout: a request unanswered this long is an error
HTTP_ENV = (("APACHE_RUN_USER", "www-data"), ("APACHE_RUN_GROUP", "www-data"), ("APACHE_RUN_DIR", "/tmp/apache2"),
            ("APACHE_PID_FILE", "/tmp/apache2/apache2.pid"), ("APACHE_LOCK_DIR", "/tmp/apache2"),
            ("APACHE_LOG_DIR", "/tmp/apache2"), ("LANG", "C"))

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_DATA = "/tmp/pgdata"
PG_USER = "postgres"
PG_SCALE = 2  # pgbench -s: 200,000 accounts, ~30 MB
PG_CLIENTS = 4
PG_TPS = 100  # pgbench -R: transactions/s all clients together
PG_HBA_LINE = "host\tall\tall\tsamenet\ttrust\n"

GAME_ENGINE = "/usr/lib/ioquake3/ioq3ded"  # ioquake3-server, what /usr/games/openarena-server runs
GAME_BASEPATH = "/usr/lib/openarena-server"  # openarena-server: OpenArena's game module and data
GAME_PACKAGE = "openarena-server"
GAME_HOME = "/tmp/openarena"
GAME_PORT = 27960
GAME_MAP = "oa_dm1"
GAME_BOTS = ("Angelyss", "Arachna")  # the thesis' 2 clients
GAME_BOT_SKILL = 2
#: Queries per second: ioquake3 answers one address a burst of 10, then one a second (q3probe).
GAME_RATE = 1
GAME_TIMEOUT_S = 1.0  # a reply later than this counts as late
GAME_PROBER = Path(__file__).with_name("q3probe.py")


class AddressedDriver(Driver, Protocol):
    """A driver that gives a VM's address on the lab network (the container driver)."""

    def address(self, vm: str) -> str: ...


@dataclass(frozen=True)
class Summary:
    """What a load tool reported for one round: `done` = replies (httperf) or transactions
    (pgbench), `errors` = what failed, `rate` = connections/s (httperf) or transactions/s
    (pgbench), and the tool's other figures."""

    done: int
    errors: int
    rate: float
    figures: dict[str, float] = field(default_factory=dict)


class Service(ABC):
    """A server app: what the VM runs (setup commands, then the server) and what the controller
    runs against it (a readiness probe, a preparation, load rounds), and how its output reads."""

    app: str
    tool: str
    setup: tuple[Argv, ...]
    server: Argv

    @abstractmethod
    def ready(self, address: str) -> Argv:
        """The controller's probe of the server."""

    def answered(self, done: subprocess.CompletedProcess[str]) -> bool:
        """Whether the readiness probe found the server answering."""
        return done.returncode == 0

    def prepare(self, address: str) -> tuple[Argv, ...]:
        """What the controller does once the server answers, before the load."""
        return ()

    @abstractmethod
    def load(self, address: str, seconds: int) -> Argv:
        """One load round of `seconds` from the controller, bounded by itself."""

    @abstractmethod
    def parse(self, output: str) -> Summary:
        """The load tool's summary (raises where the output holds none)."""

    def summary(self, output: str) -> Summary | None:
        """The tool's summary, or None where it printed none (it failed, or was killed)."""
        try:
            return self.parse(output)
        except (AttributeError, KeyError, ValueError):
            return None


class Http(Service):
    app = "http"
    tool = "httperf"
    setup = (("mkdir", "-p", "/tmp/apache2"),)
    server = ("env", *(f"{name}={value}" for name, value in HTTP_ENV), "apache2", "-DFOREGROUND")

    def ready(self, address: str) -> Argv:
        return self._httperf(address, conns=1, calls=1)

    def answered(self, done: subprocess.CompletedProcess[str]) -> bool:
        return done.returncode == 0 and (summary := self.summary(done.stdout)) is not None and summary.done > 0

    def load(self, address: str, seconds: int) -> Argv:
        return self._httperf(address, conns=HTTP_RATE * seconds, calls=HTTP_CALLS)

    @staticmethod
    def _httperf(address: str, conns: int, calls: int) -> Argv:
        # --hog: any local port, as 150 new connections/s leave thousands in TIME_WAIT.
        return ("httperf", "--hog", "--server", address, "--port", "80", "--uri", HTTP_URI,
                "--rate", str(HTTP_RATE), "--num-conns", str(conns), "--num-calls", str(calls),
                "--timeout", str(HTTP_TIMEOUT_S))

    def parse(self, output: str) -> Summary:
        total = _fields(output, "Total")
        errors = _fields(output, "Errors")
        status = dict(re.findall(r"(\dxx)=(\d+)", _line(output, r"^Reply status: (.*)$")))
        figures = {
            "connections": total["connections"], "requests": total["requests"], "duration_s": total["test-duration"],
            "conn_rate": _number(output, r"^Connection rate: ([\d.]+) conn/s"),
            "request_rate": _number(output, r"^Request rate: ([\d.]+) req/s"),
            "reply_rate_avg": _number(output, r"^Reply rate \[replies/s\]: .*avg ([\d.]+)"),
            "status_2xx": float(status["2xx"]),
            **{f"errors_{name}": value for name, value in errors.items() if name != "total"},
        }
        return Summary(int(total["replies"]), int(errors["total"]), figures["conn_rate"], figures)


class Database(Service):
    app = "database"
    tool = "pgbench"
    setup = (
        ("install", "-d", "-o", PG_USER, "-g", PG_USER, "-m", "700", PG_DATA),
        ("setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", f"{PG_BIN}/initdb",
         "--pgdata", PG_DATA, "--username", PG_USER, "--auth", "trust", "--no-sync", "--no-instructions"),
        ("python3", "-c", f"open({PG_DATA + '/pg_hba.conf'!r},'a').write({PG_HBA_LINE!r})"),
    )
    server = ("setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", f"{PG_BIN}/postgres",
              "-D", PG_DATA, "-c", "listen_addresses=*", "-c", "unix_socket_directories=",
              "-c", "dynamic_shared_memory_type=mmap", "-c", "shared_buffers=32MB")

    def ready(self, address: str) -> Argv:
        return ("pg_isready", "--host", address, "--username", PG_USER, "--timeout", "2")

    def prepare(self, address: str) -> tuple[Argv, ...]:
        # G: the rows are generated in the server, not sent over the lab network.
        return (("pgbench", *self._connect(address), "--initialize", "--init-steps", "dtGvp",
                 "--scale", str(PG_SCALE), "--quiet", PG_USER),)

    def load(self, address: str, seconds: int) -> Argv:
        return ("pgbench", *self._connect(address), "--no-vacuum", "--client", str(PG_CLIENTS), "--jobs", "1",
                "--rate", str(PG_TPS), "--time", str(seconds), PG_USER)

    @staticmethod
    def _connect(address: str) -> Argv:
        return ("--host", address, "--username", PG_USER)

    def parse(self, output: str) -> Summary:
        failed = re.search(r"^number of failed transactions: (\d+)", output, re.MULTILINE)
        aborted = len(re.findall(r"^pgbench: error: client \d+ aborted", output, re.MULTILINE))
        latency = re.search(r"^latency average = ([\d.]+) ms", output, re.MULTILINE)  # none without transactions
        figures = {
            "transactions": _number(output, r"^number of transactions actually processed: (\d+)"),
            "failed": float(failed.group(1)) if failed else 0.0,
            "aborted_clients": float(aborted),
            "tps": _number(output, r"^tps = ([\d.]+)"),
            **({"latency_avg_ms": float(latency.group(1))} if latency else {}),
        }
        return Summary(int(figures["transactions"]), int(figures["failed"]) + aborted, figures["tps"], figures)


def game_server(port: int = GAME_PORT, home: str = GAME_HOME, ip: str | None = None) -> Argv:
    """The game server's command: the cvars of Debian's wrapper (/usr/games/openarena-server), a
    LAN server (dedicated 1: no master server heartbeats), IPv4 on `port` (of `ip`, else of every
    address), a match without limits on GAME_MAP, and GAME_BOTS in it."""
    cvars = (("com_basegame", "baseoa"), ("fs_basepath", GAME_BASEPATH), ("fs_homepath", home),
             ("com_legacyprotocol", "71"), ("com_protocol", "71"), ("dedicated", "1"), ("net_enabled", "1"),
             *((("net_ip", ip),) if ip else ()), ("net_port", str(port)), ("ttycon", "0"), ("sv_maxclients", "8"),
             ("g_gametype", "0"), ("timelimit", "0"), ("fraglimit", "0"))
    return (GAME_ENGINE, *(word for name, value in cvars for word in ("+set", name, value)),
            "+map", GAME_MAP, *(word for bot in GAME_BOTS for word in ("+addbot", bot, str(GAME_BOT_SKILL))))


class Game(Service):
    app = "game"
    tool = "q3probe"
    setup = (("mkdir", "-p", GAME_HOME),)
    server = game_server()

    def ready(self, address: str) -> Argv:
        return self._probe(address, 1)

    def answered(self, done: subprocess.CompletedProcess[str]) -> bool:
        return (summary := self.summary(done.stdout)) is not None and summary.done > 0

    def load(self, address: str, seconds: int) -> Argv:
        return self._probe(address, seconds)

    @staticmethod
    def _probe(address: str, seconds: int) -> Argv:
        # Debian's python3, without the venv's site: the controller may have only that.
        return ("python3", "-I", "-S", str(GAME_PROBER), address, str(GAME_PORT), "--rate", str(GAME_RATE),
                "--seconds", str(seconds), "--timeout", f"{GAME_TIMEOUT_S:g}")

    def parse(self, output: str) -> Summary:
        (line,) = [line for line in output.splitlines() if line.startswith('{"')][-1:]
        figures = {name: float(value) for name, value in json.loads(line).items() if name != "tool"}
        return Summary(int(figures["answered"]), int(figures["late"] + figures["lost"]),
                       figures["answered"] / max(1.0, figures["sent"] / GAME_RATE), figures)


def game_missing() -> str | None:
    """What this machine (whose file system the embedded lab's PMs share) lacks for the game
    server, or None."""
    missing = [path for path in (GAME_ENGINE, f"{GAME_BASEPATH}/baseoa") if not Path(path).exists()]
    if not missing:
        return None
    return (f"{GAME_PACKAGE} is not installed ({', '.join(missing)} missing): it is opt-in, ~420 MB; install it "
            "with `bash scripts/bootstrap.sh --game`, or set lab_host_game: true and run `testbed lab up`")


SERVICES: dict[str, Service] = {service.app: service for service in (Http(), Database(), Game())}


def start_server(service: Service, driver: Driver, vm: str, controller_address: str) -> WorkloadRun:
    """Run the service's setup in the VM (each must succeed), then start its server.

    First the VM sends one empty UDP datagram to the controller: resolving the controller's
    address, it makes the controller learn the VM's (an ARP request updates its target's
    neighbour entry, as the ARP announcement an OpenVZ container's start sends). Without it a
    container that took the address of one destroyed moments before is unreachable from the
    controller until its entry for the old one expires (measured: ~30 s)."""
    announce = ("python3", "-c", f"__import__('socket').socket(2,2).sendto(b'',({controller_address!r},9))")
    for argv in (announce, *service.setup):
        done = driver.wait_workload(vm, driver.start_workload(vm, list(argv)).id, SETUP_TIMEOUT_S)
        if done.exit_status != 0:
            said = [line for _, line in done.output[-3:]]
            raise RuntimeError(f"{service.app} setup in {vm}: {argv[0]} "
                               + (f"exit status {done.exit_status}: {said}" if done.finished
                                  else f"did not end in {SETUP_TIMEOUT_S:g} s"))
    return driver.start_workload(vm, list(service.server))


class Controller:
    """Runs bounded commands on the lab's controller host (over the lab's ssh)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def run(self, argv: Argv, limit_s: float) -> subprocess.CompletedProcess[str]:
        """`argv` there, killed by `timeout` there after `limit_s`, and the ssh here a bit later."""
        bounded = ["timeout", "--kill-after=5", f"{limit_s:g}", *argv]
        try:
            return subprocess.run(self.lab.ssh_argv(self.lab.controller, bounded), capture_output=True,
                                  text=True, timeout=limit_s + ROUND_SLACK_S, check=False)
        except subprocess.TimeoutExpired as err:
            return subprocess.CompletedProcess(err.cmd, -9, _text(err.stdout), _text(err.stderr))


def wait_ready(service: Service, controller: Controller, address: str, server: WorkloadRun, driver: Driver,
               timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the server answers the controller; then its preparation (each must succeed)."""
    deadline = time.monotonic() + timeout_s
    while not service.answered(controller.run(service.ready(address), 5)):
        if driver.wait_workload(server.vm, server.id, 0).finished or time.monotonic() > deadline:
            said = [line for _, line in server.output[-3:]]
            raise RuntimeError(f"{service.app} server in {server.vm} not answering at {address} "
                               f"(exit status {server.exit_status}, {said})")
        time.sleep(1)
    for argv in service.prepare(address):
        done = controller.run(argv, SETUP_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{service.app}: {' '.join(argv[:2])} on the controller failed "
                               f"(exit {done.returncode}): {done.stderr.strip()[-300:]}")


def start(service: Service, driver: AddressedDriver, vm: str, lab: Lab, deadline: float) -> tuple[WorkloadRun, Load]:
    """The service's server in the VM, answering the controller, and its load from there until
    stopped or `deadline` (host clock)."""
    server = start_server(service, driver, vm, lab.controller.address)
    controller, address = Controller(lab), driver.address(vm)
    wait_ready(service, controller, address, server, driver)
    return server, Load(service, controller, address, deadline)


@dataclass
class Round:
    """One load round: when it ran (host clock), its exit status and what its tool reported."""

    start: float
    end: float
    returncode: int
    summary: Summary | None
    error: str | None = None


class Load:
    """The service's load in rounds of ROUND_S from the controller until stopped or `deadline`
    (host clock), in a thread of its own."""

    def __init__(self, service: Service, controller: Controller, address: str, deadline: float) -> None:
        self.service, self.controller, self.address, self.deadline = service, controller, address, deadline
        self.rounds: list[Round] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{service.app}-load", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set() and time.time() + ROUND_S < self.deadline:
            start = time.time()
            done = self.controller.run(self.service.load(self.address, ROUND_S), ROUND_S + ROUND_SLACK_S)
            summary = self.service.summary(done.stdout + done.stderr)
            error = None if summary is not None else (done.stderr or done.stdout).strip()[-300:]
            self.rounds.append(Round(start, time.time(), done.returncode, summary, error))

    def answered_after(self, when: float, timeout_s: float) -> bool:
        """Wait (up to `timeout_s` beyond one round) for the first round started after `when`:
        whether the server answered in it."""
        deadline = time.monotonic() + timeout_s + ROUND_S + ROUND_SLACK_S
        while time.monotonic() < deadline and self._thread.is_alive():
            if after := [r for r in self.rounds if r.start >= when]:
                return after[0].summary is not None and after[0].summary.done > 0
            time.sleep(0.5)
        return any(r.start >= when and r.summary is not None and r.summary.done > 0 for r in self.rounds)

    def stop(self, after: float | None) -> dict[str, object]:
        """End the rounds (the current one ends by its own bound) and summarise them: every round,
        the totals, and those of the rounds started after `after` (the migration's end)."""
        self._stop.set()
        self._thread.join(ROUND_S + 2 * ROUND_SLACK_S)
        return {"tool": self.service.tool, "argv": list(self.service.load(self.address, ROUND_S)),
                "rounds": [asdict(r) for r in self.rounds], "total": _totals(self.rounds),
                "after_migration": None if after is None else _totals([r for r in self.rounds if r.start >= after])}


def _totals(rounds: list[Round]) -> dict[str, float]:
    summaries = [r.summary for r in rounds if r.summary is not None]
    return {"rounds": len(rounds), "failed_rounds": len(rounds) - len(summaries),
            "done": sum(s.done for s in summaries), "errors": sum(s.errors for s in summaries)}


def _line(output: str, pattern: str) -> str:
    return re.search(pattern, output, re.MULTILINE).group(1)


def _fields(output: str, label: str) -> dict[str, float]:
    """The `name value name value ...` pairs of httperf's `LABEL:` lines (Total, Errors)."""
    lines = [line.split() for line in re.findall(rf"^{label}: (.*)$", output, re.MULTILINE)]
    if not lines:
        raise ValueError(f"no {label}: line")
    return {name: float(value) for words in lines for name, value in zip(words[::2], words[1::2])}


def _number(output: str, pattern: str) -> float:
    return float(_line(output, pattern))


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""
