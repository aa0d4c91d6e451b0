"""RDMA vs io_uring datapath: echo latency and throughput in the soft-RoCE guest.

    python -m bench.rdma_guest              # 1 warm-up + 3 measured rounds, ~3 min; writes
                                            # bench/results/RDMA.md and rdma-DATE.json
    python -m bench.rdma_guest --smoke      # tiny sizes, 1 round, ~1 min: checks the machinery
    python -m bench.rdma_guest --rounds 5 --out-dir /tmp/x

RDMA cannot run on the host's kernel, so everything runs in ONE QEMU guest (tests/rdma_vm.py:
TCG emulation, one vCPU, rxe0 on dummy0 at 10.99.0.1).  Inside it, this same module (run with
--in-guest) is the client and the driver: for each round, for each datapath (order rotated
every round), it starts a fresh server, the unmodified examples/echo_protocol.py under
`python -m kbloop`, and measures

  * latency: 1 connection, 64-byte ping-pong, p50/p99 of every round trip over a fixed time;
  * requests: 8 connections, 1 KiB request/response, closed loop, req/s;
  * bulk: 1 connection streaming BULK bytes through the echo (and back), MiB/s of payload;

then stops the server (SIGTERM; it must exit 0).  The client checks every echoed byte.

Datapaths ("variants"):

  * rdma-sleep: server `--backend rdma --rdma-poll sleep`, client an RDMA loop in sleep mode;
  * rdma-busy:  server `--backend rdma --rdma-poll busy`, client an RDMA loop in SLEEP mode:
    with one vCPU, two processes that both spin would mostly measure the scheduler's time
    slices (each waits for the other's slice to end), so only the server spins and the client
    gets the CPU by preempting it when its completion arrives;
  * uring:      server `--backend io_uring`, client kbloop's io_uring loop, over the guest
    kernel's TCP to 10.99.0.1 (which the kernel routes over loopback).

The host side boots the guest, collects the samples (`SAMPLE {json}` lines), prints the table
of medians with ratios to uring, and writes bench/results/rdma-DATE.json (every sample) and
RDMA.md.  Emulated CPU, and soft-RoCE is itself kernel software: only the ratios mean anything.
Method and caveats: bench/README.md, "The RDMA datapath (guest)".
"""

import argparse
import asyncio
import datetime
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ADDR = "10.99.0.1"              # rdma_vm.ADDR: rxe0's dummy0 inside the single guest

VARIANTS = {
    "rdma-sleep": {"server": ["--backend", "rdma", "--rdma-poll", "sleep"],
                   "client": {"backend": "rdma", "rdma_poll": "sleep"}, "socket": "RdmaSocket",
                   "what": "RDMA datapath, server and client in sleep mode"},
    "rdma-busy": {"server": ["--backend", "rdma", "--rdma-poll", "busy"],
                  "client": {"backend": "rdma", "rdma_poll": "sleep"}, "socket": "RdmaSocket",
                  "what": "RDMA datapath, server busy-polls, client in sleep mode"},
    "uring": {"server": ["--backend", "io_uring"], "client": {"backend": "io_uring"},
              "socket": "socket", "what": "io_uring datapath, kernel TCP to 10.99.0.1"},
    # Not run by default (--variants): both processes spin on the one vCPU.
    "rdma-busy-both": {"server": ["--backend", "rdma", "--rdma-poll", "busy"],
                       "client": {"backend": "rdma", "rdma_poll": "busy"}, "socket": "RdmaSocket",
                       "what": "RDMA datapath, server and client busy-poll (one vCPU)"},
}
DEFAULT_VARIANTS = ["rdma-sleep", "rdma-busy", "uring"]
BASE = "uring"

# Durations and sizes.  Guest time is ~20x host time; a Python start there is ~2-5 s.
PROFILES = {
    "full": {"rounds": 3, "warmup_rounds": 1, "lat_s": 1.5, "rps_s": 1.5, "warm_s": 0.3,
             "bulk": 32 << 20, "conns": 8, "lat_size": 64, "rps_size": 1024},
    # The warm-up round (discarded) runs everything, smaller: 1/4 of the times and the bulk.
    "smoke": {"rounds": 1, "warmup_rounds": 0, "lat_s": 0.5, "rps_s": 0.5, "warm_s": 0.1,
              "bulk": 1 << 20, "conns": 8, "lat_size": 64, "rps_size": 1024},
}

