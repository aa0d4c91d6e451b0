# The io_uring datapath: the contract of ../datapath.pxi on one ring per loop.
#
# Every in-flight operation is a UringOp object whose address is the SQE's user_data; the ring
# holds one reference to it from submission until its last CQE (one without IORING_CQE_F_MORE).
# Nothing here calls io_uring_submit per operation: SQEs accumulate until poll(), which makes at
# most one io_uring_enter per loop iteration (kb_submit_and_wait).

DEF CQE_BATCH = 128
DEF MAX_IOV = 1024          # IOV_MAX
# Smaller pool Buffers are sent with an ordinary send (still no copy in user space): below this
# the page pinning and the extra notification of SEND_ZC cost more than the copy they save.
DEF ZC_MIN_BYTES = 16384
DEF UDATA_TIMEOUT = 0xffffffffffffffff   # liburing's internal timeout SQE (pre-EXT_ARG kernels)

cdef unsigned _SEND_FLAGS = MSG_NOSIGNAL


cdef class UringOp:
    cdef UringDatapath dp

    cdef void complete(self, int res, uint32_t flags) except *:
        pass

    cdef void discard(self, int res, uint32_t flags):
        """Completion that arrived while the datapath is closing: release, deliver nothing."""
        pass


cdef class RecvOp(UringOp):
    cdef StreamCore t

    cdef void complete(self, int res, uint32_t flags) except *:
        cdef kb_ring *r = &self.dp.r
        cdef unsigned bid
        if flags & IORING_CQE_F_BUFFER:
            bid = flags >> IORING_CQE_BUFFER_SHIFT
            kb_buf_taken(r)
            if res > 0 and self.t._zero_copy:
                # the Buffer owns the ring buffer now: it returns when the application drops it
                self.t._on_buffer(self.dp._lend_recv_buffer(bid, res, self.t))
            else:
                try:
                    if res > 0:
                        self.t._on_data(kb_buf_ptr(r, bid), res)
                finally:
                    kb_buf_recycle(r, bid)
            if not (flags & IORING_CQE_F_MORE):
                self.t._on_recv_done()
        elif res == 0:
            self.t._on_eof()
        elif res == -ENOBUFS:
            kb_bufring_grow(r)              # the ring ran dry: let more buffers in,
            self.dp._park(self.t)           # and re-arm when they are there
        elif res == -ECANCELED or res == -EAGAIN:
            # stopped by us; or EAGAIN, which is no error but a socket with nothing to read
            # (an O_NONBLOCK socket retried from io-wq): re-armed if still wanted
            self.t._on_recv_done()
        elif res < 0:
            self.t._on_recv_error(-res)
        elif not (flags & IORING_CQE_F_MORE):
            self.t._on_recv_done()

    cdef void discard(self, int res, uint32_t flags):
        if flags & IORING_CQE_F_BUFFER:
            kb_buf_taken(&self.dp.r)
            kb_buf_recycle(&self.dp.r, flags >> IORING_CQE_BUFFER_SHIFT)


cdef class SendOp(UringOp):
    """One gathered send (sendmsg over an iovec) of a transport's queued writes."""
    cdef:
        StreamCore t
        list batch
        Py_buffer *views
        iovec *iov
        msghdr msg
        Py_ssize_t nviews, cap

    def __dealloc__(self):
        self._release()
        PyMem_Free(self.views)
        PyMem_Free(self.iov)

    cdef void _release(self):
        cdef Py_ssize_t i
        for i in range(self.nviews):
            PyBuffer_Release(&self.views[i])
        self.nviews = 0

    cdef prepare(self, list batch):
        cdef Py_ssize_t i, n = len(batch)
        if n > self.cap:
            PyMem_Free(self.views)
            PyMem_Free(self.iov)
            self.views = <Py_buffer *>PyMem_Malloc(n * sizeof(Py_buffer))
            self.iov = <iovec *>PyMem_Malloc(n * sizeof(iovec))
            if self.views == NULL or self.iov == NULL:
                self.cap = 0
                raise MemoryError()
            self.cap = n
        for i in range(n):
            PyObject_GetBuffer(batch[i], &self.views[i], PyBUF_SIMPLE)
            self.nviews = i + 1
            self.iov[i].iov_base = self.views[i].buf
            self.iov[i].iov_len = self.views[i].len
        self.batch = batch
        memset(&self.msg, 0, sizeof(msghdr))
        self.msg.msg_iov = self.iov
        self.msg.msg_iovlen = n

    cdef void complete(self, int res, uint32_t flags) except *:
        cdef list batch = self.batch
        cdef list unsent
        cdef Py_ssize_t i, left, size
        if res == -EAGAIN and not self.t._lost_scheduled and self.t._sock is not None:
            # Back-pressure, never an error: the socket is O_NONBLOCK, and io_uring hands
            # the EAGAIN of a retry from its worker threads back to us.  Send the same batch
            # again once the socket is writable.
            self.dp.n_send_again += 1
            self.dp._submit_send(self, True)
            return
        self.batch = None
        self._release()
        if res < 0:
            self.t._on_send_error(-res, batch)
            return
        # Work out what the kernel did not take (a short send): those go back to the queue.
        left = res
        unsent = None
        for i in range(len(batch)):
            size = len(batch[i])
            if left >= size:
                left -= size
                continue
            unsent = batch[i:]
            if left:
                unsent[0] = memoryview(unsent[0])[left:]
            break
        self.t._on_sent(res, unsent)

    cdef void discard(self, int res, uint32_t flags):
        self.batch = None
        self._release()


