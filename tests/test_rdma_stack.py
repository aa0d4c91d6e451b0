"""The RDMA device layer (kbloop_ext.rdma.verbs over kb_rdma.c) on a real soft-RoCE device.

One QEMU guest (tests/rdma_vm.py: rxe0 on dummy0, 10.99.0.1) runs GUEST_SCRIPT, which does
every check in one process (client and server share rxe0: real QPs, the real rxe protocol
engine) and prints `RESULT <check> <json>` lines; the tests below assert on them.  One boot for
all: a guest costs ~4 s to boot and Python in it is ~20x slower than here.
"""

import hashlib
import json
import random
import re
import sys
import time

import pytest

import rdma_vm

ok, why_not = rdma_vm.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"no RDMA test guest here: {why_not}")

STREAM_BYTES = 64 << 20
SEEDS = (1, 2)      # client->server data, server->client data

GUEST_SCRIPT = r'''
import errno, hashlib, json, os, random, select, sys, time, traceback
from kbloop_ext.rdma import verbs
from kbloop_ext.rdma.verbs import RdmaStack

IP = "10.99.0.1"
N = int(sys.argv[1])
T0 = time.monotonic()

def report(name, **kw):
    kw["t"] = round(time.monotonic() - T0, 2)
    print("RESULT", name, json.dumps(kw), flush=True)

def pump(stack, cond, timeout, handle=None, what="condition"):
    """Poll until cond(); every event goes to handle (or a list, returned)."""
    seen = []
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met in {timeout} s; events: {seen[-10:]}")
        for ev in stack.poll():
            if handle is None or not handle(ev):
                seen.append(ev)
    return seen

def pair(stack, listener, port):
    """A connected (client, server) pair through listener."""
    got = {}
    def handle(ev):
        if ev[0] == "accept" and ev[1] is listener:
            got["server"] = ev[2]
            return True
        if ev[0] == "connected" and ev[1] is client:
            got["client"] = ev[1]
            return True
    client = stack.connect(IP, port)
    pump(stack, lambda: len(got) == 2, 30, handle, "connect/accept")
    return got["client"], got["server"]

LEAK_KEYS = ("qps", "mrs", "cqs", "pds", "cm_ids", "conns", "rx_posted", "rx_lent",
             "tx_slots_busy", "credits_avail")

def alive(st):
    return {k: st[k] for k in LEAK_KEYS}

def check(fn):
    try:
        fn()
    except Exception:
        report(fn.__name__, exception=traceback.format_exc())

# -- connect, 64 MiB each way with a slow reader, orderly close -----------------------------
def stream():
    s = RdmaStack(buf_size=16384, recv_depth=32, send_depth=32)
    before = alive(s.stats())
    lst = s.listen(IP, 0)
    port = lst.addresses()[0][1]
    cli, srv = pair(s, lst, port)
    qp = {"client": cli.stats(), "server": srv.stats()}
    data = {cli: random.Random(1).randbytes(N), srv: random.Random(2).randbytes(N)}
    peer = {cli: srv, srv: cli}
    sent = {cli: 0, srv: 0}
    recvd = {cli: 0, srv: 0}
    hashes = {cli: hashlib.sha256(), srv: hashlib.sha256()}
    eof = {cli: False, srv: False}
    closed = []
    errors = []
    held_max = 0
    holds = 0
    # The server holds what it receives (its buffers stay lent) at a few points: the client
    # must run out of credits and wait, never overrun the server (no RNR, no error).
    hold_at = [N // 8, N // 2, 3 * N // 4]
    hold_since = None
    def handle(ev):
        nonlocal held_max
        kind, conn = ev[0], ev[1]
        if kind == "data":
            hashes[conn].update(ev[2])
            recvd[conn] += len(ev[2])
        elif kind == "eof":
            eof[conn] = True
        elif kind == "closed":
            closed.append(conn)
        elif kind == "error":
            errors.append(ev[1:])
        if srv.hold:
            held_max = max(held_max, srv.held_count)
        return True
    t = time.monotonic()
    while not (eof[cli] and eof[srv]):
        if time.monotonic() - t > 150:
            raise TimeoutError(f"stream stuck: sent {sent} recvd {recvd} {s.stats()}")
        for w in (cli, srv):
            if sent[w] < N:
                mv = memoryview(data[w])[sent[w]:sent[w] + (1 << 20)]
                sent[w] += w.write(mv)
                if sent[w] == N:
                    w.write_eof()
        if hold_at and recvd[srv] >= hold_at[0] and not srv.hold:
            hold_at.pop(0)
            srv.hold = True
            hold_since = time.monotonic()
            holds += 1
        if srv.hold and time.monotonic() - hold_since > 1.0:
            srv.hold = False
            srv.recv_done()
        for ev in s.poll():
            handle(ev)
    seconds = time.monotonic() - t
    waits = cli.stats()["credit_waits"]
    mid = s.stats()
    cli.close()         # EOF both ways done: the server sees an orderly "closed"
    pump(s, lambda: srv in closed, 30, handle, "closed")
    srv.close()
    lst.close()
    pump(s, lambda: s.stats()["conns"] == 0, 30, handle, "all freed")
    end = s.stats()
    report("stream", digests=[hashes[srv].hexdigest(), hashes[cli].hexdigest()],
           recvd=[recvd[srv], recvd[cli]], seconds=round(seconds, 2), qp=qp,
           client_credit_waits=waits, held_max=held_max, holds=holds, errors=errors,
           closed_orderly=srv in closed, before=before, after=alive(end), stats=mid)
    s.close()

# -- 100 connections opened at once, then closed/aborted: every counter back ----------------
def many():
    s = RdmaStack(buf_size=1024, recv_depth=8, send_depth=8)
    lst = s.listen(IP, 0)
    port = lst.addresses()[0][1]
    c, v = pair(s, lst, port)           # warm-up: the device's PD and CQ exist from here
    c.close(); v.close()
    pump(s, lambda: s.stats()["conns"] == 1, 30, what="warm-up freed")
    base = alive(s.stats())
    clients = [s.connect(IP, port) for _ in range(100)]
    servers, connected, data = [], set(), 0
    def handle(ev):
        nonlocal data
        if ev[0] == "accept":
            servers.append(ev[2])
        elif ev[0] == "connected":
            connected.add(ev[1])
        elif ev[0] == "data":
            data += len(ev[2])
        elif ev[0] == "error":
            raise RuntimeError(f"unexpected {ev}")
        return True
    t = time.monotonic()
    pump(s, lambda: len(servers) == 100 and len(connected) == 100, 90, handle, "100 up")
    up_s = time.monotonic() - t
    for i, cl in enumerate(clients):
        cl.write(b"hello %03d" % i)
    pump(s, lambda: data == 900, 30, handle, "100 messages")
    peak = alive(s.stats())
    cq_entries = s.stats()["cq_entries"]
    # A third closed by the client, a third by the server, a third aborted.
    for i in range(100):
        (clients[i].close, servers[i].close, clients[i].abort)[i % 3]()
    for i in range(100):
        servers[i].close() if i % 3 != 1 else clients[i].close()
    pump(s, lambda: alive(s.stats()) == base, 60, lambda ev: True, "counters back")
    report("many", base=base, peak=peak, after=alive(s.stats()), up_s=round(up_s, 2),
           seconds=round(time.monotonic() - t, 2), cq_entries=cq_entries)
    s.close()

# -- refused, garbage private data, wrong version, malformed frames, abort -------------------
def refusals_and_malformed():
    s = RdmaStack(buf_size=4096, recv_depth=8, send_depth=8)
    out = {}
    # Nobody listens on this port: rdma_cm's reject (invalid service id).
    c = s.connect(IP, 4791 + 7)
    ev = pump(s, lambda: c.error != 0, 30, what="refused")
    out["refused"] = [c.error, [e for e in ev if e[0] == "error"][0][3]]
    c.close()
    lst = s.listen(IP, 0)
    port = lst.addresses()[0][1]
    rejects = []
    def on_reject(ev):
        if ev[0] == "reject":
            rejects.append(ev[2])
            return True
    for name, raw in [("garbage", b"GARBAGE!"),
                      ("version", bytes.fromhex("4b42524d") + b"\x09\x00\x00\x00"
                       + (8).to_bytes(4, "big") + (4096).to_bytes(4, "big")),
                      ("no_credits", bytes.fromhex("4b42524d") + b"\x01\x00\x00\x00"
                       + (0).to_bytes(4, "big") + (4096).to_bytes(4, "big"))]:
        c = s.test_connect_raw(IP, port, raw)
        ev = pump(s, lambda: c.error != 0, 30, on_reject, name)
        out[name] = [c.error, [e for e in ev if e[0] == "error"][0][3]]
        c.close()
    out["rejects"] = rejects
    out["rejects_counter"] = s.stats()["rejects"]
    # Still serving: a good connection right after, with data.
    pairs = [pair(s, lst, port) for _ in range(4)]
    got = {}
    def collect(ev):
        if ev[0] == "data":
            got.setdefault(ev[1], b"")
            got[ev[1]] += ev[2]
        elif ev[0] == "error":
            got.setdefault(("error", ev[1]), ev[2])
        return True
    (c0, v0) = pairs[0]
    c0.write(b"still serving")
    pump(s, lambda: got.get(v0) == b"still serving", 30, collect, "good pair")
    # Malformed frames on pairs 1..3: a length beyond the buffer, a length that is not what
    # arrived, unknown flags.  Each such connection dies with EPROTO on the receiving side
    # (the sender sees the disconnect: ECONNRESET); pair 0 goes on.
    e0 = s.stats()["eproto"]
    s.test_send_frame(pairs[1][0], 1 << 30, 0, b"x" * 10)
    s.test_send_frame(pairs[2][0], 5, 0, b"x" * 10)
    s.test_send_frame(pairs[3][0], 10, 0x80, b"x" * 10)
    pump(s, lambda: all(("error", p[0]) in got and ("error", p[1]) in got for p in pairs[1:]),
         30, collect, "EPROTO")
    out["malformed"] = [[got[("error", v)], got[("error", c)]] for c, v in pairs[1:]]
    out["eproto_counter"] = s.stats()["eproto"] - e0
    v0.write(b"and still")
    pump(s, lambda: got.get(c0) == b"and still", 30, collect, "pair 0 after")
    out["pair0_after"] = got[c0].decode()
    # An abort: the peer learns ECONNRESET (it never got EOF).
    c5, v5 = pair(s, lst, port)
    c5.abort()
    pump(s, lambda: ("error", v5) in got, 30, collect, "abort seen")
    out["abort"] = got[("error", v5)]
    # Sleep mode: armed CQ, the completion channel's fd wakes select().
    fds = s.fds()
    s.arm()
    s.poll()
    c0.write(b"wake")
    r, _, _ = select.select(fds, [], [], 10)
    out["woke"] = len(r) > 0 and len(fds) == 2
    pump(s, lambda: got.get(v0, b"").endswith(b"wake"), 30, collect, "wake data")
    for c, v in pairs + [(c5, v5)]:
        c.close(); v.close()
    lst.close()
    pump(s, lambda: s.stats()["conns"] == 0, 30, lambda ev: True, "freed")
    out["after"] = alive(s.stats())
    report("refusals", **out)
    s.close()

# -- credits enforced: a frame beyond them is EPROTO, or RNR (never retried) ----------------
def overrun():
    s = RdmaStack(buf_size=1024, recv_depth=8, send_depth=16)
    lst = s.listen(IP, 0)
    port = lst.addresses()[0][1]
    got, out = {}, {}
    def collect(ev):
        if ev[0] == "data":
            got[ev[1]] = got.get(ev[1], 0) + 1
        elif ev[0] == "error":
            got[("error", ev[1])] = ev[2]
        return True
    frame = lambda conn, force=False: s.test_send_frame(conn, 4, 0, b"abcd", force)
    cli, srv = pair(s, lst, port)
    # The client holds what it gets: the server spends all its credits but the reserved one.
    cli.hold = True
    for _ in range(7):
        frame(srv)
    pump(s, lambda: got.get(cli, 0) == 7, 30, collect, "7 to the client")
    # The client spends its 8; the server reposts them and returns what its last credit can
    # carry; then it has buffers posted that it cannot grant (owed).
    for _ in range(8):
        frame(cli)
    def settled():
        st = srv.stats()
        return (got.get(srv, 0) == 8 and st["credits"] == 0 and st["owed"] > 0
                and cli.stats()["credits"] == st["peer_credits"])     # its grant arrived
    pump(s, settled, 30, collect, "server out of credits")
    n = cli.stats()["credits"]
    for _ in range(n):          # the client spends what it was granted
        frame(cli)
    pump(s, lambda: got.get(srv, 0) == 8 + n, 30, collect, "granted ones")
    out["server_credits"] = srv.stats()["credits"]
    out["server_owed"] = srv.stats()["owed"]
    # One more lands in a posted buffer that was never granted: the server must notice.
    frame(cli, True)
    pump(s, lambda: ("error", srv) in got and ("error", cli) in got, 30, collect, "overrun")
    out["overrun"] = [got[("error", srv)], got[("error", cli)]]
    # No buffer posted at all (all 8 held): the sender's QP gets RNR and, with rnr_retry 0,
    # fails at once instead of retrying.
    c2, v2 = pair(s, lst, port)
    v2.hold = True
    for _ in range(8):
        frame(c2, True)
    pump(s, lambda: got.get(v2, 0) == 8, 30, collect, "8 held")
    wc0 = s.stats()["wc_errors"]
    t = time.monotonic()
    frame(c2, True)
    pump(s, lambda: ("error", c2) in got and ("error", v2) in got, 30, collect, "RNR")
    out["rnr"] = [got[("error", c2)], got[("error", v2)], s.stats()["wc_errors"] - wc0]
    out["rnr_s"] = round(time.monotonic() - t, 2)
    for conn in (cli, srv, c2, v2, lst):
        conn.close()
    pump(s, lambda: s.stats()["conns"] == 0, 30, lambda ev: True, "freed")
    out["after"] = alive(s.stats())
    report("overrun", **out)
    s.close()

# -- sleep mode only: a client and an echo server in two processes, each sleeping on its
#    fds (arm, poll once more, select) whenever a poll brings nothing ---------------------
# (The server runs in a fresh interpreter: verbs resources do not survive a fork.)
SLEEP_POLL = """
import os, select, sys, time
from kbloop_ext.rdma.verbs import RdmaStack
def sleep_poll(s, counts, done=lambda: False):
    # Events of one step; sleeps on the stack's fds (they change as devices appear) when
    # there are none and not done().  A missed wake-up shows as the 10 s timeout.
    evs = s.poll()
    while not evs and s.arm():      # until every CQ stays armed across a poll
        evs = s.poll()          # what came before the arm
    if not evs and not done():
        counts["sleeps"] += 1
        if not select.select(s.fds(), [], [], 10)[0]:
            raise TimeoutError(f"no wake-up in 10 s: {s.stats()}")
    return evs
"""

ECHO_SERVER = SLEEP_POLL + """
s = RdmaStack(buf_size=4096, recv_depth=16, send_depth=16)
lst = s.listen(sys.argv[1], int(sys.argv[2]))
print("listening", flush=True)
conn, buf, eof, counts = None, bytearray(), False, {"sleeps": 0}
deadline = time.monotonic() + 60
freed = lambda: conn is not None and s.stats()["conns"] == 1
while not freed():
    assert time.monotonic() < deadline
    for ev in sleep_poll(s, counts, freed):
        if ev[0] == "accept":
            conn = ev[2]
        elif ev[0] == "data":
            buf += ev[2]
        elif ev[0] == "eof":
            eof = True
        elif ev[0] == "error":
            raise RuntimeError(f"server: {ev}")
    if conn is not None and buf and conn.error == 0:
        del buf[:conn.write(buf)]
    if eof and not buf and conn.error == 0:
        conn.close()        # released: the loop runs until it is freed
        eof = False
sys.exit(0 if counts["sleeps"] > 0 else 3)
"""
exec(SLEEP_POLL)

def sleepy():
    import subprocess
    size, port = 2 << 20, 7390
    data = random.Random(3).randbytes(size)
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, IP, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "listening\n"
        s = RdmaStack(buf_size=4096, recv_depth=16, send_depth=16)
        cli = s.connect(IP, port)
        counts = {"sleeps": 0}
        sent, got, connected, eof, closed = 0, bytearray(), False, False, False
        t = time.monotonic()
        while not closed:
            assert time.monotonic() - t < 60, (sent, len(got), s.stats())
            for ev in sleep_poll(s, counts, lambda: closed):
                if ev[0] == "connected":
                    connected = True
                elif ev[0] == "data":
                    got += ev[2]
                elif ev[0] == "eof":
                    eof = True
                elif ev[0] == "closed":
                    closed = True
                elif ev[0] == "error":
                    raise RuntimeError(f"client: {ev}")
            if connected and sent < size:
                sent += cli.write(memoryview(data)[sent:])
                if sent == size:
                    cli.write_eof()
        seconds = time.monotonic() - t
        cli.close()
        status = server.wait(30)
    finally:
        server.kill()
    report("sleepy", intact=got == data, eof=eof, sleeps=counts["sleeps"],
           server_status=status, polls=s.stats()["polls"], seconds=round(seconds, 2))
    s.close()

for fn in (refusals_and_malformed, overrun, sleepy, stream, many):
    check(fn)
print("DONE", flush=True)
'''


