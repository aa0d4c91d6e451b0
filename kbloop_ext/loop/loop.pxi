# The loop core: ready queue, timer heap, the iteration step, fd watches, sock_* operations and
# servers.  Device-agnostic: all I/O goes through self._dp (a Datapath).
#
# kbloop.Loop is a Python subclass of _CoreLoop *and* asyncio.BaseEventLoop.  _CoreLoop comes
# first in the MRO and implements everything on the hot path and everything that touches I/O;
# the cold, device-independent parts (exception handler, task factory, executors, asyncgen
# shutdown, getaddrinfo, create_connection's address logic, start_tls...) are inherited from
# asyncio unchanged, so they behave exactly as asyncio's do.

cdef int MIN_SCHEDULED_TIMER_HANDLES = 100
cdef int STACK_CLOCK_ROUNDS = 32    # stack polls per look at the clock
cdef double URING_PEEK_INTERVAL = 50e-6   # with a stack: how often the io_uring datapath is polled
_CREATE_CONNECTION_HAS_ALL_ERRORS = sys.version_info >= (3, 12)
_UNIX_CLEANUP_SOCKET = sys.version_info >= (3, 13)    # create_unix_server(cleanup_socket=)
_NOT_GIVEN = object()
_Future = futures.Future      # asyncio's C implementations (_asyncio), as asyncio uses them
_Task = tasks.Task
# Set in each kbloop worker process (kbloop.workers): unmodified servers share their port.
_WORKER_REUSE_PORT = os.environ.get('KBLOOP_REUSE_PORT') == '1'


def _set_worker_reuse_port(bint flag):
    global _WORKER_REUSE_PORT
    _WORKER_REUSE_PORT = flag


def _tune_malloc(int trim_threshold, int mmap_threshold):
    """Keep glibc from returning the top of the heap to the kernel after every large free.

    Every received chunk becomes a bytes object of up to recv_buffer_size bytes that is freed
    once handled; with glibc's defaults (trim above 128 KiB) each free shrinks the heap with
    brk() and the next allocation faults zeroed pages back in: at 100 KiB messages that page
    fault churn cost 3-4x uvloop's CPU per request (bench/results/PROFILE.md).  Setting either
    value also freezes glibc's dynamic mmap threshold, hence both.  Returns True if applied.
    """
    return bool(mallopt(M_TRIM_THRESHOLD, trim_threshold)) and \
        bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))


_connect_attempts = contextvars.ContextVar('kbloop_connect_attempts', default=None)
# create_connection(datapath=...): the datapath that this call's connections must take.
_connect_datapath = contextvars.ContextVar('kbloop_connect_datapath', default=None)
cdef double MAXIMUM_TIMEOUT = 24 * 3600


cdef inline double _monotonic():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# What a cancelled sock_* call's result becomes when it is kept (_sock_cancelled)
cdef enum:
    KEEP_NOTHING = 0
    KEEP_BYTES = 1          # sock_recv: bytes
    KEEP_INTO = 2           # sock_recv_into: a count, the data in buf
    KEEP_FROM = 3           # sock_recvfrom: (bytes, address)
    KEEP_FROM_INTO = 4      # sock_recvfrom_into: (count, address), the data in buf
    KEEP_ACCEPTED = 5       # sock_accept: (socket, address)


cdef class _SockKept:
    """Per socket: cancelled sock_* operations not over yet in the kernel, and what they
    completed after their callers gave up (served to the next call on the socket)."""
    cdef:
        _CoreLoop loop
        object sock_ref         # weakref: when the socket object goes, so does this
        int fd
        list settling           # futures of cancelled operations still in the kernel
        list received           # (bytes, address)
        list accepted           # (socket, address)

    def __init__(self, _CoreLoop loop, sock, int fd):
        self.loop = loop
        self.fd = fd
        self.settling = []
        self.received = []
        self.accepted = []
        self.sock_ref = weakref.ref(sock, self._socket_gone)

    def _socket_gone(self, ref):
        self.drop()
        if self.loop._sock_kept_by_fd.get(self.fd) is self:
            del self.loop._sock_kept_by_fd[self.fd]

    cdef drop(self):
        for conn, _ in self.accepted:
            conn.close()
        self.accepted = []
        self.received = []

    cdef release_if_empty(self):
        if not (self.settling or self.received or self.accepted):
            if self.loop._sock_kept_by_fd.get(self.fd) is self:
                del self.loop._sock_kept_by_fd[self.fd]


