"""The benchmark suite (python -m bench) measures correct servers, not broken ones.

Every example server the suite drives is started through the suite's own
runner on every loop (kbloop's reactor modes included: kbloop-busy,
kbloop-sqpoll, and kbloop-sslproto for TLS) and checked byte for byte (echo, also
over TLS), body for body (HTTP, HTTPS) and reply for reply (Redis, raw RESP and
redis-py).  Then `python -m bench
--smoke` runs every scenario once per loop with tiny counts and must report
no errors from echo_load (which checks every echoed byte), wrk (non-2xx,
socket errors) or redis-benchmark (error replies).  Benchmarks, never timed
tests: no assertion here is about speed.
"""

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys

import pytest

from bench import runner, scenarios

# The servers checked directly from here: the loopback loops.  The DPDK loops' servers sit
# behind a veth pair or memif (the smoke run checks them through its load generators, which
# verify every byte, and tests/test_dpdk_loop.py runs the same examples).
LOOPS = [loop for loop in runner.LOOPS if runner.link_of(loop) == "loopback"]


@pytest.fixture(scope="module", params=LOOPS)
def loop(request):
    ok, why = runner.available(request.param)
    if not ok:
        pytest.skip(f"{request.param} not usable: {why}")
    return request.param


@pytest.fixture
def serve(loop):
    """serve(server_key, tls=False) -> port of that example server on this loop; stopped
    after."""
    started = []

    def _serve(key, tls=False):
        server = runner.Server(loop, key, tls)
        started.append(server)
        return server.port

    yield _serve
    for server in started:
        assert server.stop() == 0, server.error_output()[-2000:]


def recv_exactly(sock, n):
    chunks, got = [], 0
    while got < n:
        b = sock.recv(min(n - got, 1 << 16))
        assert b, f"connection closed after {got} of {n} bytes"
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


@pytest.mark.parametrize("key", ["proto", "buffered", "streams"])
def test_echo_server_echoes_exact_bytes(serve, key):
    port = serve(key)
    with socket.create_connection((runner.HOST, port), timeout=10) as s:
        for size in (1, 64, 1024, 16384, 102400):
            payload = os.urandom(size)
            s.sendall(payload)
            assert recv_exactly(s, size) == payload


@pytest.mark.parametrize("key", ["httptools", "aiohttp"])
def test_http_server_body_keep_alive(serve, key):
    port = serve(key)
    conn = http.client.HTTPConnection(runner.HOST, port, timeout=10)
    try:
        check_keep_alive(conn)
    finally:
        conn.close()


def check_keep_alive(conn):
    for _ in range(3):  # same connection: keep-alive
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == b"Hello, World!"
        assert not resp.will_close


def client_context():
    """Trusts the suite's self-signed certificate, checking it (and 127.0.0.1) for real."""
    return ssl.create_default_context(cafile=runner.tls_cert()[0])


def test_tls_echo_server_echoes_exact_bytes(serve):
    port = serve("proto", tls=True)
    raw = socket.create_connection((runner.HOST, port), timeout=10)
    with client_context().wrap_socket(raw, server_hostname=runner.HOST) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        for size in (1, 64, 1024, 16384, 102400):
            payload = os.urandom(size)
            s.sendall(payload)
            assert recv_exactly(s, size) == payload


def test_https_server_body_keep_alive(serve):
    port = serve("httptools", tls=True)
    conn = http.client.HTTPSConnection(runner.HOST, port, timeout=10, context=client_context())
    try:
        check_keep_alive(conn)
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        conn.close()


