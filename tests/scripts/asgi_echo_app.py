"""A tiny plain ASGI app for the uvicorn tests (no framework).

Every HTTP request gets a JSON body: the loop's module, method, path, the request body's length
and a checksum of it, and the Transfer-Encoding the client used.
"""
import asyncio
import hashlib
import json

STATE = {"lifespan": None}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                STATE["lifespan"] = type(asyncio.get_running_loop()).__module__
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return

    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        body += msg.get("body", b"")
        if not msg.get("more_body", False):
            break

    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    if scope["path"] == "/sleep":
        await asyncio.sleep(0.01)
    payload = json.dumps({
        "loop": type(asyncio.get_running_loop()).__module__,
        "lifespan_loop": STATE["lifespan"],
        "method": scope["method"],
        "path": scope["path"],
        "http_version": scope["http_version"],
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "transfer_encoding": headers.get("transfer-encoding"),
    }).encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})
