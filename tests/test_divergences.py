"""Drop-in means asyncio's semantics (issue 14, items 6-8): what kbloop did differently from
asyncio, each checked on asyncio (the control) and on kbloop with the same assertions.

  * write()/writelines()/sendto() send the data as it was when the call returned, whatever the
    caller does with its buffer afterwards; bytes subclasses are accepted.
  * datagram transports are asyncio.Transport instances; the errors of asyncio for
    create_datagram_endpoint(reuse_address=) and sock_sendto on a blocking socket in debug
    mode; debug-mode handle tracebacks end at the caller's line; add_reader/add_writer refuse
    a transport's socket; sock_sendall/sock_sendto/sock_connect try the system call at once;
    create_unix_server(cleanup_socket=) as each Python's asyncio has it.
"""
import array
import asyncio
import logging
import os
import socket
import sys
import tempfile
import threading
import time

import pytest

from netutil import Recorder, tcp_pair

ROUNDS = 200


class Frame(bytes):
    """A bytes subclass, as protocol libraries define them."""


def _mutable_views(ba):
    """Buffers over ba's memory that write() must snapshot (bytes-like per asyncio)."""
    return [
        ba,
        memoryview(ba),
        memoryview(ba).toreadonly(),      # read-only, but ba may still change
        memoryview(ba)[1:-1],
    ]


# --------------------------------------------------------------- item 6: snapshots at write()

async def _check_stream_snapshots(pair, use_writelines, fill_first):
    """Write buffers over one bytearray, changing it after each call; the peer must receive
    each write as it was when write() returned."""
    ct, sp = pair.ct, pair.sp
    expected = bytearray()
    if fill_first:
        # the send path is busy: what follows is queued behind data the kernel has not taken
        sp.transport.pause_reading()
        big = b"F" * (4 << 20)
        ct.write(big)
        expected += big
    ba = bytearray(16)
    for r in range(ROUNDS):
        views = _mutable_views(ba)
        for i, view in enumerate(views):
            ba[:] = bytes([(r * 7 + i) % 251 + 1]) * 16
            want = bytes(view)
            if use_writelines:
                ct.writelines([view])
            else:
                ct.write(view)
            expected += want
            ba[:] = b"\0" * 16          # what must not reach the peer
        del views
    if fill_first:
        await asyncio.sleep(0.05)
        sp.transport.resume_reading()
    data = await sp.wait_bytes(len(expected))
    assert len(data) == len(expected)
    assert data == bytes(expected)


@pytest.mark.parametrize("use_writelines", [False, True], ids=["write", "writelines"])
def test_write_sends_what_the_buffer_held_at_write(run, use_writelines):
    async def main():
        pair = await tcp_pair()
        try:
            await _check_stream_snapshots(pair, use_writelines, False)
        finally:
            await pair.aclose()

    run(main)


@pytest.mark.parametrize("use_writelines", [False, True], ids=["write", "writelines"])
def test_write_queued_behind_a_full_socket_is_a_snapshot(run, request, use_writelines):
    if request.node.callspec.params["loop_name"] == "asyncio" and sys.version_info >= (3, 12):
        # asyncio 3.12+ queues a memoryview of the caller's buffer once the socket is full
        # (its zero-copy writes, gh-91166): documented in docs/differences.md
        pytest.xfail("asyncio 3.12+ does not copy what it queues")

    async def main():
        pair = await tcp_pair()
        try:
            await _check_stream_snapshots(pair, use_writelines, True)
        finally:
            await pair.aclose()

    run(main)


