"""TLS on the loop under test, asyncio as the control (identical assertions).

The module makes its own CA and a server certificate for ``localhost``/127.0.0.1 (with the
``cryptography`` package) in a temp dir. Covered: create_server/create_connection with ssl,
start_server/open_connection, the unix socket variants, start_tls on a plain connection (both
the streams and the loop API), ssl_handshake_timeout against a peer that never speaks TLS (both
directions), ssl_shutdown_timeout, get_extra_info, a peer vanishing mid-handshake without fd
leaks, and aiohttp end to end (https + wss) trusting the test CA.
"""
import asyncio
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import struct
import tempfile

import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

HOST = "127.0.0.1"
HOSTNAME = "localhost"


# ---------------------------------------------------------------------------- certificates


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kbloop tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path, key):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _write_cert(path, cert):
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class PKI:
    def __init__(self, directory):
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("kbloop test CA")
        ca = (x509.CertificateBuilder()
              .subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(_name(HOSTNAME)).issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName(HOSTNAME), x509.IPAddress(ipaddress.ip_address(HOST))]),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_file = os.path.join(directory, "ca.pem")
        self.cert_file = os.path.join(directory, "server.pem")
        self.key_file = os.path.join(directory, "server.key")
        _write_cert(self.ca_file, ca)
        _write_cert(self.cert_file, cert)
        _write_key(self.key_file, key)

    def server_ctx(self):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_ctx(self):
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(str(tmp_path_factory.mktemp("pki")))


# ----------------------------------------------------------------------------- helpers


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.close()


class Collector(asyncio.Protocol):
    def __init__(self):
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.lost = loop.create_future()
        self.want = None
        self.enough = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if self.want is not None and len(self.data) >= self.want and not self.enough.done():
            self.enough.set_result(None)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


def extra_info(transport_or_writer):
    get = transport_or_writer.get_extra_info
    sslobj = get("ssl_object")
    return {
        "ssl_object_type": type(sslobj).__name__,
        "peercert": get("peercert"),
        "cipher": get("cipher"),
        "cipher_matches": get("cipher") == sslobj.cipher(),
        "compression": get("compression"),
        "compression_matches": get("compression") == sslobj.compression(),
        "version": sslobj.version(),
        "sslcontext": type(get("sslcontext")).__name__,
        "peername": get("peername") is not None or get("socket").family == socket.AF_UNIX,
    }


def check_client_info(info):
    assert info["ssl_object_type"] == "SSLObject"
    subject = dict(x[0] for x in info["peercert"]["subject"])
    assert subject["commonName"] == HOSTNAME
    assert ("DNS", HOSTNAME) in info["peercert"]["subjectAltName"]
    name, version, bits = info["cipher"]
    assert isinstance(name, str) and bits >= 128
    assert info["cipher_matches"] and info["compression_matches"]
    assert info["compression"] is None
    assert info["version"] in ("TLSv1.2", "TLSv1.3")
    assert info["sslcontext"] == "SSLContext"
    assert info["peername"]


def check_server_info(info):
    assert info["ssl_object_type"] == "SSLObject"
    assert info["peercert"] is None  # no client certificate requested
    assert info["cipher_matches"] and info["compression_matches"]
    assert info["version"] in ("TLSv1.2", "TLSv1.3")


async def raw_listener(family=socket.AF_INET, path=None):
    """A plain listening socket (blocking-free) that the test accepts from by hand."""
    if family == socket.AF_UNIX:
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
    else:
        lsock = socket.socket()
        lsock.bind((HOST, 0))
    lsock.listen(8)
    lsock.setblocking(False)
    return lsock


# ------------------------------------------------------------------------------- tests


