"""Summaries, tables (terminal and markdown), target checks and plots."""

import statistics

from .runner import GEN_BOUND_PCT, LOOPS

GROUPS = {
    "echo": "Echo, closed loop (ping-pong): throughput; the c1 rows are the latency rows",
    "open": "Echo, open loop: server CPU at the same offered load for every loop",
    "http": "HTTP/1.1 keep-alive, wrk -t1",
    "redis": "Redis protocol, redis-benchmark -t ping,set,get,incr",
    "tls": "Echo over TLS, closed loop (echo_load_tls); the c1 rows are the latency rows",
    "https": "HTTPS/1.1 keep-alive, wrk -t1",
}


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread_pct(values):
    """(max - min) / median in percent; 0 when the median is 0 (a tiny run's CPU can be)."""
    mid = statistics.median(values)
    return 100 * (max(values) - min(values)) / mid if mid else 0.0


def summarize(samples, loops, scenarios):
    """One row per (scenario, loop): medians over the measured, error-free runs."""
    rows = []
    for sc in scenarios:
        med = {}
        for loop in loops:
            s = [x for x in samples if x["scenario"] == sc.name and x["loop"] == loop
                 and not x["warmup"] and x["ok"]]
            if not s:
                continue
            rps = [x["rps"] for x in s]
            row = {
                "scenario": sc.name, "group": sc.group, "kind": sc.kind, "server": sc.server,
                "conns": sc.conns, "msg_size": sc.msg_size, "pipeline": sc.pipeline,
                "loop": loop, "n": len(s),
                "rps": statistics.median(rps),
                "spread_pct": spread_pct(rps),
                "cpu_us_per_req": statistics.median(x["cpu_us_per_req"] for x in s),
                "cpu_spread_pct": spread_pct([x["cpu_us_per_req"] for x in s]),
                "server_cpu_pct": statistics.median(x["server_cpu_pct"] for x in s),
                "gen_cpu_pct": statistics.median(x["gen_cpu_pct"] for x in s),
                "offered_rps": median_or_none(x.get("offered_rps") or None for x in s),
            }
            for p in ("p50_us", "p99_us", "p999_us"):
                row[p] = median_or_none(x.get(p) for x in s)
            row["gen_bound"] = row["gen_cpu_pct"] >= GEN_BOUND_PCT
            if sc.kind == "redis":
                row["tests"] = {t: statistics.median(x["tests"][t] for x in s)
                                for t in s[0]["tests"]}
            med[loop] = row
        for loop, row in med.items():
            # "vs uvloop" is against uvloop on the same link (uvloop-veth for the veth loops).
            uv = LOOPS.get(loop, {}).get("vs", "uvloop")
            row["vs_uvloop"] = row["rps"] / med[uv]["rps"] if uv in med else None
            row["vs_asyncio"] = row["rps"] / med["asyncio"]["rps"] if "asyncio" in med else None
            uv_cpu = med[uv]["cpu_us_per_req"] if uv in med else 0
            # A tiny run can show 0 CPU (/proc's 10 ms ticks): no ratio then.
            row["cpu_vs_uvloop"] = row["cpu_us_per_req"] / uv_cpu if uv_cpu else None
            for p in ("p50_us", "p99_us"):
                ref = med.get(uv, {}).get(p)
                row[f"{p[:-3]}_vs_uvloop"] = row[p] / ref if ref and row[p] is not None else None
            rows.append(row)
    return rows


# ---------------------------------------------------------------- tables

COLUMNS = ["scenario", "loop", "n", "req/s", "spread", "p50 us", "p99 us", "p99.9 us",
           "CPU us/req", "CPU vs uvloop", "server CPU", "gen CPU", "vs uvloop", "vs asyncio"]


