"""The Appendix A study's `game` app (testbed/runner/services.py: Game; testbed/runner/q3probe.py):
the prober's packets, its reading of a server's replies and its round summary; what the VM and
the controller run; and, natively on this machine (no lab), Debian's OpenArena server on
127.0.0.1 with its bots, probed, frozen by SIGSTOP for 2 s, and answering again after SIGCONT.

The native test needs openarena-server (opt-in, ~420 MB): scripts/test.sh installs it
(`scripts/bootstrap.sh --game`); elsewhere the test is skipped, saying so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from testbed.errors import InputError
from testbed.runner import migration_study, services
from testbed.runner.q3probe import OOB, main, parse_status, probe, query, summarize
from testbed.runner.services import (
    GAME_BOTS,
    GAME_PORT,
    GAME_PROBER,
    GAME_RATE,
    SERVICES,
    Game,
    game_missing,
    game_server,
)
from testbed.spec import parse_spec

#: A statusResponse as OpenArena's server sent it (its info string shortened), two bots listed.
REPLY = (OOB + b"statusResponse\n\\challenge\\tb7q3\\sv_maxclients\\8\\mapname\\oa_dm1\\g_gametype\\0\n"
         b"3 0 \"Angelyss\"\n0 0 \"Arachna\"\n")
SERVER_READY_S = 60.0


def test_getstatus_packet_is_four_ff_bytes_then_the_command() -> None:
    assert query() == b"\xff\xff\xff\xffgetstatus\n"
    assert query("tb12q3") == b"\xff\xff\xff\xffgetstatus tb12q3\n"
    for bad in ("", "two words", "a\\b", "x" * 129):
        with pytest.raises(ValueError, match="one plain word"):
            query(bad)


def test_status_reply_gives_the_info_string_and_the_players() -> None:
    status = parse_status(REPLY)
    assert status.info == {"challenge": "tb7q3", "sv_maxclients": "8", "mapname": "oa_dm1", "g_gametype": "0"}
    assert status.players == [(3, 0, "Angelyss"), (0, 0, "Arachna")]
    assert parse_status(REPLY.split(b"3 0")[0]).players == []  # an empty server
    for bad in (b"statusResponse\n\\a\\b\n", OOB + b"infoResponse\n\\a\\b\n", OOB + b"statusResponse",
                OOB + b"statusResponse\n\\odd\n"):
        with pytest.raises(ValueError):
            parse_status(bad)


def test_round_summary_tells_answered_late_and_lost() -> None:
    figures = summarize(5, [0.002, 0.004, 1.9, 0.003], timeout_s=1.0, players=[2, 2, 1, 2])
    assert figures == {"sent": 5, "answered": 3, "late": 1, "lost": 1, "median_ms": 3.5, "max_ms": 1900.0,
                       "players": 2, "players_min": 1}
    assert summarize(3, [], 1.0, []) == {"sent": 3, "answered": 0, "late": 0, "lost": 3, "median_ms": 0.0,
                                         "max_ms": 0.0, "players": -1, "players_min": -1}


def test_prober_is_bounded() -> None:
    for rate, seconds, timeout in ((0, 5, 1), (1, 0, 1), (1, 1e9, 1), (1, 5, 0), (1, 5, 1e9)):
        with pytest.raises(ValueError, match="out of bounds"):
            probe("127.0.0.1", 9, rate, seconds, timeout)


def test_prober_counts_queries_nobody_answers_as_lost(capsys: pytest.CaptureFixture[str]) -> None:
    """Against a loopback UDP port nobody reads: every query sent, none answered, exit status 1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        began = time.monotonic()
        assert main(["127.0.0.1", str(silent.getsockname()[1]), "--rate", "10", "--seconds", "0.5",
                     "--timeout", "0.2"]) == 1
        assert time.monotonic() - began < 3
        assert silent.recv(200).startswith(OOB + b"getstatus tb")  # the queries did arrive
    figures = json.loads(capsys.readouterr().out)
    assert (figures["sent"], figures["answered"], figures["late"], figures["lost"], figures["players"]) == (5, 0, 0, 5, -1)


def test_what_the_vm_and_the_controller_run() -> None:
    game = SERVICES["game"]
    assert isinstance(game, Game) and game.server[0] == "/usr/lib/ioquake3/ioq3ded"
    argv = game.server
    cvars = {argv[i + 1]: argv[i + 2] for i, word in enumerate(argv) if word == "+set"}
    assert cvars["dedicated"] == "1" and cvars["net_port"] == str(GAME_PORT) and "net_ip" not in cvars
    assert cvars["fs_homepath"].startswith("/tmp/") and cvars["timelimit"] == cvars["fraglimit"] == "0"
    assert [argv[i + 1] for i, word in enumerate(argv) if word == "+addbot"] == list(GAME_BOTS)
    assert 2 <= len(GAME_BOTS) <= 4 and GAME_RATE <= 1  # ioquake3 answers one address once a second
    load = game.load("198.18.0.100", 5)
    assert load[:4] == ("python3", "-I", "-S", str(GAME_PROBER)) and load[4:6] == ("198.18.0.100", str(GAME_PORT))
    assert load[load.index("--seconds") + 1] == "5" and game.ready("198.18.0.100")[-3] == "1"


