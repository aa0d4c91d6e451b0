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
# ethtool/iproute2/iputils-ping: the DPDK tests' network namespaces and kernel peers; the rest: the demo's load generators and the services.
kb_apt liburing-dev wrk valgrind gcc redis-server postgresql redis-tools linux-perf \
       dpdk-dev libdpdk-dev pkg-config dpkg-dev ethtool iproute2 iputils-ping curl patch \
       libibverbs-dev librdmacm-dev
kb_venv

# lwIP's core is compiled into the DPDK datapath with our own lwipopts.h (NO_SYS=1), from
# Debian's source package (with Debian's patches), fetched once into .deps/lwip.orig: never
# copied into the repository.  .deps/lwip is a copy of it with our fixes
# (kbloop_ext/dpdk/lwip/patches, each explained in its file) applied, made again only when the
# set of patches changes: its marker file holds their checksum.
patches=(kbloop_ext/dpdk/lwip/patches/*.patch)
patches_sum=$(cat "${patches[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat .deps/lwip/.kbloop-patches 2>/dev/null)" != "$patches_sum" ]; then
    if [ ! -d .deps/lwip.orig/src/core ]; then
        echo "== fetch lwIP's source (apt-get source lwip)"
        # A temporary apt configuration holds deb-src entries made from this machine's own apt
        # sources (scripts/debsrc.py): the system's configuration is left as it is.
        tmp=$(mktemp -d /tmp/kbloop-lwip.XXXXXX)
        mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/src" "$tmp/parts"
        "$PY" scripts/debsrc.py >"$tmp/parts/kbloop-src.sources"
        aptopts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$tmp/parts"
                 -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache"
                 -o "APT::Sandbox::User=root")
        apt-get "${aptopts[@]}" update -qq
        (cd "$tmp/src" && apt-get "${aptopts[@]}" source -qq lwip >/dev/null)
        cores=("$tmp"/src/*/src/core)
        mkdir -p .deps
        rm -rf .deps/lwip.orig
        mv "${cores[0]%/src/core}" .deps/lwip.orig
        rm -rf "$tmp"
    fi
    rm -rf .deps/lwip.new
    cp -a .deps/lwip.orig .deps/lwip.new
    for fix in "${patches[@]}"; do
        echo "== lwIP: apply $(basename "$fix")"
        patch -d .deps/lwip.new -p1 -s -f <"$fix"
    done
    echo "$patches_sum" >.deps/lwip.new/.kbloop-patches
    rm -rf .deps/lwip
    mv .deps/lwip.new .deps/lwip
fi

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
