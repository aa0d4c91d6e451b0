"""kbloop benchmark suite: asyncio vs uvloop vs kbloop (python -m bench).

Runs the unmodified example servers (echo: Protocol, BufferedProtocol,
streams; HTTP: httptools, aiohttp; Redis protocol) on each loop, pinned to
CPU 0, against compiled load generators pinned to CPU 1 (bench/echo_load.c,
wrk, redis-benchmark), loops interleaved round by round.  Prints a table of
medians and writes all samples (JSON), plots (PNG) and a markdown report to
bench/results/.  --modes compares kbloop's reactor modes (default, busy-poll,
SQPOLL) with uvloop instead; --core measures the loop core without I/O
(bench/core.py); --tls measures TLS echo and HTTPS.  Method: bench/README.md.
"""

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from . import core, report, runner
from .runner import (LOOPS, REPO, RESULTS, TOOLS, available, build_echo_load, link_of,
                     machine_info, measure, noisy, supports, wait_until_quiet)
from .scenarios import MODES, OPEN_LOAD_FRACTION


def progress(text, final=False):
    """One self-overwriting status line on a terminal; one line per run in logs."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
    elif final:
        print(text, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="representative subset, about 3 minutes (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every combination, about 30 minutes; writes bench/results/LATEST.md")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="every kind of scenario once, tiny: checks the machinery (seconds)")
    mode.add_argument("--dpdk", dest="mode", action="store_const", const="dpdk",
                      help="the DPDK datapath: over a veth pair, DPDK vs io_uring vs uvloop; "
                           "over memif, DPDK vs uvloop on loopback (root; ~5 min)")
    mode.add_argument("--modes", dest="mode", action="store_const", const="modes",
                      help="kbloop's reactor modes vs uvloop: c1 latency, c32 throughput, CPU "
                           "per request, about 7 minutes; writes bench/results/MODES.md")
    mode.add_argument("--core", dest="mode", action="store_const", const="core",
                      help="the loop core without I/O (callbacks, tasks, queues, timers, "
                           "call_soon_threadsafe): ns per operation, about 4 minutes; writes "
                           "bench/results/CORE.md")
    mode.add_argument("--tls", dest="mode", action="store_const", const="tls",
                      help="TLS echo and HTTPS: asyncio, uvloop, kbloop (its own TLS) and kbloop "
                           "with asyncio's sslproto, about 7 minutes; writes bench/results/TLS.md")
    p.add_argument("--loops", help="comma-separated, from: " + ", ".join(LOOPS)
                                   + " (default: the mode's; --smoke: all; --core: any of "
                                   + ", ".join(core.CORE_LOOPS) + ")")
    p.add_argument("--rounds", type=int, help="measured rounds (mode default)")
    p.add_argument("--warmup-rounds", type=int, help="discarded rounds first (mode default)")
    p.add_argument("--seconds", type=float,
                   help="measured seconds per run (mode default; --core: fixed operation counts)")
    p.add_argument("--noisy-retries", type=int, metavar="N",
                   help="repeat a run up to N times, once the machine is quiet again, when other "
                        "processes used >10%% of a CPU during it (mode default; --modes: 3)")
    p.add_argument("--only", help="run only scenarios whose name contains this text")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="instead of benchmarking: rewrite the table, markdown and plots of a "
                        "results JSON (e.g. after changing bench/report.py)")
    p.add_argument("--profile", metavar="SCENARIO",
                   help="instead of benchmarking: perf-record the server of this scenario "
                        "(exact name, e.g. 'proto 64B c32') on each of --loops and print perf report")
    p.add_argument("--rate", type=float, help="with --profile of an open-loop scenario: offered req/s")
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    defaults = MODES[args.mode]
    args.loops = args.loops or ",".join(defaults["loops"])
    for key in ("rounds", "warmup_rounds", "seconds", "noisy_retries"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.warmup_s = defaults["warmup_s"]
    args.scenarios = defaults["scenarios"]()
    if args.only:
        args.scenarios = [s for s in args.scenarios if args.only in s.name]
    for loop in args.loops.split(","):
        if loop not in LOOPS:
            p.error(f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}")
        if args.mode == "core" and loop not in core.CORE_LOOPS:
            p.error(f"--core runs on {', '.join(core.CORE_LOOPS)}, not {loop}")
    if args.mode == "core" and args.profile:
        p.error("--profile profiles a server scenario; --core has none")
    return args


def usable_loops(names):
    loops = []
    for loop in names.split(","):
        ok, why = available(loop)
        if ok:
            loops.append(loop)
        else:
            print(f"note: skipping {loop}: not usable ({why})", file=sys.stderr)
    return loops


def usable_scenarios(scenarios):
    missing = {tool for tool in TOOLS.values() if not shutil.which(tool)}
    for tool in sorted(missing):
        print(f"note: skipping scenarios that need `{tool}`: not found (bash scripts/setup.sh)",
              file=sys.stderr)
    scenarios = [s for s in scenarios if TOOLS.get(s.kind) not in missing]
    if any(s.tls for s in scenarios):
        # The servers' certificate (openssl req) and the TLS echo load generator (libssl-dev).
        try:
            runner.tls_cert()
            if any(s.tls and s.kind == "echo" for s in scenarios):
                build_echo_load(tls=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"note: skipping the TLS scenarios: {e} (bash scripts/setup.sh installs "
                  "openssl and libssl-dev)", file=sys.stderr)
            scenarios = [s for s in scenarios if not s.tls]
    return scenarios


def open_rate(sc, samples):
    """Offered rate for an open-loop scenario: a fraction of the slowest loop's
    closed-loop req/s in the first measured round that has them all, so all
    loops sustain it.  Fixed for the rest of the run: every loop, every round
    is measured at the same offered load."""
    for rnd in sorted({x["round"] for x in samples if not x["warmup"]}):
        ref = {x["loop"]: x["rps"] for x in samples
               if x["scenario"] == sc.open_of and x["round"] == rnd and x["ok"]}
        if ref:
            return OPEN_LOAD_FRACTION * min(ref.values())
    return None


def run_rounds(args, loops, scenarios):
    """Interleaved rounds; returns (samples, loops dropped after a failure)."""
    # The warm-up round warms the machine (clocks, page cache, the loops'
    # imports) with the first scenario, discarded.  Each run also has its own
    # warm-up load.
    warm = scenarios[:1]
    plan = [(rnd, rnd < args.warmup_rounds) for rnd in range(args.warmup_rounds + args.rounds)]
    total = sum(len(warm if w else scenarios) for _, w in plan) * len(loops)
    samples, done, broken, failures = [], 0, set(), dict.fromkeys(loops, 0)
    rates = {}
    for rnd, warmup in plan:
        # Rotate the loop order each round so no loop always runs first/last.
        order = loops[rnd % len(loops):] + loops[:rnd % len(loops)]
        label = f"round {rnd + 1}/{len(plan)}{' (warm-up)' if warmup else ''}"
        for sc in warm if warmup else scenarios:
            if sc.open_of and not rates.get(sc.name):
                rates[sc.name] = open_rate(sc, samples)
            rate = rates.get(sc.name)
            if sc.open_of and not rate:
                done += len(order)
                print(f"\n  ! {sc.name}: no closed-loop result for {sc.open_of} in this round",
                      file=sys.stderr)
                continue
            for loop in order:
                done += 1
                progress(f"[{done}/{total}] {label}  {sc.name:<22} {loop:<13}")
                if loop in broken or not supports(loop, sc):
                    continue
                try:
                    res = measure(loop, sc, args.seconds, rate, args.warmup_s)
                    # On a shared machine (someone compiling), redo a disturbed run
                    # rather than let it into the medians; the retries are recorded.
                    retries = 0
                    while noisy(res) and retries < args.noisy_retries:
                        retries += 1
                        wait_until_quiet(60)
                        res = measure(loop, sc, args.seconds, rate, args.warmup_s)
                    res["noisy_retries"] = retries
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    # e.g. the server did not start; a loop that keeps failing
                    # is dropped rather than slowing the whole run down.
                    failures[loop] += 1
                    print(f"\n  ! {loop} / {sc.name}: {e}", file=sys.stderr)
                    samples.append({"round": rnd, "warmup": warmup, "scenario": sc.name,
                                    "loop": loop, "ok": False, "failure": str(e)[-2000:]})
                    if failures[loop] >= 3:
                        print(f"  ! dropping {loop} from the rest of the run", file=sys.stderr)
                        broken.add(loop)
                    continue
                failures[loop] = 0
                samples.append({"round": rnd, "warmup": warmup, "scenario": sc.name,
                                "loop": loop, **res})
                progress(f"[{done}/{total}] {label}  {sc.name:<22} {loop:<13} "
                         f"{res['rps']:>10,.0f} req/s  {res['cpu_us_per_req'] or 0:6.1f} us CPU/req",
                         final=True)
    return samples, broken


def profile(args, loops, scenarios):
    """perf record the server of one scenario on each loop; print perf report."""
    sel = [s for s in scenarios if s.name == args.profile]
    if not sel:
        sys.exit(f"no scenario named {args.profile!r} in --{args.mode} mode")
    sc = sel[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for loop in loops:
        data = args.out_dir / f"perf-{loop}-{sc.name.replace(' ', '_')}.data"
        rate = args.rate
        if sc.open_of and not rate:
            sys.exit("an open-loop scenario needs --rate REQUESTS_PER_S")
        res = measure(loop, sc, args.seconds, rate, args.warmup_s, profile_to=data)
        print(f"== {loop} / {sc.name}: {res['rps']:,.0f} req/s, "
              f"{res['cpu_us_per_req']:.1f} us CPU/req (under perf), perf data: {data}")
        out = subprocess.run(["perf", "report", "-i", str(data), "--no-children",
                              "--sort", "dso,sym", "--stdio", "-g", "none", "--percent-limit", "0.7"],
                             capture_output=True, text=True)
        print("\n".join(line for line in out.stdout.splitlines()
                        if line.strip() and not line.startswith("#")))


@contextlib.contextmanager
def veth_link(loops):
    """The veth pair of the veth loops (runner.NET) for the whole run, if any loop needs it:
    the network namespaces of tests/netns.py, plus the kernel loops' address on vA."""
    if not any(link_of(loop) == "veth" for loop in loops):
        yield
        return
    sys.path.insert(0, str(REPO / "tests"))
    import netns
    with netns.VethPair() as net:
        netns.sh("ip", "-n", net.ns_a, "addr", "add", f"{runner.KERNEL_VETH_IP}/{net.prefix}",
                 "dev", net.if_a)
        runner.NET = net
        try:
            yield
        finally:
            runner.NET = None


