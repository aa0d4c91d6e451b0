#!/usr/bin/env bash
# Install what kbloop needs on a fresh Debian 12 machine and build it in place. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
# dpdk-dev/libdpdk-dev/pkg-config/dpkg-dev: the DPDK datapath (lwIP's source is fetched below);
# ethtool/iproute2/iputils-ping: its tests' network namespaces and kernel peers.
for pkg in liburing-dev wrk valgrind gcc redis-server postgresql redis-tools linux-perf \
           dpdk-dev libdpdk-dev pkg-config dpkg-dev ethtool iproute2 iputils-ping curl patch \
           libibverbs-dev librdmacm-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# lwIP's core is compiled into the DPDK datapath with our own lwipopts.h (NO_SYS=1), from
# Debian's source package (with Debian's patches), fetched once into .deps/lwip: never copied
# into the repository.  A temporary apt configuration adds the deb-src line; the system's apt
# configuration is left as it is.
if [ ! -d .deps/lwip/src/core ]; then
    echo "== fetch lwIP's source (apt-get source lwip)"
    tmp=$(mktemp -d /tmp/kbloop-lwip.XXXXXX)
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/src"
    echo "deb-src http://deb.debian.org/debian bookworm main" >"$tmp/sources.list"
    aptopts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/none"
             -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "APT::Sandbox::User=root")
    apt-get "${aptopts[@]}" update -qq
    (cd "$tmp/src" && apt-get "${aptopts[@]}" source -qq lwip >/dev/null)
    cores=("$tmp"/src/*/src/core)
    src=${cores[0]%/src/core}
    mkdir -p .deps
    rm -rf .deps/lwip
    mv "$src" .deps/lwip
    rm -rf "$tmp"
fi
# Our fixes to lwIP (kbloop_ext/dpdk/lwip/patches, each explained in its file), applied once.
for fix in kbloop_ext/dpdk/lwip/patches/*.patch; do
    if ! patch -d .deps/lwip -p1 -R --dry-run -s -f <"$fix" >/dev/null 2>&1; then
        echo "== lwIP: apply $(basename "$fix")"
        patch -d .deps/lwip -p1 -s -f <"$fix"
    fi
done

echo "== pip install -r requirements-dev.txt"
$PY -m pip install -q --disable-pip-version-check -r requirements-dev.txt

echo "== build kbloop"
KBLOOP_RDMA=1 $PY setup.py -q build_ext --inplace >/dev/null
$PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >/dev/null
$PY -c 'import kbloop; print("kbloop", kbloop.__version__, "built; default backend:", kbloop.info()["default_backend"])'

# RDMA runs for real only in a QEMU guest with Debian's kernel and soft-RoCE (docs/rdma.md):
# install QEMU and rdma-core, fetch the kernel and build the guest's initramfs once, into
# .deps/rdma-vm (about 10 s on a fresh machine).
echo "== prepare the RDMA test guest"
$PY tests/rdma_vm.py --prepare
