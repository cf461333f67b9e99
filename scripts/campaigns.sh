#!/usr/bin/env bash
# The thesis' matrix at the thesis' statistics (issue #16): the campaigns behind docs/fidelity.md,
# n = 7 per variant (App. A: 5), each with the manager's time scale that makes a run last about as
# many balancer rounds as the thesis' runs did (~11 rounds of 10 s for Exp. 1's ~113 s): containers
# run the work ~5x faster than the thesis' PMs, so at scale S their manager runs at 0.2 (interval
# 2 s, the floor); QEMU under TCG runs it ~2.7x slower, so `auto` (the run's scale) suffices; Exp. 3
# with QEMU keeps the thesis' 10 s interval (one compiled object lasts 400-1500 s there).
#
# usage: bash scripts/campaigns.sh [NAME ...]     every campaign below, in order, or the named ones
#        bash scripts/campaigns.sh --list         the table
# Needs the lab up (`testbed lab up`); exp3-container needs its swap (`lab_host_swap_mb: 2048` in
# inventory/local/group_vars/all.yml, then `testbed lab up`: README, "Kernel workload"), and the
# runner refuses it in one line without; appendix-a-container needs the game server's opt-in
# package (`bash scripts/bootstrap.sh --game`), refused in one line without too. Rerunning resumes
# (recorded runs are skipped); results go to ${TESTBED_RESULTS:-results}/campaigns/NAME, then plots
# and a report. Exits 1 when a campaign failed; the summary says where each one's results or logs are.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
export PATH="$top/.venv/bin:$PATH"

# name                 spec                        technique  scale  reps  time-scale  run timeout (s, - = default)
table="
exp1-container         experiments/exp1.yml        container  1.0    7     0.2         -
exp2-container         experiments/exp2.yml        container  0.2    7     0.2         -
exp3-container         experiments/exp3.yml        container  0.5    7     0.2         -
exp1-qemu              experiments/exp1.yml        qemu       0.1    7     auto        -
exp2-qemu              experiments/exp2.yml        qemu       0.1    7     auto        -
exp3-qemu              experiments/exp3.yml        qemu       0.05   7     1           2400
validation-qemu        experiments/validation.yml  qemu       0.3    7     auto        -
appendix-a-container   experiments/appendix_a.yml  container  1.0    5     -           -
appendix-a-qemu        experiments/appendix_a.yml  qemu       1.0    5     -           -
"
if [ "${1:-}" = "--list" ]; then
    echo "$table" | sed '/^$/d'
    exit 0
fi
wanted=("$@")
known=$(echo "$table" | awk 'NF {print $1}')
for name in "${wanted[@]}"; do
    grep -qx "$name" <<<"$known" || { echo "campaigns: no campaign named $name (--list lists them)" >&2; exit 2; }
done

out=${TESTBED_RESULTS:-results}/campaigns
summary=()
failed=0
while read -r name spec technique scale reps time_scale timeout; do
    [ -n "$name" ] || continue
    if [ ${#wanted[@]} -gt 0 ] && ! printf '%s\n' "${wanted[@]}" | grep -qx "$name"; then
        continue
    fi
    dir="$out/$name"
    argv=(run "$spec" --technique "$technique" --reps "$reps" --scale "$scale" --results "$dir")
    [ "$time_scale" = "-" ] || argv+=(--time-scale "$time_scale")
    [ "$timeout" = "-" ] || argv+=(--timeout "$timeout")
    echo "campaigns: $name: testbed ${argv[*]}"
    if testbed "${argv[@]}" && testbed plot "$dir" && testbed report "$dir"; then
        summary+=("  $name: ok: results $dir, figures $dir/figures/, report $dir/report.html")
    else
        failed=1
        summary+=("  $name: FAILED: see the lines above; each run's details in $dir/runs/")
    fi
done <<<"$table"
echo "campaigns: finished in $((SECONDS / 60)) min $((SECONDS % 60)) s:"
printf '%s\n' "${summary[@]}"
exit "$failed"
