#!/usr/bin/env bash
# The README's main command: set up, then run the whole demo pipeline (embedded local Ray, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/r1pipe run recipes/demo.yaml "$@"
