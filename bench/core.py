"""python -m bench --core: the loop core without I/O (issue 19), asyncio vs uvloop vs kbloop.

Small programs that exercise only the event loop's core (callbacks, tasks, futures, timers,
wake-ups from another thread), each run in a fresh process per (round, loop, benchmark),
loops interleaved round by round; minimum and median ns per operation over the rounds, with
ratios to uvloop.  `python -m bench.core --child NAME --loop LOOP --n N` is one measurement
(one JSON line on stdout).  Method: bench/README.md, "The loop core".
"""

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .runner import LOAD_CPU, REPO, SERVER_CPU, loop_env, machine_busy_seconds

# The loops that can run the core programs (a loop in this process, no network link), and
# what each one's class and reactor mode must be, so that no run measures the wrong loop.
CORE_LOOPS = {
    "asyncio": ("asyncio.", None),
    "uvloop": ("uvloop.", None),
    "kbloop": ("kbloop", "default"),
    "kbloop-busy": ("kbloop", "busy_poll"),
    "kbloop-sqpoll": ("kbloop", "sqpoll"),
}
TARGET = 0.8   # issue 19: every core benchmark at most 0.8x uvloop's ns per operation


# ---------------------------------------------------------------- the programs
# Each takes (loop, n) and returns {metric: (wall ns, CPU ns)} for all n operations; the caller
# divides by n.  Everything a program needs is set up before its clocks start.  The CPU time
# is the process's (both threads in the threadsafe one): unlike the wall clock it leaves out
# the time the process waited for a CPU that other processes were using.

def clocks():
    return time.perf_counter_ns(), time.process_time_ns()


def since(start):
    return tuple(b - a for a, b in zip(start, clocks()))

def threadsafe(loop, n):
    """n call_soon_threadsafe() calls from a worker thread on the other core while the loop
    runs them: the caller's ns per call, and ns per call until the loop has run the last."""
    done = loop.create_future()
    count = 0
    times = {}

    def cb():
        nonlocal count
        count += 1
        if count == n:
            done.set_result(clocks())

    def worker():
        pin(LOAD_CPU)
        call = loop.call_soon_threadsafe
        t0, own0 = clocks(), time.thread_time_ns()
        for _ in range(n):
            call(cb)
        # The caller's CPU: this thread's own.
        times["caller"] = (time.perf_counter_ns() - t0[0], time.thread_time_ns() - own0)
        times["t0"] = t0

    thread = threading.Thread(target=worker)

    async def main():
        thread.start()
        return await done

    end = loop.run_until_complete(main())
    thread.join()
    until_run = tuple(b - a for a, b in zip(times["t0"], end))
    return {"threadsafe caller": times["caller"], "threadsafe until run": until_run}