def _cells(r):
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"
    num = lambda v: "-" if v is None else f"{v:,.0f}"
    name = r["scenario"]
    if r["offered_rps"]:
        name += f" @ {r['offered_rps'] / 1000:.0f}k/s"
    return [name, r["loop"], str(r["n"]), f"{r['rps']:,.0f}", f"{r['spread_pct']:.0f}%",
            num(r["p50_us"]), num(r["p99_us"]), num(r["p999_us"]),
            f"{r['cpu_us_per_req']:.1f}", ratio(r["cpu_vs_uvloop"]),
            f"{r['server_cpu_pct']:.0f}%",
            f"{r['gen_cpu_pct']:.0f}%" + (" GEN-BOUND" if r["gen_bound"] else ""),
            ratio(r["vs_uvloop"]), ratio(r["vs_asyncio"])]


def _grid(head, body, markdown, left):
    """A table of strings: markdown, or plain aligned text; columns in `left` align left,
    the others (numbers) right."""
    if markdown:
        rule = "|" + "".join("---|" if j in left else "---:|" for j in range(len(head)))
        return "\n".join(["| " + " | ".join(head) + " |", rule]
                         + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) if j in left else c.rjust(w)
                               for j, (c, w) in enumerate(zip(line, widths)))
                     for line in [head, ["-" * w for w in widths]] + body)


def text_table(rows):
    """Plain aligned table, a rule between scenarios."""
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    out = []
    for i, line in enumerate([COLUMNS] + body):
        if i == 1 or (i > 1 and rows[i - 1]["scenario"] != rows[i - 2]["scenario"]):
            out.append("  ".join("-" * w for w in widths))
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def markdown_table(rows):
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    for r in rows:
        cells = _cells(r)
        if r["loop"] == "kbloop":
            cells[1] = "**kbloop**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def redis_commands_markdown(rows):
    rows = [r for r in rows if r["kind"] == "redis"]
    if not rows:
        return ""
    tests = list(rows[0]["tests"])
    out = ["| scenario | loop | " + " | ".join(tests) + " |",
           "|---|---|" + "---:|" * len(tests)]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['loop']} | "
                   + " | ".join(f"{r['tests'].get(t, 0):,.0f}" for t in tests) + " |")
    return "\n".join(out)


def _modes_columns(rows):
    """(header, scenario, value key, ratio key) for the modes table: latency at c1,
    throughput and CPU per request under load, CPU per request at a fixed offered load."""
    cols = []
    for name in dict.fromkeys(r["scenario"] for r in rows):
        r = next(x for x in rows if x["scenario"] == name)
        short = name.replace("proto ", "")
        if r["group"] == "echo" and r["conns"] == 1:
            cols += [(f"{short} p50 us", name, "p50_us", "p50_vs_uvloop"),
                     (f"{short} p99 us", name, "p99_us", "p99_vs_uvloop")]
        elif r["group"] == "echo":
            cols += [(f"{short} req/s", name, "rps", "vs_uvloop"),
                     (f"{short} CPU us/req", name, "cpu_us_per_req", "cpu_vs_uvloop")]
        else:
            cols.append((f"{short} CPU us/req", name, "cpu_us_per_req", "cpu_vs_uvloop"))
    return cols


def modes_table(rows, markdown=False):
    """One line per loop, ratios to uvloop in brackets: the reactor-mode comparison.
    Empty unless the run has a kbloop reactor-mode loop (kbloop-busy, kbloop-sqpoll)."""
    loops = list(dict.fromkeys(r["loop"] for r in rows))
    if not any(loop.startswith("kbloop-") and not LOOPS.get(loop, {}).get("tls_only")
               for loop in loops):
        return ""
    by = {(r["scenario"], r["loop"]): r for r in rows}
    cols = _modes_columns(rows)
    body = []
    for loop in loops:
        line = [loop]
        for _, name, key, ratio in cols:
            r = by.get((name, loop))
            if r is None or r[key] is None:
                line.append("-")
                continue
            v = f"{r[key]:.1f}" if key == "cpu_us_per_req" else f"{r[key]:,.0f}"
            own_ref = LOOPS.get(loop, {}).get("vs", "uvloop") == loop or loop == "uvloop"
            line.append(v + (f" ({r[ratio]:.2f}x)" if r[ratio] is not None and not own_ref else ""))
        body.append(line)
    head = ["loop"] + [c[0] for c in cols]
    return _grid(head, body, markdown, left={0})


