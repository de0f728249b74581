#!/usr/bin/env bash
# DiffSeg lung-lesion benchmark, as run for docs/BENCHMARKS.md ("DiffSeg: weakly supervised lung lesions").
#   bash scripts/diffseg_benchmark.sh MODEL_DIR [OUT_DIR]
# MODEL_DIR: a trained DiffSeg model (diffusionseg train data/lung_weak --config ...).
# 1. chooses noise levels and threshold rule on the VALIDATION volumes (writes them into the card);
# 2. on validation: the CRF protocol (off / mean / published) at 5 outputs (the best becomes the card's
#    default_crf), then 1, 3, 10 outputs at that default;
# 3. on the TEST volumes (the two real pyradiomics lung tumours), once, at the card's defaults.
set -euo pipefail
MODEL=${1:?model folder}
OUT=${2:-runs/diffseg/eval}
DATA=data/lung_weak
EVAL=data/lung_weak_eval
mkdir -p "$OUT"
[ -d "$DATA" ] || python3 scripts/make_weak_lesion_dataset.py --out "$DATA"
# An nnU-Net style view of the same files for `evaluate` (validation and test masks; training has none).
mkdir -p "$EVAL"/{imagesVal,labelsVal,imagesTs,labelsTs}
for c in check_chest check_base; do
  ln -sf "$(realpath $DATA/images/$c.nii.gz)" "$EVAL/imagesVal/$c.nii.gz"
  ln -sf "$(realpath $DATA/validation_masks/$c.nii.gz)" "$EVAL/labelsVal/$c.nii.gz"
done
for c in lung1 lung2; do
  ln -sf "$(realpath $DATA/images/$c.nii.gz)" "$EVAL/imagesTs/$c.nii.gz"
  ln -sf "$(realpath $DATA/test_masks/$c.nii.gz)" "$EVAL/labelsTs/$c.nii.gz"
done
echo '{"labels": {"0": "background", "1": "lesion"}}' > "$EVAL/dataset.json"

python3 scripts/choose_diffseg_setting.py "$MODEL" "$DATA" --write | tee "$OUT/choose.log"
for crf in off mean published; do
  diffusionseg evaluate "$MODEL" "$EVAL" --split validation --samples 5 --crf "$crf" -q -o "$OUT/val_n5_crf_$crf.json"
done
# The card's default CRF becomes the mode with the best validation Dice (the lung model: off; skin: published).
python3 - "$MODEL" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from DiffusionSegLib.core.files import atomic_write_json
model, out = Path(sys.argv[1]), Path(sys.argv[2])
dice = {m: json.loads((out / f"val_n5_crf_{m}.json").read_text())["mean"]["lesion"]["dice_mean"]
        for m in ("off", "mean", "published")}
card = json.loads((model / "model.json").read_text())
card["default_crf"] = max(dice, key=dice.get)
atomic_write_json(model / "model.json", card)
print("default_crf:", card["default_crf"], dice)
PY
for n in 1 3 10; do  # at the card's CRF default
  diffusionseg evaluate "$MODEL" "$EVAL" --split validation --samples "$n" -q -o "$OUT/val_n${n}.json"
done
diffusionseg evaluate "$MODEL" "$EVAL" --split test -q -o "$OUT/test_defaults.json"
