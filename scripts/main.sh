#!/usr/bin/env bash
# The main job: set up the machine, provision the embedded lab, run the default experiment
# matrix and write results and figures. Runs as root on a fresh Debian 12 machine.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/bootstrap.sh
export PATH="$top/.venv/bin:$PATH"
# Hold the lab for the whole job, as one campaign (testbed/runner/lock.py): a test session or
# another campaign starting between two of these steps would spoil them. `testbed run` sees the
# lock held in TESTBED_LAB_LOCK and runs under it.
lock=$(python -c 'from testbed.lab import DEFAULT_INVENTORY; from testbed.runner.lock import lock_path
print(lock_path(DEFAULT_INVENTORY))')
mkdir -p "$(dirname "$lock")"
exec 9>>"$lock"
flock -n 9 || { echo "main: the embedded lab is busy: $(cat "$lock")" >&2; exit 1; }
truncate -s 0 "$lock" && echo "{\"pid\": $$, \"what\": \"scripts/main.sh\"}" >> "$lock"
export TESTBED_LAB_LOCK=$lock
testbed lab up
# The default matrix: thesis Exp. 1 (Synthetic1) and Exp. 2 (Synthetic-Random) with QEMU, scaled
# to finish in under 30 minutes on a 2-core machine (README, "The main command"). Rerunning
# resumes; TESTBED_SCALE / TESTBED_REPS override (another scale needs another results directory).
scale=${TESTBED_SCALE:-0.1}
reps=${TESTBED_REPS:-2}
for exp in exp1 exp2; do
    testbed run "experiments/$exp.yml" --technique qemu --reps "$reps" --scale "$scale" \
        --results "results/$exp-qemu-s$scale"
    testbed plot "results/$exp-qemu-s$scale"
    testbed report "results/$exp-qemu-s$scale"
done
