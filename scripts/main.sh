#!/usr/bin/env bash
# The main job: set up the machine, provision the embedded lab, run the default experiment
# matrix and write results and figures. Runs as root on a fresh Debian 12 machine.
# Exits non-zero when any campaign fails (a campaign whose runs keep failing stops early, and
# `testbed run` exits non-zero when it ends with fewer ok runs than planned); the summary at the
# end says, per campaign, where its results, figures and report (or its failed runs' logs) are.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/bootstrap.sh
export PATH="$top/.venv/bin:$PATH"
# Hold the lab for the whole job, as one campaign (testbed/runner/lock.py): a test session or
# another campaign starting between two of these steps would spoil them. `testbed run` sees the
# lock held in TESTBED_LAB_LOCK and runs under it; so does this job when started by a holder (the
# test suite's fresh-machine check).
lock=$(python -c 'from testbed.lab import DEFAULT_INVENTORY; from testbed.runner.lock import lock_path
print(lock_path(DEFAULT_INVENTORY, embedded=True))')
if [ "${TESTBED_LAB_LOCK:-}" != "$lock" ]; then
    mkdir -p "$(dirname "$lock")"
    exec 9>>"$lock"
    flock -n 9 || { echo "main: the embedded lab is busy: $(cat "$lock")" >&2; exit 1; }
    truncate -s 0 "$lock" && echo "{\"pid\": $$, \"what\": \"scripts/main.sh\"}" >> "$lock"
    export TESTBED_LAB_LOCK=$lock
fi
testbed lab up
# The default matrix: thesis Exp. 1 (Synthetic1) and Exp. 2 (Synthetic-Random) with QEMU, scaled
# to finish in under 30 minutes on a 2-core machine (README, "The main command"). Rerunning
# resumes; TESTBED_SCALE / TESTBED_REPS override (another scale needs another results directory),
# TESTBED_RESULTS the parent of the results directories.
scale=${TESTBED_SCALE:-0.1}
reps=${TESTBED_REPS:-2}
out=${TESTBED_RESULTS:-results}
summary=()
failed=0
for exp in exp1 exp2; do
    dir="$out/$exp-qemu-s$scale"
    if testbed run "experiments/$exp.yml" --technique qemu --reps "$reps" --scale "$scale" --results "$dir" \
        && testbed plot "$dir" && testbed report "$dir"; then
        summary+=("  $exp: ok: results $dir, figures $dir/figures/, report $dir/report.html")
    else
        failed=1
        summary+=("  $exp: FAILED: see the lines above; each run's details in $dir/runs/, QEMU logs of VMs that died in /var/lib/testbed/vms/crashed/")
    fi
done
echo "main: finished in $((SECONDS / 60)) min $((SECONDS % 60)) s; campaigns:"
printf '%s\n' "${summary[@]}"
exit "$failed"