@pytest.mark.parametrize("fault", [None, "flip", "extra", "close"])
def test_tls_echo_load_checks_every_decrypted_byte(fault):
    """echo_load_tls against a TLS echo server of this test's own (threads, blocking ssl
    sockets): a correct echo counts round trips without errors; a flipped byte, a byte too
    many or a close mid-run is an error (exit status 3), so a broken TLS server cannot pass."""
    import threading

    exe = runner.build_echo_load(tls=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*runner.tls_cert())
    listener = socket.create_server((runner.HOST, 0))
    port = listener.getsockname()[1]

    def echo(conn):
        with conn:
            n = 0
            while data := conn.recv(65536):
                n += 1
                if fault == "flip" and n == 50:
                    data = bytes([data[0] ^ 1]) + data[1:]
                elif fault == "extra" and n == 50:
                    data += b"x"
                elif fault == "close" and n == 50:
                    return
                conn.sendall(data)

    def accept():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                conn = ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        out = subprocess.run([str(exe), "-p", str(port), "-c", "2", "-s", "100", "-d", "0.3",
                              "-w", "0"], capture_output=True, text=True, timeout=30)
    finally:
        listener.close()
    res = json.loads(out.stdout)
    if fault is None:
        assert out.returncode == 0 and res["errors"] == 0 and res["requests"] > 100, out
    else:
        assert out.returncode == 3 and res["errors"] >= 1, out
        assert {"flip": "does not match", "extra": "does not match",
                "close": "closed by server"}[fault] in out.stderr, out


def resp_command(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def test_redis_server_replies(serve):
    port = serve("redis")
    with socket.create_connection((runner.HOST, port), timeout=10) as s:
        def ask(request, expected):
            s.sendall(request)
            assert recv_exactly(s, len(expected)) == expected

        ask(resp_command(b"PING"), b"+PONG\r\n")
        ask(b"PING\r\n", b"+PONG\r\n")  # inline, as redis-benchmark's PING_INLINE
        ask(resp_command(b"SET", b"k", b"v\r\nx"), b"+OK\r\n")  # binary-safe value
        ask(resp_command(b"GET", b"k"), b"$4\r\nv\r\nx\r\n")
        ask(resp_command(b"GET", b"missing"), b"$-1\r\n")
        ask(resp_command(b"INCR", b"n"), b":1\r\n")
        ask(resp_command(b"INCR", b"n"), b":2\r\n")
        ask(resp_command(b"INCR", b"k"), b"-ERR value is not an integer or out of range\r\n")
        ask(resp_command(b"NOPE"), b"-ERR unknown command 'NOPE'\r\n")

        # Pipelining: 300 commands sent in 7-byte pieces, so commands are split
        # across reads; every reply must come back, in order.
        batch, expected = [], []
        for i in range(100):
            key, value = b"key:%d" % i, b"value-%d" % i
            batch += [resp_command(b"SET", key, value), resp_command(b"GET", key),
                      resp_command(b"INCR", b"counter")]
            expected += [b"+OK\r\n", b"$%d\r\n%b\r\n" % (len(value), value), b":%d\r\n" % (i + 1)]
        data = b"".join(batch)
        for i in range(0, len(data), 7):
            s.sendall(data[i:i + 7])
        want = b"".join(expected)
        assert recv_exactly(s, len(want)) == want


def test_redis_server_with_redis_py(serve):
    redis = pytest.importorskip("redis")
    # RESP2: the example server does not speak RESP3 (redis-py 8 asks for it by default).
    r = redis.Redis(host=runner.HOST, port=serve("redis"), socket_timeout=10, protocol=2)
    try:
        assert r.ping()
        assert r.set("a", "1")
        assert r.get("a") == b"1"
        assert r.incr("a") == 2
        pipe = r.pipeline(transaction=False)
        for i in range(50):
            pipe.set(f"p{i}", i).incr("pc")
        results = pipe.execute()
        assert results == [x for i in range(50) for x in (True, i + 1)]
        assert r.get("p49") == b"49"
    finally:
        r.close()


# ---------------------------------------------------------------- python -m bench --smoke

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out-dir", str(out)],
                          cwd=runner.REPO, capture_output=True, text=True, timeout=300)
    results = sorted(out.glob("smoke-*.json"))
    return proc, json.loads(results[0].read_text()) if results else None, out


