"""PID 1 of a testbed container: starts workloads on request and logs their output with times.

Runs inside the container (its own PID, mount, UTS, IPC and network namespaces), standard library
only. It serves one-line requests on the Unix socket STATE/init.sock (a path name, so the host
reaches it whatever network namespace the container has):

    ping                       -> pong
    run ID WORD...             -> ok        (starts WORD... with its output logged)

and writes STATE/runs/ID.log as JSON lines [time, "start"], [time, "out", text], [time, "end",
status]. The times come from the kernel's clock, which a container shares with its host, so they
are host-clock times; a line is stamped when this init reads it, as the QEMU driver stamps a
guest's console lines when they arrive.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time


def _log(path, *entry):
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps([time.time(), *entry]) + "\n")


def _run(log_path, argv):
    try:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as err:
        _log(log_path, "start")
        _log(log_path, "out", f"cannot start {argv[0]}: {err}")
        _log(log_path, "end", 127)
        return
    _log(log_path, "start")
    for raw in child.stdout:
        _log(log_path, "out", raw.decode(errors="replace").rstrip("\n"))
    _log(log_path, "end", child.wait())


def _answer(conn, runs_dir):
    with conn:
        words = conn.makefile("r", encoding="utf-8").readline().split()
        if words == ["ping"]:
            reply = "pong"
        elif len(words) >= 3 and words[0] == "run" and words[1].isalnum():
            log_path = os.path.join(runs_dir, words[1] + ".log")
            threading.Thread(target=_run, args=(log_path, words[2:]), daemon=True).start()
            reply = "ok"
        else:
            reply = "error: expected 'ping' or 'run ID WORD...'"
        conn.sendall(reply.encode() + b"\n")


def main(state_dir):
    runs_dir = os.path.join(state_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    path = os.path.join(state_dir, "init.sock")
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    while True:
        conn, _ = server.accept()
        _answer(conn, runs_dir)


if __name__ == "__main__":
    main(sys.argv[1])
