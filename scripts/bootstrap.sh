#!/usr/bin/env bash
# Installs everything the testbed needs on a fresh Debian 12 machine, as root: the Debian
# packages in deps/apt-packages.txt and the Python package (with its lab, analysis and dev
# extras) in a virtual environment at .venv. Idempotent: a second run changes nothing.
# --game also installs the opt-in deps/apt-packages-game.txt (the Appendix A study's `game` app:
# OpenArena's server, ~420 MB of game data); scripts/test.sh passes it.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
lists=(deps/apt-packages.txt)
for arg in "$@"; do
    case "$arg" in
        --game) lists+=(deps/apt-packages-game.txt) ;;
        *) echo "bootstrap: unknown option $arg (usage: scripts/bootstrap.sh [--game])" >&2; exit 2 ;;
    esac
done
mapfile -t pkgs < <(grep -hv '^\s*#' "${lists[@]}" | awk 'NF {print $1}')
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's own python3 is what the lab hosts run; the controller's venv uses it too so that
# one interpreter serves the machine and every embedded-lab host.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[dev]"
    touch "$stamp"
fi
echo "bootstrap: ready ($(.venv/bin/testbed --version))"
