"""Quick comparison of asyncio, uvloop and kbloop (python -m bench.demo).

Runs the unmodified example servers on each loop, pinned to CPU 0, against a
compiled load generator pinned to CPU 1, and prints a table of medians over
interleaved rounds.  Method: see bench/README.md.
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "bench" / ".build"
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
WARMUP_S = 1  # per-run load before measuring (integer: wrk takes whole seconds)
SERVER_CPU, LOAD_CPU = 0, 1

# How each loop starts a server script, unmodified.  asyncio: plain python.
# uvloop has no `python -m uvloop`, so a tiny shim installs its policy and
# runs the script as __main__ -- the same thing `python -m kbloop` does.
UVLOOP_SHIM = (
    "import asyncio, os, runpy, sys, uvloop;"
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy());"
    "sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(sys.argv[0]);"
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
LOOPS = {
    "asyncio": {"argv": [], "module": "asyncio.", "probe": "import asyncio"},
    "uvloop": {"argv": ["-c", UVLOOP_SHIM], "module": "uvloop.", "probe": "import uvloop"},
    "kbloop": {
        "argv": ["-m", "kbloop"],
        "module": "kbloop",
        # new_event_loop() falls back to asyncio when io_uring is unusable.
        "probe": "import kbloop; l = kbloop.new_event_loop(); l.close();"
                 "assert isinstance(l, kbloop.Loop), 'io_uring unusable: asyncio fallback'",
    },
}


@dataclass
class Scenario:
    name: str
    script: str
    tool: str  # "echo" (bench/echo_load.c) or "wrk"
    conns: int
    msg_size: int = 1024


SCENARIOS = [
    Scenario("echo 1KiB c1", "examples/echo_protocol.py", "echo", 1),
    Scenario("echo 1KiB c32", "examples/echo_protocol.py", "echo", 32),
    Scenario("http c32 (wrk)", "examples/http_server.py", "wrk", 32),
]


def pin(cpu):
    """preexec_fn that pins the child to one CPU (no-op without 2 CPUs)."""
    if len(os.sched_getaffinity(0)) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def build_echo_load():
    """Compile the load generator if it is missing or older than its source."""
    src, exe = REPO / "bench" / "echo_load.c", BUILD / "echo_load"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


class Server:
    """One server process; fresh per measurement so no state leaks between runs."""

    def __init__(self, loop, script):
        self.stderr = tempfile.TemporaryFile()
        argv = [sys.executable, *LOOPS[loop]["argv"], script, "--host", HOST, "--port", "0"]
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=self.stderr,
            preexec_fn=pin(SERVER_CPU),
        )
        line = self._readline(timeout=20)
        m = re.match(r"listening on (\S+):(\d+)$", line.strip())
        if not m:
            self.stop()
            raise RuntimeError(f"{loop} server did not start: {line!r}\n{self.error_output()}")
        self.port = int(m.group(2))
        # Guard against silently benchmarking the wrong loop (e.g. a policy
        # that did not take effect): the examples report their loop class.
        used = re.search(r"event loop: (\S+)", self.error_output())
        if not used or not used.group(1).startswith(LOOPS[loop]["module"]):
            self.stop()
            raise RuntimeError(f"{loop} server runs on {used and used.group(1)}")

    def _readline(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        return self.proc.stdout.readline().decode() if ready else ""

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
        return rc


def run_load(sc, port, seconds, echo_load):
    """Run the load generator once; returns requests, rps, p50/p99 us, errors."""
    if sc.tool == "echo":
        argv = [str(echo_load), "-H", HOST, "-p", str(port), "-c", str(sc.conns),
                "-s", str(sc.msg_size), "-d", str(seconds), "-w", "0"]
    else:
        argv = ["wrk", "-t1", f"-c{sc.conns}", f"-d{math.ceil(seconds)}s", "--latency",
                f"http://{HOST}:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                         preexec_fn=pin(LOAD_CPU))
    if sc.tool == "echo":
        try:
            return json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(f"echo_load failed: {out.stdout}{out.stderr}") from None
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


def machine_busy_seconds():
    """user+nice+system time of all CPUs (irq/softirq excluded, as in /proc/PID/stat)."""
    with open("/proc/stat") as f:
        user, nice, system = map(int, f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    """CPU of finished children, i.e. of the load generator runs."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(loop, sc, seconds, echo_load):
    """Fresh server, warm-up load (discarded), then the measured run."""
    server = Server(loop, sc.script)
    try:
        run_load(sc, server.port, WARMUP_S, echo_load)
        cpu0, busy0, load0 = server.cpu_seconds(), machine_busy_seconds(), children_cpu_seconds()
        res = run_load(sc, server.port, seconds, echo_load)
        cpu = server.cpu_seconds() - cpu0
        # CPU used by anything other than server and load generator: a busy
        # machine (e.g. a compile running next to the demo) skews results.
        other = machine_busy_seconds() - busy0 - cpu - (children_cpu_seconds() - load0)
    finally:
        rc = server.stop()
    res["server_cpu_s"] = cpu
    res["other_cpu_s"] = max(0.0, other)
    res["server_exit"] = rc
    res["cpu_ms_per_1k"] = 1e6 * cpu / res["requests"] if res["requests"] else None
    res["ok"] = res["errors"] == 0 and rc == 0 and res["requests"] > 0
    if not res["ok"]:
        tail = server.error_output()[-2000:]
        print(f"\n  ! {loop} / {sc.name}: errors={res['errors']} exit={rc}\n{tail}", file=sys.stderr)
    return res


