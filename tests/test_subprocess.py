"""Subprocesses: loop.subprocess_exec/subprocess_shell, asyncio.create_subprocess_*.

Parity tests (asyncio is the control) unless marked kbloop-only.  On kbloop a child's exit is
watched with a pidfd polled on the ring: no child watcher, no thread per child.
"""
import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading

import pytest

import kbloop_ext.core as kbcore

from conftest import _describe, open_fds

PY = sys.executable
PIPE = asyncio.subprocess.PIPE
DEVNULL = asyncio.subprocess.DEVNULL
STDOUT = asyncio.subprocess.STDOUT


def py(code, *args, **kw):
    """create_subprocess_exec(python -c code)."""
    return asyncio.create_subprocess_exec(PY, "-c", code, *args, **kw)


def my_children():
    """The pids of this process's (main thread's) live or zombie children."""
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return set(f.read().split())


# --------------------------------------------------------------------------- exec / shell, stdio

def test_exec_stdout_pipe_and_returncode(run):
    async def main():
        proc = await py("print('out'); raise SystemExit(5)", stdout=PIPE)
        assert proc.pid > 0
        assert proc.returncode is None or proc.returncode == 5
        out, err = await proc.communicate()
        assert (out, err) == (b"out\n", None)
        assert proc.returncode == 5
        assert await proc.wait() == 5

    run(main)


def test_shell_with_env(run):
    async def main():
        env = dict(os.environ, KB_TEST_VALUE="from env")
        proc = await asyncio.create_subprocess_shell(
            'echo "$KB_TEST_VALUE"; echo err >&2; exit 7', stdout=PIPE, stderr=PIPE, env=env)
        out, err = await proc.communicate()
        assert (out, err, proc.returncode) == (b"from env\n", b"err\n", 7)

    run(main)


def test_loop_subprocess_exec_protocol(run):
    class Proto(asyncio.SubprocessProtocol):
        def __init__(self):
            loop = asyncio.get_running_loop()
            self.data = {1: bytearray(), 2: bytearray()}
            self.events = []
            self.done = loop.create_future()

        def connection_made(self, transport):
            self.events.append("made")

        def pipe_data_received(self, fd, data):
            self.data[fd] += data

        def pipe_connection_lost(self, fd, exc):
            self.events.append(("pipe_lost", fd, exc))

        def process_exited(self):
            self.events.append("exited")

        def connection_lost(self, exc):
            self.events.append(("lost", exc))
            self.done.set_result(None)

    async def main():
        loop = asyncio.get_running_loop()
        transport, proto = await loop.subprocess_exec(
            Proto, PY, "-c", "import sys; sys.stdout.write(sys.stdin.read()[::-1]);"
                             "sys.stderr.write('E')",
            stdin=PIPE, stdout=PIPE, stderr=PIPE)
        assert transport.get_pid() > 0
        stdin = transport.get_pipe_transport(0)
        stdin.write(b"abc")
        stdin.close()
        await asyncio.wait_for(proto.done, 30)
        assert transport.get_returncode() == 0
        assert bytes(proto.data[1]) == b"cba" and bytes(proto.data[2]) == b"E"
        assert proto.events[0] == "made" and proto.events[-1] == ("lost", None)
        assert "exited" in proto.events
        assert sorted(e for e in proto.events if e[0] == "pipe_lost") == [
            ("pipe_lost", 0, None), ("pipe_lost", 1, None), ("pipe_lost", 2, None)]
        transport.close()

    run(main)


def test_communicate_4mib_each_way(run):
    async def main():
        payload = os.urandom(4 << 20)
        proc = await asyncio.create_subprocess_exec("cat", stdin=PIPE, stdout=PIPE)
        out, _ = await proc.communicate(payload)
        assert out == payload
        assert proc.returncode == 0

    run(main)


def test_large_output_and_stderr_to_stdout(run):
    async def main():
        code = ("import sys; sys.stdout.write('o' * (4 << 20)); sys.stdout.flush();"
                "sys.stderr.write('EEE'); sys.stderr.flush()")
        proc = await py(code, stdout=PIPE, stderr=STDOUT)
        assert proc.stderr is None
        out, err = await proc.communicate()
        assert err is None
        assert out == b"o" * (4 << 20) + b"EEE"
        assert proc.returncode == 0

    run(main)


def test_devnull(run):
    async def main():
        proc = await py("import sys; d = sys.stdin.read(); print(len(d)); print('x', file=sys.stderr)",
                        stdin=DEVNULL, stdout=PIPE, stderr=DEVNULL)
        assert proc.stdin is None and proc.stderr is None
        out, _ = await proc.communicate()
        assert out == b"0\n" and proc.returncode == 0
        proc = await py("print('lost')", stdout=DEVNULL)
        assert proc.stdout is None
        assert await proc.wait() == 0

    run(main)


