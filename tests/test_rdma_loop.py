"""asyncio on the RDMA datapath: the loop's stream transports over RC queue pairs (docs/rdma.md).

Runs on a real soft-RoCE device (rxe0) in QEMU guests (tests/rdma_vm.py).  One guest runs
GUEST_SCRIPT: the unmodified examples/echo_streams.py under `python -m kbloop --backend rdma`,
and kbloop clients and servers in the script's own process, which prints `RESULT <check>
<json>` lines for the tests below.  Two more guests, joined by QEMU's UDP socket link, run a
server and a client; the client's guest is killed mid-transfer and the survivor must report it.
"""

import hashlib
import json
import random
import re
import sys

import pytest

import rdma_vm

ok, why_not = rdma_vm.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"no RDMA test guest here: {why_not}")

STREAM_BYTES = 64 << 20
SEED = 7

# Shared by the guest programs: the loop they run on.
PRELUDE = r'''
import asyncio, errno, hashlib, json, os, random, signal, subprocess, sys, time, traceback
import kbloop

T0 = time.monotonic()

def report(name, **kw):
    kw["t"] = round(time.monotonic() - T0, 2)
    print("RESULT", name, json.dumps(kw), flush=True)

def rdma_loop(mode="sleep"):
    return lambda: kbloop.new_event_loop(backend="rdma", rdma_poll=mode)

def rstats():
    return asyncio.get_running_loop().stats()["rdma"]

async def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)

def pattern(seed, n, chunk=1 << 18):
    rnd = random.Random(seed)
    while n > 0:
        k = min(chunk, n)
        yield rnd.randbytes(k)
        n -= k
'''

