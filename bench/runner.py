"""Machinery of the benchmark suite: start a server on a given loop, drive it
with a compiled load generator, measure server CPU.  Method: bench/README.md.
"""

import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "bench" / ".build"
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
GEN_BOUND_PCT = 90  # a generator using >= this much of its core may be the limit
NOISY_SHARE = 0.1  # other processes using more than this share of a CPU skew a run

# How each loop starts a server script, unmodified.  asyncio: plain python.
# uvloop has no `python -m uvloop`, so a tiny shim installs its policy and
# runs the script as __main__ -- the same thing `python -m kbloop` does.
UVLOOP_SHIM = (
    "import asyncio, os, runpy, sys, uvloop;"
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy());"
    "sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(sys.argv[0]);"
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
SERVER_CPU, LOAD_CPU = 0, 1

# Links (bench/README.md, "The DPDK datapath"): where a loop's server runs and how load reaches
# it.  "loopback": both on 127.0.0.1 (the default).  "veth": the server in namespace A of a
# veth pair (tests/netns.py) and the load generator in namespace B, through the kernel's veth
# driver; kernel loops listen on KERNEL_VETH_IP on vA, the DPDK stack answers for DPDK_VETH_IP
# on the same vA (af_packet PMD).  "memif": a DPDK server and a DPDK load generator
# (bench/dpdk_echo_load.py) joined by net_memif shared memory, no kernel in the path.
NET = None                       # the VethPair while a run has veth loops (bench/__main__.py)
KERNEL_VETH_IP, DPDK_VETH_IP = "10.200.0.3", "10.200.0.1"
MEMIF_SERVER_IP, MEMIF_CLIENT_IP = "10.201.0.1", "10.201.0.2"
MEMIF_SOCK = f"/tmp/kbloop-bench-memif-{os.getpid()}.sock"
DPDK_ARGV = ["-m", "kbloop", "--backend", "dpdk"]


DPDK_PROBE = ("import os; from kbloop_ext import dpdk; ok, why = dpdk.available();"
              "assert ok, why; assert os.geteuid() == 0, 'DPDK on veth/memif needs root'")


def kbloop_probe(mode="default"):
    # new_event_loop() falls back to asyncio when io_uring (or the mode) is unusable.
    return ("import kbloop; l = kbloop.new_event_loop(); l.close();"
            "assert isinstance(l, kbloop.Loop), 'io_uring unusable: asyncio fallback';"
            f"assert l.stats()['mode'] == {mode!r}, 'mode is ' + l.stats()['mode']")


LOOPS = {
    "asyncio": {"argv": [], "module": "asyncio.", "probe": "import asyncio"},
    "uvloop": {"argv": ["-c", UVLOOP_SHIM], "module": "uvloop.", "probe": "import uvloop"},
    "kbloop": {"argv": ["-m", "kbloop"], "module": "kbloop", "probe": kbloop_probe()},
    # Reactor modes (docs/modes.md), set through the environment as a user of
    # `python -m kbloop` would; "env" applies to the server and its probe.
    # Busy-poll spins on the server's own core (the default spin_us).
    "kbloop-busy": {"argv": ["-m", "kbloop"], "module": "kbloop",
                    "env": {"KBLOOP_BUSY_POLL": "1", "KBLOOP_CPU": str(SERVER_CPU)},
                    "probe": kbloop_probe("busy_poll")},
    # SQPOLL's kernel thread shares the server's core.  With 2 cores there is no spare
    # one: on the load generator's core it would take CPU from the generator (c32 echo
    # then fell to ~0.3x), and the server would get more than the one core every other
    # loop gets.  A machine with a core to spare should give it that core.
    "kbloop-sqpoll": {"argv": ["-m", "kbloop"], "module": "kbloop",
                      "env": {"KBLOOP_SQPOLL": "1", "KBLOOP_SQ_CPU": str(SERVER_CPU)},
                      "probe": kbloop_probe("sqpoll")},
    # kbloop with asyncio's sslproto as its TLS layer instead of its own (docs/tls.md, the
    # escape hatch): the same loop as "kbloop" without TLS, so it runs the TLS scenarios only.
    "kbloop-sslproto": {"argv": ["-m", "kbloop"], "module": "kbloop",
                        "env": {"KBLOOP_TLS": "asyncio"}, "tls_only": True,
                        "probe": kbloop_probe()},
    # The DPDK datapath (issue 6, `--dpdk`): "vs" names the loop each one is compared with.
    "uvloop-veth": {"argv": ["-c", UVLOOP_SHIM], "module": "uvloop.", "probe": "import uvloop",
                    "link": "veth", "vs": "uvloop-veth"},
    "kbloop-veth": {"argv": ["-m", "kbloop"], "module": "kbloop", "probe": kbloop_probe(),
                    "link": "veth", "vs": "uvloop-veth"},
    "kbloop-dpdk": {"argv": DPDK_ARGV + ["--dpdk-vdev", "net_af_packet0,iface=vA",
                                         "--ip", f"{DPDK_VETH_IP}/24"],
                    "module": "kbloop", "probe": DPDK_PROBE, "link": "veth",
                    "host": "0.0.0.0", "target": DPDK_VETH_IP, "vs": "uvloop-veth"},
    "kbloop-memif": {"argv": DPDK_ARGV + [
                         "--dpdk-vdev", f"net_memif0,role=server,socket={MEMIF_SOCK},"
                                        "mac=02:00:00:00:00:01", "--ip", f"{MEMIF_SERVER_IP}/24"],
                     "module": "kbloop", "probe": DPDK_PROBE, "link": "memif",
                     "host": "0.0.0.0", "target": MEMIF_SERVER_IP, "vs": "uvloop"},
}
# The loops of `python -m bench --modes`, compared with uvloop in the same run.
MODE_LOOPS = ["uvloop", "kbloop", "kbloop-busy", "kbloop-sqpoll"]
# The loops of `python -m bench --tls`: kbloop's own TLS layer and asyncio's sslproto on kbloop.
TLS_LOOPS = ["asyncio", "uvloop", "kbloop", "kbloop-sslproto"]
# The loops of `python -m bench --dpdk`: over the veth link, uvloop and kbloop on the kernel
# and kbloop on DPDK; over memif, kbloop on DPDK against uvloop on loopback.
DPDK_LOOPS = ["uvloop-veth", "kbloop-veth", "kbloop-dpdk", "uvloop", "kbloop-memif"]