DPDK_NOTE = (
    "Ratios (in brackets) are to uvloop on the same link: uvloop-veth for the veth loops "
    "(server in one network namespace, load generator in the other, through the kernel's veth "
    "driver), uvloop on loopback for kbloop-memif (two DPDK stacks joined by shared memory, no "
    "kernel). The DPDK loops busy-poll, so their server uses a whole core at any load: their "
    "CPU per request is 1/(req/s), and is comparable where every loop saturates its core (c32). "
    "Over memif the load generator is C on a DPDK stack of its own (bench/dpdk_echo_load.py); "
    "it busy-polls too, so it always shows as GEN-BOUND. A veth is not a NIC: the af_packet "
    "PMD costs the DPDK server a system call per burst and a copy per frame each way, and the "
    "kernel does the peer's half of the work in either case (docs/dpdk.md).")

MODES_NOTE = (
    "Ratios (in brackets) are to uvloop's median in the same run; below 1 is better for "
    "latency and CPU, above 1 for req/s. Busy-poll spins on its core while traffic flows, "
    "so its server uses about 100% of a core at any load: at c1 its CPU per request is "
    "1/(req/s), the cost of spinning, not of the work. The fair CPU comparisons are c32 "
    "(every loop saturates its core) and the open-loop row (same offered load for all). "
    "SQPOLL's kernel thread is a thread of the server process, so its CPU is included.")


# ---------------------------------------------------------------- TLS

TLS_TARGET = ("TLS (echo and HTTPS): kbloop >= uvloop's requests/s at <= 0.9x its server CPU "
              "per request")


def tls_verdict(uv, kb):
    """Issue 15's target for one TLS scenario: "met" or "MISSED" (with why), or None."""
    if kb["vs_uvloop"] is None or kb["cpu_vs_uvloop"] is None:
        return None
    def x(v, limit):     # 0.997 is shown as 0.997x, not as a missed "1.00x"
        return f"{v:.2f}x" if round(v, 2) != limit else f"{v:.3f}x"

    why = [w for w, bad in ((f"req/s {x(kb['vs_uvloop'], 1.0)} < 1.0x", kb["vs_uvloop"] < 1.0),
                            (f"CPU/req {x(kb['cpu_vs_uvloop'], 0.9)} > 0.9x",
                             kb["cpu_vs_uvloop"] > 0.9)) if bad]
    return "MISSED: " + ", ".join(why) if why else "met"


def tls_table(rows, markdown=False):
    """One line per TLS scenario: each loop's req/s and server CPU per request (ratio to
    uvloop in brackets), and whether kbloop meets issue 15's target there.  Empty without
    TLS rows."""
    rows = [r for r in rows if r["group"] in ("tls", "https")]
    if not rows:
        return ""
    loops = list(dict.fromkeys(r["loop"] for r in rows))
    by = {(r["scenario"], r["loop"]): r for r in rows}
    head = ["scenario"]
    for loop in loops:
        head += [f"{loop} req/s", f"{loop} CPU us/req"]
    head.append("kbloop target")
    body = []
    for name in dict.fromkeys(r["scenario"] for r in rows):
        line = [name]
        for loop in loops:
            r = by.get((name, loop))
            if r is None:
                line += ["-", "-"]
                continue
            ratio = (lambda v: "") if loop == "uvloop" else (
                lambda v: "" if v is None else f" ({v:.2f}x)")
            line += [f"{r['rps']:,.0f}{ratio(r['vs_uvloop'])}"
                     + (" GEN-BOUND" if r["gen_bound"] else ""),
                     f"{r['cpu_us_per_req']:.1f}{ratio(r['cpu_vs_uvloop'])}"]
        uv, kb = by.get((name, "uvloop")), by.get((name, "kbloop"))
        line.append((uv and kb and tls_verdict(uv, kb)) or "not measured")
        body.append(line)
    return _grid(head, body, markdown, left={0, len(head) - 1})


