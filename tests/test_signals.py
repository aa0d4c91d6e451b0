"""Signal handlers: loop.add_signal_handler / remove_signal_handler.

Parity tests (asyncio is the control): the same assertions hold on both loops.  Ctrl-C with no
add_signal_handler (KeyboardInterrupt out of kbloop.run) is covered in test_core.py.
"""
import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest

from procutil import subprocess_env

GRACEFUL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts",
                        "unix_graceful.py")


def _kill_self(sig=signal.SIGUSR1):
    os.kill(os.getpid(), sig)


def _wakeup_fd_now():
    """The current wakeup fd, without changing it."""
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    return fd


def test_handler_runs_with_args(run):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1,
                                lambda *a: fut.done() or fut.set_result(a), "a", 2)
        try:
            _kill_self()
            assert await asyncio.wait_for(fut, 10) == ("a", 2)
        finally:
            assert loop.remove_signal_handler(signal.SIGUSR1) is True
        assert loop.remove_signal_handler(signal.SIGUSR1) is False
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    run(main)


def test_signal_from_another_thread_wakes_an_idle_loop(run):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR2, fut.set_result, "woken")
        timer = threading.Timer(0.05, _kill_self, (signal.SIGUSR2,))
        timer.start()
        try:
            # no timer and nothing ready: the loop blocks until the signal arrives
            assert await fut == "woken"
        finally:
            timer.join()
            loop.remove_signal_handler(signal.SIGUSR2)

    run(main)


def test_handler_replaced_and_remove_from_inside_handler(run):
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        fut = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, calls.append, "first")

        def second():
            calls.append("second")
            fut.set_result(loop.remove_signal_handler(signal.SIGUSR1))

        loop.add_signal_handler(signal.SIGUSR1, second)
        _kill_self()
        assert await asyncio.wait_for(fut, 10) is True
        assert calls == ["second"]
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    run(main)


def test_remove_restores_default_handlers(run):
    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler,
                                                       signal.SIG_DFL)
        assert _wakeup_fd_now() != -1
        assert loop.remove_signal_handler(signal.SIGINT) is True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert _wakeup_fd_now() != -1           # SIGUSR1 still has a handler
        assert loop.remove_signal_handler(signal.SIGUSR1) is True
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        assert _wakeup_fd_now() == -1           # the last one gone: no wakeup fd

    run(main)


def test_invalid_signals(run):
    async def main():
        loop = asyncio.get_running_loop()
        for sig in (0, -1, 1000, signal.NSIG):
            with pytest.raises(ValueError, match="invalid signal number"):
                loop.add_signal_handler(sig, lambda: None)
            with pytest.raises(ValueError, match="invalid signal number"):
                loop.remove_signal_handler(sig)
        with pytest.raises(TypeError, match="sig must be an int"):
            loop.add_signal_handler("SIGUSR1", lambda: None)
        with pytest.raises(TypeError, match="sig must be an int"):
            loop.remove_signal_handler(None)

    run(main)


def test_coroutine_callback_is_a_type_error(run):
    async def handler():
        pass

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError, match="coroutines cannot be used"):
            loop.add_signal_handler(signal.SIGUSR1, handler)
        coro = handler()
        try:
            with pytest.raises(TypeError, match="coroutines cannot be used"):
                loop.add_signal_handler(signal.SIGUSR1, coro)
        finally:
            coro.close()
        assert loop.remove_signal_handler(signal.SIGUSR1) is False
        assert _wakeup_fd_now() == -1

    run(main)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_uncatchable_signal_is_a_runtime_error(run, sig, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(RuntimeError, match=f"sig {int(sig)} cannot be caught"):
            loop.add_signal_handler(sig, lambda: None)
        assert loop.remove_signal_handler(sig) is False
        assert _wakeup_fd_now() == -1

    run(main)


def test_handler_exception_goes_to_the_exception_handler(run):
    async def main():
        loop = asyncio.get_running_loop()
        seen = loop.create_future()
        loop.set_exception_handler(lambda lp, ctx: seen.done() or seen.set_result(ctx))

        def boom():
            raise ZeroDivisionError("in handler")

        loop.add_signal_handler(signal.SIGUSR1, boom)
        try:
            _kill_self()
            ctx = await asyncio.wait_for(seen, 10)
            assert isinstance(ctx["exception"], ZeroDivisionError)
            # the loop goes on: a second signal still runs the handler
            seen2 = loop.create_future()
            loop.add_signal_handler(signal.SIGUSR1, seen2.set_result, "again")
            _kill_self()
            assert await asyncio.wait_for(seen2, 10) == "again"
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    run(main)


# asyncio's self-pipe is a socketpair set without warn_on_full_buffer=False: its full buffer
# makes Python report the dropped bytes.  Harmless, and the control only.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_signal_storm(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        first = loop.create_future()

        def handler():
            calls.append(1)
            if not first.done():
                first.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, handler)
        try:
            for _ in range(1000):
                _kill_self()
            await asyncio.wait_for(first, 10)
            for _ in range(5):
                await asyncio.sleep(0)
            n = len(calls)
            assert 1 <= n <= 1000
            # still healthy: callbacks, timers and one more signal
            assert await asyncio.wait_for(loop.run_in_executor(None, sum, [1, 2]), 10) == 3
            await asyncio.sleep(0.01)
            last = loop.create_future()
            loop.add_signal_handler(signal.SIGUSR1, last.set_result, "after storm")
            _kill_self()
            assert await asyncio.wait_for(last, 10) == "after storm"
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    run(main)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_signal_storm_from_a_thread(run):
    # The signals arrive while the loop sleeps in its wait, not between its own bytecodes.
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        done = loop.create_future()

        def handler():
            calls.append(1)

        loop.add_signal_handler(signal.SIGUSR2, handler)
        loop.add_signal_handler(signal.SIGUSR1, lambda: done.done() or done.set_result(None))

        def storm():
            for _ in range(500):
                _kill_self(signal.SIGUSR2)
            _kill_self(signal.SIGUSR1)

        t = threading.Thread(target=storm)
        t.start()
        try:
            await asyncio.wait_for(done, 20)
            for _ in range(5):
                await asyncio.sleep(0)
            assert len(calls) >= 1
        finally:
            t.join()
            loop.remove_signal_handler(signal.SIGUSR1)
            loop.remove_signal_handler(signal.SIGUSR2)

    run(main)


