#!/usr/bin/env bash
# Trains the default label-quality estimator shipped as models/weights/estimator_default.pt with the
# project's own command: 24 phantom studies (seed 2000, not used by the demo studies or the benchmarks),
# cases 000-004 held out for validation, plus the real CT of sample-apps/totalseg-ct twice (two draws of
# degradations of its 61 predicted structures). 32 degradations per structure, plus the predictions of the app's
# small segmentation network trained from scratch on the phantoms at iterations 50-800 (920 samples; the real
# CT's 61 structures are too many for it), 60 epochs at learning rate 1e-3.
# Took about 30 minutes on 2 CPU cores (322 s making 10,917 samples, 1,520 s training).
# Then the same again with 15% of the samples shown without their structure name (--name-dropout 0.15; 35 min
# on 2 CPU cores, or about 22 min with SAMPLES_CACHE=FILE.npz kept from the first run): the name-free network,
# added to the checkpoint by `labelsentinel attach-name-free` to score structures whose name is not in the table.
# Usage: scripts/train_default_estimator.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/weights/estimator_default.pt}
BIN=${BIN:-.venv/bin}
DATA=/tmp/est-train
[ -d "$DATA" ] || "$BIN/labelsentinel" sample-data --out "$DATA" --cases 24 --seed 2000 --no-real-ct
CT=sample-apps/totalseg-ct
time "$BIN/labelsentinel" train-estimator --data "$DATA" \
  --pair $CT/ct.nii.gz $CT/seg_fast.nii.gz --pair $CT/ct.nii.gz $CT/seg_fast.nii.gz \
  --label-names $CT/label_names.json \
  --val-case case_000 --val-case case_001 --val-case case_002 --val-case case_003 --val-case case_004 \
  --per-structure 32 --checkpoint-predictions 50,100,200,400,800 --epochs 60 --lr 1e-3 \
  ${SAMPLES_CACHE:+--samples-cache "$SAMPLES_CACHE"} --out "$OUT.main.pt"
time "$BIN/labelsentinel" train-estimator --data "$DATA" \
  --pair $CT/ct.nii.gz $CT/seg_fast.nii.gz --pair $CT/ct.nii.gz $CT/seg_fast.nii.gz \
  --label-names $CT/label_names.json \
  --val-case case_000 --val-case case_001 --val-case case_002 --val-case case_003 --val-case case_004 \
  --per-structure 32 --checkpoint-predictions 50,100,200,400,800 --epochs 60 --lr 1e-3 --name-dropout 0.15 \
  ${SAMPLES_CACHE:+--samples-cache "$SAMPLES_CACHE"} --out "$OUT.name-free.pt"
"$BIN/labelsentinel" attach-name-free --main "$OUT.main.pt" --name-free "$OUT.name-free.pt" --out "$OUT"
rm -f "$OUT.main.pt" "$OUT.name-free.pt"