@pytest.mark.parametrize("kind", ["echo", "http", "redis"])
def test_smoke_mode_runs_every_scenario_without_errors(smoke_run, kind):
    tool = runner.TOOLS.get(kind)
    if tool and not shutil.which(tool):
        pytest.skip(f"`{tool}` is not installed (bash scripts/setup.sh installs it)")
    proc, data, _ = smoke_run
    assert data is not None, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loops = data["meta"]["loops"]
    assert "asyncio" in loops
    # --smoke runs every loop the suite knows, the reactor modes and the DPDK loops too
    # (where usable: DPDK built, root for the veth pair and memif).
    assert set(loops) == {loop for loop in runner.LOOPS if runner.available(loop)[0]}
    for sc in scenarios.smoke():
        if sc.kind != kind:
            continue
        for loop in loops:
            runs = [x for x in data["samples"] if x["scenario"] == sc.name and x["loop"] == loop]
            if not runner.supports(loop, sc):     # e.g. no wrk over memif
                assert runs == [], (sc.name, loop)
                continue
            assert len(runs) == 1, (sc.name, loop)
            (x,) = runs
            assert x["ok"] and x["errors"] == 0 and x["server_exit"] == 0, (sc.name, loop, x)
            assert x["requests"] > 0 and x["cpu_us_per_req"] is not None, (sc.name, loop, x)
            if sc.open_of:
                assert x["mode"] == "open" and x["missed"] == 0, (sc.name, loop, x)
            if kind == "redis":
                # PING_INLINE, PING_MBULK, SET, GET, INCR, each -n requests
                assert len(x["tests"]) == 5 and x["requests"] == 5 * sc.requests, x


def test_smoke_mode_runs_every_core_program(smoke_run):
    """--smoke also runs each --core program (bench/core.py) once per loop, tiny: each in its
    own process on the intended loop, every row of the table measured."""
    from bench import core

    proc, data, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("core-smoke-*.json")
    core_data = json.loads(path.read_text())
    loops = core_data["meta"]["loops"]
    assert {"asyncio", "uvloop", "kbloop"} <= set(loops) <= set(core.CORE_LOOPS)
    assert set(loops) == {loop for loop in data["meta"]["loops"] if loop in core.CORE_LOOPS}
    for bench in core.BENCHES:
        for loop in loops:
            runs = [x for x in core_data["samples"]
                    if x["bench"] == bench.name and x["loop"] == loop]
            assert len(runs) == 1, (bench.name, loop)
            (x,) = runs
            assert x["ok"] and x["n"] == bench.smoke_n, (bench.name, loop, x)
            assert x["loop_class"].startswith(core.CORE_LOOPS[loop][0]), x
            for key in ("ns", "cpu_ns"):   # wall clock and CPU per operation
                assert set(x[key]) == set(bench.metrics) and all(v > 0 for v in x[key].values()), x
    assert [r["metric"] for r in core_data["summary"]] == [m for _, m in core.metrics()]
    assert {t[0] for t in core_data["targets"].values()} <= {"met", "MISSED"}
    md = next(out.glob("core-smoke-*.md")).read_text()
    assert md.count("| benchmark | asyncio ns | uvloop ns | kbloop ns | kbloop/uvloop |") == 2


def test_core_report_ratios_and_target():
    """--core: min and median ns per operation, ratios to uvloop, the <= 0.8x target."""
    from bench import core

    def sample(loop, rnd, ns):
        return {"bench": "call_soon", "loop": loop, "round": rnd, "warmup": False, "ok": True,
                "ns": {"call_soon chain": ns}, "cpu_ns": {"call_soon chain": ns / 2}}

    samples = [sample("uvloop", 0, 100.0), sample("uvloop", 1, 120.0), sample("uvloop", 2, 200.0),
               sample("kbloop", 0, 90.0), sample("kbloop", 1, 70.0), sample("kbloop", 2, 96.0),
               {**sample("kbloop", 3, 1.0), "warmup": True},          # discarded
               {"bench": "call_soon", "loop": "kbloop", "round": 4, "warmup": False, "ok": False}]
    (row,) = core.summarize(samples, ["uvloop", "kbloop"])
    kb = row["loops"]["kbloop"]
    assert (kb["min"], kb["median"], kb["n"]) == (70.0, 90.0, 3)
    assert kb["min_vs_uvloop"] == 0.7 and kb["median_vs_uvloop"] == 0.75
    assert (kb["cpu_min"], kb["cpu_median"]) == (35.0, 45.0) and kb["cpu_min_vs_uvloop"] == 0.7
    verdict, details = core.check_target([row])
    assert verdict == "met" and "1 of 1" in details[0]
    assert "| **0.70x / 0.75x** |" in core.table([row], ["uvloop", "kbloop"], markdown=True)
    assert "70 / 90" in core.table([row], ["kbloop", "uvloop"])
    assert "35 / 45" in core.table([row], ["kbloop", "uvloop"], clock="cpu_")

    samples = [{**x, "ns": {"call_soon chain": x["ns"]["call_soon chain"] * 1.2}}
               if x["loop"] == "kbloop" and x["ok"] else x for x in samples]   # 0.84x
    targets = core.check_targets(core.summarize(samples, ["uvloop", "kbloop"]))
    verdict, details = targets[""]
    assert verdict == "MISSED" and "call_soon chain: 0.84x uvloop" in details[1]
    assert targets["cpu_"][0] == "met"      # the CPU figures did not change
    assert core.check_target(core.summarize(samples, ["kbloop"]))[0] == "not measured"


