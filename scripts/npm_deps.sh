#!/usr/bin/env bash
# Installs the contracts toolchain from npm into contracts/node_modules (solc-js, OpenZeppelin v5, forge, anvil),
# exactly as pinned in contracts/package-lock.json. Re-runs only when the lock file changes.
set -euo pipefail
cd "$(dirname "$0")/../contracts"
stamp=node_modules/.atlas-lock-sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi
command -v npm >/dev/null || { echo "npm is needed for the contracts toolchain (Debian: apt-get install nodejs npm)" >&2; exit 1; }
echo "installing the contracts toolchain (npm ci in contracts/)..." >&2
npm ci --omit=optional --fetch-retries=0 --no-audit --no-fund --loglevel=error >&2
echo "$want" > "$stamp"
