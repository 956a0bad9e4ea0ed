#!/usr/bin/env bash
# Install nanoseek (into .venv) and run the whole recipe on its CPU default.
# Extra arguments go to `nanoseek speedrun`, e.g. `bash scripts/speedrun.sh --preset gpu --out runs/gpu`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/nanoseek" speedrun "$@"  # from the caller's directory: a relative --out is the caller's
