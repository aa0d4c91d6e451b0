"""Issue 15's TLS behaviours that CPython's suite (tests/test_tls_asyncio_suite.py) does not hold.

Each test runs on asyncio (the control) and kbloop, and with KBLOOP_TEST_UVLOOP_TLS=1 on uvloop
too (the reference for the shutdown semantics the issue asks for).  Where asyncio is wrong the test says so and
asserts uvloop's semantics on uvloop and kbloop only (docs/differences.md lists them)."""
import asyncio
import ctypes
import datetime
import os
import socket
import ssl
import struct
import threading

import pytest

import kbloop
from test_tls import HOST, HOSTNAME, PKI, _name

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

try:
    import uvloop
except ImportError:     # pragma: no cover
    uvloop = None

IMPLS = {
    "asyncio": asyncio.new_event_loop,
    "kbloop": lambda: kbloop.new_event_loop(backend="io_uring"),
}
# uvloop, the reference these expectations were taken from, is compared only on request:
# libuv's assertions can abort the whole interpreter when a TLS transport closes in
# some of these cases (MagicStack/uvloop#649; a CI run was lost to a SIGABRT in loop.close()
# here), which would end the suite rather than fail one test.
if uvloop is not None and os.environ.get("KBLOOP_TEST_UVLOOP_TLS") == "1":
    IMPLS["uvloop"] = uvloop.new_event_loop


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(str(tmp_path_factory.mktemp("pki")))


def run_on(impl, coro_fn, timeout=30):
    with asyncio.Runner(loop_factory=IMPLS[impl]) as runner:
        return runner.run(asyncio.wait_for(coro_fn(), timeout))


def uvloop_semantics(impl):
    if impl == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")


class Recorder(asyncio.Protocol):
    def __init__(self):
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.events = []
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


def _handshake(sslobj, incoming, outgoing, sock):
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())


def _ssl_set_shutdown(sslobj, mode):
    """Clear OpenSSL's "close_notify sent" flag so that the peer can send application data
    after its close_notify (what a broken or hostile peer does).  _ssl's object layout:
    PyObject_HEAD, then the socket weakref, then the SSL pointer."""
    lib = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libssl.so" in line:
                lib = ctypes.CDLL(line.split()[-1])
                break
    if lib is None:
        pytest.skip("libssl not found in this process")
    ssl_ptr = ctypes.c_void_p.from_address(id(sslobj._sslobj) + 3 * ctypes.sizeof(ctypes.c_void_p))
    lib.SSL_set_shutdown.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_set_shutdown(ssl_ptr, mode)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_application_data_after_close_notify_is_discarded(pki, impl):
    """The peer sends data, close_notify, then more data: the first data is delivered, then
    eof_received(), then connection_lost(None); what follows close_notify is discarded (kbloop
    with asyncio's sslproto over its transports raised APPLICATION_DATA_AFTER_CLOSE_NOTIFY)."""
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    result = {}

    def peer():
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(10)
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            sslobj = pki.server_ctx().wrap_bio(inc, out, server_side=True)
            _handshake(sslobj, inc, out, conn)
            sslobj.write(b"before")
            try:
                sslobj.unwrap()
            except ssl.SSLWantReadError:
                pass
            blob = out.read()
            _ssl_set_shutdown(sslobj, 0)
            sslobj.write(b"after close_notify")
            conn.sendall(blob + out.read())
            try:    # wait for the other side's close (close_notify or FIN)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            result["peer"] = "done"

    t = threading.Thread(target=peer)
    t.start()

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx))
        tr, proto = await loop.create_connection(Recorder, HOST, port, ssl=pki.client_ctx(),
                                                 server_hostname=HOSTNAME)
        exc = await proto.lost
        await asyncio.sleep(0.05)
        return bytes(proto.data), proto.events, exc, errors

    try:
        data, events, exc, errors = run_on(impl, main)
    finally:
        t.join(15)
        lsock.close()
    assert data == b"before"
    assert events == ["made", "eof", "lost"]
    assert exc is None
    assert errors == []