# The modes whose complete runs also write a fixed-name copy of their report.
LATEST = {"full": "LATEST.md", "modes": "MODES.md", "dpdk": "DPDK.md", "core": "CORE.md",
          "tls": "TLS.md"}


def write_reports(rows, meta, stem, plots=True, latest=None):
    """Terminal table and targets; stem.md and stem-*.png (and `latest`, e.g. LATEST.md)
    beside stem.json."""
    m = meta["machine"]
    targets = report.check_targets(rows)
    if meta["mode"] == "tls":   # the other targets are about scenarios a TLS run has none of
        targets = [t for t in targets if t[0] == report.TLS_TARGET]
    print(f"\nkbloop benchmark, {meta['mode']} mode: {meta['rounds']} round(s) x {meta['seconds']:g} s "
          f"(+{meta['warmup_rounds']} warm-up round), Python {m['python']}, Linux {m['kernel']}, "
          f"server on CPU {m['server_cpu']}, load on CPU {m['load_cpu']}\n")
    print(report.text_table(rows))
    print("\nmedians over rounds; spread = (max-min)/median req/s; CPU us/req = server CPU per "
          "request; server/gen CPU = share of a core; GEN-BOUND = load generator may be the limit.")
    tls = report.tls_table(rows)
    if tls:
        print("\nTLS vs uvloop (same run):\n")
        print(tls)
        print("\n" + textwrap.fill(report.TLS_NOTE, 100))
    modes = report.modes_table(rows)
    if modes:
        dpdk = meta["mode"] == "dpdk"
        print(f"\n{'The DPDK datapath' if dpdk else 'Reactor modes'} vs uvloop (same run):\n")
        print(modes)
        print("\n" + textwrap.fill(report.DPDK_NOTE if dpdk else report.MODES_NOTE, 100))
    print("\nTargets (kbloop vs uvloop):")
    print(report.targets_text(targets))
    for w in meta["warnings"]:
        print(f"WARNING: {w}")
    pngs = []
    if plots:
        try:
            pngs = report.plot_all(rows, meta["loops"], str(stem))
        except ImportError:
            print("note: no plots: matplotlib is not installed (pip install matplotlib)",
                  file=sys.stderr)
    md = report.markdown_report(rows, meta, targets, [Path(p).name for p in pngs])
    written = [stem.with_suffix(".json"), stem.with_suffix(".md"), *map(Path, pngs)]
    stem.with_suffix(".md").write_text(md)
    if latest:
        written.append(stem.parent / latest)
        written[-1].write_text(md)
    print("written: " + ", ".join(os.path.relpath(p, REPO) for p in written))


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        # Summaries are recomputed from the raw samples with the current code.
        data = json.loads(args.report.read_text())
        meta, samples = data["meta"], data["samples"]
        stem = args.report.resolve().with_suffix("")
        if meta["mode"] in ("core", "core-smoke"):
            latest = LATEST["core"] if stem.parent == RESULTS and meta["mode"] == "core" else None
            return core.write_reports(data, stem, latest)
        names = {x["scenario"] for x in samples}
        scenarios = [s for s in MODES[meta["mode"]]["scenarios"]() if s.name in names]
        rows = report.summarize(samples, meta["loops"], scenarios)
        data["summary"], data["targets"] = rows, report.check_targets(rows)
        args.report.write_text(json.dumps(data, indent=1))
        return write_reports(rows, meta, stem, plots=not args.no_plots,
                             latest=LATEST.get(meta["mode"]) if stem.parent == RESULTS else None)
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    loops = usable_loops(args.loops)
    if args.mode == "core":
        if not loops:
            sys.exit("nothing to run")
        _, _, failed = core.run(loops, args.rounds, args.warmup_rounds, args.noisy_retries,
                                args.out_dir, command, only=args.only,
                                latest=None if args.only else LATEST["core"], progress=progress)
        sys.exit(1 if failed else 0)
    scenarios = usable_scenarios(args.scenarios)
    if len(os.sched_getaffinity(0)) < 2:
        print("note: fewer than 2 CPUs; server and load generator are not pinned", file=sys.stderr)
    # --smoke also runs each --core program once, tiny (core-smoke-DATE.json beside smoke-*).
    core_smoke = args.mode == "smoke" and (not args.only or core.selected(args.only))
    if not loops or not (scenarios or core_smoke):
        sys.exit("nothing to run")
    core_failed = []
    if core_smoke:
        _, _, core_failed = core.run([x for x in loops if x in core.CORE_LOOPS], 1, 0, 0,
                                     args.out_dir, command, smoke=True, only=args.only,
                                     progress=progress)
        if not scenarios:
            sys.exit(1 if core_failed else 0)
    build_echo_load()
    if args.profile:
        with veth_link(loops):
            return profile(args, loops, scenarios)

    started = time.monotonic()
    with veth_link(loops):
        samples, broken = run_rounds(args, loops, scenarios)
    duration = time.monotonic() - started
    progress(f"done in {duration:.0f} s\n", final=True)

    rows = report.summarize(samples, loops, scenarios)
    targets = report.check_targets(rows)  # also stored in the JSON
    measured = [x for x in samples if not x["warmup"] and "failure" not in x]
    warnings = []
    busy = [x for x in measured if noisy(x)]
    if busy:
        warnings.append(f"other processes used >10% of a CPU during {len(busy)} of {len(measured)} "
                        "runs; rerun on a quiet machine for trustworthy numbers.")
    repeated = sum(x.get("noisy_retries", 0) for x in samples)
    if repeated:
        warnings.append(f"{repeated} disturbed run(s) were repeated (--noisy-retries "
                        f"{args.noisy_retries}); only the last try of each is kept.")
    failed = [f"{x['loop']}/{x['scenario']}" for x in samples if not x["ok"]]
    if failed:
        warnings.append(f"discarded runs with errors: {', '.join(failed)}")
    if broken:
        warnings.append(f"dropped after repeated failures: {', '.join(sorted(broken))}")

    now = datetime.datetime.now()
    meta = {"mode": args.mode, "date": now.isoformat(timespec="seconds"),
            "command": command,
            "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "seconds": args.seconds,
            "noisy_retries": args.noisy_retries,
            "warmup_s": args.warmup_s, "open_load_fraction": OPEN_LOAD_FRACTION,
            "loops": loops, "duration_s": duration, "warnings": warnings,
            "machine": machine_info()}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{args.mode}-{now:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "samples": samples, "targets": targets}, indent=1))
    write_reports(rows, meta, stem, plots=not args.no_plots,
                  latest=None if args.only else LATEST.get(args.mode))
    if broken or failed or core_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