def link_of(loop):
    return LOOPS[loop].get("link", "loopback")


def supports(loop, sc):
    """Can this loop's link run the scenario?  Over memif the only load generator is the
    closed-loop echo one on the DPDK stack (no wrk, redis-benchmark or open loop there).
    TLS runs on loopback (TLS over the DPDK stack is tests/test_dpdk_loop.py's); a loop that
    differs from another only in its TLS layer (kbloop-sslproto) runs the TLS scenarios only."""
    if sc.tls:
        return link_of(loop) == "loopback"
    if LOOPS[loop].get("tls_only"):
        return False
    return link_of(loop) != "memif" or (sc.kind == "echo" and not sc.open_of)


def loop_env(loop):
    """The environment a loop's server (and probe) runs in."""
    return {**os.environ, **LOOPS[loop].get("env", {})}

# The example servers, unmodified; the suite only chooses how to start them.
SERVERS = {
    "proto": ["examples/echo_protocol.py"],
    "buffered": ["examples/echo_protocol.py", "--buffered"],
    "streams": ["examples/echo_streams.py"],
    "httptools": ["examples/http_server.py"],
    "aiohttp": ["examples/aiohttp_server.py"],
    "redis": ["examples/redis_server.py"],
}

# External load generators per scenario kind (echo_load is built from source).
TOOLS = {"http": "wrk", "redis": "redis-benchmark"}


