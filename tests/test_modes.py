"""kbloop's reactor modes: busy-poll (optionally pinned), SQPOLL, NAPI registration. The
transport tests also run in these modes (tests/conftest.py MODE_LOOPS); this file checks the
modes' own promises."""
import asyncio
import os

import pytest

import kbloop


async def _echo_roundtrips(n=200):
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(n):
        writer.write(b"%06d" % i)
        assert await reader.readexactly(6) == b"%06d" % i
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return asyncio.get_running_loop().stats()


def test_busy_poll_finds_completions_by_spinning():
    stats = kbloop.run(_echo_roundtrips(), busy_poll=True, spin_us=200)
    assert stats["mode"] == "busy_poll"
    assert stats["spin_hits"] > 0
    # completions were found in user space: far fewer sleeps in the kernel than polls
    assert stats["sleeps"] < stats["spin_hits"]


def test_default_mode_never_spins():
    stats = kbloop.run(_echo_roundtrips())
    assert stats["mode"] == "default"
    assert stats["spin_hits"] == 0 and stats["sleeps"] == 0


def test_pinned_loop_runs_on_its_cpu_and_restores_affinity():
    before = os.sched_getaffinity(0)
    cpu = max(before)

    async def where():
        return os.sched_getaffinity(0)

    inside = kbloop.run(where(), busy_poll=True, cpu=cpu)
    assert inside == {cpu}
    assert os.sched_getaffinity(0) == before


def test_sqpoll_ring_serves_traffic():
    stats = kbloop.run(_echo_roundtrips(), sqpoll=True, sq_idle_ms=10)
    assert stats["mode"] == "sqpoll"
    assert stats["completions"] > 0


def test_napi_registration():
    stats = kbloop.run(_echo_roundtrips(20), napi_busy_poll_us=50)
    assert stats["napi_busy_poll_us"] == 50


def test_modes_from_environment(monkeypatch):
    monkeypatch.setenv("KBLOOP_BUSY_POLL", "1")
    monkeypatch.setenv("KBLOOP_SPIN_US", "100")
    loop = kbloop.new_event_loop()
    try:
        assert loop.stats()["mode"] == "busy_poll"
    finally:
        loop.close()


@pytest.mark.parametrize("kwargs", [{"spin_us": -1}, {"cpu": 4096}])
def test_bad_mode_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        kbloop.new_event_loop(busy_poll=True, **kwargs)