def test_create_server_create_connection_echo(run, pki):
    payload = os.urandom(3 * 1024 * 1024 + 17)  # exercises SSL flow control both ways

    async def main():
        loop = asyncio.get_running_loop()
        server_infos = []

        class ServerEcho(Echo):
            def connection_made(self, transport):
                super().connection_made(transport)
                server_infos.append(extra_info(transport))

        server = await loop.create_server(ServerEcho, HOST, 0, ssl=pki.server_ctx())
        port = server.sockets[0].getsockname()[1]
        async with server:
            tr, proto = await loop.create_connection(
                Collector, HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME)
            info = extra_info(tr)
            proto.want = len(payload)
            for i in range(0, len(payload), 100_000):
                tr.write(payload[i:i + 100_000])
            await asyncio.wait_for(proto.enough, 30)
            tr.close()
            lost = await asyncio.wait_for(proto.lost, 10)
            # hostname verification: connecting with a wrong name fails
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.create_connection(asyncio.Protocol, HOST, port,
                                             ssl=pki.client_ctx(), server_hostname="wrong.test")
            # and so does an untrusting client
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.create_connection(asyncio.Protocol, HOST, port,
                                             ssl=ssl.create_default_context(),
                                             server_hostname=HOSTNAME)
        return bytes(proto.data), info, server_infos[0], lost

    data, info, server_info, lost = run(main, timeout=30)
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    check_client_info(info)
    check_server_info(server_info)
    assert lost is None


def test_start_server_open_connection(run, pki):
    async def main():
        async def handle(reader, writer):
            info = extra_info(writer)
            while (line := await reader.readline()) not in (b"", b"QUIT\n"):
                writer.write(line.upper())
                await writer.drain()
            if line:
                writer.write(info["version"].encode())
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, HOST, 0, ssl=pki.server_ctx(),
                                            ssl_handshake_timeout=10, limit=1 << 20)
        port = server.sockets[0].getsockname()[1]
        async with server:
            results = []
            for _ in range(3):  # several sequential connections
                reader, writer = await asyncio.open_connection(
                    HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME)
                info = extra_info(writer)
                lines = []
                for i in range(100):
                    writer.write(f"line {i}\n".encode())
                    await writer.drain()
                    lines.append(await reader.readline())
                writer.write(b"QUIT\n")  # (TLS transports cannot write_eof)
                tail = await reader.read()
                writer.close()
                await writer.wait_closed()
                results.append((lines, tail, info))

            # concurrent clients
            async def one(k):
                r, w = await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                                     server_hostname=HOSTNAME, limit=1 << 20)
                w.write(b"x" * 100_000 + b"\n")
                got = await r.readline()
                w.close()
                await w.wait_closed()
                return len(got)

            lens = await asyncio.gather(*(one(k) for k in range(10)))
        return results, lens

    results, lens = run(main, timeout=30)
    for lines, tail, info in results:
        assert lines == [f"LINE {i}\n".encode() for i in range(100)]
        assert tail in (b"TLSv1.3", b"TLSv1.2")
        check_client_info(info)
    assert lens == [100_001] * 10


def test_unix_socket_tls(run, pki):
    d = tempfile.mkdtemp(prefix="kbtls-")
    path = os.path.join(d, "tls.sock")
    path2 = os.path.join(d, "tls2.sock")

    async def main():
        loop = asyncio.get_running_loop()

        async def handle(reader, writer):
            data = await reader.readexactly(4)
            n = struct.unpack("!I", data)[0]
            body = await reader.readexactly(n)
            writer.write(hashlib.sha256(body).digest())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_unix_server(handle, path, ssl=pki.server_ctx())
        async with server:
            body = os.urandom(1024 * 1024)
            reader, writer = await asyncio.open_unix_connection(
                path, ssl=pki.client_ctx(), server_hostname=HOSTNAME)
            info = extra_info(writer)
            writer.write(struct.pack("!I", len(body)) + body)
            digest = await reader.readexactly(32)
            writer.close()
            await writer.wait_closed()

        # low-level variants: create_unix_server + create_unix_connection
        server2 = await loop.create_unix_server(Echo, path2, ssl=pki.server_ctx())
        async with server2:
            tr, proto = await loop.create_unix_connection(
                Collector, path2, ssl=pki.client_ctx(), server_hostname=HOSTNAME)
            proto.want = 5
            tr.write(b"hello")
            await asyncio.wait_for(proto.enough, 10)
            tr.close()
            await asyncio.wait_for(proto.lost, 10)
        return digest == hashlib.sha256(body).digest(), info, bytes(proto.data)

    try:
        ok, info, echoed = run(main, timeout=30)
    finally:
        for p in (path, path2):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(d)
    assert ok
    check_client_info(info)
    assert echoed == b"hello"


