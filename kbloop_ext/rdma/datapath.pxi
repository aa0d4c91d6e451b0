# The RDMA datapath: byte streams over RC queue pairs (kb_rdma.c, docs/rdma.md) under the same
# stream transports as the io_uring and DPDK datapaths.  What it shares with DPDK (the socket
# stand-ins, delivery, deferred completions) is in stack.pxi.
#
# The loop core does not link libibverbs or librdmacm: it calls kb_rdma.c through the table
# that kbloop_ext.rdma.verbs exports in a capsule, so the core loads on machines without them.
# One stack per loop (rdma_cm ids, PDs and CQs are per process, not per device as DPDK's EAL).
#
# Completion model: kb_rdma_poll turns completions and rdma_cm events into an event queue that
# poll() dispatches.  Received frames stay in their registered receive buffers: a transport
# that is not reading keeps them (the peer runs out of credits and waits: back-pressure, never
# loss); delivered data is copied once into bytes, or lent to a ZeroCopyProtocol as Buffers
# over the receive buffers.  A send copies the batch into the connection's send slots, except
# pool Buffers, which are sent from where they are (the pool is registered with each device)
# and held until the peer has them.
#
# Busy-poll mode spins on the CQs as DPDK does; sleep mode waits in io_uring on the rdma_cm
# channel's and the completion channels' fds, after arming the CQs (docs/rdma.md).

import fcntl as _fcntl

cdef extern from "kb_rdma.h":
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
    ctypedef struct kb_rdma_api:
        int version
        kb_rdma *(*create)(const kb_rdma_config *cfg, char *errbuf, size_t errlen)
        void (*destroy)(kb_rdma *r)
        int (*poll)(kb_rdma *r)
        void (*flush)(kb_rdma *r)
        uint32_t (*fds)(kb_rdma *r, int *fds, uint32_t max)
        int (*arm)(kb_rdma *r)
        kb_rdma_event *(*events)(kb_rdma *r, size_t *count)
        void (*events_clear)(kb_rdma *r)
        kb_rdma_conn *(*listen)(kb_rdma *r, uint32_t ip, uint16_t port, int backlog, int *err)
        kb_rdma_conn *(*connect)(kb_rdma *r, uint32_t ip, uint16_t port, int *err)
        long (*write)(kb_rdma_conn *c, const void *data, size_t len)
        size_t (*write_room)(kb_rdma_conn *c)
        int (*write_eof)(kb_rdma_conn *c)
        void (*recv_done)(kb_rdma_conn *c, uint32_t buf)
        void (*close)(kb_rdma_conn *c)
        void (*abort)(kb_rdma_conn *c)
        void (*release)(kb_rdma_conn *c)
        int (*addrs)(kb_rdma_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip,
                     uint16_t *rport)
        void (*get_stats)(kb_rdma *r, kb_rdma_stats *st)
        int (*reg_mem)(kb_rdma *r, const void *addr, size_t len)
        void (*unreg_mem)(kb_rdma *r, const void *addr)
        long (*write_ref)(kb_rdma_conn *c, const void *data, size_t len)
        void (*tick)(kb_rdma *r)
    enum:
        KB_RDMA_EV_ACCEPT, KB_RDMA_EV_CONNECTED, KB_RDMA_EV_RECV, KB_RDMA_EV_EOF,
        KB_RDMA_EV_SENT, KB_RDMA_EV_ERROR, KB_RDMA_EV_CLOSED, KB_RDMA_EV_REJECT
        KB_RDMA_API_VERSION
    const char *KB_RDMA_API_CAPSULE

cdef extern from "<sys/ioctl.h>":
    int SIOCGIFADDR, SIOCGIFNETMASK

# Most fds kb_rdma_fds returns: the rdma_cm channel and one completion channel per device.
cdef int RDMA_MAX_FDS = 16
# Pool Buffers from this size up are sent from where they are (a frame gathers its header from
# the send slot and its payload from the Buffer); smaller ones are copied into a slot, where
# they can share a frame with other small writes.
cdef Py_ssize_t RDMA_REF_MIN = 1024
# Seconds between liveness probes of connections with nothing in flight (kb_rdma_tick): with
# retry_count 6, a vanished peer is noticed some 16 s after it went.
cdef double RDMA_PROBE_INTERVAL = 1.0


