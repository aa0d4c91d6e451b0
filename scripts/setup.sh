#!/usr/bin/env bash
# Install what kbloop's contributors need on a fresh Debian 12 machine (Debian packages, a
# project venv .venv/ with the Python packages, lwIP's source with our patches, the RDMA test
# guest) and build kbloop in place.  Idempotent: a second run only checks, and rebuilds what
# changed.  PYTHON picks the interpreter the venv is made from (python3 on PATH by default).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

# liburing-dev: the core; dpdk-dev/libdpdk-dev/pkg-config/dpkg-dev: the DPDK datapath (lwIP's
# source is fetched below); libibverbs-dev/librdmacm-dev: the RDMA one;
# ethtool/iproute2/iputils-ping: the DPDK tests' network namespaces and kernel peers;
# libssl-dev/openssl: the benchmark's TLS load generator (bench/echo_load.c) and its certificate;
# the rest: the demo's load generators and the services.
kb_apt liburing-dev wrk valgrind gcc redis-server postgresql redis-tools linux-perf \
       dpdk-dev libdpdk-dev pkg-config dpkg-dev ethtool iproute2 iputils-ping curl patch \
       libibverbs-dev librdmacm-dev libssl-dev openssl
kb_venv

# lwIP's source with our patches, in .deps/lwip (scripts/lwip.sh: fetched once, patched once).
PY=$PY bash scripts/lwip.sh

# The Python packages, again only when requirements*.txt changed.
reqs_sum=$(cat requirements-dev.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.kbloop-requirements" 2>/dev/null)" != "$reqs_sum" ]; then
    echo "== pip install -r requirements-dev.txt (into $VENV)"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    echo "$reqs_sum" >"$VENV/.kbloop-requirements"
fi

echo "== build kbloop"
KBLOOP_RDMA=1 "$PY" setup.py -q build_ext --inplace >/dev/null
if ! "$PY" -m pip show -q kbloop >/dev/null 2>&1; then
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >/dev/null
fi
(cd / && "$PY" -c 'import kbloop; print("kbloop", kbloop.__version__, "built; default backend:", kbloop.info()["default_backend"])')

# RDMA runs for real only in a QEMU guest with Debian's kernel and soft-RoCE (docs/rdma.md):
# install QEMU and rdma-core, fetch the kernel and build the guest's initramfs once, into
# .deps/rdma-vm (about 10 s on a fresh machine).
echo "== prepare the RDMA test guest"
"$PY" tests/rdma_vm.py --prepare