def test_game_summary_reads_the_probers_line() -> None:
    game = Game()
    line = json.dumps({"tool": "q3probe", **summarize(5, [0.001, 0.002, 1.5], 1.0, [2, 2, 2])})
    summary = game.parse(f"some warning\n{line}\n")
    assert (summary.done, summary.errors, summary.rate) == (2, 3, pytest.approx(0.4))
    assert summary.figures["late"] == 1 and summary.figures["lost"] == 2 and summary.figures["players"] == 2
    assert game.answered(subprocess.CompletedProcess([], 0, line, ""))
    assert not game.answered(subprocess.CompletedProcess([], 1, line.replace('"answered": 2', '"answered": 0'), ""))
    assert game.summary("ssh: connect to host 198.18.0.10 port 22: Connection refused") is None


def test_game_spec_is_refused_in_one_line_without_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec({"name": "g", "kind": "migration", "techniques": ["container", "qemu"], "app": "game", "vms": 1,
                       "memory_mb": 256, "matrix": {"layout": [[1, 0, 0]], "migration": [True]}})
    monkeypatch.setattr(services, "GAME_ENGINE", "/nonexistent/ioq3ded")
    with pytest.raises(InputError) as err:
        migration_study.supported(spec, ["container"])
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("g: matrix.app: 'game': openarena-server is not installed (/nonexistent/ioq3ded")
    assert "scripts/bootstrap.sh --game" in str(err.value) and "lab_host_game" in str(err.value)
    with pytest.raises(InputError, match="'game' runs in containers only"):
        migration_study.supported(spec, ["qemu"])


# --- natively, with Debian's OpenArena server --------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prober(port: int, seconds: float, timeout_s: float = 0.5) -> subprocess.Popen[str]:
    """The prober as the controller runs it (Debian's python3, no site), at the study's rate."""
    return subprocess.Popen(["python3", "-I", "-S", str(GAME_PROBER), "127.0.0.1", str(port), "--rate",
                             str(GAME_RATE), "--seconds", f"{seconds:g}", "--timeout", f"{timeout_s:g}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _figures(prober: subprocess.Popen[str], limit_s: float = 30) -> dict[str, float]:
    out, err = prober.communicate(timeout=limit_s)
    assert out.strip(), err
    return json.loads(out)


@pytest.mark.skipif(game_missing() is not None, reason=f"{game_missing()} (scripts/test.sh installs it)")
def test_game_server_answers_stalls_when_stopped_and_answers_again(tmp_path: Path) -> None:
    port = _free_udp_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(game_server(port, str(tmp_path / "home"), ip="127.0.0.1"), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_READY_S
        while _figures(_prober(port, 1))["players"] != len(GAME_BOTS):  # answering, its bots in the game
            assert server.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"not ready in {SERVER_READY_S:g} s: {log.read_text()[-2000:]}"
        before = _figures(_prober(port, 4, timeout_s=1))
        print("before", before)
        assert before["sent"] == before["answered"] + before["late"] == 4 and before["answered"] >= 3
        assert before["players"] == before["players_min"] == len(GAME_BOTS)
        assert 0 < before["median_ms"] <= before["max_ms"]

        stalled = _prober(port, 5)
        time.sleep(1.2)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(2)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        during = _figures(stalled)
        print("during", during)
        assert during["sent"] == 5 and during["late"] + during["lost"] >= 1 and during["max_ms"] > 500

        after = _figures(_prober(port, 3, timeout_s=1))
        print("after", after)
        assert after["sent"] == after["answered"] + after["late"] == 3 and after["answered"] >= 2
        assert after["players"] == len(GAME_BOTS)
        assert server.poll() is None
        assert all(f"{bot}^7 entered the game" in log.read_text() for bot in GAME_BOTS)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_prober_runs_as_a_script_without_the_testbed() -> None:
    """`python3 -I -S q3probe.py`: Debian's python3 alone, as on the controller host."""
    done = subprocess.run(["python3", "-I", "-S", str(GAME_PROBER), "--help"], capture_output=True, text=True,
                          timeout=30, check=False, cwd="/")
    assert done.returncode == 0 and "getstatus" in done.stdout, done.stderr


def test_appendix_a_runs_game_in_containers_at_full_rate_and_says_when_it_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """experiments/appendix_a.yml has `game` on its app axis: containers run it at the full rate
    only, QEMU not at all; without the opt-in package its container variants are refused in one
    line saying how to install it, and QEMU's run on."""
    from testbed.runner import executor
    from testbed.spec import load_spec

    monkeypatch.setattr(executor, "machine_swap_mb", lambda: 0)
    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "appendix_a.yml")
    monkeypatch.setattr(services, "game_missing", lambda: None)
    migration_study.supported(spec, ["container"])
    migration_study.supported(spec, ["qemu"])
    assert {(v.link_rate, v.compression) for v in spec.variants("container") if v.app == "game"} == {
        ("100mbit", c) for c in ("none", "bzip2", "zstd")}
    assert not [v for v in spec.variants("qemu") if v.app == "game"]
    monkeypatch.setattr(services, "game_missing", lambda: "openarena-server is not installed")
    with pytest.raises(InputError, match="matrix.app: 'game': openarena-server is not installed"):
        migration_study.supported(spec, ["container"])
    migration_study.supported(spec, ["qemu"])
