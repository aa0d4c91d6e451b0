"""Core event-loop behaviour.

Parity tests run on asyncio (the control) and on kbloop through the ``run`` / ``loop_factory``
fixtures with identical assertions; kbloop-only tests (io_uring counters, the ring fd) use
``kb_run`` or ``kbloop.new_event_loop`` directly.
"""
import asyncio
import concurrent.futures
import contextvars
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

import kbloop
from procutil import KBLOOP_ROOT, subprocess_env  # noqa: E402


VAR = contextvars.ContextVar("VAR", default="default")




@pytest.fixture
def loop(loop_factory):
    """A fresh, not running loop of the parametrised kind; closed afterwards."""
    lp = loop_factory()
    try:
        yield lp
    finally:
        if not lp.is_closed():
            if not lp.is_running():
                lp.run_until_complete(lp.shutdown_asyncgens())
                lp.run_until_complete(lp.shutdown_default_executor())
            lp.close()


def _noop():
    pass


def named_callback_for_repr():
    pass


# --------------------------------------------------------------------------- call_soon


def test_call_soon_runs_in_fifo_order_with_args(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        done = loop.create_future()
        for i in range(5):
            loop.call_soon(out.append, (i, "x"))
        loop.call_soon(lambda *a: out.append(a), 1, 2, 3)
        loop.call_soon(done.set_result, None)
        await done
        return out

    assert run(main) == [(0, "x"), (1, "x"), (2, "x"), (3, "x"), (4, "x"), (1, 2, 3)]


def test_call_soon_scheduled_from_callback_runs_after_already_queued(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        done = loop.create_future()

        def first():
            out.append("first")
            loop.call_soon(out.append, "nested")

        loop.call_soon(first)
        loop.call_soon(out.append, "second")
        loop.call_soon(lambda: loop.call_soon(done.set_result, None))
        await done
        return out

    assert run(main) == ["first", "second", "nested"]


def test_call_soon_honours_context_argument(run):
    async def main():
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        ctx.run(VAR.set, "in-ctx")
        out = []
        done = loop.create_future()
        loop.call_soon(lambda: out.append(VAR.get()), context=ctx)
        loop.call_soon(lambda: out.append(VAR.get()))
        loop.call_later(0.001, lambda: out.append(VAR.get()), context=ctx)
        loop.call_later(0.01, done.set_result, None)
        await done
        return out, VAR.get()

    out, outer = run(main)
    assert out == ["in-ctx", "default", "in-ctx"]
    assert outer == "default"


def test_callback_context_changes_do_not_leak_into_caller(run):
    async def main():
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        done = loop.create_future()
        loop.call_soon(VAR.set, "changed", context=ctx)
        loop.call_soon(done.set_result, None)
        await done
        return VAR.get(), ctx[VAR]

    assert run(main) == ("default", "changed")


# --------------------------------------------------------------------------- timers


def test_call_at_runs_in_deadline_order(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        done = loop.create_future()
        base = loop.time()
        for delay, tag in [(0.03, "c"), (0.01, "a"), (0.04, "d"), (0.02, "b")]:
            loop.call_at(base + delay, out.append, tag)
        loop.call_at(base + 0.05, done.set_result, None)
        await done
        return out

    assert run(main) == ["a", "b", "c", "d"]


def test_call_later_runs_in_delay_order_after_call_soon(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        done = loop.create_future()
        loop.call_later(0.03, out.append, 3)
        loop.call_later(0.01, out.append, 1)
        loop.call_later(0.02, out.append, 2)
        loop.call_soon(out.append, "soon")
        loop.call_later(0.05, done.set_result, None)
        await done
        return out

    assert run(main) == ["soon", 1, 2, 3]


def test_call_later_with_negative_delay_runs(run):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(-1, fut.set_result, "ran")
        return await fut

    assert run(main) == "ran"


def test_loop_time_is_monotonic_and_advances_with_sleep(run):
    async def main():
        loop = asyncio.get_running_loop()
        samples = [loop.time() for _ in range(1000)]
        t0 = loop.time()
        await asyncio.sleep(0.05)
        return samples, t0, loop.time()

    samples, t0, t1 = run(main)
    assert all(isinstance(s, float) for s in samples)
    assert samples == sorted(samples)
    assert t1 - t0 >= 0.04


def test_timer_handle_when(run):
    async def main():
        loop = asyncio.get_running_loop()
        at = loop.time() + 10
        h1 = loop.call_at(at, _noop)
        before = loop.time()
        h2 = loop.call_later(5, _noop)
        after = loop.time()
        res = (h1.when(), at, before + 5 <= h2.when() <= after + 5)
        h1.cancel()
        h2.cancel()
        return res + (h1.when(),)

    when, at, in_range, when_after_cancel = run(main)
    assert when == at
    assert in_range
    assert when_after_cancel == at


def test_timer_handles_compare_by_deadline(run):
    async def main():
        loop = asyncio.get_running_loop()
        t = loop.time()
        a = loop.call_at(t + 10, _noop)
        b = loop.call_at(t + 20, _noop)
        res = (a < b, b > a, a <= b, a != b)
        a.cancel()
        b.cancel()
        return res

    assert run(main) == (True, True, True, True)


# --------------------------------------------------------------------------- cancel


def test_cancelled_handle_never_runs(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        done = loop.create_future()
        h = loop.call_soon(out.append, "cancelled")
        loop.call_soon(out.append, "kept")
        h.cancel()
        loop.call_soon(done.set_result, None)
        await done
        await asyncio.sleep(0.01)
        return out, h.cancelled()

    out, cancelled = run(main)
    assert out == ["kept"]
    assert cancelled is True


def test_cancelled_timer_never_runs(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        t1 = loop.call_later(0.01, out.append, "t1")
        t2 = loop.call_later(0.02, out.append, "t2")
        t3 = loop.call_later(0.03, out.append, "t3")
        # a timer cancelled by an earlier timer just before it is due
        loop.call_later(0.015, t2.cancel)
        t3.cancel()
        await asyncio.sleep(0.06)
        return out, t1.cancelled(), t2.cancelled(), t3.cancelled()

    out, c1, c2, c3 = run(main)
    assert out == ["t1"]
    assert (c1, c2, c3) == (False, True, True)


def test_cancel_is_idempotent_and_handle_reports_cancelled(run):
    async def main():
        loop = asyncio.get_running_loop()
        h = loop.call_later(100, _noop)
        assert not h.cancelled()
        h.cancel()
        h.cancel()
        return h.cancelled()

    assert run(main) is True


def test_many_cancelled_timers_do_not_run(run):
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        handles = [loop.call_later(0.001 * (i % 10), out.append, i) for i in range(500)]
        for h in handles[::2]:
            h.cancel()
        await asyncio.sleep(0.05)
        return sorted(out)

    assert run(main) == list(range(1, 500, 2))


# --------------------------------------------------------------------------- threadsafe


def test_call_soon_threadsafe_wakes_idle_loop(run):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        started = threading.Event()

        def worker():
            started.wait()
            time.sleep(0.1)  # the loop is blocked waiting for I/O by now
            loop.call_soon_threadsafe(fut.set_result, threading.get_ident())

        t = threading.Thread(target=worker)
        t.start()
        started.set()
        try:
            return await fut, threading.get_ident(), t.ident
        finally:
            t.join()

    # run()'s 20 s timeout would fire if the wake-up were lost
    result, loop_thread, worker_thread = run(main, timeout=20)
    assert result == worker_thread
    assert result != loop_thread


@pytest.mark.timeout(30)
def test_call_soon_threadsafe_wakes_loop_with_no_timers_at_all(loop):
    # no wait_for, no timers: the loop blocks with an infinite timeout until the thread wakes it
    fut = loop.create_future()

    def worker():
        time.sleep(0.1)
        loop.call_soon_threadsafe(fut.set_result, "woken")

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert loop.run_until_complete(fut) == "woken"
    finally:
        t.join()


def test_call_soon_threadsafe_many_threads(run):
    async def main():
        loop = asyncio.get_running_loop()
        n_threads, per_thread = 4, 200
        got = []
        done = loop.create_future()

        def cb(item):
            got.append(item)
            if len(got) == n_threads * per_thread:
                done.set_result(None)

        def worker(k):
            for i in range(per_thread):
                loop.call_soon_threadsafe(cb, (k, i))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        await done
        for t in threads:
            t.join()
        return got

    got = run(main, timeout=30)
    assert len(got) == 800
    for k in range(4):
        assert [i for (kk, i) in got if kk == k] == list(range(200))


def test_call_soon_threadsafe_returns_handle(run):
    async def main():
        loop = asyncio.get_running_loop()
        h = loop.call_soon_threadsafe(_noop)
        h2 = loop.call_soon_threadsafe(_noop)
        h2.cancel()
        await asyncio.sleep(0)
        return h.cancelled(), h2.cancelled()

    assert run(main) == (False, True)


# --------------------------------------------------------------------------- run / stop


def test_stop_before_run_forever_runs_one_iteration(loop):
    out = []
    loop.call_soon(out.append, 1)
    loop.call_soon(lambda: loop.call_soon(out.append, "next-iteration"))
    loop.stop()
    loop.run_forever()
    assert out == [1]
    assert not loop.is_running()
    # the callback scheduled during that iteration runs on the next one
    loop.stop()
    loop.run_forever()
    assert out == [1, "next-iteration"]


def test_stop_from_callback_ends_run_forever(loop):
    out = []

    def cb():
        out.append(loop.is_running())
        loop.stop()

    loop.call_later(0.01, cb)
    loop.run_forever()
    assert out == [True]
    assert not loop.is_running()
    assert not loop.is_closed()


def test_run_forever_can_be_restarted(loop):
    out = []
    for i in range(3):
        loop.call_soon(out.append, i)
        loop.call_soon(loop.stop)
        loop.run_forever()
    assert out == [0, 1, 2]


def test_run_forever_while_running_raises(loop):
    async def main():
        coro = asyncio.sleep(0)
        try:
            with pytest.raises(RuntimeError, match="already running"):
                loop.run_until_complete(coro)
        finally:
            coro.close()
        # Last: asyncio 3.13.0's run_forever() runs its clean-up even when its set-up refused
        # to start, leaving the running loop marked as not running (a nested run after this
        # one would then really run, and hang).
        with pytest.raises(RuntimeError, match="already running"):
            loop.run_forever()
        return "ok"

    assert loop.run_until_complete(main()) == "ok"


def test_run_until_complete_with_future(loop):
    fut = loop.create_future()
    loop.call_later(0.01, fut.set_result, 42)
    assert loop.run_until_complete(fut) == 42


def test_run_until_complete_with_coroutine(loop):
    async def coro(x):
        await asyncio.sleep(0)
        return x * 2

    assert loop.run_until_complete(coro(21)) == 42


def test_run_until_complete_propagates_exception(loop):
    async def boom():
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        loop.run_until_complete(boom())


def test_run_until_complete_rejects_non_awaitable(loop):
    with pytest.raises(TypeError):
        loop.run_until_complete(42)


def test_is_running_and_is_closed(loop):
    assert not loop.is_running()
    assert not loop.is_closed()

    async def main():
        return loop.is_running(), asyncio.get_running_loop() is loop

    assert loop.run_until_complete(main()) == (True, True)
    assert not loop.is_running()
    loop.close()
    assert loop.is_closed()
    assert not loop.is_running()


def test_close_is_idempotent(loop_factory):
    lp = loop_factory()
    lp.close()
    lp.close()
    assert lp.is_closed()


def test_close_running_loop_raises(run):
    async def main():
        loop = asyncio.get_running_loop()
        try:
            loop.close()
        except RuntimeError as e:
            return str(e), loop.is_closed()
        return None, loop.is_closed()

    msg, closed = run(main)
    assert msg is not None and "running" in msg
    assert closed is False


@pytest.mark.parametrize(
    "call",
    [
        lambda lp: lp.call_soon(_noop),
        lambda lp: lp.call_later(1, _noop),
        lambda lp: lp.call_at(lp.time() + 1, _noop),
        lambda lp: lp.call_soon_threadsafe(_noop),
        lambda lp: lp.run_forever(),
        lambda lp: lp.run_in_executor(None, _noop),
    ],
    ids=["call_soon", "call_later", "call_at", "call_soon_threadsafe", "run_forever",
         "run_in_executor"],
)
def test_methods_after_close_raise(loop_factory, call):
    lp = loop_factory()
    lp.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        call(lp)


def test_run_until_complete_on_closed_loop_raises(loop_factory):
    lp = loop_factory()
    lp.close()

    async def coro():
        return 1

    c = coro()
    try:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            lp.run_until_complete(c)
    finally:
        c.close()


def test_create_task_on_closed_loop_raises(loop_factory):
    lp = loop_factory()
    lp.close()

    async def coro():
        return 1

    c = coro()
    try:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            lp.create_task(c)
    finally:
        c.close()


# --------------------------------------------------------------------------- futures / tasks


def test_create_future_is_bound_to_loop(run):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon(fut.set_result, "v")
        v = await fut
        return isinstance(fut, asyncio.Future), fut.get_loop() is loop, v

    assert run(main) == (True, True, "v")


def test_create_task_name_and_result(run):
    async def child():
        await asyncio.sleep(0)
        return asyncio.current_task().get_name()

    async def main():
        loop = asyncio.get_running_loop()
        t = loop.create_task(child(), name="my-task")
        t2 = asyncio.create_task(child())
        return t.get_name(), await t, t.get_loop() is loop, await t2

    name, inner, same_loop, auto_name = run(main)
    assert name == inner == "my-task"
    assert same_loop
    assert auto_name.startswith("Task-")


def test_create_task_context(run):
    async def child():
        v = VAR.get()
        VAR.set("set-in-child")
        return v

    async def main():
        ctx = contextvars.copy_context()
        ctx.run(VAR.set, "from-ctx")
        loop = asyncio.get_running_loop()
        r = await loop.create_task(child(), context=ctx)
        return r, ctx[VAR], VAR.get()

    assert run(main) == ("from-ctx", "set-in-child", "default")


def test_task_factory(run):
    async def main():
        loop = asyncio.get_running_loop()
        created = []

        def factory(lp, coro, **kwargs):
            t = asyncio.Task(coro, loop=lp, **kwargs)
            created.append(t)
            return t

        assert loop.get_task_factory() is None
        loop.set_task_factory(factory)
        got_factory = loop.get_task_factory()

        async def child():
            return 5

        t = loop.create_task(child())
        r = await t
        loop.set_task_factory(None)
        reset = loop.get_task_factory()
        t2 = loop.create_task(child())
        await t2
        return got_factory is factory, created == [t], r, reset, t2 in created

    assert run(main) == (True, True, 5, None, False)


def test_set_task_factory_rejects_non_callable(run):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError):
            loop.set_task_factory(42)
        return loop.get_task_factory()

    assert run(main) is None


# --------------------------------------------------------------------------- exception handler


def test_exception_in_callback_reaches_handler(run):
    async def main():
        loop = asyncio.get_running_loop()
        contexts = []
        done = loop.create_future()

        def handler(lp, context):
            contexts.append((lp, context))
            done.set_result(None)

        def bad_callback():
            raise ZeroDivisionError("bad")

        loop.set_exception_handler(handler)
        got = loop.get_exception_handler()
        h = loop.call_soon(bad_callback)
        await done
        loop.set_exception_handler(None)
        return loop, got is handler, contexts, h, loop.get_exception_handler()

    loop, got_ok, contexts, h, reset = run(main)
    assert got_ok
    assert reset is None
    assert len(contexts) == 1
    lp, ctx = contexts[0]
    assert lp is loop
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["handle"] is h
    assert ctx["message"].startswith("Exception in callback")
    assert "bad_callback" in ctx["message"]


def test_exception_in_callback_does_not_stop_loop(run):
    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda lp, ctx: None)
        out = []

        def bad():
            raise RuntimeError("x")

        loop.call_soon(bad)
        loop.call_soon(out.append, "after")
        await asyncio.sleep(0.01)
        return out

    assert run(main) == ["after"]


def test_call_exception_handler_uses_custom_handler(run):
    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
        loop.call_exception_handler({"message": "custom message", "extra": 1})
        return seen

    assert run(main) == [{"message": "custom message", "extra": 1}]


def test_set_exception_handler_rejects_non_callable(run):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError):
            loop.set_exception_handler("nope")
        return loop.get_exception_handler()

    assert run(main) is None


def test_default_exception_handler_logs(run, caplog):
    async def main():
        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.default_exception_handler(
                {"message": "boom-message", "exception": ValueError("val-err")})
        # without a custom handler, call_exception_handler goes to the default one
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_exception_handler({"message": "second-message"})

    run(main)
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any("boom-message" in m for m in msgs)
    assert any("second-message" in m for m in msgs)
    rec = next(r for r in caplog.records if "boom-message" in r.getMessage())
    assert rec.levelno == logging.ERROR
    assert rec.exc_info and isinstance(rec.exc_info[1], ValueError)


def test_unhandled_callback_exception_logged_by_default(run, caplog):
    def failing_cb_for_log():
        raise KeyError("logged")

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_soon(failing_cb_for_log)
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run(main)
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any(m.startswith("Exception in callback") and "failing_cb_for_log" in m
               for m in msgs), msgs


# --------------------------------------------------------------------------- debug mode


def test_debug_mode_flag(run):
    async def main():
        return asyncio.get_running_loop().get_debug()

    assert run(main, debug=True) is True
    assert run(main, debug=False) is False


def test_debug_slow_callback_warning(run, caplog):
    def slow_callback_for_test():
        time.sleep(0.05)

    async def main():
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.01
        loop.call_soon(slow_callback_for_test)
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(main, debug=True)
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any("Executing" in m and "slow_callback_for_test" in m for m in msgs), msgs


def test_no_slow_callback_warning_without_debug(run, caplog):
    def slow_callback_for_test():
        time.sleep(0.05)

    async def main():
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.01
        loop.call_soon(slow_callback_for_test)
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(main, debug=False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not any("slow_callback_for_test" in m for m in msgs), msgs


def test_debug_call_soon_from_other_thread_raises(run):
    async def main():
        loop = asyncio.get_running_loop()
        errors = []

        def worker():
            try:
                loop.call_soon(_noop)
            except RuntimeError as e:
                errors.append(str(e))

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        return errors

    errors = run(main, debug=True)
    assert len(errors) == 1
    assert "thread" in errors[0].lower()


# --------------------------------------------------------------------------- invalid args


def test_call_soon_non_callable_raises_type_error(run):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError):
            loop.call_soon(42)
        with pytest.raises(TypeError):
            loop.call_later(0.01, "not callable")
        with pytest.raises(TypeError):
            loop.call_soon_threadsafe(None)
        return True

    assert run(main, debug=True)


def test_call_soon_coroutine_function_raises_type_error(run):
    async def coro_fn():
        pass

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError, match="coroutine"):
            loop.call_soon(coro_fn)
        with pytest.raises(TypeError, match="coroutine"):
            loop.call_later(0.01, coro_fn)
        return True

    assert run(main, debug=True)


def test_call_later_non_number_delay_raises_type_error(run):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError):
            loop.call_later("1", _noop)
        with pytest.raises(TypeError):
            loop.call_later(None, _noop)
        return True

    assert run(main)


# --------------------------------------------------------------------------- handles


def test_handles_are_weakrefable_and_repr_names_callback(run):
    async def main():
        loop = asyncio.get_running_loop()
        h = loop.call_soon(named_callback_for_repr)
        th = loop.call_later(10, named_callback_for_repr)
        r1, r2 = weakref.ref(h), weakref.ref(th)
        res = (r1() is h, r2() is th, repr(h), repr(th))
        th.cancel()
        await asyncio.sleep(0)
        return res

    ok1, ok2, rh, rth = run(main)
    assert ok1 and ok2
    assert "named_callback_for_repr" in rh
    assert "named_callback_for_repr" in rth


# --------------------------------------------------------------------------- async generators


def test_shutdown_asyncgens_finalizes_async_generator(loop):
    events = []

    async def agen():
        try:
            events.append("started")
            yield 1
            yield 2
        finally:
            events.append("finalized")

    gens = []

    async def main():
        g = agen()
        gens.append(g)  # keep it alive, suspended at the first yield
        return await g.__anext__()

    assert loop.run_until_complete(main()) == 1
    assert events == ["started"]
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert events == ["started", "finalized"]


def test_runner_close_finalizes_async_generator(run):
    events = []
    gens = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            events.append("finalized")

    async def main():
        g = agen()
        gens.append(g)
        return await g.__anext__()

    assert run(main) == 1
    assert events == ["finalized"]


# --------------------------------------------------------------------------- executors


def test_run_in_executor_default_thread_name(run, loop_name):
    prefix = {"asyncio": "asyncio", "kbloop": "kbloop"}[loop_name]

    async def main():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda a, b: (threading.current_thread().name,
                                                                a + b), 2, 3)

    name, value = run(main)
    assert value == 5
    assert name.startswith(prefix), name


