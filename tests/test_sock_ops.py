"""loop.sock_* operations on non-blocking sockets, their cancellation, and fd hygiene."""
import asyncio
import hashlib
import os
import socket

import pytest

from netutil import fd_count, full_listener, settled_fd_count

LOCAL = "127.0.0.1"


def _listener(backlog=16):
    ls = socket.socket()
    ls.bind((LOCAL, 0))
    ls.listen(backlog)
    ls.setblocking(False)
    return ls


async def _connected_pair():
    """(client, server) non-blocking TCP sockets connected with sock_connect/sock_accept."""
    loop = asyncio.get_running_loop()
    with _listener() as ls:
        c = socket.socket()
        c.setblocking(False)
        (conn, peer), _ = await asyncio.gather(
            loop.sock_accept(ls), loop.sock_connect(c, ls.getsockname()))
    return c, conn


def test_sock_connect_and_sock_accept(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with _listener() as ls, socket.socket() as c:
            c.setblocking(False)
            accept = asyncio.create_task(loop.sock_accept(ls))
            assert await loop.sock_connect(c, ls.getsockname()) is None
            conn, peer = await accept
            with conn:
                assert peer == c.getsockname()
                assert conn.getpeername() == c.getsockname()
                assert c.getpeername() == ls.getsockname()
                assert conn.gettimeout() == 0  # returned non-blocking
                await loop.sock_sendall(c, b"hello")
                assert await loop.sock_recv(conn, 100) == b"hello"

    run(main)


def test_sock_connect_refused(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with _listener() as ls:
            addr = ls.getsockname()
        with socket.socket() as c:
            c.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                await loop.sock_connect(c, addr)

    run(main)


def test_sock_sendall_8mib_and_sock_recv(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        payload = os.urandom(8 * 1024 * 1024)

        async def receive():
            h = hashlib.sha256()
            n = 0
            while True:
                data = await loop.sock_recv(s, 256 * 1024)
                if not data:
                    return n, h.digest()
                n += len(data)
                h.update(data)

        async def send():
            assert await loop.sock_sendall(c, payload) is None
            c.shutdown(socket.SHUT_WR)

        with c, s:
            (n, digest), _ = await asyncio.gather(receive(), send())
        assert n == len(payload)
        assert digest == hashlib.sha256(payload).digest()

    run(main)


def test_sock_sendall_memoryview_and_bytearray(run):
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            await loop.sock_sendall(a, bytearray(b"abc"))
            await loop.sock_sendall(a, memoryview(b"xxdefxx")[2:5])
            got = b""
            while len(got) < 6:
                got += await loop.sock_recv(b, 100)
            assert got == b"abcdef"

    run(main)


def test_sock_recv_returns_empty_at_eof(run):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        with c, s:
            await loop.sock_sendall(c, b"last")
            c.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(s, 100) == b"last"
            assert await loop.sock_recv(s, 100) == b""

    run(main)


def test_sock_recv_respects_nbytes(run):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        with c, s:
            await loop.sock_sendall(c, b"0123456789")
            first = await loop.sock_recv(s, 4)
            assert first == b"0123"
            rest = b""
            while len(rest) < 6:
                rest += await loop.sock_recv(s, 100)
            assert rest == b"456789"

    run(main)


def test_sock_recv_into(run):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        with c, s:
            await loop.sock_sendall(c, b"into-buffer")
            buf = bytearray(32)
            n = await loop.sock_recv_into(s, buf)
            while n < 11:
                n += await loop.sock_recv_into(s, memoryview(buf)[n:])
            assert n == 11
            assert bytes(buf[:n]) == b"into-buffer"
            assert bytes(buf[n:]) == bytes(32 - n)
            # a memoryview slice is filled in place, nbytes-limited
            await loop.sock_sendall(c, b"XYZ")
            view = memoryview(buf)[20:22]
            assert await loop.sock_recv_into(s, view) == 2
            assert bytes(buf[20:22]) == b"XY"
            assert await loop.sock_recv(s, 10) == b"Z"
            c.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv_into(s, buf) == 0

    run(main)


def test_sock_recv_blocking_socket_non_debug_works(run):
    # asyncio 3.11 only rejects blocking sockets in debug mode; otherwise it just works.
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        with a, b:
            b.sendall(b"ready")
            assert a.gettimeout() is None
            assert await loop.sock_recv(a, 100) == b"ready"

    run(main)


def test_sock_ops_blocking_socket_debug_value_error(run):
    async def main():
        loop = asyncio.get_running_loop()
        assert loop.get_debug()
        a, b = socket.socketpair()
        with a, b:
            b.sendall(b"ready")
            with pytest.raises(ValueError):
                await loop.sock_recv(a, 100)
            with pytest.raises(ValueError):
                await loop.sock_recv_into(a, bytearray(10))
            with pytest.raises(ValueError):
                await loop.sock_sendall(a, b"x")
            with socket.socket() as c:
                with pytest.raises(ValueError):
                    await loop.sock_connect(c, (LOCAL, 1))
            with socket.socket() as ls:
                ls.bind((LOCAL, 0))
                ls.listen()
                with pytest.raises(ValueError):
                    await loop.sock_accept(ls)
            # nothing was consumed by the rejected calls
            a.setblocking(False)
            assert await loop.sock_recv(a, 100) == b"ready"

    run(main, debug=True)


# ---------------------------------------------------------------- cancellation

async def _settle(n=10):
    for _ in range(n):
        await asyncio.sleep(0)


def test_cancel_sock_recv_then_data_not_lost(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        with c, s:
            task = asyncio.create_task(loop.sock_recv(s, 1024))
            await _settle()
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await loop.sock_sendall(c, b"after cancel")
            await asyncio.sleep(0.05)  # the data is now queued in the kernel
            got = b""
            while len(got) < 12:
                got += await loop.sock_recv(s, 1024)
            assert got == b"after cancel"

    run(main)


def test_cancel_sock_recv_many_times_then_data_not_lost(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        with c, s:
            for i in range(50):
                task = asyncio.create_task(loop.sock_recv(s, 1024))
                await asyncio.sleep(0)
                if i % 2:
                    await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await loop.sock_sendall(c, b"survivor")
            got = b""
            while len(got) < 8:
                got += await loop.sock_recv(s, 1024)
            assert got == b"survivor"

    run(main)


def test_cancel_sock_recv_into_then_data_not_lost(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        c, s = await _connected_pair()
        with c, s:
            buf = bytearray(64)
            task = asyncio.create_task(loop.sock_recv_into(s, buf))
            await _settle()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await loop.sock_sendall(c, b"payload")
            n = 0
            fresh = bytearray(64)
            while n < 7:
                n += await loop.sock_recv_into(s, memoryview(fresh)[n:])
            assert bytes(fresh[:n]) == b"payload"

    run(main)


def test_cancel_sock_accept_then_accept_works(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with _listener() as ls:
            task = asyncio.create_task(loop.sock_accept(ls))
            await _settle()
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with socket.socket() as c:
                c.setblocking(False)
                await loop.sock_connect(c, ls.getsockname())
                conn, peer = await loop.sock_accept(ls)
                with conn:
                    assert peer == c.getsockname()

    run(main)


def test_cancel_pending_sock_connect(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with full_listener() as addr, socket.socket() as c:
            c.setblocking(False)
            task = asyncio.create_task(loop.sock_connect(c, addr))
            await asyncio.sleep(0.05)
            assert not task.done()  # the accept queue is full: connect stays pending
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main)


def test_cancel_pending_create_connection(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with full_listener() as addr:
            before = fd_count()
            task = asyncio.create_task(loop.create_connection(asyncio.Protocol, *addr))
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await settled_fd_count(before) == before  # the internal socket was closed

    run(main)


def test_cancel_create_connection_right_after_start(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with _listener() as ls:
            before = fd_count()
            task = asyncio.create_task(
                loop.create_connection(asyncio.Protocol, *ls.getsockname()))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await settled_fd_count(before) == before

    run(main)


def test_cancel_open_connection_right_after_start(run, no_fd_leak):
    async def main():
        with _listener() as ls:
            before = fd_count()
            task = asyncio.create_task(asyncio.open_connection(*ls.getsockname()))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await settled_fd_count(before) == before

    run(main)


def test_sock_ops_and_readers_refuse_a_transports_socket(run):
    """asyncio refuses sock_* and add_reader/add_writer on an fd a live transport owns."""

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        fd = transport.get_extra_info("socket").fileno()
        same_fd = socket.socket(fileno=fd)     # a second socket object on the transport's fd
        try:
            with pytest.raises(RuntimeError, match="used by transport"):
                await loop.sock_recv(same_fd, 10)
            with pytest.raises(RuntimeError, match="used by transport"):
                loop.add_reader(fd, lambda: None)
            with pytest.raises(RuntimeError, match="used by transport"):
                loop.add_writer(fd, lambda: None)
        finally:
            same_fd.detach()
            transport.close()
            server.close()
            await asyncio.sleep(0)

    run(main)
