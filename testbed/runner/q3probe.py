"""A bounded prober of a Quake 3 (ioquake3, OpenArena) server: out-of-band `getstatus` queries
over UDP at a fixed rate for a fixed time, and one JSON line summing them up.

The Appendix A study's `game` app (testbed.runner.services.Game) runs it on the controller host
in rounds, so that the run's timeline shows the game stalling while it migrates and answering on
its new PM after it. A query is four 0xFF bytes then `getstatus TOKEN\\n`; the server answers with
four 0xFF bytes, `statusResponse\\n`, its info string (which echoes TOKEN as `challenge`: each
reply is matched to its query, so late replies are told from prompt ones) and one line per player
(`SCORE PING "NAME"`; bots are players).

ioquake3 answers at most a burst of 10 such queries from one address, then one a second (its
SVC_RateLimitAddress(from, 10, 1000), measured: 30 queries in 15 s at 2/s got 24 answers), so a
prober faster than 1/s measures the server's limiter, not the server: the study probes at 1/s.

Stdlib only, runnable as a script (`python3 -I -S q3probe.py HOST PORT ...`) on a host that has
only Debian's python3. Bounded: at most MAX_QUERIES queries and MAX_SECONDS of sending, then at
most `--timeout` of waiting for the last replies.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import sys
import time
from dataclasses import dataclass

OOB = b"\xff" * 4
STATUS_REPLY = OOB + b"statusResponse"
MAX_QUERIES = 10_000
MAX_SECONDS = 3600.0
MAX_REPLY = 65_536


def query(token: str | None = None) -> bytes:
    """A `getstatus` packet; `token` (plain word, echoed as the reply's `challenge`) matches replies."""
    if token is not None and (not token or len(token) > 128 or any(c.isspace() or c in '"\\;' for c in token)):
        raise ValueError(f"a getstatus token must be one plain word of at most 128 characters, not {token!r}")
    return OOB + b"getstatus" + (b" " + token.encode() if token else b"") + b"\n"


@dataclass(frozen=True)
class Status:
    """A parsed `statusResponse`: the server's info string and its players (score, ping, name)."""

    info: dict[str, str]
    players: list[tuple[int, int, str]]


def parse_status(data: bytes) -> Status:
    """Read a `statusResponse` packet (raises ValueError for anything else)."""
    if not data.startswith(STATUS_REPLY):
        raise ValueError(f"not a statusResponse: {data[:24]!r}")
    lines = data[len(STATUS_REPLY):].decode("latin-1").split("\n")
    if len(lines) < 2 or lines[0] != "":
        raise ValueError("a statusResponse without its info string")
    words = lines[1].split("\\")
    if words[0] != "" or len(words) % 2 != 1:
        raise ValueError(f"malformed info string: {lines[1][:60]!r}")
    info = dict(zip(words[1::2], words[2::2]))
    players = []
    for line in lines[2:]:
        if not line:
            continue
        score, ping, name = line.split(" ", 2)
        players.append((int(score), int(ping), name.strip('"')))
    return Status(info, players)


def summarize(sent: int, latencies_s: list[float], timeout_s: float, players: list[int]) -> dict[str, float]:
    """A round's figures: queries sent, answered (within `timeout_s`), late (answered after it),
    lost (never answered), median and max latency over every reply (ms; 0 without replies), and
    the players the last reply listed and the fewest any reply listed (-1 without replies)."""
    answered = sum(1 for latency in latencies_s if latency <= timeout_s)
    late = len(latencies_s) - answered
    return {
        "sent": sent, "answered": answered, "late": late, "lost": sent - len(latencies_s),
        "median_ms": round(statistics.median(latencies_s) * 1000, 3) if latencies_s else 0.0,
        "max_ms": round(max(latencies_s) * 1000, 3) if latencies_s else 0.0,
        "players": players[-1] if players else -1, "players_min": min(players) if players else -1,
    }


def probe(host: str, port: int, rate: float, seconds: float, timeout_s: float) -> dict[str, float]:
    """Send `rate` x `seconds` queries evenly over `seconds`, then wait for replies until the later
    of `seconds` and the last query's `timeout_s`; sum them up (summarize)."""
    if not (0 < rate <= 1000 and 0 < seconds <= MAX_SECONDS and 0 < timeout_s <= 60):
        raise ValueError(f"rate {rate}/s, {seconds} s and timeout {timeout_s} s: out of bounds")
    count = min(MAX_QUERIES, max(1, int(rate * seconds)))
    address = (socket.gethostbyname(host), port)
    prefix = f"tb{int(time.time() * 1000) % 10**9}q"  # a leftover reply of an earlier round matches no query
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    players: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        start = time.monotonic()
        end = max(start + seconds, start + (count - 1) / rate + timeout_s)
        for i in range(count):
            _receive(sock, address, start + i / rate, sent_at, latencies, players)
            token = f"{prefix}{i}"
            sent_at[token] = time.monotonic()
            try:
                sock.sendto(query(token), address)
            except OSError:
                pass  # no route while the VM moves: the query is lost
        _receive(sock, address, end, sent_at, latencies, players)
    return summarize(count, latencies, timeout_s, players)


def _receive(sock: socket.socket, address: tuple[str, int], until: float, sent_at: dict[str, float],
             latencies: list[float], players: list[int]) -> None:
    """Read replies until `until` (monotonic), recording each matched one's latency once."""
    while (left := until - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            continue
        try:
            data, source = sock.recvfrom(MAX_REPLY)
        except OSError:  # an ICMP error of an earlier query
            continue
        now = time.monotonic()
        try:
            status = parse_status(data)
        except ValueError:
            continue
        sent = sent_at.pop(status.info.get("challenge", ""), None)
        if source[0] == address[0] and sent is not None:
            latencies.append(now - sent)
            players.append(len(status.players))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="q3probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=1.0, help="queries per second (default 1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to send (default 5)")
    parser.add_argument("--timeout", type=float, default=1.0, help="a reply later than this is late (default 1)")
    args = parser.parse_args(argv)
    try:
        figures = probe(args.host, args.port, args.rate, args.seconds, args.timeout)
    except (OSError, ValueError) as err:
        print(f"q3probe: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"tool": "q3probe", **figures}, sort_keys=True))
    return 0 if figures["answered"] + figures["late"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
