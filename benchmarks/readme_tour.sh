#!/usr/bin/env bash
# Record the README's tour: every command run for real on the quick recipe's output (runs/quick,
# made by `bash scripts/main.sh`), its console output saved to benchmarks/results/tour/*.txt.
# Reads data from $EDGESKIN_DATA (default ../shared/data/ham10000). A few minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
export EDGESKIN_DATA=${EDGESKIN_DATA:-../shared/data/ham10000}
export COLUMNS=${COLUMNS:-120}
Q=runs/quick
T=benchmarks/results/tour
W=$(mktemp -d)
mkdir -p "$T"
[ -f "$Q/bench/report.json" ] || { echo "run bash scripts/main.sh first (needs $Q)"; exit 2; }
E=.venv/bin/edgeskin
rec() {  # rec NAME CMD...: run CMD, keep "$ CMD" + its output (stdout and stderr) in $T/NAME.txt
  local name=$1; shift
  { echo "\$ ${*//$W/\/tmp\/tour}"; "$@" 2>&1 | sed "s#$W#/tmp/tour#g"; echo "(exit code ${PIPESTATUS[0]})"; } > "$T/$name.txt"
  echo "recorded $T/$name.txt"
}
CAL=$(ls $Q/calibration/*.json)
IMGS=$(awk -F, '$4=="test"{print $1}' $Q/split.csv | head -3)
mkdir -p "$W/lesions"
for i in $IMGS; do cp "$(find -L "$EDGESKIN_DATA" -name "$i.jpg" | head -1)" "$W/lesions/"; done
rec 01-run          $E run recipes/quick.toml
rec 02-split        $E split --out "$W/split.csv" --seed 0
rec 03-train        $E train --out $Q/ensemble --preset quick --members 3 --epochs 3
rec 04-evaluate     $E evaluate $Q/ensemble --on test
rec 05-calib        $E calib make --split $Q/split.csv --size 512 --seed 0 --out-dir "$W/calibration"
rec 06-targets      $E targets
rec 07-devices      $E devices
rec 08-compile      $E compile $Q/student --target cpu --precision int8 --first-conv-float --range-estimator auto --calib "$CAL" --out "$W/student-int8.edgeskin"
rec 09-verify       $E bundle verify $Q/bundles/jetson-int8.edgeskin
rec 10-selftest     $E selftest $Q/bundles/tflite-int8.edgeskin
rec 11-predict      $E predict "$W/lesions" --bundle $Q/bundles/cpu-int8.edgeskin --top-k 3
rec 12-predict-json $E predict "$W/lesions/$(ls "$W/lesions" | head -1)" --bundle $Q/bundles/tflite-int8.edgeskin --top-k 2 --json
rec 13-engine       $E engine build $Q/bundles/jetson-int8.edgeskin
rec 14-dry-run      $E run recipes/quick.toml --dry-run --redo compile
rec 15-distill      $E distill --teacher $Q/ensemble --out $Q/student --student resnet18 --epochs 6 --lr 0.001 --no-augment --report-on none --latency-runs 0
rec 16-compile-jetson $E compile $Q/student --target jetson --device orin-nx --jetpack 5.1 --precision int8 --first-conv-float --range-estimator auto --calib "$CAL" --out "$W/student-trt.edgeskin"
rec 17-compile-phone  $E compile $Q/student --target android --precision int8 --first-conv-float --calib "$CAL" --out "$W/student-phone.edgeskin"
COLUMNS=100 rec 18-bench $E bench --reference $Q/bench/reference-test.npz --bundle $Q/bundles/cpu-int8.edgeskin --bundle $Q/bundles/tflite-int8.edgeskin --device generic-cpu --against student --out "$W/bench"
rm -rf "$W"
