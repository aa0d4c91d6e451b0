"""uvicorn (a child process, ``--loop kbloop:new_event_loop``; control ``--loop asyncio``) serving
a small Starlette app with HTTP endpoints and a websocket echo endpoint, for each of uvicorn's
websocket implementations. The clients (the ``websockets`` library and httpx) run in the test on
the same kind of loop as the server. Complements test_uvicorn.py (plain ASGI app, http.client):
here the server side includes Starlette and uvicorn's websocket protocols, and the client side
is third-party asyncio code on the loop under test."""
import asyncio
import hashlib
import importlib.util
import json
import os
import textwrap

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
pytest.importorskip("websockets")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from services import UvicornServer  # noqa: E402

LOOP_SPECS = {"asyncio": "asyncio", "kbloop": "kbloop:new_event_loop"}
WS_IMPLS = ["websockets", "websockets-sansio", "wsproto"]

APP_SOURCE = textwrap.dedent('''
    import asyncio
    import hashlib

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    CLOSES = []  # (close code, reason) of websockets the client closed


    def loop_module():
        return type(asyncio.get_running_loop()).__module__


    async def whoami(request):
        return JSONResponse({"loop": loop_module(), "client_port": request.client.port,
                             "http_version": request.scope["http_version"]})


    async def upload(request):
        h, n, parts = hashlib.sha256(), 0, 0
        async for chunk in request.stream():
            h.update(chunk)
            n += len(chunk)
            parts += 1
        return JSONResponse({"length": n, "sha256": h.hexdigest(), "parts": parts,
                             "te": request.headers.get("transfer-encoding"),
                             "client_port": request.client.port})


    async def stream(request):
        async def gen():
            for i in range(200):
                yield f"line {i}\\n".encode()
                if i % 20 == 0:
                    await asyncio.sleep(0.001)
        return StreamingResponse(gen(), media_type="text/plain")


    async def closes(request):
        return JSONResponse(CLOSES)


    async def ws_echo(websocket):
        await websocket.accept()
        await websocket.send_json({"loop": loop_module()})
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                CLOSES.append([msg.get("code"), msg.get("reason") or ""])
                return
            if msg.get("text") is not None:
                if msg["text"] == "close":
                    await websocket.close(code=4001, reason="bye")
                    return
                await websocket.send_text("echo:" + msg["text"])
            else:
                await websocket.send_bytes(msg["bytes"])


    app = Starlette(routes=[
        Route("/whoami", whoami),
        Route("/upload", upload, methods=["POST"]),
        Route("/stream", stream),
        Route("/closes", closes),
        WebSocketRoute("/ws", ws_echo),
    ])
''')


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("uvicorn_ws_app")
    (d / "kb_starlette_app.py").write_text(APP_SOURCE)
    return str(d)


@pytest.fixture(scope="module")
def servers(app_dir):
    """Started lazily, one per (loop, ws implementation); all stopped at module end."""
    started = {}

    def get(loop_name, ws_impl):
        key = (loop_name, ws_impl)
        if key not in started:
            if ws_impl == "wsproto" and importlib.util.find_spec("wsproto") is None:
                pytest.skip("wsproto not installed")
            started[key] = UvicornServer(app_dir, "kb_starlette_app:app", LOOP_SPECS[loop_name],
                                         "--ws", ws_impl, "--ws-max-size", str(8 << 20))
        return started[key]

    try:
        yield get
    finally:
        errors = []
        for key, srv in started.items():
            srv.stop()
            out = srv.output()
            srv.close()
            if "Traceback" in out:
                errors.append(f"{key}:\n{out}")
        assert not errors, "uvicorn logged tracebacks:\n" + "\n".join(errors)


def test_http_keep_alive_chunked_upload_and_streaming(run, servers, loop_name):
    srv = servers(loop_name, "websockets-sansio")
    base = f"http://127.0.0.1:{srv.port}"
    chunks = [os.urandom(32768) for _ in range(32)]  # 1 MiB
    body = b"".join(chunks)

    async def main():
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=20) as client:
            who = [(await client.get("/whoami")).json() for _ in range(5)]

            async def gen():
                for c in chunks:
                    yield c
                    await asyncio.sleep(0)

            chunked = (await client.post("/upload", content=gen())).json()
            sized = (await client.post("/upload", content=body)).json()
            lines = []
            async with client.stream("GET", "/stream") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)
            who_after = (await client.get("/whoami")).json()
            return who, chunked, sized, lines, who_after

    who, chunked, sized, lines, who_after = run(main)
    assert all(w["loop"].startswith(loop_name) for w in who)
    assert {w["http_version"] for w in who} == {"1.1"}
    ports = {w["client_port"] for w in who} | {chunked["client_port"], sized["client_port"],
                                               who_after["client_port"]}
    assert len(ports) == 1, "the keep-alive connection was not reused"
    for d in (chunked, sized):
        assert d["length"] == len(body)
        assert d["sha256"] == hashlib.sha256(body).hexdigest()
    assert chunked["te"] == "chunked"
    assert sized["te"] is None
    assert lines == [f"line {i}" for i in range(200)]


@pytest.mark.parametrize("ws_impl", WS_IMPLS)
def test_websocket_echo(run, servers, loop_name, ws_impl):
    srv = servers(loop_name, ws_impl)
    url = f"ws://127.0.0.1:{srv.port}/ws"
    payload = os.urandom(1024 * 1024)

    async def main():
        async with connect(url, max_size=8 << 20) as ws:
            hello = json.loads(await ws.recv())
            for i in range(100):
                await ws.send(f"t{i}")
            texts = [await ws.recv() for _ in range(100)]
            await ws.send(payload)
            echoed = await ws.recv()
            pong = await ws.ping(b"are you there")
            latency = await asyncio.wait_for(pong, 5)
            await ws.close(4002, "client done")
        # concurrent clients
        async def one(k):
            async with connect(url) as c:
                await c.recv()
                for i in range(20):
                    await c.send(f"{k}-{i}")
                    assert await c.recv() == f"echo:{k}-{i}"
                return k
        done = await asyncio.gather(*(one(k) for k in range(10)))
        async with httpx.AsyncClient(timeout=20) as client:
            for _ in range(100):
                closes = (await client.get(f"http://127.0.0.1:{srv.port}/closes")).json()
                if [4002, "client done"] in closes:
                    break
                await asyncio.sleep(0.02)
        return hello, texts, echoed, latency, done, closes

    hello, texts, echoed, latency, done, closes = run(main)
    assert hello["loop"].startswith(loop_name)
    assert texts == [f"echo:t{i}" for i in range(100)]
    assert echoed == payload
    assert 0 <= latency < 5
    assert done == list(range(10))
    assert [4002, "client done"] in closes


@pytest.mark.parametrize("ws_impl", WS_IMPLS)
def test_websocket_server_close_code(run, servers, loop_name, ws_impl):
    srv = servers(loop_name, ws_impl)
    url = f"ws://127.0.0.1:{srv.port}/ws"

    async def main():
        async with connect(url) as ws:
            await ws.recv()
            await ws.send("close")
            with pytest.raises(ConnectionClosed) as exc:
                await ws.recv()
            return ws.close_code, ws.close_reason, exc.value.rcvd.code

    code, reason, rcvd = run(main)
    assert (code, reason, rcvd) == (4001, "bye", 4001)
