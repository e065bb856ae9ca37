#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Data-dependent tests read
# $EDGESKIN_TEST_DATA (default ../shared/data/ham10000) and skip, with a reason, when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
