#!/usr/bin/env bash
# Install nanoseek (into .venv) and run the whole recipe on its CPU default.
# Extra arguments go to `nanoseek speedrun`, e.g. `bash scripts/speedrun.sh --preset gpu --out runs/gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nanoseek speedrun "$@"