GUEST_SCRIPT = PRELUDE + f"PRELUDE = {PRELUDE!r}\n" + r'''
from kbloop_ext.rdma import verbs

IP = os.environ.get("VM_ADDR", "10.99.0.1")
STREAM = int(sys.argv[1])
SEED = int(sys.argv[2])
EXAMPLE_PORT = 7100
LEAK_KEYS = ("qps", "mrs", "cqs", "cm_ids", "conns", "device_rx_lent", "tx_slots_busy", "sockets",
             "rx_lent_now", "tx_held", "closing")


async def check(name, coro):
    try:
        await coro
    except BaseException:
        report(name, exception=traceback.format_exc())


async def echo_server(reader, writer):
    """The handler of the servers in this process: echo until EOF; errors are recorded."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except OSError as exc:
        SERVER_ERRORS.append((type(exc).__name__, exc.errno, str(exc)))
    finally:
        writer.close()

SERVER_ERRORS = []


async def example(proc_port):
    """The unmodified examples/echo_streams.py: a conversation with a half-close."""
    r, w = await asyncio.open_connection(IP, proc_port)
    sock = w.get_extra_info("socket")
    sock = getattr(sock, "_sock", sock)         # asyncio's TransportSocket wraps it
    lines = [f"line {i}\n".encode() * (i + 1) for i in range(50)]
    for line in lines:
        w.write(line)
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 60)
    w.close()
    await w.wait_closed()
    report("example", echoed=got == b"".join(lines), nbytes=len(got),
           peer=list(w.get_extra_info("peername")), sockname=list(w.get_extra_info("sockname")),
           socket_type=type(sock).__name__, fileno=sock.fileno(), backend=asyncio.get_running_loop().backend)


async def slow_reader(reader, slow_until):
    """Read to EOF, hashing: slowly (4 KiB at a time, with pauses) for the first slow_until
    bytes, so that the sender runs out of credits and waits for them."""
    got, n = hashlib.sha256(), 0
    while True:
        data = await asyncio.wait_for(reader.read(1 << 20 if n >= slow_until else 4096), 120)
        if not data:
            return n, got.hexdigest()
        got.update(data)
        n += len(data)
        if n < slow_until:
            await asyncio.sleep(0.002)


async def stream(proc_port):
    """STREAM bytes through the unmodified example server and back (64 MiB each way),
    read slowly at first: the example server runs out of credits to echo with, stops
    reading, and so this client runs out too; both get them back."""
    before = rstats()["credit_waits"]
    t0 = time.monotonic()
    r, w = await asyncio.open_connection(IP, proc_port)
    sent = hashlib.sha256()
    async def writer():
        for chunk in pattern(SEED, STREAM):
            sent.update(chunk)
            w.write(chunk)
            await w.drain()
        w.write_eof()
    sending = asyncio.ensure_future(writer())
    try:
        n, digest = await slow_reader(r, 2 << 20)
    except asyncio.TimeoutError:
        raise TimeoutError(f"stalled; client: {rstats()}; writer done {sending.done()}")
    await sending
    w.close()
    await w.wait_closed()
    report("stream", nbytes=n, sent=sent.hexdigest(), received=digest,
           credit_waits=rstats()["credit_waits"] - before,
           seconds=round(time.monotonic() - t0, 1))


async def many():
    """100 connections opened, used and closed: QPs, MRs, CQs, cm ids, buffers back."""
    server = await asyncio.start_server(echo_server, IP, 0)
    port = server.sockets[0].getsockname()[1]
    await asyncio.sleep(0.1)
    base = {k: rstats()[k] for k in LEAK_KEYS}
    pool_base = asyncio.get_running_loop().stats()["pool"]["in_use_bytes"]
    peak = 0
    for i in range(100):
        r, w = await asyncio.open_connection(IP, port)
        peak = max(peak, rstats()["qps"])
        w.write(b"x" * (i * 97 + 1))
        w.write_eof()
        data = await asyncio.wait_for(r.read(), 30)
        assert data == b"x" * (i * 97 + 1), (i, len(data))
        w.close()
        await w.wait_closed()
    try:
        await wait_for(lambda: {k: rstats()[k] for k in LEAK_KEYS} == base, 30, "counters back")
    except TimeoutError:
        pass
    after = {k: rstats()[k] for k in LEAK_KEYS}
    server.close()
    await server.wait_closed()
    report("many", base=base, after=after, peak_qps=peak,
           pool_base=pool_base,
           pool_after=asyncio.get_running_loop().stats()["pool"]["in_use_bytes"],
           listeners_after_close=rstats()["listeners"])


CLIENT = PRELUDE + """
async def main():
    r, w = await asyncio.open_connection(sys.argv[1], int(sys.argv[2]))
    print("connected", flush=True)
    chunk = b"k" * 65536
    while True:
        w.write(chunk)
        await w.drain()
asyncio.Runner(loop_factory=rdma_loop("sleep")).run(main())
"""


async def killed_client():
    """A client killed mid-transfer: the server's handler hears ConnectionResetError, and the
    server goes on serving."""
    conns = []
    async def handler(reader, writer):
        got = {"n": 0, "end": None}
        conns.append(got)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    got["end"] = "EOF"
                    break
                got["n"] += len(data)
        except OSError as exc:
            got["end"] = [type(exc).__name__, exc.errno]
        writer.close()
    server = await asyncio.start_server(handler, IP, 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, IP, str(port),
                                                stdout=subprocess.PIPE)
    await asyncio.wait_for(proc.stdout.readline(), 60)
    await wait_for(lambda: conns and conns[0]["n"] >= 1 << 20, 60, "1 MiB from the client")
    proc.kill()
    killed = time.monotonic()
    await proc.wait()
    await wait_for(lambda: conns[0]["end"] is not None, 90, "the server noticing")
    noticed = round(time.monotonic() - killed, 1)
    r, w = await asyncio.open_connection(IP, port)      # still serving
    w.write(b"after")
    w.write_eof()
    await wait_for(lambda: len(conns) == 2 and conns[1]["end"] is not None, 30, "the next one")
    w.close()
    await w.wait_closed()
    server.close()
    await server.wait_closed()
    report("killed_client", error=conns[0]["end"], noticed_s=noticed, received=conns[0]["n"],
           next_one=conns[1])


async def refused():
    errors = {}
    try:
        await asyncio.open_connection(IP, 7199)
    except OSError as exc:
        errors["closed_port"] = [type(exc).__name__, exc.errno]
    server = await asyncio.start_server(echo_server, IP, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    try:
        await asyncio.open_connection(IP, port)
    except OSError as exc:
        errors["closed_server"] = [type(exc).__name__, exc.errno]
    loop = asyncio.get_running_loop()
    sock = None
    try:
        await loop.sock_recv(kbloop.StackSocket.__new__(kbloop.StackSocket), 1)
    except TypeError as exc:
        errors["sock_recv"] = str(exc)
    report("refused", **errors)


async def bad_input():
    """A misbehaving peer (the device layer's test hooks): garbage in the connect request's
    private data, a frame larger than the receive buffers, frames sent without credits.  Each
    is refused on its own connection, with a clear error; the server goes on serving."""
    del SERVER_ERRORS[:]
    accepted = []
    async def handler(reader, writer):
        accepted.append(writer)
        await echo_server(reader, writer)
    server = await asyncio.start_server(handler, IP, 0)
    port = server.sockets[0].getsockname()[1]
    raw = verbs.RdmaStack(buf_size=65536, recv_depth=8, send_depth=64)
    events = []
    async def pump(cond, what, timeout=30):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}; events {events[-6:]}")
            events.extend(raw.poll())
            await asyncio.sleep(0.002)
    out = {}
    # 1. garbage private data: rejected, never accepted
    conn = raw.test_connect_raw(IP, port, b"\xde\xad\xbe\xef" * 8)
    await pump(lambda: any(e[0] == "error" and e[1] is conn for e in events), "garbage reject")
    ev = [e for e in events if e[0] == "error" and e[1] is conn][0]
    out["garbage"] = [ev[2], ev[3], len(accepted)]
    conn.close()
    # 2. a frame larger than the server's receive buffers
    conn = raw.connect(IP, port)
    await pump(lambda: ("connected", conn) in events, "connected")
    await wait_for(lambda: len(accepted) == 1, 10, "accepted")
    raw.test_send_frame(conn, 20000, 0, b"o" * 20000)
    await wait_for(lambda: len(SERVER_ERRORS) == 1, 30, "oversized frame noticed")
    out["oversized"] = SERVER_ERRORS[0]
    conn.close()
    # 3. frames beyond the credits granted
    conn = raw.connect(IP, port)
    await pump(lambda: ("connected", conn) in events, "connected 2")
    # Without yielding to the loop: the server cannot repost or grant anything meanwhile.
    sent, deadline = 0, time.monotonic() + 20
    while sent < 200 and time.monotonic() < deadline:
        try:
            raw.test_send_frame(conn, 4, 0, b"abcd", True)
            sent += 1
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                break
            events.extend(raw.poll())
            if any(e[0] == "error" and e[1] is conn for e in events):
                break
    out["no_credits_sent"] = sent
    await wait_for(lambda: len(SERVER_ERRORS) == 2, 30, "credit-less frames noticed")
    out["no_credits"] = SERVER_ERRORS[1]
    conn.close()
    for _ in range(20):
        raw.poll()
    raw.close()
    # the server is fine: a good client is echoed
    r, w = await asyncio.open_connection(IP, port)
    w.write(b"still here")
    w.write_eof()
    out["after"] = (await asyncio.wait_for(r.read(), 30)).decode()
    w.close()
    await w.wait_closed()
    server.close()
    await server.wait_closed()
    out["server_rejects"] = rstats()["rejects"]
    out["server_eproto"] = rstats()["eproto"]
    report("bad_input", **out)


async def per_call():
    """datapath= per call: kernel TCP on an RDMA device's own address, beside RDMA."""
    out = {}
    server = await asyncio.start_server(echo_server, IP, 0, datapath="kernel")
    port = server.sockets[0].getsockname()[1]
    out["server_fileno"] = server.sockets[0].fileno()
    r, w = await asyncio.open_connection(IP, port, datapath="kernel")
    sock = w.get_extra_info("socket")
    out["client_socket"] = [type(getattr(sock, "_sock", sock)).__name__, sock.fileno()]
    w.write(b"over the kernel")
    w.write_eof()
    out["echo"] = (await asyncio.wait_for(r.read(), 30)).decode()
    w.close()
    await w.wait_closed()
    try:    # the same address and port by address routing: RDMA, where nobody listens
        await asyncio.open_connection(IP, port)
    except OSError as exc:
        out["routed"] = [type(exc).__name__, exc.errno]
    try:
        await asyncio.open_connection(IP, port, datapath="dpdk")
    except ValueError as exc:
        out["bad_choice"] = str(exc)
    server.close()
    await server.wait_closed()
    report("per_call", **out)


class Holder(kbloop.ZeroCopyProtocol):
    """Holds the Buffers it gets until told to let them go."""
    def __init__(self):
        self.bufs, self.types, self.eof = [], set(), False
        self.digest = hashlib.sha256()
        self.n = 0
    def connection_made(self, transport):
        self.transport = transport
    def buffer_received(self, buf):
        self.types.add(type(buf).__name__)
        self.digest.update(buf)
        self.n += len(buf)
        self.bufs.append(buf)
    def eof_received(self):
        self.eof = True


async def zero_copy():
    """A ZeroCopyProtocol gets Buffers over the receive buffers; while it holds them the
    sender waits (credits), and it resumes when they go back.  Pool Buffers are sent from
    where they are."""
    loop = asyncio.get_running_loop()
    protos = []
    def factory():
        protos.append(Holder())
        return protos[-1]
    server = await loop.create_server(factory, IP, 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection(IP, port)
    n = 8 << 20
    sent = hashlib.sha256()
    async def writer():
        for i, chunk in enumerate(pattern(SEED + 1, n, 1 << 16)):
            sent.update(chunk)
            if i % 2:
                buf = loop.alloc_buffer(len(chunk))
                memoryview(buf)[:] = chunk
                w.write(buf)
            else:
                w.write(chunk)
            await w.drain()
        w.write_eof()
    task = asyncio.ensure_future(writer())
    await wait_for(lambda: protos and protos[0].n > 0, 30, "first data")
    p = protos[0]
    # Hold everything: the stream stops once the holding limit or the credits run out.
    prev = -1
    while prev != p.n:
        prev = p.n
        await asyncio.sleep(0.5)
    held_at_stall = len(p.bufs)
    lent_at_stall = rstats()["rx_lent_now"]
    while not p.eof:
        p.bufs.clear()          # back to the device: credits flow again
        await asyncio.sleep(0.01)
    await task
    p.bufs.clear()
    await asyncio.sleep(0.1)
    w.close()
    await w.wait_closed()
    server.close()
    await server.wait_closed()
    report("zero_copy", n=p.n, sent=sent.hexdigest(), received=p.digest.hexdigest(),
           types=sorted(p.types), held_at_stall=held_at_stall, lent_at_stall=lent_at_stall,
           lent_after=rstats()["rx_lent_now"], stats={k: v for k, v in rstats().items()
                                                     if k.startswith(("zc", "tx_", "rx_lent",
                                                                      "ref_", "pool_mrs"))})


async def main():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kbloop", "--backend", "rdma", "--rdma-poll", "sleep",
        "examples/echo_streams.py", "--host", "0.0.0.0", "--port", str(EXAMPLE_PORT),
        stdout=subprocess.PIPE)
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    report("example_started", line=line.strip())
    try:
        await check("example", example(EXAMPLE_PORT))
        await check("stream", stream(EXAMPLE_PORT))
    finally:
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), 30)
        report("example_stopped", status=status)
    for name, fn in (("many", many), ("killed_client", killed_client), ("refused", refused),
                     ("bad_input", bad_input), ("zero_copy", zero_copy),
                     ("per_call", per_call)):
        await check(name, fn())


async def busy():
    """The same loop in busy-poll mode: an echo through a server in this process."""
    server = await asyncio.start_server(echo_server, IP, 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection(IP, port)
    data = random.Random(3).randbytes(1 << 20)
    w.write(data)
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 60)
    w.close()
    await w.wait_closed()
    server.close()
    await server.wait_closed()
    report("busy", echoed=got == data, mode=rstats()["poll_mode"], polls=rstats()["polls"])


with asyncio.Runner(loop_factory=rdma_loop("sleep")) as runner:
    runner.run(main())
with asyncio.Runner(loop_factory=rdma_loop("busy")) as runner:
    runner.run(check("busy", busy()))
print("DONE", flush=True)
'''


