# What every transport engine shares, whatever its kind (stream, datagram) and whatever the
# datapath: the socket and protocol, closing and connection_lost, pause/resume of reading,
# write-side flow control, extra info, and the once-per-iteration flush hook.
#
# Each engine (StreamCore, DatagramCore) has a facade: a Python subclass of the matching
# asyncio transport class, so that isinstance() checks in user code hold, forwarding to it.

cdef int LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
cdef Py_ssize_t DEFAULT_HIGH_WATER = 64 * 1024


cdef inline bint _enter_context(object ctx) except -1:
    """Make ctx the current context unless it is already (a callback of the same transport
    calling back into it: a context cannot be entered twice).  True if entered: the caller
    leaves it with PyContext_Exit."""
    if <PyObject *>PyThreadState_Get().context == <PyObject *>ctx:
        return False
    PyContext_Enter(ctx)
    return True


cdef class TransportCore:
    cdef:
        _CoreLoop _loop
        Datapath _dp
        readonly object _sock
        readonly int _fd
        object _protocol
        object _context          # the protocol's callbacks run in it (as asyncio's/uvloop's)
        object _facade
        object _server
        dict _extra
        bint _closing
        bint _paused_reading
        bint _protocol_paused    # we called protocol.pause_writing()
        bint _lost_scheduled     # connection_lost() is on the ready queue
        bint _called_lost
        int _conn_lost
        bint _recv_armed         # a receive operation is outstanding in the datapath
        bint _recv_stopping      # ... and we asked the datapath to stop it
        list _stash              # what arrived after pause_reading(), delivered on resume
        Py_ssize_t _wbuf_size    # bytes queued + in flight (asyncio's write buffer size)
        bint _flush_queued       # on the loop's per-iteration flush list
        Py_ssize_t _high_water, _low_water
        public object _dp_state  # datapath-private: the receive op
        public object _dp_send   # datapath-private: the send op, reused

    cdef _init_core(self, _CoreLoop loop, sock, protocol, extra, server, facade_class):
        self._loop = loop
        self._dp = loop._datapath_of(sock)
        self._sock = sock
        self._fd = sock.fileno()
        # A copy of the creator's context: the caller of create_connection & co., or the
        # accepted connection's own copy of its server's (Listener._on_accept_socket).
        self._context = PyContext_CopyCurrent()
        self._stash = []
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._extra = {} if extra is None else dict(extra)
        self._extra['socket'] = trsock.TransportSocket(sock)
        try:
            self._extra['sockname'] = sock.getsockname()
        except OSError:
            self._extra['sockname'] = None
        if 'peername' not in self._extra:
            try:
                self._extra['peername'] = sock.getpeername()
            except OSError:
                self._extra['peername'] = None
        self._facade = facade_class(self)
        loop._transports[self._fd] = self
        self._dp.attach(self)
        self._set_protocol(protocol)
        self._server = server
        if server is not None:
            server._attach(self._facade)

    cdef _start(self, waiter):
        """connection_made, then reading, then the waiter: asyncio's order."""
        ctx = self._context
        self._loop._call_soon(self._protocol.connection_made, (self._facade,), ctx)
        self._loop._call_soon(self._start_reading, (), ctx)
        if waiter is not None:
            self._loop._call_soon(futures._set_result_unless_cancelled, (waiter, None), ctx)

    def __repr__(self):
        state = 'closing' if self._closing else ('closed' if self._sock is None else 'open')
        return f'<kbloop {type(self).__name__} fd={self._fd} {state}>'

    # -- hooks of each kind of transport ---------------------------------------------------
    cdef _set_protocol(self, protocol):
        self._protocol = protocol

    cdef _arm_recv(self):
        raise NotImplementedError

    cdef _flush(self):
        """Called once per loop iteration, before the datapath submits."""
        self._flush_queued = False

    cdef _drop_send_queue(self):
        pass

    cdef bint _wants_recv(self):
        return True

    def _deliver_stash(self):
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------------------
    def _start_reading(self):
        if not self._closing and not self._paused_reading and not self._recv_armed:
            self._recv_armed = True
            self._recv_stopping = False
            self._arm_recv()

    cdef void _on_recv_done(self) except *:
        """The receive operation ended without an error (stopped, or the device ended it):
        re-arm it if we still want data."""
        self._recv_armed = False
        self._recv_stopping = False
        if self._wants_recv():
            self._start_reading()

    cdef _stop_receiving(self):
        if self._recv_armed and not self._recv_stopping:
            self._recv_stopping = True
            self._dp.recv_stop(self)

    def pause_reading(self):
        if self._closing or self._paused_reading:
            return
        self._paused_reading = True
        self._stop_receiving()
        if self._loop._debug:
            logger.debug('%r pauses reading', self)

    def resume_reading(self):
        if self._closing or not self._paused_reading:
            return
        self._paused_reading = False
        if self._loop._closed:
            raise RuntimeError('Event loop is closed')    # asyncio's, from add_reader
        if self._stash or not self._wants_recv():
            self._loop._call_soon(self._deliver_stash, (), self._context)
        if self._wants_recv():
            self._start_reading()
        if self._loop._debug:
            logger.debug('%r resumes reading', self)

    def is_reading(self):
        return not self._paused_reading and not self._closing

    # -- write-side flow control -----------------------------------------------------------
    cdef inline void _queue_flush(self):
        if not self._flush_queued:
            self._flush_queued = True
            self._loop._flush_queue.append(self)

    cdef _maybe_pause_protocol(self):
        if self._wbuf_size <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                'message': 'protocol.pause_writing() failed',
                'exception': exc, 'transport': self._facade, 'protocol': self._protocol,
            })

    cdef _maybe_resume_protocol(self):
        if self._protocol_paused and self._wbuf_size <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler({
                    'message': 'protocol.resume_writing() failed',
                    'exception': exc, 'transport': self._facade, 'protocol': self._protocol,
                })

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f'high ({high!r}) must be >= low ({low!r}) must be >= 0')
        self._high_water = high
        self._low_water = low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self):
        return (self._low_water, self._high_water)

    def get_write_buffer_size(self):
        return self._wbuf_size

    # -- closing ---------------------------------------------------------------------------
    def is_closing(self):
        return self._closing

    def abort(self):
        self._force_close(None)

    cdef _fatal_error(self, exc, message):
        if isinstance(exc, OSError):
            if self._loop._debug:
                logger.debug('%r: %s', self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                'message': message, 'exception': exc,
                'transport': self._facade, 'protocol': self._protocol,
            })
        self._force_close(exc)

    cdef _force_close(self, exc):
        if self._lost_scheduled:
            return
        self._drop_send_queue()
        self._wbuf_size = 0
        if not self._closing:
            self._closing = True
            self._stop_receiving()
            self._stash = []
        self._schedule_connection_lost(exc)

    cdef _schedule_connection_lost(self, exc):
        self._lost_scheduled = True
        self._conn_lost += 1
        if self._loop._closed:
            # Closed after its loop (a finally:, an atexit hook, __del__): asyncio's
            # RuntimeError, as its call_soon() raises; but the socket is let go now rather
            # than whenever the transport is collected.
            self._release_socket()
            raise RuntimeError('Event loop is closed')
        self._loop._call_soon(self._call_connection_lost, (exc,), self._context)

    cdef _release_socket(self):
        sock = self._sock
        if sock is not None:
            self._sock = None
            if self._loop._transports.get(self._fd) is self:
                del self._loop._transports[self._fd]
            self._dp.close_socket(sock)

    def _call_connection_lost(self, exc):
        if self._called_lost:
            return
        self._called_lost = True
        try:
            if self._protocol is not None:
                self._protocol.connection_lost(exc)
        finally:
            self._release_socket()
            self._protocol = None
            self._set_protocol_methods_none()
            # ops still in flight keep us alive until their completion; drop our side of the
            # reference cycle so that refcounting, not the GC, frees the transport
            self._dp_state = None
            self._dp_send = None
            server = self._server
            if server is not None:
                self._server = None
                server._detach(self._facade)
            self._facade = None

    cdef _set_protocol_methods_none(self):
        pass

    # -- misc ------------------------------------------------------------------------------
    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def get_protocol(self):
        return self._protocol

    def set_protocol(self, protocol):
        self._set_protocol(protocol)