cdef class SendZcOp(UringOp):
    """A zero-copy send of one pool Buffer from registered memory (SEND_ZC with a fixed
    buffer).  Two completions: the result (the transport may send again), then the
    notification that the kernel no longer reads the memory (the Buffer is let go)."""
    cdef:
        StreamCore t
        Buffer buf

    cdef void complete(self, int res, uint32_t flags) except *:
        cdef Buffer buf = self.buf
        if flags & IORING_CQE_F_NOTIF:
            if <uint32_t>res & IORING_NOTIF_USAGE_ZC_COPIED:
                self.dp.n_send_zc_copied += 1     # loopback: the kernel had to copy after all
            self.buf = None
            return
        if not (flags & IORING_CQE_F_MORE):
            self.buf = None                       # no notification follows (an error)
        if res == -EAGAIN and not self.t._lost_scheduled and self.t._sock is not None:
            self.dp.n_send_again += 1             # back-pressure (see SendOp): again
            self.dp._send_zc(self.t, buf, True)
            return
        if res < 0:
            self.t._on_send_error(-res, [buf])
        elif res < buf._len:
            self.t._on_sent(res, [buf[res:]])     # short send: the rest, still zero-copy
        else:
            self.t._on_sent(res, None)

    cdef void discard(self, int res, uint32_t flags):
        if flags & IORING_CQE_F_NOTIF or not (flags & IORING_CQE_F_MORE):
            self.buf = None


cdef class AcceptOp(UringOp):
    cdef Listener listener

    cdef void complete(self, int res, uint32_t flags) except *:
        if res >= 0:
            self.listener._on_accept(res)
        elif res != -ECANCELED and res != -EAGAIN:     # EAGAIN: nobody to accept yet
            self.listener._on_accept_error(-res)
        if not (flags & IORING_CQE_F_MORE) and res != -ECANCELED:
            if self.listener._dp_state is self:
                self.listener._dp_state = None
                self.listener._on_accept_done()

    cdef void discard(self, int res, uint32_t flags):
        if res >= 0:
            os.close(res)


cdef class WatchOp(UringOp):
    cdef FdWatch w

    cdef void complete(self, int res, uint32_t flags) except *:
        if self.w._dp_state is self:
            self.w._dp_state = None
        if res >= 0 or res == -EBADF:
            self.w._on_ready()      # the callback will see the error, as with a selector
        elif res != -ECANCELED:
            logger.debug('kbloop: poll on fd %d failed: %s', self.w.fd, os.strerror(-res))


cdef class WakeOp(UringOp):
    """Read of the eventfd that call_soon_threadsafe() writes to; re-armed at once."""
    cdef uint64_t value

    cdef void complete(self, int res, uint32_t flags) except *:
        if self.dp.closing:
            return
        kb_wake_reset(&self.dp.wake_pending)
        self.dp._arm_wakeup()


cdef class SockOp(UringOp):
    """An operation of a loop.sock_* call (or of a datagram transport, for MsgOp), on fd.

    A cancelled future does not undo what the kernel already did: a receive or an accept
    that completes after its caller gave up keeps its result for the next call on that
    socket (the loop's _SockKept), and the caller's cancellation waits until the operation
    has settled in the kernel (`settled`), so that nothing it started goes on behind it."""
    cdef:
        int fd
        object sock             # the socket object of the call
        Py_buffer view
        bint have_view
        bint pending
        uint64_t prepared_at    # dp.n_polls when the SQE was queued
        public object settled   # future: the operation is over in the kernel (after a cancel)

    def __dealloc__(self):
        if self.have_view:
            PyBuffer_Release(&self.view)

    cdef void _release(self):
        if self.have_view:
            self.have_view = False
            PyBuffer_Release(&self.view)

    def _on_fut_done(self, fut):
        if fut.cancelled() and self.pending:
            self.settled = self.dp.loop._sock_settling(self.sock, self.fd)
            # Still unsubmitted?  Then the caller, who closes the socket next, must not leave
            # an SQE naming that fd number in the queue: submit the cancel with it now.
            self.dp._cancel(self, self.prepared_at == self.dp.n_polls)

    cdef void _settle(self, object kept, bint accepted=False) except *:
        """The operation is over; `kept` is what a cancelled caller did not take."""
        cdef object settled = self.settled
        self.settled = None
        if kept is not None:
            self.dp.loop._sock_keep(self.sock, self.fd, accepted, kept)
        if settled is not None and not settled.done():
            settled.set_result(None)


cdef class FutureOp(SockOp):
    """A one-shot operation resolving an asyncio future (sock_* and connect)."""
    cdef:
        object fut
        int kind
        object keep             # objects the kernel reads or writes (address, buffer)
        Py_ssize_t offset       # sock_sendall progress

    cdef void complete(self, int res, uint32_t flags) except *:
        cdef object fut = self.fut
        cdef object kept = None
        self.pending = False
        if res == -EAGAIN and not fut.done():
            self.dp.n_op_again += 1         # an O_NONBLOCK socket retried in io-wq: not an error
            self.dp._submit_future(self, True)
            return
        if self.kind == OP_ACCEPT:
            if res >= 0:
                s = self.sock
                conn = socket_socket(s.family, s.type | SOCK_NONBLOCK, s.proto, fileno=res)
                try:
                    addr = conn.getpeername()
                except OSError:
                    addr = None
                if fut.done():
                    self._settle((conn, addr), True)
                else:
                    fut.set_result((conn, addr))
                    self._settle(None)
                return
        elif self.kind == OP_SEND and res >= 0:
            self.offset += res
            if self.offset < self.view.len and not fut.done():
                self.dp._submit_future(self, False)
                return
            self._release()
            if not fut.done():
                fut.set_result(None)
            self._settle(None)
            return
        if fut.done():
            if res > 0 and self.kind == OP_RECV:
                kept = (self.keep[:res], None)
            elif res > 0 and self.kind == OP_RECV_INTO:
                kept = (PyBytes_FromStringAndSize(<char *>self.view.buf, res), None)
            self._release()
            self._settle(kept)
            return
        self._release()
        if res < 0:
            if res == -ECANCELED:
                fut.cancel()
            elif self.kind == OP_CONNECT:
                fut.set_exception(OSError(-res, f'Connect call failed {self.keep[1]}'))
            else:
                fut.set_exception(OSError(-res, os.strerror(-res)))
        elif self.kind == OP_CONNECT:
            fut.set_result(None)
        elif self.kind == OP_RECV:
            data = self.keep
            fut.set_result(data if res == len(data) else data[:res])
        else:                                   # OP_RECV_INTO
            fut.set_result(res)
        self._settle(None)

    cdef void discard(self, int res, uint32_t flags):
        self._release()
        if self.kind == OP_ACCEPT and res >= 0:
            os.close(res)