TLS_NOTE = (
    "Ratios (in brackets) are to uvloop's median in the same run: above 1 is better for req/s, "
    "below 1 for CPU per request. kbloop is kbloop's own TLS transport (the default); "
    "kbloop-sslproto is the same loop with KBLOOP_TLS=asyncio, asyncio's sslproto over kbloop's "
    "transports. The closed-loop rows mix cost with how hard each loop is pushed: where a "
    "server uses its whole core, its CPU per request is about 1/(req/s). Each run's TLS "
    "handshakes, one per connection, are in the server's CPU (echo_load_tls makes them before "
    "its clock starts, wrk inside its run).")


# ---------------------------------------------------------------- targets

def check_targets(rows):
    """The issue's targets for kbloop vs uvloop: [(target, verdict, detail lines)].

    verdict is "met", "MISSED" or "not measured"."""
    by = {(r["scenario"], r["loop"]): r for r in rows}
    pairs = [(by[(r["scenario"], "uvloop")], r) for r in rows
             if r["loop"] == "kbloop" and (r["scenario"], "uvloop") in by]

    def line(uv, kb, what, cpu=False):
        bound = [r["loop"] for r in (uv, kb) if r["gen_bound"]]
        flags = f" (generator-bound: {' and '.join(bound)} run{'s' * (len(bound) > 1)})" if bound else ""
        key = "cpu_spread_pct" if cpu else "spread_pct"
        noise = max(uv.get(key, 0), kb.get(key, 0))
        return (f"{kb['scenario']}: {what}; {'CPU/req' if cpu else 'req/s'} spread of the runs "
                f"up to {noise:.0f}%{flags}")

    results = []

    def verdict(checked, failed):
        return "not measured" if not checked else ("MISSED" if failed else "met")

    # 1. CPU per request at the same offered load, 64 B and 1 KiB, 32 connections.
    sel = [(uv, kb) for uv, kb in pairs if kb["group"] == "open" and kb["conns"] == 32
           and kb["msg_size"] in (64, 1024) and kb["cpu_vs_uvloop"] is not None]
    failed = [p for p in sel if p[1]["cpu_vs_uvloop"] > 0.9]
    results.append((
        "server CPU per request <= 0.9x uvloop at 64 B and 1 KiB, 32 connections (same offered load)",
        verdict(sel, failed),
        [line(uv, kb, f"kbloop {kb['cpu_us_per_req']:.1f} vs uvloop {uv['cpu_us_per_req']:.1f} "
                      f"us/req = {kb['cpu_vs_uvloop']:.2f}x", cpu=True) for uv, kb in sel]))

    # 2. Never below uvloop's requests/s, any size and concurrency (closed-loop echo).
    sel = [(uv, kb) for uv, kb in pairs if kb["group"] == "echo"]
    failed = [(uv, kb) for uv, kb in sel if kb["vs_uvloop"] < 1.0]
    results.append((
        "requests/s never below uvloop's at any echo size/concurrency",
        verdict(sel, failed),
        [f"{len(sel) - len(failed)} of {len(sel)} echo scenarios at or above uvloop"]
        + [line(uv, kb, f"{kb['vs_uvloop']:.2f}x uvloop") for uv, kb in failed]))

    # 3. 64 B, 32-128 connections: >= 1.15x uvloop where the server is the bottleneck.
    sel = [(uv, kb) for uv, kb in pairs if kb["group"] == "echo" and kb["msg_size"] == 64
           and kb["conns"] >= 32]
    server_bound = [p for p in sel if not (p[0]["gen_bound"] or p[1]["gen_bound"])]
    failed = [p for p in server_bound if p[1]["vs_uvloop"] < 1.15]
    results.append((
        "64 B echo with 32-128 connections: >= 1.15x uvloop's requests/s (server-bound runs)",
        verdict(server_bound, failed),
        [line(uv, kb, f"{kb['vs_uvloop']:.2f}x uvloop"
              + ("" if (uv, kb) in server_bound else ", excluded: generator-bound")
              + (" MISSED" if (uv, kb) in failed else "")) for uv, kb in sel]))

    # 4. HTTP (httptools, wrk -c 64): >= uvloop's requests/s at lower CPU per request.
    sel = [(uv, kb) for uv, kb in pairs if kb["scenario"] == "http httptools c64"
           and kb["cpu_vs_uvloop"] is not None]
    failed = [p for p in sel if p[1]["vs_uvloop"] < 1.0 or p[1]["cpu_vs_uvloop"] >= 1.0]
    results.append((
        "HTTP (httptools, wrk -c 64): >= uvloop's requests/s at lower server CPU per request",
        verdict(sel, failed),
        [line(uv, kb, f"{kb['vs_uvloop']:.2f}x uvloop's requests/s, "
                      f"{kb['cpu_vs_uvloop']:.2f}x its CPU per request") for uv, kb in sel]))

    # 5. Issue 5, reactor modes: busy-poll (pinned) p50 round trip at c1 <= 0.8x uvloop's.
    # Only in runs with the busy-poll loop (python -m bench --modes).
    busy = [r for r in rows if r["loop"] == "kbloop-busy"]
    if busy:
        sel = [(by[(r["scenario"], "uvloop")], r) for r in busy
               if r["group"] == "echo" and r["conns"] == 1 and (r["scenario"], "uvloop") in by
               and r["p50_vs_uvloop"] is not None]
        failed = [p for p in sel if p[1]["p50_vs_uvloop"] > 0.8]
        results.append((
            "busy-poll p50 <= 0.8x uvloop (round trip at 1 connection, kbloop-busy)",
            verdict(sel, failed),
            [f"{kb['scenario']}: kbloop-busy p50 {kb['p50_us']:.0f} vs uvloop {uv['p50_us']:.0f} us "
             f"= {kb['p50_vs_uvloop']:.2f}x" + (" MISSED" if (uv, kb) in failed else "")
             for uv, kb in sel]))
    # 6. Issue 6, the DPDK datapath over memif: server CPU per request <= 0.5x uvloop's over
    # loopback at 1 KiB, 32 connections.  Only in runs with kbloop-memif (python -m bench --dpdk).
    # The reference is the Protocol echo server (uvloop's 7.4 us per request there).
    memif = [r for r in rows if r["loop"] == "kbloop-memif" and r["group"] == "echo"
             and r["server"] == "proto" and r["msg_size"] == 1024 and r["conns"] == 32
             and (r["scenario"], "uvloop") in by and r["cpu_vs_uvloop"] is not None]
    if memif:
        sel = [(by[(r["scenario"], "uvloop")], r) for r in memif]
        failed = [p for p in sel if p[1]["cpu_vs_uvloop"] > 0.5]
        results.append((
            "DPDK over memif: server CPU per request <= 0.5x uvloop's over loopback "
            "(Protocol echo, 1 KiB, 32 connections)",
            verdict(sel, failed),
            [f"{kb['scenario']}: kbloop-memif {kb['cpu_us_per_req']:.2f} vs uvloop "
             f"{uv['cpu_us_per_req']:.2f} us/req = {kb['cpu_vs_uvloop']:.2f}x, at "
             f"{kb['vs_uvloop']:.2f}x its req/s" + (" MISSED" if (uv, kb) in failed else "")
             for uv, kb in sel]))
    # 7. Issue 15, TLS: kbloop >= uvloop's requests/s at <= 0.9x its CPU per request, in every
    # TLS echo and HTTPS scenario.  Only in runs with TLS scenarios (python -m bench --tls).
    sel = [(uv, kb) for uv, kb in pairs if kb["group"] in ("tls", "https")]
    if sel:
        checked = [(uv, kb, tls_verdict(uv, kb)) for uv, kb in sel]
        checked = [c for c in checked if c[2]]
        failed = [c for c in checked if c[2] != "met"]
        results.append((
            TLS_TARGET, verdict(checked, failed),
            [f"{kb['scenario']}: {kb['vs_uvloop']:.2f}x uvloop's req/s, "
             f"{kb['cpu_vs_uvloop']:.2f}x its CPU per request: {v}"
             + (" (generator-bound)" if uv["gen_bound"] or kb["gen_bound"] else "")
             for uv, kb, v in checked]))
    return results


