"""Heavier parity tests: many short connections, and a large bidirectional transfer with flow
control exercised on both sides."""
import asyncio
import hashlib
import os
import resource

import pytest

from netutil import fd_count

LOCAL = "127.0.0.1"


@pytest.fixture
def nofile_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class CountingEcho(asyncio.Protocol):
    def __init__(self, counters):
        self.counters = counters

    def connection_made(self, transport):
        self.transport = transport
        self.counters["made"] += 1

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.close()
        return True

    def connection_lost(self, exc):
        self.counters["lost"] += 1
        if exc is not None:
            self.counters["errors"].append(exc)
        if self.counters["lost"] == self.counters["target"]:
            self.counters["all_lost"].set_result(None)


N_CONNECTIONS = 10_000
BATCH = 200


def test_10k_connections_no_leak(run, loop_name, nofile_limit, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        counters = {"made": 0, "lost": 0, "errors": [], "target": N_CONNECTIONS,
                    "all_lost": loop.create_future()}
        server = await loop.create_server(lambda: CountingEcho(counters), LOCAL, 0,
                                          backlog=1024)
        addr = server.sockets[0].getsockname()
        fds_before = fd_count()

        async def one(i):
            reader, writer = await asyncio.open_connection(*addr)
            msg = b"%08d" % i
            writer.write(msg)
            echoed = await reader.readexactly(len(msg))
            writer.write_eof()
            rest = await reader.read()
            writer.close()
            await writer.wait_closed()
            return echoed == msg and rest == b""

        try:
            ok = 0
            for start in range(0, N_CONNECTIONS, BATCH):
                results = await asyncio.gather(*(one(i) for i in range(start, start + BATCH)))
                ok += sum(results)
            await counters["all_lost"]
            # A loop may release the descriptor a little after connection_lost (e.g. an
            # asynchronous close); wait (bounded) for it, then require none left over.
            for _ in range(1000):
                if fd_count() <= fds_before:
                    break
                await asyncio.sleep(0.01)

            assert ok == N_CONNECTIONS
            assert counters["made"] == N_CONNECTIONS
            assert counters["errors"] == []
            assert fd_count() <= fds_before
            if loop_name == "kbloop":
                stats = loop.stats()
                assert stats["bufs_out"] == 0, stats
        finally:
            server.close()
            await server.wait_closed()
        for _ in range(1000):
            if fd_count() < fds_before:
                break
            await asyncio.sleep(0.01)
        assert fd_count() < fds_before  # the listening socket is gone too

    run(main, timeout=120)


# ---------------------------------------------------------------- 64 MiB both ways

SIZE = 64 * 1024 * 1024
CHUNK = 256 * 1024


class Pump(asyncio.Protocol):
    """Sends ``payload`` while honouring pause_writing/resume_writing, hashes what it receives,
    and pauses/resumes its own reading every few reads."""

    def __init__(self, payload, expect):
        self.loop = asyncio.get_running_loop()
        self.payload = memoryview(payload)
        self.sent = 0
        self.expect = expect
        self.received = 0
        self.hash = hashlib.sha256()
        self.reads = 0
        self.writing_paused = False
        self.pause_writing_calls = 0
        self.resume_writing_calls = 0
        self.pause_reading_calls = 0
        self.write_while_paused = 0
        self.data_while_paused = 0
        self.reading_paused = False
        self.done = self.loop.create_future()
        self.lost = self.loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=512 * 1024)
        self.loop.call_soon(self._pump)

    def _pump(self):
        while not self.writing_paused and self.sent < len(self.payload):
            chunk = self.payload[self.sent:self.sent + CHUNK]
            self.sent += len(chunk)
            self.transport.write(chunk)
        self._check_done()

    def pause_writing(self):
        assert not self.writing_paused
        self.writing_paused = True
        self.pause_writing_calls += 1

    def resume_writing(self):
        assert self.writing_paused
        self.writing_paused = False
        self.resume_writing_calls += 1
        self.loop.call_soon(self._pump)

    def data_received(self, data):
        if self.reading_paused:
            self.data_while_paused += 1
        self.hash.update(data)
        self.received += len(data)
        self.reads += 1
        if self.reads % 8 == 0 and not self.transport.is_closing():
            self.transport.pause_reading()
            self.reading_paused = True
            self.pause_reading_calls += 1
            self.loop.call_later(0.001, self._resume_reading)
        self._check_done()

    def _resume_reading(self):
        if not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    def _check_done(self):
        if (self.received == self.expect and self.sent == len(self.payload)
                and not self.done.done()):
            self.done.set_result(None)

    def connection_lost(self, exc):
        self.lost.set_result(exc)
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError(
                f"lost early: received {self.received}/{self.expect}"))


def test_64mib_both_directions_with_flow_control(run):
    up = os.urandom(SIZE)     # client -> server
    down = os.urandom(SIZE)   # server -> client

    async def main():
        loop = asyncio.get_running_loop()
        servers = []

        def server_factory():
            p = Pump(down, SIZE)
            servers.append(p)
            return p

        server = await loop.create_server(server_factory, LOCAL, 0)
        try:
            ct, cp = await loop.create_connection(lambda: Pump(up, SIZE),
                                                  *server.sockets[0].getsockname())
            while not servers:
                await asyncio.sleep(0.001)
            sp = servers[0]
            await asyncio.gather(cp.done, sp.done)

            assert sp.received == SIZE and cp.received == SIZE
            assert sp.hash.digest() == hashlib.sha256(up).digest()
            assert cp.hash.digest() == hashlib.sha256(down).digest()
            assert cp.pause_writing_calls + sp.pause_writing_calls >= 1
            for p in (cp, sp):
                assert p.pause_reading_calls >= 1
                assert p.data_while_paused == 0
                assert p.resume_writing_calls == p.pause_writing_calls - p.writing_paused
            ct.close()
            await cp.lost
            await sp.lost
        finally:
            server.close()
            await server.wait_closed()

    run(main, timeout=120)
