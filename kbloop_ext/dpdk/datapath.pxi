# The DPDK datapath: TCP on the lwIP stack of kbloop_ext.dpdk.stack (a DPDK poll-mode driver
# underneath), under the same stream transports as the io_uring datapath (docs/dpdk.md).  What
# it shares with the RDMA datapath (socket stand-ins, delivery, deferred completions) is in
# stack.pxi.
#
# The loop core does not link DPDK or lwIP: it calls the stack module's C functions through
# the table (kb_dpdk_api) that the module exports in a capsule, so the core loads everywhere.
# DPDK's EAL starts once per process, so the stack is process-wide: the first loop that asks
# for it starts it, it stays up until the process exits, and one open loop at a time uses it.
#
# Completion model, as the contract says: lwIP's callbacks become events (kb_dpdk.c), and
# poll() runs one poll step and dispatches them.  Data for a transport that is not reading
# stays in lwIP's pbufs and is not given back to the receive window (tcp_recved) until it is
# delivered: back-pressure reaches the peer as a closing window, and nothing is dropped.
# A send copies the transport's batch into lwIP's send buffer (as a kernel socket does); the
# transport hears it completed once all of it is in, possibly after acknowledgements made room.


cdef extern from "kb_dpdk.h":
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
        uint32_t addr
        uint16_t port
    ctypedef struct kb_dpdk_api:
        int version
        int (*poll)()
        kb_event *(*events)(size_t *count)
        void (*events_clear)()
        kb_conn *(*tcp_listen)(uint32_t ip, uint16_t port, int backlog, int *err)
        kb_conn *(*tcp_connect)(uint32_t ip, uint16_t port, int *err)
        long (*tcp_write)(kb_conn *c, const void *data, size_t len, int flags)
        int (*tcp_output)(kb_conn *c)
        void (*tcp_recved)(kb_conn *c, uint32_t len)
        int (*tcp_shutdown_write)(kb_conn *c)
        int (*tcp_close)(kb_conn *c, int linger)
        void (*tcp_abort)(kb_conn *c)
        void (*conn_release)(kb_conn *c)
        int (*tcp_addrs)(kb_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip,
                         uint16_t *rport)
        void (*tcp_set_nodelay)(kb_conn *c, int on)
        void (*tcp_set_keepalive)(kb_conn *c, int on)
        pbuf *(*pbuf_segment)(pbuf *p, const void **payload, size_t *len)
        void (*pbuf_free)(pbuf *p)
        kb_conn *(*udp_open)(uint32_t ip, uint16_t port, int *err)
        int (*udp_connect)(kb_conn *c, uint32_t ip, uint16_t port)
        int (*udp_sendto)(kb_conn *c, const void *data, size_t len, uint32_t ip, uint16_t port)
        size_t (*pbuf_copy)(pbuf *p, void *dst, size_t len)
        pbuf *(*pbuf_detach)(pbuf *p, const void **payload, size_t *len)
        uint32_t (*zc_tx_inflight)()
    enum:
        KB_WRITE_MORE, KB_WRITE_NOCOPY
        KB_EV_ACCEPT, KB_EV_CONNECTED, KB_EV_RECV, KB_EV_EOF, KB_EV_SENT, KB_EV_ERROR,
        KB_EV_DGRAM
        KB_DPDK_API_VERSION
    const char *KB_DPDK_API_CAPSULE


# lwIP's err_t -> errno, so that errors are the OSError subclasses asyncio code expects.
cdef dict _LWIP_ERRNO = {
    -1: errno.ENOBUFS, -2: errno.ENOBUFS, -3: errno.ETIMEDOUT, -4: errno.EHOSTUNREACH,
    -5: errno.EINPROGRESS, -6: errno.EINVAL, -7: errno.EWOULDBLOCK, -8: errno.EADDRINUSE,
    -9: errno.EALREADY, -10: errno.EISCONN, -11: errno.ENOTCONN, -12: errno.EIO,
    -13: errno.ECONNABORTED, -14: errno.ECONNRESET, -15: errno.ENOTCONN, -16: errno.EINVAL,
}
cdef int LWIP_ERR_ABRT = -13, LWIP_ERR_RST = -14