def _digest(seed, n):
    h = hashlib.sha256()
    rnd = random.Random(seed)
    while n > 0:
        k = min(1 << 18, n)
        h.update(rnd.randbytes(k))
        n -= k
    return h.hexdigest()


@pytest.fixture(scope="module")
def guest():
    cmd = (f"{sys.executable} - {STREAM_BYTES} {SEED} <<'KB_RDMA_EOF'\n{GUEST_SCRIPT}\n"
           "KB_RDMA_EOF\n")
    return rdma_vm.run_checks(cmd, timeout=420)


get = rdma_vm.check_result


@pytest.mark.timeout(600)
def test_unmodified_streams_example_serves_over_rdma(guest):
    r = get(guest, "example")
    assert r["echoed"] and r["nbytes"] > 0
    assert r["backend"] == "rdma"
    assert r["peer"] == ["10.99.0.1", 7100]
    assert r["sockname"][0] == "10.99.0.1" and r["sockname"][1] > 0
    assert r["socket_type"] == "RdmaSocket" and r["fileno"] < 0
    assert "listening on" in get(guest, "example_started")["line"]
    assert get(guest, "example_stopped")["status"] == 0


@pytest.mark.timeout(600)
def test_64_mib_each_way_with_a_slow_reader(guest):
    r = get(guest, "stream")
    expected = _digest(SEED, STREAM_BYTES)
    assert r["nbytes"] == STREAM_BYTES
    assert r["sent"] == expected and r["received"] == expected
    # The slow reader made the example server wait for credits, and so this client too.
    assert r["credit_waits"] > 0, r


