"""aiohttp (unchanged) on the loop under test: a ``web.Application`` served by
``web.AppRunner``/``TCPSite`` on 127.0.0.1:0 and driven by aiohttp's ``ClientSession`` on the same
loop. asyncio is the control; the assertions are identical for both loops."""
import asyncio
import contextlib
import hashlib
import os

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import WSMsgType, web  # noqa: E402

FILE_SIZE = 2 * 1024 * 1024
WS_CLOSE_CODES = web.AppKey("ws_close_codes", list)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("aiohttp") / "blob.bin"
    data = os.urandom(FILE_SIZE)
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


def loop_module():
    return type(asyncio.get_running_loop()).__module__


def make_app(file_path=None):
    routes = web.RouteTableDef()

    @routes.get("/hello")
    async def hello(request):
        return web.json_response({"hello": request.query.get("name", "world"),
                                  "loop": loop_module()})

    @routes.get("/item/{id:\\d+}")
    async def item(request):
        return web.json_response({"id": int(request.match_info["id"]),
                                  "peer_port": request.transport.get_extra_info("peername")[1]})

    @routes.post("/sum")
    async def post_json(request):
        data = await request.json()
        return web.json_response({"sum": sum(data["numbers"]), "echo": data["tag"]},
                                 status=201)

    @routes.post("/digest")
    async def digest(request):
        h, n = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"length": n, "sha256": h.hexdigest(),
                                  "te": request.headers.get("Transfer-Encoding")})

    @routes.get("/stream")
    async def stream(request):
        n = int(request.query["n"])
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(n):
            await resp.write(bytes([i % 256]) * size)
            if i % 8 == 0:
                await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp

    @routes.get("/ws")
    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"loop": loop_module()})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        request.app[WS_CLOSE_CODES].append(ws.close_code)
        return ws

    if file_path is not None:
        @routes.get("/file")
        async def file(request):
            return web.FileResponse(file_path)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[WS_CLOSE_CODES] = []
    app.add_routes(routes)
    return app


@contextlib.asynccontextmanager
async def serve(app, ssl_context=None):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_get_and_post_json(run, loop_name):
    async def main():
        async with serve(make_app()) as base, aiohttp.ClientSession() as s:
            async with s.get(f"{base}/hello", params={"name": "kb"}) as r:
                assert r.status == 200
                assert r.content_type == "application/json"
                hello = await r.json()
            async with s.get(f"{base}/item/42") as r:
                item = await r.json()
            async with s.get(f"{base}/missing") as r:
                missing = r.status
            async with s.post(f"{base}/sum", json={"numbers": list(range(100)),
                                                   "tag": "é✓"}) as r:
                assert r.status == 201
                summed = await r.json()
            return hello, item, missing, summed

    hello, item, missing, summed = run(main)
    assert hello == {"hello": "kb", "loop": hello["loop"]}
    assert hello["loop"].startswith(loop_name)
    assert item["id"] == 42
    assert missing == 404
    assert summed == {"sum": 4950, "echo": "é✓"}


def test_keep_alive_and_concurrent_requests(run):
    async def main():
        conn = aiohttp.TCPConnector(limit=4)
        async with serve(make_app()) as base, aiohttp.ClientSession(connector=conn) as s:
            async def one(i):
                async with s.get(f"{base}/item/{i}") as r:
                    d = await r.json()
                    return d["id"], d["peer_port"]
            results = await asyncio.gather(*(one(i) for i in range(200)))
            return [r[0] for r in results], {r[1] for r in results}

    ids, peer_ports = run(main)
    assert ids == list(range(200))
    # 200 requests over a pool of at most 4 keep-alive connections
    assert 1 <= len(peer_ports) <= 4


def test_post_large_streamed_body(run):
    chunks = [os.urandom(65536) for _ in range(48)]  # 3 MiB, sent chunked
    body = b"".join(chunks)

    async def main():
        async def gen():
            for c in chunks:
                yield c
                await asyncio.sleep(0)

        async with serve(make_app()) as base, aiohttp.ClientSession() as s:
            async with s.post(f"{base}/digest", data=gen()) as r:
                chunked = await r.json()
            async with s.post(f"{base}/digest", data=body) as r:
                plain = await r.json()
            return chunked, plain

    chunked, plain = run(main)
    for d in (chunked, plain):
        assert d["length"] == len(body)
        assert d["sha256"] == hashlib.sha256(body).hexdigest()
    assert chunked["te"] == "chunked"
    assert plain["te"] is None


