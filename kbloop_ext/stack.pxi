# What the datapaths that carry their own transport protocol share: DPDK (lwIP's TCP/IP over a
# poll-mode NIC) and RDMA (framed streams over RC queue pairs).  Neither has file descriptors
# for its connections, so both give the transports a stand-in for a socket (StackSocket), route
# their device's events to the transport that owns the socket, and defer completions to the
# end of their poll step, never running them inside the transport's own call.
#
# A device subclasses StackSocket (for its connection handle) and StackDatapath (for what it
# does with it): listen, connect, _push (send), _deliver/_lend (receive), _give_back (a lent
# buffer came back), _close_sock, poll.

from libc.stdint cimport uint16_t, uintptr_t
from cpython.pycapsule cimport PyCapsule_GetPointer
from socket import (SO_TYPE as _SO_TYPE, SO_ERROR as _SO_ERROR, SO_REUSEPORT as _SO_REUSEPORT,
                    IPPROTO_UDP,
                    SHUT_WR as _SHUT_WR, SHUT_RDWR as _SHUT_RDWR)

# Ports that bind(port 0) hands out to listeners: below the range lwIP and the kernel use for
# active opens, so a listener and an outgoing connection never want the same port.
cdef int EPHEMERAL_LISTEN_FIRST = 32768, EPHEMERAL_LISTEN_LAST = 49151

# Deferred completions, run at the end of poll(): never from inside the transport's own call.
cdef size_t DELIVER_MAX = 256 * 1024   # bytes per data_received() call, as asyncio reads
cdef int LATER_DRAIN = 1, LATER_RECV_DONE = 2, LATER_SENT = 3, LATER_SEND_ERROR = 4
cdef int LATER_DGRAM_SENT = 5, LATER_ACCEPT = 6
# Received pieces a ZeroCopyProtocol may hold (as Buffers over the device's memory) before its
# connection stops delivering; it resumes once half are back.  Their room in the peer's window
# (lwIP's receive window, RDMA's credits) comes back only as they do, so the peer stops too.
cdef Py_ssize_t ZC_HOLD_LIMIT = 512


cdef uint32_t _ip4_be(str address) except? 0:
    """A dotted IPv4 address in network byte order, as it lies in memory."""
    try:
        return struct_unpack('=I', inet_pton(AF_INET, address))[0]
    except OSError:
        raise OSError(errno.EINVAL, f'not an IPv4 address: {address!r}') from None


cdef str _ip4_str(uint32_t address):
    return inet_ntop(AF_INET, struct_pack('=I', address))


_next_stack_fileno = itertools.count(1)


