# Stream transports (TCP and Unix), written once against the datapath contract.
#
# Semantics follow asyncio's proactor transports: writes are queued and sent in one gathered
# send per loop iteration; close() flushes the queue first; abort() drops it.


class ZeroCopyProtocol(protocols.Protocol):
    """A stream protocol that receives the loop's receive buffers instead of bytes.

    On kbloop, buffer_received(buf) gets a kbloop.Buffer over the memory the kernel received
    into: no copy.  The protocol may keep it as long as it likes; the memory goes back to the
    loop when the last reference is gone.  A connection that keeps half of the loop's receive
    buffers stops receiving until it lets some go (back-pressure; nothing is lost).
    On other loops data_received() passes the bytes on, so the same code runs on asyncio.
    """

    def buffer_received(self, buf):
        """Called with a bytes-like object (kbloop.Buffer on kbloop, bytes elsewhere)."""
        raise NotImplementedError

    def data_received(self, data):
        self.buffer_received(data)


cdef class StreamCore(TransportCore):
    cdef:
        bint _is_buffered        # protocol is a BufferedProtocol: copy into its buffer
        bint _eof_written        # write_eof() called
        bint _shut_wr_done       # SHUT_WR submitted
        bint _eof_received
        bint _stash_eof          # EOF arrived while paused: deliver after the stash
        list _wbuf               # queued bytes/memoryview objects not yet handed to the datapath
        bint _send_inflight
        object _data_received    # protocol methods, looked up once per protocol
        object _get_buffer, _buffer_updated
        object _empty_waiter     # loop.sendfile(): resolved when every write has been sent
        bint _zero_copy          # protocol is a ZeroCopyProtocol: lend it the receive buffers
        object _buffer_received
        bint _zero_copy_send     # pool Buffers may go out with SEND_ZC (TCP; not AF_UNIX)
        bint _throttled          # holds too many receive buffers: not receiving until some return
        Py_ssize_t _bufs_held    # receive buffers lent to the protocol and not yet returned

    def __init__(self, _CoreLoop loop, sock, protocol, waiter=None, extra=None, server=None):
        self._wbuf = []
        self._init_core(loop, sock, protocol, extra, server, SocketTransport)
        if sock.family != AF_UNIX:
            _set_nodelay(sock)
        self._zero_copy_send = sock.family in (AF_INET, AF_INET6)
        self._start(waiter)

    cdef _set_protocol(self, protocol):
        self._protocol = protocol
        self._zero_copy = isinstance(protocol, ZeroCopyProtocol)
        # kbloop's TLS layer takes the received bytes into its own buffer, as a BufferedProtocol
        self._is_buffered = (isinstance(protocol, protocols.BufferedProtocol)
                             or isinstance(protocol, TLSProtocol))
        if self._zero_copy:
            self._buffer_received = protocol.buffer_received
        elif self._is_buffered:
            self._get_buffer = protocol.get_buffer
            self._buffer_updated = protocol.buffer_updated
        else:
            self._data_received = protocol.data_received

    cdef _set_protocol_methods_none(self):
        self._data_received = self._get_buffer = self._buffer_updated = None
        self._buffer_received = None

    # -- receive side ---------------------------------------------------------------------
    cdef _arm_recv(self):
        self._dp.recv_start(self)

    cdef bint _wants_recv(self):
        return not self._eof_received and not self._stash_eof and not self._throttled

    # The datapath's calls (datapath.pxi) run the protocol in the transport's context.
    cdef void _on_buffer(self, Buffer buf) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_buffer(buf)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _on_data(self, const char *ptr, Py_ssize_t n) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_data(ptr, n)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _on_bytes(self, bytes data) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_bytes(data)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _on_eof(self) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_eof()
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _on_sent(self, Py_ssize_t nbytes, list unsent) except *:
        ctx = self._context
        cdef bint entered = _enter_context(ctx)
        try:
            self._handle_sent(nbytes, unsent)
        finally:
            if entered:
                PyContext_Exit(ctx)

    cdef void _handle_buffer(self, Buffer buf) except *:
        """A ZeroCopyProtocol's data: the receive buffer itself, the protocol's to keep."""
        if self._closing or self._called_lost:
            return
        if self._paused_reading or self._stash:
            self._stash.append(buf)
            return
        try:
            self._buffer_received(buf)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, 'Fatal error: protocol.buffer_received() call failed.')

    cdef void _handle_data(self, const char *ptr, Py_ssize_t n) except *:
        """n bytes arrived in a pool buffer lent for this call only.  A BufferedProtocol
        gets them copied straight into its buffer; the others get a bytes object."""
        if (self._is_buffered and not self._paused_reading and not self._stash
                and not self._closing and not self._called_lost):
            try:
                self._feed_buffered(ptr, n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, 'Fatal error: protocol.data_received() call failed.')
            return
        self._on_bytes(PyBytes_FromStringAndSize(ptr, n))

    cdef void _handle_bytes(self, bytes data) except *:
        """Received data as a bytes object (from _on_data, or from a device that gathered it)."""
        if self._closing or self._called_lost:
            return
        if self._paused_reading or self._stash:
            self._stash.append(data)
            return
        try:
            if self._is_buffered:
                self._feed_buffered(PyBytes_AS_STRING(data), len(data))
            elif self._zero_copy:     # a device that lends no pool buffers: bytes
                self._buffer_received(data)
            else:
                self._data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, 'Fatal error: protocol.data_received() call failed.')

    cdef _feed_buffered(self, const char *ptr, Py_ssize_t n):
        cdef Py_buffer view
        cdef Py_ssize_t m
        while n > 0:
            if self._paused_reading:    # paused from inside buffer_updated(): keep the rest
                self._stash.append(PyBytes_FromStringAndSize(ptr, n))
                return
            buf = self._get_buffer(n)
            PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
            try:
                if view.len == 0:
                    raise RuntimeError('get_buffer() returned an empty buffer')
                m = view.len if view.len < n else n
                memcpy(view.buf, ptr, m)
            finally:
                PyBuffer_Release(&view)
            self._buffer_updated(m)
            ptr += m
            n -= m

    cdef void _handle_eof(self) except *:
        self._recv_armed = False
        if self._closing or self._called_lost:
            return
        if self._paused_reading or self._stash:
            self._stash_eof = True
            return
        self._deliver_eof()

    cdef _deliver_eof(self):
        self._eof_received = True
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, 'Fatal error: protocol.eof_received() call failed.')
            return
        if not keep_open:
            self.close()

    cdef void _on_recv_error(self, int err, str detail=None) except *:
        """detail: what the device knows of the cause, for the message (else strerror)."""
        self._recv_armed = False
        if self._closing or self._called_lost:
            return
        exc = OSError(err, detail or os.strerror(err))
        self._fatal_error(exc, 'Fatal read error on socket transport')

    def _deliver_stash(self):
        """Hand data kept during a pause to the protocol (scheduled by resume_reading)."""
        cdef bytes data
        while self._stash and not self._paused_reading and not self._closing:
            item = self._stash.pop(0)
            try:
                if self._zero_copy:
                    self._buffer_received(item)
                    continue
                # bytes, or a Buffer kept for a ZeroCopyProtocol replaced by set_protocol()
                data = item if type(item) is bytes else bytes(item)
                if self._is_buffered:
                    self._feed_buffered(PyBytes_AS_STRING(data), len(data))
                else:
                    self._data_received(data)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, 'Fatal error: protocol.data_received() call failed.')
                return
        if not self._stash and self._stash_eof and not self._paused_reading and not self._closing:
            self._stash_eof = False
            self._deliver_eof()

    # -- send side ------------------------------------------------------------------------
    cpdef write(self, data):
        if type(data) is not bytes:
            data = _as_sendable(data)
        if self._eof_written:
            raise RuntimeError('Cannot call write() after write_eof()')
        if self._empty_waiter is not None:
            raise RuntimeError('unable to write; sendfile is in progress')
        if not data:
            return
        if self._conn_lost or self._closing:
            # After close() or loss, writes are dropped (asyncio drops them once its buffer is
            # empty; ours is only emptied at the next iteration, so decide on close() itself).
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning('socket.send() raised exception.')
            self._conn_lost += 1
            return
        if self._loop._closed:
            self._write_after_loop_closed(data)
            return
        self._wbuf.append(data)
        self._wbuf_size += len(data)
        if not self._send_inflight:
            self._queue_flush()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data):
        for data in list_of_data:
            self.write(data)

    cdef _write_after_loop_closed(self, data):
        """asyncio's write() sends at once what the socket takes, even when its loop is
        closed, and fails (RuntimeError) only where it would need the loop to wait: so do we.
        Never queue: nothing would ever send it."""
        cdef Py_ssize_t n = 0
        if self._wbuf or self._send_inflight or self._fd < 0 or self._sock is None:
            raise RuntimeError('Event loop is closed')
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            raise RuntimeError('Event loop is closed') from exc
        if n < len(data):
            raise RuntimeError('Event loop is closed')

    cdef _flush(self):
        self._flush_queued = False
        if self._send_inflight or self._sock is None:
            return
        if self._wbuf:
            self._send_inflight = True
            self._dp.send(self)
        elif self._eof_written and not self._shut_wr_done:
            self._shut_wr_done = True
            self._dp.shutdown_write(self)
            # Closed while the last send was in flight (eof_received() returned None, say):
            # close() left the end to the send's completion, which handed it to us.
            if self._closing and not self._lost_scheduled:
                self._schedule_connection_lost(None)

    cdef list take_batch(self):
        """For the datapath: hand over the queued writes (it holds them until completion)."""
        batch = self._wbuf
        self._wbuf = []
        return batch

    cdef void _handle_sent(self, Py_ssize_t nbytes, list unsent) except *:
        """The datapath's send completed; `unsent` is what it could not send, in order."""
        self._send_inflight = False
        if self._lost_scheduled or self._sock is None:
            return      # aborted meanwhile: the queue was dropped, nothing more to send
        self._wbuf_size -= nbytes
        if unsent:
            self._wbuf[0:0] = unsent
        if self._wbuf or (self._eof_written and not self._shut_wr_done):
            self._queue_flush()
        else:
            if self._empty_waiter is not None and not self._empty_waiter.done():
                self._empty_waiter.set_result(None)
            if self._closing:
                self._schedule_connection_lost(None)
        self._maybe_resume_protocol()

    cdef void _on_send_error(self, int err, list unsent, str detail=None) except *:
        self._send_inflight = False
        self._wbuf.clear()
        self._wbuf_size = 0
        if self._lost_scheduled:
            return
        exc = OSError(err, detail or os.strerror(err))
        self._fatal_error(exc, 'Fatal write error on socket transport')

    cdef _drop_send_queue(self):
        self._wbuf.clear()
        if self._empty_waiter is not None and not self._empty_waiter.done():
            self._empty_waiter.set_exception(ConnectionError('Connection is closed by peer'))

    def _make_empty_waiter(self):
        if self._empty_waiter is not None:
            raise RuntimeError('Empty waiter is already set')
        self._empty_waiter = self._loop.create_future()
        if not self._wbuf and not self._send_inflight:
            self._empty_waiter.set_result(None)
        return self._empty_waiter

    def _reset_empty_waiter(self):
        self._empty_waiter = None

    def write_eof(self):
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        if not self._send_inflight:
            self._queue_flush()

    def can_write_eof(self):
        return True

    def close(self):
        if self._closing:
            return
        self._closing = True
        self._stop_receiving()
        self._stash = []
        if not self._wbuf and not self._send_inflight:
            self._schedule_connection_lost(None)