@pytest.mark.timeout(600)
def test_100_connections_leave_nothing_behind(guest):
    r = get(guest, "many")
    assert r["peak_qps"] >= 2
    assert r["after"] == r["base"], r
    assert r["pool_after"] == r["pool_base"]
    assert r["listeners_after_close"] == 0


@pytest.mark.timeout(600)
def test_killed_client_is_a_reset_and_the_server_goes_on(guest):
    r = get(guest, "killed_client")
    assert r["error"] == ["ConnectionResetError", 104], r
    assert r["received"] >= 1 << 20
    assert r["next_one"] == {"n": 5, "end": "EOF"}


@pytest.mark.timeout(600)
def test_refused_connections_and_kernel_only_calls(guest):
    r = get(guest, "refused")
    assert r["closed_port"] == ["ConnectionRefusedError", 111]
    assert r["closed_server"] == ["ConnectionRefusedError", 111]
    assert "kernel socket" in r["sock_recv"] and "rdma" in r["sock_recv"]


@pytest.mark.timeout(600)
def test_bad_input_is_refused_per_connection(guest):
    r = get(guest, "bad_input")
    # Garbage private data: rejected with "bad magic" (docs/rdma.md), never accepted.
    assert r["garbage"] == [111, 1, 0], r
    # A frame longer than a receive buffer: a protocol error on that connection only.
    assert r["oversized"][1] == 71 and "wire format" in r["oversized"][2], r
    # Frames beyond the granted credits: noticed (EPROTO when a buffer was posted but not
    # granted; a reset when none was posted: the sender's QP got RNR and gave up).
    assert r["no_credits"][1] in (71, 104), r
    assert r["after"] == "still here"
    assert r["server_rejects"] >= 1 and r["server_eproto"] >= 1


