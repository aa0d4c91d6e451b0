"""The scenarios of each mode (--smoke, --quick, --full, --modes, --dpdk, --tls; --core has
no servers: bench/core.py)."""

from dataclasses import dataclass

from .runner import DPDK_LOOPS, LOOPS, MODE_LOOPS, TLS_LOOPS

SIZES = {64: "64B", 1024: "1KiB", 16384: "16KiB", 102400: "100KiB"}
OPEN_LOAD_FRACTION = 0.7  # open-loop rate: this fraction of the slowest loop's closed-loop rps


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str            # "echo" (bench/echo_load.c), "http" (wrk) or "redis" (redis-benchmark)
    server: str          # key of runner.SERVERS
    conns: int
    msg_size: int = 0    # echo message size, bytes
    pipeline: int = 1    # redis-benchmark -P
    requests: int = 0    # redis-benchmark -n (per command)
    open_of: str = ""    # open loop: the closed-loop scenario whose rps sets the offered rate
    tls: bool = False    # the server serves TLS (--tls CERT KEY); echo_load_tls, wrk https://

    @property
    def group(self):
        if self.open_of:
            return "open"
        if self.tls:
            return "tls" if self.kind == "echo" else "https"
        return self.kind


def echo(server, size, conns):
    return Scenario(f"{server} {SIZES[size]} c{conns}", "echo", server, conns, size)


def open_loop(closed):
    """Same server, size and connections as `closed`, at a fixed offered rate."""
    return Scenario(f"open {closed.name}", "echo", closed.server, closed.conns, closed.msg_size,
                    open_of=closed.name)


def http(server, conns):
    return Scenario(f"http {server} c{conns}", "http", server, conns)


def tls_echo(server, size, conns):
    return Scenario(f"tls {server} {SIZES[size]} c{conns}", "echo", server, conns, size, tls=True)


def https(server, conns):
    return Scenario(f"https {server} c{conns}", "http", server, conns, tls=True)


def redis(pipeline, conns, requests):
    return Scenario(f"redis P{pipeline} c{conns}", "redis", "redis", conns,
                    pipeline=pipeline, requests=requests)


def full():
    closed = [echo(server, size, conns) for server in ("proto", "buffered", "streams")
              for size in SIZES for conns in (1, 8, 32, 128)]
    by_name = {s.name: s for s in closed}
    return closed + [
        open_loop(by_name["proto 64B c32"]),
        open_loop(by_name["proto 1KiB c32"]),
        http("httptools", 8), http("httptools", 64),
        http("aiohttp", 8), http("aiohttp", 64),
        redis(1, 32, 20000), redis(16, 32, 100000),
    ]


def quick():
    p64c32, p1kc32 = echo("proto", 64, 32), echo("proto", 1024, 32)
    return [
        echo("proto", 64, 1), p64c32, echo("proto", 1024, 1), p1kc32,
        echo("proto", 102400, 8), echo("streams", 1024, 32),
        open_loop(p64c32), open_loop(p1kc32),
        http("httptools", 64), http("aiohttp", 64),
        redis(16, 32, 100000),
    ]


def smoke():
    """Every kind of scenario once, tiny: checks the machinery, not performance."""
    p1k = echo("proto", 1024, 8)
    return [
        p1k, echo("buffered", 1024, 8), echo("streams", 1024, 8), echo("proto", 102400, 2),
        open_loop(p1k),
        http("httptools", 8), http("aiohttp", 8),
        redis(1, 8, 200), redis(16, 8, 2000),
        tls_echo("proto", 1024, 8), https("httptools", 8),
    ]


def modes():
    """kbloop's reactor modes against uvloop (issue 5): round trip at c1, throughput
    and CPU per request at c32, and CPU per request at the same offered load."""
    p64c32 = echo("proto", 64, 32)
    return [echo("proto", 64, 1), echo("proto", 1024, 1), p64c32, echo("proto", 1024, 32),
            open_loop(p64c32)]


def tls():
    """TLS (issue 15): echo over TLS at 1 and 32 connections, small and large messages, and
    HTTPS; kbloop's own TLS layer and asyncio's sslproto on kbloop."""
    return [tls_echo("proto", size, conns) for size in (64, 16384) for conns in (1, 32)] + [
        https("httptools", 1), https("httptools", 32)]


def dpdk():
    """The DPDK datapath (issue 6): round trip at c1, throughput and CPU per request at c32
    and with bigger messages, and HTTP (veth only: no wrk over memif)."""
    return [echo("proto", 64, 1), echo("proto", 1024, 1), echo("proto", 1024, 32),
            echo("proto", 16384, 8), echo("streams", 1024, 32), http("httptools", 64)]


BASE_LOOPS = ["asyncio", "uvloop", "kbloop"]
# --core (bench/core.py): the loop core without I/O; busy-poll too, as it changes how the loop
# waits (the call_soon_threadsafe wake-up).
CORE_LOOPS = ["asyncio", "uvloop", "kbloop", "kbloop-busy"]

# mode: scenarios, default loops, measured rounds, seconds per run, per-run warm-up
# seconds, warm-up rounds, repeats of a run disturbed by other processes.  --smoke also runs the reactor-mode loops, so the smoke
# test covers their servers.
MODES = {
    "smoke": dict(scenarios=smoke, loops=list(LOOPS), rounds=1, seconds=0.3, warmup_s=0,
                  warmup_rounds=0, noisy_retries=0),
    "quick": dict(scenarios=quick, loops=BASE_LOOPS, rounds=3, seconds=1.0, warmup_s=0.5,
                  warmup_rounds=1, noisy_retries=0),
    "full": dict(scenarios=full, loops=BASE_LOOPS, rounds=3, seconds=1.5, warmup_s=0.5,
                 warmup_rounds=1, noisy_retries=0),
    # More rounds than quick/full: c1 latency percentiles move more between runs.
    "modes": dict(scenarios=modes, loops=MODE_LOOPS, rounds=7, seconds=2.0, warmup_s=0.5,
                  warmup_rounds=1, noisy_retries=3),
    "dpdk": dict(scenarios=dpdk, loops=DPDK_LOOPS, rounds=3, seconds=2.0, warmup_s=0.5,
                 warmup_rounds=1, noisy_retries=2),
    "tls": dict(scenarios=tls, loops=TLS_LOOPS, rounds=5, seconds=1.5, warmup_s=0.5,
                warmup_rounds=1, noisy_retries=0),
    # No servers: bench/core.py's programs, with their own operation counts (no --seconds).
    "core": dict(scenarios=list, loops=CORE_LOOPS, rounds=5, seconds=0, warmup_s=0,
                 warmup_rounds=1, noisy_retries=0),
}