def gather(loop, n):
    """create_task + gather of coroutines that return at once, in batches of 100."""
    async def nop():
        return None

    async def main():
        create_task = loop.create_task
        for _ in range(n // 100):
            await asyncio.gather(*[create_task(nop()) for _ in range(100)])

    return {"create_task+gather": timed(loop, main)}


def queue_pingpong(loop, n):
    """n round trips between two tasks over two asyncio.Queues."""
    async def main():
        ping, pong = asyncio.Queue(), asyncio.Queue()

        async def echo():
            for _ in range(n):
                await pong.put(await ping.get())

        task = loop.create_task(echo())
        for i in range(n):
            await ping.put(i)
            await pong.get()
        await task

    return {"Queue ping-pong": timed(loop, main)}


def call_soon_chain(loop, n):
    """A callback that schedules itself again with call_soon, n times."""
    done = loop.create_future()
    left = n

    def cb():
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(cb)
        else:
            done.set_result(None)

    start = clocks()
    loop.call_soon(cb)
    loop.run_until_complete(done)
    return {"call_soon chain": since(start)}


def sleep0(loop, n):
    """100 tasks, each awaiting asyncio.sleep(0) n/100 times."""
    async def sleeper(k):
        for _ in range(k):
            await asyncio.sleep(0)

    async def main():
        await asyncio.gather(*[loop.create_task(sleeper(n // 100)) for _ in range(100)])

    return {"sleep(0) x100 tasks": timed(loop, main)}


def timers(loop, n):
    """n call_later() timers with random delays (0-1 ms, so the run is not spent waiting),
    every other one cancelled, then run until the rest have fired; ns per timer scheduled."""
    rng = random.Random(19)
    delays = [rng.random() * 0.001 for _ in range(n)]
    fired = 0
    done = loop.create_future()

    def cb():
        nonlocal fired
        fired += 1
        if fired == n // 2:
            done.set_result(None)

    async def main():
        call_later = loop.call_later
        handles = [call_later(d, cb) for d in delays]
        for h in handles[1::2]:
            h.cancel()
        await done

    return {"timers, half cancelled": timed(loop, main)}


def future_roundtrip(loop, n):
    """create_future(), call_soon(fut.set_result), await fut: n times."""
    async def main():
        create_future, call_soon = loop.create_future, loop.call_soon
        for i in range(n):
            fut = create_future()
            call_soon(fut.set_result, i)
            await fut

    return {"future round trip": timed(loop, main)}


def event_pingpong(loop, n):
    """n round trips between two tasks over two asyncio.Events."""
    async def main():
        ping, pong = asyncio.Event(), asyncio.Event()

        async def echo():
            for _ in range(n):
                await ping.wait()
                ping.clear()
                pong.set()

        task = loop.create_task(echo())
        for _ in range(n):
            ping.set()
            await pong.wait()
            pong.clear()
        await task

    return {"Event ping-pong": timed(loop, main)}


def timed(loop, main):
    start = clocks()
    loop.run_until_complete(main())
    return since(start)


@dataclass(frozen=True)
class Bench:
    name: str
    fn: object
    n: int          # operations per measurement (~0.2-1 s on this machine, asyncio the slowest)
    unit: str       # what one operation is
    metrics: tuple  # the table rows it produces

    @property
    def smoke_n(self):
        """--smoke: a hundredth of the operations."""
        return self.n // 100

    @property
    def pinned(self):
        """Every program runs on one core, except the cross-thread one (its thread on the other)."""
        return self.name != "threadsafe"


BENCHES = [
    Bench("threadsafe", threadsafe, 100_000, "call",
          ("threadsafe caller", "threadsafe until run")),
    Bench("gather", gather, 100_000, "task", ("create_task+gather",)),
    Bench("queue", queue_pingpong, 50_000, "round trip", ("Queue ping-pong",)),
    Bench("call_soon", call_soon_chain, 300_000, "callback", ("call_soon chain",)),
    Bench("sleep0", sleep0, 200_000, "sleep(0)", ("sleep(0) x100 tasks",)),
    Bench("timers", timers, 200_000, "timer", ("timers, half cancelled",)),
    Bench("future", future_roundtrip, 100_000, "round trip", ("future round trip",)),
    Bench("event", event_pingpong, 50_000, "round trip", ("Event ping-pong",)),
]
BY_NAME = {b.name: b for b in BENCHES}
# What each table row measures, for the report.
DESCRIPTIONS = {
    "threadsafe caller": "call_soon_threadsafe() from a thread on the other core: the caller's "
                         "ns per call",
    "threadsafe until run": "the same calls: ns per call from the first until the loop has run "
                            "the last",
    "create_task+gather": "create_task() + gather() of coroutines that return at once, batches "
                          "of 100: ns per task",
    "Queue ping-pong": "two tasks, two asyncio.Queues: ns per round trip",
    "call_soon chain": "a callback that call_soon()s itself: ns per callback",
    "sleep(0) x100 tasks": "100 tasks looping on await asyncio.sleep(0): ns per sleep(0)",
    "timers, half cancelled": "call_later() with random 0-1 ms delays, every other one "
                              "cancelled, run until the rest fired: ns per timer scheduled",
    "future round trip": "create_future(), call_soon(set_result), await: ns per round trip",
    "Event ping-pong": "two tasks, two asyncio.Events: ns per round trip",
}


# ---------------------------------------------------------------- one measurement (child)

def pin(cpu):
    """Pin the calling thread (Linux: pid 0 is the thread) to one CPU, given 2 CPUs."""
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {cpu})


def new_loop(name):
    """The named loop (its reactor mode comes from the environment, runner.loop_env)."""
    module, mode = CORE_LOOPS[name]
    if name == "asyncio":
        loop = asyncio.new_event_loop()
    elif name == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        import kbloop
        loop = kbloop.new_event_loop()
    cls = f"{type(loop).__module__}.{type(loop).__qualname__}"
    if not cls.startswith(module):
        raise SystemExit(f"{name}: the loop is {cls}")
    if mode and loop.stats().get("mode") != mode:
        raise SystemExit(f"{name}: the loop's mode is {loop.stats().get('mode')}, not {mode}")
    return loop, cls


def child(bench, loop_name, n):
    """Warm up (a tenth of n, discarded), then measure n operations in the same loop."""
    pin(SERVER_CPU)   # the threadsafe program's worker moves itself to the other core
    loop, cls = new_loop(loop_name)
    asyncio.set_event_loop(loop)
    try:
        bench.fn(loop, max(100, n // 10))
        gc.collect()
        busy0, ru0, wall0 = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF), \
            time.monotonic()
        totals = bench.fn(loop, n)
        wall = time.monotonic() - wall0
        ru1, busy1 = resource.getrusage(resource.RUSAGE_SELF), machine_busy_seconds()
    finally:
        loop.close()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"loop_class": cls, "n": n, "wall_s": wall, "cpu_s": cpu,
            # CPU used meanwhile by other processes (runner.noisy judges it).
            "other_cpu_s": max(0.0, busy1 - busy0 - cpu),
            "ns": {metric: w / n for metric, (w, _) in totals.items()},
            "cpu_ns": {metric: c / n for metric, (_, c) in totals.items()}}


def measure(bench, loop, n):
    """One measurement in a fresh process: the child's result, or a failure."""
    argv = [sys.executable, "-m", "bench.core", "--child", bench.name, "--loop", loop,
            "--n", str(n)]
    env = {**loop_env(loop), "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"exit {out.returncode}: {(out.stderr or out.stdout).strip()[-1500:]}")
    return json.loads(lines[-1])


def child_main(argv):
    p = argparse.ArgumentParser(prog="python -m bench.core")
    p.add_argument("--child", required=True, choices=list(BY_NAME))
    p.add_argument("--loop", required=True, choices=list(CORE_LOOPS))
    p.add_argument("--n", type=int, required=True)
    args = p.parse_args(argv)
    print(json.dumps(child(BY_NAME[args.child], args.loop, args.n)))


# ---------------------------------------------------------------- summaries and tables

def selected(only=None):
    """The programs that --only TEXT selects: TEXT in "core NAME" or in a row's name."""
    return [b for b in BENCHES if not only or only in f"core {b.name}"
            or any(only in m for m in b.metrics)]


def metrics():
    return [(b, m) for b in BENCHES for m in b.metrics]


CLOCKS = {"": "wall-clock", "cpu_": "CPU"}   # key prefix of a row's figures: what they time


def summarize(samples, loops):
    """One row per metric: {loop: figures}, figures = min, median, spread_pct, n and the
    ratios to uvloop (min_vs_uvloop, median_vs_uvloop) of the wall-clock ns per operation,
    and the same with a cpu_ prefix for the process's CPU ns per operation."""
    rows = []
    for bench, metric in metrics():
        row = {"metric": metric, "bench": bench.name, "unit": bench.unit, "loops": {}}
        for loop in loops:
            runs = [x for x in samples if x["bench"] == bench.name and x["loop"] == loop
                    and x["ok"] and not x["warmup"]]
            for prefix, key in (("", "ns"), ("cpu_", "cpu_ns")):
                vals = [x[key][metric] for x in runs if key in x]
                if vals:
                    mid = statistics.median(vals)
                    row["loops"].setdefault(loop, {}).update({
                        f"{prefix}min": min(vals), f"{prefix}median": mid,
                        f"{prefix}spread_pct": 100 * (max(vals) - min(vals)) / mid,
                        f"{prefix}n": len(vals)})
        uv = row["loops"].get("uvloop", {})
        for loop, r in row["loops"].items():
            for prefix in CLOCKS:
                for stat in ("min", "median"):
                    k = prefix + stat
                    r[f"{k}_vs_uvloop"] = r[k] / uv[k] if k in r and uv.get(k) else None
        if row["loops"]:
            rows.append(row)
    return rows


def check_target(rows, clock=""):
    """(verdict, detail lines): kbloop's minimum at most TARGET x uvloop's, every metric
    (clock: "" for wall-clock ns per operation, "cpu_" for CPU ns)."""
    key = f"{clock}min_vs_uvloop"
    sel = [r for r in rows if r["loops"].get("kbloop", {}).get(key) is not None]
    met = [r for r in sel if r["loops"]["kbloop"][key] <= TARGET]
    lines = []
    for r in sel:
        kb = r["loops"]["kbloop"]
        lines.append(f"{r['metric']}: {kb[key]:.2f}x uvloop (median "
                     f"{kb[f'{clock}median_vs_uvloop']:.2f}x) "
                     f"{'met' if kb[key] <= TARGET else 'MISSED'}")
    verdict = "not measured" if not sel else ("met" if len(met) == len(sel) else "MISSED")
    summary = (f"{len(met)} of {len(sel)} at or below {TARGET}x uvloop"
               + (f": {', '.join(r['metric'] for r in met)}" if met else "")
               + (f"; above it: {', '.join(r['metric'] for r in sel if r not in met)}"
                  if len(met) < len(sel) else ""))
    return verdict, [summary] + lines


def table(rows, loops, markdown=False, clock=""):
    """benchmark | asyncio ns | uvloop ns | kbloop ns | kbloop/uvloop | ...: ns cells are
    "minimum / median", ratio cells the same two ratios (markdown: bold at or below TARGET);
    clock: "" wall-clock ns per operation, "cpu_" CPU ns."""
    loops = [l for l in CORE_LOOPS if l in loops]     # the canonical order
    head, cols = ["benchmark"], []
    for l in loops:
        head.append(f"{l} ns")
        cols.append((l, False))
        if l.startswith("kbloop") and "uvloop" in loops:
            head.append(f"{l}/uvloop")
            cols.append((l, True))
    body = []
    for r in rows:
        cells = [r["metric"]]
        for l, is_ratio in cols:
            x = {k[len(clock):]: v for k, v in r["loops"].get(l, {}).items()
                 if k.startswith(clock) and not (clock == "" and k.startswith("cpu_"))}
            if not x or (is_ratio and x["min_vs_uvloop"] is None):
                cells.append("-")
            elif is_ratio:
                cell = f"{x['min_vs_uvloop']:.2f}x / {x['median_vs_uvloop']:.2f}x"
                bold = markdown and x["min_vs_uvloop"] <= TARGET
                cells.append(f"**{cell}**" if bold else cell)
            else:
                cells.append(f"{x['min']:,.0f} / {x['median']:,.0f}")
        body.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(cells, widths))) for cells in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


NOTE = ("Each cell: minimum / median over the measured rounds of ns per operation (lower is "
        "better); ratios: kbloop's minimum / uvloop's minimum, and the same for the medians. "
        "Every measurement is a fresh process per (round, loop, benchmark), pinned to one "
        "core (the call_soon_threadsafe caller on the other), with an in-process warm-up of a "
        "tenth of its operations first; loops interleaved, their order rotated each round.")
CPU_NOTE = ("CPU ns per operation: the process's CPU time over the same measured runs (both "
            "threads in the threadsafe rows; the caller row: the calling thread's). It leaves "
            "out the time the process waited for its core while other processes ran, so it is "
            "the steadier figure on a busy machine; on a quiet one it is close to the wall "
            "clock for the single-threaded programs.")
TITLES = {"": "wall clock, ns per operation", "cpu_": "CPU, ns per operation"}


def check_targets(rows):
    """{clock: (verdict, details)} for the wall clock ("", the issue's figure) and CPU."""
    return {clock: check_target(rows, clock) for clock in CLOCKS}


def markdown_report(rows, meta, targets):
    m = meta["machine"]
    v = m["versions"]
    lines = [
        f"# kbloop benchmark: the loop core (no I/O), {meta['date']}", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {m['nproc']} vCPU, {m['cpu_model']}, Linux {m['kernel']}, {m['os']}  ",
        f"Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "  ",
        f"Method: {meta['rounds']} measured rounds (+{meta['warmup_rounds']} warm-up round), "
        f"loops interleaved; see [bench/README.md](../README.md), \"The loop core\".  ",
        f"Duration: {meta['duration_s'] / 60:.1f} min.", "",
    ]
    lines += [f"**Warning:** {w}" for w in meta["warnings"]] + ([""] if meta["warnings"] else [])
    for clock, (verdict, details) in targets.items():
        lines += [f"## Target: every benchmark at most {TARGET}x uvloop (kbloop, minimum, "
                  f"{TITLES[clock]}): {verdict}", ""] + [f"- {d}" for d in details] + [""]
    for clock, title in TITLES.items():
        lines += [f"## Results: {title}", "", table(rows, meta["loops"], True, clock), "",
                  NOTE if not clock else CPU_NOTE, f"Bold: at or below {TARGET}x uvloop.", ""]
    lines += ["## What each row measures", ""]
    lines += [f"- **{r['metric']}**: {DESCRIPTIONS[r['metric']]} "
              f"({meta['n'][r['bench']]:,} per measurement)." for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run (parent)

def run(loops, rounds, warmup_rounds, noisy_retries, out_dir, command, smoke=False,
        only=None, latest=None, progress=None):
    """Interleaved rounds over `loops`; writes core[-smoke]-DATE.json/.md (and `latest`).
    Returns (rows, {clock: (verdict, details)}, failed runs)."""
    import datetime

    from .runner import machine_info, noisy, wait_until_quiet

    progress = progress or (lambda text, final=False: final and print(text, file=sys.stderr))

    benches = selected(only)
    plan = [(rnd, rnd < warmup_rounds) for rnd in range(warmup_rounds + rounds)]
    total = sum(len(benches[:1] if w else benches) for _, w in plan) * len(loops)
    samples, done, failed = [], 0, []
    started = time.monotonic()
    for rnd, warmup in plan:
        order = loops[rnd % len(loops):] + loops[:rnd % len(loops)]
        label = f"round {rnd + 1}/{len(plan)}{' (warm-up)' if warmup else ''}"
        for bench in benches[:1] if warmup else benches:
            n = bench.smoke_n if smoke else bench.n
            for loop in order:
                done += 1
                progress(f"[{done}/{total}] {label}  core {bench.name:<11} {loop:<13}")
                try:
                    res, retries = measure(bench, loop, n), 0
                    while noisy(res) and retries < noisy_retries:
                        retries += 1
                        wait_until_quiet(30)
                        res = measure(bench, loop, n)
                except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
                    print(f"\n  ! {loop} / core {bench.name}: {e}", file=sys.stderr)
                    failed.append(f"{loop}/{bench.name}")
                    samples.append({"round": rnd, "warmup": warmup, "bench": bench.name,
                                    "loop": loop, "ok": False, "failure": str(e)[-2000:]})
                    continue
                samples.append({"round": rnd, "warmup": warmup, "bench": bench.name,
                                "loop": loop, "ok": True, "noisy_retries": retries, **res})
                progress(f"[{done}/{total}] {label}  core {bench.name:<11} {loop:<13} "
                         + "  ".join(f"{v:8,.0f} ns" for v in res["ns"].values()), final=True)
    duration = time.monotonic() - started
    measured = [x for x in samples if x["ok"] and not x["warmup"]]
    warnings = []
    busy = [x for x in measured if noisy(x)]
    if busy:
        warnings.append(f"other processes used >10% of a CPU during {len(busy)} of "
                        f"{len(measured)} measurements; the minimum over rounds is the steadier "
                        "figure then, and a quiet machine gives trustworthy medians.")
    if failed:
        warnings.append(f"failed runs: {', '.join(failed)}")
    now = datetime.datetime.now()
    meta = {"mode": "core-smoke" if smoke else "core", "smoke": smoke,
            "date": now.isoformat(timespec="seconds"), "command": command,
            "rounds": rounds, "warmup_rounds": warmup_rounds, "noisy_retries": noisy_retries,
            "loops": loops, "duration_s": duration, "warnings": warnings,
            "n": {b.name: b.smoke_n if smoke else b.n for b in benches},
            "machine": machine_info()}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{meta['mode']}-{now:%Y%m%d-%H%M%S}"
    rows, targets = write_reports({"meta": meta, "samples": samples}, stem, latest)
    return rows, targets, failed


def write_reports(data, stem, latest=None):
    """Summarize data["samples"] (again, for --report), print the table and the target, and
    write stem.json, stem.md (and `latest` beside them, e.g. CORE.md).
    Returns (rows, {clock: (verdict, details)})."""
    meta = data["meta"]
    rows = summarize(data["samples"], meta["loops"])
    targets = check_targets(rows)
    data.update(summary=rows, targets={"cpu" if c else "wall": t for c, t in targets.items()})
    print(f"\nkbloop benchmark, the loop core: {meta['rounds']} round(s) "
          f"(+{meta['warmup_rounds']} warm-up), Python {meta['machine']['python']}, "
          f"pinned to CPU {SERVER_CPU}")
    for clock, title in TITLES.items():
        print(f"\n{title}:\n\n{table(rows, meta['loops'], clock=clock)}")
    print("\n" + NOTE + "\n" + CPU_NOTE)
    for clock, (verdict, details) in targets.items():
        print(f"\nTarget: every benchmark at most {TARGET}x uvloop (kbloop, minimum, "
              f"{TITLES[clock]}): [{verdict}]")
        print("\n".join(f"    {d}" for d in details))
    for w in meta["warnings"]:
        print(f"WARNING: {w}")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    md = markdown_report(rows, meta, targets)
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    stem.with_suffix(".md").write_text(md)
    if latest:
        written.append(stem.parent / latest)
        written[-1].write_text(md)
    print("written: " + ", ".join(os.path.relpath(p, REPO) for p in written))
    return rows, targets


if __name__ == "__main__":
    child_main(sys.argv[1:])
