"""asyncio on the DPDK datapath: the loop's transports over the lwIP stack (docs/dpdk.md).

Each kbloop program runs with `python -m kbloop --backend dpdk` (or backend="dpdk") in network
namespace A of a veth pair this test creates, where the DPDK port owns vA; namespace B holds the
Linux kernel's stack as the peer (ping, curl, Python sockets).  memif joins two kbloop
programs with no kernel in the path.  Programs report in tagged JSON lines (tests/childproc.py).
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

import childproc
import netns
from kbloop_ext import dpdk

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

built, why_not_built = dpdk.available()
ns_ok, why_no_ns = netns.available()
if not built and os.environ.get("CI"):
    raise RuntimeError(f"CI without the DPDK datapath: {why_not_built}")
pytestmark = [pytest.mark.skipif(not built, reason=why_not_built),
              pytest.mark.skipif(not ns_ok, reason=why_no_ns)]

VDEVS = {
    "af_packet": "net_af_packet0,iface=vA",
    "af_xdp": "net_af_xdp0,iface=vA,start_queue=0,queue_count=1",
}


@pytest.fixture(autouse=True)
def _kill_leftovers():
    yield
    childproc.kill_leftovers()


@pytest.fixture
def net():
    with netns.VethPair() as pair:
        yield pair


class App(childproc.Child):
    """A Python program on kbloop's DPDK datapath: `python -m kbloop --backend dpdk ...`."""

    def __init__(self, args, *, net=None, vdev=VDEVS["af_packet"], ip=None, ready="listening"):
        ip = ip or f"{netns.VethPair.ip_a}/{netns.VethPair.prefix}"
        cmd = [sys.executable, "-m", "kbloop", "--backend", "dpdk", "--dpdk-vdev", vdev,
               "--ip", ip, *args]
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        super().__init__(net.cmd_a(*cmd) if net else cmd, env=env, cwd=REPO,
                         runtime_dirs=["/var/run/dpdk/kbloop{pid}"], what="kbloop DPDK program")
        self.ready_line = self.expect(ready, timeout=60) if ready else None

    def finish(self, timeout=60):
        """SIGTERM (the examples exit 0 on it); the EAL's runtime files must be gone after."""
        self.proc.terminate()
        status = self.wait(timeout)
        assert status == 0, self.proc.stderr.read()[-3000:]
        assert not os.path.exists(f"/var/run/dpdk/kbloop{self.proc.pid}")


def script(tmp_path, name, code):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


# A kernel client in namespace B: echo `total` bytes through (host, port) by hash, while
# reading concurrently, then many short connections.
ECHO_CLIENT = r"""
import hashlib, json, os, socket, sys, threading
host, port, total, short = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port), timeout=30)
sent, got, n = hashlib.sha256(), hashlib.sha256(), [0]
def reader():
    while n[0] < total:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got.update(chunk); n[0] += len(chunk)
t = threading.Thread(target=reader); t.start()
block, left = os.urandom(1 << 20), total
while left:
    piece = block[:min(left, len(block))]
    sent.update(piece); s.sendall(piece); left -= len(piece)
    block = hashlib.sha256(block).digest() * (len(block) // 32)
t.join(120)
s.close()
ok = 0
for i in range(short):
    with socket.create_connection((host, port), timeout=10) as c:
        c.sendall(b"ping %d" % i)
        ok += c.recv(100) == b"ping %d" % i
print(json.dumps({"received": n[0], "same": sent.hexdigest() == got.hexdigest(), "short": ok}))
"""