def pin(cpu):
    """preexec_fn that pins the child to one CPU (no-op without 2 CPUs)."""
    if len(os.sched_getaffinity(0)) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def readline(stream, timeout):
    """One line from a child's stdout pipe (text or bytes), or "" after timeout seconds."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    if not ready:
        return ""
    line = stream.readline()
    return line.decode() if isinstance(line, bytes) else line


def build_echo_load(tls=False):
    """Compile the load generator if it is missing or older than its source; tls: its TLS
    build (OpenSSL: libssl-dev), bench/.build/echo_load_tls."""
    src, exe = REPO / "bench" / "echo_load.c", BUILD / ("echo_load_tls" if tls else "echo_load")
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        flags = (["-DECHO_LOAD_TLS"], ["-lssl", "-lcrypto"]) if tls else ([], [])
        subprocess.run(["gcc", "-O2", "-Wall", *flags[0], "-o", str(exe), str(src), *flags[1]],
                       check=True)
    return exe


def tls_cert():
    """(cert, key): a self-signed ECDSA P-256 certificate for 127.0.0.1 that the TLS servers
    load (`--tls CERT KEY`); made once with `openssl req` into bench/.build/tls/.  The load
    generators do not check it."""
    d = BUILD / "tls"
    if not d.exists():
        # Made beside it and renamed into place: a concurrent run sees both files or none.
        BUILD.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tls.", dir=BUILD))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
                        "-subj", "/CN=localhost", "-addext", f"subjectAltName=IP:{HOST}",
                        "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
                       check=True, capture_output=True)
        try:
            tmp.rename(d)
        except OSError:     # another run was first
            shutil.rmtree(tmp)
    return str(d / "cert.pem"), str(d / "key.pem")


def available(loop):
    """(usable, reason): can this interpreter run the loop?"""
    r = subprocess.run([sys.executable, "-c", LOOPS[loop]["probe"]], cwd=REPO,
                       env=loop_env(loop), capture_output=True, text=True)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


class Server:
    """One example server process on one loop; fresh per measurement so no
    state leaks between runs."""

    def __init__(self, loop, server, tls=False):
        self.stderr = tempfile.TemporaryFile()
        self.link = link_of(loop)
        host = LOOPS[loop].get("host") or (KERNEL_VETH_IP if self.link == "veth" else HOST)
        self.target = LOOPS[loop].get("target", host)   # where the load generator connects
        argv = [sys.executable, *LOOPS[loop]["argv"], *SERVERS[server],
                "--host", host, "--port", "0", *(["--tls", *tls_cert()] if tls else [])]
        self.peers = []     # memif load generators that stay connected until the server stops
        if self.link == "veth":
            argv = NET.cmd_a(*argv)
        elif self.link == "memif" and os.path.exists(MEMIF_SOCK):
            os.unlink(MEMIF_SOCK)
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=loop_env(loop), stdout=subprocess.PIPE, stderr=self.stderr,
            preexec_fn=pin(SERVER_CPU),
        )
        line = self._readline(timeout=30)
        m = re.match(r"listening on (\S+):(\d+)$", line.strip())
        if not m:
            self.stop()
            raise RuntimeError(f"{loop} {server} server did not start: {line!r}\n"
                               f"{self.error_output()}")
        self.port = int(m.group(2))
        # Guard against silently benchmarking the wrong loop (e.g. a policy
        # that did not take effect): the examples report their loop class.
        used = re.search(r"event loop: (\S+)", self.error_output())
        if not used or not used.group(1).startswith(LOOPS[loop]["module"]):
            self.stop()
            raise RuntimeError(f"{loop} server runs on {used and used.group(1)}")

    def _readline(self, timeout):
        return readline(self.proc.stdout, timeout)

    def cpu_seconds(self):
        # utime+stime of the whole thread group (includes io_uring workers).
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def error_output(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def stop(self):
        """SIGTERM and wait; returns the exit code (the examples exit 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc.stdout.close()
        for peer in self.peers:     # now they may go (their stdin closes)
            peer.stdin.close()
            try:
                peer.wait(30)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
        self.peers = []
        return rc


# ---------------------------------------------------------------- load generators
# Each returns a dict with at least: requests, rps, p50_us, p99_us, errors.

def run_memif_echo(sc, server, seconds, rate, warmup_s):
    """The DPDK load generator over memif: its warm-up is part of its one run (a second
    generator would reconnect the link), and it stays connected until the server has
    stopped (Server.stop): see bench/dpdk_echo_load.py."""
    if rate:
        raise RuntimeError("no open-loop load generator over memif")
    argv = [sys.executable, str(REPO / "bench" / "dpdk_echo_load.py"), "--linger", "--vdev",
            f"net_memif0,role=client,socket={MEMIF_SOCK},mac=02:00:00:00:00:02",
            "--ip", MEMIF_CLIENT_IP, "-H", server.target, "-p", str(server.port),
            "-c", str(sc.conns), "-s", str(sc.msg_size), "-d", str(seconds),
            "-w", str(warmup_s)]
    gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=pin(LOAD_CPU))
    server.peers.append(gen)
    line = readline(gen.stdout, seconds + warmup_s + 60)
    try:
        return json.loads(line)
    except ValueError:
        raise RuntimeError(f"dpdk_echo_load failed: {line!r}") from None


def echo_load_argv(sc, server, seconds, rate=None):
    argv = [str(build_echo_load(sc.tls)), "-H", server.target, "-p", str(server.port),
            "-c", str(sc.conns), "-s", str(sc.msg_size), "-d", str(seconds), "-w", "0"]
    return argv + (["-r", f"{rate:.0f}"] if rate else [])