cdef class StackSocket:
    """A stand-in for socket.socket over a connection or listener of a datapath with its own
    transport protocol (DPDK's TCP, RDMA's streams): what transport.get_extra_info('socket')
    and Server.sockets show.

    It answers what asyncio code asks of a socket (family, type, proto, getsockname,
    getpeername, TCP_NODELAY, SO_KEEPALIVE) but has no file descriptor: fileno() is a negative
    number, unique in the process, that keys the loop's tables and that no system call takes.
    Operations that need a kernel socket (loop.sock_*, sendfile's zero-copy path) are refused
    or fall back (docs/dpdk.md, docs/rdma.md)."""
    cdef:
        StackDatapath dp
        readonly int family, type, proto
        int _fileno
        object _local, _peer
        bint _listening, _nodelay, _keepalive
        object owner_obj         # the Listener or transport core that its events go to
        list rx                  # received pieces not delivered yet (the device's handles)
        bint rx_eof              # the peer's EOF, not delivered yet
        bint rx_marked           # on the datapath's list to deliver after this poll's events
        object rx_error          # an error that came before a transport was attached
        object connect_fut
        list out                 # the send batch being handed to the device
        Py_ssize_t out_i, out_off, out_total
        Py_ssize_t zc_held_bytes # received bytes lent as Buffers and not returned yet
        object unacked           # (end offset, Buffer) sent without a copy, not acked yet
        uint64_t tx_queued       # bytes handed to the device, and acknowledged by the peer
        uint64_t tx_acked

    def __cinit__(self):
        self.family = AF_INET
        self.type = SOCK_STREAM
        self.proto = IPPROTO_TCP
        self.rx = []
        self.unacked = collections.deque()

    def __repr__(self):
        state = 'closed' if self.dp is None else ('listening' if self._listening else 'open')
        device = '' if self.dp is None else f' ({self.dp.name})'
        return (f'<kbloop.{type(self).__name__} {state} fd={self._fileno} laddr={self._local} '
                f'raddr={self._peer}{device}>')

    # -- what asyncio and applications ask of a socket -------------------------------------
    def fileno(self):
        return self._fileno

    def detach(self):
        return -1

    def getsockname(self):
        if self._local is None:
            return ('0.0.0.0', 0)
        return self._local

    def getpeername(self):
        if self._peer is None:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return self._peer

    def setblocking(self, flag):
        pass

    def settimeout(self, value):
        if value:
            raise ValueError(f'a {type(self).__name__} is non-blocking only')

    def gettimeout(self):
        return 0.0

    def setsockopt(self, level, option, value, *rest):
        if level == IPPROTO_TCP and option == TCP_NODELAY:
            self._nodelay = bool(value)
        elif level == SOL_SOCKET and option == SO_KEEPALIVE:
            self._keepalive = bool(value)
        elif level == SOL_SOCKET and option in (SO_REUSEADDR, _SO_REUSEPORT):
            return      # listeners are bound without TIME_WAIT conflicts anyway
        else:
            raise OSError(errno.ENOPROTOOPT, f'option {level}/{option} is not supported on '
                                             f'a {type(self).__name__}')
        if self.dp is not None:
            self.dp._apply_options(self)

    def getsockopt(self, level, option, buflen=None):
        if level == IPPROTO_TCP and option == TCP_NODELAY:
            return int(self._nodelay)
        if level == SOL_SOCKET and option == SO_KEEPALIVE:
            return int(self._keepalive)
        if level == SOL_SOCKET and option == _SO_TYPE:
            return self.type
        if level == SOL_SOCKET and option == _SO_ERROR:
            return 0
        raise OSError(errno.ENOPROTOOPT, f'option {level}/{option} is not supported on '
                                         f'a {type(self).__name__}')

    def bind(self, address):
        self.dp._bind_sock(self, address)

    def listen(self, backlog=128):
        self.dp._listen(self, backlog)

    def shutdown(self, how):
        if self.dp is None:
            return
        if self._listening:     # stop accepting at once
            self.dp._close_sock(self)
        elif how in (_SHUT_WR, _SHUT_RDWR):
            self.dp._shutdown_sock(self)

    def close(self):
        if self.dp is not None:
            self.dp._close_sock(self)


