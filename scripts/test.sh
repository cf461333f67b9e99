#!/usr/bin/env bash
# The test command: set up everything the tests need, then run the whole suite (unit,
# property, real embedded-lab tests, and ansible-lint via tests/test_real_labs.py). The lab
# fixture tears the lab down at the end.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/bootstrap.sh
export PATH="$top/.venv/bin:$PATH"
exec pytest -ra "$@"
