#!/usr/bin/env bash
# The test command: set up everything the tests need (the opt-in game server too), then run
# the whole suite (unit, property, real embedded-lab tests, and ansible-lint via
# tests/test_real_labs.py). The lab fixture tears the lab down at the end. The 25 slowest tests
# are listed at the end: CI's 45-minute budget is spent by a few lab tests, and this shows which.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/bootstrap.sh --game  # the game app's native test (tests/test_game.py) needs its server
export PATH="$top/.venv/bin:$PATH"
exec pytest -ra --durations=25 "$@"
