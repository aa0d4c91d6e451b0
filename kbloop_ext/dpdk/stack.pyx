# cython: language_level=3
"""kbloop_ext.dpdk.stack: the DPDK port and lwIP TCP/IP stack of the DPDK datapath.

The C side (kb_dpdk.c) runs the EAL, the port's queues and lwIP; lwIP's callbacks become
events that Stack.poll() returns after each step.  This is the device layer that the DPDK
datapath of the loop drives; it is usable on its own (tests, tools).  One Stack per process:
DPDK's EAL and lwIP are process-global, and the EAL cannot be started twice.
"""

import os
import shutil
import socket
import struct

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.pycapsule cimport PyCapsule_New


cdef extern from "kb_dpdk.h" nogil:
    struct pbuf:
        pass

    ctypedef struct kb_conn:
        void *owner
        uint64_t id
        int listening

    ctypedef struct kb_event:
        int kind
        int err
        uint32_t len
        kb_conn *conn
        kb_conn *listener
        pbuf *p

    ctypedef struct kb_dpdk_config:
        int argc
        char **argv
        uint16_t port
        uint32_t ip, netmask, gateway
        uint32_t nb_mbufs
        uint16_t nb_rx_desc, nb_tx_desc

    ctypedef struct kb_dpdk_stats:
        uint64_t rx_packets, tx_packets, tx_dropped, rx_bytes, tx_bytes, polls
        uint32_t mbufs_total, mbufs_in_use, conns_live
        uint32_t tcp_pcbs_used, tcp_segs_used, pbufs_used, heap_used, lwip_errors
        uint32_t tcp_active, tcp_time_wait, tcp_syn_rcvd, tcp_established
        uint32_t tcp_fin_wait, tcp_close_wait, tcp_last_ack
        uint64_t fault_dropped, fault_delayed, fault_reordered
        uint32_t fault_held
        uint32_t tcp_drop, tcp_chkerr, tcp_proterr, tcp_memerr, ip_drop, link_drop
        uint64_t tx_zc_bytes
        uint32_t tx_zc_inflight
        int zc_tx
        uint64_t tcp_fast_rexmits, tcp_partial_acks, tcp_rto_rexmits
        uint64_t rx_copied
        uint32_t mbufs_reserve

    enum:
        KB_EV_ACCEPT, KB_EV_CONNECTED, KB_EV_RECV, KB_EV_EOF, KB_EV_SENT, KB_EV_ERROR

    int kb_dpdk_start(const kb_dpdk_config *cfg, char *errbuf, size_t errlen)
    void kb_dpdk_stop()
    const uint8_t *kb_dpdk_mac()
    const char *kb_dpdk_runtime_dir()
    int kb_dpdk_poll()
    void kb_dpdk_flush()
    kb_event *kb_dpdk_events(size_t *count)
    void kb_dpdk_events_clear()
    void kb_dpdk_get_stats(kb_dpdk_stats *st)
    void kb_dpdk_set_faults(uint32_t loss_ppm, uint32_t delay_us, uint32_t reorder_ppm,
                            uint64_t seed, int directions)

    kb_conn *kb_tcp_listen(uint32_t ip, uint16_t port, int backlog, int *err)
    kb_conn *kb_tcp_connect(uint32_t ip, uint16_t port, int *err)
    long kb_tcp_write(kb_conn *c, const void *data, size_t len, int flags)
    int kb_tcp_output(kb_conn *c)
    size_t kb_tcp_sndbuf(kb_conn *c)
    void kb_tcp_recved(kb_conn *c, uint32_t len)
    int kb_tcp_shutdown_write(kb_conn *c)
    int kb_tcp_close(kb_conn *c, int linger)
    void kb_tcp_abort(kb_conn *c)
    void kb_conn_release(kb_conn *c)
    int kb_tcp_addrs(kb_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport)

    size_t kb_pbuf_len(pbuf *p)
    size_t kb_pbuf_copy(pbuf *p, void *dst, size_t length)
    void kb_pbuf_free(pbuf *p)
    const char *kb_lwip_strerr(int err)

    ctypedef struct kb_echo_load_result:
        uint64_t requests, errors
        double seconds, rps, p50_us, p90_us, p99_us
    int kb_echo_load(uint32_t ip, uint16_t port, int nconns, size_t size, double seconds,
                     double warmup, kb_echo_load_result *res)

    ctypedef struct kb_dpdk_api:
        pass
    const kb_dpdk_api kb_dpdk_api_table
    const char *KB_DPDK_API_CAPSULE


# The hot-path functions for the loop's DPDK datapath (kb_dpdk.h, struct kb_dpdk_api).
_C_API = PyCapsule_New(<void *>&kb_dpdk_api_table, KB_DPDK_API_CAPSULE, NULL)


