#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv). Idempotent and fast when nothing changed.
#   bash scripts/setup.sh            # CPU: torch pinned by constraints-cpu.txt
#   R1PIPE_CONSTRAINTS= bash scripts/setup.sh   # keep a torch you installed yourself (CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${R1PIPE_CONSTRAINTS-constraints-cpu.txt}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.r1pipe-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ -n "$CONSTRAINTS" ] && [ "$CONSTRAINTS" -nt "$stamp" ]; }; then
  echo "setup: installing r1pipe and its dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e ".[dev]"
  touch "$stamp"
fi
# KenLM's estimator (lmplz, build_binary): pip's kenlm builds only the query module.
bash scripts/build_kenlm.sh "$VENV"
