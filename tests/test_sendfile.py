"""loop.sendfile / loop.sock_sendfile: the native (zero-copy) path, offsets and counts, the
file position afterwards, the fallback and its errors, identical on asyncio and kbloop."""
import asyncio
import hashlib
import io
import os
import socket
import tempfile

import pytest

LOCAL = "127.0.0.1"
SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture(scope="module")
def data_file():
    payload = os.urandom(SIZE)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(payload)
    yield f.name, payload
    os.unlink(f.name)


class Sink(asyncio.Protocol):
    def __init__(self):
        self.chunks = []
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        self.chunks.append(data)

    def eof_received(self):
        self.done.set_result(b"".join(self.chunks))


async def _pair(loop):
    sink = Sink()
    server = await loop.create_server(lambda: sink, LOCAL, 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, LOCAL, port)
    return server, sink, transport


@pytest.mark.parametrize("offset,count", [(0, None), (1000, None), (5, 100_000), (0, SIZE)])
def test_transport_sendfile_native(run, data_file, offset, count):
    path, payload = data_file

    async def main():
        loop = asyncio.get_running_loop()
        server, sink, transport = await _pair(loop)
        try:
            with open(path, "rb") as f:
                # fallback=False: only the native, zero-copy path may do it
                sent = await loop.sendfile(transport, f, offset, count, fallback=False)
                position = f.tell()
            transport.write(b"tail")        # the transport is usable again afterwards
            transport.write_eof()
            received = await sink.done
        finally:
            transport.close()
            server.close()
        return sent, position, received

    sent, position, received = run(main)
    expected = payload[offset:offset + count] if count else payload[offset:]
    assert sent == len(expected)
    assert position == offset + sent
    assert hashlib.sha256(received).digest() == hashlib.sha256(expected + b"tail").digest()


def test_sock_sendfile(run, data_file):
    path, payload = data_file

    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind((LOCAL, 0))
        lsock.listen()
        lsock.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        try:
            accept = asyncio.ensure_future(loop.sock_accept(lsock))
            await loop.sock_connect(client, lsock.getsockname())
            conn, _ = await accept
            received = bytearray()

            async def reader():
                while len(received) < SIZE - 10:
                    chunk = await loop.sock_recv(conn, 65536)
                    if not chunk:
                        break
                    received.extend(chunk)

            rtask = asyncio.ensure_future(reader())
            with open(path, "rb") as f:
                sent = await loop.sock_sendfile(client, f, 10, fallback=False)
            await rtask
            conn.close()
            return sent, bytes(received)
        finally:
            client.close()
            lsock.close()

    sent, received = run(main)
    assert sent == SIZE - 10
    assert received == payload[10:]


def test_empty_file_sends_nothing(run):
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, transport = await _pair(loop)
        try:
            with tempfile.TemporaryFile() as f:
                return await loop.sendfile(transport, f)
        finally:
            transport.close()
            server.close()

    assert run(main) == 0


def test_non_file_object_falls_back_or_raises(run):
    async def main():
        loop = asyncio.get_running_loop()
        server, sink, transport = await _pair(loop)
        try:
            buf = io.BytesIO(b"not a real file" * 1000)
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await loop.sendfile(transport, buf, fallback=False)
            sent = await loop.sendfile(transport, buf)      # the read/write fallback
            transport.write_eof()
            received = await sink.done
        finally:
            transport.close()
            server.close()
        return sent, received

    sent, received = run(main)
    assert sent == 15000
    assert received == b"not a real file" * 1000


def test_sendfile_argument_errors(run, data_file):
    path, _ = data_file

    async def main():
        loop = asyncio.get_running_loop()
        server, sink, transport = await _pair(loop)
        try:
            with open(path, "rb") as f:
                with pytest.raises(ValueError):
                    await loop.sendfile(transport, f, -1)
                with pytest.raises(TypeError):
                    await loop.sendfile(transport, f, "0")
                with pytest.raises(ValueError):
                    await loop.sendfile(transport, f, 0, 0)
            with open(path, "r", encoding="latin-1") as text:
                with pytest.raises(ValueError):
                    await loop.sendfile(transport, text)
            transport.close()
            with open(path, "rb") as f:
                with pytest.raises(RuntimeError):
                    await loop.sendfile(transport, f)
        finally:
            transport.close()
            server.close()

    run(main)


def test_sock_sendfile_on_datagram_socket_is_rejected(run, data_file):
    path, _ = data_file

    async def main():
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            with open(path, "rb") as f:
                with pytest.raises(ValueError):
                    await loop.sock_sendfile(sock, f)
        finally:
            sock.close()

    run(main)
