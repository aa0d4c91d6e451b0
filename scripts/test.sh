#!/usr/bin/env bash
# The README's test command: install, build, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m pytest tests "$@"
# The same kbloop tests over an AddressSanitizer build of the extension.
bash scripts/asan.sh
