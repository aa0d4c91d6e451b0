"""Minimal HTTP/1.1 keep-alive "Hello, World!" server (asyncio Protocol + httptools).

Loop-agnostic like echo_protocol.py: run it with plain python (asyncio),
or ``python -m kbloop examples/http_server.py --port 0``; ``--tls CERT KEY`` serves HTTPS.
Prints ``listening on HOST:PORT`` once accepting; exits 0 on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import signal
import ssl
import sys

import httptools

BODY = b"Hello, World!"
HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: %d\r\n" % len(BODY)
)


class HttpProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    # httptools callback, called once per complete request (in order, so
    # pipelined requests are answered in order too).
    def on_message_complete(self):
        keep_alive = self.parser.should_keep_alive()
        # Deliberately two writes (headers, then body), as many real servers
        # do: it exercises the loop's handling of back-to-back small writes.
        self.transport.write(HEADERS + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"))
        self.transport.write(BODY)
        if not keep_alive:
            self.transport.close()


async def serve(host="127.0.0.1", port=0, tls=None):
    loop = asyncio.get_running_loop()
    ctx = None
    if tls:  # (CERT, KEY) PEM files
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*tls)
    server = await loop.create_server(HttpProtocol, host, port, ssl=ctx)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    host, port = server.sockets[0].getsockname()[:2]
    cls = type(loop)  # on stderr: lets the demo check which loop runs
    print(f"event loop: {cls.__module__}.{cls.__qualname__}", file=sys.stderr, flush=True)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS (PEM files)")
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port, args.tls))


if __name__ == "__main__":
    main()