cdef object _rdma_oserror(int err, bint connecting):
    """The device's errno as the exception a TCP program expects (docs/rdma.md)."""
    if err == errno.ETIMEDOUT and not connecting:
        # The QP's retries ran out: the peer (or the link to it) is gone.  TCP would say
        # ETIMEDOUT; the RDMA datapath reports every loss of an established peer as a reset.
        return ConnectionResetError(errno.ECONNRESET, 'Connection reset by peer (RDMA: the '
                                    'peer stopped acknowledging, retries exhausted)')
    if err == errno.EPROTO:
        return OSError(errno.EPROTO, 'Protocol error (RDMA: the peer broke the stream wire '
                                     'format; docs/rdma.md)')
    return OSError(err, os.strerror(err))


def rdma_interfaces():
    """[(netdev, IPv4 address, netmask)] of the network devices that an RDMA device (RoCE:
    rxe, a RoCE NIC) runs over: the addresses rdma_cm can listen on and route through."""
    found = []
    base = '/sys/class/infiniband'
    try:
        devices = sorted(os.listdir(base))
    except OSError:
        return found
    names = []
    for dev in devices:
        ports = os.path.join(base, dev, 'ports')
        try:
            port_list = os.listdir(ports)
        except OSError:
            continue
        for port in port_list:
            ndevs = os.path.join(ports, port, 'gid_attrs', 'ndevs')
            try:
                entries = os.listdir(ndevs)
            except OSError:
                continue
            for entry in entries:
                try:
                    with open(os.path.join(ndevs, entry)) as f:
                        name = f.read().strip()
                except OSError:
                    continue
                if name and name not in names:
                    names.append(name)
    probe = socket_socket(AF_INET, SOCK_DGRAM)
    try:
        for name in names:
            request = struct_pack('256s', name.encode()[:15])
            try:
                addr = _fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)[20:24]
                mask = _fcntl.ioctl(probe.fileno(), SIOCGIFNETMASK, request)[20:24]
            except OSError:
                continue        # no IPv4 address on it
            found.append((name, inet_ntop(AF_INET, addr), inet_ntop(AF_INET, mask)))
    finally:
        probe.close()
    return found


def _rdma_noop():
    """The fd watch of a sleeping RDMA datapath: waking the loop is all it is for."""


cdef class RdmaSocket(StackSocket):
    """A stream connection or listener of the RDMA datapath (an RC queue pair set up by
    rdma_cm; docs/rdma.md)."""
    cdef:
        kb_rdma_conn *c          # NULL once released
        kb_rdma_conn *lend_c     # the connection its lent receive buffers go back to (valid,
                                 # by kb_rdma.c's rule, while any of them is out)
        bint closing             # closed, waiting for the peer to have every zero-copy byte

    cdef _attach_conn(self, kb_rdma_conn *c):
        self.c = c
        self.lend_c = c
        c.owner = <void *>self
        self.dp.socks[self._fileno] = self
        self._read_addresses()

    cdef _read_addresses(self):
        cdef uint32_t lip, rip
        cdef uint16_t lport, rport
        if (<RdmaDatapath>self.dp).api.addrs(self.c, &lip, &lport, &rip, &rport) == 0 \
                and not self.c.listening and rport:
            self._local = (_ip4_str(lip), lport)
            self._peer = (_ip4_str(rip), rport)


