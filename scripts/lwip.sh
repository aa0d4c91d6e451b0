#!/usr/bin/env bash
# lwIP's source for the DPDK datapath, in .deps/lwip, with our patches applied exactly once.
# Run by scripts/setup.sh; idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

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
        "${PY:-python3}" scripts/debsrc.py >"$tmp/parts/kbloop-src.sources"
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