METRICS = [  # key, column title, format, higher is better
    ("lat_p50_us", "RTT p50 µs", "{:,.0f}", False),
    ("lat_p99_us", "RTT p99 µs", "{:,.0f}", False),
    ("rps", "8×1 KiB req/s", "{:,.0f}", True),
    ("bulk_mib_s", "bulk MiB/s", "{:,.1f}", True),
    ("rps_server_cpu_us", "server CPU µs/req", "{:,.0f}", False),
]

CAVEAT = ("Measured in a QEMU guest under TCG software emulation (one vCPU, roughly 20 times "
          "slower than the host), with soft-RoCE (rdma_rxe), which is itself a kernel software "
          "device: RDMA here is the RoCE protocol run by the guest kernel on the same emulated "
          "CPU, so it cannot show kernel bypass or NIC offload, and the absolute figures say "
          "nothing about real hardware. Server and client share the one vCPU. Only the ratios "
          "between datapaths measured in the same run mean anything.")


# =============================================================================================
# In the guest: the driver and the client

def _ticks(pid):
    """utime+stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_idle():
    """(idle, total) jiffies of the machine (one vCPU here)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v[:8])


def _self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Window:
    """CPU use of server, client and the idle share over one measured phase."""

    def __init__(self, server_pid):
        self.pid = server_pid
        self.t0, self.s0, self.c0 = time.monotonic(), _ticks(server_pid), _self_cpu()
        self.i0 = _cpu_idle()

    def end(self, requests):
        wall = time.monotonic() - self.t0
        server, client = _ticks(self.pid) - self.s0, _self_cpu() - self.c0
        idle, total = (b - a for a, b in zip(self.i0, _cpu_idle()))
        return {"wall_s": round(wall, 4), "server_cpu_s": round(server, 3),
                "client_cpu_s": round(client, 3),
                "idle_pct": round(100 * idle / total, 1) if total else None,
                "server_cpu_us": round(1e6 * server / requests, 1) if requests else None}


class EchoMismatch(Exception):
    pass


class Stalled(Exception):
    """The echo stopped: what the client, its loop, the server process and rxe0 looked like."""

    def __init__(self, message, diag):
        super().__init__(message)
        self.diag = diag


STALL_S = 15        # no progress for this long (guest time): the echo stalled


async def until_done(fut, progress, diag, what):
    """fut's result, or Stalled once progress() has not changed for STALL_S seconds."""
    last, since = progress(), time.monotonic()
    while True:
        done, _ = await asyncio.wait([fut], timeout=1)
        if done:
            return fut.result()
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            fut.cancel()
            raise Stalled(f"{what}: no progress for {STALL_S} s", diag())


def _loop_stats():
    try:
        st = asyncio.get_running_loop().stats()
        return st.get("rdma", {k: st[k] for k in ("mode", "iterations", "sleeps") if k in st})
    except Exception as exc:  # noqa: BLE001 -- diagnostics only
        return repr(exc)


def _proc_state(pid):
    out = {}
    for name in ("wchan", "stat"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                out[name] = f.read().strip()
        except OSError as exc:
            out[name] = repr(exc)
    return out


def _rxe_counters():
    """rxe0's hardware counters (retries, RNR, errors), for a stall."""
    d = "/sys/class/infiniband/rxe0/ports/1/hw_counters"
    out = {}
    try:
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name)) as f:
                value = int(f.read())
            if value:
                out[name] = value
    except OSError as exc:
        out["error"] = repr(exc)
    return out


class PingPong(asyncio.Protocol):
    """One connection, closed loop: send `msg`, wait for all of it back, send again.  Counts
    the round trips while state["counting"]; keeps each one's duration if `rtts` is a list."""

    def __init__(self, msg, state, rtts=None):
        self.msg, self.state, self.rtts = msg, state, rtts
        self.got = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.connected = asyncio.get_running_loop().create_future()
        self.count = self.replies = 0

    def connection_made(self, transport):
        self.transport = transport
        self.connected.set_result(None)

    def start(self):
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.msg)

    def data_received(self, data):
        self.got += data
        if len(self.got) < len(self.msg):
            return
        now = time.perf_counter_ns()
        if self.got != self.msg:
            self._fail(EchoMismatch(f"wrong echo ({len(self.got)} bytes)"))
            return
        self.got.clear()
        self.replies += 1
        if self.state["counting"]:
            self.count += 1
            if self.rtts is not None:
                self.rtts.append(now - self.t0)
        if self.state["stop"]:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.msg)

    def _fail(self, exc):
        if not self.done.done():
            self.done.set_exception(exc)
        self.transport.abort()

    def connection_lost(self, exc):
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("lost before made"))
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed by the server"))