def test_run_in_executor_propagates_exception(run):
    def fail():
        raise LookupError("from-thread")

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(LookupError, match="from-thread"):
            await loop.run_in_executor(None, fail)
        return True

    assert run(main)


def test_set_default_executor(run):
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="custom-exec")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(executor)
        return await loop.run_in_executor(None, lambda: threading.current_thread().name)

    try:
        assert run(main).startswith("custom-exec")
    finally:
        executor.shutdown(wait=True)


def test_set_default_executor_rejects_non_thread_pool(run):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(TypeError):
            loop.set_default_executor(object())
        return True

    assert run(main)


def test_shutdown_default_executor(run):
    async def main():
        loop = asyncio.get_running_loop()
        thread = await loop.run_in_executor(None, threading.current_thread)
        assert thread.is_alive()
        await loop.shutdown_default_executor()
        alive_after = thread.is_alive()
        with pytest.raises(RuntimeError, match="shutdown"):
            loop.run_in_executor(None, _noop)
        return alive_after

    assert run(main) is False


def test_shutdown_default_executor_without_executor(run):
    async def main():
        await asyncio.get_running_loop().shutdown_default_executor()
        return True

    assert run(main)


# --------------------------------------------------------------------------- DNS


def test_getaddrinfo_matches_socket_module(run):
    async def main():
        loop = asyncio.get_running_loop()
        return (await loop.getaddrinfo("localhost", 80),
                await loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM))

    plain, stream = run(main)
    assert sorted(plain) == sorted(socket.getaddrinfo("localhost", 80))
    assert sorted(stream) == sorted(socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM))


