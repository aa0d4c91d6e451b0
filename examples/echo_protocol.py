"""Plain asyncio echo server (Protocol or BufferedProtocol).

Nothing here is specific to an event loop: the same file runs on
asyncio, uvloop or kbloop depending on how it is started, e.g.

    python examples/echo_protocol.py --port 0            # asyncio
    python -m kbloop examples/echo_protocol.py --port 0  # kbloop
    python examples/echo_protocol.py --tls cert.pem key.pem   # echo over TLS

Prints ``listening on HOST:PORT`` once accepting and serves until
SIGTERM/SIGINT, then exits with status 0.
"""

import argparse
import asyncio
import signal
import ssl
import sys


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class EchoBufferedProtocol(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray(256 * 1024)

    def get_buffer(self, sizehint):
        return self.buffer

    def buffer_updated(self, nbytes):
        # Copy out: the loop may keep what we pass to write() until it is
        # sent, while our buffer is refilled by the next read.
        self.transport.write(bytes(self.buffer[:nbytes]))


def server_ssl_context(tls):
    """None, or a server-side SSLContext for tls = (CERT, KEY) PEM files."""
    if not tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls)
    return ctx


async def serve(host="127.0.0.1", port=0, buffered=False, tls=None):
    """Serve echo until SIGTERM/SIGINT; prints the bound address."""
    loop = asyncio.get_running_loop()
    protocol = EchoBufferedProtocol if buffered else EchoProtocol
    server = await loop.create_server(protocol, host, port, ssl=server_ssl_context(tls))
    await wait_for_stop_signal(server)


async def wait_for_stop_signal(server):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            # A loop without add_signal_handler still gets a clean exit.
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    host, port = server.sockets[0].getsockname()[:2]
    # stderr, so stdout stays exactly the documented line; the demo uses
    # this to check that the intended loop is really running.
    cls = type(loop)
    print(f"event loop: {cls.__module__}.{cls.__qualname__}", file=sys.stderr, flush=True)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--buffered", action="store_true", help="use asyncio.BufferedProtocol")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve TLS (PEM files)")
    return p.parse_args()


def main():
    args = parse_args(__doc__.splitlines()[0])
    asyncio.run(serve(args.host, args.port, args.buffered, args.tls))


if __name__ == "__main__":
    main()