def test_write_snapshot_on_a_unix_stream(run):
    async def main():
        loop = asyncio.get_running_loop()
        path = tempfile.mktemp(prefix="kb-div-")
        protos = []

        def factory():
            protos.append(Recorder())
            return protos[-1]

        server = await loop.create_unix_server(factory, path)
        try:
            ct, cp = await loop.create_unix_connection(Recorder, path)
            ba = bytearray(b"a" * 8)
            expected = bytearray()
            for r in range(ROUNDS):
                ba[:] = bytes([65 + r % 26]) * 8
                ct.write(memoryview(ba).toreadonly())
                expected += ba
                ba[:] = b"!" * 8
            while not protos:
                await asyncio.sleep(0.001)
            assert await protos[0].wait_bytes(len(expected)) == bytes(expected)
            ct.close()
            await cp.lost
        finally:
            server.close()
            await server.wait_closed()
            if os.path.exists(path):
                os.unlink(path)

    run(main)


def test_write_of_bytes_and_views_of_bytes(run):
    """Immutable data (bytes, a read-only view of bytes, of any format) goes out right."""
    async def main():
        pair = await tcp_pair()
        try:
            b = bytes(range(256)) * 4
            ints = array.array("i", range(64)).tobytes()
            pieces = [b, memoryview(b), memoryview(b)[10:20], memoryview(ints).cast("i"),
                      memoryview(b).cast("B", (32, 32))]
            for p in pieces:
                pair.ct.write(p)
            expected = b"".join(bytes(p) if isinstance(p, memoryview) else p for p in pieces)
            assert await pair.sp.wait_bytes(len(expected)) == expected
        finally:
            await pair.aclose()

    run(main)


def test_write_rejects_what_asyncio_rejects(run):
    async def main():
        pair = await tcp_pair()
        try:
            for bad in ("text", 42, array.array("B", b"xy"), None):
                with pytest.raises(TypeError):
                    pair.ct.write(bad)
            pair.ct.write(b"ok")
            assert await pair.sp.wait_bytes(2) == b"ok"
        finally:
            await pair.aclose()

    run(main)


class _Dgrams(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = []
        self.waiter = None

    def datagram_received(self, data, addr):
        self.got.append(data)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, n):
        while len(self.got) < n:
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, 10)
        return self.got


async def _udp_pair():
    loop = asyncio.get_running_loop()
    rt, rp = await loop.create_datagram_endpoint(_Dgrams, local_addr=("127.0.0.1", 0))
    addr = rt.get_extra_info("sockname")
    st, sp = await loop.create_datagram_endpoint(_Dgrams, local_addr=("127.0.0.1", 0))
    return rt, rp, st, addr


def test_sendto_sends_what_the_buffer_held_at_sendto(run):
    async def main():
        rt, rp, st, addr = await _udp_pair()
        try:
            ba = bytearray(12)
            expected = []
            n = 40
            for r in range(n):
                for i, view in enumerate(_mutable_views(ba)):
                    ba[:] = bytes([(r * 5 + i) % 250 + 1]) * 12
                    expected.append(bytes(view))
                    st.sendto(view, addr)
                    ba[:] = b"\0" * 12
            got = await rp.wait(len(expected))
            # loopback UDP keeps the order
            assert got == expected
        finally:
            rt.close()
            st.close()

    run(main)


# ------------------------------------------------------------------ item 7: bytes subclasses

def test_bytes_subclass_on_tcp_write_and_writelines(run):
    async def main():
        pair = await tcp_pair()
        try:
            pair.ct.write(Frame(b"hello "))
            pair.ct.writelines([Frame(b"big "), b"plain ", memoryview(Frame(b"view"))])
            expected = b"hello big plain view"
            assert await pair.sp.wait_bytes(len(expected)) == expected
        finally:
            await pair.aclose()

    run(main)


def test_bytes_subclass_on_udp_sendto(run):
    async def main():
        rt, rp, st, addr = await _udp_pair()
        try:
            st.sendto(Frame(b"frame"), addr)
            st.sendto(memoryview(Frame(b"view")), addr)
            assert await rp.wait(2) == [b"frame", b"view"]
        finally:
            rt.close()
            st.close()

    run(main)