def _expected_digest(seed):
    return hashlib.sha256(random.Random(seed).randbytes(STREAM_BYTES)).hexdigest()


@pytest.fixture(scope="module")
def guest():
    cmd = f"{sys.executable} - {STREAM_BYTES} <<'KB_RDMA_EOF'\n{GUEST_SCRIPT}\nKB_RDMA_EOF\n"
    return rdma_vm.run_checks(cmd, timeout=170)


get = rdma_vm.check_result


ZERO = {"qps": 0, "mrs": 0, "cm_ids": 0, "conns": 0, "rx_posted": 0, "rx_lent": 0,
        "tx_slots_busy": 0, "credits_avail": 0}


def test_guest_script_ran_every_check(guest):
    result, results = guest
    assert result.status == 0 and "DONE" in result.output, result.output
    assert set(results) == {"stream", "many", "refusals", "overrun", "sleepy"}, result.output


def test_stream_64mib_each_way_with_slow_reader(guest):
    r = get(guest, "stream")
    assert r["errors"] == []
    assert r["recvd"] == [STREAM_BYTES, STREAM_BYTES]
    assert r["digests"] == [_expected_digest(SEEDS[0]), _expected_digest(SEEDS[1])]
    # The held buffers stopped the client: it waited for credits, and never had more frames
    # in the server than the server's 32 receive buffers (one credit kept for returns).
    assert r["holds"] == 3
    assert r["client_credit_waits"] >= 3
    assert 24 <= r["held_max"] <= 31, r["held_max"]
    st = r["stats"]
    assert st["wc_errors"] == 0 and st["errors"] == 0 and st["eproto"] == 0
    assert st["credit_msgs_tx"] > 0 and st["credit_msgs_rx"] > 0
    assert st["sends_signalled"] < st["sends"]         # selective signalling
    assert st["sends_inline"] > 0                      # credit returns go inline
    assert st["recv_posts"] < st["msgs_rx"]            # receives reposted in batches
    print(f"64 MiB each way in {r['seconds']} s (guest)")


