"""uvicorn serving a tiny ASGI app (tests/scripts/asgi_echo_app.py) on kbloop, with
``--loop asyncio`` as the control. Same assertions for both; the app reports the loop's module."""
import concurrent.futures
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import kbloop

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")
KBLOOP_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kbloop.__file__)))

LOOPS = {
    "asyncio": ("asyncio", "asyncio"),
    "kbloop": ("kbloop:new_event_loop", "kbloop"),
}
HTTP_IMPLS = ["httptools", "h11"]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (KBLOOP_ROOT, env.get("PYTHONPATH")) if p
    )
    env.pop("KBLOOP_FORCE_URING_ERROR", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, loop_spec, http_impl):
        self.port = _free_port()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", SCRIPTS, "asgi_echo_app:app",
             "--host", "127.0.0.1", "--port", str(self.port), "--loop", loop_spec,
             "--http", http_impl, "--no-access-log", "--timeout-keep-alive", "30"],
            stdout=self.log, stderr=subprocess.STDOUT, env=subprocess_env(),
        )
        try:
            self._wait_accepting()
        except BaseException:
            self.stop()
            raise

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def _wait_accepting(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"uvicorn exited rc={self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"uvicorn not accepting after {timeout}s:\n{self.output()}")

    def stop(self):
        """SIGTERM (graceful), then kill if needed; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)


@pytest.fixture(scope="module", params=[(l, h) for l in LOOPS for h in HTTP_IMPLS],
                ids=[f"{l}-{h}" for l in LOOPS for h in HTTP_IMPLS])
def server(request):
    loop_name, http_impl = request.param
    spec, expected_prefix = LOOPS[loop_name]
    srv = Server(spec, http_impl)
    srv.expected_prefix = expected_prefix
    try:
        yield srv
    finally:
        srv.stop()
        srv.log.close()


def _json(resp):
    assert resp.status == 200
    return json.loads(resp.read())


def test_app_runs_on_expected_loop(server):
    c = server.conn()
    try:
        c.request("GET", "/whoami")
        data = _json(c.getresponse())
    finally:
        c.close()
    assert data["loop"].startswith(server.expected_prefix), data
    assert data["lifespan_loop"].startswith(server.expected_prefix), data
    assert data["path"] == "/whoami"
    assert data["http_version"] == "1.1"


def test_keep_alive_requests_reuse_one_connection(server):
    c = server.conn()
    try:
        socks, ports = set(), set()
        for i in range(6):
            path = "/sleep" if i % 2 else f"/req/{i}"
            c.request("GET", path)
            resp = c.getresponse()
            assert resp.getheader("connection", "").lower() != "close"
            data = _json(resp)
            assert data["path"] == path
            assert data["method"] == "GET"
            assert data["length"] == 0
            socks.add(id(c.sock))
            ports.add(c.sock.getsockname()[1])
        assert len(socks) == 1 and len(ports) == 1, "connection was not kept alive"
    finally:
        c.close()


def test_post_content_length_body(server):
    body = os.urandom(100_000)
    c = server.conn()
    try:
        c.request("POST", "/echo", body=body)
        data = _json(c.getresponse())
    finally:
        c.close()
    assert data["method"] == "POST"
    assert data["length"] == len(body)
    assert data["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("chunks", [
    [b"hello ", b"chunked ", b"world"],
    [os.urandom(16384) for _ in range(64)],  # 1 MiB
], ids=["small", "1MiB"])
def test_post_chunked_body(server, chunks):
    body = b"".join(chunks)
    c = server.conn()
    try:
        c.request("POST", "/chunked", body=iter(chunks), encode_chunked=True,
                  headers={"Transfer-Encoding": "chunked"})
        data = _json(c.getresponse())
        # and the connection is still usable afterwards
        c.request("GET", "/after")
        after = _json(c.getresponse())
    finally:
        c.close()
    assert data["transfer_encoding"] == "chunked"
    assert data["length"] == len(body)
    assert data["sha256"] == hashlib.sha256(body).hexdigest()
    assert after["path"] == "/after"


def _read_response(f):
    status = f.readline()
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers["content-length"]))
    return status, headers, json.loads(body)


def test_raw_socket_pipelined_requests_with_handwritten_chunks(server):
    reqs = (
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(reqs)
        f = s.makefile("rb")
        results = [_read_response(f) for _ in range(3)]
    assert [r[0].split()[1] for r in results] == [b"200"] * 3
    assert [r[2]["path"] for r in results] == ["/one", "/two", "/three"]
    assert results[1][2]["length"] == len(b"hello world")


def test_concurrent_keep_alive_clients(server):
    def client(k):
        c = server.conn()
        try:
            out = []
            for i in range(5):
                c.request("POST", f"/c{k}/{i}", body=b"x" * (k * 100 + i))
                out.append(_json(c.getresponse()))
            return out
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(client, range(8)))
    for k, out in enumerate(results):
        assert [d["path"] for d in out] == [f"/c{k}/{i}" for i in range(5)]
        assert [d["length"] for d in out] == [k * 100 + i for i in range(5)]
        assert all(d["loop"].startswith(server.expected_prefix) for d in out)


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_uvicorn_graceful_shutdown(loop_name):
    spec, prefix = LOOPS[loop_name]
    srv = Server(spec, "httptools")
    try:
        c = srv.conn()
        c.request("GET", "/")
        assert _json(c.getresponse())["loop"].startswith(prefix)
        c.close()
        rc = srv.stop()
        out = srv.output()
    finally:
        srv.stop()
        srv.log.close()
    # uvicorn re-raises the captured SIGTERM after a graceful shutdown (rc -15); older ones exit 0
    assert rc in (0, -signal.SIGTERM), out
    assert "Application startup complete" in out
    assert "Finished server process" in out
    assert "Traceback" not in out, out