def test_file_objects_and_fds(run, tmp_path, no_fd_leak):
    async def main():
        src = tmp_path / "in.txt"
        src.write_bytes(b"file input")
        with open(src, "rb") as fin, open(tmp_path / "out.txt", "wb") as fout:
            proc = await py("import sys; sys.stdout.write(sys.stdin.read().upper())",
                            stdin=fin, stdout=fout)
            assert await proc.wait() == 0
        assert (tmp_path / "out.txt").read_bytes() == b"FILE INPUT"
        r, w = os.pipe()
        try:
            proc = await py("print('via fd')", stdout=w)
            os.close(w)
            w = None
            assert await proc.wait() == 0
            assert os.read(r, 100) == b"via fd\n"
        finally:
            os.close(r)
            if w is not None:
                os.close(w)

    run(main)


def test_pass_fds(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        try:
            proc = await py("import os, sys; os.write(int(sys.argv[1]), b'passed')", str(w),
                            pass_fds=(w,))
            os.close(w)
            w = None
            assert await proc.wait() == 0
            assert os.read(r, 100) == b"passed"
            # without pass_fds the fd is closed in the child
            r2, w2 = os.pipe()
            proc = await py("import os, sys\ntry: os.write(int(sys.argv[1]), b'x')\n"
                            "except OSError: sys.exit(9)", str(w2))
            assert await proc.wait() == 9
            os.close(r2)
            os.close(w2)
        finally:
            os.close(r)
            if w is not None:
                os.close(w)

    run(main)


def test_cwd_and_start_new_session(run, tmp_path):
    async def main():
        proc = await py("import os; print(os.getcwd()); print(os.getsid(0) == os.getpid())",
                        stdout=PIPE, cwd=tmp_path, start_new_session=True)
        out, _ = await proc.communicate()
        cwd, new_session = out.decode().split()
        assert os.path.realpath(cwd) == os.path.realpath(tmp_path)
        assert new_session == "True"
        proc = await py("import os; print(os.getsid(0) == os.getpid())", stdout=PIPE)
        out, _ = await proc.communicate()
        assert out == b"False\n"

    run(main)


def test_spawn_failure_raises(run, no_fd_leak):
    async def main():
        with pytest.raises(FileNotFoundError):
            await asyncio.create_subprocess_exec("/nonexistent/kbloop-no-such-program",
                                                 stdout=PIPE, stdin=PIPE)
        with pytest.raises(NotADirectoryError):
            await py("pass", cwd="/etc/passwd", stdout=PIPE)

    run(main)


# --------------------------------------------------------------------------- exit codes, signals

def test_exit_codes(run):
    async def main():
        codes = {}
        for code, expected in [("pass", 0), ("raise SystemExit(3)", 3),
                               ("import os; os._exit(255)", 255),
                               ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
                                -signal.SIGTERM),
                               ("import os; os.abort()", -signal.SIGABRT)]:
            proc = await py(code, stderr=DEVNULL)
            codes[code] = (await proc.wait(), proc.returncode)
            assert codes[code] == (expected, expected), code

    run(main)


@pytest.mark.parametrize("how", ["terminate", "kill", "send_signal"])
def test_terminate_kill_send_signal(run, how):
    async def main():
        proc = await py("import sys, time; print('up', flush=True); time.sleep(60)",
                        stdout=PIPE)
        assert await proc.stdout.readline() == b"up\n"
        if how == "terminate":
            proc.terminate()
            expected = -signal.SIGTERM
        elif how == "kill":
            proc.kill()
            expected = -signal.SIGKILL
        else:
            proc.send_signal(signal.SIGUSR1)
            expected = -signal.SIGUSR1
        assert await proc.wait() == expected
        assert proc.returncode == expected
        assert await proc.stdout.read() == b""
        # wait() returned: the transport is finished and the process is gone
        with pytest.raises(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with pytest.raises(ProcessLookupError):
            proc.kill()

    run(main)


def test_concurrent_waiters_and_children(run):
    async def main():
        procs = [await py(f"import sys; sys.exit({i})") for i in range(10)]
        waits = [p.wait() for p in procs for _ in range(3)]
        results = await asyncio.gather(*waits)
        assert results == [i for i in range(10) for _ in range(3)]
        assert [p.returncode for p in procs] == list(range(10))

    run(main)


def test_child_reaped_by_popen_before_the_loop_sees_it(run, loop_name):
    # send_signal() calls Popen.poll(), which reaps an exited child itself.  kbloop then takes
    # the status Popen recorded; asyncio's watcher thread, when Popen won the race, finds no
    # child and reports 255 ("Unknown child process").
    expected = (3,) if loop_name == "kbloop" else (3, 255)

    async def main():
        proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 3")
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)   # blocks: a zombie now
        except ChildProcessError:
            pass  # asyncio's watcher thread reaped it already
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() in expected
        assert proc.returncode in expected

    run(main)


def test_cancel_during_spawn_kills_and_reaps(run):
    async def main():
        before = my_children()
        task = asyncio.create_task(
            asyncio.create_subprocess_exec("sleep", "30", stdin=PIPE, stdout=PIPE, stderr=PIPE))
        await asyncio.sleep(0)
        task.cancel()
        try:
            proc = await task
        except asyncio.CancelledError:
            pass
        else:  # the spawn completed before the cancel landed
            proc.kill()
            await proc.wait()
        for _ in range(500):
            if my_children() <= before:
                break
            await asyncio.sleep(0.01)
        assert my_children() <= before

    run(main)


