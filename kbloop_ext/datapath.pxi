# The datapath contract: what every device (io_uring now; DPDK and RDMA later) provides to the
# loop core and the transports.  docs/architecture.md explains it in prose.
#
# Completion model: the transports and the loop ask for operations; the datapath queues them,
# submits everything queued in one batch per loop iteration (poll), and reports each result by
# calling back into the object that asked:
#
#   Listener      ._on_accept(fd)        ._on_accept_error(errno)
#   DatagramCore  ._on_datagram(data, addr)   ._on_dgram_error(errno)   ._on_dgram_sent(size, errno)
#   StreamCore    ._on_data(ptr, n)      ._on_eof()   ._on_recv_error(errno)   ._on_recv_done()
#                 ._on_sent(nbytes)      ._on_send_error(errno)
#   future ops    the asyncio future is resolved (result or OSError); cancelling the future
#                 cancels the operation in the device
#   fd watchers   the reader/writer Handle is scheduled (level-triggered, as asyncio's)
#
# Order (asyncio's): a poll's completions are dispatched after the callbacks that were already
# on the ready queue when the poll started, and before the timers that became due.  When that
# queue is empty the datapath dispatches inside poll(); otherwise the loop sets `defer` and
# poll() keeps what it found (holding the operations and their buffers) until the loop, having
# run those callbacks, calls dispatch_deferred().  Completions that come after the poll wait
# for the next one.
#
# Buffer ownership: received bytes live in the datapath's registered pool and are lent to
# _on_data only for the duration of the call (the transport copies them into bytes or into a
# BufferedProtocol's buffer); the buffer returns to the device right after.  For a
# ZeroCopyProtocol the datapath instead hands the transport a kbloop.Buffer over the receive
# buffer (StreamCore._on_buffer); the buffer goes back to the device when the application drops
# the last reference (recv_buffer_returned).  A device must stop re-arming receives for
# transports that hold too many buffers and when it runs out of them, and resume when they
# come back: back-pressure, never loss.  Sent data is owned
# by the transport's write queue until the datapath takes a batch of it with take_batch(); from
# then on the datapath holds the objects (and their buffer exports) until the completion.  A
# pool Buffer may be sent without any copy (registered memory: register_slab).


cdef class Datapath:
    """Abstract device datapath.  Subclasses implement every method."""
    cdef readonly str name
    cdef _CoreLoop loop
    cdef readonly BufferPool pool     # the loop's zero-copy memory, registered with the device
    cdef bint defer                   # set by the loop: poll() keeps completions (see above)

    # -- zero-copy memory ------------------------------------------------------------------
    cdef int register_slab(self, _Slab slab) except -1:
        """Make slab usable for zero-copy sends (io_uring fixed buffers, DPDK external memory,
        an RDMA memory region).  A device that cannot simply sends it the ordinary way."""
        return 0

    cdef int unregister_slab(self, _Slab slab) except -1:
        return 0

    cdef void recv_buffer_returned(self, uint32_t number, uintptr_t token, object holder) noexcept:
        """The last Buffer over receive buffer `number` (or the device's `token`), filled for
        `holder`, is gone."""
        pass

    cdef int poll(self, int64_t timeout_ns) except -1:
        """Submit queued operations, wait up to timeout_ns (<0 forever, 0 not at all) for
        completions and dispatch them.  Returns the number of completions dispatched."""
        raise NotImplementedError

    cdef int dispatch_deferred(self) except -1:
        """Dispatch what the last poll() kept because `defer` was set.  Returns how many."""
        return 0

    cdef void close(self):
        pass

    cdef bint has_submissions(self):
        """Operations queued and not submitted yet (poll(0) would submit them)."""
        return False

    cdef int submit(self) except -1:
        """Hand what is queued to the device now, dispatching nothing (the loop is stopping)."""
        return 0

    # -- streams ------------------------------------------------------------------------
    cdef int listen(self, Listener listener) except -1:
        raise NotImplementedError

    cdef int unlisten(self, Listener listener) except -1:
        raise NotImplementedError

    cdef int recv_start(self, StreamCore t) except -1:
        raise NotImplementedError

    cdef int recv_stop(self, TransportCore t) except -1:
        raise NotImplementedError

    cdef int send(self, StreamCore t) except -1:
        """Send a batch of t's queued writes (at most one send in flight per transport)."""
        raise NotImplementedError

    cdef int shutdown_write(self, StreamCore t) except -1:
        raise NotImplementedError

    cdef int close_fd(self, int fd) except -1:
        """Cancel every operation still pending on fd, then close it."""
        raise NotImplementedError

    cdef int attach(self, TransportCore t) except -1:
        """A transport now owns t._sock (a device without fds routes events by socket)."""
        return 0

    cdef int close_socket(self, sock) except -1:
        """A transport is done with sock: close it (for fd devices, through close_fd)."""
        fd = sock.detach()
        if fd >= 0:
            self.close_fd(fd)
        return 0

    # -- datagrams -------------------------------------------------------------------------
    cdef int dgram_recv_start(self, DatagramCore t) except -1:
        """Receive one datagram: t._on_datagram(data, addr) or t._on_dgram_error(errno), then
        t._on_recv_done()."""
        raise NotImplementedError

    cdef int dgram_send(self, DatagramCore t, object data, bytes sockaddr) except -1:
        """Send one datagram (to sockaddr, or to the connected peer if None):
        t._on_dgram_sent(size, errno or 0)."""
        raise NotImplementedError

    # -- one-shot operations resolving a future (sock_* and connect) ---------------------
    # Each returns its operation object.  When the future is cancelled, the device cancels
    # the operation; what the kernel still completed for a cancelled receive or accept goes
    # to loop._sock_keep() (served to the next call on the socket), and the operation's
    # `settled` future (from loop._sock_settling()) is resolved once it is over.
    cdef object sock_recvfrom(self, object fut, object sock, object buf, Py_ssize_t nbytes,
                              bint into):
        raise NotImplementedError

    cdef object sock_sendto(self, object fut, object sock, object data, bytes sockaddr):
        raise NotImplementedError

    cdef object sock_connect(self, object fut, object sock, bytes sockaddr, object address):
        raise NotImplementedError

    cdef object sock_accept(self, object fut, object sock):
        raise NotImplementedError

    cdef object sock_recv(self, object fut, object sock, object buf, bint into):
        raise NotImplementedError

    cdef object sock_send(self, object fut, object sock, object data):
        raise NotImplementedError

    # -- readiness, for add_reader/add_writer --------------------------------------------
    cdef int watch_fd(self, FdWatch w) except -1:
        raise NotImplementedError

    cdef int unwatch_fd(self, FdWatch w) except -1:
        raise NotImplementedError

    # -- cross-thread wake-up ------------------------------------------------------------
    cdef void wakeup(self) noexcept nogil:
        pass

    cdef dict stats(self):
        return {}