def targets_text(results, bullet="  "):
    out = []
    for target, verdict, details in results:
        out.append(f"{bullet}[{verdict}] {target}")
        out.extend(f"{bullet}    {d}" for d in details)
    return "\n".join(out)


# ---------------------------------------------------------------- plots

LOOP_COLORS = {"asyncio": "#7f7f7f", "uvloop": "#1f77b4", "kbloop": "#d62728",
               "kbloop-busy": "#ff7f0e", "kbloop-sqpoll": "#2ca02c",
               "uvloop-veth": "#17becf", "kbloop-veth": "#e377c2", "kbloop-dpdk": "#9467bd",
               "kbloop-memif": "#8c564b", "kbloop-sslproto": "#bcbd22"}


def plot_all(rows, loops, stem):
    """Write stem-throughput.png, stem-latency.png, stem-cpu.png; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    paths = []
    color = lambda loop: LOOP_COLORS.get(loop)
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2x10^1, on log axes

    def grouped_bars(ax, labels, series, horizontal=False, log=False):
        """series: {loop: [value per label]}; one group of bars per label."""
        width = 0.8 / max(1, len(series))
        for i, (loop, values) in enumerate(series.items()):
            pos = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
            vals = [v or 0 for v in values]
            if horizontal:
                ax.barh(pos, vals, height=width, label=loop, color=color(loop))
            else:
                ax.bar(pos, vals, width=width, label=loop, color=color(loop))
        if horizontal:
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.invert_yaxis()
            if log:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(plain)
                ax.xaxis.set_minor_formatter(plain)
                ax.tick_params(axis="x", which="both", labelsize=7)
        else:
            ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20, ha="right")
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)

    def series_for(names, key):
        return {loop: [next((r[key] for r in rows if r["scenario"] == n and r["loop"] == loop),
                            None) for n in names] for loop in loops}

    # Throughput: echo req/s by concurrency, one panel per (server, size) measured;
    # HTTP and Redis as bars in a bottom row.
    # A TLS echo server is its own panel ("tls proto").
    echo = [{**r, "server": f"tls {r['server']}" if r["group"] == "tls" else r["server"]}
            for r in rows if r["group"] in ("echo", "tls")]
    panels = {}  # server -> sizes measured
    for r in echo:
        panels.setdefault(r["server"], [])
        if r["msg_size"] not in panels[r["server"]]:
            panels[r["server"]].append(r["msg_size"])
    other = list(dict.fromkeys(r["scenario"] for r in rows if r["kind"] in ("http", "redis")))
    nrows = len(panels) + (1 if other else 0)
    if nrows:
        ncols = max([len(v) for v in panels.values()] + [1])
        fig = plt.figure(figsize=(3.6 * max(ncols, 2), 3.0 * nrows), constrained_layout=True)
        grid = fig.add_gridspec(nrows, ncols)
        for i, (server, sizes) in enumerate(panels.items()):
            for j, size in enumerate(sorted(sizes)):
                ax = fig.add_subplot(grid[i, j])
                conns = sorted({r["conns"] for r in echo
                                if r["server"] == server and r["msg_size"] == size})
                for loop in loops:
                    pts = sorted((r["conns"], r["rps"], r["gen_bound"]) for r in echo
                                 if r["server"] == server and r["msg_size"] == size
                                 and r["loop"] == loop)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                                color=color(loop), label=loop)
                        bound = [p for p in pts if p[2]]
                        ax.plot([p[0] for p in bound], [p[1] for p in bound], "kx", ms=9)
                ax.set_xscale("log")
                ax.set_xticks(conns, [str(c) for c in conns])
                ax.minorticks_off()
                ax.set_title(f"echo {server}, {size:,} B", fontsize=9)
                ax.set_xlabel("connections", fontsize=8)
                ax.set_ylabel("req/s", fontsize=8)
                ax.set_ylim(bottom=0)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        if other:
            ax = fig.add_subplot(grid[-1, :])
            grouped_bars(ax, other, series_for(other, "rps"))
            ax.set_ylabel("req/s", fontsize=8)
            ax.set_title("HTTP(S) and Redis", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Throughput (median req/s; x = generator-bound)", fontsize=10)
        paths.append(f"{stem}-throughput.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # Latency percentiles: c1 echo (round trip at concurrency 1) and open-loop runs.
    lat = list(dict.fromkeys(r["scenario"] for r in rows
                             if (r["group"] in ("echo", "tls") and r["conns"] == 1)
                             or r["group"] == "open"))
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(2.8 * len(lat) + 1, 3.4),
                                 squeeze=False, constrained_layout=True)
        for ax, name in zip(axes[0], lat):
            pcts = ["p50_us", "p99_us", "p999_us"]
            series = {loop: [next((r[p] for r in rows if r["scenario"] == name
                                   and r["loop"] == loop), None) for p in pcts] for loop in loops}
            grouped_bars(ax, ["p50", "p99", "p99.9"], series, log=True)
            ax.set_title(name, fontsize=8)
            ax.set_ylabel("us", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Latency percentiles (median over rounds; open loop: from intended send time)",
                     fontsize=9)
        paths.append(f"{stem}-latency.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # Server CPU per request, every scenario.
    names = list(dict.fromkeys(r["scenario"] for r in rows))
    if names:
        fig, ax = plt.subplots(figsize=(8, 1 + 0.12 * len(names) * len(loops)),
                               constrained_layout=True)
        grouped_bars(ax, names, series_for(names, "cpu_us_per_req"), horizontal=True, log=True)
        ax.set_xlabel("server CPU us per request (log scale; lower is better)", fontsize=8)
        ax.grid(axis="x", alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax.set_title("Server CPU per request", fontsize=10)
        paths.append(f"{stem}-cpu.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------- markdown report

def markdown_report(rows, meta, targets, plots):
    m, v = meta["machine"], meta["machine"]["versions"]
    lines = [
        f"# kbloop benchmark: {meta['mode']} mode, {meta['date']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {m['nproc']} vCPU, {m['cpu_model']}, Linux {m['kernel']}, {m['os']}  ",
        f"Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "  ",
        f"Method: {meta['rounds']} measured rounds x {meta['seconds']:g} s per run (+{meta['warmup_s']:g} s "
        f"warm-up load per run, +{meta['warmup_rounds']} warm-up round), loops interleaved, "
        f"server on CPU {m['server_cpu']}, load generator on CPU {m['load_cpu']}; medians. "
        "See [bench/README.md](../README.md).",
        "",
        f"Duration: {meta['duration_s'] / 60:.1f} min.",
    ]
    if meta.get("warnings"):
        lines += [""] + [f"**Warning:** {w}" for w in meta["warnings"]]
    lines += ["", "## Targets (kbloop vs uvloop, same run)", "", "```",
              targets_text(targets, bullet=""), "```", ""]
    if meta["mode"] != "tls":   # PROFILE.md profiles the plain scenarios
        lines += ["Where kbloop misses a target, [PROFILE.md](PROFILE.md) has a profile of the "
                  "kbloop server in that scenario and where its time goes.", ""]
    tls = tls_table(rows, markdown=True)
    if tls:
        lines += ["## TLS vs uvloop", "", tls, "", TLS_NOTE, ""]
    modes = modes_table(rows, markdown=True)
    if modes and meta["mode"] == "dpdk":
        lines += ["## The DPDK datapath vs uvloop", "", modes, "", DPDK_NOTE, ""]
    elif modes:
        lines += ["## Reactor modes vs uvloop", "", modes, "", MODES_NOTE, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Results", "",
              "req/s, latency and CPU are medians over rounds; spread = (max-min)/median req/s; "
              "CPU us/req = server user+system CPU over the measured run / requests; "
              "server CPU and gen CPU = share of one core used by the server and by the load "
              f"generator (GEN-BOUND: generator >= {GEN_BOUND_PCT}%, so the server may not be "
              "the limit); ratios compare median req/s. wrk reports no p99.9.", ""]
    for group, title in GROUPS.items():
        sel = [r for r in rows if r["group"] == group]
        if sel:
            lines += [f"### {title}", "", markdown_table(sel), ""]
            if group == "redis":
                lines += ["Per command, median req/s:", "", redis_commands_markdown(sel), ""]
    return "\n".join(lines)