def test_streaming_response(run):
    n, size = 300, 7000

    async def main():
        async with serve(make_app()) as base, aiohttp.ClientSession() as s:
            async with s.get(f"{base}/stream", params={"n": n, "size": size}) as r:
                assert r.headers.get("Transfer-Encoding") == "chunked"
                got = bytearray()
                pieces = 0
                async for chunk in r.content.iter_any():
                    got += chunk
                    pieces += 1
                return bytes(got), pieces

    got, pieces = run(main)
    assert len(got) == n * size
    assert got == b"".join(bytes([i % 256]) * size for i in range(n))
    assert pieces > 1


def test_websocket_echo_and_close_code(run, loop_name):
    payload = os.urandom(300_000)

    async def main():
        app = make_app()
        async with serve(app) as base, aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{base}/ws", max_msg_size=0) as ws:
                first = await ws.receive_json()
                texts = []
                for i in range(50):
                    await ws.send_str(f"m{i}")
                for i in range(50):
                    texts.append(await ws.receive_str())
                await ws.send_bytes(payload)
                echoed = await ws.receive_bytes()
                await ws.send_str("close")
                closing = await ws.receive()
                await ws.close()
                client_code = ws.close_code
            # a second socket that the client closes itself
            async with s.ws_connect(f"{base}/ws") as ws2:
                await ws2.receive_json()
                await ws2.send_str("x")
                assert await ws2.receive_str() == "echo:x"
                await ws2.close(code=4002, message=b"client done")
            for _ in range(100):
                if len(app[WS_CLOSE_CODES]) == 2:
                    break
                await asyncio.sleep(0.01)
            return first, texts, echoed, closing, client_code, list(app[WS_CLOSE_CODES])

    first, texts, echoed, closing, client_code, server_codes = run(main)
    assert first["loop"].startswith(loop_name)
    assert texts == [f"echo:m{i}" for i in range(50)]
    assert echoed == payload[::-1]
    assert closing.type == WSMsgType.CLOSE
    assert closing.data == 4001
    assert closing.extra == "bye"
    assert client_code == 4001
    # the first socket's close was started by the server (the client only answered it); the
    # second one was closed by the client with its own code, which the server must see
    assert len(server_codes) == 2 and server_codes[1] == 4002


def test_file_response_2mib(run, big_file):
    path, digest = big_file

    async def main():
        async with serve(make_app(path)) as base, aiohttp.ClientSession() as s:
            results = []
            for _ in range(2):  # twice on the same keep-alive connection
                async with s.get(f"{base}/file") as r:
                    assert r.status == 200
                    assert int(r.headers["Content-Length"]) == FILE_SIZE
                    h = hashlib.sha256()
                    async for chunk in r.content.iter_chunked(65536):
                        h.update(chunk)
                    results.append(h.hexdigest())
            async with s.get(f"{base}/file", headers={"Range": "bytes=1000-1999"}) as r:
                assert r.status == 206
                part = await r.read()
            return results, part

    results, part = run(main)
    assert results == [digest, digest]
    with open(path, "rb") as f:
        f.seek(1000)
        assert part == f.read(1000)


def test_client_timeout_against_slow_handler(run):
    async def main():
        app = web.Application()
        release = asyncio.Event()

        async def slow(request):
            await asyncio.wait_for(release.wait(), 10)
            return web.Response(text="late")

        async def fast(request):
            return web.Response(text="fast")

        app.router.add_get("/slow", slow)
        app.router.add_get("/fast", fast)

        async with serve(app) as base, aiohttp.ClientSession() as s:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                async with s.get(f"{base}/slow",
                                 timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                    await r.read()
            elapsed = loop.time() - t0
            release.set()
            async with s.get(f"{base}/fast") as r:  # the session is still usable
                fast = await r.text()
            return elapsed, fast

    elapsed, fast = run(main)
    assert 0.25 <= elapsed < 3
    assert fast == "fast"
