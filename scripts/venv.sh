# Sourced by the scripts: the project's virtual environment and Debian packages.
#
# Debian's python3 refuses `pip install` outside a venv (PEP 668, externally-managed-environment),
# so everything kbloop's scripts install goes into one venv, .venv/ in the clone (KBLOOP_VENV
# moves it).  It is made from $PYTHON, else the python3 on PATH (3.11 or newer); to change
# interpreter, remove .venv/.  After kb_venv: $VENV, and $PY, its interpreter.

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
_kb_apt_updated=""

# kb_apt PKG...: install the Debian packages among PKG that are missing (apt-get update once).
kb_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "== apt-get install ${missing[*]}"
    if [ -z "$_kb_apt_updated" ]; then
        $SUDO apt-get update -qq
        _kb_apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

# kb_venv: make .venv if it is missing or broken, and set VENV and PY.
kb_venv() {
    VENV=${KBLOOP_VENV:-$PWD/.venv}
    PY=$VENV/bin/python
    if "$PY" -c 'import sys, pip; assert sys.version_info >= (3, 11)' >/dev/null 2>&1; then
        return 0
    fi
    local base=${PYTHON:-python3}
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "kbloop needs Python 3.11 or newer: $base is $("$base" -V 2>&1)" >&2
        return 1
    fi
    # Debian splits ensurepip (python3-venv) and the C headers (python3-dev) out of python3.
    if ! "$base" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        kb_apt python3-venv
    fi
    if ! "$base" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(
            os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
        kb_apt python3-dev
    fi
    echo "== python venv $VENV (from $("$base" -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
    rm -rf "$VENV"
    "$base" -m venv "$VENV"
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
}
