#!/usr/bin/env bash
# The main job: set up the machine, provision the embedded lab, run the default experiment
# matrix and write results and figures. Runs as root on a fresh Debian 12 machine.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/bootstrap.sh
export PATH="$top/.venv/bin:$PATH"
testbed lab up
if ! testbed run --help >/dev/null 2>&1; then
    echo "main: the lab is up (testbed lab status); the experiment runner (testbed run) is not implemented yet." >&2
    exit 3
fi
