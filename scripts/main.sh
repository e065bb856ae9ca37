#!/usr/bin/env bash
# The main job, end to end: set up, then run the quick recipe (recipes/quick.toml): split,
# train a 3 x ResNet50 ensemble, distil it into a ResNet18, calibrate, compile cpu / jetson /
# tflite INT8 bundles and bench them against the ensemble. 17 to 29 minutes on a 2-core CPU from
# fresh clones, the one-time install included (19 min 55 s on 2026-12-02, 19 min 43 s and 20 min 14 s on 2026-12-03;
# benchmarks/results/README.md).
# Output: runs/quick/ (bundles/, bench/report.md). Run it again and finished stages are skipped;
# interrupt it and it resumes. Extra arguments go to `edgeskin run` (e.g. --out DIR, --dry-run);
# $RECIPE runs another recipe (e.g. RECIPE=recipes/full.toml).
#
# Data: $EDGESKIN_DATA if set; else ../shared/data/ham10000 if present; else the default folder,
# which `edgeskin data fetch ham10000` fills from the official archive (it fails at once offline,
# saying where to put a copy by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${EDGESKIN_DATA:-}" ]; then
  if [ -d ../shared/data/ham10000 ]; then
    export EDGESKIN_DATA=../shared/data/ham10000
  else
    .venv/bin/edgeskin data fetch ham10000
  fi
fi
exec .venv/bin/edgeskin run "${RECIPE:-recipes/quick.toml}" "$@"
