#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
