"""Behaviour when io_uring is unavailable.

Two ways to make io_uring_setup fail, each in a fresh subprocess (the switch is read at import,
and a seccomp filter cannot be removed):
  * KBLOOP_FORCE_URING_ERROR=EPERM|ENOSYS (kbloop's test switch);
  * a real seccomp BPF filter returning EPERM for io_uring_setup (tests/scripts/seccomp_no_uring.py).

Expected: backend="io_uring" raises kbloop.BackendUnavailable naming the reason; the default
new_event_loop() warns exactly once (RuntimeWarning mentioning io_uring) and returns asyncio's own,
working loop; kbloop.info() reports io_uring unusable with a reason.
"""
import json
import os
import subprocess
import sys

import pytest

import kbloop
from procutil import KBLOOP_ROOT, subprocess_env  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")
PROBE = os.path.join(SCRIPTS, "fallback_probe.py")

sys.path.insert(0, SCRIPTS)
import seccomp_no_uring  # noqa: E402




def probe(mode, check, force=None):
    extra = {"KBLOOP_FORCE_URING_ERROR": force} if force else {}
    r = subprocess.run(
        [sys.executable, PROBE, mode, check], capture_output=True, text=True, timeout=60,
        env=subprocess_env(**extra),
    )
    assert r.returncode == 0, f"probe failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# (mode, force, the word the reason must contain)
SCENARIOS = [
    pytest.param("env", "EPERM", ("EPERM",), id="env-EPERM"),
    pytest.param("env", "ENOSYS", ("ENOSYS",), id="env-ENOSYS"),
    pytest.param(
        "seccomp", None, ("EPERM", "seccomp"), id="seccomp",
        marks=pytest.mark.skipif(not seccomp_no_uring.supported(),
                                 reason="seccomp filter written for x86_64/aarch64"),
    ),
]


def _mentions(text, words):
    return any(w.lower() in (text or "").lower() for w in words)


@pytest.mark.parametrize("mode,force,words", SCENARIOS)
def test_io_uring_backend_raises_backend_unavailable(mode, force, words):
    res = probe(mode, "forced", force)
    if mode == "seccomp":
        assert res["raw_setup_errno"] == "EPERM"  # the filter itself works
    assert res["raised"] == "BackendUnavailable", res
    assert res["is_runtime_error"] is True
    assert _mentions(res["message"], words), res["message"]


@pytest.mark.parametrize("mode,force,words", SCENARIOS)
def test_default_loop_falls_back_to_asyncio_with_one_warning(mode, force, words):
    res = probe(mode, "default", force)
    runtime_warnings = [m for cat, m in res["warnings"] if cat == "RuntimeWarning"]
    assert len(runtime_warnings) == 1, res["warnings"]
    assert "io_uring" in runtime_warnings[0]
    assert res["is_abstract_loop"] is True
    assert res["is_base_event_loop"] is True
    assert res["module"].startswith("asyncio"), res["module"]
    assert res["echo"] == "hello"


@pytest.mark.parametrize("mode,force,words", SCENARIOS)
def test_info_reports_io_uring_unusable(mode, force, words):
    info = probe(mode, "info", force)["info"]
    assert info["kernel"] == os.uname().release
    assert info["io_uring"]["usable"] is False
    assert isinstance(info["io_uring"]["reason"], str)
    assert _mentions(info["io_uring"]["reason"], words), info["io_uring"]["reason"]
    assert info["default_backend"] != "io_uring"


@pytest.mark.parametrize("mode,force,words", SCENARIOS)
def test_kbloop_run_still_works_without_io_uring(mode, force, words):
    res = probe(mode, "run", force)
    assert res["echo"] == "hello"
    assert res["kind"].startswith("asyncio"), res["kind"]
    assert len([m for cat, m in res["warnings"] if cat == "RuntimeWarning"]) <= 1


def test_python_m_kbloop_info_json_when_forced():
    r = subprocess.run(
        [sys.executable, "-m", "kbloop", "info", "--json"], capture_output=True, text=True,
        timeout=60, env=subprocess_env(KBLOOP_FORCE_URING_ERROR="EPERM"),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["io_uring"]["usable"] is False
    assert "EPERM" in data["io_uring"]["reason"]


def test_no_force_switch_means_io_uring_usable():
    # control for the tests above: the same probe without the switch gets a real kbloop loop
    res = probe("env", "forced", None)
    assert res["raised"] is None, res
    res = probe("env", "default", None)
    assert res["module"].startswith("kbloop"), res
    assert not [m for cat, m in res["warnings"] if cat == "RuntimeWarning"]
    assert res["echo"] == "hello"
