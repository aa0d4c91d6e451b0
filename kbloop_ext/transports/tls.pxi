# kbloop's TLS transport: a protocol layered on any stream transport (StreamCore on io_uring,
# DPDK, RDMA...), over ssl.MemoryBIO/SSLObject.  The state machine is the one asyncio and uvloop
# share (UNWRAPPED -> DO_HANDSHAKE -> WRAPPED -> FLUSHING -> SHUTDOWN), with uvloop's shutdown
# semantics: what the app wrote before close() is flushed before our close_notify, data the peer
# wrote before its close_notify is delivered (even across pause_reading()), data after a
# close_notify (ours sent or theirs received) is discarded, and the shutdown timeout always ends
# the connection.  See docs/tls.md.

import ssl as _ssl_mod

cdef object SSLAgainErrors = (_ssl_mod.SSLWantReadError, _ssl_mod.SSLSyscallError)
cdef object SSLWantReadError = _ssl_mod.SSLWantReadError
cdef object SSLZeroReturnError = _ssl_mod.SSLZeroReturnError
cdef object SSLError = _ssl_mod.SSLError
cdef object CertificateError = _ssl_mod.CertificateError
cdef object MemoryBIO = _ssl_mod.MemoryBIO

cdef enum TLSState:
    UNWRAPPED = 0
    DO_HANDSHAKE = 1
    WRAPPED = 2
    FLUSHING = 3
    SHUTDOWN = 4

cdef enum AppState:
    APP_INIT = 0
    APP_CON_MADE = 1
    APP_EOF = 2
    APP_CON_LOST = 3

cdef Py_ssize_t TLS_READ_MAX = 256 * 1024     # one SSLObject.read()
cdef Py_ssize_t TLS_RECV_BUF = 256 * 1024     # what the lower transport copies into at once


cdef _flow_limits(high, low, Py_ssize_t default_high):
    if high is None:
        high = default_high if low is None else 4 * low
    if low is None:
        low = high // 4
    if not high >= low >= 0:
        raise ValueError(f'high ({high!r}) must be >= low ({low!r}) must be >= 0')
    return high, low


def _tls_default_context(server_side, server_hostname):
    if server_side:
        raise ValueError('Server side SSL needs a valid SSLContext')
    ctx = _ssl_mod.create_default_context()
    if not server_hostname:
        ctx.check_hostname = False
    return ctx