def available(loop):
    r = subprocess.run([sys.executable, "-c", LOOPS[loop]["probe"]], cwd=REPO,
                       capture_output=True, text=True)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def progress(text, final=False):
    """One self-overwriting status line on a terminal; one line per run in logs."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
    elif final:
        print(text, file=sys.stderr, flush=True)


def summarize(samples, loops, scenarios):
    rows = []
    for sc in scenarios:
        med = {}
        for loop in loops:
            s = [x for x in samples if x["scenario"] == sc.name and x["loop"] == loop
                 and not x["warmup"] and x["ok"]]
            if not s:
                continue
            rps = [x["rps"] for x in s]
            med[loop] = {
                "scenario": sc.name, "loop": loop, "n": len(s),
                "rps": statistics.median(rps),
                "spread_pct": 100 * (max(rps) - min(rps)) / statistics.median(rps),
                "p99_us": statistics.median(x["p99_us"] for x in s),
                "cpu_ms_per_1k": statistics.median(x["cpu_ms_per_1k"] for x in s),
            }
        for loop, row in med.items():
            for ref in ("uvloop", "asyncio"):
                row[f"vs_{ref}"] = row["rps"] / med[ref]["rps"] if ref in med else None
            rows.append(row)
    return rows


def print_table(rows):
    head = ["scenario", "loop", "n", "rps (median)", "spread", "p99 us",
            "server CPU ms/1k req", "vs uvloop", "vs asyncio"]
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"
    body = [[r["scenario"], r["loop"], str(r["n"]), f"{r['rps']:,.0f}",
             f"{r['spread_pct']:.0f}%", f"{r['p99_us']:,.0f}", f"{r['cpu_ms_per_1k']:.1f}",
             ratio(r["vs_uvloop"]), ratio(r["vs_asyncio"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for i, line in enumerate([head] + body):
        if i == 1 or (i > 1 and line[0] != body[i - 2][0]):
            print("  ".join("-" * w for w in widths))
        cells = [c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="discarded rounds first (default 1)")
    p.add_argument("--seconds", type=float, default=3, help="measured seconds per run (default 3)")
    p.add_argument("--loops", default="asyncio,uvloop,kbloop")
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 round of 1 s, no warm-up round")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.warmup_rounds, args.seconds = 1, 0, 1

    loops = []
    for loop in args.loops.split(","):
        if loop not in LOOPS:
            p.error(f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}")
        ok, why = available(loop)
        if ok:
            loops.append(loop)
        else:
            print(f"note: skipping {loop}: not usable ({why})", file=sys.stderr)
    scenarios = list(SCENARIOS)
    if not shutil.which("wrk"):
        print("note: skipping HTTP scenario: `wrk` not found (apt-get install wrk)", file=sys.stderr)
        scenarios = [s for s in scenarios if s.tool != "wrk"]
    if len(os.sched_getaffinity(0)) < 2:
        print("note: fewer than 2 CPUs; server and load generator are not pinned", file=sys.stderr)
    if not loops:
        sys.exit("no usable loops")
    echo_load = build_echo_load()

    total_rounds = args.warmup_rounds + args.rounds
    total = total_rounds * len(scenarios) * len(loops)
    samples, done, broken = [], 0, set()
    started = time.monotonic()
    for rnd in range(total_rounds):
        warmup = rnd < args.warmup_rounds
        # Rotate the loop order each round so no loop always runs first/last.
        order = loops[rnd % len(loops):] + loops[:rnd % len(loops)]
        for sc in scenarios:
            for loop in order:
                done += 1
                label = f"round {rnd + 1}/{total_rounds}{' (warm-up)' if warmup else ''}"
                progress(f"[{done}/{total}] {label}  {sc.name:<15} {loop:<8}")
                if loop in broken:
                    continue
                try:
                    res = measure(loop, sc, args.seconds, echo_load)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    print(f"\n  ! {loop} / {sc.name}: {e}\n  ! dropping {loop} from the rest of the run",
                          file=sys.stderr)
                    broken.add(loop)
                    continue
                samples.append({"round": rnd, "warmup": warmup, "scenario": sc.name,
                                "loop": loop, **res})
                progress(f"[{done}/{total}] {label}  {sc.name:<15} {loop:<8} "
                         f"{res['rps']:>9,.0f} rps", final=True)
    progress(f"done in {time.monotonic() - started:.0f} s\n", final=True)

    rows = summarize(samples, loops, scenarios)
    print(f"\nkbloop quick comparison: {args.rounds} round(s) x {args.seconds:g} s "
          f"(+{args.warmup_rounds} warm-up round), Python {platform.python_version()}, "
          f"Linux {platform.release()}, server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}\n")
    print_table(rows)
    print("\nrps and p99 are medians over rounds; spread = (max-min)/median rps; "
          "ratios compare median rps.")
    busy = [x for x in samples if x["other_cpu_s"] > 0.1 * args.seconds]
    if busy:
        print(f"WARNING: other processes used >10% of a CPU during {len(busy)} of "
              f"{len(samples)} runs; rerun on a quiet machine for trustworthy numbers.")
    failed = [f"{x['loop']}/{x['scenario']}" for x in samples if not x["ok"]]
    if failed:
        print(f"discarded runs with errors: {', '.join(failed)}")
    if broken:
        print(f"dropped after a failure (see above): {', '.join(sorted(broken))}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
            "python": sys.version, "kernel": platform.release(), "loops": loops,
            "warmup_s_per_run": WARMUP_S, "server_cpu": SERVER_CPU, "load_cpu": LOAD_CPU}
    try:
        import uvloop
        meta["uvloop"] = uvloop.__version__
    except ImportError:
        pass
    out.write_text(json.dumps({"meta": meta, "samples": samples, "summary": rows}, indent=1))
    print(f"all samples: {out.relative_to(REPO)}")
    if broken:
        sys.exit(1)


if __name__ == "__main__":
    main()
