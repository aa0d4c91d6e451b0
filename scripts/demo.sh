#!/usr/bin/env bash
# The README's main job: install, build, then the benchmark suite's quick mode
# (~3 min): asyncio, uvloop and kbloop side by side on the examples/ servers,
# compiled load generators, interleaved rounds.  `--full` for every combination.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/venv.sh
kb_venv
export PATH="$VENV/bin:$PATH"
exec "$PY" -m bench --quick "$@"