def run_tool(argv, timeout, server=None):
    """A load generator pinned to its CPU (in namespace B for a veth server)."""
    if server is not None and server.link == "veth":
        argv = NET.cmd_b(*argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=pin(LOAD_CPU))


def run_echo(sc, server, seconds, rate=None, warmup_s=0.0):
    if server.link == "memif":
        return run_memif_echo(sc, server, seconds, rate, warmup_s)
    out = run_tool(echo_load_argv(sc, server, seconds, rate), seconds + 60, server)
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"echo_load failed: {out.stdout}{out.stderr}") from None


def run_wrk(sc, server, seconds):
    argv = ["wrk", "-t1", f"-c{sc.conns}", f"-d{max(1, math.ceil(seconds))}s", "--latency",
            f"{'https' if sc.tls else 'http'}://{server.target}:{server.port}/"]
    out = run_tool(argv, seconds + 60, server)
    return parse_wrk(out.stdout + out.stderr)


def parse_wrk(text):
    def num(pattern, default=None):
        m = re.search(pattern, text, re.M)
        if not m:
            if default is None:
                raise RuntimeError(f"cannot parse wrk output:\n{text}")
            return default
        return m.groups()

    def us(value, unit):
        return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]

    socket_errors = num(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        ("0",) * 4)
    non_2xx = num(r"Non-2xx or 3xx responses: (\d+)", ("0",))
    return {
        "requests": int(num(r"(\d+) requests in")[0]),
        "rps": float(num(r"Requests/sec:\s+([\d.]+)")[0]),
        "p50_us": us(*num(r"^\s+50%\s+([\d.]+)(us|ms|s)\b")),
        "p99_us": us(*num(r"^\s+99%\s+([\d.]+)(us|ms|s)\b")),
        "errors": sum(map(int, socket_errors + non_2xx)),
    }


REDIS_TESTS = "ping,set,get,incr"


def run_redis(sc, server, requests):
    """redis-benchmark, fixed -n per command; one row per command in its CSV."""
    argv = ["redis-benchmark", "-h", server.target, "-p", str(server.port), "-c", str(sc.conns),
            "-n", str(requests), "-P", str(sc.pipeline), "-t", REDIS_TESTS, "--csv"]
    out = run_tool(argv, 600, server)
    res = parse_redis_csv(out.stdout, requests)
    # redis-benchmark stops with status 1 on an error reply ("Error from server").
    res["errors"] += out.returncode != 0 or "error" in out.stderr.lower()
    if res["errors"] and out.stderr:
        print(f"\n  ! redis-benchmark: {out.stderr.strip()[-500:]}", file=sys.stderr)
    return res


def parse_redis_csv(text, requests_per_test):
    rows = [line.replace('"', "").split(",") for line in text.splitlines() if line.strip()]
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise RuntimeError(f"cannot parse redis-benchmark output:\n{text}")
    head = rows[0]
    tests = {r[0]: dict(zip(head[1:], map(float, r[1:]))) for r in rows[1:]}
    # A test too short for redis-benchmark's millisecond clock reports 0 req/s: unmeasurable.
    tests = {name: t for name, t in tests.items() if t["rps"] > 0}
    if not tests:
        return {"requests": 0, "rps": 0.0, "p50_us": 0.0, "p99_us": 0.0, "errors": 1, "tests": {}}
    # Aggregate over the commands: total requests over total time; latency
    # percentiles of the worst command.
    seconds = sum(requests_per_test / t["rps"] for t in tests.values())
    return {
        "requests": requests_per_test * len(tests),
        "rps": requests_per_test * len(tests) / seconds,
        "p50_us": 1e3 * max(t["p50_latency_ms"] for t in tests.values()),
        "p99_us": 1e3 * max(t["p99_latency_ms"] for t in tests.values()),
        "errors": 0,
        "tests": {name: t["rps"] for name, t in tests.items()},
    }


