"""One loop per core: `python -m kbloop --workers N` and kbloop.serve() run N processes that
share the port through SO_REUSEPORT, restart a worker that dies, and stop cleanly."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import free_port
from procutil import KBLOOP_ROOT, subprocess_env

PID_SERVER = os.path.join(os.path.dirname(__file__), "scripts", "pid_server.py")


def _ask(port, timeout=1.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                # e.g. accepted by the worker we just killed: its sockets close with a FIN
                raise ConnectionAbortedError("closed without an answer")
            data += chunk
    pid, cpus, module = data.decode().split()
    return int(pid), cpus, module


def _answers(port, n=60, want_pids=1, deadline=20):
    """Collect at least n answers, from at least want_pids processes (workers start one by
    one: the first may answer everything before the others listen)."""
    end = time.monotonic() + deadline
    got = []
    while time.monotonic() < end:
        if len(got) >= n and len({pid for pid, _, _ in got}) >= want_pids:
            break
        try:
            got.append(_ask(port))
        except OSError:
            time.sleep(0.05)
    return got


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:        # a zombie still answers kill(0): check its state
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start(argv):
    return subprocess.Popen(argv, env=subprocess_env(), cwd=KBLOOP_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_cli_workers_share_the_port_restart_and_stop_cleanly():
    port = free_port()
    proc = _start([sys.executable, "-m", "kbloop", "--workers", "2", PID_SERVER,
                   "--port", str(port)])
    try:
        answers = _answers(port, want_pids=2)
        pids = {pid for pid, _, _ in answers}
        assert len(answers) >= 60
        assert len(pids) == 2, answers[:5]            # both workers served clients
        assert all(module.startswith("kbloop") for _, _, module in answers)
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 2:     # each worker pinned to a core of its own
            assert {cpus for _, cpus, _ in answers} == {str(cores[0]), str(cores[1])}
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        # the supervisor restarts it: a new pid answers, the old one is gone
        end = time.monotonic() + 20
        new = set()
        while time.monotonic() < end and not new:
            new = {pid for pid, _, _ in _answers(port, 20)} - pids
        assert new, "no restarted worker answered"
        assert not _alive(victim)
        workers_now = (pids - {victim}) | new
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert "restarting" in err
    assert "all workers stopped" in err
    for pid in workers_now:
        assert not _alive(pid)


def test_serve_runs_a_coroutine_function_in_each_worker(tmp_path):
    port = free_port()
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(PID_SERVER)!r})
        import kbloop, pid_server

        async def main():
            await pid_server.main({port})

        sys.exit(kbloop.serve(main, workers=2))
    """))
    proc = _start([sys.executable, str(script)])
    try:
        answers = _answers(port, want_pids=2)
        assert len({pid for pid, _, _ in answers}) == 2
        assert all(module.startswith("kbloop") for _, _, module in answers)
    finally:
        code, err = _stop(proc)
    assert code == 0, err


def test_workers_must_be_positive():
    from kbloop.workers import Supervisor

    with pytest.raises(ValueError):
        Supervisor(lambda i: None, 0)
