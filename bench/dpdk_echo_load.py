"""Echo load from a DPDK stack of its own, for servers reachable only through DPDK (net_memif:
no kernel in the path).  The generator loop is C on lwIP (kbloop_ext/dpdk/kb_echo_load.c);
this script starts the stack and prints one JSON line with the fields bench/echo_load.c prints.

    python bench/dpdk_echo_load.py --vdev net_memif0,role=client,socket=/tmp/m.sock \\
        --ip 10.201.0.2 -H 10.201.0.1 -p 7000 -c 32 -s 1024 -d 2 -w 0.5
"""
import argparse
import json
import os
import resource
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vdev", required=True)
    p.add_argument("--ip", required=True, help="this generator's stack address")
    p.add_argument("--cpu", type=int, default=None, help="pin the generator to this CPU")
    p.add_argument("-H", dest="host", required=True)
    p.add_argument("-p", dest="port", type=int, required=True)
    p.add_argument("-c", dest="conns", type=int, default=1)
    p.add_argument("-s", dest="size", type=int, default=1024)
    p.add_argument("-d", dest="seconds", type=float, default=3.0)
    p.add_argument("-w", dest="warmup", type=float, default=0.5)
    p.add_argument("--linger", action="store_true",
                   help="after the JSON line, keep the link up until stdin closes (see below)")
    a = p.parse_args()
    from kbloop_ext.dpdk.stack import Stack
    cpu = a.cpu if a.cpu is not None else min(os.sched_getaffinity(0))
    eal = ["--no-huge", "-m", "256", "--no-pci", "-l", str(cpu), "--log-level", "lib.*:error",
           "--file-prefix", f"kbload{os.getpid()}", "--vdev", a.vdev]
    with Stack(eal, ip=a.ip) as stack:
        # The memif link comes up once both sides are there: wait until a connection goes.
        deadline = time.monotonic() + 20
        while True:
            probe = stack.echo_load(a.host, a.port, 1, 1, 0.05, 0)
            if probe["requests"] > 0 or time.monotonic() > deadline:
                break
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        res = stack.echo_load(a.host, a.port, a.conns, a.size, a.seconds, a.warmup)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        print(json.dumps({
            "mode": "closed", "requests": res["requests"], "rps": round(res["rps"], 1),
            "p50_us": round(res["p50_us"], 1), "p90_us": round(res["p90_us"], 1),
            "p99_us": round(res["p99_us"], 1), "errors": res["errors"],
            # the generator busy-polls: it always uses its whole core
            "gen_cpu_pct": round(100 * cpu_s / (a.seconds + a.warmup), 1),
            "connections": a.conns, "msg_size": a.size, "elapsed_s": round(res["seconds"], 3),
        }), flush=True)
        if a.linger:
            # DPDK 22.11's memif frees a departed peer's shared memory from its interrupt
            # thread while the data path may be in a burst (docs/dpdk.md, known problems): a
            # server that busy-polls can crash when its peer leaves first.  So the generator
            # stays connected, idle, until the bench has stopped the server.
            sys.stdin.read()
    return 0 if res["errors"] == 0 and res["requests"] > 0 else 3


if __name__ == "__main__":
    sys.exit(main())
