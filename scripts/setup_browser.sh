#!/usr/bin/env bash
# Headless Chromium and its driver from Debian's packages, for the report's browser test.
# Idempotent: does nothing when both are there. Needs root (CI and the dev machines run as root).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup: chromium and chromium-driver are missing; install them as root:" >&2
  echo "  apt-get install -y --no-install-recommends chromium chromium-driver" >&2
  exit 1
fi
echo "setup: installing chromium and chromium-driver (Debian packages) for the browser test"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