cdef class _CoreLoop:
    cdef:
        public bint _stopping
        public bint _closed
        public bint _debug
        public object _thread_id
        public Py_ssize_t _timer_cancelled_count
        public double _clock_resolution
        list _ready
        list _io_sink            # while a deferred dispatch runs: where fd-watch handles go
        list _scheduled
        list _flush_queue        # transports with writes to submit this iteration
        list _rearm_watches      # fd watches whose callback ran: re-arm (level-triggered)
        dict _readers, _writers  # fd -> FdWatch
        dict _listeners          # listening fd -> Listener
        dict _unix_server_sockets   # 3.13 cleanup_socket: listening socket -> its inode
        dict _transports         # fd -> TransportCore: sock_*/add_reader refuse those fds
        dict _sock_kept_by_fd    # fd -> _SockKept: what cancelled sock_* calls left behind
        readonly Datapath _dp
        readonly Datapath _net   # a datapath with its own stack (DPDK, RDMA) beside _dp, or None
        uint64_t _iterations
        double _next_uring_peek  # with a user-space stack: when to poll io_uring next

    def __cinit__(self):
        self._closed = True     # until __init__ has a datapath (asyncio's __del__ checks it)

    def __init__(self, Datapath datapath not None, Datapath net=None):
        self._closed = False
        self._dp = datapath
        datapath.loop = self
        self._net = net
        if net is not None:
            net.loop = self
        self._ready = []
        self._scheduled = []
        self._flush_queue = []
        self._rearm_watches = []
        self._readers = {}
        self._writers = {}
        self._listeners = {}
        self._unix_server_sockets = {}
        self._transports = {}
        self._sock_kept_by_fd = {}
        self._clock_resolution = time.get_clock_info('monotonic').resolution
        # State that the methods inherited from asyncio.BaseEventLoop read and write.
        self._default_executor = None
        self._internal_fds = 0
        self._exception_handler = None
        self._current_handle = None
        self._task_factory = None
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth = None
        self._asyncgens = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._executor_shutdown_called = False
        self.slow_callback_duration = 0.1
        self.set_debug(coroutines._is_debug_mode())

    def __repr__(self):
        return (f'<{type(self).__name__} backend={self._dp.name} running={self.is_running()} '
                f'closed={self._closed} debug={self._debug}>')

    # -- scheduling -------------------------------------------------------------------------
    def time(self):
        return _monotonic()

    def call_soon(self, callback, *args, context=None):
        if self._closed:
            raise RuntimeError('Event loop is closed')
        if self._debug:
            self._check_thread()
            self._check_callback(callback, 'call_soon')
        handle = _new_handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def _call_soon(self, callback, args, context):
        handle = _new_handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(self, delay, callback, *args, context=None):
        if delay is None:
            raise TypeError('delay must not be None')
        return self.call_at(_monotonic() + delay, callback, *args, context=context)

    def call_at(self, when, callback, *args, context=None):
        if when is None:
            raise TypeError('when cannot be None')
        if self._closed:
            raise RuntimeError('Event loop is closed')
        if self._debug:
            self._check_thread()
            self._check_callback(callback, 'call_at')
        cdef TimerHandle timer = TimerHandle(when, callback, args, self, context)
        heappush(self._scheduled, timer)
        timer._scheduled = True
        return timer

    def call_soon_threadsafe(self, callback, *args, context=None):
        if self._closed:
            raise RuntimeError('Event loop is closed')
        if self._debug:
            self._check_callback(callback, 'call_soon_threadsafe')
        handle = _new_handle(callback, args, self, context)
        self._ready.append(handle)
        self._dp.wakeup()
        return handle

    # Futures and tasks: asyncio's C Future and Task, made here rather than through
    # BaseEventLoop's Python methods (gather() and every Future/Task construction call these).
    def get_debug(self):
        return self._debug

    def create_future(self):
        return _Future(loop=self)

    def create_task(self, coro, *, name=None, context=None):
        if self._task_factory is not None:
            # A custom factory: BaseEventLoop's own code, as the running Python has it.
            return base_events.BaseEventLoop.create_task(self, coro, name=name, context=context)
        if self._closed:
            raise RuntimeError('Event loop is closed')
        # (No frame of ours to drop from a debug-mode _source_traceback: a Cython method has
        # none, so its last entry is already the caller, as asyncio's is after its del.)
        return _Task(coro, loop=self, name=name, context=context)

    def _write_to_self(self):
        self._dp.wakeup()

    def _timer_handle_cancelled(self, TimerHandle handle):
        if handle._scheduled:
            self._timer_cancelled_count += 1

    # -- running ----------------------------------------------------------------------------
    def run_forever(self):
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        old_agen_hooks = sys.get_asyncgen_hooks()
        cpu = getattr(self, '_pin_cpu', None)
        old_affinity = None
        try:
            self._thread_id = threading.get_ident()
            if cpu is not None:
                old_affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {cpu})     # 0: the calling thread, the loop's
            sys.set_asyncgen_hooks(firstiter=self._asyncgen_firstiter_hook,
                                   finalizer=self._asyncgen_finalizer_hook)
            events._set_running_loop(self)
            while True:
                self._run_once()
                if self._stopping:
                    break
            # asyncio's I/O happens inside the callbacks: what the last iteration queued (a
            # gathered write, the close of a socket) goes to the kernel before run_forever()
            # returns, not whenever the loop runs again
            self._submit_queued()
            self._dp.submit()
        finally:
            if old_affinity is not None:
                os.sched_setaffinity(0, old_affinity)
            self._stopping = False
            self._thread_id = None
            events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_agen_hooks)

    def stop(self):
        self._stopping = True

    def is_running(self):
        return self._thread_id is not None

    def is_closed(self):
        return self._closed

    def close(self):
        if self._thread_id is not None:
            raise RuntimeError('Cannot close a running event loop')
        if self._closed:
            return
        if self._debug:
            logger.debug('Close %r', self)
        self._closed = True
        self._ready.clear()
        self._scheduled.clear()
        self._flush_queue.clear()
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)
        for listener in self._listeners.values():
            (<Listener>listener).active = False
        self._listeners.clear()
        close_unix = getattr(self, '_close_unix', None)   # UnixLoopMixin: signal handlers
        if close_unix is not None:
            close_unix()
        self._readers.clear()
        self._writers.clear()
        self._transports.clear()    # weak in asyncio: transports outlive the loop on their own
        for kept in self._sock_kept_by_fd.values():
            (<_SockKept>kept).drop()
        self._sock_kept_by_fd.clear()
        if self._net is not None:
            self._net.close()
        self._dp.close()

    cpdef _run_once(self):
        cdef list sched = self._scheduled
        cdef list todo
        cdef TimerHandle timer
        cdef Handle handle
        cdef Py_ssize_t n = len(sched), i = 0, ntodo, nold
        cdef bint defer
        cdef double end, timeout, t0, dt, deadline
        cdef int64_t timeout_ns

        # Drop cancelled timers: rebuild when they dominate, else pop them off the top.
        if n > MIN_SCHEDULED_TIMER_HANDLES and self._timer_cancelled_count * 2 > n:
            kept = []
            for timer in sched:
                if timer._cancelled:
                    timer._scheduled = False
                else:
                    kept.append(timer)
            heapify(kept)
            self._scheduled = sched = kept
            self._timer_cancelled_count = 0
        else:
            while sched and (<TimerHandle>sched[0])._cancelled:
                self._timer_cancelled_count -= 1
                timer = heappop(sched)
                timer._scheduled = False

        if self._ready or self._stopping:
            timeout_ns = 0
        elif sched:
            timeout = (<TimerHandle>sched[0])._when - _monotonic()
            if timeout <= 0:
                timeout_ns = 0
            else:
                timeout_ns = <int64_t>(min(timeout, MAXIMUM_TIMEOUT) * 1e9) + 1
        else:
            timeout_ns = -1

        # asyncio runs a poll's I/O after the callbacks already ready (connection_made, then
        # the caller of create_connection, then data_received): with some, the datapaths
        # keep their completions for dispatch_deferred() below (datapath.pxi: order).
        nold = len(self._ready)
        defer = nold != 0
        self._dp.defer = defer
        if self._net is not None:
            self._net.defer = defer

        self._submit_queued()
        deadline = _monotonic() + timeout_ns * 1e-9
        if self._net is not None:
            if (<StackDatapath>self._net).spins:
                self._poll_with_stack(timeout_ns, deadline)
            else:
                self._poll_sleeping_stack(timeout_ns)
        else:
            self._dp.poll(timeout_ns)
        self._iterations += 1
        if timeout_ns != 0 and self._net is None:
            # A blocking wait may end on completions that make no work (a send finishing):
            # keep waiting, up to the same deadline, without a Python-level iteration.
            while (not self._ready and not self._flush_queue and not self._rearm_watches
                   and not self._stopping):
                if timeout_ns > 0:
                    timeout = deadline - _monotonic()
                    if timeout <= 0:
                        break
                    timeout_ns = <int64_t>(timeout * 1e9) + 1
                self._dp.poll(timeout_ns)
                self._iterations += 1

        end = _monotonic() + self._clock_resolution
        if defer:
            due = None              # the timers due now (not those the callbacks will add)
            while sched:
                timer = sched[0]
                if timer._when >= end:
                    break
                heappop(sched)
                timer._scheduled = False
                if due is None:
                    due = []
                due.append(timer)
            todo = self._ready
            self._ready = []
            try:
                self._run_handles(todo, 0, nold)
                self._io_sink = todo    # fd-watch handles: run this iteration, before timers
                try:
                    self._dp.dispatch_deferred()
                    if self._net is not None:
                        self._net.dispatch_deferred()
                except BaseException:
                    self._ready[0:0] = todo[nold:]
                    raise
                finally:
                    self._io_sink = None
            except BaseException:
                if due is not None:
                    self._ready.extend(due)
                raise
            if due is not None:
                todo.extend(due)
            self._run_handles(todo, nold, len(todo))
            return

        while sched:
            timer = sched[0]
            if timer._when >= end:
                break
            heappop(sched)
            timer._scheduled = False
            self._ready.append(timer)

        # Run what is ready now; what these callbacks schedule runs next iteration.
        ntodo = len(self._ready)
        if ntodo == 0:
            return
        todo = self._ready
        self._ready = []
        self._run_handles(todo, 0, ntodo)

    cdef int _run_handles(self, list todo, Py_ssize_t start, Py_ssize_t stop) except -1:
        cdef Handle handle
        cdef Py_ssize_t i = start
        cdef double t0, dt
        if stop <= start:
            return 0
        try:
            if not self._debug:
                for i in range(start, stop):
                    handle = todo[i]
                    if not handle._cancelled:
                        handle._run()
            else:
                for i in range(start, stop):
                    handle = todo[i]
                    if handle._cancelled:
                        continue
                    self._current_handle = handle
                    t0 = _monotonic()
                    handle._run()
                    dt = _monotonic() - t0
                    if dt >= self.slow_callback_duration:
                        logger.warning('Executing %s took %.3f seconds',
                                       base_events._format_handle(handle), dt)
                    self._current_handle = None
        except BaseException:
            # KeyboardInterrupt/SystemExit out of a callback: keep the rest queued, as asyncio.
            # (Completions a datapath kept stay in it: its next poll dispatches them.)
            self._ready[0:0] = todo[i + 1:]
            self._current_handle = None
            raise
        return 0

    cdef int _poll_with_stack(self, int64_t timeout_ns, double deadline) except -1:
        """With a user-space stack the loop never sleeps: that device is polled, not woken.
        Spin on it until there is work or the deadline passes.  The io_uring datapath (kernel
        I/O, wake-ups from other threads, signals) is polled at once when it has submissions
        queued, else every URING_PEEK_INTERVAL: a system call per stack poll would cost more
        than the stack's own work."""
        cdef Py_ssize_t rounds = 0
        cdef double now
        while True:
            self._net.poll(0)
            if rounds % STACK_CLOCK_ROUNDS == 0:
                # Let other threads in (run_in_executor's workers, getaddrinfo): a spin in C
                # never reaches the interpreter's switch point, so without this they starve.
                with nogil:
                    pass
                now = _monotonic()
                if now >= self._next_uring_peek or self._dp.has_submissions():
                    self._dp.poll(0)
                    self._next_uring_peek = now + URING_PEEK_INTERVAL
                if rounds and PyErr_CheckSignals() < 0:
                    return -1
                if timeout_ns > 0 and now >= deadline:
                    return 0
            rounds += 1
            if (timeout_ns == 0 or self._ready or self._flush_queue or self._rearm_watches
                    or self._stopping):
                return 0

    cdef int _poll_sleeping_stack(self, int64_t timeout_ns) except -1:
        """A stack that sleeps (RDMA's sleep mode): poll it; with nothing to do, let it arm
        its wake-ups and sleep in io_uring, where its fds are watched; then poll it again."""
        cdef StackDatapath net = self._net
        cdef int events = net.poll(0)
        if (timeout_ns == 0 or events or self._ready or self._flush_queue
                or self._rearm_watches or self._stopping):
            self._dp.poll(0)
            return 0
        if (net.prepare_sleep() or self._ready or self._flush_queue or self._rearm_watches
                or self._stopping):
            self._dp.poll(0)
            return 0
        self._dp.poll(timeout_ns)
        net.poll(0)
        return 0

    cdef Datapath _datapath_of(self, sock):
        """The datapath that carries sock: the stack's for its stand-in sockets, else the
        kernel's (io_uring)."""
        if self._net is not None and isinstance(sock, StackSocket):
            return self._net
        return self._dp

    cdef _submit_queued(self):
        """Queue this iteration's gathered writes and fd-watch re-arms on the datapath."""
        cdef list queue
        cdef FdWatch w
        if self._flush_queue:
            queue = self._flush_queue
            self._flush_queue = []
            for t in queue:
                (<TransportCore>t)._flush()
        if self._rearm_watches:
            queue = self._rearm_watches
            self._rearm_watches = []
            for w in queue:
                if w.armed or w.handle is None or w.handle._cancelled:
                    continue
                table = self._readers if w.events == POLLIN else self._writers
                if table.get(w.fd) is w:
                    w.armed = True
                    self._dp.watch_fd(w)

    # -- executor: same as asyncio's, but our threads are named kbloop_N ------------------
    def run_in_executor(self, executor, func, *args):
        if (executor is None and self._default_executor is None
                and not self._executor_shutdown_called and not self._closed):
            self._default_executor = concurrent.futures.ThreadPoolExecutor(
                thread_name_prefix='kbloop')
        return base_events.BaseEventLoop.run_in_executor(self, executor, func, *args)

    # -- telemetry ----------------------------------------------------------------------------
    def stats(self):
        """Counters of this loop and its datapath (submissions, completions, enters...)."""
        d = self._dp.stats()
        if self._net is not None:
            d[self._net.name] = self._net.stats()
        d['iterations'] = self._iterations
        d['backend'] = self._dp.name if self._net is None else self._net.name
        return d

    @property
    def backend(self):
        return self._dp.name if self._net is None else self._net.name

    # -- zero-copy buffers ----------------------------------------------------------------------
    def alloc_buffer(self, Py_ssize_t nbytes):
        """A writable kbloop.Buffer of nbytes from this loop's zero-copy pool.  Fill it, then
        transport.write(buf) sends it from where it is, without a copy."""
        self._check_closed()
        return self._dp.pool.alloc(nbytes)

    @property
    def buffer_pool(self):
        return self._dp.pool

    # -- fd watches (add_reader / add_writer) -------------------------------------------------
    cdef _ensure_fd_no_transport(self, fd):
        cdef TransportCore transport = self._transports.get(fd)
        if transport is not None and not transport._closing:
            raise RuntimeError(f'File descriptor {fd!r} is used by transport '
                               f'{transport._facade!r}')

    cdef _add_watch(self, dict table, int events, fd, callback, args, bint check=True):
        self._check_closed()
        fd = selectors._fileobj_to_fd(fd)
        if check:
            self._ensure_fd_no_transport(fd)
        handle = _new_handle(callback, args, self, None)
        cdef FdWatch w = table.get(fd)
        if w is not None:
            w.handle._cancelled = True
            w.handle = handle
            if not w.armed:
                self._rearm_watches.append(w)
            return
        w = FdWatch(self, fd, events, handle)
        table[fd] = w
        w.armed = True
        self._dp.watch_fd(w)

    cdef _remove_watch(self, dict table, fd):
        if self._closed:
            return False
        fd = selectors._fileobj_to_fd(fd)
        cdef FdWatch w = table.pop(fd, None)
        if w is None:
            return False
        w.handle.cancel()
        if w.armed:
            w.armed = False
            self._dp.unwatch_fd(w)
        return True

    def add_reader(self, fd, callback, *args):
        self._add_watch(self._readers, POLLIN, fd, callback, args)

    def remove_reader(self, fd):
        return self._remove_watch(self._readers, fd)

    def add_writer(self, fd, callback, *args):
        self._add_watch(self._writers, POLLOUT, fd, callback, args)

    def remove_writer(self, fd):
        return self._remove_watch(self._writers, fd)

    # -- sock_* on the ring -------------------------------------------------------------------
    # In the completion model the kernel may finish a receive or an accept that the caller has
    # already given up (cancelled, timed out).  Its result is never dropped: it is kept for the
    # next call on that socket (_SockKept), and a cancelled call returns only once its
    # operation is over in the kernel, so that nothing it started goes on behind the caller
    # (a sock_sendall sends no more after its CancelledError) and the next call on the socket
    # sees the data in order.
    cdef _check_sock(self, sock):
        if isinstance(sock, StackSocket):
            raise TypeError(f'loop.sock_*() needs a kernel socket, not a {type(sock).__name__}: '
                            f'use a transport or streams on the {self._net.name} datapath')
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError('the socket must be non-blocking')
        self._ensure_fd_no_transport(sock.fileno())

    cdef _SockKept _sock_kept(self, sock, int fd, bint create):
        cdef _SockKept kept = self._sock_kept_by_fd.get(fd)
        if kept is not None and kept.sock_ref() is not sock:
            kept.drop()         # a closed socket's leftovers: never routed to a reused fd
            del self._sock_kept_by_fd[fd]
            kept = None
        if kept is None and create:
            kept = _SockKept(self, sock, fd)
            self._sock_kept_by_fd[fd] = kept
        return kept

    def _sock_settling(self, sock, int fd):
        """A datapath cancels an operation on sock: the future that says it is over."""
        fut = self.create_future()
        self._sock_kept(sock, fd, True).settling.append(fut)
        return fut

    def _sock_keep(self, sock, int fd, bint accepted, item):
        """What the kernel completed for a cancelled call: (data, address) received, or an
        accepted (socket, address)."""
        cdef _SockKept kept
        if sock.fileno() != fd:     # closed meanwhile: nobody can receive it any more
            if accepted:
                item[0].close()
            return
        kept = self._sock_kept(sock, fd, True)
        (kept.accepted if accepted else kept.received).append(item)

    async def _sock_leftover(self, sock, bint accept):
        """Wait for cancelled operations on sock to settle; then what they left, or None."""
        cdef _SockKept kept = self._sock_kept(sock, sock.fileno(), False)
        if kept is None:
            return None
        while kept.settling:
            await kept.settling[0]
            if kept.settling and kept.settling[0].done():
                kept.settling.pop(0)
        items = kept.accepted if accept else kept.received
        if not items:
            kept.release_if_empty()
            return None
        item = items.pop(0)
        kept.release_if_empty()
        return item

    cdef _putback(self, sock, item):
        """Received data a call could not take whole (a stream): first in line again."""
        self._sock_kept(sock, sock.fileno(), True).received.insert(0, item)

    async def _sock_cancelled(self, op, fut=None, sock=None, keep=KEEP_NOTHING, buf=None):
        """A sock_* call was cancelled: keep a result that came too late for its caller (the
        task was cancelled after the future was resolved), then return once its operation is
        over in the kernel."""
        if keep != KEEP_NOTHING and fut.done() and not fut.cancelled() \
                and fut.exception() is None:
            result = fut.result()
            if keep == KEEP_BYTES:
                result = (result, None)
            elif keep == KEEP_INTO:
                result = (bytes(memoryview(buf).cast('B')[:result]), None)
            elif keep == KEEP_FROM_INTO:
                result = (bytes(memoryview(buf).cast('B')[:result[0]]), result[1])
            self._sock_keep(sock, sock.fileno(), keep == KEEP_ACCEPTED, result)
        settled = op.settled
        if settled is not None and not settled.done():
            await settled

    async def _sock_recv_kept(self, sock, Py_ssize_t n, buf):
        """Serve a receive from what a cancelled one left: bytes (buf None), or the count
        copied into buf; None if there is nothing."""
        item = await self._sock_leftover(sock, False)
        if item is None:
            return None
        data, addr = item
        if buf is not None:
            view = memoryview(buf).cast('B')
            n = len(view) if n <= 0 or n > len(view) else n
        if len(data) > n:
            if sock.type == SOCK_STREAM:
                self._putback(sock, (data[n:], addr))
            data = data[:n]     # a datagram is cut to the buffer, as the kernel would
        if buf is None:
            return data, addr
        view[:len(data)] = data
        return len(data), addr

    async def sock_recv(self, sock, n):
        self._check_sock(sock)
        if self._sock_kept_by_fd:
            got = await self._sock_recv_kept(sock, n, None)
            if got is not None:
                return got[0]
        fut = self.create_future()
        op = self._dp.sock_recv(fut, sock, PyBytes_FromStringAndSize(NULL, n), False)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op, fut, sock, KEEP_BYTES, None)
            raise

    async def sock_recv_into(self, sock, buf):
        self._check_sock(sock)
        if self._sock_kept_by_fd:
            got = await self._sock_recv_kept(sock, 0, buf)
            if got is not None:
                return got[0]
        fut = self.create_future()
        op = self._dp.sock_recv(fut, sock, buf, True)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op, fut, sock, KEEP_INTO, buf)
            raise

    async def sock_sendall(self, sock, data):
        self._check_sock(sock)
        # As asyncio: send at once what the socket takes (so that closing it in the next
        # callback loses nothing); the ring sends the rest, reading the caller's buffer.
        n = _send_now(sock.fileno(), data, None)
        if n == -1:
            n = 0
        elif n == memoryview(data).nbytes:
            return
        fut = self.create_future()
        op = self._dp.sock_send(fut, sock, memoryview(data).cast('B')[n:] if n else data)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op)
            raise

    async def sock_connect(self, sock, address):
        self._check_sock(sock)
        if sock.family in (AF_INET, AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self)
            _, _, _, _, address = resolved[0]
        sockaddr = _pack_sockaddr(sock.family, address)
        # As asyncio: connect at once (AF_UNIX completes there); wait for writability and read
        # SO_ERROR if it is in progress.  A full AF_UNIX backlog (EAGAIN) is the ring's: it
        # retries the connect itself.
        fd = sock.fileno()
        err = _connect_now(fd, sockaddr)
        if err == 0:
            return
        if err == EAGAIN:
            fut = self.create_future()
            op = self._dp.sock_connect(fut, sock, sockaddr, address)
            try:
                return await fut
            except exceptions.CancelledError:
                await self._sock_cancelled(op)
                raise
        if err != EINPROGRESS and err != EINTR:
            raise OSError(err, os.strerror(err))
        await self._wait_writable(fd)
        err = sock.getsockopt(SOL_SOCKET, SO_ERROR)
        if err:
            raise OSError(err, f'Connect call failed {address}')

    async def sock_accept(self, sock):
        self._check_sock(sock)
        if self._sock_kept_by_fd:
            got = await self._sock_leftover(sock, True)
            if got is not None:
                return got
        fut = self.create_future()
        op = self._dp.sock_accept(fut, sock)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op, fut, sock, KEEP_ACCEPTED, None)
            raise

    async def sock_recvfrom(self, sock, bufsize):
        self._check_sock(sock)
        if self._sock_kept_by_fd:
            got = await self._sock_recv_kept(sock, bufsize, None)
            if got is not None:
                return got
        fut = self.create_future()
        op = self._dp.sock_recvfrom(fut, sock, PyBytes_FromStringAndSize(NULL, bufsize), 0,
                                    False)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op, fut, sock, KEEP_FROM, None)
            raise

    async def sock_recvfrom_into(self, sock, buf, nbytes=0):
        self._check_sock(sock)
        if self._sock_kept_by_fd:
            got = await self._sock_recv_kept(sock, nbytes, buf)
            if got is not None:
                return got
        fut = self.create_future()
        op = self._dp.sock_recvfrom(fut, sock, buf, nbytes, True)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op, fut, sock, KEEP_FROM_INTO, buf)
            raise

    async def sock_sendto(self, sock, data, address):
        self._check_sock(sock)
        if sock.family in (AF_INET, AF_INET6) and isinstance(address, tuple):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self)
            address = resolved[0][4]
        sockaddr = _pack_sockaddr(sock.family, address, sock.type)
        n = _send_now(sock.fileno(), data, sockaddr)     # as asyncio: at once if it can
        if n >= 0:
            return n
        fut = self.create_future()
        op = self._dp.sock_sendto(fut, sock, data, sockaddr)
        try:
            return await fut
        except exceptions.CancelledError:
            await self._sock_cancelled(op)
            raise

    # -- sendfile: the kernel's zero-copy sendfile(2), waiting for writability on the ring ----
    async def _wait_writable(self, int fd):
        # internal: the fd may belong to the transport whose sendfile() this is
        fut = self.create_future()
        self._add_watch(self._writers, POLLOUT, fd, futures._set_result_unless_cancelled,
                        (fut, None), False)
        try:
            await fut
        finally:
            self.remove_writer(fd)

    async def _sock_sendfile_native(self, sock, file, offset, count):
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise exceptions.SendfileNotAvailableError('not a regular file')
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise exceptions.SendfileNotAvailableError('not a regular file')
        blocksize = count if count else fsize
        if not blocksize:
            return 0    # empty file
        fd = sock.fileno()
        total = 0
        try:
            while True:
                if count:
                    blocksize = count - total
                    if blocksize <= 0:
                        break
                try:
                    sent = os.sendfile(fd, fileno, offset + total, blocksize)
                except (BlockingIOError, InterruptedError):
                    await self._wait_writable(fd)
                    continue
                except OSError as exc:
                    if total == 0:
                        # e.g. not an mmap-able file: the caller falls back to read/send
                        raise exceptions.SendfileNotAvailableError('os.sendfile call failed')
                    if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                        raise ConnectionError('socket is not connected', errno.ENOTCONN) from exc
                    raise
                if sent == 0:
                    break   # end of file
                total += sent
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)
        return total

    async def _sendfile_native(self, transp, file, offset, count):
        cdef StreamCore core = transp._core
        if core._dp is not self._dp:
            raise exceptions.SendfileNotAvailableError(
                f'sendfile goes through the kernel; this transport is on the {self._net.name} '
                'datapath')
        transp.pause_reading()
        await core._make_empty_waiter()
        try:
            self._check_sendfile_params(core._sock, file, offset, count)
            return await self._sock_sendfile_native(core._sock, file, offset, count)
        finally:
            core._reset_empty_waiter()
            transp.resume_reading()

    # -- transports -----------------------------------------------------------------------------
    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        return DatagramCore(self, sock, protocol, address, waiter, extra)._facade

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):
        return StreamCore(self, sock, protocol, waiter, extra, server)._facade

    def _make_ssl_transport(self, rawsock, protocol, sslcontext, waiter=None, *,
                            server_side=False, server_hostname=None, extra=None, server=None,
                            ssl_handshake_timeout=None, ssl_shutdown_timeout=None,
                            call_connection_made=True):
        ssl_protocol, app_transport = _new_tls_protocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout, ssl_shutdown_timeout, call_connection_made)
        StreamCore(self, rawsock, ssl_protocol, extra=extra, server=server)
        return app_transport

    async def start_tls(self, transport, protocol, sslcontext, *, server_side=False,
                        server_hostname=None, ssl_handshake_timeout=None,
                        ssl_shutdown_timeout=None):
        """asyncio's start_tls(), over the selected TLS layer (KBLOOP_TLS)."""
        if not isinstance(sslcontext, _ssl_mod.SSLContext):
            raise TypeError(f'sslcontext is expected to be an instance of ssl.SSLContext, '
                            f'got {sslcontext!r}')
        if not getattr(transport, '_start_tls_compatible', False):
            raise TypeError(f'transport {transport!r} is not supported by start_tls()')
        waiter = self.create_future()
        ssl_protocol, app_transport = _new_tls_protocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout, ssl_shutdown_timeout, False)
        # As asyncio, whose transports resume reading in the context of start_tls()'s caller:
        # the TLS layer's callbacks run in a copy of that context.
        core = getattr(transport, '_core', None)
        if isinstance(core, StreamCore):
            (<StreamCore>core)._context = PyContext_CopyCurrent()
        # Pause first so that no data reaches the TLS layer before its connection_made().
        transport.pause_reading()
        transport.set_protocol(ssl_protocol)
        conmade_cb = self.call_soon(ssl_protocol.connection_made, transport)
        resume_cb = self.call_soon(transport.resume_reading)
        try:
            await waiter
        except BaseException:
            transport.close()
            conmade_cb.cancel()
            resume_cb.cancel()
            raise
        return app_transport

    def _start_serving(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100,
                       ssl_handshake_timeout=None, ssl_shutdown_timeout=None):
        cdef Listener listener = Listener(self, sock, protocol_factory, sslcontext, server,
                                          ssl_handshake_timeout, ssl_shutdown_timeout)
        self._listeners[listener.fd] = listener
        listener.start()

    def _stop_serving(self, sock):
        cdef Listener listener = self._listeners.pop(sock.fileno(), None)
        ino = self._unix_server_sockets.pop(sock, None)
        path = sock.getsockname() if ino is not None else None
        if listener is not None:
            listener.stop()
        sock.close()
        if path is not None:
            # 3.13's cleanup_socket: remove the socket file unless another one replaced it
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.error('Unable to clean up listening UNIX socket %r: %r', path, err)

    # -- create_connection: asyncio's, plus all_errors (3.12) on every Python ----------------
    cdef object _check_datapath_choice(self, datapath):
        """create_connection/create_server(datapath=): None routes by address; "kernel" is
        io_uring (the kernel's TCP/IP); the name of this loop's stack ("dpdk", "rdma") forces
        that stack."""
        if datapath is None or datapath == 'kernel':
            return datapath
        if self._net is not None and datapath == self._net.name:
            return datapath
        choices = ['kernel'] + ([self._net.name] if self._net is not None else [])
        raise ValueError(f'datapath must be None or one of {choices} on this loop, '
                         f'not {datapath!r}')

    async def create_connection(self, protocol_factory, host=None, port=None, *,
                                all_errors=False, datapath=None, **kwargs):
        if datapath is not None:
            self._check_datapath_choice(datapath)
            token = _connect_datapath.set(datapath)
            try:
                return await self.create_connection(protocol_factory, host, port,
                                                    all_errors=all_errors, **kwargs)
            finally:
                _connect_datapath.reset(token)
        if _CREATE_CONNECTION_HAS_ALL_ERRORS:
            return await base_events.BaseEventLoop.create_connection(
                self, protocol_factory, host, port, all_errors=all_errors, **kwargs)
        if not all_errors:
            return await base_events.BaseEventLoop.create_connection(
                self, protocol_factory, host, port, **kwargs)
        # asyncio 3.11 folds the per-address errors into one OSError.  It hands its list of
        # them to _connect_sock(), so record that list and raise them all as 3.12 does.
        attempts = []
        token = _connect_attempts.set(attempts)
        try:
            return await base_events.BaseEventLoop.create_connection(
                self, protocol_factory, host, port, **kwargs)
        except OSError:
            errors = [exc for outer in attempts for inner in outer for exc in inner]
            if not errors:
                raise
            raise ExceptionGroup('create_connection failed', errors) from None
        finally:
            _connect_attempts.reset(token)

    async def _connect_sock(self, exceptions, addr_info, local_addr_infos=None):
        attempts = _connect_attempts.get()
        if attempts is not None and not any(a is exceptions for a in attempts):
            attempts.append(exceptions)
        choice = _connect_datapath.get()
        if self._net is not None and choice == self._net.name:
            if addr_info[0] != AF_INET or local_addr_infos:
                raise OSError(errno.EAFNOSUPPORT, f'the {choice} datapath connects to IPv4 '
                              'addresses, without local_addr')
            return await self._connect_stack(exceptions, addr_info[4])
        if (self._net is not None and choice is None and addr_info[0] == AF_INET
                and not local_addr_infos and self._net.reaches(addr_info[4][0])):
            return await self._connect_stack(exceptions, addr_info[4])
        return await base_events.BaseEventLoop._connect_sock(
            self, exceptions, addr_info, local_addr_infos)

    async def _connect_stack(self, exceptions, address):
        """An active open on the user-space stack (asyncio's _connect_sock, for its sockets)."""
        cdef StackDatapath net = self._net
        mine = []
        exceptions.append(mine)
        sock = net.socket()
        try:
            await net.connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            mine.append(OSError(exc.errno, f'Connect call failed {address}'))
            raise mine[-1] from None
        except BaseException:
            sock.close()
            raise

    # -- UDP on the user-space stack --------------------------------------------------------
    async def create_datagram_endpoint(self, protocol_factory, local_addr=None, remote_addr=None,
                                       *, family=0, proto=0, flags=0, sock=None, **kwargs):
        """asyncio's, and with a user-space stack: endpoints bound to its address or the
        wildcard, or connected to its network, are UDP on the stack (docs/dpdk.md)."""
        if (self._net is not None and sock is None and family in (0, AF_INET)
                and (local_addr is not None or remote_addr is not None)
                and 'reuse_address' not in kwargs):     # asyncio's own error for it
            local = await self._stack_udp_address(local_addr, True)
            remote = await self._stack_udp_address(remote_addr, False)
            if local is not False and remote is not False:
                return await self._stack_datagram_endpoint(protocol_factory, local, remote)
        return await base_events.BaseEventLoop.create_datagram_endpoint(
            self, protocol_factory, local_addr, remote_addr, family=family, proto=proto,
            flags=flags, sock=sock, **kwargs)

    async def _stack_udp_address(self, addr, bint local):
        """addr resolved to (IPv4, port) if the stack carries it, None for no address, False
        when it belongs to the kernel."""
        cdef StackDatapath net = self._net
        if addr is None:
            return None
        if not isinstance(addr, tuple) or len(addr) != 2:
            return False
        host, port = addr
        if host not in (None, '') and not net.reaches(host) and not net.serves(host):
            infos = await self.getaddrinfo(host, port, family=AF_INET, type=SOCK_DGRAM)
            if not infos:
                return False
            host, port = infos[0][4][:2]
        if local:
            return (host or '0.0.0.0', port) if net.serves(host) else False
        return (host, port) if net.reaches(host) else False

    async def _stack_datagram_endpoint(self, protocol_factory, local, remote):
        cdef StackDatapath net = self._net
        sock = net.socket(SOCK_DGRAM)
        try:
            sock.bind(local or ('0.0.0.0', 0))
            if remote is not None:
                net.udp_connect(sock, remote)
            protocol = protocol_factory()
            waiter = self.create_future()
            transport = self._make_datagram_transport(sock, protocol, remote, waiter)
        except BaseException:
            sock.close()
            raise
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def create_server(self, protocol_factory, host=None, port=None, *,
                            family=AF_UNSPEC, flags=AI_PASSIVE, sock=None, backlog=100,
                            ssl=None, reuse_address=None, reuse_port=None, keep_alive=None,
                            ssl_handshake_timeout=None, ssl_shutdown_timeout=None,
                            start_serving=True, datapath=None):
        _check_ssl_args(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if sock is not None:
            base_events._check_ssl_socket(sock)
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError('host/port and sock can not be specified at the same time')
            if reuse_address is None:
                reuse_address = True
            if reuse_port is None and _WORKER_REUSE_PORT:
                reuse_port = True       # a kbloop worker: the port is shared with its siblings
            self._check_datapath_choice(datapath)
            if self._net is not None and datapath == self._net.name:
                if family not in (AF_UNSPEC, AF_INET) or not self._stack_serves(host, family):
                    raise OSError(errno.EADDRNOTAVAIL, f'{host!r} is not an address of the '
                                  f'{datapath} datapath')
                sockets = self._bind_stack(host, port)
            elif self._net is not None and datapath is None and self._stack_serves(host, family):
                sockets = self._bind_stack(host, port)
            else:
                sockets = await self._bind_listening(host, port, family, flags, reuse_address,
                                                     reuse_port)
        else:
            if sock is None:
                raise ValueError('Neither host/port nor sock were specified')
            if sock.type != SOCK_STREAM:
                raise ValueError(f'A Stream Socket was expected, got {sock!r}')
            sockets = [sock]
        for s in sockets:
            s.setblocking(False)
            if keep_alive:
                # Linux: accepted sockets inherit SO_KEEPALIVE from the listener (3.13 API)
                s.setsockopt(SOL_SOCKET, SO_KEEPALIVE, True)
        server = Server(self, sockets, protocol_factory, ssl, backlog,
                        ssl_handshake_timeout, ssl_shutdown_timeout)
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)
        if self._debug:
            logger.info('%r is serving', server)
        return server

    cdef bint _stack_serves(self, host, family):
        """create_server on the wildcard or the stack's address listens on the user-space
        stack (docs/dpdk.md); other addresses (127.0.0.1, IPv6) on the kernel's."""
        if family not in (AF_UNSPEC, AF_INET):
            return False
        if host is None or isinstance(host, str):
            return self._net.serves(host)
        return all(self._net.serves(h) for h in host)

    cdef list _bind_stack(self, host, port):
        cdef StackDatapath net = self._net
        sock = net.socket()
        try:
            sock.bind((host if isinstance(host, str) or host is None else net.ip, port or 0))
        except OSError as err:
            sock.close()
            raise OSError(err.errno, 'error while attempting to bind on address %r: %s'
                          % ((host, port), err.strerror.lower())) from None
        return [sock]

    async def _bind_listening(self, host, port, family, flags, reuse_address, reuse_port):
        if host == '':
            hosts = [None]
        elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
            hosts = [host]
        else:
            hosts = host
        infos = await tasks.gather(*[
            self._create_server_getaddrinfo(h, port, family, flags) for h in hosts])
        sockets = []
        try:
            for af, socktype, proto, _, sa in set(itertools.chain.from_iterable(infos)):
                try:
                    s = socket_socket(af, socktype, proto)
                except OSError:
                    if self._debug:
                        logger.warning('create_server() failed to create socket.socket(%r, %r, %r)',
                                       af, socktype, proto, exc_info=True)
                    continue
                sockets.append(s)
                if reuse_address:
                    s.setsockopt(SOL_SOCKET, SO_REUSEADDR, True)
                if reuse_port:
                    base_events._set_reuseport(s)
                if af == AF_INET6:
                    s.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, True)
                try:
                    s.bind(sa)
                except OSError as err:
                    raise OSError(err.errno, 'error while attempting to bind on address %r: %s'
                                  % (sa, err.strerror.lower())) from None
        except BaseException:
            for s in sockets:
                s.close()
            raise
        return sockets

    async def create_unix_server(self, protocol_factory, path=None, *, sock=None, backlog=100,
                                 ssl=None, ssl_handshake_timeout=None,
                                 ssl_shutdown_timeout=None, start_serving=True,
                                 cleanup_socket=_NOT_GIVEN):
        # cleanup_socket is 3.13's (default True): asyncio before 3.13 has no such argument
        if cleanup_socket is _NOT_GIVEN:
            cleanup_socket = _UNIX_CLEANUP_SOCKET
        elif not _UNIX_CLEANUP_SOCKET:
            raise TypeError("create_unix_server() got an unexpected keyword argument "
                            "'cleanup_socket'")
        _check_ssl_args(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError('path and sock can not be specified at the same time')
            path = os.fspath(path)
            sock = socket_socket(AF_UNIX, SOCK_STREAM)
            if path[0] not in (0, '\x00'):
                # A stale socket file from an earlier run would make bind() fail.
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    logger.error('Unable to check or remove stale UNIX socket %r: %r', path, err)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f'Address {path!r} is already in use') from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError('path was not specified, and no sock specified')
            if sock.family != AF_UNIX or sock.type != SOCK_STREAM:
                raise ValueError(f'A UNIX Domain Stream Socket was expected, got {sock!r}')
        if cleanup_socket:
            # remembered so that closing the server removes the file if it is still this one
            name = sock.getsockname()
            if name and name[0] not in (0, '\x00'):
                try:
                    self._unix_server_sockets[sock] = os.stat(name).st_ino
                except FileNotFoundError:
                    pass
        sock.setblocking(False)
        server = Server(self, [sock], protocol_factory, ssl, backlog,
                        ssl_handshake_timeout, ssl_shutdown_timeout)
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)
        return server

    async def create_unix_connection(self, protocol_factory, path=None, *, ssl=None, sock=None,
                                     server_hostname=None, ssl_handshake_timeout=None,
                                     ssl_shutdown_timeout=None):
        assert server_hostname is None or isinstance(server_hostname, str)
        if ssl:
            if server_hostname is None:
                raise ValueError('you have to pass server_hostname when using ssl')
        else:
            if server_hostname is not None:
                raise ValueError('server_hostname is only meaningful with ssl')
            _check_ssl_args(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError('path and sock can not be specified at the same time')
            path = os.fspath(path)
            sock = socket_socket(AF_UNIX, SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError('no path and sock were specified')
            if sock.family != AF_UNIX or sock.type != SOCK_STREAM:
                raise ValueError(f'A UNIX Domain Stream Socket was expected, got {sock!r}')
            sock.setblocking(False)
        return await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout)


cdef Py_ssize_t _send_now(int fd, data, bytes sa) except -2:
    """One non-blocking send(2) (sendto(2) to sa if given) of data, as asyncio's sock_* try
    before they wait: the bytes sent, or -1 if the socket's buffer is full."""
    cdef Py_buffer view
    cdef ssize_t n
    cdef int err
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        while True:
            if sa is None:
                n = c_send(fd, view.buf, view.len, MSG_DONTWAIT | MSG_NOSIGNAL)
            else:
                n = c_sendto(fd, view.buf, view.len, MSG_DONTWAIT | MSG_NOSIGNAL,
                             <sockaddr *>PyBytes_AS_STRING(sa), <socklen_t>len(sa))
            if n >= 0:
                return n
            err = c_errno
            if err == EAGAIN:
                return -1
            if err != EINTR:
                raise OSError(err, os.strerror(err))
    finally:
        PyBuffer_Release(&view)


cdef int _connect_now(int fd, bytes sa):
    """connect(2) on a non-blocking socket: 0, or the errno."""
    if c_connect(fd, <sockaddr *>PyBytes_AS_STRING(sa), <socklen_t>len(sa)) == 0:
        return 0
    return c_errno


cdef _check_ssl_args(ssl, ssl_handshake_timeout, ssl_shutdown_timeout):
    if isinstance(ssl, bool):
        raise TypeError('ssl argument must be an SSLContext or None')
    if ssl_handshake_timeout is not None and ssl is None:
        raise ValueError('ssl_handshake_timeout is only meaningful with ssl')
    if ssl_shutdown_timeout is not None and ssl is None:
        raise ValueError('ssl_shutdown_timeout is only meaningful with ssl')


cdef bytes _pack_sockaddr(int family, address, int socktype=1):   # 1: SOCK_STREAM
    """The C struct sockaddr for a Python socket address (the kernel reads it at submit).
    A host name is resolved here, blocking, exactly as socket.sendto() would."""
    if family == AF_INET or family == AF_INET6:
        if not isinstance(address, tuple) or len(address) < 2:
            raise TypeError(f'{"AF_INET" if family == AF_INET else "AF_INET6"} address must '
                            f'be a tuple (host, port), not {type(address).__name__}')
        host, port = address[0], address[1]
        if not isinstance(port, int):
            raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
        if not 0 <= port <= 65535:
            raise OverflowError('port must be 0-65535.')
        try:
            packed = inet_pton(family, host.partition('%')[0] if family == AF_INET6 else host)
        except OSError:
            resolved = getaddrinfo(host, port, family, socktype)
            return _pack_sockaddr(family, resolved[0][4], socktype)
        if family == AF_INET:
            return struct_pack('=H', AF_INET) + struct_pack('!H', port) + packed + b'\0' * 8
        flowinfo = address[2] if len(address) > 2 else 0
        scope_id = address[3] if len(address) > 3 else 0
        if '%' in host and not scope_id:
            scope_id = if_nametoindex(host.partition('%')[2])
        return (struct_pack('=H', AF_INET6) + struct_pack('!HI', port, flowinfo) + packed
                + struct_pack('=I', scope_id))
    if family == AF_UNIX:
        path = os.fsencode(address) if isinstance(address, str) else bytes(address)
        if not path:
            raise OSError(errno.EINVAL, 'empty AF_UNIX address')
        if path[0] != 0:
            path += b'\0'
        if len(path) > 108:
            raise OSError(errno.ENAMETOOLONG, 'AF_UNIX path too long')
        return struct_pack('=H', AF_UNIX) + path
    raise OSError(errno.EAFNOSUPPORT, f'address family {family} is not supported by kbloop')