def test_bytes_subclass_on_sock_sendall_and_sock_sendto(run):
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for s in (a, b, u1, u2):
                s.setblocking(False)
            u2.bind(("127.0.0.1", 0))
            await loop.sock_sendall(a, Frame(b"sendall"))
            assert await loop.sock_recv(b, 100) == b"sendall"
            assert await loop.sock_sendto(u1, Frame(b"dgram"), u2.getsockname()) == 5
            data, _ = await loop.sock_recvfrom(u2, 100)
            assert data == b"dgram"
        finally:
            for s in (a, b, u1, u2):
                s.close()

    run(main)


# ------------------------------------------------------------------- item 8: the rest

def test_datagram_transport_is_an_asyncio_transport(run, request):
    # asyncio's became a DatagramTransport too in 3.12 (kbloop's always was: docs/differences.md)
    is_datagram_transport = (sys.version_info >= (3, 12)
                             or request.node.callspec.params["loop_name"] != "asyncio")

    async def main():
        loop = asyncio.get_running_loop()
        dt, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                    local_addr=("127.0.0.1", 0))
        pair = await tcp_pair()
        try:
            assert isinstance(dt, asyncio.DatagramTransport) == is_datagram_transport
            assert isinstance(dt, asyncio.Transport)      # as asyncio's own (its MRO)
            assert isinstance(dt, asyncio.BaseTransport)
            assert isinstance(pair.ct, asyncio.Transport)
            assert not isinstance(pair.ct, asyncio.DatagramTransport)
            # what a datagram transport is not: a stream
            with pytest.raises(NotImplementedError):
                dt.write(b"x")
            assert dt.get_write_buffer_size() == 0
            dt.set_write_buffer_limits(high=1000)
            assert dt.get_write_buffer_limits() == (250, 1000)
        finally:
            dt.close()
            await pair.aclose()

    run(main)


def test_datagram_endpoint_reuse_address_error(run):
    # asyncio 3.11+ has no reuse_address parameter here at all (3.8-3.10 raised ValueError)
    async def main():
        loop = asyncio.get_running_loop()
        for flag in (True, False):
            with pytest.raises(TypeError, match="reuse_address"):
                await loop.create_datagram_endpoint(
                    asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), reuse_address=flag)

    run(main)


def test_sock_ops_on_a_blocking_socket_in_debug_mode(run):
    async def main():
        loop = asyncio.get_running_loop()
        assert loop.get_debug()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a, b = socket.socketpair()
        try:
            with pytest.raises(ValueError, match="non-blocking"):
                await loop.sock_sendto(u, b"x", ("127.0.0.1", 9))
            with pytest.raises(ValueError, match="non-blocking"):
                await loop.sock_sendall(a, b"x")
            with pytest.raises(ValueError, match="non-blocking"):
                await loop.sock_recv(a, 1)
        finally:
            u.close()
            a.close()
            b.close()

    run(main, debug=True)


def _cb():
    pass


def test_debug_handle_traceback_ends_at_the_callers_line(run):
    async def main():
        loop = asyncio.get_running_loop()
        here = __file__

        def origin(h):
            frame = h._source_traceback[-1]
            return frame[0], frame[1], frame[2]

        line = sys._getframe().f_lineno
        h1 = loop.call_soon(_cb)
        h2 = loop.call_later(10, _cb)
        h3 = loop.call_at(loop.time() + 10, _cb)
        h4 = loop.call_soon_threadsafe(_cb)
        h5 = loop.call_soon(_cb, context=None)
        assert origin(h1) == (here, line + 1, "main")
        assert origin(h2) == (here, line + 2, "main")
        assert origin(h3) == (here, line + 3, "main")
        assert origin(h4) == (here, line + 4, "main")
        assert origin(h5) == (here, line + 5, "main")
        assert f"created at {here}:{line + 2}" in repr(h2)
        for h in (h2, h3):
            h.cancel()

        # from another thread
        got = []
        t = threading.Thread(target=lambda: got.append(
            (loop.call_soon_threadsafe(_cb), sys._getframe().f_lineno)))
        t.start()
        t.join()
        handle, tline = got[0]
        assert handle._source_traceback[-1][1] == tline

    run(main, debug=True)


