#!/usr/bin/env bash
# The timestep profile (scripts/timestep_profile.py) over training, for the x0 and the epsilon target:
# the bundled model's training config, stopped and profiled every STEP steps up to LAST, on the
# validation split only.   bash scripts/profile_over_training.sh [WORKDIR] [STEP] [LAST]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/profile_over_training}
step=${2:-200}
last=${3:-600}
data=data/organs_multi
config=Resources/Models/ct_abdomen_organs_2d/train_config.json
mkdir -p "$work"
for target in sample epsilon; do
  model="$work/$target"
  for ((n = step; n <= last; n += step)); do  # each stop resumes the same run
    resume=()
    [[ -d "$model/checkpoint" ]] && resume=(--resume)
    diffusionseg train "$data" -o "$model" --config "$config" -q "${resume[@]}" \
      --set "steps=$n" --set "val_every=$step" --set "checkpoint_every=$step" --set "prediction_type=\"$target\""
    python3 scripts/timestep_profile.py "$model" "$data" --split validation --bins 10 \
      -o "$work/${target}_$n.json" > /dev/null
  done
done
echo "profiles in $work"
