"""asyncio's order of protocol callbacks and its contextvars semantics, on asyncio (the control)
and on kbloop in every reactor mode, with the same assertions.

Order: a poll's I/O is delivered after the callbacks that were already ready, so that
connection_made runs first, then the caller of create_connection (connect_accepted_socket,
create_datagram_endpoint, start_tls, connect_read_pipe...) resumes, then data arrives.  The
race is provoked: the data is already queued in the socket (or pipe) when the transport is
made, and every test repeats it.

Contexts: the protocol factory and the protocol callbacks run in a copy of the context of the
call that made the transport (create_server & co.); each accepted connection has its own copy;
what callbacks set does not reach the caller.
"""
import asyncio
import contextvars
import os
import select
import socket
import sys
import threading

import pytest

from test_tls import HOST, HOSTNAME, PKI

REPEAT = 200
BIG = 1 << 20
var = contextvars.ContextVar("kbloop_test_var", default="unset")
other = contextvars.ContextVar("kbloop_test_other", default="unset")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(str(tmp_path_factory.mktemp("pki")))


def _wait_readable(sock):
    r, _, _ = select.select([sock], [], [], 10)
    assert r, "the data never arrived"


class Log(asyncio.Protocol):
    """Records each callback with the value of `var` it sees."""

    def __init__(self, events):
        self.events = events
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append(("made", var.get()))

    def data_received(self, data):
        self.events.append(("data", var.get()))

    def eof_received(self):
        self.events.append(("eof", var.get()))

    def connection_lost(self, exc):
        self.events.append(("lost", var.get()))
        if not self.lost.done():
            self.lost.set_result(None)


class BufLog(Log, asyncio.BufferedProtocol):
    def __init__(self, events):
        super().__init__(events)
        self.buf = bytearray(64)

    def get_buffer(self, sizehint):
        self.events.append(("get_buffer", var.get()))
        return self.buf

    def buffer_updated(self, nbytes):
        self.events.append(("data", var.get()))


def _kinds(events):
    return [e[0] for e in events]


# ------------------------------------------------------------------------------- order