def kernel_client(net, code, *args, timeout=180):
    r = subprocess.run(net.cmd_b(sys.executable, "-c", code, *map(str, args)),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ unmodified servers

@pytest.mark.parametrize("vdev", list(VDEVS))
@pytest.mark.parametrize("example", ["echo_protocol.py", "echo_streams.py"])
def test_unmodified_echo_servers_serve_kernel_clients(net, vdev, example):
    """The examples, unchanged, under `python -m kbloop --backend dpdk`: the kernel in the
    other namespace pings the stack, echoes 8 MiB through by hash and opens 50 connections."""
    app = App([f"examples/{example}", "--host", "0.0.0.0", "--port", "7000"], net=net,
              vdev=VDEVS[vdev])
    assert app.ready_line == "on 0.0.0.0:7000"
    ping = net.in_b("ping", "-c", "3", "-i", "0.2", "-W", "2", net.ip_a, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    result = kernel_client(net, ECHO_CLIENT, net.ip_a, 7000, 8 << 20, 50)
    assert result == {"received": 8 << 20, "same": True, "short": 50}, result
    app.finish()


def test_unmodified_http_server_answers_curl(net):
    app = App(["examples/http_server.py", "--host", "0.0.0.0", "--port", "8080"], net=net)
    url = f"http://{net.ip_a}:8080/"
    r = net.in_b("curl", "-s", "-i", "--max-time", "10", url, url, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("HTTP/1.1 200") == 2, r.stdout[:500]
    app.finish()


# ------------------------------------------------------------------ the DPDK side as client

KERNEL_ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("READY", flush=True)
def serve(c):
    with c:
        while data := c.recv(1 << 16):
            c.sendall(data)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT_PROGRAM = r"""
import asyncio, hashlib, json, os, socket, sys
import kbloop
peer, port, closed_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}

async def main():
    loop = asyncio.get_running_loop()
    before = loop.stats()["dpdk"]
    out["backend"] = loop.backend
    r, w = await asyncio.open_connection(peer, port)
    sock = w.get_extra_info("socket")
    out["socket"] = type(sock._sock).__name__    # inside asyncio's TransportSocket
    out["fileno_negative"] = sock.fileno() < 0
    out["peername"] = list(w.get_extra_info("peername"))
    out["sockname_ip"] = w.get_extra_info("sockname")[0]
    out["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    data = os.urandom(2 << 20)
    async def send():
        w.write(data)
        await w.drain()
        w.write_eof()
    sender = asyncio.ensure_future(send())
    echoed = await r.readexactly(len(data))
    await sender
    out["echo_same"] = hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    w.close()
    await w.wait_closed()
    try:
        await asyncio.open_connection(peer, closed_port)
    except ConnectionRefusedError as exc:
        out["refused"] = str(exc)
    # A connection that cannot complete (nobody answers ARP for .99): cancelled by wait_for.
    try:
        await asyncio.wait_for(asyncio.open_connection("10.200.0.99", port), 0.5)
    except asyncio.TimeoutError:
        out["timeout"] = True
    # The kernel's stack in the same loop: a loopback server and client on io_uring.
    async def hello(r2, w2):
        w2.write(await r2.read(100))
        await w2.drain()
        w2.close()
    srv = await asyncio.start_server(hello, "127.0.0.1", 0)
    lport = srv.sockets[0].getsockname()[1]
    r3, w3 = await asyncio.open_connection("127.0.0.1", lport)
    out["kernel_socket"] = isinstance(w3.get_extra_info("socket").fileno(), int) and \
        w3.get_extra_info("socket").fileno() >= 0
    w3.write(b"over the kernel")
    out["kernel_echo"] = (await r3.read(100)).decode()
    w3.close()
    srv.close()
    await srv.wait_closed()
    for _ in range(100):    # lwIP frees a closed connection's state once its FIN is acked
        await asyncio.sleep(0.02)
        after = loop.stats()["dpdk"]
        if after["conns_live"] == before["conns_live"] and after["sockets"] == before["sockets"]:
            break
    out["sockets_back"] = after["sockets"] == before["sockets"]
    out["conns_back"] = after["conns_live"] == before["conns_live"]
    out["mbufs_back"] = after["mbufs_in_use"] <= before["mbufs_in_use"] + 64

kbloop.run(main())
print("RESULT " + json.dumps(out), flush=True)
"""


def test_dpdk_client_against_kernel_server(net, tmp_path):
    """A kbloop program whose connections to the veth network go out through the DPDK stack,
    while its loopback ones go through the kernel (io_uring), in the same loop."""
    server = childproc.Child(net.cmd_b(sys.executable, "-c", KERNEL_ECHO_SERVER, "7100"),
                             what="kernel echo server")
    server.expect("READY")
    prog = script(tmp_path, "client.py", CLIENT_PROGRAM)
    app = App([prog, net.ip_b, "7100", "7101"], net=net, ready=None)
    out = json.loads(app.expect("RESULT", timeout=120))
    assert app.wait(60) == 0, app.proc.stderr.read()[-3000:]
    server.kill()
    assert out.pop("refused") == f"[Errno 111] Connect call failed ('{net.ip_b}', 7101)"
    assert out == {
        "backend": "dpdk", "socket": "StackSocket", "fileno_negative": True,
        "peername": [net.ip_b, 7100], "sockname_ip": net.ip_a, "nodelay": 1,
        "echo_same": True, "timeout": True, "kernel_socket": True,
        "kernel_echo": "over the kernel", "sockets_back": True, "conns_back": True,
        "mbufs_back": True,
    }, out


# ------------------------------------------------------------------ flow control, errors, leaks

SERVER_PROGRAM = r"""
import asyncio, hashlib, json, sys
import kbloop

class Sink(asyncio.Protocol):
    '''Hashes what it gets; pauses reading for a while at the start (a slow reader); answers
    the digest when the peer half-closes.'''
    def connection_made(self, transport):
        self.t = transport
        self.h = hashlib.sha256()
        self.n = 0
        transport.pause_reading()
        asyncio.get_running_loop().call_later(0.5, transport.resume_reading)
    def data_received(self, data):
        self.h.update(data)
        self.n += len(data)
    def eof_received(self):
        self.t.write(json.dumps({"n": self.n, "sha": self.h.hexdigest()}).encode())
        self.t.close()
    def connection_lost(self, exc):
        LOST.append(type(exc).__name__ if exc else None)

LOST = []

async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Sink, None, 7200)
    echo = await loop.create_server(Echo, None, 7201)
    print("listening " + json.dumps(loop.stats()["dpdk"]), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(15, stop.set)
    await stop.wait()
    srv.close()
    echo.close()
    await asyncio.sleep(0.2)
    print("LOST " + json.dumps(LOST), flush=True)
    print("STATS " + json.dumps(loop.stats()["dpdk"]), flush=True)

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
    def data_received(self, data):
        self.t.write(data)
    def connection_lost(self, exc):
        LOST.append("echo " + (type(exc).__name__ if exc else "ok"))

kbloop.run(main())
"""

SLOW_READER_CLIENT = r"""
import hashlib, json, os, socket, struct, sys
host = sys.argv[1]
data = os.urandom(16 << 20)
s = socket.create_connection((host, 7200), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
got = json.loads(reply)
# A client that resets its connection in the middle of a transfer.
r = socket.create_connection((host, 7200), timeout=30)
r.sendall(os.urandom(1 << 20))
r.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
r.close()
# Many short connections, opened and closed.
ok = 0
for i in range(300):
    with socket.create_connection((host, 7201), timeout=10) as c:
        c.sendall(b"%d" % i)
        ok += c.recv(16) == b"%d" % i
print(json.dumps({"same": got == {"n": len(data), "sha": hashlib.sha256(data).hexdigest()},
                  "short": ok}))
"""


def test_slow_reader_reset_and_many_connections_leak_nothing(net, tmp_path):
    """16 MiB into a protocol that pauses reading first: lwIP's window closes instead of data
    being dropped, and every byte arrives (SHA-256).  A client that resets mid-transfer is
    reported to the protocol as ConnectionResetError; 300 short connections come and go.  At
    the end the stack's connections, pcbs and mbufs are back where they started."""
    prog = script(tmp_path, "server.py", SERVER_PROGRAM)
    app = App([prog], net=net)
    start = json.loads(app.ready_line)
    result = kernel_client(net, SLOW_READER_CLIENT, net.ip_a)
    assert result == {"same": True, "short": 300}, result
    app.proc.terminate()
    lost = json.loads(app.expect("LOST"))
    stats = json.loads(app.expect("STATS"))
    assert app.wait(60) == 0, app.proc.stderr.read()[-3000:]
    sinks = [x for x in lost if not x or not x.startswith("echo ")]
    assert len(sinks) == 2 and set(sinks) == {None, "ConnectionResetError"}, lost
    assert lost.count("echo ok") == 300, lost
    assert stats["mbufs_in_use"] <= start["mbufs_in_use"] + 64, (start, stats)
    assert stats["lwip_errors"] == 0 and stats["tcp_segs_used"] == 0, stats
    assert stats["tcp_established"] == 0 and stats["tcp_syn_rcvd"] == 0, stats


# ------------------------------------------------------------------ memif: no kernel at all

MEMIF_CLIENT = r"""
import asyncio, hashlib, json, os, sys
import kbloop

async def main():
    data = os.urandom(8 << 20)
    for attempt in range(100):      # the memif link comes up once both sides are there
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(sys.argv[1], 7000), 1)
            break
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)
    w.write(data)
    w.write_eof()
    echoed = await r.readexactly(len(data))
    w.close()
    return hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()

print("RESULT " + json.dumps({"same": kbloop.run(main())}), flush=True)
"""


def test_kbloop_to_kbloop_over_memif(tmp_path):
    """Two kbloop programs, each with its own DPDK stack, joined by net_memif (shared memory,
    no kernel in the path): the unmodified streams echo example serves a kbloop client."""
    sock = tmp_path / "memif.sock"
    server = App(["examples/echo_streams.py", "--host", "0.0.0.0", "--port", "7000"],
                 vdev=f"net_memif0,role=server,socket={sock},mac=02:00:00:00:00:01",
                 ip="10.201.0.1/24")
    prog = script(tmp_path, "memif_client.py", MEMIF_CLIENT)
    client = App([prog, "10.201.0.1"], ready=None,
                 vdev=f"net_memif0,role=client,socket={sock},mac=02:00:00:00:00:02",
                 ip="10.201.0.2/24")
    assert json.loads(client.expect("RESULT", timeout=120)) == {"same": True}
    assert client.wait(60) == 0, client.proc.stderr.read()[-3000:]
    server.finish()


# ------------------------------------------------------------------ configuration errors

def test_bad_configuration_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    code = textwrap.dedent(r"""
        import kbloop
        for kw in ({}, {"ip": "10.0.0.1"}, {"ip": "10.0.0.1/24"},
                   {"ip": "10.0.0.1/24", "dpdk_vdev": "net_nonexistent0"}):
            try:
                kbloop.new_event_loop(backend="dpdk", **kw).close()
                print("no error", kw)
            except (ValueError, kbloop.BackendUnavailable) as exc:
                print(type(exc).__name__, str(exc)[:60])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={k: v for k, v in env.items() if not k.startswith("KBLOOP_DPDK")},
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ValueError backend=\"dpdk\" needs the stack's address"), lines
    assert lines[1].startswith("ValueError backend=\"dpdk\" needs a device"), lines
    assert lines[2].startswith("ValueError backend=\"dpdk\" needs a device"), lines
    assert lines[3].startswith("BackendUnavailable DPDK could not start"), lines