# Datagrams kept for an endpoint that is not reading: past this many, new ones are dropped
# (counted), as a full socket receive buffer drops them.
cdef Py_ssize_t DGRAM_QUEUE_MAX = 4096


cdef object _lwip_oserror(int err, bint connecting):
    cdef int code
    if connecting and err == LWIP_ERR_RST:
        code = errno.ECONNREFUSED
    elif err == LWIP_ERR_ABRT:
        # lwIP aborts a connection itself only when its retransmissions, SYN retries or
        # keep-alive probes gave up: what Linux reports as ETIMEDOUT.
        code = errno.ETIMEDOUT
    else:
        code = _LWIP_ERRNO.get(err, errno.EIO)
    return OSError(code, os.strerror(code))



# The process's stack: (kbloop_ext.dpdk.stack.Stack, its configuration) once started.
_dpdk_stack = None
_dpdk_stack_config = None
_dpdk_stack_user = None     # the open DpdkDatapath using it
# Closed sockets whose no-copy data lwIP still references, and acknowledged Buffers the device
# may still hold, left by a loop that closed: kept alive for the next loop (or the exit).
_dpdk_orphans = (set(), [])


def _close_dpdk_stack():
    global _dpdk_stack
    if _dpdk_stack is not None:
        _dpdk_stack.close()
        _dpdk_stack = None


cdef class DpdkSocket(StackSocket):
    """A TCP connection or listener, or a UDP socket, of the DPDK datapath's lwIP stack."""
    cdef:
        kb_conn *c
        object dgrams            # UDP: (bytes, address) received, not delivered yet
        kb_conn *linger_c        # closed, with no-copy data still in lwIP's queues

    cdef _attach_conn(self, kb_conn *c):
        self.c = c
        c.owner = <void *>self
        self.dp.socks[self._fileno] = self
        cdef uint32_t lip, rip
        cdef uint16_t lport, rport
        if (<DpdkDatapath>self.dp).api.tcp_addrs(c, &lip, &lport, &rip, &rport) == 0 \
                and not c.listening:
            self._local = (_ip4_str(lip), lport)
            self._peer = (_ip4_str(rip), rport)