@pytest.mark.parametrize("impl", list(IMPLS))
def test_close_while_reading_paused(pki, impl):
    """The app pauses reading while the peer streams, then closes: the connection ends at once
    with connection_lost(None), not when ssl_shutdown_timeout expires."""

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx))

        class Streamer(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.stop = False
                loop.create_task(self.pump())

            async def pump(self):
                chunk = b"z" * 65536
                while not self.transport.is_closing():
                    self.transport.write(chunk)
                    await asyncio.sleep(0)
                    if self.transport.get_write_buffer_size() > 1 << 20:
                        await asyncio.sleep(0.01)

            def connection_lost(self, exc):
                pass

        server = await loop.create_server(Streamer, HOST, 0, ssl=pki.server_ctx())
        port = server.sockets[0].getsockname()[1]
        outcomes = []
        async with server:
            for _ in range(5):
                tr, proto = await loop.create_connection(
                    Recorder, HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME,
                    ssl_shutdown_timeout=8)
                while len(proto.data) == 0:
                    await asyncio.sleep(0.005)
                tr.pause_reading()
                await asyncio.sleep(0.05)      # let the peer fill the pipe
                t0 = loop.time()
                tr.close()
                exc = await proto.lost
                outcomes.append((exc, loop.time() - t0 < 6))
        return outcomes, errors

    outcomes, errors = run_on(impl, main, timeout=60)
    if impl == "asyncio":
        # asyncio is wrong here (the issue asks for uvloop's semantics): after its close() it
        # still reads the paused data and fails on the peer's records that follow its own
        # close_notify exchange, with SSLError(APPLICATION_DATA_AFTER_CLOSE_NOTIFY)
        assert all(exc is None or isinstance(exc, ssl.SSLError) for exc, _ in outcomes)
        return
    assert outcomes == [(None, True)] * 5
    assert errors == []


def _client_cert(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("kbloop client")).issuer_name(_name("kbloop client"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file = os.path.join(directory, "client.pem")
    key_file = os.path.join(directory, "client.key")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_client_certificate_and_versions(pki, impl, version, tmp_path):
    """Mutual TLS on TLS 1.2 and 1.3: the server sees the client's certificate; a client
    without one is refused (the server's exception: an SSLError, no call to the handler)."""
    cert_file, key_file = _client_cert(str(tmp_path))

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx))
        sctx = pki.server_ctx()
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.load_verify_locations(cert_file)
        v = getattr(ssl.TLSVersion, version)
        sctx.minimum_version = sctx.maximum_version = v
        seen = loop.create_future()

        async def handle(r, w):
            seen.set_result((w.get_extra_info("peercert"),
                             w.get_extra_info("ssl_object").version()))
            w.write(await r.readexactly(5))
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, HOST, 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            cctx = pki.client_ctx()
            cctx.load_cert_chain(cert_file, key_file)
            r, w = await asyncio.open_connection(HOST, port, ssl=cctx,
                                                 server_hostname=HOSTNAME)
            w.write(b"hello")
            echoed = await r.readexactly(5)
            peercert, ver = await seen
            w.close()
            try:
                await w.wait_closed()
            except OSError:
                pass
            refused = None
            try:       # no client certificate
                r2, w2 = await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                                       server_hostname=HOSTNAME)
                w2.write(b"hello")
                await r2.readexactly(5)
                refused = "accepted?!"
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
                refused = "refused"
        subject = dict(x[0] for x in peercert["subject"])
        return echoed, subject["commonName"], ver, refused, errors

    echoed, cn, ver, refused, errors = run_on(impl, main)
    assert echoed == b"hello"
    assert cn == "kbloop client"
    assert ver == version.replace("_", ".")
    assert refused == "refused"
    assert [e for e in errors if not isinstance(e.get("exception"), OSError)] == []


@pytest.mark.parametrize("impl", list(IMPLS))
def test_garbage_instead_of_handshake(pki, impl):
    """Plain HTTP to a TLS server: that connection ends (the app never sees it), the handler is
    not called for it, the server keeps serving."""

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx))
        made = []

        class P(asyncio.Protocol):
            def connection_made(self, transport):
                made.append(transport)
                transport.write(b"hi")
                transport.close()

        server = await loop.create_server(P, HOST, 0, ssl=pki.server_ctx())
        port = server.sockets[0].getsockname()[1]
        answers = []
        async with server:
            for _ in range(20):
                r, w = await asyncio.open_connection(HOST, port)
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(300))
                try:
                    answers.append(await asyncio.wait_for(r.read(), 10))
                except ConnectionError:
                    answers.append(b"")
                w.close()
            r, w = await asyncio.open_connection(HOST, port, ssl=pki.client_ctx(),
                                                 server_hostname=HOSTNAME)
            hi = await r.read()
            w.close()
        return answers, len(made), hi, errors

    answers, n_made, hi, errors = run_on(impl, main)
    assert n_made == 1 and hi == b"hi"
    # nothing but possibly a TLS alert goes back, never application data
    assert all(a == b"" or a[0] == 0x15 for a in answers), answers
    assert [e for e in errors if not isinstance(e.get("exception"), OSError)] == []


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_peer_vanishes_mid_shutdown(pki, impl, how):
    """We close; the peer reads our close_notify and vanishes (RST or FIN, no close_notify):
    connection_lost() comes promptly, the handler is not called with a non-OSError."""
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]

    def peer():
        for _ in range(5):
            conn, _ = lsock.accept()
            conn.settimeout(10)
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            sslobj = pki.server_ctx().wrap_bio(inc, out, server_side=True)
            try:
                _handshake(sslobj, inc, out, conn)
                sslobj.write(b"x")
                conn.sendall(out.read())
                while True:   # until our close_notify arrives
                    inc.write(conn.recv(65536))
                    try:
                        if not sslobj.read(1024):
                            break       # close_notify
                    except ssl.SSLWantReadError:
                        continue
                    except ssl.SSLZeroReturnError:
                        break
            except OSError:
                pass
            if how == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    t = threading.Thread(target=peer)
    t.start()

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx))
        outcomes = []
        for _ in range(5):
            tr, proto = await loop.create_connection(
                Recorder, HOST, port, ssl=pki.client_ctx(), server_hostname=HOSTNAME,
                ssl_shutdown_timeout=8)
            while not proto.data:
                await asyncio.sleep(0.005)
            t0 = loop.time()
            tr.close()
            exc = await proto.lost
            outcomes.append((exc is None or isinstance(exc, OSError), loop.time() - t0 < 6))
        return outcomes, errors

    try:
        outcomes, errors = run_on(impl, main, timeout=60)
    finally:
        t.join(15)
        lsock.close()
    assert outcomes == [(True, True)] * 5
    assert [e for e in errors if not isinstance(e.get("exception"), OSError)] == []
