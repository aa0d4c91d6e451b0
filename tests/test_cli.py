"""python -m kbloop's command line: what follows the script or -m module goes to the program
untouched (its own options included), --version, and uvicorn's --loop auto on kbloop."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import kbloop
from procutil import subprocess_env

SHOW_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"
# Options that are also kbloop's own, or look like them, and plain ones.
PROGRAM_ARGS = ["--port", "8000", "--backend", "dpdk", "--stats", "-m", "x", "--", "-x", "b c"]


def run_py(args, cwd=None, timeout=60, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=subprocess_env(**env), timeout=timeout)


@pytest.fixture
def progs(tmp_path):
    (tmp_path / "showargv.py").write_text(SHOW_ARGV + "\n")
    pkg = tmp_path / "kbclipkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "show.py").write_text(SHOW_ARGV + "\n")
    return tmp_path


def argv_of(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_module_gets_every_argument_after_it(progs):
    control = run_py(["-m", "kbclipkg.show", *PROGRAM_ARGS], cwd=progs)
    assert argv_of(control) == PROGRAM_ARGS
    r = run_py(["-m", "kbloop", "-m", "kbclipkg.show", *PROGRAM_ARGS], cwd=progs)
    assert argv_of(r) == PROGRAM_ARGS


def test_module_joined_to_dash_m(progs):
    r = run_py(["-m", "kbloop", "-mkbclipkg.show", "--port", "1"], cwd=progs)
    assert argv_of(r) == ["--port", "1"]


def test_script_gets_every_argument_after_it(progs):
    script = str(progs / "showargv.py")
    assert argv_of(run_py([script, *PROGRAM_ARGS])) == PROGRAM_ARGS
    assert argv_of(run_py(["-m", "kbloop", script, *PROGRAM_ARGS])) == PROGRAM_ARGS


def test_kbloop_options_before_the_program_still_apply(progs):
    script = progs / "opts.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps([os.environ.get('KBLOOP_STATS'), "
                      "os.environ.get('KBLOOP_BUSY_POLL'), sys.argv[1:]]))\n")
    r = run_py(["-m", "kbloop", "--stats", "--backend", "io_uring", "--busy-poll", str(script),
                "--stats", "--backend=x"])
    assert argv_of(r) == ["1", "1", ["--stats", "--backend=x"]]
    r = run_py(["-m", "kbloop", "--backend=io_uring", "--", str(script), "-q"])
    assert argv_of(r) == [None, None, ["-q"]]


def test_unknown_kbloop_option_before_the_program_is_an_error(progs):
    r = run_py(["-m", "kbloop", "--port", "8000", str(progs / "showargv.py")])
    assert r.returncode == 2
    assert "unrecognized arguments: --port" in r.stderr
    r = run_py(["-m", "kbloop", "--back", "io_uring", str(progs / "showargv.py")])
    assert r.returncode == 2       # no abbreviations: they would swallow the program's name
    r = run_py(["-m", "kbloop", "--stats"])
    assert r.returncode == 2 and "give a script" in r.stderr


def test_version():
    r = run_py(["-m", "kbloop", "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["kbloop", kbloop.__version__]


UVICORN_APP = textwrap.dedent("""
    import asyncio, os, signal

    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                loop = asyncio.get_running_loop()
                print("LOOP", type(loop).__module__, flush=True)
                await send({"type": "lifespan.startup.complete"})
                os.kill(os.getpid(), signal.SIGINT)
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
""")


def loop_module(result):
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("LOOP ")]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0].split()[1]


@pytest.fixture
def uvicorn_app(tmp_path):
    pytest.importorskip("uvicorn")
    (tmp_path / "kbapp.py").write_text(UVICORN_APP)
    (tmp_path / "serve.py").write_text("import uvicorn\n"
                                       "uvicorn.run('kbapp:app', port=0, lifespan='on')\n")
    return tmp_path


UVICORN = ["-m", "uvicorn", "--port", "0", "--lifespan", "on"]


def test_uvicorn_loop_auto_runs_on_kbloop_under_python_m_kbloop(uvicorn_app):
    # The control: uvicorn's own choice (uvloop when it is installed, else asyncio's loop).
    auto = loop_module(run_py([*UVICORN, "kbapp:app"], cwd=uvicorn_app))
    assert auto in ("uvloop", "asyncio.unix_events")
    assert loop_module(run_py(["-m", "kbloop", *UVICORN, "kbapp:app"], cwd=uvicorn_app)) == "kbloop"
    # uvicorn.run() called by a script
    assert loop_module(run_py(["-m", "kbloop", "serve.py"], cwd=uvicorn_app)) == "kbloop"


def test_uvicorn_explicit_loops(uvicorn_app):
    # An explicit --loop is what the user asked for, under python -m kbloop too.
    r = run_py(["-m", "kbloop", *UVICORN, "--loop", "asyncio", "kbapp:app"], cwd=uvicorn_app)
    assert loop_module(r) == "asyncio.unix_events"
    # The way without python -m kbloop (uvicorn 0.36+).
    r = run_py([*UVICORN, "--loop", "kbloop:new_event_loop", "kbapp:app"], cwd=uvicorn_app)
    assert loop_module(r) == "kbloop"