@pytest.mark.timeout(600)
def test_zero_copy_protocol_and_pool_buffer_sends(guest):
    r = get(guest, "zero_copy")
    expected = _digest(SEED + 1, 8 << 20)
    assert r["n"] == 8 << 20
    assert r["sent"] == expected and r["received"] == expected
    assert r["types"] == ["Buffer"]
    # Held Buffers stop the stream (credits or the holding limit), not lose it.
    assert 0 < r["held_at_stall"] <= 512 and r["lent_at_stall"] >= r["held_at_stall"]
    assert r["lent_after"] == 0
    assert r["stats"]["rx_lent"] >= r["held_at_stall"]
    # Half the chunks were pool Buffers: sent from the pool's registered memory, each held
    # until the peer had it.
    assert r["stats"]["tx_zc_bytes"] == 4 << 20 and r["stats"]["ref_frames"] > 0, r
    assert r["stats"]["pool_mrs"] >= 1 and r["stats"]["tx_held"] == 0


@pytest.mark.timeout(600)
def test_datapath_chosen_per_call(guest):
    r = get(guest, "per_call")
    assert r["server_fileno"] >= 0                  # a kernel listener on the RDMA address
    assert r["client_socket"][0] == "socket" and r["client_socket"][1] >= 0
    assert r["echo"] == "over the kernel"
    assert r["routed"] == ["ConnectionRefusedError", 111]    # by address: RDMA
    assert "kernel" in r["bad_choice"] and "rdma" in r["bad_choice"]


