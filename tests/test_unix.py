"""Unix domain stream sockets: create_unix_server / create_unix_connection / streams.

All parity tests (asyncio is the control); socket paths live in pytest's tmp dirs or in the
abstract namespace.
"""
import asyncio
import errno
import os
import socket
import stat
import sys
import uuid

import pytest

from netutil import EchoProtocol, Recorder


def abstract_name():
    return "\0kbloop-test-" + uuid.uuid4().hex


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "s.sock")


async def _unix_roundtrip(path, payload):
    loop = asyncio.get_running_loop()
    ct, cp = await loop.create_unix_connection(Recorder, path)
    try:
        ct.write(payload)
        return await cp.wait_bytes(len(payload))
    finally:
        ct.close()
        await cp.lost


def test_unix_server_path_echo(run, sock_path):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(EchoProtocol, sock_path)
        try:
            assert len(server.sockets) == 1
            assert server.sockets[0].family == socket.AF_UNIX
            assert server.sockets[0].getsockname() == sock_path
            assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
            assert await _unix_roundtrip(sock_path, b"unix!") == b"unix!"
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_unix_socket_file_after_close_matches_asyncio(run, sock_path):
    # asyncio 3.11 and 3.12 leave the socket file in place when the server closes; 3.13
    # removes it (create_unix_server(cleanup_socket=True), the default), unless it was
    # replaced meanwhile.
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(EchoProtocol, sock_path)
        server.close()
        await server.wait_closed()
        assert os.path.exists(sock_path) == (sys.version_info < (3, 13))
        if sys.version_info < (3, 13):
            return
        server = await loop.create_unix_server(EchoProtocol, sock_path, cleanup_socket=False)
        server.close()
        await server.wait_closed()
        assert os.path.exists(sock_path)
        server = await loop.create_unix_server(EchoProtocol, sock_path)
        os.unlink(sock_path)
        with open(sock_path, "w"):      # not the server's any more: left alone
            pass
        server.close()
        await server.wait_closed()
        assert os.path.isfile(sock_path)

    run(main)


def test_unix_server_replaces_stale_socket_file(run, sock_path):
    async def main():
        loop = asyncio.get_running_loop()
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(sock_path)
        stale.close()
        assert os.path.exists(sock_path)
        server = await loop.create_unix_server(EchoProtocol, sock_path)
        try:
            assert await _unix_roundtrip(sock_path, b"fresh") == b"fresh"
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_unix_server_on_regular_file_is_address_in_use(run, sock_path, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        with open(sock_path, "w") as f:
            f.write("not a socket")
        with pytest.raises(OSError) as ei:
            await loop.create_unix_server(EchoProtocol, sock_path)
        assert ei.value.errno == errno.EADDRINUSE
        with open(sock_path) as f:
            assert f.read() == "not a socket"

    run(main)


def test_unix_connection_extra_info(run, sock_path):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(EchoProtocol, sock_path)
        try:
            ct, cp = await loop.create_unix_connection(Recorder, sock_path)
            assert isinstance(ct, asyncio.Transport)
            assert ct.get_extra_info("peername") == sock_path
            assert ct.get_extra_info("socket").family == socket.AF_UNIX
            ct.close()
            await cp.lost
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_unix_abstract_name(run):
    name = abstract_name()

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(EchoProtocol, name)
        try:
            assert server.sockets[0].getsockname() == name.encode()
            assert await _unix_roundtrip(name, b"abstract") == b"abstract"
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_unix_server_and_connection_with_sock(run, sock_path):
    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(sock_path)
        server = await loop.create_unix_server(EchoProtocol, sock=lsock)
        try:
            assert server.sockets[0].fileno() == lsock.fileno()
            csock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            csock.connect(sock_path)
            ct, cp = await loop.create_unix_connection(Recorder, sock=csock)
            assert ct.get_extra_info("socket").fileno() == csock.fileno()
            ct.write(b"by sock")
            assert await cp.wait_bytes(7) == b"by sock"
            ct.close()
            await cp.lost
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_unix_connection_missing_path_raises(run, sock_path):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(FileNotFoundError):
            await loop.create_unix_connection(asyncio.Protocol, sock_path)

    run(main)


def test_unix_write_eof_half_close(run, sock_path):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(EchoProtocol, sock_path)
        try:
            ct, cp = await loop.create_unix_connection(Recorder, sock_path)
            assert ct.can_write_eof()
            ct.write(b"half")
            ct.write_eof()
            assert await cp.wait_eof() == b"half"
            ct.close()
            await cp.lost
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_start_unix_server_open_unix_connection_echo(run, sock_path):
    async def main():
        async def handle(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_unix_server(handle, sock_path)
        try:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            payload = os.urandom(1024 * 1024)

            async def send():
                writer.write(payload)
                await writer.drain()

            _, got = await asyncio.gather(send(), reader.readexactly(len(payload)))
            assert got == payload
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_start_unix_server_abstract_streams(run):
    name = abstract_name()

    async def main():
        async def handle(reader, writer):
            line = await reader.readline()
            writer.write(line.upper())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, name)
        try:
            reader, writer = await asyncio.open_unix_connection(name)
            writer.write(b"hello abstract\n")
            assert await reader.readline() == b"HELLO ABSTRACT\n"
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    run(main)
