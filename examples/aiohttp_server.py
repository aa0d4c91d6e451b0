"""Minimal aiohttp "Hello, World!" application (HTTP/1.1, keep-alive).

Loop-agnostic like the other examples: run it with plain python (asyncio),
or ``python -m kbloop examples/aiohttp_server.py --port 0``.
Prints ``listening on HOST:PORT`` once accepting; exits 0 on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import signal
import sys

from aiohttp import web

BODY = "Hello, World!"


async def hello(request):
    return web.Response(text=BODY)


async def serve(host="127.0.0.1", port=0):
    app = web.Application()
    app.router.add_get("/", hello)
    # No access log: the benchmark measures the loop and aiohttp, not logging.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    host, port = site._server.sockets[0].getsockname()[:2]
    cls = type(loop)  # on stderr: lets the benchmark check which loop runs
    print(f"event loop: {cls.__module__}.{cls.__qualname__}", file=sys.stderr, flush=True)
    print(f"listening on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
