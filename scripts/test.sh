#!/usr/bin/env bash
# The README's test command: install, build, run the whole suite (in the project venv, .venv/),
# then the same tests over an AddressSanitizer build, then the core suite on the other Pythons
# (3.12, 3.13), each against a wheel built from the sdist, repaired and installed in a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The set-up is idempotent (demo.sh then test.sh run it twice): a second run redoes nothing.
again=$(bash scripts/setup.sh 2>&1) || { echo "$again"; echo "scripts/setup.sh failed on a second run"; exit 1; }
if grep -E "^== (apt-get install|python venv|fetch|lwIP: apply|pip install)" <<<"$again"; then
    echo "scripts/setup.sh is not idempotent: its second run did the above again"; exit 1
fi
source scripts/venv.sh
kb_venv
export PATH="$VENV/bin:$PATH"     # what tests start by name (python3, uvicorn) is the venv's
"$PY" -m pytest tests "$@"
bash scripts/asan.sh
bash scripts/wheels.sh --test --others