def test_start_tls_streams_upgrade(run, pki):
    async def main():
        async def handle(reader, writer):
            assert await reader.readline() == b"STARTTLS\n"
            writer.write(b"GO\n")
            await writer.drain()
            await writer.start_tls(pki.server_ctx())
            assert writer.get_extra_info("ssl_object") is not None
            while line := await reader.readline():
                writer.write(b"secure:" + line)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, HOST, 0, limit=1 << 20)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
            plain_ssl = writer.get_extra_info("ssl_object")
            writer.write(b"STARTTLS\n")
            assert await reader.readline() == b"GO\n"
            await writer.start_tls(pki.client_ctx(), server_hostname=HOSTNAME)
            info = extra_info(writer)
            writer.write(b"ping\n")
            reply = await reader.readline()
            big = b"z" * 500_000 + b"\n"
            writer.write(big)
            big_reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
        return plain_ssl, info, reply, len(big_reply)

    plain_ssl, info, reply, big_len = run(main, timeout=30)
    assert plain_ssl is None
    check_client_info(info)
    assert reply == b"secure:ping\n"
    assert big_len == len("secure:") + 500_001


def test_loop_start_tls_protocol_level(run, pki):
    async def main():
        loop = asyncio.get_running_loop()
        upgraded = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                assert data == b"UPGRADE"
                self.transport.write(b"OK")
                loop.create_task(self.upgrade())

            async def upgrade(self):
                echo = Echo()
                tr = await loop.start_tls(self.transport, echo, pki.server_ctx(),
                                          server_side=True, ssl_handshake_timeout=10)
                echo.connection_made(tr)
                upgraded.set_result(tr)

        server = await loop.create_server(Server, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            tr, proto = await loop.create_connection(Collector, HOST, port)
            proto.want = 2
            tr.write(b"UPGRADE")
            await asyncio.wait_for(proto.enough, 10)
            assert bytes(proto.data) == b"OK"
            proto.data.clear()
            new = Collector()
            tls_tr = await loop.start_tls(tr, new, pki.client_ctx(),
                                          server_hostname=HOSTNAME, ssl_handshake_timeout=10,
                                          ssl_shutdown_timeout=5)
            new.connection_made(tls_tr)
            srv_tr = await asyncio.wait_for(upgraded, 10)
            new.want = 11
            tls_tr.write(b"hello again")
            await asyncio.wait_for(new.enough, 10)
            info = extra_info(tls_tr)
            srv_info = extra_info(srv_tr)
            tls_tr.close()
            await asyncio.wait_for(new.lost, 10)
        return bytes(new.data), info, srv_info, tr.is_closing()

    data, info, srv_info, raw_closing = run(main, timeout=30)
    assert data == b"hello again"
    check_client_info(info)
    check_server_info(srv_info)
    assert raw_closing


def test_ssl_handshake_timeout_client_side(run, pki):
    """The server accepts but never speaks TLS: the client's handshake times out with
    asyncio's exception (ConnectionAbortedError on 3.11+), promptly."""

    async def main():
        loop = asyncio.get_running_loop()
        lsock = await raw_listener()
        port = lsock.getsockname()[1]
        accepted = []

        async def accept_forever():
            while True:
                conn, _ = await loop.sock_accept(lsock)
                accepted.append(conn)  # keep it open, never answer

        acceptor = asyncio.create_task(accept_forever())
        try:
            t0 = loop.time()
            with pytest.raises(ConnectionAbortedError) as exc:
                await loop.create_connection(asyncio.Protocol, HOST, port,
                                             ssl=pki.client_ctx(), server_hostname=HOSTNAME,
                                             ssl_handshake_timeout=0.3)
            elapsed = loop.time() - t0
            t0 = loop.time()
            with pytest.raises(ConnectionAbortedError):
                await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                              server_hostname=HOSTNAME,
                                              ssl_handshake_timeout=0.2)
            elapsed2 = loop.time() - t0
            # the aborted client closed its end: the server side sees EOF
            conn = accepted[0]
            conn.setblocking(False)
            while True:
                data = await asyncio.wait_for(loop.sock_recv(conn, 65536), 5)
                if not data:
                    break
            return str(exc.value), elapsed, elapsed2, len(accepted)
        finally:
            acceptor.cancel()
            for c in accepted:
                c.close()
            lsock.close()

    msg, elapsed, elapsed2, n = run(main, timeout=30)
    assert "SSL handshake is taking longer than 0.3 seconds" in msg
    assert 0.25 <= elapsed < 3
    assert 0.15 <= elapsed2 < 3
    assert n == 2