def test_queue_pair_attributes(guest):
    qp = get(guest, "stream")["qp"]
    for side in ("client", "server"):
        # Retries bounded (7 would be for ever on rxe), receiver-not-ready never retried.
        assert qp[side]["retry_cnt"] == 6, qp
        assert qp[side]["rnr_retry"] == 0, qp
        assert qp[side]["frame_max"] == 16384 and qp[side]["inline_max"] >= 12, qp
        assert qp[side]["credits"] in (31, 32) and qp[side]["rx_posted"] == 32, qp


def test_orderly_close_and_nothing_left(guest):
    r = get(guest, "stream")
    assert r["closed_orderly"]
    assert r["before"] == dict(ZERO, cqs=0, pds=0)
    assert r["after"] == dict(ZERO, cqs=1, pds=1)      # the device's CQ and PD stay


def test_hundred_connections_leave_nothing(guest):
    r = get(guest, "many")
    base = r["base"]
    assert base == {"qps": 0, "mrs": 0, "cqs": 1, "pds": 1, "cm_ids": 1, "conns": 1,
                    "rx_posted": 0, "rx_lent": 0, "tx_slots_busy": 0, "credits_avail": 0}
    peak = r["peak"]
    assert peak["qps"] == 200 and peak["mrs"] == 200 and peak["conns"] == 201, peak
    assert peak["rx_posted"] == 200 * 8 and peak["cqs"] == 1, peak
    # 200 QPs of 8 receives and 16 sends outgrow the first 4096 entries: the CQ was resized.
    assert r["cq_entries"] >= 200 * 24, r
    assert r["after"] == base
    print(f"100 connections up in {r['up_s']} s, all done in {r['seconds']} s (guest)")