class Bulk(asyncio.Protocol):
    """Streams `total` bytes of a fixed pattern (flow-controlled) and checks them on return."""
    PERIOD = (1 << 20) + 7           # a period that no buffer size divides

    def __init__(self, total):
        block = os.urandom(self.PERIOD)
        self.pattern = memoryview(block + block)
        self.total, self.sent, self.received = total, 0, 0
        self.paused = False
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.t0 = time.perf_counter()
        self._push()

    t_last_rx = t_last_tx = None

    def _push(self):
        if not self.paused and self.sent < self.total:
            self.t_last_tx = time.perf_counter()
        while not self.paused and self.sent < self.total:
            off = self.sent % self.PERIOD
            n = min(65536, self.total - self.sent)
            self.transport.write(self.pattern[off:off + n])
            self.sent += n

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self._push()

    def data_received(self, data):
        self.t_last_rx = time.perf_counter()
        view, pos = memoryview(data), 0
        while pos < len(view):
            off = self.received % self.PERIOD
            n = min(len(view) - pos, self.PERIOD)
            if view[pos:pos + n] != self.pattern[off:off + n]:
                return self._fail(EchoMismatch(f"wrong byte near offset {self.received}"))
            pos += n
            self.received += n
        if self.received > self.total:
            return self._fail(EchoMismatch(f"{self.received} bytes back, sent {self.total}"))
        if self.received == self.total and not self.done.done():
            self.done.set_result(time.perf_counter() - self.t0)

    def _fail(self, exc):
        if not self.done.done():
            self.done.set_exception(exc)
        self.transport.abort()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError(
                f"closed by the server after {self.received} of {self.total} bytes"))


