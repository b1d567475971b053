#!/usr/bin/env bash
# Create .venv and install the project with its test tools; safe to run again (a stamp keyed
# on pyproject.toml skips the work when nothing changed). Used by demo.sh and test.sh.
#   PYTHON=python3.12 VENV=/path/to/venv TORCH_SPEC="torch==2.11.0" bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# torch 2.13.0 is a CPU build on the project's machines; a bare "torch" would pull CUDA (GBs).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.rag-mm-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $VENV (one time) ..."
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  rm -f "$VENV"/.rag-mm-installed-*
  touch "$stamp"
fi
