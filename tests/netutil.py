"""Helpers shared by the networking tests (test_tcp, test_unix, test_streams, test_sock_ops,
test_stress). Nothing here is loop specific: everything goes through the public asyncio API
of the running loop, so the same helper drives asyncio (the control) and kbloop.
"""
import asyncio
import contextlib
import os
import select
import socket
import struct


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def linger_reset(sock):
    """Make ``sock.close()`` send a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Recorder(asyncio.Protocol):
    """A protocol that records everything that happens to it.

    * ``made``/``lost``/``eof`` are futures resolved by the matching callbacks
      (``lost`` gets the exception passed to ``connection_lost``, possibly None).
    * ``data`` accumulates every ``data_received`` payload.
    * ``eof_result`` is what ``eof_received`` returns.
    * ``pause_on_connect`` makes ``connection_made`` call ``pause_reading``.
    """

    eof_result = None
    pause_on_connect = False

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.eof = loop.create_future()
        self.data = bytearray()
        self.data_calls = 0
        self.pause_writing_calls = 0
        self.resume_writing_calls = 0
        self.writing_paused = False
        self.resumed = loop.create_future()
        self._waiter = None

    # --- protocol callbacks
    def connection_made(self, transport):
        self.transport = transport
        if self.pause_on_connect:
            transport.pause_reading()
        self.made.set_result(transport)

    def data_received(self, data):
        assert not self.eof.done(), "data_received after eof_received"
        self.data += data
        self.data_calls += 1
        self._wake()

    def eof_received(self):
        self.eof.set_result(True)
        self._wake()
        return self.eof_result

    def connection_lost(self, exc):
        self.lost.set_result(exc)
        self._wake()

    def pause_writing(self):
        self.pause_writing_calls += 1
        self.writing_paused = True

    def resume_writing(self):
        self.resume_writing_calls += 1
        self.writing_paused = False
        if not self.resumed.done():
            self.resumed.set_result(None)

    # --- helpers
    def _wake(self):
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_bytes(self, n):
        """Wait until at least ``n`` bytes were received; fail on EOF/loss before that."""
        while len(self.data) < n:
            if self.eof.done() or self.lost.done():
                raise AssertionError(
                    f"connection ended after {len(self.data)} of {n} bytes")
            self._waiter = self.loop.create_future()
            await self._waiter
        return bytes(self.data)

    async def wait_eof(self):
        await self.eof
        return bytes(self.data)


class EchoProtocol(asyncio.Protocol):
    """Echoes everything; closes its side when the peer half-closes."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.close()
        return True


class Pair:
    """A connected client/server pair over loopback TCP built with create_server/create_connection."""

    def __init__(self, server, ct, cp, st, sp):
        self.server = server
        self.ct, self.cp = ct, cp      # client transport / protocol
        self.st, self.sp = st, sp      # server transport / protocol

    async def aclose(self):
        for t in (self.ct, self.st):
            if not t.is_closing():
                t.close()
        self.server.close()
        await self.server.wait_closed()
        # let connection_lost run on both sides so transports release their fds
        for p in (self.cp, self.sp):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(p.lost), 10)


async def tcp_pair(server_factory=Recorder, client_factory=Recorder, host="127.0.0.1"):
    loop = asyncio.get_running_loop()
    server_protos = []

    def make_server_proto():
        p = server_factory()
        server_protos.append(p)
        return p

    server = await loop.create_server(make_server_proto, host, 0)
    addr = server.sockets[0].getsockname()
    ct, cp = await loop.create_connection(client_factory, addr[0], addr[1])
    while not server_protos:
        await asyncio.sleep(0.001)
    sp = server_protos[0]
    st = await sp.made
    return Pair(server, ct, cp, st, sp)


@contextlib.contextmanager
def full_listener():
    """A listening loopback TCP socket whose accept queue is full, so that any further
    connect() to it stays pending (the kernel drops the SYN). Yields the address."""
    ls = socket.socket()
    held = []
    try:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        addr = ls.getsockname()
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            held.append(c)
            c.connect_ex(addr)
            _, w, _ = select.select([], [c], [], 0.3)
            if not w:
                break  # this one stays pending: the queue is full
        else:
            raise RuntimeError("could not fill the accept queue")
        yield addr
    finally:
        for c in held:
            c.close()
        ls.close()


async def settled_fd_count(limit, tries=500):
    """fd_count(), after waiting (bounded) for it to drop to ``limit``: a loop may close a
    descriptor asynchronously, shortly after the operation that released it finished."""
    for _ in range(tries):
        n = fd_count()
        if n <= limit:
            return n
        await asyncio.sleep(0.01)
    return fd_count()