def percentile(sorted_values, q):
    """Nearest-rank percentile of a sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


async def closed_loop(port, size, conns, warm_s, seconds, keep_rtts, server_pid):
    """conns PingPong connections for warm_s (not counted) + seconds; returns (count, rtts,
    wall, the CPU use over the counted seconds, a transport)."""
    loop = asyncio.get_running_loop()
    state = {"counting": False, "stop": False}
    msg = os.urandom(size)
    rtts = [] if keep_rtts else None
    protos = []
    for _ in range(conns):
        _, p = await loop.create_connection(lambda: PingPong(msg, state, rtts), ADDR, port)
        await p.connected
        protos.append(p)
    for p in protos:
        p.start()
    await asyncio.sleep(warm_s)
    _check_alive(protos)
    window = Window(server_pid)
    state["counting"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["counting"] = False
    wall = time.perf_counter() - t0
    cpu = window.end(sum(p.count for p in protos))
    state["stop"] = True
    await until_done(asyncio.gather(*(p.done for p in protos)),
                     lambda: sum(p.replies for p in protos),
                     lambda: {"waiting_bytes": [len(p.got) for p in protos if not p.done.done()],
                              "replies": [p.replies for p in protos],
                              "client_loop": _loop_stats(), "server": _proc_state(server_pid),
                              "rxe": _rxe_counters()},
                     f"{conns} x {size} B ping-pong")
    for p in protos:
        p.transport.close()
    _check_alive(protos)
    return sum(p.count for p in protos), rtts, wall, cpu, protos[0].transport


def _check_alive(protos):
    for p in protos:
        if p.done.done() and p.done.exception():
            raise p.done.exception()


async def measure_client(out, variant, port, server_pid, prof):
    """Fills `out` phase by phase: what completed stays when a later phase fails."""
    # Which datapath carries the connection: RdmaSocket over RDMA, a kernel socket otherwise.
    count, rtts, wall, cpu, tr = await closed_loop(port, prof["lat_size"], 1, prof["warm_s"],
                                                   prof["lat_s"], True, server_pid)
    sock = tr.get_extra_info("socket")
    out["socket_type"] = type(getattr(sock, "_sock", sock)).__name__
    out["backend"] = getattr(asyncio.get_running_loop(), "backend", None)
    if out["socket_type"] != VARIANTS[variant]["socket"]:
        raise RuntimeError(f"the client's connection is a {out['socket_type']}, "
                           f"not a {VARIANTS[variant]['socket']}")
    out["datapath_ok"] = True
    rtts.sort()
    out["lat"] = {"round_trips": count, "p50_us": percentile(rtts, 50) / 1e3,
                  "p90_us": percentile(rtts, 90) / 1e3, "p99_us": percentile(rtts, 99) / 1e3,
                  "max_us": rtts[-1] / 1e3, "min_us": rtts[0] / 1e3,
                  "mean_us": statistics.fmean(rtts) / 1e3,
                  # every round trip, in µs (the raw sample)
                  "rtts_us": [round(x / 1e3, 1) for x in rtts], **cpu}
    count, _, wall, cpu, _ = await closed_loop(port, prof["rps_size"], prof["conns"],
                                               prof["warm_s"], prof["rps_s"], False, server_pid)
    out["rps"] = {"requests": count, "rps": count / wall, **cpu}
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    w = Window(server_pid)
    tr, p = await loop.create_connection(lambda: Bulk(prof["bulk"]), ADDR, port)
    elapsed = await until_done(
        p.done, lambda: (p.sent, p.received),
        lambda: {"sent": p.sent, "received": p.received, "paused": p.paused,
                 "write_buffer": tr.get_write_buffer_size(),
                 "t_last_rx": p.t_last_rx and round(p.t_last_rx - p.t0, 2),
                 "t_last_tx": p.t_last_tx and round(p.t_last_tx - p.t0, 2),
                 "client_loop": _loop_stats(), "server": _proc_state(server_pid),
                 "rxe": _rxe_counters()},
        f"bulk of {prof['bulk']} bytes")
    tr.close()
    out["bulk"] = {"bytes": prof["bulk"], "seconds": elapsed,
                   "mib_s": prof["bulk"] / elapsed / (1 << 20), **w.end(prof["bulk"] >> 10)}
    out["bulk"]["server_cpu_us_per_kib"] = out["bulk"].pop("server_cpu_us")


def start_server(variant):
    argv = [sys.executable, "-m", "kbloop", *VARIANTS[variant]["server"],
            "examples/echo_protocol.py", "--host", "0.0.0.0", "--port", "0"]
    err = open(f"/tmp/server-{variant}.err", "w+")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()        # the example flushes it once listening
    if not line.startswith("listening on"):
        proc.kill()
        rc = proc.wait()
        err.seek(0)
        raise RuntimeError(f"{variant} server did not start: {line!r}, exit status {rc}\n"
                           f"{err.read()[-2000:]}")
    err.seek(0)
    used = err.read()
    if "event loop: kbloop" not in used:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{variant} server runs on the wrong loop: {used[-500:]!r}")
    return proc, int(line.rsplit(":", 1)[1]), err


def stop_server(proc, err):
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = f"killed after 30 s without exiting on SIGTERM (rc {proc.wait()})"
    err.seek(0)
    tail = err.read()[-2000:]
    err.close()
    return rc, tail


def guest_main(params):
    import kbloop
    prof = params["profile"]
    variants = params["variants"]
    print(f"PROGRESS guest up: kbloop {getattr(kbloop, '__version__', '?')}, "
          f"{os.cpu_count()} vCPU", flush=True)
    plan = [(r, r < prof["warmup_rounds"])
            for r in range(prof["warmup_rounds"] + prof["rounds"])]
    small = dict(prof, lat_s=prof["lat_s"] / 4, rps_s=prof["rps_s"] / 4, bulk=prof["bulk"] // 4)
    for rnd, warmup in plan:
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for variant in order:
            t0 = time.monotonic()
            sample = {"round": rnd, "warmup": warmup, "variant": variant, "ok": False}
            proc = err = None
            try:
                proc, port, err = start_server(variant)
                sample["server_start_s"] = round(time.monotonic() - t0, 2)
                factory = lambda: kbloop.new_event_loop(**VARIANTS[variant]["client"])  # noqa
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(measure_client(sample, variant, port, proc.pid,
                                              small if warmup else prof))
                sample["ok"] = True
            except BaseException as exc:  # noqa: BLE001 -- recorded, the run goes on
                sample["failure"] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, Stalled):
                    sample["diag"] = exc.diag
                if isinstance(exc, KeyboardInterrupt):
                    raise
            finally:
                if proc is not None:
                    rc, tail = stop_server(proc, err)
                    sample["server_exit"] = rc
                    if rc != 0:
                        sample["ok"] = False
                        sample.setdefault("failure", f"server exit status {rc}")
                    if not sample["ok"]:
                        sample["server_stderr"] = tail
            sample["total_s"] = round(time.monotonic() - t0, 1)
            print("SAMPLE " + json.dumps(sample), flush=True)
            line = (f"round {rnd + 1}/{len(plan)}{' (warm-up)' if warmup else ''} "
                    f"{variant:<10}")
            if sample["ok"]:
                line += (f" p50 {sample['lat']['p50_us']:7.0f} µs  p99 "
                         f"{sample['lat']['p99_us']:7.0f} µs  {sample['rps']['rps']:8.0f} req/s"
                         f"  {sample['bulk']['mib_s']:6.1f} MiB/s  ({sample['total_s']} s)")
            else:
                line += f" FAILED: {sample['failure']}"
            print("PROGRESS " + line, flush=True)
    print("DONE", flush=True)


# =============================================================================================
# On the host: boot the guest, summarize, report

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def flatten(sample):
    """The metrics of one sample (METRICS keys and a few more): those of every phase that
    completed, also when a later one failed (e.g. a stalled bulk run keeps its RTT and req/s),
    provided the connection ran on the intended datapath and the server exited 0."""
    if not sample.get("datapath_ok") or sample.get("server_exit") != 0:
        return {}
    out = {}
    if "lat" in sample:
        out.update(lat_p50_us=sample["lat"]["p50_us"], lat_p99_us=sample["lat"]["p99_us"],
                   lat_idle_pct=sample["lat"]["idle_pct"],
                   round_trips=sample["lat"]["round_trips"])
    if "rps" in sample:
        out.update(rps=sample["rps"]["rps"], rps_server_cpu_us=sample["rps"]["server_cpu_us"],
                   rps_idle_pct=sample["rps"]["idle_pct"])
    if "bulk" in sample:
        out.update(bulk_mib_s=sample["bulk"]["mib_s"])
    return out


def summarize(samples, variants):
    rows = []
    for v in variants:
        mine = [s for s in samples if s["variant"] == v and not s["warmup"]]
        got = [flatten(s) for s in mine]
        row = {"variant": v, "runs": len(mine), "failed": sum(not s["ok"] for s in mine)}
        for key in ("lat_p50_us", "lat_p99_us", "rps", "bulk_mib_s", "rps_server_cpu_us",
                    "rps_idle_pct", "lat_idle_pct", "round_trips"):
            vals = [g[key] for g in got if g.get(key) is not None]
            row[key] = median(vals)
            row[key + "_spread_pct"] = (round(100 * (max(vals) - min(vals)) / row[key], 1)
                                        if vals and row[key] else None)
        rows.append(row)
    base = next((r for r in rows if r["variant"] == BASE), None)
    for r in rows:
        r["ratio"] = {k: (r[k] / base[k] if base and r[k] is not None and base.get(k) else None)
                      for k, *_ in METRICS}
    return rows


def table(rows):
    head = ["datapath"] + [title for _, title, _, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(METRICS) + "|"]
    for r in rows:
        cells = [r["variant"]]
        for key, _, fmt, _ in METRICS:
            if r[key] is None:
                cells.append("n/a")
                continue
            cell = fmt.format(r[key])
            if r["ratio"][key] is not None:
                cell += f" ({r['ratio'][key]:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_text(rows):
    lines = []
    for r in rows:
        if r["variant"] == BASE:
            continue
        parts = []
        for key, title, _, higher in METRICS:
            x = r["ratio"][key]
            if x is not None:
                better = (x > 1) == higher if abs(x - 1) > 0.005 else None
                parts.append(f"{title} {x:.2f}x" + ("" if better is None else
                                                    " (better)" if better else " (worse)"))
        lines.append(f"* {r['variant']} / {BASE}: " + ", ".join(parts))
    return "\n".join(lines)


def spread_table(rows):
    lines = ["| datapath | runs | RTT p50 spread | RTT p99 spread | req/s spread | bulk spread "
             "| idle share, latency run | idle share, 8-conn run | round trips (latency run) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda x: "n/a" if x is None else f"{x:.0f}%"        # noqa: E731
    for r in rows:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['variant']} | {r['runs']}"
                     f"{failed} | {pct(r['lat_p50_us_spread_pct'])} | "
                     f"{pct(r['lat_p99_us_spread_pct'])} | {pct(r['rps_spread_pct'])} | "
                     f"{pct(r['bulk_mib_s_spread_pct'])} | {pct(r['lat_idle_pct'])} | "
                     f"{pct(r['rps_idle_pct'])} | "
                     f"{'n/a' if r['round_trips'] is None else format(r['round_trips'], ',.0f')} |")
    return "\n".join(lines)


def markdown(rows, meta, samples):
    p = meta["profile"]
    kib = p["rps_size"] // 1024
    lines = [
        "# RDMA vs io_uring datapath, echo in the soft-RoCE guest",
        "",
        f"Date: {meta['date']}  ",
        f"Command: `{meta['command']}`  ",
        f"Host: {meta['host']['nproc']} CPUs, {meta['host']['cpu_model']}, Linux "
        f"{meta['host']['kernel']}, Python {meta['host']['python']}; guest: QEMU TCG, 1 vCPU, "
        f"Debian's 6.1 kernel, rxe0 on dummy0 ({ADDR}).  ",
        f"Duration: {meta['duration_s']:.0f} s in all (guest {meta['guest_s']:.0f} s). "
        f"Other processes on the host used {meta['host']['other_cpu_share']:.2f} of a CPU on "
        "average meanwhile (QEMU's emulation runs on one host CPU).",
        "",
        f"> **Caveat.** {CAVEAT}",
        "",
        "## Results",
        "",
        table(rows),
        "",
        f"Medians over {p['rounds']} measured round(s); in brackets the ratio to `{BASE}` from "
        "the same run (below 1 is better for latency and CPU, above 1 for req/s and MiB/s).",
        "",
        ratio_text(rows),
        "",
    ]
    if meta["warnings"]:
        lines += [f"**Warning:** {w}" for w in meta["warnings"]] + [""]
    lines += [
        "## Method",
        "",
        f"One guest (`tests/rdma_vm.py`), {p['warmup_rounds']} warm-up round (discarded) then "
        f"{p['rounds']} measured round(s); in each round every datapath runs once, the order "
        "rotated each round. Each run starts a fresh server, the unmodified "
        "`examples/echo_protocol.py` under `python -m kbloop --backend ... --host 0.0.0.0 "
        "--port 0`, and the benchmark's own kbloop client (a separate process: the driver, "
        "`bench/rdma_guest.py --in-guest`) connects to "
        f"{ADDR}; the server must exit 0 on SIGTERM. Every echoed byte is checked.",
        "",
        "| datapath | server | client |",
        "|---|---|---|",
        *(f"| {v} | `python -m kbloop {' '.join(VARIANTS[v]['server'])} examples/echo_protocol.py` "
          f"| `kbloop.new_event_loop({', '.join(f'{k}={x!r}' for k, x in VARIANTS[v]['client'].items())})` |"
          for v in meta["variants"]),
        "",
        f"* **RTT**: one connection, {p['lat_size']}-byte ping-pong (send, wait for the whole "
        f"echo, send again), {p['warm_s']:g} s warm-up then every round trip for "
        f"{p['lat_s']:g} s; p50 and p99 of those.",
        f"* **req/s**: {p['conns']} connections, {kib} KiB request/response, closed loop, "
        f"{p['warm_s']:g} s warm-up then {p['rps_s']:g} s counted. **server CPU µs/req**: the "
        "server's user+system CPU over that window / requests.",
        f"* **bulk**: one connection writes {p['bulk'] >> 20} MiB (64 KiB writes, flow-controlled) "
        "through the echo and reads it all back; MiB/s = payload / time from the first write to "
        "the last byte back.",
        "* **rdma-busy**: only the server busy-polls; its client sleeps. There is one vCPU: two "
        "processes that both spin would each wait out the other's scheduler time slice, which "
        "measures the scheduler, not the datapath. A spinning server still costs the client: "
        "it runs only by preempting the server when its completion wakes it.",
        "* Server and client share the vCPU, so every figure is the pair's cost, and the client "
        "(Python) is a large part of it: the ratios understate the difference between the "
        "datapaths themselves. The idle share (below) is the vCPU's idle time over the run.",
        "",
        "### Spread and CPU",
        "",
        "spread = (max-min)/median over the measured rounds.",
        "",
        spread_table(rows),
        "",
        "### Every run",
        "",
        "| round | datapath | RTT p50 µs | RTT p99 µs | req/s | bulk MiB/s | server start s | "
        "note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in samples:
        f = flatten(s)
        note = ("warm-up" if s["warmup"] else "") + ("" if s["ok"] else
                                                     f" FAILED: {s.get('failure', '')[:200]}")
        lines.append(
            f"| {s['round'] + 1} | {s['variant']} | "
            + " | ".join("" if f.get(k) is None else f"{f[k]:,.1f}"
                         for k in ("lat_p50_us", "lat_p99_us", "rps", "bulk_mib_s"))
            + f" | {s.get('server_start_s', '')} | {note.strip()} |")
    failures = [x for x in samples if not x["ok"]]
    if failures:
        lines += ["", "### Failures", "",
                  "A run fails on a wrong echo, a connection error, a server that does not exit 0, "
                  f"or an echo that makes no progress for {STALL_S} s (stalled); the phases it "
                  "completed before still count. What the client saw at the failure (`diag`: its "
                  "transfer, its loop's RDMA counters, the server's /proc state, rxe0's hardware "
                  "counters):", ""]
        for x in failures:
            lines += [f"* round {x['round'] + 1}{' (warm-up)' if x['warmup'] else ''}, "
                      f"{x['variant']}: {x.get('failure')}"]
            if x.get("diag"):
                lines += ["", "  ```json", "  " + json.dumps(x["diag"]), "  ```", ""]
    lines += ["", f"Raw samples (every round trip of the latency runs too): "
              f"`{meta['json']}`.", ""]
    return "\n".join(lines)


OTHER_CPU_WARN = 0.25      # of one host CPU, used by anything but QEMU and this process


def _host_busy():
    """Non-idle CPU seconds of the whole host so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu():
    """CPU seconds of this process and its waited-for children (QEMU)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def host_info():
    import platform
    from .runner import cpu_model
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_before": os.getloadavg()}


class _Progress:
    """Receives the guest's output as it comes: shows PROGRESS lines, keeps everything."""

    def __init__(self, quiet):
        self.buf, self.quiet = "", quiet

    def write(self, text):
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.startswith("PROGRESS ") and not self.quiet:
                print("  " + line[9:], file=sys.stderr, flush=True)
            elif not line.startswith(("SAMPLE ", "PROGRESS ", "DONE")):
                print("  guest: " + line, file=sys.stderr, flush=True)

    def flush(self):
        pass