class _Facade:
    """Forwarding shared by the asyncio-visible transport classes."""

    def __init__(self, TransportCore core):
        transports.BaseTransport.__init__(self, None)
        self._core = core
        self._loop = core._loop    # asyncio's streams and sslproto read transport._loop

    def __repr__(self):
        cdef TransportCore core = self._core
        state = 'closing' if core._closing else 'open'
        return f'<kbloop.{type(self).__name__} fd={core._fd} {state}>'

    def close(self):
        self._core.close()

    def abort(self):
        self._core.abort()

    def is_closing(self):
        return (<TransportCore>self._core)._closing

    def get_extra_info(self, name, default=None):
        return (<TransportCore>self._core)._extra.get(name, default)

    def pause_reading(self):
        self._core.pause_reading()

    def resume_reading(self):
        self._core.resume_reading()

    def is_reading(self):
        return self._core.is_reading()

    def set_write_buffer_limits(self, high=None, low=None):
        self._core.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self):
        return self._core.get_write_buffer_limits()

    def get_write_buffer_size(self):
        return (<TransportCore>self._core)._wbuf_size

    def get_protocol(self):
        return (<TransportCore>self._core)._protocol

    def set_protocol(self, protocol):
        self._core.set_protocol(protocol)

    @property
    def _protocol_paused(self):      # read by asyncio.streams / base_events._SendfileFallback
        return (<TransportCore>self._core)._protocol_paused

    def _force_close(self, exc):     # called by asyncio's sslproto on fatal TLS errors
        (<TransportCore>self._core)._force_close(exc)

    def __del__(self, _warn=warnings.warn):
        cdef TransportCore core = self._core
        if core is not None and core._sock is not None and not core._closing:
            _warn(f'unclosed transport {self!r}', ResourceWarning, source=self)