def test_ssl_handshake_timeout_server_side(run, pki, no_fd_leak):
    """A client connects to a TLS server and never sends a ClientHello: the server aborts the
    connection after ssl_handshake_timeout (the client sees EOF/reset) and keeps serving."""

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, HOST, 0, ssl=pki.server_ctx(),
                                          ssl_handshake_timeout=0.3)
        port = server.sockets[0].getsockname()[1]
        async with server:
            sock = socket.create_connection((HOST, port))
            sock.setblocking(False)
            t0 = loop.time()
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
            except ConnectionResetError:
                data = b""
            elapsed = loop.time() - t0
            sock.close()
            # still serving real TLS clients
            r, w = await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                                 server_hostname=HOSTNAME)
            w.write(b"alive")
            echoed = await r.readexactly(5)
            w.close()
            await w.wait_closed()
        return data, elapsed, echoed

    data, elapsed, echoed = run(main, timeout=30)
    assert data == b""
    assert 0.25 <= elapsed < 5
    assert echoed == b"alive"


def test_ssl_shutdown_timeout_accepted_and_validated(run, pki):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, HOST, 0, ssl=pki.server_ctx(),
                                          ssl_shutdown_timeout=2.0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            tr, proto = await loop.create_connection(
                Collector, HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME,
                ssl_handshake_timeout=5, ssl_shutdown_timeout=1.5)
            proto.want = 3
            tr.write(b"abc")
            await asyncio.wait_for(proto.enough, 10)
            tr.close()
            lost = await asyncio.wait_for(proto.lost, 10)
            r, w = await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                                 server_hostname=HOSTNAME,
                                                 ssl_shutdown_timeout=0.5)
            w.write(b"x")
            assert await r.readexactly(1) == b"x"
            w.close()
            await w.wait_closed()
            errors = []
            for kwargs in ({"ssl_shutdown_timeout": 1.0}, {"ssl_handshake_timeout": 1.0}):
                try:
                    await loop.create_connection(asyncio.Protocol, HOST, port, **kwargs)
                except ValueError as e:
                    errors.append(str(e))
                try:
                    await loop.create_server(asyncio.Protocol, HOST, 0, **kwargs)
                except ValueError as e:
                    errors.append(str(e))
        return bytes(proto.data), lost, errors

    data, lost, errors = run(main, timeout=30)
    assert data == b"abc"
    assert lost is None
    assert len(errors) == 4
    assert all("only meaningful with ssl" in e for e in errors)


def test_ssl_shutdown_timeout_expires_on_silent_peer(run, pki):
    """The client closes a TLS transport but the peer never answers close_notify (it holds the
    socket open and reads nothing): the transport is aborted after ssl_shutdown_timeout."""

    async def main():
        loop = asyncio.get_running_loop()
        # A TLS server that completes the handshake, then stops reading entirely.
        stall = asyncio.Event()
        stallers = []

        class Staller(asyncio.Protocol):
            def connection_made(self, transport):
                transport.pause_reading()
                stallers.append(transport)
                stall.set()

        server = await loop.create_server(Staller, HOST, 0, ssl=pki.server_ctx())
        port = server.sockets[0].getsockname()[1]
        async with server:
            tr, proto = await loop.create_connection(
                Collector, HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME,
                ssl_shutdown_timeout=0.4)
            await asyncio.wait_for(stall.wait(), 10)
            t0 = loop.time()
            tr.close()
            lost = await asyncio.wait_for(proto.lost, 10)
            elapsed = loop.time() - t0
            for t in stallers:
                t.abort()
        return lost, elapsed

    lost, elapsed = run(main, timeout=30)
    # asyncio aborts the transport and reports TimeoutError('SSL shutdown timed out')
    assert isinstance(lost, TimeoutError), repr(lost)
    assert "shutdown" in str(lost).lower()
    assert 0.35 <= elapsed < 3