def host_main(args):
    sys.path.insert(0, str(REPO / "tests"))
    import rdma_vm
    ok, why = rdma_vm.available()
    if not ok:
        sys.exit(f"bench.rdma_guest: cannot run the RDMA guest here: {why}")
    mode = "smoke" if args.smoke else "full"
    prof = dict(PROFILES[mode])
    for key in ("rounds", "warmup_rounds"):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)
    if args.bulk_mib is not None:
        prof["bulk"] = int(args.bulk_mib * (1 << 20))
    variants = args.variants.split(",") if args.variants else DEFAULT_VARIANTS
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    params = {"profile": prof, "variants": variants}
    cmd = (f"{shlex.quote(sys.executable)} -m bench.rdma_guest --in-guest "
           f"{shlex.quote(json.dumps(params))}")
    started = time.monotonic()
    host = host_info()
    print(f"booting the RDMA guest ({mode}: {prof['warmup_rounds']} warm-up + {prof['rounds']} "
          f"round(s) x {', '.join(variants)})", file=sys.stderr, flush=True)
    timeout = 90 + 75 * (prof["rounds"] + prof["warmup_rounds"]) * len(variants)
    progress = _Progress(args.quiet)
    busy0, mine0, wall0 = _host_busy(), _own_cpu(), time.monotonic()
    try:
        result = rdma_vm.run_guest(cmd, timeout=timeout, stream=progress)
    except rdma_vm.GuestError as exc:
        sys.exit(f"bench.rdma_guest: the guest failed: {exc}")
    duration = time.monotonic() - started
    # QEMU (a finished child now) and this process against the whole host's CPU time.
    guest_wall = time.monotonic() - wall0
    mine = _own_cpu() - mine0
    other = max(0.0, _host_busy() - busy0 - mine)
    host["qemu_and_self_cpu_s"] = round(mine, 1)
    host["other_cpu_s"] = round(other, 1)
    host["other_cpu_share"] = round(other / guest_wall, 2)
    samples = [json.loads(line[7:]) for line in result.output.splitlines()
               if line.startswith("SAMPLE ")]
    warnings = []
    if result.status != 0 or "DONE" not in result.output:
        warnings.append(f"the guest's driver exited with status {result.status}"
                        + ("" if "DONE" in result.output else " before finishing"))
        tail = "\n".join(l for l in result.output.splitlines()
                         if not l.startswith("SAMPLE "))[-3000:]
        print(f"guest output (without samples):\n{tail}", file=sys.stderr)
    failed = [f"round {s['round'] + 1} {s['variant']}: {s.get('failure')}"
              for s in samples if not s["ok"]]
    if failed:
        warnings.append("failed runs (the phases they completed before failing are in the "
                        "medians, the failed phase is not): " + "; ".join(failed))
    host["loadavg_after"] = os.getloadavg()
    if host["other_cpu_share"] > OTHER_CPU_WARN:
        warnings.append(
            f"other processes on the host used {host['other_cpu_share']:.2f} of a CPU on average "
            f"while the guest ran (QEMU needs one of the host's {host['nproc']} CPUs, and "
            "competes for it): absolute figures are slower and noisier; the interleaved rounds "
            "spread that over every datapath, but the ratios are less sure (see the spread)")

    rows = summarize(samples, variants)
    now = datetime.datetime.now()
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"rdma-{'smoke-' if args.smoke else ''}{now:%Y%m%d-%H%M%S}"
    json_path = out_dir / f"{stem}.json"
    meta = {"mode": mode, "date": now.isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.rdma_guest", *map(shlex.quote, sys.argv[1:])]),
            "profile": prof, "variants": variants, "base": BASE, "host": host,
            "duration_s": duration, "guest_s": result.total_s, "guest_boot_s": result.boot_s,
            "guest_status": result.status, "warnings": warnings, "caveat": CAVEAT,
            "json": os.path.relpath(json_path, REPO) if json_path.is_relative_to(REPO)
            else str(json_path)}
    json_path.write_text(json.dumps({"meta": meta, "summary": rows, "samples": samples},
                                    indent=1))
    md = markdown(rows, meta, samples)
    written = [json_path]
    md_path = out_dir / ("RDMA.md" if mode == "full" and not args.custom
                         else f"{stem}.md")
    md_path.write_text(md)
    written.append(md_path)

    print(f"\nRDMA vs io_uring datapath, echo in the guest ({mode}; {prof['rounds']} round(s), "
          f"medians; ratio to {BASE} in brackets), {duration:.0f} s:\n")
    print(table(rows))
    print()
    print(ratio_text(rows))
    print("\nCaveat: " + CAVEAT)
    for w in warnings:
        print(f"WARNING: {w}")
    print("written: " + ", ".join(os.path.relpath(p, REPO) if p.is_relative_to(REPO) else str(p)
                                  for p in written))
    complete = all(r[k] is not None for r in rows for k, *_ in METRICS)
    return 0 if complete and not failed and result.status == 0 else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.rdma_guest",
                                description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, 1 round, no warm-up round: checks the machinery (~1 min)")
    p.add_argument("--rounds", type=int, help="measured rounds (default 3; smoke 1)")
    p.add_argument("--warmup-rounds", type=int, help="discarded rounds first (default 1)")
    p.add_argument("--bulk-mib", type=float, help="bytes streamed in the bulk run, MiB")
    p.add_argument("--variants", help="comma-separated, from: " + ", ".join(VARIANTS)
                   + f" (default: {','.join(DEFAULT_VARIANTS)}; ratios are to {BASE})")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--in-guest", metavar="PARAMS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_guest:
        guest_main(json.loads(args.in_guest))
        return 0
    # RDMA.md is the report of a default full run only.
    args.custom = any(x is not None for x in (args.rounds, args.warmup_rounds,
                                                      args.bulk_mib, args.variants))
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