def test_refused_and_rejected_connects(guest):
    r = get(guest, "refusals")
    ECONNREFUSED = 111
    assert r["refused"] == [ECONNREFUSED, 0]            # no listener: no reason of ours
    assert r["garbage"] == [ECONNREFUSED, 1]            # REJ_BAD_MAGIC
    assert r["version"] == [ECONNREFUSED, 2]            # REJ_BAD_VERSION
    assert r["no_credits"] == [ECONNREFUSED, 3]         # REJ_BAD_PARAMS
    assert r["rejects"] == [1, 2, 3] and r["rejects_counter"] == 3


def test_malformed_frames_close_only_their_connection(guest):
    r = get(guest, "refusals")
    EPROTO, ECONNRESET = 71, 104
    assert r["malformed"] == [[EPROTO, ECONNRESET]] * 3
    assert r["eproto_counter"] == 3
    assert r["pair0_after"] == "and still"
    assert r["abort"] == ECONNRESET
    assert r["woke"]
    assert r["after"] == dict(ZERO, cqs=1, pds=1)


def test_frames_beyond_credits_are_caught(guest):
    r = get(guest, "overrun")
    EPROTO, ECONNRESET = 71, 104
    assert r["server_credits"] == 0 and r["server_owed"] > 0
    # A frame into a posted buffer we never granted: the receiver's accounting catches it.
    assert r["overrun"] == [EPROTO, ECONNRESET]
    # A frame with no buffer posted at all: RNR, not retried (rnr_retry 0): an error at once.
    assert r["rnr"] == [EPROTO, ECONNRESET, 1]
    assert r["rnr_s"] < 5
    assert r["after"] == dict(ZERO, cqs=1, pds=1)


