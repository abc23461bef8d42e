#!/usr/bin/env bash
# README command 2: the test suite (unit + multi-peer integration on real DHTs). Installs what it needs first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh" test
bash "$root/scripts/npm_deps.sh" contracts scripts/ipfs
bash "$root/scripts/system_deps.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