cdef class StackDatapath(Datapath):
    """The part of the DPDK and RDMA datapaths that does not depend on the device: sockets and
    ports, routing, the deferred completions, delivery and lent receive buffers."""
    cdef:
        readonly str ip          # this stack's (first) IPv4 address, for create_server lists
        dict socks               # fileno -> StackSocket with a live device connection
        set bound_ports
        list later               # (kind, sock, value) completions for the end of poll()
        list rx_ready            # sockets that received something in this poll
        list kept_later, kept_rx # what a deferring poll left for dispatch_deferred()
        list returned            # (token, length, socket) of lent Buffers that came back
        int next_port
        bint opened
        readonly bint datagrams  # UDP runs on this stack too
        readonly bint spins      # the loop spins on poll(); else it sleeps (prepare_sleep)
        uint64_t n_events, n_rx_bytes, n_tx_bytes
        uint64_t n_rx_lent, n_rx_lent_bytes, n_zc_throttles
        Py_ssize_t lent_now      # Buffers lent to ZeroCopyProtocols and not back yet

    def __cinit__(self):
        self.spins = True
        self.socks = {}
        self.bound_ports = set()
        self.later = []
        self.rx_ready = []
        self.kept_later = []
        self.kept_rx = []
        self.returned = []
        self.next_port = EPHEMERAL_LISTEN_FIRST

    # -- routing: which addresses this stack serves (create_server) and reaches (connect) ----
    cpdef bint serves(self, host):
        raise NotImplementedError

    cpdef bint reaches(self, str address):
        raise NotImplementedError

    # -- what each device does ------------------------------------------------------------------
    cdef bint prepare_sleep(self) except -1:
        """A device that can sleep: get ready to be woken by its fds (the loop watches them),
        poll once more, and say whether that found work (then the loop must not sleep)."""
        return False

    cdef StackSocket _new_socket(self, int type):
        raise NotImplementedError

    cdef _listen(self, StackSocket s, int backlog):
        raise NotImplementedError

    cdef _close_sock(self, StackSocket s):
        raise NotImplementedError

    cdef _shutdown_sock(self, StackSocket s):
        raise NotImplementedError

    cdef _apply_options(self, StackSocket s):
        """s's TCP_NODELAY / SO_KEEPALIVE changed."""
        pass

    cdef _push(self, StackSocket s):
        """Hand as much of s.out to the device as it takes; LATER_SENT when all of it is in."""
        raise NotImplementedError

    cdef _deliver(self, StackSocket s, StreamCore t):
        """Give the transport some of s.rx as bytes (one copy), and the room back to the peer."""
        raise NotImplementedError

    cdef _lend(self, StackSocket s, StreamCore t):
        """Give a ZeroCopyProtocol the first of s.rx as Buffers (_lend_piece), no copy."""
        raise NotImplementedError

    cdef _give_back(self, StackSocket s, uintptr_t token, uint32_t number):
        """A lent piece came back (in the loop's thread): to the device, room to the peer."""
        raise NotImplementedError

    cdef _give_back_late(self, uintptr_t token, uint32_t number, object holder):
        """A lent piece came back after the datapath closed."""
        pass

    # -- sockets ------------------------------------------------------------------------------
    def socket(self, int type=SOCK_STREAM):
        """A new, unconnected stack socket."""
        self._check_open()
        if type != SOCK_STREAM and not (type == SOCK_DGRAM and self.datagrams):
            raise OSError(errno.EPROTONOSUPPORT, f'the {self.name} datapath has no such sockets')
        return self._new_socket(type)

    cdef _init_socket(self, StackSocket s):
        s.dp = self
        s._fileno = -next(_next_stack_fileno)

    cdef _check_open(self):
        if not self.opened:
            raise RuntimeError(f'the {self.name} datapath is closed')

    cdef _bind_sock(self, StackSocket s, address):
        cdef int port
        if not isinstance(address, tuple) or len(address) != 2:
            raise TypeError('AF_INET address must be a pair (host, port)')
        host, port = address
        if not self.serves(host):
            raise OSError(errno.EADDRNOTAVAIL,
                          f'{host!r} is not an address of the {self.name} datapath ({self.ip})')
        if not 0 <= port <= 65535:
            raise OverflowError('bind(): port must be 0-65535.')
        if port == 0:
            port = self._free_port()
        elif port in self.bound_ports:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self.bound_ports.add(port)
        s._local = ('0.0.0.0' if host in (None, '') else host, port)

    cdef _unbind(self, StackSocket s):
        if s.type == SOCK_STREAM and s._local is not None and (s._listening or s._peer is None):
            self.bound_ports.discard(s._local[1])
            s._listening = False

    cdef int _free_port(self) except -1:
        cdef int tries
        for tries in range(EPHEMERAL_LISTEN_LAST - EPHEMERAL_LISTEN_FIRST + 1):
            port = self.next_port
            self.next_port = (EPHEMERAL_LISTEN_FIRST if port == EPHEMERAL_LISTEN_LAST
                              else port + 1)
            if port not in self.bound_ports:
                return port
        raise OSError(errno.EADDRINUSE, 'no free port left for listeners')

    cdef _mark_rx(self, StackSocket s):
        """s has something to deliver once this poll's events are all in (a connection's data
        of one poll reaches the protocol in one call, not one per segment or frame)."""
        if not s.rx_marked:
            s.rx_marked = True
            self.rx_ready.append(s)

    cdef _deliver_marked(self):
        ready = self.rx_ready
        self.rx_ready = []
        self._drain_all(ready)

    cdef _drain_all(self, list ready):
        for s in ready:
            (<StackSocket>s).rx_marked = False
            self._drain(s)

    cdef bint _is_reading(self, StackSocket s):
        """s's transport (stream or datagram) was reading when this poll found its data."""
        cdef TransportCore t = (s.owner_obj if isinstance(s.owner_obj, TransportCore)
                                else None)
        return t is not None and t._recv_armed and not t._recv_stopping

    cdef _accepted(self, StackSocket ls, StackSocket s):
        """A connection came in on listening socket ls: its transport is made with the
        completions (the protocol factory runs there), after the ready callbacks."""
        self.later.append((LATER_ACCEPT, ls, s))

    cdef _finish_poll(self):
        """End of poll(): run this poll's completions, or keep them for dispatch_deferred()
        when the loop has ready callbacks to run first (datapath.pxi: order)."""
        if self.kept_rx or self.kept_later:
            # Kept by an iteration that a KeyboardInterrupt cut short: due before anything new.
            self.dispatch_deferred()
        if self.defer:
            if self.rx_ready:
                # Only for transports reading now: one that starts reading in the ready
                # callbacks (connection_made, _start_reading) gets its data at the next poll,
                # after its creator resumed, as asyncio registers its reader only then.
                for sock in self.rx_ready:
                    if self._is_reading(<StackSocket>sock):
                        self.kept_rx.append(sock)
                    else:
                        (<StackSocket>sock).rx_marked = False   # recv_start drains it later
                self.rx_ready = []
            if self.later:
                self.kept_later.extend(self.later)
                self.later = []
            return
        if self.rx_ready:
            self._deliver_marked()
        if self.later:
            self._run_later()

    cdef int dispatch_deferred(self) except -1:
        # Only what that poll found: what the ready callbacks queued since (a drain after
        # _start_reading, say) waits for the next poll, as it would without deferring.
        cdef list rx = self.kept_rx, todo = self.kept_later
        if not rx and not todo:
            return 0
        self.kept_rx = []
        self.kept_later = []
        if rx:
            self._drain_all(rx)
        if todo:
            self._run_items(todo)
        return len(rx) + len(todo)

    # -- the contract: streams -------------------------------------------------------------
    cdef int attach(self, TransportCore t) except -1:
        (<StackSocket>t._sock).owner_obj = t
        return 0

    cdef int listen(self, Listener listener) except -1:
        (<StackSocket>listener.sock).owner_obj = listener
        return 0

    cdef int unlisten(self, Listener listener) except -1:
        (<StackSocket>listener.sock).owner_obj = None
        return 0

    cdef int recv_start(self, StreamCore t) except -1:
        cdef StackSocket s = t._sock
        if s.rx or s.rx_eof or s.rx_error is not None:
            self.later.append((LATER_DRAIN, s, None))
        return 0

    cdef int recv_stop(self, TransportCore t) except -1:
        self.later.append((LATER_RECV_DONE, t._sock, None))
        return 0

    cdef int send(self, StreamCore t) except -1:
        cdef StackSocket s = t._sock
        cdef Py_ssize_t total = 0
        batch = t.take_batch()
        if s.rx_error is not None:      # reset while nobody was reading
            exc = s.rx_error
            s.rx_error = None
            self.later.append((LATER_SEND_ERROR, s, exc))
            return 0
        for item in batch:
            total += len(item)
        s.out = batch
        s.out_i = s.out_off = 0
        s.out_total = total
        self._push(s)
        return 0

    cdef int shutdown_write(self, StreamCore t) except -1:
        self._shutdown_sock(<StackSocket>t._sock)
        return 0

    cdef int close_socket(self, sock) except -1:
        self._close_sock(<StackSocket>sock)
        return 0

    # -- receiving -----------------------------------------------------------------------------
    cdef _drain(self, StackSocket s):
        """Deliver what s holds if its transport is reading: its data (up to DELIVER_MAX bytes
        per call, or as Buffers), then the peer's EOF or an error that came meanwhile."""
        cdef StreamCore t = s.owner_obj if isinstance(s.owner_obj, StreamCore) else None
        if t is None:
            return
        while s.rx and t._recv_armed and not t._recv_stopping and not t._throttled:
            if t._zero_copy:
                self._lend(s, t)
            else:
                self._deliver(s, t)
        if s.rx or not t._recv_armed or t._recv_stopping:
            return
        if s.rx_error is not None:
            exc = s.rx_error
            s.rx_error = None
            t._on_recv_error(exc.errno, exc.strerror)
        elif s.rx_eof:
            s.rx_eof = False
            t._on_eof()

    cdef _lend_piece(self, StackSocket s, StreamCore t, const void *payload, size_t n,
                     uintptr_t token):
        """One received piece to a ZeroCopyProtocol as a Buffer over the device's memory; it
        comes back through recv_buffer_returned(n, token, s)."""
        cdef _Chunk chunk = _Chunk.__new__(_Chunk)
        chunk.home = self
        chunk.kind = CHUNK_RECV
        chunk.number = <uint32_t>n
        chunk.token = token
        chunk.holder = s
        s.zc_held_bytes += n
        self.lent_now += 1
        t._bufs_held += 1
        self.n_rx_lent += 1
        self.n_rx_lent_bytes += n
        if t._bufs_held >= ZC_HOLD_LIMIT and not t._throttled:
            t._throttled = True     # _drain stops here until half of them are back
            self.n_zc_throttles += 1
        t._on_buffer(_new_buffer(chunk, <char *>payload, n))

    cdef void recv_buffer_returned(self, uint32_t number, uintptr_t token, object holder) noexcept:
        # Queued for the loop's next poll: the last reference may go in any thread, and the
        # device is single-threaded.  A datapath that is closed takes it back at once.
        if self.opened:
            self.returned.append((token, number, holder))
            return
        self.lent_now -= 1
        try:
            self._give_back_late(token, number, holder)
        except BaseException:
            pass

    cdef _take_back_returned(self):
        cdef StackSocket s
        cdef StreamCore t
        returned = self.returned
        self.returned = []
        for token, number, holder in returned:
            s = <StackSocket>holder
            self.lent_now -= 1
            s.zc_held_bytes -= number
            self._give_back(s, token, number)
            t = s.owner_obj if isinstance(s.owner_obj, StreamCore) else None
            if t is None:
                continue
            t._bufs_held -= 1
            if t._throttled and t._bufs_held <= ZC_HOLD_LIMIT // 2:
                t._throttled = False
                self.later.append((LATER_DRAIN, s, None))

    # -- completions at the end of poll() --------------------------------------------------------
    cdef _run_later(self):
        cdef list todo
        while self.later:
            todo = self.later
            self.later = []
            self._run_items(todo)

    cdef _run_items(self, list todo):
        cdef StackSocket s
        cdef StreamCore t
        cdef int kind
        for kind, s, value in todo:
            if kind == LATER_RECV_DONE and isinstance(s.owner_obj, TransportCore):
                (<TransportCore>s.owner_obj)._on_recv_done()
                continue
            if kind == LATER_ACCEPT:
                if isinstance(s.owner_obj, Listener) and (<Listener>s.owner_obj).active:
                    (<Listener>s.owner_obj)._on_accept_socket(value)
                else:
                    self._close_sock(<StackSocket>value)
                continue
            if kind == LATER_DGRAM_SENT:
                if isinstance(s.owner_obj, DatagramCore):
                    (<DatagramCore>s.owner_obj)._on_dgram_sent(value[0], value[1])
                continue
            if kind == LATER_DRAIN:
                self._drain(s)
                continue
            t = s.owner_obj if isinstance(s.owner_obj, StreamCore) else None
            if t is None:
                continue
            if kind == LATER_SENT:
                t._on_sent(value, None)
            elif kind == LATER_SEND_ERROR:
                t._on_send_error(value.errno, None, value.strerror)

    cdef dict _stack_stats(self):
        return {
            'events': self.n_events,
            'socket_rx_bytes': self.n_rx_bytes,
            'socket_tx_bytes': self.n_tx_bytes,
            'sockets': len(self.socks),
            'rx_lent': self.n_rx_lent,
            'rx_lent_bytes': self.n_rx_lent_bytes,
            'rx_lent_now': self.lent_now,
            'zc_throttles': self.n_zc_throttles,
        }
