#!/usr/bin/env bash
# System packages the test suite needs and pip/npm cannot provide: Debian's chromium, for the headless dashboard
# check. Installs it with apt-get when missing (as root, or through sudo).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium is missing and there is no apt-get: install Chromium so that 'chromium' is on PATH" >&2; exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "installing chromium (Debian package) for the dashboard test..." >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
