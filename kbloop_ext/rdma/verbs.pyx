# cython: language_level=3
"""kbloop_ext.rdma.verbs: the RDMA datapath's device layer (kb_rdma.c) for Python.

RdmaStack runs byte streams over RC queue pairs (soft-RoCE or a real RNIC), set up with
rdma_cm; poll() returns what happened as event tuples.  The loop's RDMA datapath drives the
same C layer through the function table in _C_API (kb_rdma.h, struct kb_rdma_api); this class
is for tests and tools.  Wire format and rules: docs/rdma.md.
"""

import errno as _errno
import os
import socket
import struct

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.pycapsule cimport PyCapsule_New


cdef extern from "kb_rdma.h" nogil:
    ctypedef struct kb_rdma:
        pass

    ctypedef struct kb_rdma_conn:
        void *owner
        uint64_t id
        int listening

    ctypedef struct kb_rdma_event:
        int kind
        int err
        uint32_t len
        uint32_t buf
        kb_rdma_conn *conn
        kb_rdma_conn *listener
        const void *data

    ctypedef struct kb_rdma_config:
        uint32_t buf_size, recv_depth, send_depth, inline_max
        uint8_t retry_count
        uint32_t timeout_ms

    ctypedef struct kb_rdma_stats:
        uint32_t devices, cqs, pds, qps, mrs, cm_ids, conns, listeners
        uint32_t rx_posted, rx_lent, tx_slots_busy
        uint64_t credits_avail
        uint64_t sends, sends_inline, sends_signalled, credit_msgs_tx, credit_msgs_rx
        uint64_t msgs_tx, msgs_rx, bytes_tx, bytes_rx, credit_waits, recv_posts
        uint64_t rejects, accepts, connects, errors, eproto, wc_errors, cm_events, polls
        uint32_t pool_mrs
        uint64_t ref_frames, probes
        uint32_t fds_gen, cq_entries

    ctypedef struct kb_rdma_conn_stats:
        uint32_t credits, peer_credits, owed, rx_posted, rx_lent, tx_queued, tx_busy
        uint32_t frame_max, inline_max
        int retry_cnt, rnr_retry, timeout
        uint64_t credit_waits, msgs_tx, msgs_rx
        int state

    enum:
        KB_RDMA_EV_ACCEPT, KB_RDMA_EV_CONNECTED, KB_RDMA_EV_RECV, KB_RDMA_EV_EOF,
        KB_RDMA_EV_SENT, KB_RDMA_EV_ERROR, KB_RDMA_EV_CLOSED, KB_RDMA_EV_REJECT

    kb_rdma *kb_rdma_new(const kb_rdma_config *cfg, char *errbuf, size_t errlen)
    void kb_rdma_free(kb_rdma *r)
    int kb_rdma_poll(kb_rdma *r)
    void kb_rdma_flush(kb_rdma *r)
    uint32_t kb_rdma_fds(kb_rdma *r, int *fds, uint32_t max)
    int kb_rdma_arm(kb_rdma *r)
    kb_rdma_event *kb_rdma_events(kb_rdma *r, size_t *count)
    void kb_rdma_events_clear(kb_rdma *r)
    void kb_rdma_get_stats(kb_rdma *r, kb_rdma_stats *st)
    int kb_rdma_conn_get_stats(kb_rdma_conn *c, kb_rdma_conn_stats *st)
    kb_rdma_conn *kb_rdma_listen(kb_rdma *r, uint32_t ip, uint16_t port, int backlog, int *err)
    kb_rdma_conn *kb_rdma_connect(kb_rdma *r, uint32_t ip, uint16_t port, int *err)
    long kb_rdma_write(kb_rdma_conn *c, const void *data, size_t len)
    size_t kb_rdma_write_room(kb_rdma_conn *c)
    int kb_rdma_write_eof(kb_rdma_conn *c)
    void kb_rdma_recv_done(kb_rdma_conn *c, uint32_t buf)
    void kb_rdma_close(kb_rdma_conn *c)
    void kb_rdma_abort(kb_rdma_conn *c)
    void kb_rdma_release(kb_rdma_conn *c)
    int kb_rdma_addrs(kb_rdma_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip,
                      uint16_t *rport)
    kb_rdma_conn *kb_rdma_test_connect_raw(kb_rdma *r, uint32_t ip, uint16_t port,
                                           const void *private_data, uint8_t len, int *err)
    int kb_rdma_test_send_frame(kb_rdma_conn *c, uint32_t length_field, uint16_t flags,
                                const void *payload, uint32_t n, int force)

    ctypedef struct kb_rdma_api:
        pass
    const kb_rdma_api kb_rdma_api_table
    const char *KB_RDMA_API_CAPSULE


# The C function table for the loop's RDMA datapath (kb_rdma.h, struct kb_rdma_api).
_C_API = PyCapsule_New(<void *>&kb_rdma_api_table, KB_RDMA_API_CAPSULE, NULL)

