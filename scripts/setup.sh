#!/usr/bin/env bash
# Install DiffusionSeg (editable) and what it needs into the current Python environment.
#   bash scripts/setup.sh          library + CLI
#   bash scripts/setup.sh --test   also what the test suite needs (pytest, slicer-core)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare `torch` requirement would pull the newest build with several GB of CUDA packages;
# install the pinned build first when torch is missing (the package itself declares torch>=2.1).
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e .
# DenseCRF (pydensecrf2) ships only as source and needs a C++ compiler; without it the
# library uses its torch mean-field CRF, so a failed build is not fatal.
if ! "$PY" -c "import pydensecrf.densecrf" >/dev/null 2>&1; then
  "$PY" -m pip install -q pydensecrf2 || echo "setup: pydensecrf2 could not be built; the torch mean-field CRF will be used" >&2
fi
if [ "${1:-}" = "--test" ]; then
  "$PY" -m pip install -q pytest slicer-core
fi
