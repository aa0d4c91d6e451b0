"""Entry points: kbloop.run, asyncio.run/Runner with loop_factory, the policy, ``python -m kbloop``
(script, -m module, info) and kbloop.info()."""
import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

import kbloop
from procutil import KBLOOP_ROOT, subprocess_env  # noqa: E402





def run_py(args, cwd=None, timeout=60, **env):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
        cwd=cwd, env=subprocess_env(**env),
    )


async def loop_module_and_debug():
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)
    return type(loop).__module__, isinstance(loop, kbloop.Loop), loop.get_debug()


@pytest.fixture
def restore_policy():
    yield
    asyncio.set_event_loop_policy(None)


# --------------------------------------------------------------------------- in-process


def test_new_event_loop_returns_kbloop_loop():
    for lp in (kbloop.new_event_loop(), kbloop.new_event_loop(backend="io_uring")):
        try:
            assert isinstance(lp, kbloop.Loop)
            assert isinstance(lp, asyncio.AbstractEventLoop)
            assert type(lp).__module__.startswith("kbloop")
            assert lp.run_until_complete(asyncio.sleep(0, "x")) == "x"
        finally:
            lp.close()


def test_kbloop_run():
    module, is_kb, debug = kbloop.run(loop_module_and_debug())
    assert module.startswith("kbloop")
    assert is_kb
    assert debug is False


def test_kbloop_run_debug():
    assert kbloop.run(loop_module_and_debug(), debug=True)[2] is True


def test_kbloop_run_propagates_exception():
    async def boom():
        await asyncio.sleep(0)
        raise ValueError("from-main")

    with pytest.raises(ValueError, match="from-main"):
        kbloop.run(boom())


def test_kbloop_run_closes_its_loop():
    async def main():
        return asyncio.get_running_loop()

    lp = kbloop.run(main())
    assert lp.is_closed()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
def test_asyncio_run_with_loop_factory():
    module, is_kb, _ = asyncio.run(loop_module_and_debug(), loop_factory=kbloop.new_event_loop)
    assert module.startswith("kbloop")
    assert is_kb


def test_asyncio_runner_with_loop_factory():
    with asyncio.Runner(loop_factory=kbloop.new_event_loop) as runner:
        first = runner.run(loop_module_and_debug())
        second = runner.run(loop_module_and_debug())
        lp = runner.get_loop()
        assert isinstance(lp, kbloop.Loop)
    assert first[1] and second[1]
    assert lp.is_closed()


def test_event_loop_policy_creates_kbloop_loops(restore_policy):
    policy = kbloop.EventLoopPolicy()
    assert isinstance(policy, asyncio.AbstractEventLoopPolicy)
    lp = policy.new_event_loop()
    try:
        assert isinstance(lp, kbloop.Loop)
    finally:
        lp.close()


def test_install_sets_policy(restore_policy):
    kbloop.install()
    assert isinstance(asyncio.get_event_loop_policy(), kbloop.EventLoopPolicy)
    module, is_kb, _ = asyncio.run(loop_module_and_debug())
    assert module.startswith("kbloop")
    assert is_kb
    lp = asyncio.new_event_loop()
    try:
        assert isinstance(lp, kbloop.Loop)
    finally:
        lp.close()


def test_info_structure():
    info = kbloop.info()
    assert info["kernel"] == os.uname().release
    ur = info["io_uring"]
    assert isinstance(ur["usable"], bool)
    assert ur["reason"] is None or isinstance(ur["reason"], str)
    assert isinstance(ur["features"], list)
    assert all(isinstance(f, str) for f in ur["features"])
    assert isinstance(ur["setup_flags"], list)
    assert all(isinstance(f, str) for f in ur["setup_flags"])
    assert isinstance(ur["opcodes"], dict)
    assert isinstance(info["default_backend"], str)
    json.dumps(info)  # JSON-serialisable


def test_info_reports_usable_io_uring_here():
    # this machine runs the io_uring backend (the kbloop fixtures depend on it)
    info = kbloop.info()
    assert info["io_uring"]["usable"] is True, info["io_uring"]["reason"]
    assert info["io_uring"]["reason"] is None
    assert "io_uring" in info["default_backend"]
    assert info["io_uring"]["opcodes"], "probe found no opcodes"


# --------------------------------------------------------------------------- python -m kbloop


PROBE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    async def main():
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        return type(loop).__module__

    if __name__ == "__main__":
        module = asyncio.run(main())
        print(json.dumps({"module": module, "argv": sys.argv, "name": __name__}))
    """
)


def _last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_python_m_kbloop_runs_script(tmp_path):
    script = tmp_path / "probe_script.py"
    script.write_text(PROBE_SCRIPT)
    r = run_py(["-m", "kbloop", str(script), "a1", "--flag", "b 2"])
    assert r.returncode == 0, r.stderr
    out = _last_json(r.stdout)
    assert out["module"].startswith("kbloop")
    assert out["argv"] == [str(script), "a1", "--flag", "b 2"]
    assert out["name"] == "__main__"


def test_control_plain_python_runs_script_on_asyncio(tmp_path):
    script = tmp_path / "probe_script.py"
    script.write_text(PROBE_SCRIPT)
    r = run_py([str(script), "a1"])
    assert r.returncode == 0, r.stderr
    out = _last_json(r.stdout)
    assert out["module"].startswith("asyncio")
    assert out["argv"] == [str(script), "a1"]


def test_python_m_kbloop_script_exit_code_and_exception(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(
        """
        import asyncio
        async def main():
            raise ValueError("script-failed")
        asyncio.run(main())
        """
    ))
    r = run_py(["-m", "kbloop", str(script)])
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "script-failed" in r.stderr


def test_python_m_kbloop_runs_module(tmp_path):
    pkg = tmp_path / "kbtestpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(PROBE_SCRIPT)
    r = run_py(["-m", "kbloop", "-m", "kbtestpkg.mod", "x", "y"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = _last_json(r.stdout)
    assert out["module"].startswith("kbloop")
    assert out["argv"][1:] == ["x", "y"]
    assert out["argv"][0].endswith("mod.py")
    assert out["name"] == "__main__"


def test_python_m_kbloop_info_human():
    r = run_py(["-m", "kbloop", "info"])
    assert r.returncode == 0, r.stderr
    assert "io_uring" in r.stdout
    assert "usable" in r.stdout
    assert os.uname().release in r.stdout


def test_python_m_kbloop_info_json_matches_info():
    r = run_py(["-m", "kbloop", "info", "--json"])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kernel"] == os.uname().release
    assert data["io_uring"]["usable"] == kbloop.info()["io_uring"]["usable"]
    assert data["default_backend"] == kbloop.info()["default_backend"]
    assert set(data["io_uring"]) >= {"usable", "reason", "features", "setup_flags", "opcodes"}


def test_python_m_kbloop_stats_prints_each_loops_counters(tmp_path):
    script = tmp_path / "probe_script.py"
    script.write_text(PROBE_SCRIPT)
    r = run_py(["-m", "kbloop", "--stats", str(script)])
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("kbloop[")]
    assert len(line) == 1, r.stderr
    fields = dict(f.split("=", 1) for f in line[0].split() if "=" in f)
    assert fields["mode"] == "default"
    assert int(fields["iterations"]) >= 1 and int(fields["sqes"]) >= 1
    # without the flag, nothing is printed
    r = run_py(["-m", "kbloop", str(script)])
    assert "kbloop[" not in r.stderr