@pytest.mark.timeout(600)
def test_busy_poll_mode(guest):
    r = get(guest, "busy")
    assert r["echoed"] and r["mode"] == "busy" and r["polls"] > 0


PAIR_SERVER = PRELUDE + r'''
IP = os.environ["VM_ADDR"]
errors = []

async def handler(reader, writer):
    # The server only reads: with nothing of its own in flight, it is the datapath's liveness
    # probes (a zero-length RDMA WRITE each second) whose retries run out.
    n = 0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                errors.append("EOF")
                writer.write(b"x" * n)
                break
            n += len(data)
            if n >= 1 << 20 and not errors:
                print("streaming", flush=True)
                errors.append("streaming")
            if n == 2 << 20:
                # All read, and every credit given back: wait until the link has been quiet
                # for a while (the credits acknowledged) before the test cuts it.
                asyncio.get_running_loop().call_later(2, lambda: print("idle", flush=True))
    except OSError as exc:
        errors.append([type(exc).__name__, exc.errno, str(exc)])
    writer.close()

async def main():
    server = await asyncio.start_server(handler, IP, 7300)
    print("listening", flush=True)
    await wait_for(lambda: len(errors) >= 2, 200, "the lost peer")
    report("lost", error=errors[1], t_lost=round(time.monotonic() - T0, 1))
    # Healthy: a new connection, from this guest itself, is served.
    r, w = await asyncio.open_connection(IP, 7300)
    w.write(b"x" * 100)
    w.write_eof()
    echoed = await asyncio.wait_for(r.read(), 30)
    w.close()
    await w.wait_closed()
    report("after", connections=rstats()["conns"], errors=errors[2:], echoed=len(echoed),
           probes=rstats()["probes"])
    server.close()
    await server.wait_closed()

asyncio.Runner(loop_factory=rdma_loop("sleep")).run(main())
print("DONE", flush=True)
'''

PAIR_CLIENT = PRELUDE + r'''
PEER = os.environ["VM_PEER"]

async def main():
    for attempt in range(120):
        try:
            r, w = await asyncio.open_connection(PEER, 7300)
            break
        except OSError:
            await asyncio.sleep(0.25)
    else:
        print("never connected", flush=True)
        sys.exit(3)
    print("writing", flush=True)
    async def read_back():
        while await r.read(1 << 20):
            pass
    reading = asyncio.ensure_future(read_back())
    # 2 MiB, then silence: by the time the guest is killed, nothing of either side is in flight,
    # so only the survivor's liveness probes can find out.
    for _ in range(32):
        w.write(b"w" * 65536)
        await w.drain()
    await asyncio.sleep(3600)

asyncio.Runner(loop_factory=rdma_loop("sleep")).run(main())
'''


@pytest.mark.timeout(600)
def test_two_guests_survivor_reports_the_cut_link():
    def cmd(script):
        return f"{sys.executable} - <<'KB_RDMA_EOF'\n{script}\nKB_RDMA_EOF\n"
    with rdma_vm.start_pair(cmd(PAIR_SERVER), cmd(PAIR_CLIENT)) as (server, client):
        server.wait_for_output("streaming", timeout=240)
        server.wait_for_output("idle", timeout=120)
        client.kill()
        result = server.wait(timeout=300)
        client.wait()
    results = {m.group(1): json.loads(m.group(2))
               for m in re.finditer(r"^RESULT (\w+) (.*)$", result.output, re.M)}
    assert "lost" in results, result.output
    # The peer's guest is gone without a word: the QP's retries run out (retry_count 6), and
    # the loss is a ConnectionResetError that says so.
    assert results["lost"]["error"][:2] == ["ConnectionResetError", 104], result.output
    assert "retries exhausted" in results["lost"]["error"][2]
    assert results["after"]["errors"] == ["EOF"], result.output
    assert results["after"]["echoed"] == 100 and results["after"]["probes"] > 0
    assert "DONE" in result.output
