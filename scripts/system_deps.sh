#!/usr/bin/env bash
# System packages the test suite needs and pip/npm cannot provide, installed with apt-get when missing (as root, or
# through sudo): Debian's chromium, for the headless dashboard check; iproute2 (`ip`, `tc`) and nftables (`nft`)
# for the network-namespace tests (atlas_swarm/devnet/netns.py: hosts, partitions, NAT routers).
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
if [ ${#need[@]} = 0 ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages (${need[*]}) and there is no apt-get: install them so that chromium, ip and nft" \
       "are on PATH" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "installing Debian packages for the tests: ${need[*]}..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