def test_debug_slow_callback_and_exception_point_at_the_caller(run, caplog):
    async def main():
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.01
        contexts = []
        loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

        def slow():
            time.sleep(0.05)

        def boom():
            raise ZeroDivisionError

        done = loop.create_future()
        line = sys._getframe().f_lineno
        loop.call_soon(slow)
        loop.call_later(0.001, boom)
        loop.call_later(0.05, done.set_result, None)
        await done
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "slow()" in r.getMessage()]
        assert warnings, caplog.records
        assert f"created at {__file__}:{line + 1}" in warnings[0]
        assert len(contexts) == 1
        src = contexts[0]["source_traceback"][-1]
        assert (src[0], src[1]) == (__file__, line + 2)

    caplog.set_level(logging.WARNING, logger="asyncio")
    run(main, debug=True)


async def _transport_fds():
    """(transport, fd) of each kind of transport a loop makes for a socket."""
    loop = asyncio.get_running_loop()
    out = []
    pair = await tcp_pair()
    out += [(pair.ct, None), (pair.st, None)]
    dt, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                local_addr=("127.0.0.1", 0))
    out.append((dt, None))
    ct, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                remote_addr=("127.0.0.1", 9))
    out.append((ct, None))
    a, b = socket.socketpair()
    ut, up = await loop.create_connection(Recorder, sock=a)
    out.append((ut, b))
    return pair, [(t, t.get_extra_info("socket").fileno(), extra) for t, extra in out]


def test_add_reader_writer_refuse_a_transports_socket(run):
    async def main():
        loop = asyncio.get_running_loop()
        pair, items = await _transport_fds()
        try:
            for t, fd, _ in items:
                sock = t.get_extra_info("socket")
                for add in (loop.add_reader, loop.add_writer):
                    for target in (fd, sock):
                        with pytest.raises(RuntimeError, match="is used by transport"):
                            add(target, _cb)
            for t, fd, _ in items:
                t.close()
            # a closing transport's fd may be watched (asyncio only refuses open ones)
            t, fd, _ = items[0]
            loop.add_reader(fd, _cb)
            assert loop.remove_reader(fd)
        finally:
            for t, fd, extra in items:
                t.close()
                if extra is not None:
                    extra.close()
            await pair.aclose()

    run(main)


def test_sock_sendall_then_close_in_the_next_callback(run):
    """asyncio sends at once: closing the socket right after the call started loses
    nothing; kbloop must not leave the send to a ring submission made after the close."""
    async def main():
        loop = asyncio.get_running_loop()
        ls = socket.create_server(("127.0.0.1", 0))
        try:
            for i in range(ROUNDS):
                payload = b"%d:" % i + b"x" * (i % 7 * 1000)
                for tcp in (True, False):
                    if tcp:
                        a = socket.create_connection(ls.getsockname())
                        b, _ = ls.accept()
                    else:
                        a, b = socket.socketpair()
                    a.setblocking(False)
                    task = loop.create_task(loop.sock_sendall(a, payload))
                    await asyncio.sleep(0)      # the task starts: sock_sendall is running
                    a.close()
                    assert await task is None
                    b.settimeout(5)
                    got = b""
                    while len(got) < len(payload):
                        chunk = b.recv(65536)
                        assert chunk, (i, tcp, len(got))
                        got += chunk
                    assert got == payload
                    b.close()
        finally:
            ls.close()

    run(main)


def test_sock_sendto_then_close_in_the_next_callback(run):
    async def main():
        loop = asyncio.get_running_loop()
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind(("127.0.0.1", 0))
        r.settimeout(5)
        try:
            for i in range(ROUNDS):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                task = loop.create_task(loop.sock_sendto(s, b"d%d" % i, r.getsockname()))
                await asyncio.sleep(0)
                s.close()
                assert await task == len(b"d%d" % i)
                assert r.recv(100) == b"d%d" % i
        finally:
            r.close()

    run(main)


