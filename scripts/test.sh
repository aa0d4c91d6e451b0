#!/usr/bin/env bash
# The README's test command: install, build, run the whole suite (in the project venv, .venv/),
# then the same tests over an AddressSanitizer build, then the core suite on the other Pythons
# (3.12, 3.13), each against a wheel built from the sdist, repaired and installed in a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/venv.sh
kb_venv
export PATH="$VENV/bin:$PATH"     # what tests start by name (python3, uvicorn) is the venv's
"$PY" -m pytest tests "$@"
bash scripts/asan.sh
bash scripts/wheels.sh --test --others
