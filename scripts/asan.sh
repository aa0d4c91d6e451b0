#!/usr/bin/env bash
# Build the extension with AddressSanitizer in a scratch copy and run the kbloop tests over it.
# Any ASan report (heap overflow, use-after-free, double free...) fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
kb_venv         # the project venv (scripts/setup.sh)
export PATH="$VENV/bin:$PATH"
# Under the repository (.deps is git-ignored), not /tmp: the RDMA tests run their commands in
# QEMU guests that see the host's / read-only and the repository, but a /tmp of their own.
mkdir -p .deps
work=$(mktemp -d "$PWD/.deps/asan.XXXXXX")
trap '[ -n "${KEEP_ASAN:-}" ] || rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
# lwIP's fetched source (.deps, not in git) is used from here, so the DPDK datapath is
# instrumented too where it is built.
[ -d .deps/lwip ] && export KBLOOP_LWIP_SRC=$PWD/.deps/lwip
# The RDMA test guest's kernel and initramfs, cached once.
[ -d .deps/rdma-vm ] && mkdir -p "$work/.deps" && ln -s "$PWD/.deps/rdma-vm" "$work/.deps/rdma-vm"
cd "$work"
KBLOOP_SANITIZE=address $PY setup.py -q build_ext --inplace >/dev/null 2>&1
# Read the whole symbol table first: with pipefail, `nm | grep -q` fails when grep's early exit
# hands nm a SIGPIPE (what broke CI once).
for ext in kbloop_ext/core*.so kbloop_ext/dpdk/stack*.so kbloop_ext/rdma/verbs*.so; do
    [ -e "$ext" ] || continue
    symbols=$(nm -D "$ext")
    [[ $symbols == *__asan_report* ]] || { echo "ASan build of $ext is not instrumented"; exit 1; }
done
libasan=$(gcc -print-file-name=libasan.so)
echo "== ASan pass: kbloop tests over an instrumented kbloop_ext ($(ls kbloop_ext/core*.so kbloop_ext/dpdk/stack*.so kbloop_ext/rdma/verbs*.so 2>/dev/null | xargs -n1 basename | tr '\n' ' '))"
# Python itself "leaks" at exit by design: leak checking off; memory errors halt the process.
# The tests that start PostgreSQL and redis-server are left out: those servers would inherit
# LD_PRELOAD=libasan (postgres hangs under it), and the transport paths their clients use are
# exercised by the other tests here.  The DPDK fault-integrity test is left out too: it is a
# long loss-recovery run whose lwIP and frame paths the other DPDK tests already cover here.
# The RDMA device layer and datapath tests run in QEMU guests, with libasan preloaded into the
# guest's commands (not into QEMU).
status=0
LD_PRELOAD=$libasan ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
PYTHONMALLOC=malloc PYTHONPATH=$work \
    $PY -m pytest tests -k "(kbloop or zerocopy or dpdk or rdma_loop or rdma_stack) and not integrity" \
        -p no:cacheprovider \
        --ignore=tests/test_thirdparty_asyncpg.py --ignore=tests/test_thirdparty_redis.py \
        "$@" >asan.log 2>&1 || status=$?
tail -3 asan.log
if grep -q "AddressSanitizer" asan.log; then
    grep -m3 -A30 "AddressSanitizer" asan.log || true
    exit 1
fi
exit "$status"
