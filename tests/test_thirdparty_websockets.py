"""The ``websockets`` library (unchanged, its asyncio implementation): server and client both on
the loop under test, over TCP and a unix socket. asyncio is the control; identical assertions."""
import asyncio
import hashlib
import os
import tempfile

import pytest

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect, unix_connect  # noqa: E402
from websockets.asyncio.server import serve, unix_serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

MAX_SIZE = 8 * 1024 * 1024


class Handler:
    """Server side: echo (text as-is, binary as-is), and a few special paths."""

    def __init__(self):
        self.closed = []  # (path, close code, close reason) seen by the server

    async def __call__(self, ws):
        path = ws.request.path
        try:
            if path == "/bye":
                await ws.send("closing")
                await ws.close(4001, "bye")
            elif path == "/digest":
                msg = await ws.recv()
                await ws.send(hashlib.sha256(msg).hexdigest())
                await ws.wait_closed()
            elif path == "/loop":
                await ws.send(type(asyncio.get_running_loop()).__module__)
                await ws.wait_closed()
            else:
                async for msg in ws:
                    await ws.send(msg)
        finally:
            await ws.wait_closed()
            self.closed.append((path, ws.close_code, ws.close_reason))


async def _serve(handler, **kw):
    server = await serve(handler, "127.0.0.1", 0, max_size=MAX_SIZE, **kw)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}"


async def _wait_for(pred, timeout=5):
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


def test_server_runs_on_loop_under_test(run, loop_name):
    async def main():
        h = Handler()
        server, url = await _serve(h)
        async with server:
            async with connect(url + "/loop") as ws:
                return await ws.recv()

    assert run(main).startswith(loop_name)


@pytest.mark.parametrize("compression", ["deflate", None], ids=["deflate", "nocompress"])
def test_4mib_binary_round_trip(run, compression):
    payload = os.urandom(4 * 1024 * 1024)

    async def main():
        h = Handler()
        server, url = await _serve(h, compression=compression)
        async with server:
            async with connect(url + "/echo", max_size=MAX_SIZE,
                               compression=compression) as ws:
                await ws.send(payload)
                echoed = await ws.recv()
            async with connect(url + "/digest", max_size=MAX_SIZE,
                               compression=compression) as ws:
                await ws.send(payload)
                digest = await ws.recv()
            await _wait_for(lambda: len(h.closed) == 2)
            return echoed, digest

    echoed, digest = run(main)
    assert type(echoed) is bytes
    assert echoed == payload
    assert digest == hashlib.sha256(payload).hexdigest()


def test_many_small_messages(run):
    n = 3000

    async def main():
        h = Handler()
        server, url = await _serve(h)
        async with server:
            async with connect(url + "/echo") as ws:
                async def sender():
                    for i in range(n):
                        await ws.send(f"msg-{i}" if i % 2 else f"msg-{i}".encode())
                send_task = asyncio.create_task(sender())
                got = [await ws.recv() for _ in range(n)]
                await send_task
                # and a few strict request/response round trips
                for i in range(50):
                    await ws.send(str(i))
                    assert await ws.recv() == str(i)
            return got

    got = run(main)
    assert got == [f"msg-{i}" if i % 2 else f"msg-{i}".encode() for i in range(n)]


def test_ping_pong(run):
    async def main():
        h = Handler()
        # keepalive pings from the server too (short interval), in addition to explicit ones
        server, url = await _serve(h, ping_interval=0.05, ping_timeout=5)
        async with server:
            async with connect(url + "/echo", ping_interval=None) as ws:
                latencies = []
                for i in range(5):
                    pong = await ws.ping(f"p{i}".encode())
                    latencies.append(await asyncio.wait_for(pong, 5))
                # concurrent pings with distinct payloads
                pongs = [await ws.ping(f"c{i}".encode()) for i in range(10)]
                await asyncio.wait_for(asyncio.gather(*pongs), 5)
                await asyncio.sleep(0.3)  # let the server's keepalive pings flow
                await ws.send("still alive")
                alive = await ws.recv()
                srv_conn = next(iter(server.connections))
                srv_latency = srv_conn.latency
            return latencies, alive, srv_latency

    latencies, alive, srv_latency = run(main)
    assert len(latencies) == 5 and all(0 <= x < 5 for x in latencies)
    assert alive == "still alive"
    assert srv_latency > 0  # the server measured a keepalive ping's round trip


def test_close_codes(run):
    async def main():
        h = Handler()
        server, url = await _serve(h)
        async with server:
            # server closes with 4001 'bye'
            async with connect(url + "/bye") as ws:
                first = await ws.recv()
                # 4001 is not 1000/1001, so websockets reports ConnectionClosedError
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.recv()
                client_view = (ws.close_code, ws.close_reason, exc.value.rcvd.code,
                               exc.value.rcvd.reason)
            # client closes with 4002 'done'
            ws = await connect(url + "/echo")
            await ws.send("x")
            assert await ws.recv() == "x"
            await ws.close(4002, "done")
            # a client closing with an error code; sending afterwards fails
            ws2 = await connect(url + "/echo")
            await ws2.close(1011, "oops")
            with pytest.raises(ConnectionClosed):
                await ws2.send("after close")
            await _wait_for(lambda: len(h.closed) == 3)
            return first, client_view, sorted(h.closed)

    first, client_view, server_closed = run(main)
    assert first == "closing"
    assert client_view == (4001, "bye", 4001, "bye")
    assert server_closed == [("/bye", 4001, "bye"), ("/echo", 1011, "oops"),
                             ("/echo", 4002, "done")]


def test_unix_socket_server_and_client(run):
    path = os.path.join(tempfile.mkdtemp(prefix="kbws-"), "ws.sock")
    payload = os.urandom(1024 * 1024)

    async def main():
        h = Handler()
        async with unix_serve(h, path, max_size=MAX_SIZE):
            async with unix_connect(path, uri="ws://localhost/echo",
                                    max_size=MAX_SIZE) as ws:
                await ws.send(payload)
                echoed = await ws.recv()
                await ws.send("text")
                text = await ws.recv()
            await _wait_for(lambda: len(h.closed) == 1)
        return echoed, text, h.closed

    try:
        echoed, text, closed = run(main)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(os.path.dirname(path))
    assert echoed == payload
    assert text == "text"
    assert closed == [("/echo", 1000, "")]


def test_server_graceful_close_with_open_connections(run):
    async def main():
        h = Handler()
        server, url = await _serve(h)
        clients = [await connect(url + "/echo") for _ in range(5)]
        for i, c in enumerate(clients):
            await c.send(f"hi{i}")
            assert await c.recv() == f"hi{i}"
        server.close()  # closes the connections with 1001 (going away)
        await asyncio.wait_for(server.wait_closed(), 10)
        codes = []
        for c in clients:
            await asyncio.wait_for(c.wait_closed(), 10)
            codes.append(c.close_code)
        return codes, sorted(x[1] for x in h.closed)

    codes, server_codes = run(main)
    assert codes == [1001] * 5
    assert server_codes == [1001] * 5