@pytest.mark.parametrize("proto", [Log, BufLog], ids=["Protocol", "BufferedProtocol"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_create_connection_resumes_before_queued_data(run, family, proto):
    """The peer greets first: its bytes wait in the socket before create_connection()."""

    async def main():
        loop = asyncio.get_running_loop()
        if family == "tcp":
            lsock = socket.create_server((HOST, 0))
        for _ in range(REPEAT):
            if family == "tcp":
                client = socket.create_connection(lsock.getsockname())
                server, _ = lsock.accept()
            else:
                client, server = socket.socketpair(socket.AF_UNIX)
            server.sendall(b"hello")
            _wait_readable(client)
            client.setblocking(False)
            events = []
            if family == "tcp":
                tr, pr = await loop.create_connection(lambda: proto(events), sock=client)
            else:
                tr, pr = await loop.create_unix_connection(lambda: proto(events), sock=client)
            events.append(("resumed", None))
            await asyncio.sleep(0)
            while "data" not in _kinds(events):
                await asyncio.sleep(0.001)
            kinds = [k for k in _kinds(events) if k != "get_buffer"]
            assert kinds[:3] == ["made", "resumed", "data"], events
            tr.close()
            await pr.lost
            server.close()
        if family == "tcp":
            lsock.close()

    run(main)


def test_create_connection_greeting_server_in_a_thread(run):
    """The address path (getaddrinfo, connect): a server thread greets at once."""
    lsock = socket.create_server((HOST, 0))
    lsock.settimeout(30)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"hello")
                    conn.recv(1)        # until the client closes
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(REPEAT):
            events = []
            tr, pr = await loop.create_connection(lambda: Log(events), *lsock.getsockname())
            events.append(("resumed", None))
            while "data" not in _kinds(events):
                await asyncio.sleep(0.001)
            assert _kinds(events)[:3] == ["made", "resumed", "data"], events
            tr.close()
            await pr.lost

    try:
        run(main)
    finally:
        stop.set()
        socket.create_connection(lsock.getsockname()).close()   # out of accept()
        thread.join(10)
        lsock.close()


def test_connect_accepted_socket_resumes_before_queued_data(run):
    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server((HOST, 0))
        for _ in range(REPEAT):
            client = socket.create_connection(lsock.getsockname())
            server, _ = lsock.accept()
            client.sendall(b"request")
            _wait_readable(server)
            server.setblocking(False)
            events = []
            tr, pr = await loop.connect_accepted_socket(lambda: Log(events), server)
            events.append(("resumed", None))
            while "data" not in _kinds(events):
                await asyncio.sleep(0.001)
            assert _kinds(events)[:3] == ["made", "resumed", "data"], events
            tr.close()
            await pr.lost
            client.close()
        lsock.close()

    run(main)


def test_datagram_endpoint_resumes_before_queued_datagram(run):
    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(REPEAT):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((HOST, 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.sendto(b"dgram", sock.getsockname())
            _wait_readable(sock)
            sock.setblocking(False)
            events = []

            class D(asyncio.DatagramProtocol):
                def connection_made(self, transport):
                    events.append("made")

                def datagram_received(self, data, addr):
                    events.append("data")

            tr, _ = await loop.create_datagram_endpoint(D, sock=sock)
            events.append("resumed")
            while "data" not in events:
                await asyncio.sleep(0.001)
            assert events[:3] == ["made", "resumed", "data"], events
            tr.close()
            await asyncio.sleep(0)

    run(main)


def test_read_pipe_resumes_before_queued_data(run):
    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(REPEAT):
            rfd, wfd = os.pipe()
            os.write(wfd, b"piped")
            events = []
            pipe = os.fdopen(rfd, "rb", 0)
            tr, pr = await loop.connect_read_pipe(lambda: Log(events), pipe)
            events.append(("resumed", None))
            while "data" not in _kinds(events):
                await asyncio.sleep(0.001)
            assert _kinds(events)[:3] == ["made", "resumed", "data"], events
            os.close(wfd)
            await pr.lost
            tr.close()

    run(main)


async def _tls_greeter(pki, greet_after_tls):
    """A server that greets over TLS: at once (ssl=), or after STARTTLS (start_tls)."""
    loop = asyncio.get_running_loop()
    sctx = pki.server_ctx()

    async def handler(reader, writer):
        try:
            if greet_after_tls:
                await reader.readexactly(9)     # STARTTLS\n
                writer.write(b"GO\n")
                await writer.drain()
                await writer.start_tls(sctx)    # reading pauses before the client can go on
            writer.write(b"hello")
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    if greet_after_tls:
        return await asyncio.start_server(handler, HOST, 0)
    return await asyncio.start_server(handler, HOST, 0, ssl=sctx)


class Plain(asyncio.Protocol):
    """The client's side before STARTTLS: says it, and waits for the server's go."""

    def __init__(self):
        self.go = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        transport.write(b"STARTTLS\n")

    def data_received(self, data):
        assert data == b"GO\n"
        self.go.set_result(None)


def test_tls_create_connection_resumes_before_data(run, pki):
    async def main():
        loop = asyncio.get_running_loop()
        server = await _tls_greeter(pki, False)
        port = server.sockets[0].getsockname()[1]
        cctx = pki.client_ctx()
        for _ in range(REPEAT // 3):
            events = []
            tr, pr = await loop.create_connection(lambda: Log(events), HOST, port, ssl=cctx,
                                                  server_hostname=HOSTNAME)
            events.append(("resumed", None))
            while "data" not in _kinds(events):
                await asyncio.sleep(0.001)
            assert _kinds(events)[:3] == ["made", "resumed", "data"], events
            tr.close()
            await pr.lost
        server.close()
        await server.wait_closed()

    run(main)


def test_start_tls_resumes_before_data(run, pki):
    async def main():
        loop = asyncio.get_running_loop()
        server = await _tls_greeter(pki, True)
        port = server.sockets[0].getsockname()[1]
        cctx = pki.client_ctx()
        for _ in range(REPEAT // 3):
            events = []
            tr, plain = await loop.create_connection(Plain, HOST, port)
            await plain.go
            tls_proto = Log(events)
            tls = await loop.start_tls(tr, tls_proto, cctx, server_hostname=HOSTNAME)
            events.append(("resumed", None))
            while "data" not in _kinds(events):
                await asyncio.sleep(0.001)
            assert _kinds(events)[:2] == ["resumed", "data"], events
            tls.close()
            await tls_proto.lost
        server.close()
        await server.wait_closed()

    run(main)


# Not with SQPOLL: its kernel thread completes the read whenever it gets to it, so which
# iteration the bytes belong to is not defined there (the order above holds whichever it is).
@pytest.mark.parametrize("loop_name", ["asyncio", "kbloop", "kbloop-busy_poll"])
def test_io_runs_before_timers_and_what_it_schedules_after(run):
    """Within one iteration: the ready callbacks, then the I/O, then the due timers; what
    the I/O schedules runs after them."""

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(REPEAT):
            a, b = socket.socketpair()
            a.setblocking(False)
            events = []

            class P(asyncio.Protocol):
                def data_received(self, data):
                    events.append("data")
                    loop.call_soon(events.append, "from-data")

            tr, _ = await loop.create_unix_connection(P, sock=a)
            await asyncio.sleep(0)
            await asyncio.sleep(0)      # reading now
            b.sendall(b"x")     # AF_UNIX: in a's queue (and its read completed) on return
            # One callback already ready, and a timer due by the time the loop polls.
            loop.call_soon(events.append, "ready")
            loop.call_at(loop.time() - 1, events.append, "timer")
            while "from-data" not in events:
                await asyncio.sleep(0)
            assert events == ["ready", "data", "timer", "from-data"], events
            tr.close()
            b.close()
            await asyncio.sleep(0)

    run(main)


# ----------------------------------------------------------------------------- contexts


class CtxServer(asyncio.Protocol):
    """Server protocol recording `var` in every callback."""

    def __init__(self, record):
        self.record = record

    def connection_made(self, transport):
        self.transport = transport
        self.record.append(("made", var.get()))

    def data_received(self, data):
        self.record.append(("data", var.get()))
        if data == b"big":
            transport = self.transport
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                          socket.SO_SNDBUF, 4096)
            transport.set_write_buffer_limits(high=1)
            transport.write(b"x" * BIG)     # pause_writing, then resume_writing when sent

    def pause_writing(self):
        self.record.append(("pause_writing", var.get()))

    def resume_writing(self):
        self.record.append(("resume_writing", var.get()))

    def eof_received(self):
        self.record.append(("eof", var.get()))
        self.transport.close()

    def connection_lost(self, exc):
        self.record.append(("lost", var.get()))


def test_server_callbacks_run_in_the_servers_context(run):
    async def main():
        loop = asyncio.get_running_loop()
        record = []
        lost = []
        var.set("server")

        def factory():
            record.append(("factory", var.get()))
            proto = CtxServer(record)
            orig = proto.connection_lost

            def connection_lost(exc):
                orig(exc)
                lost.append(1)
            proto.connection_lost = connection_lost
            return proto

        server = await loop.create_server(factory, HOST, 0)
        var.set("caller")       # after create_server: not what the connections see
        r, w = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        w.write(b"big")
        await r.readexactly(BIG)
        w.write_eof()
        await r.read()
        w.close()
        while not lost:
            await asyncio.sleep(0.001)
        server.close()
        await server.wait_closed()
        kinds = [k for k, _ in record]
        for needed in ("factory", "made", "data", "pause_writing", "resume_writing", "eof",
                       "lost"):
            assert needed in kinds, record
        assert all(v == "server" for _, v in record), record
        assert var.get() == "caller"

    run(main)


def test_buffered_protocol_callbacks_see_the_callers_context(run):
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        events = []
        var.set("client")
        tr, pr = await loop.create_connection(lambda: BufLog(events), sock=a)
        var.set("changed later")
        b.sendall(b"data")
        b.shutdown(socket.SHUT_WR)
        await pr.lost
        b.close()
        kinds = _kinds(events)
        for needed in ("made", "get_buffer", "data", "eof", "lost"):
            assert needed in kinds, events
        assert all(v == "client" for _, v in events), events

    run(main)


def test_streams_handler_sees_the_servers_context(run):
    async def main():
        seen = []
        var.set("request-id-42")

        async def handler(reader, writer):
            seen.append(var.get())
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, HOST, 0)
        var.set("unset")
        r, w = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        w.write(b"hi\n")
        assert await r.readline() == b"hi\n"
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()
        assert seen == ["request-id-42"]

    run(main)


def test_client_callbacks_do_not_leak_into_the_caller(run):
    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(
            lambda r, w: (w.write(b"hello"), w.close()), HOST, 0)
        var.set("caller")
        events = []

        class P(Log):
            def connection_made(self, transport):
                super().connection_made(transport)
                other.set("set by connection_made")

            def data_received(self, data):
                super().data_received(data)
                other.set("set by data_received")

        for _ in range(10):
            tr, pr = await loop.create_connection(lambda: P(events),
                                                  *server.sockets[0].getsockname()[:2])
            assert other.get() == "unset"
            await pr.lost
            assert other.get() == "unset"
        server.close()
        await server.wait_closed()
        assert {v for _, v in events} == {"caller"}, events
        assert {"made", "data", "eof", "lost"} <= set(_kinds(events))

    run(main)


def test_accepted_connections_have_their_own_contexts(run):
    """What one connection's callbacks set stays in that connection (asyncio: a task per
    accepted connection)."""

    async def main():
        loop = asyncio.get_running_loop()
        var.set("server")
        seen = []

        class P(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                name = data.decode()
                seen.append((name, other.get()))
                if other.get() == "unset":
                    other.set(name)
                self.transport.write(b"k")

        server = await loop.create_server(P, HOST, 0)
        addr = server.sockets[0].getsockname()[:2]
        conns = [await asyncio.open_connection(*addr) for _ in range(4)]
        for rnd in range(3):
            for i, (r, w) in enumerate(conns):
                w.write(f"c{i}".encode())
                await r.readexactly(1)
        for r, w in conns:
            w.close()
            await w.wait_closed()
        server.close()
        await server.wait_closed()
        assert other.get() == "unset"
        for i in range(4):
            mine = [v for name, v in seen if name == f"c{i}"]
            assert mine == ["unset", f"c{i}", f"c{i}"], seen

    run(main)


def test_datagram_callbacks_see_the_callers_context(run):
    async def main():
        loop = asyncio.get_running_loop()
        events = []
        done = loop.create_future()

        class D(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                events.append(("made", var.get()))

            def datagram_received(self, data, addr):
                events.append(("data", var.get()))
                other.set("set by datagram_received")

            def error_received(self, exc):
                events.append(("error", var.get()))

            def connection_lost(self, exc):
                events.append(("lost", var.get()))
                done.set_result(None)

        # A port nobody listens on: the connected endpoint's send is refused (error_received).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            dead = s.getsockname()
        var.set("udp")
        tr, _ = await loop.create_datagram_endpoint(D, remote_addr=dead)
        var.set("later")
        tr.sendto(b"ping")
        while "error" not in _kinds(events):
            await asyncio.sleep(0.001)
        tr.close()
        await done
        events2 = []
        var.set("udp2")
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((HOST, 0))
        rx.setblocking(False)

        class R(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                events2.append(("made", var.get()))

            def datagram_received(self, data, addr):
                events2.append(("data", var.get()))
                other.set("set by datagram_received")

            def connection_lost(self, exc):
                events2.append(("lost", var.get()))

        tr3, _ = await loop.create_datagram_endpoint(R, sock=rx)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", rx.getsockname())
        while "data" not in _kinds(events2):
            await asyncio.sleep(0.001)
        tr3.close()
        await asyncio.sleep(0)
        events2 = [e for e in events2 if e[0] != "lost"]
        assert other.get() == "unset"
        # (connection_lost after close() runs in the closer's context on asyncio: 'later')
        assert {v for k, v in events if k != "lost"} == {"udp"}, events
        assert {v for _, v in events2} == {"udp2"}, events2

    run(main)


def test_pipe_callbacks_see_the_callers_context(run):
    async def main():
        loop = asyncio.get_running_loop()
        events = []
        rfd, wfd = os.pipe()
        var.set("pipe")
        tr, pr = await loop.connect_read_pipe(lambda: Log(events), os.fdopen(rfd, "rb", 0))
        var.set("later")
        os.write(wfd, b"x")
        os.close(wfd)
        await pr.lost
        tr.close()
        assert {"made", "data", "eof", "lost"} <= set(_kinds(events)), events
        assert {v for _, v in events} == {"pipe"}, events

    run(main)


def test_subprocess_callbacks_see_the_callers_context(run):
    async def main():
        loop = asyncio.get_running_loop()
        events = []
        exited = loop.create_future()

        class S(asyncio.SubprocessProtocol):
            def connection_made(self, transport):
                events.append(("made", var.get()))

            def pipe_data_received(self, fd, data):
                events.append(("data", var.get()))

            def pipe_connection_lost(self, fd, exc):
                events.append(("pipe_lost", var.get()))

            def process_exited(self):
                events.append(("exited", var.get()))
                exited.set_result(None)

        var.set("subprocess")
        tr, _ = await loop.subprocess_exec(S, sys.executable, "-c", "print('hi')",
                                           stdin=None, stderr=None)
        var.set("later")
        await exited
        while "pipe_lost" not in _kinds(events):
            await asyncio.sleep(0.001)
        tr.close()
        assert _kinds(events)[0] == "made"
        assert {"data", "pipe_lost", "exited"} <= set(_kinds(events)), events
        checked = [(k, v) for k, v in events
                   # asyncio 3.11's default child watcher reports the exit from its thread
                   if not (k == "exited" and sys.version_info < (3, 12))]
        assert {v for _, v in checked} == {"subprocess"}, events

    run(main)


def test_tls_callbacks_see_the_servers_and_callers_context(run, pki):
    async def main():
        loop = asyncio.get_running_loop()
        record = []
        var.set("tls-server")

        def factory():
            record.append(("factory", var.get()))
            return CtxServer(record)

        server = await loop.create_server(factory, HOST, 0, ssl=pki.server_ctx())
        var.set("tls-client")
        events = []
        tr, pr = await loop.create_connection(lambda: Log(events),
                                              *server.sockets[0].getsockname()[:2],
                                              ssl=pki.client_ctx(), server_hostname=HOSTNAME)
        var.set("later")
        tr.write(b"hi")
        while not any(k == "data" for k, _ in record):
            await asyncio.sleep(0.001)
        tr.close()
        await pr.lost
        server.close()
        await server.wait_closed()
        assert {"factory", "made", "data"} <= {k for k, _ in record}, record
        assert {v for _, v in record} == {"tls-server"}, record
        assert {v for _, v in events} == {"tls-client"}, events

    run(main)


def test_start_tls_callbacks_see_the_context_of_its_caller(run, pki):
    async def main():
        loop = asyncio.get_running_loop()
        server = await _tls_greeter(pki, True)
        port = server.sockets[0].getsockname()[1]
        var.set("plain")
        tr, plain = await loop.create_connection(Plain, HOST, port)
        await plain.go
        events = []
        var.set("tls")
        tls_proto = Log(events)
        tls = await loop.start_tls(tr, tls_proto, pki.client_ctx(), server_hostname=HOSTNAME)
        var.set("later")
        while "data" not in _kinds(events):
            await asyncio.sleep(0.001)
        tls.close()
        await tls_proto.lost
        server.close()
        await server.wait_closed()
        assert {v for _, v in events} == {"tls"}, events

    run(main)


def test_interrupt_before_dispatch_loses_nothing(loop_factory, loop_name):
    """KeyboardInterrupt from a ready callback: the I/O its iteration polled is delivered by
    the next run, in order; a loop closed instead releases it (nothing in flight)."""
    for close_instead in (False, True):
        for _ in range(20):
            loop = loop_factory()
            a, b = socket.socketpair()
            a.setblocking(False)
            got = []

            class P(asyncio.Protocol):
                def data_received(self, data):
                    got.append(data)

            def interrupt():
                raise KeyboardInterrupt

            try:
                tr, _ = loop.run_until_complete(loop.create_unix_connection(P, sock=a))
                loop.run_until_complete(asyncio.sleep(0))       # reading now
                b.sendall(b"kept")
                loop.call_soon(interrupt)
                with pytest.raises(KeyboardInterrupt):
                    loop.run_forever()
                if close_instead:
                    tr.abort()
                else:
                    loop.call_soon(got.append, "ready")
                    while b"kept" not in got:
                        loop.run_until_complete(asyncio.sleep(0))
                    assert got[0] == b"kept", got
                    tr.close()
                    loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.close()
                b.close()
            if loop_name.startswith("kbloop"):
                assert loop.stats()["inflight"] == 0
                assert loop.stats()["bufs_out"] == 0
