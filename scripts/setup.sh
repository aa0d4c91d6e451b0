#!/usr/bin/env bash
# Install what kbloop needs on a fresh Debian 12 machine and build it in place. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
for pkg in liburing-dev wrk valgrind gcc redis-server postgresql redis-tools linux-perf; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "== pip install -r requirements-dev.txt"
$PY -m pip install -q --disable-pip-version-check -r requirements-dev.txt

echo "== build kbloop"
$PY setup.py -q build_ext --inplace >/dev/null
$PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >/dev/null
$PY -c 'import kbloop; print("kbloop", kbloop.__version__, "built; default backend:", kbloop.info()["default_backend"])'
