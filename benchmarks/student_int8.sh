#!/usr/bin/env bash
# INT8 bundles of one student against its FP32 self, on the test split (read once), as the quick
# recipe compiles them (first convolution and classifier float; cpu and jetson with
# --range-estimator auto and no bias correction, tflite with the max_p95 observer; budgets top-1 0.5, balanced 1.5, melanoma recall
# 2.0 points and agreement 97 % on validation), and each against the INT8 defaults before issue 15
# (NNCF fast bias correction, mean_minmax ranges; tflite: its mean_minmax observer) for the batch-1
# latency ratio.
#
#   bash benchmarks/student_int8.sh STUDENT_DIR SPLIT_CSV CALIB_JSON OUT_NAME
#
# e.g. for the ResNet50 student of benchmarks/distill_reference.py:
#   bash benchmarks/student_int8.sh runs/distill/resnet50 ../shared/models/ham10000-r50x3-112/split.csv \
#        calibration/train-512-seed0-7b1c5374.json int8_vs_fp32_r50
# A bundle that misses its budget is still written (--force) so that it can be measured; its
# manifest and `edgeskin bundle show` say FORCED, and this script prints which were.
# Writes runs/int8/OUT_NAME/{new,old}/*.edgeskin and benchmarks/results/OUT_NAME.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
student=$1 split=$2 calib=$3 name=$4
export EDGESKIN_DATA=${EDGESKIN_DATA:-../shared/data/ham10000}
py=${PYTHON:-.venv/bin/python}
es=(${EDGESKIN:-.venv/bin/edgeskin})
out=runs/int8/$name
mkdir -p "$out/new" "$out/old"
# compile's default budget is the quick recipe's (edgeskin/budget.py COMPILE_DEFAULTS)
write=(--force --overwrite)
common=(--precision int8 --split "$split" --calib "$calib" --first-conv-float --qat off)
for t in cpu jetson; do
  "${es[@]}" compile "$student" --target $t "${common[@]}" --range-estimator auto --bias-correction none \
    "${write[@]}" --out "$out/new/$t-int8.edgeskin"
  "${es[@]}" compile "$student" --target $t "${common[@]}" --range-estimator mean_minmax --bias-correction fast \
    "${write[@]}" --out "$out/old/$t-int8.edgeskin"
done
# tflite: litert-torch's quantizer, no bias correction; the observer was mean_minmax before its
# default became max_p95
for obs in max_p95:new mean_minmax:old; do
  "${es[@]}" compile "$student" --target tflite --precision int8 --split "$split" --calib "$calib" \
    --first-conv-float --qat off --observer "${obs%%:*}" "${write[@]}" --out "$out/${obs##*:}/tflite-int8.edgeskin"
done
for b in "$out"/new/*.edgeskin; do
  "${es[@]}" bundle show "$b" | grep -i -E "forced|agreement" || true
done
"$py" benchmarks/int8_vs_fp32.py --student "$student" --split "$split" --bundles "$out/new" --old "$out/old" \
  --old-label "the same student compiled with the INT8 defaults before issue 15 (NNCF fast bias correction, mean_minmax ranges; tflite: the mean_minmax observer)" \
  --out "benchmarks/results/$name"
