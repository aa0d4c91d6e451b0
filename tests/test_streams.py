"""asyncio streams (start_server/open_connection) on both loops, the peer-reset behaviour of
StreamReader, connect_accepted_socket, and the unmodified examples/echo_streams.py run under
``python -m kbloop`` (asyncio control: plain ``python``)."""
import asyncio
import hashlib
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from netutil import Recorder, linger_reset
from procutil import subprocess_env

LOCAL = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "echo_streams.py"


async def echo_handler(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _start(handler=echo_handler):
    server = await asyncio.start_server(handler, LOCAL, 0)
    return server, server.sockets[0].getsockname()


async def _stop(server):
    server.close()
    await server.wait_closed()


def test_streams_echo(run):
    async def main():
        server, addr = await _start()
        try:
            reader, writer = await asyncio.open_connection(*addr)
            for msg in (b"a", b"hello", b"x" * 1000):
                writer.write(msg)
                await writer.drain()
                assert await reader.readexactly(len(msg)) == msg
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        finally:
            await _stop(server)

    run(main)


def test_streams_readline_readexactly_readuntil(run):
    async def main():
        async def handler(reader, writer):
            writer.write(b"line1\nline2\nABCDEFrest|more||end")
            await writer.drain()
            writer.close()

        server, addr = await _start(handler)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            assert await reader.readline() == b"line1\n"
            assert await reader.readline() == b"line2\n"
            assert await reader.readexactly(6) == b"ABCDEF"
            assert await reader.readuntil(b"|") == b"rest|"
            assert await reader.readuntil(b"||") == b"more||"
            assert await reader.read() == b"end"
            assert reader.at_eof()
            assert await reader.readline() == b""
            writer.close()
            await writer.wait_closed()
        finally:
            await _stop(server)

    run(main)


def test_streams_readexactly_incomplete(run):
    async def main():
        async def handler(reader, writer):
            writer.write(b"abc")
            writer.close()

        server, addr = await _start(handler)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            with pytest.raises(asyncio.IncompleteReadError) as ei:
                await reader.readexactly(10)
            assert ei.value.partial == b"abc"
            assert ei.value.expected == 10
            writer.close()
            await writer.wait_closed()
        finally:
            await _stop(server)

    run(main)


def test_streams_readuntil_incomplete(run):
    async def main():
        async def handler(reader, writer):
            writer.write(b"no separator here")
            writer.close()

        server, addr = await _start(handler)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            with pytest.raises(asyncio.IncompleteReadError) as ei:
                await reader.readuntil(b"\n")
            assert ei.value.partial == b"no separator here"
            writer.close()
            await writer.wait_closed()
        finally:
            await _stop(server)

    run(main)


def test_streams_drain_large_payload(run):
    async def main():
        digest = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            h = hashlib.sha256()
            n = 0
            while data := await reader.read(1 << 20):
                h.update(data)
                n += len(data)
            writer.write(f"{n} {h.hexdigest()}".encode())
            await writer.drain()
            writer.close()
            digest.set_result(n)

        server, addr = await _start(handler)
        payload = os.urandom(16 * 1024 * 1024)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            view = memoryview(payload)
            for i in range(0, len(payload), 1 << 20):
                writer.write(view[i:i + (1 << 20)])
                await writer.drain()
                # drain returned: the buffer is back under the high-water mark
                assert writer.transport.get_write_buffer_size() <= \
                    writer.transport.get_write_buffer_limits()[1]
            writer.write_eof()
            reply = await reader.read()
            assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
            assert await digest == len(payload)
            writer.close()
            await writer.wait_closed()
        finally:
            await _stop(server)

    run(main)


def test_streams_writer_close_wait_closed(run):
    async def main():
        got = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            got.set_result(await reader.read())
            writer.close()

        server, addr = await _start(handler)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"bye")
            assert not writer.is_closing()
            writer.close()
            assert writer.is_closing()
            await writer.wait_closed()
            assert writer.transport.is_closing()
            assert await got == b"bye"
        finally:
            await _stop(server)

    run(main)


