"""Loop options, and loops run across threads. A loop created in one thread may be run in another and closed from the first (asyncio
allows it; kbloop's SINGLE_ISSUER ring is bound to the first thread that runs it)."""
import asyncio
import threading

import pytest


def test_create_in_main_run_in_worker_close_in_main(loop_factory):
    loop = loop_factory()
    result = []

    async def work():
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
        server.close()
        return threading.current_thread().name

    worker = threading.Thread(target=lambda: result.append(loop.run_until_complete(work())),
                              name="loop-runner")
    worker.start()
    worker.join(30)
    assert result == ["loop-runner"]
    loop.close()
    assert loop.is_closed()


def test_kbloop_running_from_a_second_thread_is_a_clear_error():
    import kbloop

    loop = kbloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))   # binds the ring to this thread
        errors = []

        def run_elsewhere():
            coro = asyncio.sleep(0)
            try:
                loop.run_until_complete(coro)
            except RuntimeError as exc:
                errors.append(str(exc))
            finally:
                coro.close()

        t = threading.Thread(target=run_elsewhere)
        t.start()
        t.join(30)
        assert errors and "SINGLE_ISSUER" in errors[0]
    finally:
        loop.close()


@pytest.mark.parametrize("single_issuer", [False])
def test_kbloop_without_single_issuer_runs_from_any_thread(single_issuer):
    import kbloop

    loop = kbloop.new_event_loop(single_issuer=single_issuer)
    try:
        assert loop.run_until_complete(asyncio.sleep(0, "main")) == "main"
        out = []
        t = threading.Thread(target=lambda: out.append(
            loop.run_until_complete(asyncio.sleep(0, "worker"))))
        t.start()
        t.join(30)
        assert out == ["worker"]
    finally:
        loop.close()


@pytest.mark.parametrize("kwargs", [
    {"recv_buffers": 100}, {"recv_buffers": 0}, {"recv_buffer_size": 1000},
    {"ring_entries": 0}, {"ring_entries": 1 << 20},
])
def test_kbloop_bad_loop_options_raise_value_error(kwargs, no_fd_leak):
    import kbloop

    with pytest.raises(ValueError):
        kbloop.new_event_loop(**kwargs)


def test_kbloop_loop_options_from_environment(monkeypatch):
    import kbloop

    monkeypatch.setenv("KBLOOP_RECV_BUFFERS", "64")
    monkeypatch.setenv("KBLOOP_RECV_BUFFER_SIZE", "8192")
    loop = kbloop.new_event_loop()
    try:
        stats = loop.stats()
        assert (stats["bufs_total"], stats["buf_size"]) == (64, 8192)
    finally:
        loop.close()
    monkeypatch.setenv("KBLOOP_RECV_BUFFERS", "lots")
    with pytest.raises(ValueError, match="KBLOOP_RECV_BUFFERS"):
        kbloop.new_event_loop()