# Reject reasons (the peer's, in ("error", conn, ECONNREFUSED, reason); ours in ("reject", ...)).
REJ_BAD_MAGIC, REJ_BAD_VERSION, REJ_BAD_PARAMS, REJ_NO_RESOURCES = 1, 2, 3, 4
# Frame flags (docs/rdma.md), for test_send_frame.
F_EOF, F_CREDIT = 1, 2


class RdmaError(OSError):
    pass


cdef _oserror(int err, str what):
    err = -err if err < 0 else err
    return RdmaError(err, f"{what}: {os.strerror(err)}")


cdef uint32_t ip4(str address) except? 0:
    """A dotted IPv4 address in network byte order, as it lies in memory."""
    return struct.unpack("=I", socket.inet_aton(address))[0]


cdef str ip4_str(uint32_t address):
    return socket.inet_ntoa(struct.pack("=I", address))


cdef class RdmaStack


cdef class RdmaConn:
    """A connection or listener of an RdmaStack.  With `hold` set, the receive buffers behind
    delivered data stay lent (the peer runs out of credits) until recv_done()."""
    cdef kb_rdma_conn *c
    cdef readonly RdmaStack stack
    cdef readonly bint listening
    cdef public bint hold
    cdef list held
    cdef readonly int error            # the errno of an ("error", ...) event, else 0

    @staticmethod
    cdef RdmaConn wrap(RdmaStack stack, kb_rdma_conn *c):
        cdef RdmaConn conn = RdmaConn.__new__(RdmaConn)
        conn.c = c
        conn.stack = stack
        conn.listening = c.listening
        conn.held = []
        c.owner = <void *>conn
        stack.live.add(conn)
        return conn

    cdef kb_rdma_conn *alive(self) except NULL:
        if self.c is NULL:
            raise RdmaError(_errno.EBADF, "the connection is released")
        return self.c

    def write(self, data):
        """Copy as much of data into send slots as they take; returns the bytes taken."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        if view.shape[0] == 0:
            return 0
        cdef long n = kb_rdma_write(self.alive(), &view[0], view.shape[0])
        if n < 0:
            raise _oserror(n, "write")
        return n

    @property
    def write_room(self):
        return kb_rdma_write_room(self.alive())

    def write_eof(self):
        cdef int err = kb_rdma_write_eof(self.alive())
        if err:
            raise _oserror(err, "write_eof")

    @property
    def held_count(self):
        return len(self.held)

    def recv_done(self, n=None):
        """Give back the first n held receive buffers (all by default); returns how many."""
        cdef kb_rdma_conn *c = self.alive()
        count = len(self.held) if n is None else min(n, len(self.held))
        for buf in self.held[:count]:
            kb_rdma_recv_done(c, buf)
        del self.held[:count]
        return count

    cdef void _release(self, bint abort):
        if self.c is NULL:
            return
        for buf in self.held:
            kb_rdma_recv_done(self.c, buf)
        self.held.clear()
        if abort:
            kb_rdma_abort(self.c)
        else:
            kb_rdma_close(self.c)
        kb_rdma_release(self.c)
        self.c = NULL
        self.stack.live.discard(self)

    def close(self):
        """Graceful (EOF, then disconnect once the peer has it all); released."""
        self._release(False)

    def abort(self):
        """Disconnect at once (the peer sees ECONNRESET); released."""
        self._release(True)

    def stats(self):
        cdef kb_rdma_conn_stats st
        kb_rdma_conn_get_stats(self.alive(), &st)
        return st

    def addresses(self):
        cdef uint32_t lip, rip
        cdef uint16_t lport, rport
        cdef int err = kb_rdma_addrs(self.alive(), &lip, &lport, &rip, &rport)
        if err:
            raise _oserror(err, "addresses")
        return (ip4_str(lip), lport), None if self.listening else (ip4_str(rip), rport)

    @property
    def id(self):
        return self.alive().id

    def __repr__(self):
        return f"<RdmaConn {'listener ' if self.listening else ''}" \
               f"{'released' if self.c is NULL else self.c.id}>"


cdef class RdmaStack:
    """An RDMA stack: one rdma_cm event channel, a PD/CQ per device, and its connections."""
    cdef kb_rdma *r
    cdef set live

    def __cinit__(self, *, unsigned int buf_size=8192, unsigned int recv_depth=32,
                  unsigned int send_depth=32, unsigned int inline_max=256,
                  unsigned int retry_count=6, unsigned int timeout_ms=2000):
        cdef kb_rdma_config cfg
        cdef char errbuf[256]
        if retry_count > 6:
            raise ValueError("retry_count 7 means 'for ever' to rxe: at most 6")
        cfg.buf_size = buf_size
        cfg.recv_depth = recv_depth
        cfg.send_depth = send_depth
        cfg.inline_max = inline_max
        cfg.retry_count = retry_count
        cfg.timeout_ms = timeout_ms
        self.live = set()
        self.r = kb_rdma_new(&cfg, errbuf, sizeof(errbuf))
        if self.r is NULL:
            raise RdmaError(errbuf.decode(errors="replace"))

    def __dealloc__(self):
        if self.r is not NULL:
            kb_rdma_free(self.r)
            self.r = NULL

    def close(self):
        """Destroys every connection and device resource."""
        if self.r is NULL:
            return
        for conn in self.live:
            (<RdmaConn>conn).c = NULL
        self.live.clear()
        kb_rdma_free(self.r)
        self.r = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef kb_rdma *alive(self) except NULL:
        if self.r is NULL:
            raise RdmaError(_errno.EBADF, "the stack is closed")
        return self.r

    def listen(self, str ip, int port=0, int backlog=128):
        cdef int err = 0
        cdef kb_rdma_conn *c = kb_rdma_listen(self.alive(), ip4(ip), port, backlog, &err)
        if c is NULL:
            raise _oserror(err, f"listen on {ip}:{port}")
        return RdmaConn.wrap(self, c)

    def connect(self, str ip, int port):
        """Starts connecting; ("connected", conn) or ("error", conn, errno, reason) follows."""
        cdef int err = 0
        cdef kb_rdma_conn *c = kb_rdma_connect(self.alive(), ip4(ip), port, &err)
        if c is NULL:
            raise _oserror(err, f"connect to {ip}:{port}")
        return RdmaConn.wrap(self, c)

    def test_connect_raw(self, str ip, int port, bytes private_data):
        """connect() that sends private_data instead of the hello (tests of the checks)."""
        cdef int err = 0
        cdef kb_rdma_conn *c = kb_rdma_test_connect_raw(
            self.alive(), ip4(ip), port, PyBytes_AS_STRING(private_data),
            min(len(private_data), 56), &err)
        if c is NULL:
            raise _oserror(err, f"connect to {ip}:{port}")
        return RdmaConn.wrap(self, c)

    def test_send_frame(self, RdmaConn conn, uint32_t length_field, int flags=0,
                        bytes payload=b"", bint force=False):
        """Send one frame whose header claims length_field (tests of the peer's checks);
        force: even without a credit."""
        cdef int err = kb_rdma_test_send_frame(conn.alive(), length_field, flags,
                                               PyBytes_AS_STRING(payload), len(payload), force)
        if err:
            raise _oserror(err, "test_send_frame")

    def poll(self):
        """One step; returns the events as tuples: ("accept", listener, conn),
        ("connected", conn), ("data", conn, bytes), ("eof", conn), ("sent", conn, nbytes),
        ("error", conn, errno, reject_reason), ("closed", conn), ("reject", listener, reason)."""
        kb_rdma_poll(self.alive())
        return self.drain()

    cdef list drain(self):
        cdef size_t count = 0, i
        cdef kb_rdma_event *events = kb_rdma_events(self.r, &count)
        cdef kb_rdma_event *e
        cdef list out = []
        cdef RdmaConn conn
        for i in range(count):
            e = &events[i]
            if e.kind == KB_RDMA_EV_ACCEPT:
                if e.listener.owner is NULL:
                    continue        # its listener is released: events_clear drops it
                out.append(("accept", <RdmaConn>e.listener.owner, RdmaConn.wrap(self, e.conn)))
                continue
            if e.kind == KB_RDMA_EV_REJECT:
                if e.listener.owner is not NULL:
                    out.append(("reject", <RdmaConn>e.listener.owner, e.err))
                continue
            if e.conn.owner is NULL:
                continue
            conn = <RdmaConn>e.conn.owner
            if e.kind == KB_RDMA_EV_RECV:
                out.append(("data", conn, PyBytes_FromStringAndSize(<const char *>e.data, e.len)))
                if conn.hold:
                    conn.held.append(e.buf)
                    e.data = NULL           # ours now; otherwise events_clear gives it back
            elif e.kind == KB_RDMA_EV_SENT:
                out.append(("sent", conn, e.len))
            elif e.kind == KB_RDMA_EV_EOF:
                out.append(("eof", conn))
            elif e.kind == KB_RDMA_EV_CONNECTED:
                out.append(("connected", conn))
            elif e.kind == KB_RDMA_EV_ERROR:
                conn.error = e.err
                out.append(("error", conn, e.err, e.len))
            elif e.kind == KB_RDMA_EV_CLOSED:
                out.append(("closed", conn))
        kb_rdma_events_clear(self.r)
        return out

    def flush(self):
        kb_rdma_flush(self.alive())

    def fds(self):
        """The fds to sleep on: the rdma_cm channel's, then each device's completion channel."""
        cdef int fds[16]
        cdef uint32_t n = kb_rdma_fds(self.alive(), fds, 16)
        return [fds[i] for i in range(n)]

    def arm(self):
        """Before sleeping on fds(): re-arm the CQs.  True: poll, then arm again, before
        sleeping (a CQ had to be armed, or completions were left); False: sleep."""
        return bool(kb_rdma_arm(self.alive()))

    def stats(self):
        cdef kb_rdma_stats st
        kb_rdma_get_stats(self.alive(), &st)
        return st
