#!/usr/bin/env bash
# README command 1: the demo swarm (4 peers, real all-MiniLM-L6-v2, offline). Installs what it needs first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh" demo
bash "$root/scripts/npm_deps.sh"
cd "$root"
exec "$root/.venv/bin/python" scripts/demo.py "$@"
