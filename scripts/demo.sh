#!/usr/bin/env bash
# The README's main job: install, build, then the side-by-side comparison of
# asyncio, uvloop and kbloop (examples/ servers, compiled load generator, interleaved rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec $PY -m bench.demo "$@"