def test_wait_for_timeout_then_kill(run):
    async def main():
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL

    run(main)


# --------------------------------------------------------------------------- resources

def test_many_short_subprocesses_leak_no_fds(run, no_fd_leak):
    async def main():
        await (await asyncio.create_subprocess_exec("true")).wait()    # warm-up
        before = len(open_fds())
        for i in range(50):
            proc = await asyncio.create_subprocess_exec(
                "sh", "-c", f"echo {i}", stdin=PIPE, stdout=PIPE, stderr=PIPE)
            out, err = await proc.communicate()
            assert (out, err, proc.returncode) == (f"{i}\n".encode(), b"", 0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(open_fds()) <= before

    run(main, timeout=60)


def pidfds():
    return {fd for fd in open_fds() if _describe(fd) == "anon_inode:[pidfd]"}


def test_loop_closed_with_a_child_running(loop_factory, loop_name, no_fd_leak):
    before = pidfds()
    loop = loop_factory()
    try:
        proc = loop.run_until_complete(asyncio.create_subprocess_exec("sleep", "30"))
        popen = proc._transport.get_extra_info("subprocess")
        proc._transport.close()    # kills it
    finally:
        loop.close()
    popen.wait(30)    # reaps it (asyncio's watcher thread may have done so already)
    left = pidfds() - before
    if loop_name == "asyncio" and sys.version_info >= (3, 12):
        # asyncio 3.12+ watches children through a pidfd, which a loop closed before the child
        # exited never closes: asyncio's own leak, closed here so that no_fd_leak checks the rest.
        assert len(left) <= 1
        for fd in left:
            os.close(int(fd))
    else:
        assert not left


def test_wait_returns_when_a_grandchild_holds_stdout(run, loop_name):
    if loop_name == "asyncio":
        pytest.skip("asyncio 3.11's wait() waits for every pipe to close: it hangs here")

    async def main():
        proc = await asyncio.create_subprocess_shell(
            "sleep 60 & echo $!; exec >&- 2>&-; exit 4", stdout=PIPE, stderr=PIPE)
        grandchild = int(await proc.stdout.readline())
        try:
            assert await asyncio.wait_for(proc.wait(), 20) == 4
            assert proc.returncode == 4
        finally:
            os.kill(grandchild, signal.SIGKILL)
        # the grandchild gone, the pipes reach EOF and the transport finishes
        assert await proc.stdout.read() == b""
        assert await proc.stderr.read() == b""

    run(main)


def test_wait_returns_when_a_grandchild_holds_stdin(run, loop_name):
    if loop_name == "asyncio":
        pytest.skip("asyncio 3.11's wait() waits for every pipe to close: it hangs here")

    async def main():
        proc = await asyncio.create_subprocess_shell(
            "sleep 60 & echo $!", stdin=PIPE, stdout=subprocess.PIPE)
        # the grandchild holds stdin (and stdout until we kill it)
        grandchild = int(await proc.stdout.readline())
        try:
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            os.kill(grandchild, signal.SIGKILL)
        proc.stdin.close()
        assert await proc.stdout.read() == b""

    run(main)


# --------------------------------------------------------------------------- kbloop-only

def test_no_thread_per_child(kb_run):
    async def main():
        threads = threading.active_count()
        procs = [await py("import sys; sys.stdin.read()", stdin=PIPE) for _ in range(10)]
        assert threading.active_count() == threads
        assert not [t for t in threading.enumerate() if "waitpid" in t.name]
        for p in procs:
            p.stdin.close()
        assert await asyncio.gather(*[p.wait() for p in procs]) == [0] * 10
        assert threading.active_count() == threads

    kb_run(main)


def test_pidfd_is_watched_then_closed(kb_run):
    before = pidfds()       # another test's loop may have left one (asyncio 3.12+ does)

    async def main():
        loop = asyncio.get_running_loop()
        proc = await py("import sys; sys.stdin.read()", stdin=PIPE)
        watched = dict(loop._child_pidfds)
        assert len(watched) == 1
        (pidfd, transp), = watched.items()
        assert transp.get_pid() == proc.pid
        assert os.readlink(f"/proc/self/fd/{pidfd}") == "anon_inode:[pidfd]"
        proc.stdin.close()
        assert await proc.wait() == 0
        assert not loop._child_pidfds
        assert not pidfds() - before

    kb_run(main)


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM])
def test_fallback_without_pidfd_open(kb_run, monkeypatch, err):
    def no_pidfd(pid, flags=0):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(kbcore.os, "pidfd_open", no_pidfd)

    async def main():
        proc = await py("import sys; print(sys.stdin.read()); sys.exit(6)",
                        stdin=PIPE, stdout=PIPE)
        out, _ = await proc.communicate(b"fallback")
        assert out == b"fallback\n" and proc.returncode == 6

    kb_run(main)
