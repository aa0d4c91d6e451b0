"""The DPDK side of the DPDK foundation tests: run in a network namespace, on kbloop's DPDK
device layer (kbloop_ext.dpdk.stack), one process per stack (the EAL is process-global).

    python tests/dpdk_stack_peer.py echo   --vdev V --ip A --port P
    python tests/dpdk_stack_peer.py client --vdev V --ip A --connect B:P --bytes N

It prints "READY <mac>" once the port is up, "NOW <json>" (its counters) on SIGUSR1;
SIGTERM ends it.  --faults loss=PCT,delay_us=N,reorder=PCT injects faults in both directions.  Before exiting it prints
"STATS <json>" (the stack's counters after its connections are gone) and, after closing the
stack, "CLOSED <json>" (whether the EAL's runtime directory is gone).
"""

import argparse
import ctypes
import hashlib
import json
import os
import signal
import sys
import time

from kbloop_ext.dpdk.stack import Stack, StackError

stop = False


def on_term(*_):
    global stop
    stop = True


class Conn:
    """Writes queued beyond lwIP's send buffer, flushed as acknowledgements free it."""

    def __init__(self, tcp, half_close=False):
        self.tcp, self.out, self.received = tcp, bytearray(), 0
        self.eof = self.done = False     # eof: end once out is sent; done: FIN sent
        self.half_close = half_close     # FIN but keep receiving (client) or close (server)
        self.digest = hashlib.sha256()

    def send(self, data):
        self.out += data
        self.pump()

    def pump(self):
        while self.out:
            n = self.tcp.write(self.out[:1 << 16])
            if n == 0:
                break
            del self.out[:n]
        if self.eof and not self.out and not self.done:
            self.done = True
            if self.half_close:
                self.tcp.shutdown_write()
            else:
                self.tcp.close()
                return True
        self.tcp.output()
        return False


def eal_args(args):
    return ["--no-huge", "-m", "256", "--no-pci", "-l", "0", "--log-level", "lib.*:error",
            "--file-prefix", f"kbtest{os.getpid()}", "--vdev", args.vdev]


def settle(stack, seconds):
    """Poll until lwIP has finished the closes it started (a FIN may need a retransmission
    when the virtual device dropped a frame), or until `seconds` have passed: a pcb or segment
    still counted then is a leak, and the tests say so.  TIME_WAIT pcbs (after an active
    close) are freed by lwIP's timer after 2 MSL, as the kernel's are."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        stack.poll()
        st = stack.stats()
        if st["tcp_active"] == 0 and st["tcp_segs_used"] == 0 and st["fault_held"] == 0:
            break


def run_echo(stack, args):
    listener = stack.listen(args.port)
    conns = {}
    print("READY", stack.mac, flush=True)
    while not stop:
        for ev in stack.poll():
            kind, c = ev[0], ev[1]
            if kind == "accept":
                conns[ev[2]] = Conn(ev[2])
                continue
            conn = conns.get(c)
            if conn is None:        # closed earlier in this batch
                continue
            if kind == "error":
                del conns[c]
                continue
            try:
                if kind == "data":
                    conn.out += ev[2]
                elif kind == "eof":
                    conn.eof = True
                done = conn.pump()  # "sent" too: acknowledgements made room
            except StackError:      # reset earlier in this batch: its "error" event follows
                done = True
            if done:
                del conns[c]
    listener.close()
    for conn in conns.values():
        conn.tcp.abort()
    conns.clear()


def run_client(stack, args):
    host, port = args.connect.rsplit(":", 1)
    print("READY", stack.mac, flush=True)
    tcp = stack.connect(host, int(port))
    conn = Conn(tcp, half_close=True)
    payload = os.urandom(args.bytes)
    result = {"sent_sha256": hashlib.sha256(payload).hexdigest()}
    deadline = time.monotonic() + 60
    while not stop and time.monotonic() < deadline:
        for ev in stack.poll():
            kind = ev[0]
            if kind == "connected":
                result["connected"] = ev[2]
                conn.send(payload)
                conn.eof = True    # half-close once everything is written
            elif kind == "sent":
                conn.pump()
            elif kind == "data":
                conn.digest.update(ev[2])
                conn.received += len(ev[2])
            elif kind == "eof":
                result["eof"] = True
            elif kind == "error":
                result["error"] = ev[2]
        if "error" in result or result.get("eof"):
            break
    result.update(received=conn.received, received_sha256=conn.digest.hexdigest())
    print("RESULT", json.dumps(result), flush=True)
    # Once lwIP has finished the close, stop polling: the other side may then leave first
    # without meeting DPDK 22.11 memif's teardown race on this side (docs/dpdk.md).
    settle(stack, 10)
    print("IDLE", flush=True)
    while not stop:
        time.sleep(0.02)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["echo", "client"])
    ap.add_argument("--vdev", required=True)
    ap.add_argument("--ip", required=True)
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--connect")
    ap.add_argument("--bytes", type=int, default=1 << 20)
    ap.add_argument("--faults", default="", help="loss=PCT,delay_us=N,reorder=PCT")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    # If the test process dies, this busy-polling peer must not outlive it.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    try:
        stack = Stack(eal_args(args), ip=args.ip)
    except StackError as exc:
        print("STACKERROR", exc, flush=True)
        sys.exit(3)
    if args.faults:
        stack.set_faults(**{k: v if k == "directions" else int(v) if k == "delay_us" else float(v)
                            for k, v in (kv.split("=") for kv in args.faults.split(","))})
    signal.signal(signal.SIGUSR1, lambda *_: print("NOW", json.dumps(stack.stats()), flush=True))
    stack.flush()    # the gratuitous ARP lwIP queued at start-up: not an mbuf in use
    print("START", json.dumps(stack.stats()), flush=True)
    (run_echo if args.mode == "echo" else run_client)(stack, args)
    settle(stack, 10)
    print("STATS", json.dumps(stack.stats()), flush=True)
    runtime_dir = stack.runtime_dir
    stack.close()
    print("CLOSED", json.dumps({"runtime_dir": runtime_dir,
                                "runtime_dir_left": os.path.exists(runtime_dir)}), flush=True)


if __name__ == "__main__":
    main()