cdef class RdmaDatapath(StackDatapath):
    """Streams over RDMA RC queue pairs (docs/rdma.md): create_server on the wildcard or an
    address of an RDMA network device, and connections to those devices' networks, run here.

    poll: "busy" (spin on the completion queues; the loop never sleeps) or "sleep" (wait for
    the completion channel); buf_size, recv_depth, send_depth, inline_max, retry_count: the
    device layer's configuration (kb_rdma.h)."""
    cdef:
        kb_rdma_api *api
        kb_rdma *r
        readonly str poll_mode
        readonly list interfaces     # (netdev, address, netmask)
        list nets                    # (address, mask) in network byte order
        list watched                 # fds the loop watches in sleep mode
        uint32_t fds_gen
        set closing                  # closed sockets whose zero-copy data is still in flight
        bint free_pending            # closed, the stack freed when the last Buffer is back
        set regions                  # pool slab addresses registered with the stack
        object ticker                # the loop's timer for kb_rdma_tick, once connections exist
        uint64_t n_zc_tx, n_zc_tx_bytes

    def __init__(self, BufferPool pool, str poll='busy', *, interfaces=None,
                 unsigned int buf_size=8192, unsigned int recv_depth=64,
                 unsigned int send_depth=64, unsigned int inline_max=256,
                 unsigned int retry_count=6):
        cdef kb_rdma_config cfg
        cdef char errbuf[256]
        self.name = 'rdma'
        self.pool = pool
        self.watched = []
        self.closing = set()
        self.regions = set()
        if poll not in ('busy', 'sleep'):
            raise ValueError(f'poll must be "busy" or "sleep", not {poll!r}')
        self.poll_mode = poll
        self.spins = poll == 'busy'
        try:
            from kbloop_ext.rdma import verbs as verbs_module
        except ImportError as exc:
            raise BackendUnavailable(f'kbloop was built without RDMA ({exc}); see docs/rdma.md')
        self.api = <kb_rdma_api *>PyCapsule_GetPointer(verbs_module._C_API, KB_RDMA_API_CAPSULE)
        if self.api.version != KB_RDMA_API_VERSION:
            raise BackendUnavailable('kbloop_ext.rdma.verbs does not match the loop core: '
                                     'rebuild kbloop')
        self.interfaces = list(rdma_interfaces() if interfaces is None else interfaces)
        if not self.interfaces:
            raise BackendUnavailable(
                'no RDMA device with an IPv4 address here (/sys/class/infiniband; for '
                'soft-RoCE: rdma link add rxe0 type rxe netdev eth0; docs/rdma.md)')
        self.nets = [(_ip4_be(a), _ip4_be(m)) for _, a, m in self.interfaces]
        self.ip = self.interfaces[0][1]
        if retry_count > 6:
            raise ValueError('retry_count is 0..6 (7 would mean "for ever" to rxe)')
        cfg.buf_size = buf_size
        cfg.recv_depth = recv_depth
        cfg.send_depth = send_depth
        cfg.inline_max = inline_max
        cfg.retry_count = retry_count
        cfg.timeout_ms = 2000
        self.r = self.api.create(&cfg, errbuf, sizeof(errbuf))
        if self.r is NULL:
            raise ValueError(f'the RDMA datapath: {errbuf.decode(errors="replace")}')
        self.opened = True
        pool.attach(self)       # its slabs are registered: Buffers are sent without a copy

    # -- zero-copy memory ------------------------------------------------------------------
    cdef int register_slab(self, _Slab slab) except -1:
        if self.r is not NULL and self.api.reg_mem(self.r, slab.base, slab.size) == 0:
            self.regions.add(<uintptr_t>slab.base)
        return 0

    cdef int unregister_slab(self, _Slab slab) except -1:
        if self.r is not NULL and <uintptr_t>slab.base in self.regions:
            self.regions.discard(<uintptr_t>slab.base)
            self.api.unreg_mem(self.r, slab.base)
        return 0

    def __dealloc__(self):
        # Only a datapath never closed (its loop could not be made) gets here with a stack:
        # nothing is lent then, since nothing was received.
        if self.r is not NULL and self.lent_now == 0:
            self.api.destroy(self.r)
            self.r = NULL

    def release(self):
        """Give the stack up without a loop (its loop could not be made)."""
        self.close()

    # -- routing ----------------------------------------------------------------------------------
    cpdef bint serves(self, host):
        """Whether create_server(host) listens here: the wildcard or an RDMA device's address."""
        if host is None or host in ('', '0.0.0.0'):
            return True
        for _, address, _ in self.interfaces:
            if host == address:
                return True
        return False

    cpdef bint reaches(self, str address):
        """Whether a connection to address goes over RDMA: an IPv4 address on the network of
        an RDMA device (this host's own included), never loopback."""
        cdef uint32_t a
        try:
            a = _ip4_be(address)
        except OSError:
            return False
        if address.startswith('127.'):
            return False
        for ip, mask in self.nets:
            if (a & <uint32_t>mask) == (<uint32_t>ip & <uint32_t>mask):
                return True
        return False

    # -- sockets ------------------------------------------------------------------------------
    cdef StackSocket _new_socket(self, int type):
        cdef RdmaSocket s = RdmaSocket.__new__(RdmaSocket)
        self._init_socket(s)
        return s

    cdef _start_ticking(self):
        if self.ticker is None:
            self.ticker = self.loop.call_later(RDMA_PROBE_INTERVAL, self._tick)

    def _tick(self):
        self.ticker = None
        if self.opened and self.r is not NULL:
            self.api.tick(self.r)
            self._start_ticking()

    cdef _listen(self, StackSocket sock, int backlog):
        cdef RdmaSocket s = <RdmaSocket>sock
        cdef int err = 0
        cdef kb_rdma_conn *c
        self._check_open()
        if s._listening:
            return
        if s._local is None:
            self._bind_sock(s, ('0.0.0.0', 0))
        host, port = s._local
        c = self.api.listen(self.r, _ip4_be(host), port, max(1, backlog), &err)
        if c is NULL:
            raise _rdma_oserror(-err, False)
        s._listening = True
        s._attach_conn(c)
        self._start_ticking()

    def connect(self, RdmaSocket s, address):
        """Start connecting (rdma_cm resolves the address and route); returns a future
        resolved when the connection is established."""
        cdef int err = 0, port
        cdef kb_rdma_conn *c
        self._check_open()
        host, port = address[:2]
        c = self.api.connect(self.r, _ip4_be(host), port, &err)
        if c is NULL:
            raise _rdma_oserror(-err, True)
        s._peer = (host, port)
        s.connect_fut = self.loop.create_future()
        s._attach_conn(c)
        self._start_ticking()
        return s.connect_fut

    cdef _shutdown_sock(self, StackSocket sock):
        cdef RdmaSocket s = <RdmaSocket>sock
        if s.c is not NULL and s.out is None:
            self.api.write_eof(s.c)

    cdef _close_sock(self, StackSocket sock):
        """Close gracefully (EOF after what was written; the disconnect follows once the peer
        has it all) and give back what is held here.  With zero-copy data still in flight the
        connection is followed until it is over, so the Buffers are not let go too early."""
        cdef RdmaSocket s = <RdmaSocket>sock
        cdef kb_rdma_conn *c = s.c
        self._free_rx(s)
        s.out = None
        if s.connect_fut is not None:
            if not s.connect_fut.done():
                s.connect_fut.cancel()
            s.connect_fut = None
        if c is not NULL:
            self.socks.pop(s._fileno, None)
            if s.unacked and not s._listening:
                self.api.close(c)
                s.closing = True
                self.closing.add(s)
            else:
                s.c = NULL
                self.api.close(c)
                self.api.release(c)
        self._unbind(s)
        s.owner_obj = None

    cdef _end_closing(self, RdmaSocket s):
        """The connection of a closed socket is over: the device has let go of its Buffers."""
        s.unacked.clear()
        if s.c is not NULL:
            self.api.release(s.c)
            s.c = NULL
        s.closing = False
        self.closing.discard(s)

    cdef _free_rx(self, RdmaSocket s):
        for item in s.rx:
            self.api.recv_done(s.lend_c, <uint32_t>item[2])
        s.rx = []

    # -- sending ------------------------------------------------------------------------------------
    cdef _push(self, StackSocket sock):
        """Copy as much of the send batch into the send slots as they take (the rest goes
        when the peer has received some: KB_RDMA_EV_SENT)."""
        cdef RdmaSocket s = <RdmaSocket>sock
        cdef Py_buffer view
        cdef long n
        cdef bint full = False, ref
        cdef list out = s.out
        cdef Py_ssize_t count = len(out)
        if s.c is NULL:
            return
        while s.out_i < count:
            item = out[s.out_i]
            PyObject_GetBuffer(item, &view, PyBUF_SIMPLE)
            ref = type(item) is Buffer and view.len >= RDMA_REF_MIN
            try:
                while s.out_off < view.len:
                    if ref:
                        n = self.api.write_ref(s.c, <char *>view.buf + s.out_off,
                                               view.len - s.out_off)
                        if n == -errno.EFAULT:      # not in a registered slab: copied
                            ref = False
                            continue
                        if n > 0:
                            self.n_zc_tx += 1
                            self.n_zc_tx_bytes += n
                            s.unacked.append((s.tx_queued + n, item))
                    else:
                        n = self.api.write(s.c, <char *>view.buf + s.out_off,
                                           view.len - s.out_off)
                    if n < 0:
                        s.out = None
                        self.later.append((LATER_SEND_ERROR, s, _rdma_oserror(-n, False)))
                        return
                    if n == 0:
                        full = True
                        break
                    s.out_off += n
                    s.tx_queued += n
            finally:
                PyBuffer_Release(&view)
            if full:
                break
            s.out_i += 1
            s.out_off = 0
        if s.out_i == count:
            s.out = None
            self.n_tx_bytes += s.out_total
            self.later.append((LATER_SENT, s, s.out_total))

    # -- receiving ----------------------------------------------------------------------------------
    cdef _deliver(self, StackSocket sock, StreamCore t):
        """Received frames to the transport as bytes: one frame is handed over as it lies in
        its receive buffer (_on_data copies it once), several are gathered into one bytes
        object (the same single copy); the buffers go back to the device (and their credits
        to the peer) at once."""
        cdef RdmaSocket s = <RdmaSocket>sock
        cdef size_t total = 0, off = 0, n
        cdef Py_ssize_t count = 0
        cdef bytes data
        cdef char *dst
        for item in s.rx:
            total += <size_t>item[1]
            count += 1
            if total >= DELIVER_MAX:
                break
        taken = s.rx[:count]
        del s.rx[:count]
        try:
            if count == 1:
                t._on_data(<const char *><uintptr_t>taken[0][0], total)
            else:
                data = PyBytes_FromStringAndSize(NULL, total)
                dst = PyBytes_AS_STRING(data)
                for item in taken:
                    n = item[1]
                    memcpy(dst + off, <const void *><uintptr_t>item[0], n)
                    off += n
                t._on_bytes(data)
        finally:
            for item in taken:
                self.api.recv_done(s.lend_c, <uint32_t>item[2])

    cdef _lend(self, StackSocket s, StreamCore t):
        """A ZeroCopyProtocol's data: each frame's payload lent as a Buffer over the receive
        buffer it arrived in; the buffer (and its credit) goes back when the Buffer does."""
        data, n, buf = s.rx.pop(0)
        self._lend_piece(s, t, <const void *><uintptr_t>data, n, buf)

    cdef _give_back(self, StackSocket s, uintptr_t token, uint32_t number):
        self.api.recv_done((<RdmaSocket>s).lend_c, <uint32_t>token)

    cdef _give_back_late(self, uintptr_t token, uint32_t number, object holder):
        if self.r is not NULL:
            self.api.recv_done((<RdmaSocket>holder).lend_c, <uint32_t>token)
            if self.free_pending and self.lent_now == 0:
                self._destroy()

    # -- the per-iteration step -------------------------------------------------------------
    cdef int poll(self, int64_t timeout_ns) except -1:
        """One step of the device, dispatching what happened (never waits: the loop waits in
        io_uring on this device's fds in sleep mode; see prepare_sleep)."""
        cdef size_t count = 0, i = 0
        cdef kb_rdma_event *events
        cdef kb_rdma_event ev
        if not self.opened:
            return 0
        if self.returned:
            self._take_back_returned()
        self.api.poll(self.r)
        try:
            while True:
                events = self.api.events(self.r, &count)
                if i >= count:
                    break
                ev = events[i]
                if ev.kind == KB_RDMA_EV_RECV and ev.conn.owner is not NULL:
                    events[i].data = NULL       # the buffer is ours until recv_done
                i += 1
                self._dispatch(&ev)
        finally:
            self.api.events_clear(self.r)
            self.n_events += i
        self._finish_poll()
        return <int>i

    cdef bint prepare_sleep(self) except -1:
        """Before the loop sleeps: arm the completion queues and poll until arming finds them
        all still armed (a poll that takes a notification disarms its CQ, and completions that
        came before an arm never wake the fd: sleeping then would strand them).  Returns
        whether a poll found work, in which case the loop must not sleep."""
        cdef kb_rdma_stats st
        self.api.get_stats(self.r, &st)
        if st.fds_gen != self.fds_gen:
            self._watch_fds()
            self.fds_gen = st.fds_gen
        while self.api.arm(self.r):
            if self.poll(0) > 0:
                return True
        return False

    cdef _watch_fds(self):
        cdef int fds[16]
        cdef uint32_t n = self.api.fds(self.r, fds, RDMA_MAX_FDS)
        now = [fds[i] for i in range(n)]
        for fd in self.watched:
            if fd not in now:
                self.loop.remove_reader(fd)
        for fd in now:
            if fd not in self.watched:
                self.loop.add_reader(fd, _rdma_noop)
        self.watched = now

    cdef _dispatch(self, kb_rdma_event *ev):
        cdef RdmaSocket s, ls
        cdef int kind = ev.kind
        if kind == KB_RDMA_EV_ACCEPT:
            if ev.listener.owner is NULL:
                return          # its listener is closed: events_clear releases the new one
            ls = <RdmaSocket>ev.listener.owner
            s = <RdmaSocket>self._new_socket(SOCK_STREAM)
            s._attach_conn(ev.conn)
            if ls.owner_obj is None or not (<Listener>ls.owner_obj).active:
                self._close_sock(s)
                return
            self._accepted(ls, s)
            return
        if kind == KB_RDMA_EV_REJECT or ev.conn.owner is NULL:
            return
        s = <RdmaSocket>ev.conn.owner
        if s.closing and kind == KB_RDMA_EV_RECV:
            self.api.recv_done(s.lend_c, ev.buf)    # closed: nobody reads it
            return
        if kind == KB_RDMA_EV_RECV:
            self.n_rx_bytes += ev.len
            s.rx.append((<uintptr_t>ev.data, ev.len, ev.buf))
            self._mark_rx(s)
        elif kind == KB_RDMA_EV_EOF:
            s.rx_eof = True
            self._mark_rx(s)
        elif kind == KB_RDMA_EV_SENT:
            s.tx_acked += ev.len
            if s.unacked:
                while s.unacked and <uint64_t>s.unacked[0][0] <= s.tx_acked:
                    s.unacked.popleft()
            if s.out is not None:
                self._push(s)
        elif kind == KB_RDMA_EV_CONNECTED:
            fut = s.connect_fut
            s.connect_fut = None
            s._read_addresses()     # the local address is known now
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == KB_RDMA_EV_ERROR:
            self._on_conn_error(s, ev.err)
        elif kind == KB_RDMA_EV_CLOSED:
            if s.closing:
                self._end_closing(s)
            # Otherwise the peer's EOF came first and was (or will be) delivered: the
            # transport hears of the end from it, and a later write fails (EPIPE).

    cdef _on_conn_error(self, RdmaSocket s, int err):
        """The connection is dead (no more events for it)."""
        cdef StreamCore t
        if s.closing:
            self._end_closing(s)
            return
        s.unacked.clear()           # its QP is gone: nothing is read from the Buffers any more
        fut = s.connect_fut
        s.connect_fut = None
        exc = _rdma_oserror(err, fut is not None)
        self._free_rx(s)            # as a reset TCP connection: what was not read is dropped
        s.rx_eof = False
        if fut is not None:
            if not fut.done():
                fut.set_exception(exc)
            return
        t = s.owner_obj if isinstance(s.owner_obj, StreamCore) else None
        if t is not None and (s.out is not None or t._send_inflight):
            s.out = None
            t._on_send_error(exc.errno, None, exc.strerror)
        elif t is not None and t._recv_armed and not t._recv_stopping:
            t._on_recv_error(exc.errno, exc.strerror)
        else:
            s.rx_error = exc        # told when the transport reads again or writes

    cdef void close(self):
        """Abort what this loop left open and free the stack (once every lent Buffer is back:
        they point into its receive buffers)."""
        cdef RdmaSocket s
        if not self.opened:
            return
        if self.returned:
            self._take_back_returned()
        for s in list(self.socks.values()) + list(self.closing):
            if s.c is not NULL:
                self.api.abort(s.c)
            s.unacked.clear()
            self._close_sock(s)
            if s.closing:
                self._end_closing(s)
        self.later = []
        self.kept_later = []
        self.kept_rx = []
        if self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None
        try:
            self.api.poll(self.r)       # the disconnects go out now
            self.api.events_clear(self.r)
        except BaseException:
            pass
        if self.loop is not None and not self.loop.is_closed():
            for fd in self.watched:
                self.loop.remove_reader(fd)
        self.watched = []
        self.opened = False
        self.pool.detach(self)
        for base in self.regions:
            self.api.unreg_mem(self.r, <const void *><uintptr_t>base)
        self.regions.clear()
        if self.lent_now == 0:
            self._destroy()
        else:
            self.free_pending = True

    cdef _destroy(self):
        if self.r is not NULL:
            self.api.destroy(self.r)
            self.r = NULL

    cdef dict stats(self):
        cdef kb_rdma_stats st
        d = {}
        if self.r is not NULL:
            self.api.get_stats(self.r, &st)
            d.update(st)
            d['device_rx_lent'] = d.pop('rx_lent')   # now; the loop's rx_lent is a total
        d.update(self._stack_stats())
        d['poll_mode'] = self.poll_mode
        d['closing'] = len(self.closing)
        d['tx_zc'] = self.n_zc_tx
        d['tx_zc_bytes'] = self.n_zc_tx_bytes
        d['tx_held'] = sum(len((<RdmaSocket>s).unacked) for s in self.socks.values()) + sum(
            len((<RdmaSocket>s).unacked) for s in self.closing)
        return d