def test_streams_writer_extra_info(run):
    async def main():
        peers = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            peers.set_result((writer.get_extra_info("peername"),
                              writer.get_extra_info("sockname")))
            await reader.read()
            writer.close()

        server, addr = await _start(handler)
        try:
            reader, writer = await asyncio.open_connection(*addr)
            assert writer.get_extra_info("peername") == addr
            server_peer, server_sock = await peers
            assert server_peer == writer.get_extra_info("sockname")
            assert server_sock == addr
            assert writer.get_extra_info("socket").getpeername() == addr
            assert writer.get_extra_info("nope", "dflt") == "dflt"
            writer.close()
            await writer.wait_closed()
        finally:
            await _stop(server)

    run(main)


def test_streams_peer_reset_reader_gets_connection_reset(run):
    async def main():
        result = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            writer.write(b"y" * 100000)  # never read by the client
            try:
                data = await reader.read()
                result.set_result(data)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                result.set_result(exc)

        server, addr = await _start(handler)
        try:
            client = socket.create_connection(addr)
            await asyncio.sleep(0.05)
            linger_reset(client)
            client.close()
            exc = await result
            assert isinstance(exc, ConnectionResetError), repr(exc)
        finally:
            await _stop(server)

    run(main)


def test_connect_accepted_socket(run):
    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket() as ls:
            ls.bind((LOCAL, 0))
            ls.listen(1)
            client = socket.create_connection(ls.getsockname())
            accepted, peer = ls.accept()  # plain blocking accept
            assert peer == client.getsockname()
        try:
            t, p = await loop.connect_accepted_socket(Recorder, accepted)
            assert isinstance(t, asyncio.Transport)
            assert t.get_extra_info("peername") == client.getsockname()
            client.setblocking(False)
            await loop.sock_sendall(client, b"from plain client")
            assert await p.wait_bytes(17) == b"from plain client"
            t.write(b"reply")
            assert await loop.sock_recv(client, 100) == b"reply"
            t.close()
            await p.lost
            assert await loop.sock_recv(client, 100) == b""
        finally:
            client.close()

    run(main)


def test_connect_accepted_socket_streams(run):
    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket() as ls:
            ls.bind((LOCAL, 0))
            ls.listen(1)
            client = socket.create_connection(ls.getsockname())
            accepted, _ = ls.accept()
        try:
            reader = asyncio.StreamReader()
            proto = asyncio.StreamReaderProtocol(reader)
            t, _ = await loop.connect_accepted_socket(lambda: proto, accepted)
            client.sendall(b"line\n")
            client.shutdown(socket.SHUT_WR)
            assert await reader.readline() == b"line\n"
            assert await reader.read() == b""
            t.close()
        finally:
            client.close()

    run(main)


# ---------------------------------------------------------------- examples/echo_streams.py

def _echo_client(port, payload):
    """Blocking client: send payload from a thread, read the echo until EOF."""
    with socket.create_connection((LOCAL, port), timeout=30) as s:
        def sender():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        th = threading.Thread(target=sender)
        th.start()
        chunks = []
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
        th.join()
    return b"".join(chunks)


def test_example_echo_streams_subprocess(loop_name):
    if loop_name == "kbloop":
        cmd = [sys.executable, "-m", "kbloop", str(EXAMPLE), "--port", "0"]
    else:
        cmd = [sys.executable, str(EXAMPLE), "--port", "0"]
    # The kbloop this test imported (a source tree, or an installed wheel), not the clone's:
    # hence not the clone's root as the working folder either (-m puts it on sys.path).
    proc = subprocess.Popen(cmd, cwd=EXAMPLE.parent, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"server did not start: stdout={line!r} rc={proc.returncode} "
                        f"stderr={err[-2000:]}")
        host, port = line.split()[-1].rsplit(":", 1)
        assert host == LOCAL
        port = int(port)
        assert port > 0
        payload = os.urandom(1024 * 1024)
        got = _echo_client(port, payload)
        assert len(got) == len(payload)
        assert got == payload
        # a second connection works too (server keeps serving)
        assert _echo_client(port, b"again") == b"again"
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