cdef class TLSProtocol:
    """The lower transport's protocol (it sees a BufferedProtocol) and the engine of the
    app-facing TLSTransport."""
    cdef:
        object _loop
        object _transport            # the lower transport (a kbloop facade)
        StreamCore _core             # its core when it is ours: direct calls
        object _app_protocol
        bint _app_is_buffer
        object _app_get_buffer, _app_buffer_updated, _app_data_received
        object _app_transport
        object _sslcontext
        object _sslobj
        object _incoming, _outgoing
        object _waiter
        bint _server_side
        object _server_hostname
        double _handshake_timeout, _shutdown_timeout
        object _handshake_timer, _shutdown_timer
        int _state
        int _app_state
        list _write_backlog
        Py_ssize_t _write_buffer_size
        bint _ssl_writing_paused     # the lower transport asked us to stop writing
        bint _app_reading_paused
        bint _ssl_reading_paused     # we paused the lower transport (incoming BIO is full)
        bint _app_writing_paused
        Py_ssize_t _in_high, _in_low, _out_high, _out_low
        bint _eof_received           # the lower transport saw the peer's FIN
        bint _close_notify           # the peer's close_notify was read: ignore what follows
        bint _read_scheduled
        bint _app_released           # the app transport let go of us (closed twice)
        int _conn_lost
        dict _extra
        bytearray _rbuf
        object _rview

    def __init__(self, loop, app_protocol, sslcontext, waiter, bint server_side=False,
                 server_hostname=None, call_connection_made=True,
                 ssl_handshake_timeout=None, ssl_shutdown_timeout=None):
        if ssl_handshake_timeout is None:
            ssl_handshake_timeout = constants.SSL_HANDSHAKE_TIMEOUT
        elif ssl_handshake_timeout <= 0:
            raise ValueError(f'ssl_handshake_timeout should be a positive number, '
                             f'got {ssl_handshake_timeout}')
        if ssl_shutdown_timeout is None:
            ssl_shutdown_timeout = constants.SSL_SHUTDOWN_TIMEOUT
        elif ssl_shutdown_timeout <= 0:
            raise ValueError(f'ssl_shutdown_timeout should be a positive number, '
                             f'got {ssl_shutdown_timeout}')
        if not sslcontext:
            sslcontext = _tls_default_context(server_side, server_hostname)
        self._loop = loop
        self._server_side = server_side
        self._server_hostname = server_hostname if server_hostname and not server_side else None
        self._sslcontext = sslcontext
        self._extra = {'sslcontext': sslcontext}
        self._write_backlog = []
        self._waiter = waiter
        self._set_app_protocol(app_protocol)
        self._handshake_timeout = ssl_handshake_timeout
        self._shutdown_timeout = ssl_shutdown_timeout
        self._incoming = MemoryBIO()
        self._outgoing = MemoryBIO()
        self._state = UNWRAPPED
        self._app_state = APP_INIT if call_connection_made else APP_CON_MADE
        self._sslobj = sslcontext.wrap_bio(self._incoming, self._outgoing,
                                           server_side=server_side,
                                           server_hostname=self._server_hostname)
        self._in_high, self._in_low = _flow_limits(
            None, None, constants.FLOW_CONTROL_HIGH_WATER_SSL_READ)
        self._out_high, self._out_low = _flow_limits(
            None, None, constants.FLOW_CONTROL_HIGH_WATER_SSL_WRITE)
        self._rbuf = bytearray(TLS_RECV_BUF)
        self._rview = memoryview(self._rbuf)
        self._app_transport = TLSTransport(loop, self)

    def __repr__(self):
        return f'<kbloop TLSProtocol state={self._state}>'

    cdef _set_app_protocol(self, app_protocol):
        self._app_protocol = app_protocol
        # TLS over TLS (start_tls on a TLS transport): the inner layer reads as a buffer
        self._app_is_buffer = (isinstance(app_protocol, protocols.BufferedProtocol)
                               or isinstance(app_protocol, TLSProtocol))
        if self._app_is_buffer:
            self._app_get_buffer = app_protocol.get_buffer
            self._app_buffer_updated = app_protocol.buffer_updated
            self._app_data_received = None
        else:
            self._app_get_buffer = self._app_buffer_updated = None
            self._app_data_received = app_protocol.data_received

    cdef _wakeup_waiter(self, exc=None):
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        if not waiter.cancelled():
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(None)

    # -- the lower transport's protocol -------------------------------------------------------
    def connection_made(self, transport):
        self._transport = transport
        core = getattr(transport, '_core', None)
        self._core = core if isinstance(core, StreamCore) else None
        self._start_handshake()

    def connection_lost(self, exc):
        self._write_backlog.clear()
        self._write_buffer_size = 0
        self._outgoing.read()
        self._conn_lost += 1
        if self._app_transport is not None:
            self._app_transport._closed = True
        if self._state != DO_HANDSHAKE:
            if self._app_state == APP_CON_MADE or self._app_state == APP_EOF:
                self._app_state = APP_CON_LOST
                self._loop.call_soon(self._app_protocol.connection_lost, exc)
        self._state = UNWRAPPED
        self._transport = None
        self._core = None
        self._app_transport = None
        self._wakeup_waiter(exc)
        self._cancel_timers()
        # no reference cycle app protocol -> app transport -> us -> app protocol (asyncio's
        # test_create_connection_memory_leak: the context must go by refcounting alone)
        self._app_protocol = None
        self._app_get_buffer = self._app_buffer_updated = self._app_data_received = None
        self._release_tls()

    cdef _cancel_timers(self):
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
            self._shutdown_timer = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def get_buffer(self, Py_ssize_t n):
        return self._rview

    def buffer_updated(self, Py_ssize_t nbytes):
        if self._close_notify or self._state == UNWRAPPED:
            return      # after the peer's close_notify: discarded (uvloop's semantics)
        self._incoming.write(self._rview[:nbytes])
        self._on_incoming()

    cdef _on_incoming(self):
        if self._state == DO_HANDSHAKE:
            self._do_handshake()
        elif self._state == WRAPPED:
            self._do_read()
        elif self._state == FLUSHING:
            self._do_flush()
        elif self._state == SHUTDOWN:
            self._do_shutdown()

    def eof_received(self):
        self._eof_received = True
        try:
            if self._loop.get_debug():
                logger.debug('%r received EOF', self)
            if self._state == DO_HANDSHAKE:
                self._on_handshake_complete(ConnectionResetError())
            elif self._state == WRAPPED:
                # Deliver what is still buffered first (the app may be paused: then keep the
                # connection open until it has read it all).
                self._do_read()
                if self._state == WRAPPED:
                    return True
            elif self._state == FLUSHING:
                self._do_flush()
            elif self._state == SHUTDOWN:
                self._do_shutdown()
        except Exception:
            self._transport.close()
            raise
        return self._state != UNWRAPPED and self._transport is not None

    def pause_writing(self):
        self._ssl_writing_paused = True

    def resume_writing(self):
        if not self._ssl_writing_paused:
            return
        self._ssl_writing_paused = False
        if self._state == WRAPPED:
            self._process_outgoing()
        elif self._state == FLUSHING:
            self._do_flush()
        elif self._state == SHUTDOWN:
            self._do_shutdown()

    # -- handshake -------------------------------------------------------------------------------
    cdef _start_handshake(self):
        self._state = DO_HANDSHAKE
        self._handshake_timer = self._loop.call_later(self._handshake_timeout,
                                                      self._check_handshake_timeout)
        self._do_handshake()

    def _check_handshake_timeout(self):
        self._handshake_timer = None
        if self._state == DO_HANDSHAKE:
            msg = (f'SSL handshake is taking longer than {self._handshake_timeout} seconds: '
                   f'aborting the connection')
            self._fatal_error(ConnectionAbortedError(msg))

    cdef _do_handshake(self):
        try:
            self._sslobj.do_handshake()
        except SSLAgainErrors:
            self._process_outgoing()
        except SSLError as exc:
            self._on_handshake_complete(exc)
        else:
            self._on_handshake_complete(None)

    cdef _on_handshake_complete(self, handshake_exc):
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        sslobj = self._sslobj
        try:
            if handshake_exc is not None:
                raise handshake_exc
            self._state = WRAPPED
            peercert = sslobj.getpeercert()
        except Exception as exc:
            self._state = UNWRAPPED
            # an alert the handshake produced (e.g. bad certificate) goes to the peer first
            self._process_outgoing()
            if isinstance(exc, CertificateError):
                msg = 'SSL handshake failed on verifying the certificate'
            else:
                msg = 'SSL handshake failed'
            self._fatal_error(exc, msg)
            self._wakeup_waiter(exc)
            return
        self._extra.update(peercert=peercert, cipher=sslobj.cipher(),
                           compression=sslobj.compression(), ssl_object=sslobj)
        if self._app_state == APP_INIT:
            self._app_state = APP_CON_MADE
            self._app_protocol.connection_made(self._app_transport)
        self._wakeup_waiter()
        self._do_read()

    # -- shutdown --------------------------------------------------------------------------------
    cdef _start_shutdown(self):
        if self._state in (FLUSHING, SHUTDOWN, UNWRAPPED):
            return
        if self._app_transport is not None:
            self._app_transport._closed = True
        if self._state == DO_HANDSHAKE:
            self._abort(None)
            return
        self._state = FLUSHING
        self._shutdown_timer = self._loop.call_later(self._shutdown_timeout,
                                                     self._check_shutdown_timeout)
        self._do_flush()

    def _check_shutdown_timeout(self):
        self._shutdown_timer = None
        if self._state == FLUSHING or self._state == SHUTDOWN:
            self._lower_force_close(exceptions.TimeoutError('SSL shutdown timed out'))

    cdef _do_flush(self):
        """FLUSHING: send what the app wrote before close(); what arrives is discarded."""
        try:
            self._read_into_void()
            self._do_write()
            self._control_ssl_reading()
        except Exception as exc:
            self._on_shutdown_complete(exc)
            return
        if self._state == FLUSHING and not self._write_backlog:
            self._state = SHUTDOWN
            self._do_shutdown()

    cdef _do_shutdown(self):
        try:
            if not self._close_notify:
                self._read_into_void()
            if self._eof_received and not self._close_notify:
                # the peer half-closed TCP without a close_notify: as asyncio, send no
                # close_notify back (it may only read its FIN) and wait for none
                self._process_outgoing()
                self._on_shutdown_complete(None)
                return
            try:
                self._sslobj.unwrap()
            except SSLAgainErrors:
                self._process_outgoing()
            else:
                self._process_outgoing()
                self._on_shutdown_complete(None)
        except Exception as exc:
            self._on_shutdown_complete(exc)

    cdef _on_shutdown_complete(self, shutdown_exc):
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
            self._shutdown_timer = None
        if self._state == UNWRAPPED or self._transport is None:
            return
        self._state = UNWRAPPED
        if shutdown_exc is not None:
            self._fatal_error(shutdown_exc, 'Error occurred during shutdown')
        else:
            # whatever waits in the BIO (the app's last data, our close_notify) goes to the
            # lower transport now, paused or not: its close() sends all it holds
            self._ssl_writing_paused = False
            self._process_outgoing()
            self._loop.call_soon(self._close_lower)
        self._release_tls()

    def _close_lower(self):
        if self._transport is not None:
            self._transport.close()

    cdef _abort(self, exc):
        self._state = UNWRAPPED
        if self._transport is not None:
            if exc is None:
                self._transport.abort()
            else:
                self._lower_force_close(exc)
        self._release_tls()

    cdef _lower_force_close(self, exc):
        if self._core is not None:
            self._core._force_close(exc)
        elif self._transport is not None:
            force = getattr(self._transport, '_force_close', None)
            if force is not None:
                force(exc)
            else:
                self._transport.abort()

    # -- outgoing --------------------------------------------------------------------------------
    cdef _write_appdata(self, data):
        if self._state == FLUSHING or self._state == SHUTDOWN or self._state == UNWRAPPED:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning('SSL connection is closed')
            self._conn_lost += 1
            return
        self._write_backlog.append(data)
        self._write_buffer_size += len(data)
        try:
            if self._state == WRAPPED:
                self._do_write()
        except Exception as exc:
            self._fatal_error(exc, 'Fatal error on SSL protocol')

    cdef _do_write(self):
        cdef Py_ssize_t count, n
        backlog = self._write_backlog
        try:
            while backlog:
                data = backlog[0]
                count = self._sslobj.write(data)
                n = len(data)
                if count < n:
                    backlog[0] = memoryview(data)[count:]
                    self._write_buffer_size -= count
                else:
                    del backlog[0]
                    self._write_buffer_size -= n
        except SSLAgainErrors:
            pass
        self._process_outgoing()

    cdef _process_outgoing(self):
        if not self._ssl_writing_paused and self._transport is not None:
            if self._outgoing.pending:
                data = self._outgoing.read()
                if self._core is not None:
                    self._core.write(data)
                else:
                    self._transport.write(data)
        self._control_app_writing()

    # -- incoming --------------------------------------------------------------------------------
    cdef _do_read(self):
        if self._state != WRAPPED:
            return
        try:
            if not self._app_reading_paused:
                if self._app_is_buffer:
                    self._do_read_buffered()
                else:
                    self._do_read_copied()
                if self._state == WRAPPED:
                    if self._write_backlog:
                        self._do_write()
                    else:
                        self._process_outgoing()
            if self._state == WRAPPED:
                self._control_ssl_reading()
        except Exception as exc:
            self._fatal_error(exc, 'Fatal error on SSL protocol')

    cdef _do_read_copied(self):
        """Everything decrypted now, in one data_received() call (asyncio's chunking)."""
        cdef list chunks = None
        cdef bytes first = None
        cdef bint drained = False
        read = self._sslobj.read
        try:
            while True:
                chunk = read(TLS_READ_MAX)
                if not chunk:
                    self._close_notify = True
                    break
                if first is None:
                    first = chunk
                elif chunks is None:
                    chunks = [first, chunk]
                else:
                    chunks.append(chunk)
        except SSLAgainErrors:
            drained = True
        except SSLZeroReturnError:
            self._close_notify = True
        if first is not None:
            self._app_data_received(first if chunks is None else b''.join(chunks))
        self._after_read(drained)

    cdef _do_read_buffered(self):
        """Decrypt straight into the app's buffer, as long as it is not paused."""
        cdef Py_ssize_t wants, offset, count
        cdef bint drained = False
        read = self._sslobj.read
        while not self._app_reading_paused and self._state == WRAPPED:
            buf = self._app_get_buffer(self._incoming.pending)
            wants = len(buf)
            if wants == 0:
                raise RuntimeError('get_buffer() returned an empty buffer')
            offset = 0
            try:
                view = memoryview(buf)
                while offset < wants:
                    count = read(wants - offset, view[offset:] if offset else view)
                    if count == 0:
                        self._close_notify = True
                        break
                    offset += count
            except SSLAgainErrors:
                drained = True
            except SSLZeroReturnError:
                self._close_notify = True
            finally:
                view = None
            if offset > 0:
                self._app_buffer_updated(offset)
            if drained or self._close_notify:
                break
        self._after_read(drained)

    cdef _after_read(self, bint drained):
        if self._close_notify:
            self._call_eof_received()
            self._start_shutdown()
        elif drained and self._eof_received and self._state == WRAPPED:
            # the peer closed TCP without a close_notify, and everything before is delivered:
            # flush what the app wrote, send our close_notify, do not wait for theirs
            self._call_eof_received()
            self._start_shutdown()

    cdef _read_into_void(self):
        """FLUSHING/SHUTDOWN: the app closed; discard what comes, up to a close_notify."""
        if self._close_notify:
            return
        read = self._sslobj.read
        try:
            while True:
                if not read(TLS_READ_MAX):
                    self._close_notify = True
                    break
        except SSLAgainErrors:
            pass
        except SSLZeroReturnError:
            self._close_notify = True
        if self._close_notify:
            self._call_eof_received()

    cdef _call_eof_received(self):
        try:
            if self._app_state == APP_CON_MADE:
                self._app_state = APP_EOF
                keep_open = self._app_protocol.eof_received()
                if keep_open:
                    logger.warning('returning true from eof_received() '
                                   'has no effect when using ssl')
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self._fatal_error(exc, 'Error calling eof_received()')

    # -- flow control ------------------------------------------------------------------------------
    cdef _control_app_writing(self):
        cdef Py_ssize_t size = self._get_write_buffer_size()
        if self._state != WRAPPED or self._app_protocol is None:
            return      # uvloop: no pause/resume_writing() once closing
        if size >= self._out_high and not self._app_writing_paused:
            self._app_writing_paused = True
            self._tell_app_writing('pause_writing')
        elif size <= self._out_low and self._app_writing_paused:
            self._app_writing_paused = False
            self._tell_app_writing('resume_writing')

    cdef _tell_app_writing(self, str method):
        try:
            getattr(self._app_protocol, method)()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                'message': f'protocol.{method}() failed', 'exception': exc,
                'transport': self._app_transport, 'protocol': self})

    cdef Py_ssize_t _get_write_buffer_size(self):
        return self._outgoing.pending + self._write_buffer_size

    cdef _control_ssl_reading(self):
        cdef Py_ssize_t size = self._incoming.pending
        if self._transport is None:
            return
        if size >= self._in_high and not self._ssl_reading_paused:
            self._ssl_reading_paused = True
            self._transport.pause_reading()
        elif size <= self._in_low and self._ssl_reading_paused:
            self._ssl_reading_paused = False
            self._transport.resume_reading()

    def _resume_app_reading(self):
        self._read_scheduled = False
        if self._app_reading_paused:
            return
        if self._state == WRAPPED:
            self._do_read()
        elif self._state == FLUSHING:
            self._do_flush()
        elif self._state == SHUTDOWN:
            self._do_shutdown()

    cdef _fatal_error(self, exc, message='Fatal error on transport'):
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug('%r: %s', self, message, exc_info=True)
        elif not isinstance(exc, exceptions.CancelledError):
            self._loop.call_exception_handler({
                'message': message, 'exception': exc,
                'transport': self._transport, 'protocol': self})
        if self._transport is not None:
            self._lower_force_close(exc)

    # -- the app transport's calls ---------------------------------------------------------------
    def _app_write(self, data):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f'data: expecting a bytes-like instance, '
                            f'got {type(data).__name__}')
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)      # the caller may reuse its buffer once write() returns
        self._write_appdata(data)

    def _app_close(self):
        self._start_shutdown()

    def _app_release(self):
        self._app_released = True
        self._release_tls()

    cdef _release_tls(self):
        """Once TLS is over and the app transport let go, the SSL objects (and the context)
        go now: the lower transport may keep us a while yet (an io_uring close completes on a
        later iteration, maybe after the loop stopped) and asyncio's are freed by then."""
        if self._app_released and self._state == UNWRAPPED and self._sslobj is not None:
            self._sslobj = None
            self._sslcontext = None
            self._extra = {}

    def _app_abort(self, exc=None):
        self._abort(exc)

    def _app_pause_reading(self):
        self._app_reading_paused = True

    def _app_resume_reading(self):
        if self._app_reading_paused:
            self._app_reading_paused = False
            if not self._read_scheduled:
                self._read_scheduled = True
                self._loop.call_soon(self._resume_app_reading)

    def _app_is_reading(self):
        return not self._app_reading_paused

    def _app_set_write_buffer_limits(self, high, low):
        self._out_high, self._out_low = _flow_limits(
            high, low, constants.FLOW_CONTROL_HIGH_WATER_SSL_WRITE)
        self._control_app_writing()

    def _app_get_write_buffer_limits(self):
        return (self._out_low, self._out_high)

    def _app_get_write_buffer_size(self):
        return self._get_write_buffer_size()

    def _app_set_read_buffer_limits(self, high, low):
        self._in_high, self._in_low = _flow_limits(
            high, low, constants.FLOW_CONTROL_HIGH_WATER_SSL_READ)
        self._control_ssl_reading()

    def _app_get_read_buffer_limits(self):
        return (self._in_low, self._in_high)

    def _app_get_read_buffer_size(self):
        return self._incoming.pending

    def _app_writing_is_paused(self):
        return self._app_writing_paused

    def _get_extra_info(self, name, default=None):
        if name in self._extra:
            return self._extra[name]
        if self._transport is not None:
            return self._transport.get_extra_info(name, default)
        return default

    def _set_protocol(self, protocol):
        self._set_app_protocol(protocol)

    def _test__append_write_backlog(self, data):
        # asyncio's test hook (test_asyncio/test_ssl.py fills the backlog with it)
        self._write_backlog.append(data)
        self._write_buffer_size += len(data)

    def _get_protocol(self):
        return self._app_protocol

    @property
    def _app_transport_obj(self):
        return self._app_transport