def test_modes_report_checks_busy_poll_target():
    """--modes reports ratios to uvloop and the busy-poll p50 <= 0.8x uvloop target."""
    from bench import report

    c1, c32 = scenarios.echo("proto", 64, 1), scenarios.echo("proto", 64, 32)
    base = {"warmup": False, "ok": True, "rps": 1000.0, "cpu_us_per_req": 10.0,
            "server_cpu_pct": 50.0, "gen_cpu_pct": 50.0, "p99_us": 200.0, "p999_us": 300.0}
    p50 = {("uvloop", c1): 100.0, ("kbloop-busy", c1): 75.0,
           ("uvloop", c32): 100.0, ("kbloop-busy", c32): 120.0}
    samples = [{**base, "scenario": sc.name, "loop": loop, "p50_us": us}
               for (loop, sc), us in p50.items()]
    rows = report.summarize(samples, ["uvloop", "kbloop-busy"], [c1, c32])
    (target,) = [t for t in report.check_targets(rows) if "busy-poll" in t[0]]
    assert target[1] == "met" and "0.75x" in target[2][0]
    table = report.modes_table(rows)
    assert "75 (0.75x)" in table and "64B c32 req/s" in table
    assert report.modes_table([r for r in rows if r["loop"] == "uvloop"]) == ""

    samples = [{**x, "p50_us": 90.0} if x["loop"] == "kbloop-busy" else x for x in samples]  # 0.9x
    rows = report.summarize(samples, ["uvloop", "kbloop-busy"], [c1, c32])
    (target,) = [t for t in report.check_targets(rows) if "busy-poll" in t[0]]
    assert target[1] == "MISSED"


def test_dpdk_report_compares_each_link_with_its_own_uvloop():
    """--dpdk: the veth loops are compared with uvloop-veth, memif with uvloop on loopback,
    and the memif CPU target (<= 0.5x uvloop at 1 KiB c32, Protocol) is checked."""
    from bench import report

    c32 = scenarios.echo("proto", 1024, 32)
    base = {"warmup": False, "ok": True, "server_cpu_pct": 100.0, "gen_cpu_pct": 50.0,
            "p50_us": 100.0, "p99_us": 200.0, "p999_us": 300.0}
    runs = {"uvloop-veth": (100_000, 8.0), "kbloop-dpdk": (120_000, 6.0),
            "uvloop": (110_000, 8.0), "kbloop-memif": (400_000, 3.6)}
    samples = [{**base, "scenario": c32.name, "loop": loop, "rps": rps, "cpu_us_per_req": cpu}
               for loop, (rps, cpu) in runs.items()]
    rows = {r["loop"]: r for r in report.summarize(samples, list(runs), [c32])}
    assert rows["kbloop-dpdk"]["vs_uvloop"] == 1.2 and rows["kbloop-dpdk"]["cpu_vs_uvloop"] == 0.75
    assert rows["kbloop-memif"]["cpu_vs_uvloop"] == 0.45
    (target,) = [t for t in report.check_targets(list(rows.values())) if "memif" in t[0]]
    assert target[1] == "met" and "0.45x" in target[2][0]
    table = report.modes_table(list(rows.values()))
    assert "120,000 (1.20x)" in table and "400,000 (3.64x)" in table