def test_getaddrinfo_numeric_matches_socket_module(run):
    async def main():
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo("127.0.0.1", 8080, family=socket.AF_INET)

    expected = socket.getaddrinfo("127.0.0.1", 8080, family=socket.AF_INET)
    assert sorted(run(main)) == sorted(expected)


def test_getnameinfo_matches_socket_module(run):
    async def main():
        loop = asyncio.get_running_loop()
        return await loop.getnameinfo(("127.0.0.1", 80))

    assert run(main) == socket.getnameinfo(("127.0.0.1", 80), 0)


def test_getaddrinfo_error_is_gaierror(run):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo("no-such-host.invalid", 80)
        return True

    assert run(main)


# --------------------------------------------------------------------------- Ctrl-C


CTRL_C_PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    import kbloop

    async def main():
        try:
            print("ready", flush=True)
            if sys.argv[2] == "sleep":
                await asyncio.sleep(60)
            else:  # idle loop, no timer at all
                await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            print("main saw CancelledError", flush=True)
            raise
        finally:
            print("finally ran", flush=True)

    if sys.argv[1] == "kbloop":
        kbloop.run(main())
    else:
        asyncio.run(main())
    print("not reached", flush=True)
    """
)


@pytest.mark.parametrize("wait", ["sleep", "future"])
def test_ctrl_c_cancels_main_and_raises_keyboard_interrupt(loop_name, tmp_path, wait):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_PROGRAM)
    proc = subprocess.Popen(
        [sys.executable, str(script), loop_name, wait],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), text=True,
        # Python installs its KeyboardInterrupt handler only where SIGINT is not ignored, and a
        # job started in the background of a non-interactive shell (CI) inherits it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    killer = threading.Timer(60, proc.kill)  # never hang the suite on a stuck child
    killer.start()
    try:
        first = proc.stdout.readline()
        assert first.strip() == "ready", (first, proc.stderr.read() if proc.poll() else "")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert "main saw CancelledError" in out
    assert "finally ran" in out
    assert "not reached" not in out


# --------------------------------------------------------------------------- kbloop-only: io_uring counters and ring


STATS_KEYS = ("submissions", "completions", "enters", "iterations", "bufs_total", "bufs_out")


def test_kbloop_loop_types():
    lp = kbloop.new_event_loop(backend="io_uring")
    try:
        assert isinstance(lp, kbloop.Loop)
        assert isinstance(lp, asyncio.AbstractEventLoop)
        assert type(lp).__module__.startswith("kbloop")
    finally:
        lp.close()


def test_kbloop_stats_keys_are_ints():
    lp = kbloop.new_event_loop(backend="io_uring")
    try:
        st = lp.stats()
        assert isinstance(st, dict)
        for k in STATS_KEYS:
            assert k in st, k
            assert isinstance(st[k], int) and st[k] >= 0, (k, st[k])
    finally:
        lp.close()


def test_kbloop_stats_count_iterations_for_sleep0_loop(kb_run):
    async def main():
        loop = asyncio.get_running_loop()
        before = loop.stats()
        for _ in range(100):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)  # a real timer wait
        return before, loop.stats()

    before, after = kb_run(main)
    assert after["iterations"] - before["iterations"] >= 100
    assert after["submissions"] >= before["submissions"]
    assert after["completions"] >= before["completions"]


async def _tcp_echo_with_stats(n=20):
    """Echo n messages over loopback; return (echoed, stats before, stats after)."""
    loop = asyncio.get_running_loop()
    handler_done = loop.create_future()

    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        handler_done.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    before = loop.stats()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    echoed = []
    for i in range(n):
        msg = f"message-{i}".encode()
        writer.write(msg)
        echoed.append(await reader.readexactly(len(msg)))
    writer.close()
    await writer.wait_closed()
    await handler_done
    server.close()
    await server.wait_closed()
    return echoed, before, loop.stats()


def test_kbloop_stats_count_io_for_tcp_echo(kb_run):
    echoed, before, after = kb_run(_tcp_echo_with_stats)
    assert echoed == [f"message-{i}".encode() for i in range(20)]
    assert after["submissions"] > before["submissions"]
    assert after["completions"] > before["completions"]
    assert after["iterations"] > before["iterations"]
    assert 0 <= after["bufs_out"] <= after["bufs_total"]


def test_kbloop_stats_enters_at_most_iterations(kb_run):
    async def main():
        for _ in range(50):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return await _tcp_echo_with_stats()

    _, _, after = kb_run(main)
    # One io_uring_enter per iteration at most; the only other enters are the synchronous
    # submits that cancel a listener/pending op before its fd is closed (counted apart).
    assert after["enters"] - after["cancel_enters"] <= after["iterations"], after
    assert after["cancel_enters"] <= 2, after


def _uring_fds():
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link == "anon_inode:[io_uring]":
            fds[int(fd)] = os.stat(f"/proc/self/fd/{fd}").st_ino
    return fds


def test_kbloop_owns_an_io_uring_fd_until_closed():
    before = _uring_fds()
    lp = kbloop.new_event_loop(backend="io_uring")
    try:
        lp.run_until_complete(asyncio.sleep(0))
        during = _uring_fds()
        new = {fd: ino for fd, ino in during.items() if before.get(fd) != ino}
        assert new, "no anon_inode:[io_uring] fd while a kbloop loop is open"
        for fd in new:
            info = open(f"/proc/self/fdinfo/{fd}").read()
            assert "SqMask" in info or "SqHead" in info, info
    finally:
        lp.close()
    after = _uring_fds()
    for fd, ino in new.items():
        assert after.get(fd) != ino, f"io_uring fd {fd} still open after loop.close()"


def test_kbloop_two_loops_have_distinct_rings():
    before = set(_uring_fds().items())
    a = kbloop.new_event_loop(backend="io_uring")
    b = kbloop.new_event_loop(backend="io_uring")
    try:
        a.run_until_complete(asyncio.sleep(0))
        b.run_until_complete(asyncio.sleep(0))
        new = set(_uring_fds().items()) - before
        assert len(new) >= 2
    finally:
        a.close()
        b.close()
    assert not (set(_uring_fds().items()) & new)


# --------------------------------------------------------------------------- resources


def test_loop_close_releases_all_fds(loop_factory, no_fd_leak):
    async def main():
        done = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            writer.write(await reader.readexactly(3))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            done.set_result(None)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"abc")
        data = await reader.readexactly(3)
        writer.close()
        await writer.wait_closed()
        await done
        server.close()
        await server.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, _noop)
        return data

    for _ in range(3):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            assert runner.run(main()) == b"abc"
