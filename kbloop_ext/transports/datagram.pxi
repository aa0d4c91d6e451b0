# Datagram transports (UDP and Unix datagram sockets), against the datapath contract.
#
# Each datagram is its own send operation (many may be in flight; all of one iteration go to
# the device in the same batch).  Receives are one-shot recvmsg operations re-armed after
# each datagram, into a buffer of asyncio's max_size, so nothing a selector loop would receive
# is truncated.

cdef Py_ssize_t DATAGRAM_MAX_SIZE = 256 * 1024     # asyncio's _SelectorTransport.max_size
cdef bint SEND_EMPTY_DATAGRAMS = sys.version_info >= (3, 13)   # asyncio ignores them before


cdef class DatagramCore(TransportCore):
    cdef:
        object _address          # the connected remote address (remote_addr=), or None
        list _sendq              # (data, packed sockaddr or None) not yet given to the datapath
        Py_ssize_t _sends_inflight
        object _datagram_received

    def __init__(self, _CoreLoop loop, sock, protocol, address=None, waiter=None, extra=None):
        self._sendq = []
        self._address = address
        self._init_core(loop, sock, protocol, extra, None, DatagramTransport)
        self._start(waiter)

    cdef _set_protocol(self, protocol):
        self._protocol = protocol
        self._datagram_received = protocol.datagram_received

    cdef _set_protocol_methods_none(self):
        self._datagram_received = None

    # -- receive side ---------------------------------------------------------------------
    cdef _arm_recv(self):
        self._dp.dgram_recv_start(self)

    # The datapath's calls (datapath.pxi) run the protocol in the transport's context.
    cdef void _on_datagram(self, bytes data, addr) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_datagram(data, addr)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _on_dgram_error(self, int err) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_dgram_error(err)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _on_dgram_sent(self, Py_ssize_t size, int err) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_dgram_sent(size, err)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _handle_datagram(self, bytes data, addr) except *:
        if self._closing or self._called_lost:
            return
        if self._paused_reading or self._stash:
            self._stash.append((data, addr))
            return
        self._deliver(data, addr)

    cdef _deliver(self, data, addr):
        try:
            self._datagram_received(data, addr)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # asyncio lets this reach the loop's exception handler; the transport stays open.
            self._loop.call_exception_handler({
                'message': 'Exception in datagram_received()',
                'exception': exc, 'transport': self._facade, 'protocol': self._protocol,
            })

    cdef void _handle_dgram_error(self, int err) except *:
        if self._closing or self._called_lost or err == ECANCELED:
            return
        self._protocol.error_received(OSError(err, os.strerror(err)))

    def _deliver_stash(self):
        while self._stash and not self._paused_reading and not self._closing:
            data, addr = self._stash.pop(0)
            self._deliver(data, addr)

    # -- send side ------------------------------------------------------------------------
    def sendto(self, data, addr=None):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f'data argument must be a bytes-like object, '
                            f'not {type(data).__name__!r}')
        if not data and not SEND_EMPTY_DATAGRAMS:
            return
        if self._address:
            if addr not in (None, self._address):
                raise ValueError(f'Invalid address: must be None or {self._address}')
            addr = None         # the socket is connected: send() to its peer
        elif self._extra['peername'] is not None:
            addr = None
        if self._conn_lost or self._closing:
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning('socket.send() raised exception.')
            self._conn_lost += 1
            return
        if type(data) is not bytes:
            data = _as_sendable(data)
        sa = None
        if addr is not None:
            try:
                sa = _pack_sockaddr(self._sock.family, addr, self._sock.type)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
        if self._loop._closed:
            self._sendto_after_loop_closed(data, addr)
            return
        self._sendq.append((data, sa))
        self._wbuf_size += len(data)
        self._queue_flush()
        self._maybe_pause_protocol()

    cdef _sendto_after_loop_closed(self, data, addr):
        """As asyncio: sent at once if the socket takes it; RuntimeError where asyncio would
        need its (closed) loop to wait for room."""
        if self._sendq or self._fd < 0 or self._sock is None:
            raise RuntimeError('Event loop is closed')
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            raise RuntimeError('Event loop is closed') from None
        except OSError as exc:
            self._protocol.error_received(exc)

    cdef _flush(self):
        self._flush_queued = False
        if self._sock is None or not self._sendq:
            return
        queue = self._sendq
        self._sendq = []
        for data, sa in queue:
            self._sends_inflight += 1
            self._dp.dgram_send(self, data, sa)

    cdef void _handle_dgram_sent(self, Py_ssize_t size, int err) except *:
        self._sends_inflight -= 1
        if self._lost_scheduled or self._sock is None:
            return
        self._wbuf_size -= size
        if err and err != ECANCELED:
            self._protocol.error_received(OSError(err, os.strerror(err)))
        self._maybe_resume_protocol()
        if self._closing and not self._sendq and not self._sends_inflight:
            self._schedule_connection_lost(None)

    cdef _drop_send_queue(self):
        self._sendq.clear()

    def close(self):
        if self._closing:
            return
        self._closing = True
        self._stop_receiving()
        self._stash = []
        if not self._sendq and not self._sends_inflight:
            self._schedule_connection_lost(None)


class DatagramTransport(_Facade, transports._FlowControlMixin, transports.DatagramTransport):
    """The asyncio.DatagramTransport that datagram protocols see.  It is an asyncio.Transport
    too, as asyncio's own datagram transport is (its MRO, with our facade first)."""

    def sendto(self, data, addr=None):
        self._core.sendto(data, addr)


cdef object _unpack_sockaddr(const char *p, socklen_t n):
    """A kernel sockaddr as the Python address the socket module would return."""
    cdef unsigned short family
    if n == 0:
        return None
    family = (<unsigned short *>p)[0]
    raw = PyBytes_FromStringAndSize(p, n)
    if family == AF_INET:
        return (inet_ntop(AF_INET, raw[4:8]), struct_unpack('!H', raw[2:4])[0])
    if family == AF_INET6:
        port, flowinfo = struct_unpack('!HI', raw[2:8])
        scope_id = struct_unpack('=I', raw[24:28])[0]
        host = inet_ntop(AF_INET6, raw[8:24])
        if scope_id and host.startswith('fe80'):
            try:
                host += '%' + if_indextoname(scope_id)
            except OSError:
                host += f'%{scope_id}'
        return (host, port, flowinfo, scope_id)
    if family == AF_UNIX:
        path = raw[2:]
        if not path or path[0] == 0:
            return path                 # abstract name (or unnamed peer): bytes, as Python does
        return os.fsdecode(path.split(b'\0', 1)[0])
    return raw