class TLSTransport(transports._FlowControlMixin, transports.Transport):
    """The asyncio.Transport that the app sees over TLS."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.FALLBACK

    def __init__(self, loop, ssl_protocol):
        self._loop = loop
        self._ssl_protocol = ssl_protocol
        self._closed = False

    def __repr__(self):
        return f'<kbloop.TLSTransport {"closed" if self._closed else "open"}>'

    def get_extra_info(self, name, default=None):
        return self._ssl_protocol._get_extra_info(name, default)

    def set_protocol(self, protocol):
        self._ssl_protocol._set_protocol(protocol)

    def get_protocol(self):
        return self._ssl_protocol._get_protocol()

    def is_closing(self):
        return self._closed

    def close(self):
        if not self._closed:
            self._closed = True
            self._ssl_protocol._app_close()
        else:
            # asyncio's: a second close() lets go of the TLS layer, so that an app protocol
            # keeping its transport keeps no SSL context alive while the lower transport is
            # still closing (test_create_connection_memory_leak)
            ssl_protocol = self._ssl_protocol
            if ssl_protocol is not None:
                self._ssl_protocol = None
                ssl_protocol._app_release()

    def __del__(self, _warn=warnings.warn):
        if not self._closed:
            self._closed = True
            _warn(f'unclosed transport {self!r}', ResourceWarning, source=self)

    def is_reading(self):
        return self._ssl_protocol._app_is_reading()

    def pause_reading(self):
        self._ssl_protocol._app_pause_reading()

    def resume_reading(self):
        self._ssl_protocol._app_resume_reading()

    def set_write_buffer_limits(self, high=None, low=None):
        self._ssl_protocol._app_set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self):
        return self._ssl_protocol._app_get_write_buffer_limits()

    def get_write_buffer_size(self):
        return self._ssl_protocol._app_get_write_buffer_size()

    def set_read_buffer_limits(self, high=None, low=None):
        self._ssl_protocol._app_set_read_buffer_limits(high, low)

    def get_read_buffer_limits(self):
        return self._ssl_protocol._app_get_read_buffer_limits()

    def get_read_buffer_size(self):
        return self._ssl_protocol._app_get_read_buffer_size()

    @property
    def _protocol_paused(self):
        return self._ssl_protocol._app_writing_is_paused()

    def write(self, data):
        self._ssl_protocol._app_write(data)

    def writelines(self, list_of_data):
        write = self._ssl_protocol._app_write
        for data in list_of_data:
            write(data)

    def write_eof(self):
        raise NotImplementedError('SSL does not support write_eof()')

    def can_write_eof(self):
        return False

    def abort(self):
        self._force_close(None)

    def _force_close(self, exc):
        self._closed = True
        if self._ssl_protocol is not None:
            self._ssl_protocol._app_abort(exc)

    def _test__append_write_backlog(self, data):
        self._ssl_protocol._test__append_write_backlog(data)


cdef str _tls_impl():
    """KBLOOP_TLS=kbloop|asyncio chooses the TLS layer: kbloop's own by default; asyncio's
    sslproto over kbloop's transports is the escape hatch (docs/tls.md)."""
    impl = os.environ.get('KBLOOP_TLS', 'kbloop')
    if impl not in ('kbloop', 'asyncio'):
        raise ValueError(f'KBLOOP_TLS must be kbloop or asyncio, not {impl!r}')
    return impl


cdef object _new_tls_protocol(loop, protocol, sslcontext, waiter, server_side, server_hostname,
                              ssl_handshake_timeout, ssl_shutdown_timeout,
                              call_connection_made):
    """(the lower protocol, the app transport) for the selected TLS layer."""
    if _tls_impl() == 'asyncio':
        p = sslproto.SSLProtocol(
            loop, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=call_connection_made)
        return p, p._app_transport
    tp = TLSProtocol(loop, protocol, sslcontext, waiter, server_side, server_hostname,
                     call_connection_made, ssl_handshake_timeout, ssl_shutdown_timeout)
    return tp, (<TLSProtocol>tp)._app_transport
