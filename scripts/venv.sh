#!/usr/bin/env bash
# Creates .venv (if missing) and installs atlas-swarm with the extras named in $1 (default: test). Sourced by demo.sh
# and test.sh so that each command works on a fresh clone with nothing installed by hand.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install -q --upgrade pip
fi
stamp="$root/.venv/.installed-$extras-$(cat "$root/setup.cfg" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$root/.venv/bin/pip" install -q -e "$root[$extras]"
  touch "$stamp"
fi