cdef class DpdkDatapath(StackDatapath):
    """TCP and UDP over the process's DPDK port and lwIP stack (docs/dpdk.md).

    eal_args: the EAL's arguments; port: the DPDK port id; ip, netmask, gateway: this stack's
    IPv4 configuration (dotted strings)."""
    cdef:
        kb_dpdk_api *api
        object stack
        readonly str netmask, gateway
        uint32_t ip_be, mask_be, gw_be
        bint zc_tx               # the device sends Buffers without a copy (external mbufs)
        set lingering            # closed DpdkSockets whose no-copy data lwIP still sends
        list tx_retired          # Buffers acknowledged, kept until the device let go of them
        uint64_t n_dgrams_dropped, n_lingered

    def __init__(self, eal_args, int port, str ip, str netmask, str gateway, BufferPool pool):
        global _dpdk_stack, _dpdk_stack_config, _dpdk_stack_user
        self.name = 'dpdk'
        self.pool = pool
        self.datagrams = True
        self.lingering = set()
        self.tx_retired = []
        try:
            from kbloop_ext.dpdk import stack as stack_module
        except ImportError as exc:
            raise BackendUnavailable(f'kbloop was built without DPDK ({exc}); see docs/dpdk.md')
        config = (tuple(eal_args), port, ip, netmask, gateway)
        if _dpdk_stack_user is not None:
            raise BackendUnavailable('the DPDK stack is in use by another open loop: one loop '
                                     'per process can use it (close that loop first)')
        if _dpdk_stack is None:
            try:
                _dpdk_stack = stack_module.Stack(list(eal_args), port=port, ip=ip,
                                                 netmask=netmask, gateway=gateway)
            except stack_module.StackError as exc:
                raise BackendUnavailable(f'DPDK could not start: {exc}') from None
            _dpdk_stack_config = config
            atexit.register(_close_dpdk_stack)
            # With --no-shconf --no-telemetry (kbloop's defaults) the EAL's runtime directory
            # stays empty: remove it now, so that nothing is left behind even by a process
            # that dies by a signal (uvicorn re-raises the SIGTERM it handled).
            try:
                os.rmdir(_dpdk_stack.runtime_dir)
            except OSError:
                pass
        elif _dpdk_stack_config != config:
            raise BackendUnavailable(
                'DPDK runs once per process and is already started with another configuration '
                f'({_dpdk_stack_config!r}); start it with {config!r} in a new process')
        self.api = <kb_dpdk_api *>PyCapsule_GetPointer(stack_module._C_API, KB_DPDK_API_CAPSULE)
        if self.api.version != KB_DPDK_API_VERSION:
            raise BackendUnavailable('kbloop_ext.dpdk.stack does not match the loop core: '
                                     'rebuild kbloop')
        self.stack = _dpdk_stack
        self.ip, self.netmask, self.gateway = ip, netmask, gateway
        self.ip_be, self.mask_be, self.gw_be = _ip4_be(ip), _ip4_be(netmask), _ip4_be(gateway)
        self.zc_tx = bool(self.stack.stats()['zc_tx'])
        # What an earlier loop left in lwIP's queues: it goes on here.
        self.lingering.update(_dpdk_orphans[0])
        self.tx_retired.extend(_dpdk_orphans[1])
        _dpdk_orphans[0].clear()
        _dpdk_orphans[1].clear()
        for s in self.lingering:
            (<DpdkSocket>s).dp = self
        _dpdk_stack_user = self
        self.opened = True

    @property
    def mac(self):
        return self.stack.mac

    def release(self):
        """Give the stack up without a loop (its loop could not be made)."""
        self.close()

    # -- routing: which addresses this stack serves ------------------------------------------
    cpdef bint serves(self, host):
        """Whether create_server(host) listens on this stack: the wildcard or its address."""
        return host is None or host in ('', '0.0.0.0', self.ip)

    cpdef bint reaches(self, str address):
        """Whether a connection to address goes out through this stack: an IPv4 address on its
        network, or anywhere but loopback when it has a gateway."""
        cdef uint32_t a
        try:
            a = _ip4_be(address)
        except OSError:
            return False
        if address.startswith('127.') or a == self.ip_be:
            return False
        return (a & self.mask_be) == (self.ip_be & self.mask_be) or self.gw_be != 0

    # -- sockets ------------------------------------------------------------------------------
    cdef StackSocket _new_socket(self, int type):
        """SOCK_STREAM: TCP, SOCK_DGRAM: UDP."""
        cdef DpdkSocket s = DpdkSocket.__new__(DpdkSocket)
        self._init_socket(s)
        if type == SOCK_DGRAM:
            s.type = SOCK_DGRAM
            s.proto = IPPROTO_UDP
            s.dgrams = collections.deque()
        return s

    # -- UDP -------------------------------------------------------------------------------
    cdef _udp_bind(self, DpdkSocket s, address):
        cdef int err = 0, port
        cdef kb_conn *c
        if s.c is not NULL:
            raise OSError(errno.EINVAL, 'the socket is already bound')
        host, port = address[:2]
        if not self.serves(host):
            raise OSError(errno.EADDRNOTAVAIL,
                          f'{host!r} is not this DPDK stack\'s address ({self.ip})')
        c = self.api.udp_open(_ip4_be(host or '0.0.0.0'), port, &err)
        if c is NULL:
            raise _lwip_oserror(err, False)
        s._attach_conn(c)
        self._udp_names(s)

    cdef _udp_names(self, DpdkSocket s):
        cdef uint32_t lip, rip
        cdef uint16_t lport, rport
        if self.api.tcp_addrs(s.c, &lip, &lport, &rip, &rport) == 0:
            s._local = (_ip4_str(lip), lport)
            s._peer = (_ip4_str(rip), rport) if rport else None

    def udp_connect(self, DpdkSocket s, address):
        """Fix the peer of a UDP socket (binding it first to any port if it is not bound)."""
        cdef int err
        if s.c is NULL:
            self._udp_bind(s, ('0.0.0.0', 0))
        err = self.api.udp_connect(s.c, _ip4_be(address[0]), address[1])
        if err:
            raise _lwip_oserror(err, False)
        self._udp_names(s)

    cdef int dgram_recv_start(self, DatagramCore t) except -1:
        cdef DpdkSocket s = t._sock
        if s.dgrams:
            self.later.append((LATER_DRAIN, s, None))
        return 0

    cdef int dgram_send(self, DatagramCore t, object data, bytes sockaddr) except -1:
        cdef DpdkSocket s = t._sock
        cdef Py_buffer view
        cdef uint32_t ip = 0
        cdef uint16_t port = 0
        cdef int err
        cdef const unsigned char *sa
        if sockaddr is not None:      # a struct sockaddr_in, as _pack_sockaddr made it
            sa = <const unsigned char *>PyBytes_AS_STRING(sockaddr)
            if len(sockaddr) < 8 or (<const unsigned short *>sa)[0] != AF_INET:
                self.later.append((LATER_DGRAM_SENT, s, (len(data), errno.EAFNOSUPPORT)))
                return 0
            port = (sa[2] << 8) | sa[3]
            memcpy(&ip, sa + 4, 4)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            err = self.api.udp_sendto(s.c, view.buf, view.len, ip, port) if s.c is not NULL else -11
        finally:
            PyBuffer_Release(&view)
        self.later.append((LATER_DGRAM_SENT, s,
                           (len(data), _lwip_oserror(err, False).errno if err else 0)))
        return 0

    cdef _bind_sock(self, StackSocket sock, address):
        if sock.type == SOCK_DGRAM:
            self._udp_bind(<DpdkSocket>sock, address)
        else:
            StackDatapath._bind_sock(self, sock, address)

    cdef _listen(self, StackSocket sock, int backlog):
        cdef DpdkSocket s = <DpdkSocket>sock
        cdef int err = 0
        cdef kb_conn *c
        self._check_open()
        if s._listening:
            return
        if s._local is None:
            self._bind_sock(s, ('0.0.0.0', 0))
        host, port = s._local
        c = self.api.tcp_listen(_ip4_be(host), port, max(1, backlog), &err)
        if c is NULL:
            raise _lwip_oserror(err, False)
        s._listening = True
        s._attach_conn(c)

    def connect(self, DpdkSocket s, address):
        """Start an active open; returns a future resolved when it is established."""
        cdef int err = 0, port
        cdef kb_conn *c
        self._check_open()
        host, port = address[:2]
        c = self.api.tcp_connect(_ip4_be(host), port, &err)
        if c is NULL:
            raise _lwip_oserror(err, True)
        s._peer = (host, port)
        s.connect_fut = self.loop.create_future()
        s._attach_conn(c)
        if s._nodelay:
            self.api.tcp_set_nodelay(c, 1)
        if s._keepalive:
            self.api.tcp_set_keepalive(c, 1)
        return s.connect_fut

    cdef _close_sock(self, StackSocket sock):
        """Close gracefully (FIN; lwIP sends a RST instead when received data was left
        unread, as Linux does) and give everything back: its pbufs, its port."""
        cdef DpdkSocket s = <DpdkSocket>sock
        cdef kb_conn *c = s.c
        self._free_rx(s)
        s.out = None
        if s.connect_fut is not None:
            if not s.connect_fut.done():
                s.connect_fut.cancel()
            s.connect_fut = None
        if c is not NULL:
            s.c = NULL
            # Data lent to the application as Buffers has been read, as far as the peer is
            # concerned: without this lwIP would answer the close with a RST (unread data).
            if s.zc_held_bytes:
                self.api.tcp_recved(c, <uint32_t>s.zc_held_bytes)
            self.socks.pop(s._fileno, None)
            if s.unacked and self.api.tcp_close(c, 1) == 1:
                # lwIP still sends no-copy data from the application's Buffers: they are
                # kept (and the connection's acknowledgements followed) until it is done.
                s.linger_c = c
                self.lingering.add(s)
                self.n_lingered += 1
            else:
                if s.unacked:       # reset instead: lwIP let go of the data
                    self._end_linger(s)
                else:
                    self.api.tcp_close(c, 0)
                self.api.conn_release(c)
        self._unbind(s)
        s.owner_obj = None

    cdef _free_rx(self, DpdkSocket s):
        cdef uintptr_t p
        for p in s.rx:
            self.api.pbuf_free(<pbuf *>p)
        s.rx = []

    cdef _shutdown_sock(self, StackSocket sock):
        cdef DpdkSocket s = <DpdkSocket>sock
        if s.c is not NULL:
            self.api.tcp_shutdown_write(s.c)

    cdef _apply_options(self, StackSocket sock):
        cdef DpdkSocket s = <DpdkSocket>sock
        if s.c is not NULL and not s._listening:
            self.api.tcp_set_nodelay(s.c, s._nodelay)
            self.api.tcp_set_keepalive(s.c, s._keepalive)

    # -- the contract: streams -------------------------------------------------------------
    cdef _push(self, StackSocket sock):
        """Copy as much of the send batch into lwIP as its send buffer takes."""
        cdef DpdkSocket s = <DpdkSocket>sock
        cdef Py_buffer view
        cdef long n
        cdef int flags
        cdef bint full = False, nocopy
        cdef list out = s.out
        cdef Py_ssize_t count = len(out)
        if s.c is NULL:
            return
        while s.out_i < count:
            item = out[s.out_i]
            # A kbloop.Buffer is lent to lwIP instead of copied: held here until acknowledged.
            nocopy = self.zc_tx and type(item) is Buffer
            flags = (KB_WRITE_MORE if s.out_i + 1 < count else 0) | (KB_WRITE_NOCOPY if nocopy else 0)
            PyObject_GetBuffer(item, &view, PyBUF_SIMPLE)
            try:
                while s.out_off < view.len:
                    n = self.api.tcp_write(s.c, <char *>view.buf + s.out_off,
                                           view.len - s.out_off, flags)
                    if n < 0:
                        s.out = None
                        self.later.append((LATER_SEND_ERROR, s, _lwip_oserror(n, False)))
                        return
                    if n == 0:
                        full = True     # the send buffer is full: acknowledgements make room
                        break
                    s.out_off += n
                    s.tx_queued += n
                    if nocopy:
                        s.unacked.append((s.tx_queued, item))
            finally:
                PyBuffer_Release(&view)
            if full:
                break
            s.out_i += 1
            s.out_off = 0
        self.api.tcp_output(s.c)
        if s.out_i == count:
            s.out = None
            self.n_tx_bytes += s.out_total
            self.later.append((LATER_SENT, s, s.out_total))

    # -- the per-iteration step -------------------------------------------------------------
    cdef int poll(self, int64_t timeout_ns) except -1:
        """One poll step (this device is polled, never waited on: the loop spins on it)."""
        cdef size_t count = 0, i = 0
        cdef kb_event *events
        cdef kb_event ev
        if not self.opened:
            return 0
        if self.returned:
            self._take_back_returned()
        if self.tx_retired and self.api.zc_tx_inflight() == 0:
            self.tx_retired = []    # the device has let go of every external mbuf
        self.api.poll()
        try:
            while True:
                # Re-read the array each time: a call into lwIP may add events (and move it).
                events = self.api.events(&count)
                if i >= count:
                    break
                ev = events[i]
                events[i].p = NULL      # a RECV's pbuf is ours now
                i += 1
                self._dispatch(&ev)
        finally:
            self.api.events_clear()
            self.n_events += i
        self._finish_poll()
        return <int>i

    cdef _dispatch(self, kb_event *ev):
        cdef DpdkSocket s, ls
        cdef int kind = ev.kind
        if kind == KB_EV_ACCEPT:
            if ev.listener.owner is NULL:
                return              # its listener is closed: events_clear aborts the new one
            ls = <DpdkSocket>ev.listener.owner
            s = <DpdkSocket>self._new_socket(SOCK_STREAM)
            s._attach_conn(ev.conn)
            if ls.owner_obj is None or not (<Listener>ls.owner_obj).active:
                self._close_sock(s)
                return
            self._accepted(ls, s)
            return
        if ev.conn.owner is NULL:
            if ev.p is not NULL:
                self.api.pbuf_free(ev.p)
            return
        s = <DpdkSocket>ev.conn.owner
        if kind == KB_EV_RECV or kind == KB_EV_EOF:
            # Kept until this poll's events are all in: a connection's segments of one poll
            # reach the protocol in one data_received() call, not one per segment.
            if kind == KB_EV_RECV:
                self.n_rx_bytes += ev.len
                s.rx.append(<uintptr_t>ev.p)
            else:
                s.rx_eof = True
            if not s.rx_marked:
                s.rx_marked = True
                self.rx_ready.append(s)
        elif kind == KB_EV_SENT:
            s.tx_acked += ev.len
            if s.unacked:
                self._retire_acked(s)
            if s.out is not None:
                self._push(s)
        elif kind == KB_EV_CONNECTED:
            fut = s.connect_fut
            s.connect_fut = None
            if fut is not None and not fut.done():
                if ev.err:
                    fut.set_exception(_lwip_oserror(ev.err, True))
                else:
                    fut.set_result(None)
        elif kind == KB_EV_ERROR:
            self._on_conn_error(s, ev.err)
        elif kind == KB_EV_DGRAM:
            self._on_datagram(s, ev)

    cdef _on_datagram(self, DpdkSocket s, kb_event *ev):
        """A datagram for UDP socket s: copied into bytes at once (its pbuf goes back)."""
        cdef bytes data = PyBytes_FromStringAndSize(NULL, ev.len)
        self.api.pbuf_copy(ev.p, PyBytes_AS_STRING(data), ev.len)
        self.api.pbuf_free(ev.p)
        if s.dgrams is None or len(s.dgrams) >= DGRAM_QUEUE_MAX:
            self.n_dgrams_dropped += 1
            return
        self.n_rx_bytes += ev.len
        s.dgrams.append((data, (_ip4_str(ev.addr), ev.port)))
        self._mark_rx(s)

    cdef _retire_acked(self, DpdkSocket s):
        """No-copy data the peer acknowledged: lwIP is done with it (the device may not be:
        tx_retired keeps it until then).  A lingering socket whose data is all acknowledged
        is let go."""
        cdef object unacked = s.unacked
        while unacked and <uint64_t>unacked[0][0] <= s.tx_acked:
            self.tx_retired.append(unacked.popleft()[1])
        if not unacked and s.linger_c is not NULL:
            self._end_linger(s)

    cdef _end_linger(self, DpdkSocket s):
        while s.unacked:
            self.tx_retired.append(s.unacked.popleft()[1])
        if s.linger_c is not NULL:
            self.api.conn_release(s.linger_c)
            s.linger_c = NULL
        self.lingering.discard(s)

    cdef _on_conn_error(self, DpdkSocket s, int err):
        """lwIP has freed the connection (RST, or it gave up retransmitting)."""
        cdef StreamCore t
        if s.unacked or s.linger_c is not NULL:
            self._end_linger(s)     # lwIP dropped its references to no-copy data
            if s.c is NULL:
                return
        fut = s.connect_fut
        s.connect_fut = None
        exc = _lwip_oserror(err, fut is not None)
        self._free_rx(s)            # as Linux: a RST discards what was not read yet
        s.rx_eof = False
        if fut is not None:
            if not fut.done():
                fut.set_exception(exc)
            return
        t = s.owner_obj if isinstance(s.owner_obj, StreamCore) else None
        if t is not None and (s.out is not None or t._send_inflight):
            s.out = None
            t._on_send_error(exc.errno, None)
        elif t is not None and t._recv_armed and not t._recv_stopping:
            t._on_recv_error(exc.errno)
        else:
            # Nobody is reading (no transport yet, paused, or after EOF): as on a kernel
            # socket, the transport hears of it when it reads again or writes.
            s.rx_error = exc

    cdef _drain(self, StackSocket sock):
        cdef DpdkSocket s = <DpdkSocket>sock
        cdef DatagramCore d
        if isinstance(s.owner_obj, DatagramCore):
            d = s.owner_obj
            while s.dgrams and d._recv_armed and not d._recv_stopping and not d._closing:
                data, addr = s.dgrams.popleft()
                d._on_datagram(data, addr)
            return
        StackDatapath._drain(self, s)

    cdef _deliver(self, StackSocket sock, StreamCore t):
        """Hand received pbufs to the transport, then give their room back to lwIP's window.
        One pbuf of one piece is lent as it is (_on_data copies it once, into the bytes the
        protocol gets); several are gathered into one bytes object, the same single copy."""
        cdef DpdkSocket s = <DpdkSocket>sock
        cdef pbuf *p
        cdef pbuf *q
        cdef const void *payload
        cdef size_t n, total = 0, off = 0
        cdef Py_ssize_t i, count = 0
        cdef bytes data
        cdef char *dst
        for i in range(len(s.rx)):
            p = <pbuf *><uintptr_t>s.rx[i]
            n = 0
            q = p
            while q is not NULL:
                q = self.api.pbuf_segment(q, &payload, &n)
                total += n
            count += 1
            if total >= DELIVER_MAX:
                break
        taken = s.rx[:count]
        del s.rx[:count]
        try:
            p = <pbuf *><uintptr_t>taken[0]
            if count == 1 and self.api.pbuf_segment(p, &payload, &n) is NULL:
                t._on_data(<const char *>payload, n)
            else:
                data = PyBytes_FromStringAndSize(NULL, total)
                dst = PyBytes_AS_STRING(data)
                for item in taken:
                    q = <pbuf *><uintptr_t>item
                    while q is not NULL:
                        q = self.api.pbuf_segment(q, &payload, &n)
                        memcpy(dst + off, payload, n)
                        off += n
                t._on_bytes(data)
        finally:
            for item in taken:
                self.api.pbuf_free(<pbuf *><uintptr_t>item)
            if s.c is not NULL:
                self.api.tcp_recved(s.c, total)

    cdef _lend(self, StackSocket s, StreamCore t):
        """A ZeroCopyProtocol's data: each received piece (one segment's payload, in the
        mbuf it arrived in) lent as a Buffer, without a copy.  Its room in the receive window
        comes back when the Buffer does (_give_back)."""
        cdef pbuf *p = <pbuf *><uintptr_t>s.rx.pop(0)
        cdef pbuf *piece
        cdef const void *payload
        cdef size_t n
        while p is not NULL:
            piece = p
            p = self.api.pbuf_detach(piece, &payload, &n)
            if n == 0:
                self.api.pbuf_free(piece)
                continue
            self._lend_piece(s, t, payload, n, <uintptr_t>piece)

    cdef _give_back(self, StackSocket s, uintptr_t token, uint32_t number):
        cdef DpdkSocket d = <DpdkSocket>s
        self.api.pbuf_free(<pbuf *>token)
        if d.c is not NULL:
            self.api.tcp_recved(d.c, number)

    cdef _give_back_late(self, uintptr_t token, uint32_t number, object holder):
        if _dpdk_stack is not None:     # the stack is process-wide: still up
            self.api.pbuf_free(<pbuf *>token)

    cdef void close(self):
        """Abort what this loop left open and hand the stack over to the next loop (the stack
        itself stays up until the process exits: the EAL cannot start twice)."""
        global _dpdk_stack_user
        cdef DpdkSocket s
        if not self.opened:
            return
        if self.returned:
            self._take_back_returned()
        for s in list(self.socks.values()):
            if s.c is not NULL:
                self.api.tcp_abort(s.c)
            self._close_sock(s)
        self.later = []
        self.kept_later = []
        self.kept_rx = []
        try:
            self.api.poll()         # the RSTs go out now
            self.api.events_clear()
        except BaseException:
            pass
        _dpdk_orphans[0].update(self.lingering)
        _dpdk_orphans[1].extend(self.tx_retired)
        self.lingering = set()
        self.tx_retired = []
        self.opened = False
        if _dpdk_stack_user is self:
            _dpdk_stack_user = None

    cdef dict stats(self):
        d = dict(self.stack.stats())
        d.update(self._stack_stats())
        d['datagrams_dropped'] = self.n_dgrams_dropped
        d['tx_lingering'] = len(self.lingering)
        d['tx_lingered'] = self.n_lingered
        d['tx_held'] = len(self.tx_retired) + sum(len((<DpdkSocket>s).unacked)
                                                    for s in self.socks.values())
        return d