def test_add_signal_handler_outside_main_thread(loop_factory, no_fd_leak):
    result = {}

    def in_thread():
        loop = loop_factory()
        try:
            try:
                loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            except RuntimeError as exc:
                result["error"] = exc
            result["removed"] = loop.remove_signal_handler(signal.SIGUSR1)
        finally:
            loop.close()

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(30)
    assert isinstance(result.get("error"), RuntimeError)
    assert "main thread" in str(result["error"])
    assert result["removed"] is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_close_removes_handlers(loop_factory, no_fd_leak):
    loop = loop_factory()
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        assert _wakeup_fd_now() != -1
    finally:
        loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert _wakeup_fd_now() == -1
    with pytest.raises(RuntimeError, match="closed"):
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_handler_cycles_leak_no_fds(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        for i in range(20):
            fut = loop.create_future()
            loop.add_signal_handler(signal.SIGUSR1, fut.set_result, i)
            _kill_self()
            assert await asyncio.wait_for(fut, 10) == i
            assert loop.remove_signal_handler(signal.SIGUSR1) is True

    run(main)


def test_handle_is_cancelled_handler_is_dropped(run):
    # A handler whose Handle was cancelled is removed when its signal arrives (asyncio's
    # _handle_signal does the same).
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        loop.add_signal_handler(signal.SIGUSR1, calls.append, 1)
        loop.add_signal_handler(signal.SIGUSR2, calls.append, 2)
        fut = loop.create_future()
        loop.add_signal_handler(signal.SIGHUP, fut.set_result, None)
        try:
            loop._signal_handlers[signal.SIGUSR1].cancel()
            _kill_self(signal.SIGUSR1)
            _kill_self(signal.SIGUSR2)
            _kill_self(signal.SIGHUP)
            await asyncio.wait_for(fut, 10)
            await asyncio.sleep(0)
            assert calls == [2]
            assert signal.SIGUSR1 not in loop._signal_handlers
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)
            loop.remove_signal_handler(signal.SIGHUP)

    run(main)


# --------------------------------------------------------------------------- whole programs

def _run_graceful(loop_name, sig):
    proc = subprocess.Popen([sys.executable, GRACEFUL, loop_name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env(), text=True)
    killer = threading.Timer(60, proc.kill)   # never hang the suite on a stuck child
    killer.start()
    try:
        first = proc.stdout.readline()
        assert first.startswith("ready"), (first, proc.stderr.read() if proc.poll() else "")
        assert first.split()[1] == ("Loop" if loop_name == "kbloop" else "_UnixSelectorEventLoop")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_program_sigterm_handler_shuts_down_gracefully(loop_name):
    rc, out, err = _run_graceful(loop_name, signal.SIGTERM)
    assert rc == 0, err
    assert out.split("\n")[:2] == ["graceful", "exited True"], (out, err)


def test_program_with_a_sigterm_handler_still_gets_keyboard_interrupt(loop_name):
    # SIGINT's byte lands in the wakeup fd too, with no handler there: asyncio.Runner's own
    # SIGINT handling must still cancel main() and raise KeyboardInterrupt.
    rc, out, err = _run_graceful(loop_name, signal.SIGINT)
    assert rc != 0
    assert "KeyboardInterrupt" in err
    assert "main cancelled" in out
    assert "graceful" not in out and "exited" not in out