def test_sock_connect_unix_then_close_in_the_next_callback(run):
    async def main():
        loop = asyncio.get_running_loop()
        path = tempfile.mktemp(prefix="kb-div-")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(ROUNDS + 8)
        try:
            for i in range(ROUNDS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                task = loop.create_task(loop.sock_connect(s, path))
                await asyncio.sleep(0)
                s.close()
                assert await task is None
                c, _ = ls.accept()          # the connection was made
                c.close()
        finally:
            ls.close()
            os.unlink(path)

    run(main)


def test_sock_connect_errors_and_progress(run):
    async def main():
        loop = asyncio.get_running_loop()
        # refused at once (AF_UNIX): the system call's own error
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        with pytest.raises(FileNotFoundError):
            await loop.sock_connect(s, tempfile.mktemp(prefix="kb-div-missing-"))
        s.close()
        # refused later (TCP, in progress first): "Connect call failed"
        port_sock = socket.socket()
        port_sock.bind(("127.0.0.1", 0))
        addr = port_sock.getsockname()
        s = socket.socket()
        s.setblocking(False)
        try:
            with pytest.raises(ConnectionRefusedError, match="Connect call failed"):
                await loop.sock_connect(s, addr)
        finally:
            s.close()
            port_sock.close()
        # and an in-progress connect that succeeds
        ls = socket.create_server(("127.0.0.1", 0))
        s = socket.socket()
        s.setblocking(False)
        try:
            assert await loop.sock_connect(s, ls.getsockname()) is None
            assert s.getpeername() == ls.getsockname()
        finally:
            s.close()
            ls.close()

    run(main)


def test_sock_sendall_larger_than_the_socket_buffer(run):
    """What does not go out at once is sent by the loop, in order."""
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            payload = bytes(range(256)) * (16 << 10)     # 4 MiB
            send = loop.create_task(loop.sock_sendall(a, bytearray(payload)))
            got = bytearray()
            while len(got) < len(payload):
                got += await loop.sock_recv(b, 1 << 20)
            assert await send is None
            assert got == payload
        finally:
            a.close()
            b.close()

    run(main)


@pytest.mark.skipif(sys.version_info < (3, 13), reason="cleanup_socket is Python 3.13's")
def test_unix_server_cleanup_socket(run):
    async def main():
        loop = asyncio.get_running_loop()
        path = tempfile.mktemp(prefix="kb-div-")
        server = await loop.create_unix_server(asyncio.Protocol, path)
        assert os.path.exists(path)
        server.close()
        await server.wait_closed()
        assert not os.path.exists(path)           # cleanup_socket=True, the default

        server = await loop.create_unix_server(asyncio.Protocol, path, cleanup_socket=False)
        server.close()
        await server.wait_closed()
        assert os.path.exists(path)
        os.unlink(path)

        # a file that replaced the server's is not the server's to remove
        server = await loop.create_unix_server(asyncio.Protocol, path)
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX)
        other.bind(path)
        server.close()
        await server.wait_closed()
        assert os.path.exists(path)
        other.close()
        os.unlink(path)

        # a socket passed with sock= is cleaned up too
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        server = await loop.create_unix_server(asyncio.Protocol, sock=s)
        server.close()
        await server.wait_closed()
        assert not os.path.exists(path)

    run(main)


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="before 3.13 there is no cleanup_socket")
def test_unix_server_no_cleanup_socket_before_313(run):
    async def main():
        loop = asyncio.get_running_loop()
        path = tempfile.mktemp(prefix="kb-div-")
        with pytest.raises(TypeError, match="cleanup_socket"):
            await loop.create_unix_server(asyncio.Protocol, path, cleanup_socket=True)
        server = await loop.create_unix_server(asyncio.Protocol, path)
        server.close()
        await server.wait_closed()
        assert os.path.exists(path)                # asyncio before 3.13 leaves the file
        os.unlink(path)

    run(main)