def run_load(sc, server, seconds, rate=None, warmup=False, warmup_s=0.0):
    """One run of the scenario's load generator against the server (warmup_s: a warm-up
    inside the same run, for generators that cannot run twice; its requests do not count)."""
    if sc.kind == "echo":
        return run_echo(sc, server, seconds, rate, warmup_s)
    if sc.kind == "http":
        return run_wrk(sc, server, seconds)
    if sc.kind == "redis":
        return run_redis(sc, server, max(1000, sc.requests // 10) if warmup else sc.requests)
    raise ValueError(sc.kind)


# ---------------------------------------------------------------- measuring

def machine_busy_seconds():
    """user+nice+system time of all CPUs (irq/softirq excluded, as in /proc/PID/stat)."""
    with open("/proc/stat") as f:
        user, nice, system = map(int, f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    """CPU of finished children, i.e. of the load generator runs."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Perf:
    """perf record -g of one process for the duration of a with-block."""

    def __init__(self, pid, output):
        self.pid, self.output = pid, output

    def __enter__(self):
        self.proc = subprocess.Popen(["perf", "record", "-g", "-q", "-o", str(self.output),
                                      "-p", str(self.pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # let perf attach before the load starts
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)


def measure(loop, sc, seconds, rate=None, warmup_s=0.5, profile_to=None):
    """Fresh server, warm-up load (discarded), then the measured run.

    rate: offered requests/s for an open-loop echo run (sc.open_of).
    profile_to: a perf.data path: record the server during the measured run.
    """
    server = Server(loop, sc.server, sc.tls)
    inline_warmup = warmup_s if server.link == "memif" else 0.0
    try:
        if warmup_s and not inline_warmup:
            run_load(sc, server, warmup_s, rate, warmup=True)
        cpu0, busy0, load0 = server.cpu_seconds(), machine_busy_seconds(), children_cpu_seconds()
        wall0 = time.monotonic()
        if profile_to:
            with Perf(server.proc.pid, profile_to):
                res = run_load(sc, server, seconds, rate, warmup_s=inline_warmup)
        else:
            res = run_load(sc, server, seconds, rate, warmup_s=inline_warmup)
        wall = time.monotonic() - wall0
        cpu = server.cpu_seconds() - cpu0
        gen = children_cpu_seconds() - load0
        if server.link == "memif":
            # The generator is still running (connected), so it is not among the finished
            # children yet; it busy-polls at the share of a core it reports.
            gen = res["gen_cpu_pct"] / 100 * wall
        # CPU used by anything other than server and load generator: a busy
        # machine (e.g. a compile running next to the suite) skews results.
        other = machine_busy_seconds() - busy0 - cpu - gen
        if server.link == "memif":
            # The generator also started its EAL and warmed up in this window: count the
            # server's CPU over the measured part only, at the share of a core it used over
            # the whole window.
            share = cpu / wall
            wall = res["elapsed_s"]
            cpu, gen = share * wall, res["gen_cpu_pct"] / 100 * wall
    finally:
        rc = server.stop()
    if profile_to:
        other = 0.0  # perf itself runs on the machine
    res.setdefault("gen_cpu_pct", 100 * gen / wall)  # echo_load reports its own
    res["server_cpu_s"] = cpu
    res["server_cpu_pct"] = 100 * cpu / wall
    res["other_cpu_s"] = max(0.0, other)
    res["wall_s"] = wall
    res["server_exit"] = rc
    res["cpu_us_per_req"] = 1e6 * cpu / res["requests"] if res["requests"] else None
    res["ok"] = res["errors"] == 0 and rc == 0 and res["requests"] > 0
    if not res["ok"]:
        tail = server.error_output()[-2000:]
        print(f"\n  ! {loop} / {sc.name}: errors={res['errors']} exit={rc}\n{tail}", file=sys.stderr)
    return res


def noisy(res):
    """Did something besides server and load generator use the machine during this run?"""
    return res["other_cpu_s"] > NOISY_SHARE * res["wall_s"]


def wait_until_quiet(timeout, window=1.0):
    """Wait (up to timeout seconds) for a window in which the machine is nearly idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0 = machine_busy_seconds()
        time.sleep(window)
        if machine_busy_seconds() - busy0 <= NOISY_SHARE * window:
            return True
    return False


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo ("" if it has none)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def machine_info():
    """What a reader needs to compare numbers across machines."""
    def version(argv, pattern=r"(\d[\w.~+-]*)"):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.search(pattern, out.stdout + out.stderr)
        return m.group(1) if m else None

    def module_version(name):
        r = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__version__)"],
                           cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() or None

    ssl_lib = subprocess.run([sys.executable, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"],
                             capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "") if hasattr(
            platform, "freedesktop_os_release") else "",
        "versions": {
            **{m: module_version(m) for m in ("kbloop", "uvloop", "aiohttp", "httptools")},
            "wrk": version(["wrk", "-v"], r"wrk (\S+)"),
            "redis-benchmark": version(["redis-benchmark", "--version"]),
            "openssl": version(["openssl", "version"], r"OpenSSL (\S+)"),
            "python ssl": ssl_lib or None,
            "gcc": version(["gcc", "-dumpfullversion"]),
        },
        "server_cpu": SERVER_CPU,
        "load_cpu": LOAD_CPU,
    }
