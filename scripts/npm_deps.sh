#!/usr/bin/env bash
# Installs npm toolchains exactly as pinned by their package-lock.json, each into its own node_modules:
#   contracts    solc-js, OpenZeppelin v5, forge, anvil (default)
#   scripts/ipfs js-ipfs, a local IPFS RPC daemon for the storage tests
# Usage: scripts/npm_deps.sh [DIR ...]   (relative to the repo root). Re-runs only when a lock file changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then dirs=(contracts); fi
command -v npm >/dev/null || { echo "npm is needed for ${dirs[*]} (Debian: apt-get install nodejs npm)" >&2; exit 1; }
for dir in "${dirs[@]}"; do
  cd "$root/$dir"
  stamp=node_modules/.atlas-lock-sha256
  want=$(sha256sum package-lock.json | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then continue; fi
  echo "installing the npm toolchain in $dir (npm ci)..." >&2
  # js-ipfs has an optional dependency on a GitHub tarball that cannot be locked offline; npm ci refuses such a lock,
  # npm install (still guided by the lock) accepts it
  npm ci --omit=optional --fetch-retries=0 --no-audit --no-fund --loglevel=silent >&2 2>/dev/null ||
    npm install --omit=optional --fetch-retries=0 --no-audit --no-fund --loglevel=error >&2
  echo "$want" > "$stamp"
done