CLIENT_HELLO_PREFIX = bytes.fromhex("160301020001") + b"\x00\x01\xfc\x03\x03"


@pytest.mark.parametrize("how", ["partial_hello_then_rst", "partial_hello_then_fin",
                                 "connect_then_close"])
def test_peer_vanishes_mid_handshake_server_side(run, pki, no_fd_leak, how):
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx))
        made = []

        class P(Echo):
            def connection_made(self, transport):
                made.append(transport)
                super().connection_made(transport)

        server = await loop.create_server(P, HOST, 0, ssl=pki.server_ctx(),
                                          ssl_handshake_timeout=5)
        port = server.sockets[0].getsockname()[1]
        async with server:
            for _ in range(5):
                s = socket.create_connection((HOST, port))
                if how != "connect_then_close":
                    s.sendall(CLIENT_HELLO_PREFIX)
                await asyncio.sleep(0.02)
                if how == "partial_hello_then_rst":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            await asyncio.sleep(0.3)
            # the server still works
            r, w = await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                                 server_hostname=HOSTNAME)
            w.write(b"ok")
            echoed = await r.readexactly(2)
            w.close()
            await w.wait_closed()
        await asyncio.sleep(0.05)
        return echoed, len(made)

    echoed, n_made = run(main, timeout=30)
    assert echoed == b"ok"
    assert n_made == 1  # only the real client completed a handshake


def test_peer_vanishes_mid_handshake_client_side(run, pki, no_fd_leak):
    """The server reads part of the ClientHello and disappears: create_connection fails with an
    OSError subclass (ConnectionResetError/SSLError...) and nothing leaks."""

    async def main():
        loop = asyncio.get_running_loop()
        lsock = await raw_listener()
        port = lsock.getsockname()[1]

        async def vanish(rst):
            conn, _ = await loop.sock_accept(lsock)
            with conn:
                conn.setblocking(False)
                await loop.sock_recv(conn, 10)
                if rst:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
        outcomes = []
        try:
            for rst in (False, True):
                task = asyncio.create_task(vanish(rst))
                try:
                    await loop.create_connection(asyncio.Protocol, HOST, port,
                                                 ssl=pki.client_ctx(), server_hostname=HOSTNAME,
                                                 ssl_handshake_timeout=5)
                    outcomes.append("connected?!")
                except OSError:  # ssl.SSLError and ConnectionError are OSErrors
                    outcomes.append("oserror")
                await task
        finally:
            lsock.close()
        return outcomes

    assert run(main, timeout=30) == ["oserror", "oserror"]


