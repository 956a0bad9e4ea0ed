#!/usr/bin/env bash
# Install everything the tests need (into .venv) and run the fast CPU test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