class SocketTransport(_Facade, transports._FlowControlMixin):
    """The asyncio.Transport that stream protocols see.  Like asyncio's own socket transports
    it is a _FlowControlMixin (asyncio's sendfile fallback checks for that); the flow control
    itself is the core's."""

    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE
    _start_tls_compatible = True

    def write(self, data):
        (<StreamCore>self._core).write(data)

    def writelines(self, list_of_data):
        cdef StreamCore core = self._core
        for data in list_of_data:
            core.write(data)

    def write_eof(self):
        self._core.write_eof()

    def can_write_eof(self):
        return True


cdef object _as_sendable(data):
    """What write()/sendto() queue: the data as it is when the call returns (it goes out at the
    end of the iteration, or later).  Immutable data is sent by reference: bytes (subclasses
    too) and read-only views whose memory is a bytes object.  A kbloop.Buffer is the zero-copy
    API: it is sent from where it is and becomes read-only.  Anything else (bytearray, views of
    writable memory, even read-only ones) is copied once, as asyncio does, so that the caller may
    change or reuse it at once after write() returns."""
    if PyBytes_Check(data):
        return data
    if type(data) is Buffer:
        if (<Buffer>data)._chunk is None:
            raise ValueError('operation on a released kbloop.Buffer')
        (<Buffer>data)._freeze()
        return data
    if isinstance(data, memoryview):
        view = <memoryview>data
        if view.readonly and view.c_contiguous and PyBytes_Check(view.obj):
            return view if view.format == 'B' and view.ndim == 1 else view.cast('B')
        return bytes(view)      # in logical order, so non-contiguous views are sent right
    if isinstance(data, bytearray):
        return bytes(data)
    raise TypeError(f'data argument must be a bytes-like object, not {type(data).__name__!r}')