cdef class MsgOp(SockOp):
    """recvmsg/sendmsg with an address: datagram transports and sock_recvfrom/sendto."""
    cdef:
        int kind
        object target           # DatagramCore, or the future of a sock_* call
        msghdr msg
        iovec iov
        char name[128]          # struct sockaddr_storage
        object keep             # objects the kernel reads or writes
        char *own_buf           # receive buffer of a datagram transport

    def __dealloc__(self):
        PyMem_Free(self.own_buf)

    cdef void _prep_recv(self, char *buf, size_t size):
        memset(&self.msg, 0, sizeof(msghdr))
        self.iov.iov_base = buf
        self.iov.iov_len = size
        self.msg.msg_iov = &self.iov
        self.msg.msg_iovlen = 1
        self.msg.msg_name = self.name
        self.msg.msg_namelen = sizeof(self.name)

    cdef _prep_send(self, object data, bytes sa):
        PyObject_GetBuffer(data, &self.view, PyBUF_SIMPLE)
        self.have_view = True
        self.keep = sa
        memset(&self.msg, 0, sizeof(msghdr))
        self.iov.iov_base = self.view.buf
        self.iov.iov_len = self.view.len
        self.msg.msg_iov = &self.iov
        self.msg.msg_iovlen = 1
        if sa is not None:
            self.msg.msg_name = PyBytes_AS_STRING(sa)
            self.msg.msg_namelen = len(sa)

    cdef void complete(self, int res, uint32_t flags) except *:
        cdef DatagramCore t
        cdef Py_ssize_t size
        cdef object kept = None
        if self.kind == MSG_DGRAM_RECV:
            t = self.target
            if res >= 0:
                t._on_datagram(PyBytes_FromStringAndSize(self.own_buf, res),
                               _unpack_sockaddr(self.name, self.msg.msg_namelen))
            elif res != -ECANCELED and res != -EAGAIN:   # EAGAIN: nothing yet, re-armed
                t._on_dgram_error(-res)
            t._on_recv_done()
            return
        if self.kind == MSG_DGRAM_SEND:
            t = self.target
            if res == -EAGAIN and not t._lost_scheduled and t._sock is not None:
                self.dp.n_send_again += 1       # a full socket buffer: send it again
                self.dp._submit_msg(self, True)
                return
            size = self.view.len
            self._release()
            t._on_dgram_sent(size, -res if res < 0 else 0)
            return
        fut = self.target
        self.pending = False
        if res == -EAGAIN and not fut.done():
            self.dp.n_op_again += 1
            self.dp._submit_msg(self, True)
            return
        if fut.done():
            # a datagram is data even when empty; on a stream socket 0 is the EOF
            if res > 0 or (res == 0 and self.sock.type == SOCK_DGRAM):
                if self.kind == MSG_SOCK_RECVFROM:
                    kept = (self.keep[:res], _unpack_sockaddr(self.name, self.msg.msg_namelen))
                elif self.kind == MSG_SOCK_RECVFROM_INTO:
                    kept = (PyBytes_FromStringAndSize(<char *>self.iov.iov_base, res),
                            _unpack_sockaddr(self.name, self.msg.msg_namelen))
            self._release()
            self._settle(kept)
            return
        self._release()
        if res < 0:
            if res == -ECANCELED:
                fut.cancel()
            else:
                fut.set_exception(OSError(-res, os.strerror(-res)))
        elif self.kind == MSG_SOCK_SENDTO:
            fut.set_result(res)
        elif self.kind == MSG_SOCK_RECVFROM:
            data = self.keep
            fut.set_result((data if res == len(data) else data[:res],
                            _unpack_sockaddr(self.name, self.msg.msg_namelen)))
        else:                                   # MSG_SOCK_RECVFROM_INTO
            fut.set_result((res, _unpack_sockaddr(self.name, self.msg.msg_namelen)))
        self._settle(None)

    cdef void discard(self, int res, uint32_t flags):
        self._release()


cdef enum:
    MSG_DGRAM_RECV = 1
    MSG_DGRAM_SEND = 2
    MSG_SOCK_RECVFROM = 3
    MSG_SOCK_RECVFROM_INTO = 4
    MSG_SOCK_SENDTO = 5


cdef enum:
    OP_CONNECT = 1
    OP_ACCEPT = 2
    OP_RECV = 3
    OP_RECV_INTO = 4
    OP_SEND = 5