def test_tls_report_checks_issue_15_target():
    """--tls: per scenario, kbloop must reach uvloop's req/s at <= 0.9x its CPU per request;
    the report says met or MISSED (and why) for each row."""
    from bench import report

    echo, web = scenarios.tls_echo("proto", 64, 32), scenarios.https("httptools", 32)
    assert (echo.group, web.group) == ("tls", "https")
    assert not runner.supports("kbloop-sslproto", scenarios.echo("proto", 64, 32))
    assert runner.supports("kbloop-sslproto", echo) and runner.supports("kbloop", web)
    base = {"warmup": False, "ok": True, "server_cpu_pct": 100.0, "gen_cpu_pct": 50.0,
            "p50_us": 100.0, "p99_us": 200.0, "p999_us": 300.0}
    runs = {(echo, "uvloop"): (10_000, 50.0), (echo, "kbloop"): (11_000, 45.0),  # 1.1x, 0.9x
            (web, "uvloop"): (10_000, 50.0), (web, "kbloop"): (9_900, 40.0),     # 0.99x, 0.8x
            (web, "kbloop-sslproto"): (8_000, 60.0)}
    samples = [{**base, "scenario": sc.name, "loop": loop, "rps": rps, "cpu_us_per_req": cpu}
               for (sc, loop), (rps, cpu) in runs.items()]
    rows = report.summarize(samples, ["uvloop", "kbloop", "kbloop-sslproto"], [echo, web])
    (target,) = [t for t in report.check_targets(rows) if t[0] == report.TLS_TARGET]
    assert target[1] == "MISSED"
    assert target[2][0].endswith(": met") and "tls proto 64B c32: 1.10x" in target[2][0]
    assert target[2][1].endswith("MISSED: req/s 0.99x < 1.0x")
    table = report.tls_table(rows)
    assert "11,000 (1.10x)" in table and "45.0 (0.90x)" in table and "8,000 (0.80x)" in table
    assert "MISSED: req/s 0.99x < 1.0x" in table
    assert report.modes_table(rows) == ""      # kbloop-sslproto is no reactor mode
    md = report.tls_table(rows, markdown=True)
    assert md.splitlines()[0].startswith("| scenario | uvloop req/s | uvloop CPU us/req |")
    assert md.count("\n") == 3 and "| met |" in md

    samples = [{**x, "cpu_us_per_req": 46.0} if x["loop"] == "kbloop" and x["scenario"] == echo.name
               else x for x in samples]      # 0.92x uvloop's CPU per request
    rows = report.summarize(samples, ["uvloop", "kbloop"], [echo])
    (target,) = [t for t in report.check_targets(rows) if t[0] == report.TLS_TARGET]
    assert target[1] == "MISSED" and target[2][0].endswith("MISSED: CPU/req 0.92x > 0.9x")


def test_smoke_mode_writes_report_and_plots(smoke_run):
    proc, data, out = smoke_run
    assert data is not None, proc.stdout + proc.stderr
    assert {t[0] for t in data["targets"]}  # target checks ran
    assert len(list(out.glob("smoke-*.md"))) == 1
    pytest.importorskip("matplotlib")
    assert {p.name.rsplit("-", 1)[1] for p in out.glob("smoke-*.png")} == {
        "throughput.png", "latency.png", "cpu.png"}


def test_report_survives_zero_cpu_samples():
    """A tiny run can record 0 us of CPU (/proc's 10 ms ticks): no ratio, no crash."""
    from bench import report

    sc = scenarios.echo("proto", 64, 32)
    base = {"warmup": False, "ok": True, "rps": 1000.0, "server_cpu_pct": 1.0,
            "gen_cpu_pct": 1.0, "p50_us": 100.0, "p99_us": 200.0, "p999_us": 300.0,
            "scenario": sc.name}
    samples = [{**base, "loop": "uvloop", "cpu_us_per_req": 0.0},
               {**base, "loop": "kbloop", "cpu_us_per_req": 0.0},
               {**base, "loop": "kbloop", "cpu_us_per_req": 10.0}]
    rows = report.summarize(samples, ["uvloop", "kbloop"], [sc])
    kb = next(r for r in rows if r["loop"] == "kbloop")
    assert kb["cpu_vs_uvloop"] is None and kb["cpu_spread_pct"] == 200.0
    assert next(r for r in rows if r["loop"] == "uvloop")["cpu_spread_pct"] == 0.0
    report.check_targets(rows)
    report.text_table(rows)
    report.markdown_table(rows)