# lwIP's err_t values that name a connection's fate.
ERR_MEM, ERR_TIMEOUT, ERR_RTE, ERR_USE, ERR_ISCONN, ERR_CONN = -1, -3, -4, -8, -10, -11
ERR_ABRT, ERR_RST, ERR_CLSD = -13, -14, -15


class StackError(OSError):
    """The DPDK port or lwIP refused an operation."""


def lwip_error(int err, str what):
    return StackError(f"{what}: {kb_lwip_strerr(err).decode()} (lwIP error {err})")


cdef uint32_t ip4(str address) except? 0:
    """A dotted IPv4 address as lwIP stores it (network byte order in memory)."""
    return struct.unpack("=I", socket.inet_aton(address))[0]


cdef str ip4_str(uint32_t address):
    return socket.inet_ntoa(struct.pack("=I", address))


cdef class TcpConn:
    """A TCP connection or listener on the lwIP stack."""
    cdef kb_conn *c
    cdef readonly bint listening

    def __dealloc__(self):
        if self.c is not NULL:
            kb_conn_release(self.c)
            self.c = NULL

    @staticmethod
    cdef TcpConn wrap(kb_conn *c):
        cdef TcpConn conn = TcpConn.__new__(TcpConn)
        conn.c = c
        conn.listening = c.listening
        c.owner = <void *>conn
        return conn

    cdef kb_conn *live(self) except NULL:
        if self.c is NULL:
            raise StackError("the connection is released")
        return self.c

    def write(self, data, bint more=False):
        """Queue as much of data as the send buffer takes; returns the number of bytes taken."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef long n
        if view.shape[0] == 0:
            return 0
        n = kb_tcp_write(self.live(), &view[0], view.shape[0], more)
        if n < 0:
            raise lwip_error(n, "write")
        return n

    def output(self):
        """Send what write() queued now (otherwise at the next poll)."""
        cdef int err = kb_tcp_output(self.live())
        if err != 0:
            raise lwip_error(err, "output")

    @property
    def sndbuf(self):
        return kb_tcp_sndbuf(self.live())

    def shutdown_write(self):
        cdef int err = kb_tcp_shutdown_write(self.live())
        if err != 0:
            raise lwip_error(err, "shutdown")

    def close(self):
        """Graceful close (FIN); the connection is released."""
        if self.c is not NULL:
            kb_tcp_close(self.c, 0)
            kb_conn_release(self.c)
            self.c = NULL

    def abort(self):
        """Close with a RST; the connection is released."""
        if self.c is not NULL:
            kb_tcp_abort(self.c)
            kb_conn_release(self.c)
            self.c = NULL

    def addresses(self):
        """((local ip, port), (remote ip, port)); remote is None for a listener."""
        cdef uint32_t lip, rip
        cdef uint16_t lport, rport
        if kb_tcp_addrs(self.live(), &lip, &lport, &rip, &rport) != 0:
            raise StackError("not connected")
        local = (ip4_str(lip), lport)
        return local, None if self.listening else (ip4_str(rip), rport)


cdef bint _running = False


cdef class Stack:
    """The DPDK port and the lwIP stack of this process.

    eal_args: the EAL's arguments (e.g. ["--no-huge", "-m", "256", "--no-pci", "--file-prefix",
    "kb1", "--vdev", "net_af_packet0,iface=vA", "-l", "0"]); port: the DPDK port id; ip and
    netmask: this stack's IPv4 address; gateway: the next hop for other networks.
    """
    cdef readonly str runtime_dir
    cdef readonly str ip
    cdef bint started

    def __cinit__(self, eal_args, *, int port=0, str ip, str netmask="255.255.255.0",
                  str gateway="0.0.0.0", unsigned int nb_mbufs=0):
        global _running
        if _running:
            raise RuntimeError("one DPDK stack per process: it is already running")
        args = [b"kbloop"] + [os.fsencode(a) for a in eal_args]
        cdef kb_dpdk_config cfg
        cdef char errbuf[512]
        cdef char **argv = <char **>malloc(len(args) * sizeof(char *))
        if argv is NULL:
            raise MemoryError()
        try:
            for i, a in enumerate(args):
                argv[i] = PyBytes_AS_STRING(a)
            cfg.argc = len(args)
            cfg.argv = argv
            cfg.port = port
            cfg.ip = ip4(ip)
            cfg.netmask = ip4(netmask)
            cfg.gateway = ip4(gateway)
            cfg.nb_mbufs = nb_mbufs
            cfg.nb_rx_desc = 0
            cfg.nb_tx_desc = 0
            if kb_dpdk_start(&cfg, errbuf, sizeof(errbuf)) != 0:
                failed_dir = kb_dpdk_runtime_dir().decode()
                if failed_dir:   # the EAL started, then the port failed: leave nothing behind
                    shutil.rmtree(failed_dir, ignore_errors=True)
                raise StackError(errbuf.decode(errors="replace"))
        finally:
            free(argv)
        _running = True
        self.started = True
        self.ip = ip
        self.runtime_dir = kb_dpdk_runtime_dir().decode()

    @property
    def mac(self):
        cdef const uint8_t *m = kb_dpdk_mac()
        return ":".join(f"{m[i]:02x}" for i in range(6))

    def close(self):
        """Abort open connections, stop the port, clean up the EAL and its runtime files."""
        global _running
        if not self.started:
            return
        self.started = False
        kb_dpdk_stop()
        _running = False
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef check(self):
        if not self.started:
            raise StackError("the DPDK stack is closed")

    def listen(self, int port, int backlog=128, str ip="0.0.0.0"):
        self.check()
        cdef int err = 0
        cdef kb_conn *c = kb_tcp_listen(ip4(ip), port, backlog, &err)
        if c is NULL:
            raise lwip_error(err, f"listen on port {port}")
        return TcpConn.wrap(c)

    def connect(self, str ip, int port):
        """Start an active open; a ("connected", conn, err) event completes it."""
        self.check()
        cdef int err = 0
        cdef kb_conn *c = kb_tcp_connect(ip4(ip), port, &err)
        if c is NULL:
            raise lwip_error(err, f"connect to {ip}:{port}")
        return TcpConn.wrap(c)

    def poll(self):
        """One poll step; returns its events as tuples:
        ("accept", listener, conn), ("connected", conn, err), ("data", conn, bytes),
        ("eof", conn), ("sent", conn, nbytes), ("error", conn, err)."""
        self.check()
        kb_dpdk_poll()
        return self.drain()

    def flush(self):
        """Send what lwIP queued since the last poll."""
        self.check()
        kb_dpdk_flush()

    cdef list drain(self):
        cdef size_t count = 0, i
        cdef kb_event *events = kb_dpdk_events(&count)
        cdef kb_event *e
        cdef list out = []
        cdef bytes data
        for i in range(count):
            e = &events[i]
            if e.kind == KB_EV_ACCEPT:
                if e.listener.owner is NULL:
                    continue            # its listener is gone: kb_dpdk_events_clear aborts it
                out.append(("accept", <TcpConn>e.listener.owner, TcpConn.wrap(e.conn)))
                continue
            if e.conn.owner is NULL:    # released: nothing to deliver to
                continue
            conn = <TcpConn>e.conn.owner
            if e.kind == KB_EV_RECV:
                data = PyBytes_FromStringAndSize(NULL, e.len)
                kb_pbuf_copy(e.p, PyBytes_AS_STRING(data), e.len)
                kb_pbuf_free(e.p)
                e.p = NULL
                kb_tcp_recved(e.conn, e.len)
                out.append(("data", conn, data))
            elif e.kind == KB_EV_EOF:
                out.append(("eof", conn))
            elif e.kind == KB_EV_SENT:
                out.append(("sent", conn, e.len))
            elif e.kind == KB_EV_CONNECTED:
                out.append(("connected", conn, e.err))
            elif e.kind == KB_EV_ERROR:
                out.append(("error", conn, e.err))
        kb_dpdk_events_clear()
        return out

    def set_faults(self, loss=0.0, delay_us=0, reorder=0.0, seed=0, directions="both"):
        """Fault injection for tests, netem's model: drop a frame with probability `loss`
        (percent), hold the others for `delay_us`, except `reorder` percent that go at once,
        overtaking the held ones; on received frames ("rx"), sent ones ("tx") or "both".
        All zero: off."""
        dirs = {"rx": 1, "tx": 2, "both": 3}.get(directions)
        if dirs is None or not (0 <= loss <= 100 and 0 <= reorder <= 100 and delay_us >= 0):
            raise ValueError("loss and reorder are percentages, delay_us >= 0, "
                             "directions is rx, tx or both")
        kb_dpdk_set_faults(<uint32_t>(loss * 10000), delay_us, <uint32_t>(reorder * 10000),
                           seed, dirs)

    def echo_load(self, str ip, int port, int conns, size_t size, double seconds,
                  double warmup=0.5):
        """A closed-loop echo load generator on this stack, in C (kb_echo_load.c): returns
        requests, rps, latency percentiles (us) and errors of the measured part."""
        self.check()
        cdef kb_echo_load_result res
        if conns < 1 or size < 1 or seconds <= 0 or warmup < 0:
            raise ValueError("conns and size must be positive, seconds > 0, warmup >= 0")
        if kb_echo_load(ip4(ip), port, conns, size, seconds, warmup, &res) != 0:
            raise MemoryError()
        return res

    def stats(self):
        cdef kb_dpdk_stats st
        kb_dpdk_get_stats(&st)
        return st   # Cython turns the struct into a dict