def test_aiohttp_https_and_wss_end_to_end(run, pki, loop_name):
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    async def main():
        async def hello(request):
            return web.json_response({
                "loop": type(asyncio.get_running_loop()).__module__,
                "scheme": request.scheme,
                "tls": request.transport.get_extra_info("ssl_object").version()})

        async def upload(request):
            body = await request.read()
            return web.Response(text=hashlib.sha256(body).hexdigest())

        async def ws_handler(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data.upper())
            return ws

        app = web.Application(client_max_size=8 << 20)
        app.router.add_get("/hello", hello)
        app.router.add_post("/upload", upload)
        app.router.add_get("/ws", ws_handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0, ssl_context=pki.server_ctx())
        await site.start()
        port = runner.addresses[0][1]
        body = os.urandom(2 * 1024 * 1024)
        try:
            conn = aiohttp.TCPConnector(ssl=pki.client_ctx())
            async with aiohttp.ClientSession(connector=conn) as s:
                hellos = []
                for _ in range(3):  # keep-alive over TLS
                    async with s.get(f"https://{HOSTNAME}:{port}/hello") as r:
                        hellos.append(await r.json())
                async with s.post(f"https://{HOSTNAME}:{port}/upload", data=body) as r:
                    digest = await r.text()
                async with s.ws_connect(f"wss://{HOSTNAME}:{port}/ws") as ws:
                    await ws.send_str("secure")
                    text = await ws.receive_str()
                    await ws.send_bytes(body)
                    echoed = await ws.receive_bytes()
                # a client that does not trust the test CA is rejected
                async with aiohttp.ClientSession() as untrusting:
                    with pytest.raises(aiohttp.ClientConnectorCertificateError):
                        await untrusting.get(f"https://{HOSTNAME}:{port}/hello")
        finally:
            await runner.cleanup()
        return hellos, digest, text, echoed == body

    hellos, digest, text, echoed_ok = run(main, timeout=30)
    assert all(h["loop"].startswith(loop_name) for h in hellos)
    assert all(h["scheme"] == "https" and h["tls"] in ("TLSv1.2", "TLSv1.3") for h in hellos)
    assert digest is not None and len(digest) == 64
    assert text == "SECURE"
    assert echoed_ok


def test_sendfile_over_tls_falls_back_to_read_and_write(run, pki, tmp_path):
    """A TLS transport cannot use sendfile(2): loop.sendfile falls back (and refuses with
    fallback=False), on both loops."""
    payload = os.urandom(1024 * 1024 + 5)
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)

    async def main():
        loop = asyncio.get_running_loop()
        received = Collector()
        received.want = len(payload)

        server = await loop.create_server(lambda: received, HOST, 0, ssl=pki.server_ctx())
        port = server.sockets[0].getsockname()[1]
        async with server:
            tr, _ = await loop.create_connection(
                asyncio.Protocol, HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME)
            with open(path, "rb") as f:
                with pytest.raises(RuntimeError):
                    await loop.sendfile(tr, f, fallback=False)
                sent = await loop.sendfile(tr, f)
            await asyncio.wait_for(received.enough, 30)
            tr.close()
        return sent, bytes(received.data)

    sent, data = run(main, timeout=30)
    assert sent == len(payload)
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("impl, expected", [(None, "TLSTransport"),
                                            ("asyncio", "_SSLProtocolTransport")])
def test_kbloop_tls_layer_is_used_everywhere(pki, monkeypatch, impl, expected):
    """kbloop's own TLS layer serves create_connection(ssl=), create_server(ssl=) and
    start_tls() alike by default; KBLOOP_TLS=asyncio selects asyncio's sslproto for all."""
    import kbloop
    if impl is None:
        monkeypatch.delenv("KBLOOP_TLS", raising=False)
    else:
        monkeypatch.setenv("KBLOOP_TLS", impl)

    async def main():
        seen = []
        upgraded = asyncio.get_running_loop().create_future()

        async def tls_handler(r, w):
            seen.append(type(w.transport).__name__)
            await r.read()
            w.close()

        async def plain_handler(r, w):
            await w.start_tls(pki.server_ctx())
            upgraded.set_result(type(w.transport).__name__)
            await r.read()
            w.close()

        tls_server = await asyncio.start_server(tls_handler, HOST, 0, ssl=pki.server_ctx())
        plain_server = await asyncio.start_server(plain_handler, HOST, 0)
        r, w = await asyncio.open_connection(
            HOST, tls_server.sockets[0].getsockname()[1], ssl=pki.client_ctx(),
            server_hostname=HOSTNAME)
        seen.append(type(w.transport).__name__)
        w.close()
        r2, w2 = await asyncio.open_connection(HOST, plain_server.sockets[0].getsockname()[1])
        await w2.start_tls(pki.client_ctx(), server_hostname=HOSTNAME)
        seen.append(type(w2.transport).__name__)
        seen.append(await upgraded)
        w2.close()
        for s in (tls_server, plain_server):
            s.close()
        return seen

    with asyncio.Runner(loop_factory=kbloop.new_event_loop) as runner:
        seen = runner.run(asyncio.wait_for(main(), 30))
    assert seen == [expected] * 4, seen
