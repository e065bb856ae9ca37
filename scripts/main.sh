#!/usr/bin/env bash
# The main job, end to end on this machine: set up, train a quick 3-member ResNet50 ensemble
# (112 px, 3 epochs each) on HAM10000 and evaluate it on the held-out test split.
# Data: $EDGESKIN_DATA, else ../shared/data/ham10000. Output: runs/quick/ (override with $OUT;
# $PRESET=tiny gives a one-minute smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${EDGESKIN_DATA:-../shared/data/ham10000}
OUT=${OUT:-runs/quick}
PRESET=${PRESET:-quick}
.venv/bin/edgeskin train --data "$DATA" --out "$OUT" --preset "$PRESET" --members 3
.venv/bin/edgeskin evaluate "$OUT" --data "$DATA" --on test --json "$OUT/test_metrics.json"