def test_sleep_mode_wakes_for_every_step(guest):
    r = get(guest, "sleepy")
    # 2 MiB echoed, EOF both ways, an orderly end; both processes slept on their fds between
    # steps and were always woken (a missed wake-up is a 10 s timeout); the server exited 0.
    assert r["intact"] and r["eof"] and r["server_status"] == 0, r
    assert r["sleeps"] > 10, r
    print(f"sleep mode: 2 MiB in {r['seconds']} s, {r['sleeps']} sleeps, {r['polls']} polls")


# Two guests joined by a link: the server's machine dies (its QEMU is killed) while the
# client has sends outstanding.  With retry_cnt 6 the client's QP gives up and the
# connection ends with ETIMEDOUT (with 7, rxe would retransmit for ever).
PEER_SERVER = r'''
import os
from kbloop_ext.rdma.verbs import RdmaStack
s = RdmaStack()
lst = s.listen(os.environ["VM_ADDR"], 7471)
print("listening", flush=True)
while True:
    for ev in s.poll():
        if ev[0] == "accept":
            print("accepted", flush=True)
'''

PEER_CLIENT = r'''
import json, os, time
from kbloop_ext.rdma.verbs import RdmaStack
s = RdmaStack()
peer = os.environ["VM_PEER"]
deadline = time.monotonic() + 60
while True:                     # until the server listens
    c = s.connect(peer, 7471)
    evs = []
    while not evs:
        evs = [ev for ev in s.poll() if ev[1] is c and ev[0] in ("connected", "error")]
    if evs[0][0] == "connected":
        break
    c.close()
    assert time.monotonic() < deadline, evs
    time.sleep(0.2)
print("writing", flush=True)
data = b"x" * (1 << 20)
while True:
    if c.error == 0 and c.write_room:      # keep sends outstanding: loss shows only then
        c.write(data)
    for ev in s.poll():
        if ev[0] == "error":
            st = s.stats()
            print("RESULT", json.dumps({"err": ev[2], "wc_errors": st["wc_errors"]}), flush=True)
            raise SystemExit(0)
'''


def _py(script):
    return f"{sys.executable} - <<'KB_RDMA_EOF'\n{script}\nKB_RDMA_EOF\n"


def test_lost_peer_times_out():
    with rdma_vm.start_pair(_py(PEER_SERVER), _py(PEER_CLIENT)) as (server, client):
        client.wait_for_output("writing", timeout=90)
        server.wait_for_output("accepted", timeout=30)
        server.kill()
        killed = time.monotonic()
        lost = client.wait(timeout=150)
        noticed_s = time.monotonic() - killed
    m = re.search(r"^RESULT (.*)$", lost.output, re.M)
    assert lost.status == 0 and m, lost.output
    r = json.loads(m.group(1))
    ETIMEDOUT = 110
    assert r == {"err": ETIMEDOUT, "wc_errors": 1}, lost.output
    assert noticed_s < 60, noticed_s
    print(f"lost peer noticed {noticed_s:.1f} s after its machine died")
