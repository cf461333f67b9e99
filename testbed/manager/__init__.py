"""The VM manager of the thesis (§3.2): one Local Controller per PM, one Central Controller,
talking token-authenticated HTTP+JSON over the lab network (see docs/manager.md)."""

from pathlib import Path
from typing import Literal

LC_PORT = 7420
CC_PORT = 7421
DEFAULT_TOKEN_FILE = Path("/var/lib/testbed/lab/manager.token")
DEFAULT_EVENT_LOG = Path("/var/lib/testbed/lab/manager/events.jsonl")
#: Seconds of counters an LC keeps: the longest sample window, so the longest CC interval. Here,
#: not in api.py, so that the simulator and the runner's time scaling read it without FastAPI.
MAX_WINDOW = 120.0
#: What the CC balances on: each VM's CPU use (the thesis), or its demand (use plus the time its
#: threads were runnable but waiting, capped at its own CPU limit). Here, not in api.py, so that
#: specs (testbed/spec.py) name it without FastAPI.
Signal = Literal["use", "demand"]
