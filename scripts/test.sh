#!/usr/bin/env bash
# The test command: set up everything the tests need, then run the whole suite (unit,
# property and real embedded-lab tests) and ansible-lint. Tears the lab down at the end.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash scripts/bootstrap.sh
export PATH="$top/.venv/bin:$PATH"
status=0
pytest -ra "$@" || status=$?
if [ -d roles ] && [ -n "$(ls -A roles 2>/dev/null)" ]; then
    ansible-lint --profile production playbooks roles || status=$?
fi
exit $status
