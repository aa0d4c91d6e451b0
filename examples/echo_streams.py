"""A plain asyncio streams echo server (no kbloop import).

    python examples/echo_streams.py --host 127.0.0.1 --port 0
    python -m kbloop examples/echo_streams.py --port 0

Prints ``listening on HOST:PORT`` (flushed) once ready, then echoes every connection
until the client half-closes, and closes it.  Exits 0 on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import signal
import sys


async def handle(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    args = parser.parse_args()

    server = await asyncio.start_server(handle, args.host, args.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    host, port = server.sockets[0].getsockname()[:2]
    cls = type(loop)  # on stderr: lets the benchmark check which loop runs
    print(f"event loop: {cls.__module__}.{cls.__qualname__}", file=sys.stderr, flush=True)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