cdef _set_nodelay(sock):
    if sock.family in (AF_INET, AF_INET6) and sock.type == SOCK_STREAM and sock.proto == IPPROTO_TCP:
        sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)


cdef class Listener:
    """A listening socket whose accepted connections become transports (multishot accept)."""
    cdef:
        _CoreLoop _loop
        Datapath _dp
        readonly object sock
        readonly int fd
        object protocol_factory
        object server
        object sslcontext
        object ssl_handshake_timeout, ssl_shutdown_timeout
        bint active
        object _context          # copied at create_server/start_serving
        public object _dp_state

    def __init__(self, _CoreLoop loop, sock, protocol_factory, sslcontext, server,
                 ssl_handshake_timeout, ssl_shutdown_timeout):
        self._loop = loop
        self._dp = loop._datapath_of(sock)
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol_factory = protocol_factory
        self.server = server
        self.sslcontext = sslcontext
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.ssl_shutdown_timeout = ssl_shutdown_timeout
        self._context = PyContext_CopyCurrent()

    cdef start(self):
        if not self.active:
            self.active = True
            self._dp.listen(self)

    cdef stop(self):
        if self.active:
            self.active = False
            # Leave the LISTEN state now, whatever the datapath's mode (an SQPOLL ring cancels
            # asynchronously): new connections are refused the moment Server.close() returns.
            try:
                self.sock.shutdown(SHUT_RD_PY)
            except OSError:
                pass
            self._dp.unlisten(self)

    cdef void _on_accept(self, int fd) except *:
        sock = self.sock
        if not self.active:
            os.close(fd)
            return
        conn = socket_socket(sock.family, sock.type | SOCK_NONBLOCK, sock.proto, fileno=fd)
        self._on_accept_socket(conn)

    cdef void _on_accept_socket(self, conn) except *:
        """A new connection (a kernel socket, or a device's stand-in for one): its transport.
        As asyncio (a task per accepted connection), each connection gets its own copy of the
        server's context: the protocol factory runs in it, and the transport copies it."""
        ctx = PyContext_Copy(self._context)
        PyContext_Enter(ctx)
        try:
            self._accept_socket(conn)
        finally:
            PyContext_Exit(ctx)

    cdef void _accept_socket(self, conn) except *:
        try:
            protocol = self.protocol_factory()
            if self.sslcontext is not None:
                self._loop._make_ssl_transport(
                    conn, protocol, self.sslcontext, server_side=True, server=self.server,
                    ssl_handshake_timeout=self.ssl_handshake_timeout,
                    ssl_shutdown_timeout=self.ssl_shutdown_timeout)
            else:
                StreamCore(self._loop, conn, protocol, server=self.server)
        except (SystemExit, KeyboardInterrupt):
            conn.close()
            raise
        except BaseException as exc:
            conn.close()
            self._loop.call_exception_handler({
                'message': 'Error on transport creation for incoming connection',
                'exception': exc,
            })

    cdef void _on_accept_error(self, int err) except *:
        if not self.active:
            return
        exc = OSError(err, os.strerror(err))
        if err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # As asyncio: log, stop accepting for a while, then resume.
            self._loop.call_exception_handler({
                'message': 'socket.accept() out of system resource',
                'exception': exc, 'socket': trsock.TransportSocket(self.sock),
            })
            self.active = False
            self._loop.call_later(constants.ACCEPT_RETRY_DELAY, self._retry)
        elif err != errno.ECANCELED:
            self._loop.call_exception_handler({
                'message': 'Error accepting a connection', 'exception': exc,
                'socket': trsock.TransportSocket(self.sock),
            })

    cdef void _on_accept_done(self) except *:
        """Multishot accept ended (the device stopped it): re-arm while serving."""
        if self.active:
            self._dp.listen(self)

    def _retry(self):
        if self.sock.fileno() >= 0 and self.server is not None and self.server.is_serving():
            self.start()


cdef class FdWatch:
    """add_reader/add_writer registration: a Handle run (level-triggered) while fd is ready."""
    cdef:
        _CoreLoop _loop
        readonly int fd
        readonly int events     # POLLIN or POLLOUT
        Handle handle
        bint armed
        public object _dp_state

    def __init__(self, _CoreLoop loop, int fd, int events, Handle handle):
        self._loop = loop
        self.fd = fd
        self.events = events
        self.handle = handle

    cdef void _on_ready(self) except *:
        self.armed = False
        if self.handle is not None and not self.handle._cancelled:
            # an I/O handle: with the other I/O of this iteration (a deferred dispatch's
            # handles join the handles running now), before the due timers
            sink = self._loop._io_sink
            (self._loop._ready if sink is None else sink).append(self.handle)
            self._loop._rearm_watches.append(self)