cdef class UringDatapath(Datapath):
    cdef:
        kb_ring r
        bint opened, closing
        int wake_fd
        int wake_pending             # an eventfd write is on its way (kb_wake_claim)
        uint64_t n_wake_writes       # eventfd writes made (the rest were coalesced)
        WakeOp wake_op
        uint64_t n_sqes, n_cqes, n_enters, n_polls
        uint64_t n_cancel_enters     # enters made by _cancel_now, outside poll()
        bint busy_poll               # spin on the CQ before sleeping in the kernel
        int64_t spin_ns
        readonly str mode
        unsigned napi_us
        uint64_t n_spin_hits, n_sleeps
        unsigned kept                # CQEs a deferring poll left in the CQ for dispatch_deferred
        Py_ssize_t inflight          # ops the ring holds a reference to
        object enabled_thread
        unsigned long enabled_ident
        unsigned max_cqe_batch
        # zero-copy memory
        _Slab recv_slab              # the receive ring's buffers (memory of the pool)
        set fixed_slots              # pool slab indexes registered as fixed buffers
        bint fixed_ok                # the sparse fixed-buffer table exists
        list parked                  # transports waiting for receive buffers
        unsigned hold_limit          # receive buffers one transport may hold before it waits
        unsigned resume_free         # free ring buffers needed to re-arm parked transports
        uint64_t n_lent, n_throttles, n_starved, n_send_zc, n_send_zc_bytes, n_send_zc_copied
        uint64_t n_send_again        # sends that met a full socket (EAGAIN) and went again
        uint64_t n_op_again          # one-shot operations retried after an EAGAIN
        unsigned poll_first          # IORING_RECVSEND_POLL_FIRST where the kernel has it
        Py_ssize_t lent_now

    def __init__(self, unsigned entries=4096, unsigned nbufs=1024, unsigned bufsize=16384,
                 bint allow_defer=True, bint busy_poll=False, double spin_us=50,
                 bint sqpoll=False, int sq_cpu=-1, unsigned sq_idle_ms=1000,
                 unsigned napi_busy_poll_us=0, BufferPool pool=None):
        cdef char why[512]
        cdef int ret, mode
        why[0] = 0
        if spin_us < 0:
            raise ValueError(f'spin_us must be >= 0, got {spin_us}')
        mode = (KB_MODE_SQPOLL if sqpoll else KB_MODE_BUSY if busy_poll
                else KB_MODE_DEFAULT if allow_defer else KB_MODE_NO_SINGLE_ISSUER)
        self.busy_poll = busy_poll
        self.spin_ns = <int64_t>(spin_us * 1000)
        self.mode = ('sqpoll' if sqpoll else '') + ('+' if sqpoll and busy_poll else '') + (
            'busy_poll' if busy_poll else '') or 'default'
        self.name = 'io_uring'
        self.wake_fd = -1
        if not 1 <= entries <= 32768:
            raise ValueError(f'ring_entries must be between 1 and 32768, got {entries}')
        if nbufs == 0 or nbufs & (nbufs - 1) or nbufs > 32768:
            raise ValueError(f'recv_buffers must be a power of two <= 32768, got {nbufs}')
        if bufsize == 0 or bufsize % mmap.PAGESIZE:
            raise ValueError(f'recv_buffer_size must be a multiple of the page size '
                             f'({mmap.PAGESIZE}), got {bufsize}')
        ret = kb_ring_open(&self.r, entries, entries * 4, mode, sq_cpu, sq_idle_ms, why,
                           sizeof(why))
        if ret:
            raise BackendUnavailable(why.decode())
        self.opened = True
        if napi_busy_poll_us:
            ret = kb_register_napi(&self.r, napi_busy_poll_us, 1)
            if ret:
                kb_ring_close(&self.r)
                self.opened = False
                raise BackendUnavailable(f'IORING_REGISTER_NAPI: {os.strerror(-ret)} '
                                         f'(needs Linux 6.9+)')
            self.napi_us = napi_busy_poll_us
        self.pool = BufferPool() if pool is None else pool
        self.recv_slab = self.pool.recv_region(nbufs, bufsize)
        ret = kb_bufring_setup(&self.r, self.recv_slab.base, nbufs, bufsize, 0, why, sizeof(why))
        if ret:
            kb_ring_close(&self.r)
            self.opened = False
            self.pool.release_region(self.recv_slab)
            raise BackendUnavailable(why.decode())
        self.parked = []
        # Retries after EAGAIN wait for readiness first (Linux 5.19+, as multishot recv)
        self.poll_first = (IORING_RECVSEND_POLL_FIRST
                           if self.r.features & KB_F_MULTISHOT_RECV else 0)
        self.hold_limit = max(1, nbufs // 2)
        self.resume_free = max(1, nbufs // 8)
        # A sparse table of fixed buffers that pool slabs are added to as they are made.
        self.fixed_slots = set()
        self.fixed_ok = (self.r.features & KB_F_SEND_ZC) and \
            io_uring_register_buffers_sparse(&self.r.ring, MAX_SLAB_INDEX) == 0
        if self.fixed_ok:
            self.pool.attach(self)
        self.wake_fd = eventfd(0, EFD_CLOEXEC)
        if self.wake_fd < 0:
            kb_ring_close(&self.r)
            self.opened = False
            PyErr_SetFromErrno(OSError)
        self.wake_op = WakeOp()
        self.wake_op.dp = self
        self._arm_wakeup()

    def __dealloc__(self):
        if self.opened:
            kb_ring_close(&self.r)
        if self.wake_fd >= 0:
            close(self.wake_fd)

    # -- plumbing -------------------------------------------------------------------------
    cdef io_uring_sqe *_sqe(self) except NULL:
        cdef io_uring_sqe *s
        if not self.opened:     # the loop is closed and the ring gone: asyncio's error
            raise RuntimeError('Event loop is closed')
        s = io_uring_get_sqe(&self.r.ring)
        if s == NULL:
            # The submission queue is full: hand it to the kernel now (only under heavy load).
            self._enable()
            io_uring_submit(&self.r.ring)
            self.n_enters += 1
            s = io_uring_get_sqe(&self.r.ring)
            if s == NULL:
                raise RuntimeError('kbloop: io_uring submission queue is full')
        self.n_sqes += 1
        return s

    cdef inline void _own(self, UringOp op, io_uring_sqe *s):
        Py_INCREF(op)
        self.inflight += 1
        io_uring_sqe_set_data64(s, <uint64_t><PyObject *>op)

    cdef _enable(self):
        if not self.r.enabled:
            ret = kb_ring_enable(&self.r)
            if ret < 0:
                raise OSError(-ret, 'io_uring enable: ' + os.strerror(-ret))
            self.enabled_thread = threading.get_ident()
            self.enabled_ident = PyThread_get_thread_ident()

    cdef _wrong_thread(self):
        return RuntimeError(
            'kbloop: this loop\'s io_uring is bound to the thread that first ran it '
            '(SINGLE_ISSUER); run it in that thread or create it with '
            'new_event_loop(single_issuer=False)')

    cdef _arm_wakeup(self):
        cdef io_uring_sqe *s = self._sqe()
        io_uring_prep_read(s, self.wake_fd, &self.wake_op.value, 8, 0)
        self._own(self.wake_op, s)

    cdef void wakeup(self) noexcept nogil:
        cdef uint64_t one = 1
        if self.wake_fd >= 0 and kb_wake_claim(&self.wake_pending):
            self.n_wake_writes += 1
            write(self.wake_fd, &one, 8)

    cdef _cancel(self, UringOp op, bint now):
        cdef io_uring_sqe *s
        if not self.opened:
            return          # the ring is gone, and every operation with it
        if now:
            self._cancel_now(op)
        else:
            s = self._sqe()
            io_uring_prep_cancel64(s, <uint64_t><PyObject *>op, 0)
            io_uring_sqe_set_data64(s, 0)

    cdef _cancel_now(self, UringOp op):
        """Cancel op and submit at once: the caller closes the fd right after, and the kernel
        must let go of the file now (a listening port must be free when Server.close()
        returns).  The one place besides poll() that enters the kernel; counted apart."""
        cdef io_uring_sqe *s
        if not self.opened:
            return
        s = self._sqe()
        io_uring_prep_cancel64(s, <uint64_t><PyObject *>op, 0)
        io_uring_sqe_set_data64(s, 0)
        if self.r.enabled and threading.get_ident() == self.enabled_thread:
            # also runs deferred task work, so the cancelled request drops its file reference
            io_uring_submit_and_get_events(&self.r.ring)
            self.n_enters += 1
            self.n_cancel_enters += 1

    # -- the per-iteration step -----------------------------------------------------------
    cdef bint has_submissions(self):
        return io_uring_sq_ready(&self.r.ring) > 0 or len(self.parked) > 0

    cdef int submit(self) except -1:
        if (not self.opened or not self.r.enabled
                or PyThread_get_thread_ident() != self.enabled_ident):
            return 0
        if self.parked:
            self._unpark()
        if io_uring_sq_ready(&self.r.ring):
            # get_events also runs deferred task work: a closed socket's cancelled receive
            # drops its file reference, so the peer sees the close now
            io_uring_submit_and_get_events(&self.r.ring)
            self.n_enters += 1
        return 0

    cdef int poll(self, int64_t timeout_ns) except -1:
        cdef int ret
        cdef int64_t spin
        if not self.r.enabled:
            self._enable()
        elif (self.r.features & KB_F_SINGLE_ISSUER
                and PyThread_get_thread_ident() != self.enabled_ident):
            # The kernel says so too (EEXIST), but only when we enter it, and a poll with
            # callbacks ready may not (TASKRUN_FLAG): check here, every time.
            raise self._wrong_thread()
        if self.kept:
            # Kept by an iteration that a KeyboardInterrupt cut short: due before anything new.
            self.dispatch_deferred()
        kb_bufring_publish(&self.r)     # buffers the application let go of since the harvest
        if self.parked:
            self._unpark()
        if self.busy_poll and timeout_ns != 0:
            # Busy-poll: submit, then watch the CQ from user space (completions of this plain
            # ring land there without us entering the kernel); sleep only after the budget.
            if io_uring_sq_ready(&self.r.ring):
                io_uring_submit(&self.r.ring)
                self.n_enters += 1
            spin = self.spin_ns if timeout_ns < 0 or timeout_ns > self.spin_ns else timeout_ns
            with nogil:
                ret = kb_spin_for_completions(&self.r, spin)
            if ret:
                self.n_spin_hits += 1
                self.n_polls += 1
                return self._harvest(0)
            self.n_sleeps += 1
            if timeout_ns > 0:
                timeout_ns = timeout_ns - spin if timeout_ns > spin else 0
        if timeout_ns != 0:
            if PyErr_CheckSignals() < 0:
                return -1
            with nogil:
                ret = kb_submit_and_wait(&self.r, timeout_ns)
        else:
            ret = kb_submit_and_wait(&self.r, 0)
        self.n_polls += 1
        if ret > 0:
            self.n_enters += 1
        elif ret == -EINTR:
            self.n_enters += 1
            if PyErr_CheckSignals() < 0:
                if not self.defer:
                    self._harvest(0)    # what completed still gets delivered
                return -1
        elif ret == -EEXIST:
            raise self._wrong_thread()
        elif ret < 0 and ret != -EBUSY and ret != -EAGAIN:
            raise OSError(-ret, 'io_uring_enter: ' + os.strerror(-ret))
        if self.defer:
            # Ready callbacks wait: leave the CQEs in the CQ (the ring keeps holding their ops
            # and provided buffers) and dispatch exactly these after them.
            self.kept = io_uring_cq_ready(&self.r.ring)
            return self.kept
        return self._harvest(0)

    cdef int dispatch_deferred(self) except -1:
        cdef unsigned n = self.kept
        if n == 0:
            return 0
        self.kept = 0
        return self._harvest(n)

    cdef int _harvest(self, unsigned limit) except -1:
        """Dispatch the CQEs in the CQ, or only the first `limit` of them."""
        cdef io_uring_cqe *cqes[CQE_BATCH]
        cdef unsigned n, i, want
        cdef uint64_t ud
        cdef int res, total = 0
        cdef uint32_t fl
        cdef UringOp op
        try:
            while True:
                want = CQE_BATCH
                if limit:
                    if <unsigned>total >= limit:
                        break
                    if limit - total < want:
                        want = limit - total
                n = io_uring_peek_batch_cqe(&self.r.ring, cqes, want)
                if n == 0:
                    break
                if n > self.max_cqe_batch:
                    self.max_cqe_batch = n
                for i in range(n):
                    ud = cqes[i].user_data
                    res = cqes[i].res
                    fl = cqes[i].flags
                    io_uring_cq_advance(&self.r.ring, 1)
                    total += 1
                    if ud == 0 or ud == UDATA_TIMEOUT:
                        continue
                    op = <UringOp><PyObject *>ud
                    if not (fl & IORING_CQE_F_MORE):
                        self.inflight -= 1
                        Py_DECREF(op)
                    if self.closing:
                        op.discard(res, fl)
                    else:
                        op.complete(res, fl)
        finally:
            kb_bufring_publish(&self.r)
            self.n_cqes += total
        return total

    cdef void close(self):
        """Cancel everything in flight, wait for the completions (the ring holds references),
        then tear the ring down."""
        cdef int rounds = 0
        cdef io_uring_sqe *s
        if not self.opened:
            return
        self.closing = True
        try:
            self._enable()
            s = self._sqe()
            io_uring_prep_cancel64(s, 0, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL)
            io_uring_sqe_set_data64(s, 0)
            while self.inflight > 0 and rounds < 100:
                rounds += 1
                if kb_submit_and_wait(&self.r, 10000000) == -EEXIST:
                    break   # closed from a thread other than the ring's issuer: cannot drain
                self._harvest(0)
        except BaseException:
            pass
        if self.inflight > 0:
            logger.debug('kbloop: %d io_uring operations still in flight at close',
                         self.inflight)
        kb_ring_close(&self.r)
        self.opened = False
        self.pool.detach(self)
        self.pool.release_region(self.recv_slab)  # unmapped once no Buffer shows it
        self.parked = []
        if self.wake_fd >= 0:
            close(self.wake_fd)
            self.wake_fd = -1

    # -- streams --------------------------------------------------------------------------
    cdef int listen(self, Listener listener) except -1:
        cdef io_uring_sqe *s = self._sqe()
        op = AcceptOp()
        op.dp = self
        op.listener = listener
        listener._dp_state = op
        if self.r.features & KB_F_MULTISHOT_ACCEPT:
            io_uring_prep_multishot_accept(s, listener.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        else:
            io_uring_prep_accept(s, listener.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        self._own(op, s)
        return 0

    cdef int unlisten(self, Listener listener) except -1:
        op = listener._dp_state
        listener._dp_state = None
        if op is not None:
            self._cancel_now(op)
        return 0

    cdef int recv_start(self, StreamCore t) except -1:
        cdef io_uring_sqe *s = self._sqe()
        cdef RecvOp op = t._dp_state
        if op is None:
            op = RecvOp()
            op.dp = self
            op.t = t
            t._dp_state = op
        # A ZeroCopyProtocol keeps the buffers it is given, so its receives take one buffer
        # at a time: a multishot receive would fill every free buffer of the ring in one go
        # and leave none to the other connections.
        if self.r.features & KB_F_MULTISHOT_RECV and not t._zero_copy:
            io_uring_prep_recv_multishot(s, t._fd, NULL, 0, 0)
        else:
            io_uring_prep_recv(s, t._fd, NULL, self.r.bufsize, 0)
        s.flags |= IOSQE_BUFFER_SELECT
        s.buf_group = self.r.bgid
        self._own(op, s)
        return 0

    cdef int recv_stop(self, TransportCore t) except -1:
        cdef io_uring_sqe *s
        if t._dp_state is not None and self.opened:
            s = self._sqe()
            io_uring_prep_cancel64(s, <uint64_t><PyObject *>t._dp_state, 0)
            io_uring_sqe_set_data64(s, 0)
        return 0

    cdef int send(self, StreamCore t) except -1:
        cdef list batch = t.take_batch()
        cdef io_uring_sqe *s
        cdef SendOp op = t._dp_send      # one send in flight per transport: reuse its op
        cdef Py_ssize_t i
        if self.fixed_slots and t._zero_copy_send:
            # A pool Buffer goes alone, zero-copy; what is queued behind it waits its turn.
            for i in range(len(batch)):
                if self._zc_eligible(batch[i]):
                    if i == 0:
                        t._wbuf[0:0] = batch[1:]
                        return self._send_zc(t, <Buffer>batch[0])
                    t._wbuf[0:0] = batch[i:]
                    batch = batch[:i]
                    break
        if op is None:
            op = SendOp()
            op.dp = self
            op.t = t
            t._dp_send = op
        if len(batch) > MAX_IOV:
            t._wbuf[0:0] = batch[MAX_IOV:]
            batch = batch[:MAX_IOV]
        op.prepare(batch)
        self._submit_send(op, False)
        return 0

    cdef _submit_send(self, SendOp op, bint poll_first):
        """Queue op's prepared batch (again, after an EAGAIN: then poll_first)."""
        cdef io_uring_sqe *s = self._sqe()
        if op.nviews == 1:
            io_uring_prep_send(s, op.t._fd, op.iov[0].iov_base, op.iov[0].iov_len, _SEND_FLAGS)
        else:
            io_uring_prep_sendmsg(s, op.t._fd, &op.msg, _SEND_FLAGS)
        if poll_first:
            s.ioprio |= self.poll_first
        self._own(op, s)

    cdef bint _zc_eligible(self, object data):
        cdef Buffer buf
        if type(data) is not Buffer:
            return False
        buf = <Buffer>data
        return (buf._len >= ZC_MIN_BYTES and buf._chunk is not None
                and buf._chunk.home is self.pool and buf._chunk.slab.index in self.fixed_slots)

    cdef int _send_zc(self, StreamCore t, Buffer buf, bint poll_first=False) except -1:
        cdef io_uring_sqe *s = self._sqe()
        op = SendZcOp()
        op.dp = self
        op.t = t
        op.buf = buf
        io_uring_prep_send_zc_fixed(s, t._fd, buf._ptr, buf._len, _SEND_FLAGS,
                                    IORING_SEND_ZC_REPORT_USAGE, buf._chunk.slab.index)
        if poll_first:
            s.ioprio |= self.poll_first
        self._own(op, s)
        self.n_send_zc += 1
        self.n_send_zc_bytes += buf._len
        return 0

    # -- zero-copy memory -------------------------------------------------------------------
    cdef int register_slab(self, _Slab slab) except -1:
        cdef iovec iov
        if not self.fixed_ok or not self.opened or slab.index < 0:
            return 0
        iov.iov_base = slab.base
        iov.iov_len = slab.size
        # Fails (EEXIST) from a thread other than a SINGLE_ISSUER ring's owner, or when the
        # memory cannot be pinned (RLIMIT_MEMLOCK): the slab is then sent the ordinary way.
        if io_uring_register_buffers_update_tag(&self.r.ring, slab.index, &iov, NULL, 1) == 1:
            self.fixed_slots.add(slab.index)
        return 0

    cdef int unregister_slab(self, _Slab slab) except -1:
        cdef iovec iov
        if slab.index in self.fixed_slots:
            self.fixed_slots.discard(slab.index)
            if self.opened:
                iov.iov_base = NULL
                iov.iov_len = 0
                io_uring_register_buffers_update_tag(&self.r.ring, slab.index, &iov, NULL, 1)
        return 0

    cdef Buffer _lend_recv_buffer(self, unsigned bid, int res, StreamCore t):
        """Wrap ring buffer bid in a Buffer for t's ZeroCopyProtocol.  A transport holding
        half the ring stops receiving until it gives some back (back-pressure)."""
        cdef _Chunk chunk = _Chunk.__new__(_Chunk)
        chunk.slab = self.recv_slab
        chunk.home = self
        chunk.kind = CHUNK_RECV
        chunk.number = bid
        chunk.holder = t
        t._bufs_held += 1
        self.lent_now += 1
        self.n_lent += 1
        if t._bufs_held >= self.hold_limit and not t._throttled:
            t._throttled = True         # its one-shot receive is not re-armed (_wants_recv)
            self.n_throttles += 1
        return _new_buffer(chunk, kb_buf_ptr(&self.r, bid), res)

    cdef void recv_buffer_returned(self, uint32_t number, uintptr_t token, object holder) noexcept:
        cdef StreamCore t = <StreamCore>holder
        self.lent_now -= 1
        t._bufs_held -= 1
        if not self.opened:
            return          # the ring is gone; the memory is unmapped with its last Buffer
        kb_buf_recycle(&self.r, number)
        if t._throttled and t._bufs_held <= self.hold_limit // 2:
            t._throttled = False
            self.parked.append(t)
        if self.parked and PyThread_get_thread_ident() != self.enabled_ident:
            self.wakeup()   # let go in another thread: the loop may be asleep

    cdef _park(self, StreamCore t):
        t._recv_armed = False
        t._recv_stopping = False
        self.n_starved += 1
        self.parked.append(t)

    cdef _unpark(self):
        """Re-arm parked receives once enough of the ring is free again."""
        cdef StreamCore t
        if self.r.nbufs - self.r.bufs_out < self.resume_free:
            return
        parked = self.parked
        self.parked = []
        for t in parked:
            if not t._throttled and not t._recv_armed and t._wants_recv():
                t._start_reading()

    cdef int shutdown_write(self, StreamCore t) except -1:
        # A plain system call, not IORING_OP_SHUTDOWN: the kernel always runs that one in an
        # io-wq worker and looks the fd up only then, which on a busy machine can be after
        # the transport's CLOSE and after a new socket took the same number (it half-closed
        # the next connection).  The transport calls this once its sends have completed.
        # Errors are left to the receive side, as before (a reset peer: ENOTCONN here).
        c_shutdown(t._fd, SHUT_WR)
        return 0

    cdef int close_fd(self, int fd) except -1:
        cdef io_uring_sqe *s
        if self.closing or not self.opened:
            close(fd)
            return 0
        s = self._sqe()
        if self.r.features & KB_F_CANCEL_FD:
            io_uring_prep_cancel_fd(s, fd, IORING_ASYNC_CANCEL_ALL)
        else:
            io_uring_prep_shutdown(s, fd, SHUT_RDWR)   # ends pending receives on old kernels
        io_uring_sqe_set_data64(s, 0)
        s.flags |= IOSQE_IO_HARDLINK
        s = self._sqe()
        io_uring_prep_close(s, fd)
        io_uring_sqe_set_data64(s, 0)
        return 0

    # -- datagrams ------------------------------------------------------------------------
    cdef int dgram_recv_start(self, DatagramCore t) except -1:
        cdef MsgOp op = t._dp_state
        if op is None:
            op = MsgOp()
            op.dp = self
            op.kind = MSG_DGRAM_RECV
            op.target = t
            op.fd = t._fd
            op.own_buf = <char *>PyMem_Malloc(DATAGRAM_MAX_SIZE)
            if op.own_buf == NULL:
                raise MemoryError()
            t._dp_state = op
        op._prep_recv(op.own_buf, DATAGRAM_MAX_SIZE)
        self._submit_msg(op, False)
        return 0

    cdef int dgram_send(self, DatagramCore t, object data, bytes sockaddr) except -1:
        cdef MsgOp op = MsgOp()
        op.dp = self
        op.kind = MSG_DGRAM_SEND
        op.target = t
        op.fd = t._fd
        op._prep_send(data, sockaddr)
        self._submit_msg(op, False)
        return 0

    cdef _submit_msg(self, MsgOp op, bint poll_first):
        """Queue op's prepared recvmsg/sendmsg (again, after an EAGAIN: then poll_first)."""
        cdef io_uring_sqe *s = self._sqe()
        if op.kind == MSG_DGRAM_RECV or op.kind == MSG_SOCK_RECVFROM or \
                op.kind == MSG_SOCK_RECVFROM_INTO:
            io_uring_prep_recvmsg(s, op.fd, &op.msg, 0)
        else:
            io_uring_prep_sendmsg(s, op.fd, &op.msg, _SEND_FLAGS)
        if poll_first:
            s.ioprio |= self.poll_first
        op.pending = True
        op.prepared_at = self.n_polls
        self._own(op, s)

    cdef object sock_recvfrom(self, object fut, object sock, object buf, Py_ssize_t nbytes,
                              bint into):
        cdef MsgOp op = MsgOp()
        op.dp = self
        op.target = fut
        op.sock = sock
        op.fd = sock.fileno()
        if into:
            op.kind = MSG_SOCK_RECVFROM_INTO
            PyObject_GetBuffer(buf, &op.view, PyBUF_WRITABLE)
            op.have_view = True
            if nbytes > op.view.len:
                op._release()
                raise ValueError('nbytes is greater than the length of the buffer')
            op._prep_recv(<char *>op.view.buf, nbytes if nbytes else op.view.len)
        else:
            op.kind = MSG_SOCK_RECVFROM
            op.keep = buf
            op._prep_recv(PyBytes_AS_STRING(buf), len(buf))
        fut.add_done_callback(op._on_fut_done)
        self._submit_msg(op, False)
        return op

    cdef object sock_sendto(self, object fut, object sock, object data, bytes sockaddr):
        cdef MsgOp op = MsgOp()
        op.dp = self
        op.kind = MSG_SOCK_SENDTO
        op.target = fut
        op.sock = sock
        op.fd = sock.fileno()
        op._prep_send(data, sockaddr)
        fut.add_done_callback(op._on_fut_done)
        self._submit_msg(op, False)
        return op

    # -- one-shot future operations -------------------------------------------------------
    cdef FutureOp _future_op(self, fut, int kind, object sock):
        op = FutureOp()
        op.dp = self
        op.fut = fut
        op.kind = kind
        op.sock = sock
        op.fd = sock.fileno()
        fut.add_done_callback(op._on_fut_done)
        return op

    cdef _submit_future(self, FutureOp op, bint poll_first):
        """Queue op's system call (again, after an EAGAIN or a short send)."""
        cdef io_uring_sqe *s = self._sqe()
        cdef bytes sa
        if op.kind == OP_CONNECT:
            sa = op.keep[0]
            io_uring_prep_connect(s, op.fd, <sockaddr *>PyBytes_AS_STRING(sa), <socklen_t>len(sa))
        elif op.kind == OP_ACCEPT:
            io_uring_prep_accept(s, op.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        elif op.kind == OP_RECV:
            io_uring_prep_recv(s, op.fd, PyBytes_AS_STRING(op.keep), len(op.keep), 0)
        elif op.kind == OP_RECV_INTO:
            io_uring_prep_recv(s, op.fd, op.view.buf, op.view.len, 0)
        else:                                   # OP_SEND: what is left of the data
            io_uring_prep_send(s, op.fd, <char *>op.view.buf + op.offset,
                               op.view.len - op.offset, _SEND_FLAGS)
        if poll_first and op.kind != OP_CONNECT and op.kind != OP_ACCEPT:
            s.ioprio |= self.poll_first
        op.pending = True
        op.prepared_at = self.n_polls
        self._own(op, s)

    cdef object sock_connect(self, object fut, object sock, bytes sa, object address):
        cdef FutureOp op = self._future_op(fut, OP_CONNECT, sock)
        op.keep = (sa, address)
        self._submit_future(op, False)
        return op

    cdef object sock_accept(self, object fut, object sock):
        cdef FutureOp op = self._future_op(fut, OP_ACCEPT, sock)
        self._submit_future(op, False)
        return op

    cdef object sock_recv(self, object fut, object sock, object buf, bint into):
        cdef FutureOp op = self._future_op(fut, OP_RECV_INTO if into else OP_RECV, sock)
        if into:
            PyObject_GetBuffer(buf, &op.view, PyBUF_WRITABLE)
            op.have_view = True
        else:
            op.keep = buf
        self._submit_future(op, False)
        return op

    cdef object sock_send(self, object fut, object sock, object data):
        cdef FutureOp op = self._future_op(fut, OP_SEND, sock)
        PyObject_GetBuffer(data, &op.view, PyBUF_SIMPLE)
        op.have_view = True
        op.keep = data
        self._submit_future(op, False)
        return op

    # -- readiness ------------------------------------------------------------------------
    cdef int watch_fd(self, FdWatch w) except -1:
        # One-shot poll, re-armed after the callback ran: asyncio's add_reader is
        # level-triggered, and a multishot poll only reports new wake-ups (edge-triggered).
        cdef io_uring_sqe *s = self._sqe()
        op = WatchOp()
        op.dp = self
        op.w = w
        w._dp_state = op
        io_uring_prep_poll_add(s, w.fd, w.events)
        self._own(op, s)
        return 0

    cdef int unwatch_fd(self, FdWatch w) except -1:
        op = w._dp_state
        w._dp_state = None
        if op is not None:
            self._cancel(op, False)
        return 0

    cdef dict stats(self):
        return {
            'submissions': self.n_sqes,
            'completions': self.n_cqes,
            'enters': self.n_enters,
            'polls': self.n_polls,
            'cancel_enters': self.n_cancel_enters,
            'mode': self.mode,
            'spin_hits': self.n_spin_hits,
            'sleeps': self.n_sleeps,
            'wake_writes': self.n_wake_writes,
            'napi_busy_poll_us': self.napi_us,
            'inflight': self.inflight,
            'bufs_total': self.r.nbufs,
            'bufs_out': self.r.bufs_out,
            'ring_window': self.r.window,
            'buf_size': self.r.bufsize,
            'max_cqe_batch': self.max_cqe_batch,
            'recv_buffers_lent': self.lent_now,
            'recv_lends': self.n_lent,
            'recv_throttles': self.n_throttles,
            'recv_starved': self.n_starved,
            'recv_parked': len(self.parked),
            'fixed_buffers': len(self.fixed_slots),
            'send_zc': self.n_send_zc,
            'send_zc_bytes': self.n_send_zc_bytes,
            'send_zc_copied': self.n_send_zc_copied,
            'send_again': self.n_send_again,
            'op_again': self.n_op_again,
            'pool': self.pool.stats(),
        }

    def features(self):
        return _feature_names(self.r.features), _setup_flag_names(self.r.setup_flags)

    def ring_fd(self):
        return self.r.ring.ring_fd
