#!/usr/bin/env bash
# Trains the starting weights shipped for the `small` segmentation preset
# (apps/sentinel/pretrained/segmentation_small.pt) with the app's own MONAI Label train task, on phantoms
# generated with a seed the demo studies do not use (seed 1000), their true labels approved as `final`.
# Usage: scripts/train_default_segmentation.sh [EPOCHS] [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-40}
CASES=${2:-20}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY - "$WORK/studies" "$CASES" <<'PY'
import sys, numpy as np
from labelsentinel.io import save_nifti
from labelsentinel.sampledata import _affine, make_phantom
out, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    img, truth, _ = make_phantom(np.random.default_rng([1000, i]))
    save_nifti(f"{out}/train_{i:03d}.nii.gz", img, _affine())
    save_nifti(f"{out}/labels/final/train_{i:03d}.nii.gz", truth, _affine())
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MONAI_LABEL_APP_CONF="{\"model_dir\": \"$WORK/model\", \"use_pretrained_model\": \"false\"}"
time $PY -m monailabel.interfaces.utils.app -a apps/sentinel -s "$WORK/studies" -m train \
  -r "{\"model\": \"segmentation\", \"max_epochs\": $EPOCHS, \"val_split\": 0.1, \"dataset\": \"CacheDataset\", \"tracking\": \"None\", \"lr\": 0.003}" \
  2>&1 | grep -E "Epoch\[[0-9]+\] Metrics|Result:" 
mkdir -p apps/sentinel/pretrained
$PY - "$WORK/model/segmentation.pt" apps/sentinel/pretrained/segmentation_small.pt <<'PY'
import sys, torch
ck = torch.load(sys.argv[1], map_location="cpu")
state = ck.get("model", ck) if isinstance(ck, dict) else ck
torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}, sys.argv[2])
print("wrote", sys.argv[2])
PY
