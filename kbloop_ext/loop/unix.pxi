# Signals, pipes and subprocesses: the Unix parts of the loop API.
#
# UnixLoopMixin sits between _CoreLoop and asyncio.BaseEventLoop in kbloop.Loop's MRO, so its
# methods replace BaseEventLoop's NotImplementedError stubs.  It is plain Python (compiled by
# Cython) built on the loop's add_reader/add_writer, which are io_uring polls:
#
#   signals      Python's C-level handler writes each signal's number to a non-blocking
#                pipe (signal.set_wakeup_fd); its read end is an add_reader watch, and
#                each byte read queues the handler's Handle, as asyncio's self-pipe does.
#   pipes        asyncio's own _UnixReadPipeTransport / _UnixWritePipeTransport, driven
#                through _add_reader/_remove_reader/_add_writer/_remove_writer below.
#   subprocesses asyncio's _UnixSubprocessTransport; the child's exit is watched with a pidfd
#                (os.pidfd_open) polled on the ring: no child watcher, no thread per child.

import select as _select
import signal as _signal
from asyncio import unix_events as _unix_events


def _sighandler_noop(signum, frame):
    """Python-level handler: the C-level handler has already written the signal's number to
    the wakeup fd, which is all kbloop needs."""
    pass


cdef int _PIPE_GONE = _select.POLLHUP | _select.POLLERR


class _KbSubprocessTransport(_unix_events._UnixSubprocessTransport):
    """asyncio's subprocess transport, except that wait() returns once the child has exited
    even when its pipes stay open (a grandchild that inherited stdout, say).  asyncio 3.11
    wakes wait() only when every pipe is closed, so such a wait() never returns there."""

    def _process_exited(self, returncode):
        _unix_events._UnixSubprocessTransport._process_exited(self, returncode)
        if self._exit_waiters and not self._finished and self._pipes_held_elsewhere():
            for waiter in self._exit_waiters:
                if not waiter.done():
                    waiter.set_result(returncode)
            self._exit_waiters = []

    def _pipes_held_elsewhere(self):
        """True if a pipe to the child still has a peer now that the child is gone: its end
        will not reach EOF (or the broken-pipe error) soon, so waiting for it could be
        forever.  The kernel closes a child's fds before its pidfd becomes readable, so a pipe
        only the child held already polls POLLHUP (read end) or POLLERR (write end)."""
        proc = self._proc
        if proc is None:
            return False
        poller = None
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is None or f.closed:
                continue
            if poller is None:
                poller = _select.poll()
            poller.register(f.fileno(), 0)   # POLLHUP and POLLERR are always reported
        if poller is None:
            return False
        gone = {fd for fd, ev in poller.poll(0) if ev & _PIPE_GONE}
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed and f.fileno() not in gone:
                return True
        return False


class UnixLoopMixin:
    _signal_handlers = None     # sig -> Handle; a dict once a handler was added
    _signal_rfd = -1            # the wakeup pipe, while handlers exist
    _signal_wfd = -1
    _child_pidfds = None        # pidfd -> subprocess transport being watched

    # -- signals ------------------------------------------------------------------------------
    def add_signal_handler(self, sig, callback, *args):
        """Add a handler for a signal.  UNIX only.

        Raise ValueError if the signal number is invalid or uncatchable.
        Raise RuntimeError if there is a problem setting up the handler.
        """
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        if self._signal_handlers is None:
            self._signal_handlers = {}
        created = self._signal_wfd < 0
        if created:
            # A pipe rather than asyncio's socketpair: one byte takes one byte of its 64 KiB
            # buffer (a socket charges a whole skb per write), so a storm drops fewer.
            self._signal_rfd, self._signal_wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # set_wakeup_fd() raises ValueError outside the main thread: calling it first
            # keeps a loop running in another thread from adding a signal handler.  A storm
            # that fills the pipe drops bytes, but then bytes are pending, so the
            # read side still runs: the fact that a signal arrived is never lost.
            _signal.set_wakeup_fd(self._signal_wfd, warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            if not self._signal_handlers:
                self._close_signal_pipe()
            raise RuntimeError(str(exc))
        if created:
            self.add_reader(self._signal_rfd, self._read_signals)

        handle = Handle(callback, args, self, None)
        self._signal_handlers[sig] = handle
        try:
            # A dummy Python handler asks Python to write the signal number to the wakeup fd.
            _signal.signal(sig, _sighandler_noop)
            # SA_RESTART limits EINTR occurrences.
            _signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                try:
                    _signal.set_wakeup_fd(-1)
                except (ValueError, OSError) as nexc:
                    logger.info('set_wakeup_fd(-1) failed: %s', nexc)
                self._close_signal_pipe()
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f'sig {sig} cannot be caught')
            raise

    def remove_signal_handler(self, sig):
        """Remove a handler for a signal.  UNIX only.

        Return True if a signal handler was removed, False if not.
        """
        self._check_signal(sig)
        handlers = self._signal_handlers
        if not handlers or sig not in handlers:
            return False
        del handlers[sig]

        handler = _signal.default_int_handler if sig == _signal.SIGINT else _signal.SIG_DFL
        try:
            _signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f'sig {sig} cannot be caught')
            raise

        if not handlers:
            try:
                _signal.set_wakeup_fd(-1)
            except (ValueError, OSError) as exc:
                logger.info('set_wakeup_fd(-1) failed: %s', exc)
            self._close_signal_pipe()
        return True

    def _check_signal(self, sig):
        if not isinstance(sig, int):
            raise TypeError(f'sig must be an int, not {sig!r}')
        if sig not in _signal.valid_signals():
            raise ValueError(f'invalid signal number {sig}')

    def _read_signals(self):
        """The wakeup pipe is readable: each byte is the number of a signal that arrived."""
        fd = self._signal_rfd
        while fd >= 0:
            try:
                data = os.read(fd, 4096)
            except InterruptedError:
                continue
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            for signum in data:
                if signum:
                    self._handle_signal(signum)
            if len(data) < 4096:
                return
            fd = self._signal_rfd   # _handle_signal may have removed the last handler

    def _handle_signal(self, sig):
        handlers = self._signal_handlers
        handle = handlers.get(sig) if handlers else None
        if handle is None:
            return  # a signal whose handler was removed, or SIGINT from asyncio.Runner
        if (<Handle>handle)._cancelled:
            self.remove_signal_handler(sig)
        else:
            # Run it next iteration, from the ready queue (we are on the loop's thread).
            (<_CoreLoop>self)._ready.append(handle)

    def _close_signal_pipe(self):
        rfd, wfd = self._signal_rfd, self._signal_wfd
        self._signal_rfd = self._signal_wfd = -1
        if rfd >= 0:
            self.remove_reader(rfd)     # a no-op once the loop is closed
            os.close(rfd)
        if wfd >= 0:
            os.close(wfd)

    def _close_unix(self):
        """Called by _CoreLoop.close() (the loop is already marked closed): remove the signal
        handlers, restore the wakeup fd, stop watching children."""
        handlers = self._signal_handlers
        if handlers:
            if not sys.is_finalizing():
                for sig in list(handlers):
                    self.remove_signal_handler(sig)
            else:
                warnings.warn(f'Closing the loop {self!r} on interpreter shutdown stage, '
                              f'skipping signal handlers removal', ResourceWarning, source=self)
                handlers.clear()
        self._close_signal_pipe()
        pidfds = self._child_pidfds
        if pidfds:
            for pidfd in list(pidfds):
                os.close(pidfd)
            pidfds.clear()

    # -- pipes --------------------------------------------------------------------------------
    # asyncio's pipe transports call these (selector_events' private API); the return values
    # are not used by them.
    def _add_reader(self, fd, callback, *args):
        self.add_reader(fd, callback, *args)

    def _remove_reader(self, fd):
        return self.remove_reader(fd)

    def _add_writer(self, fd, callback, *args):
        self.add_writer(fd, callback, *args)

    def _remove_writer(self, fd):
        return self.remove_writer(fd)

    def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return _unix_events._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return _unix_events._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

    # -- subprocesses -------------------------------------------------------------------------
    async def _make_subprocess_transport(self, protocol, args, shell, stdin, stdout, stderr,
                                         bufsize, extra=None, **kwargs):
        waiter = self.create_future()
        transp = _KbSubprocessTransport(self, protocol, args, shell, stdin, stdout, stderr,
                                        bufsize, waiter=waiter, extra=extra, **kwargs)
        try:
            self._watch_child(transp)
        except BaseException:
            transp.close()          # kills the child
            transp._proc.wait()     # and reaps it: it is being killed, this is short
            raise
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, transp):
        """Call transp._process_exited(returncode) once the child has exited."""
        pid = transp.get_pid()
        if hasattr(os, 'pidfd_open'):
            try:
                # A child that already exited is a zombie until reaped: its pidfd is readable.
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                # Reaped already, by someone else's waitpid(-1): the status is lost.
                self.call_soon(self._child_exited, transp, None)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                    raise
            else:
                if self._child_pidfds is None:
                    self._child_pidfds = {}
                self._child_pidfds[pidfd] = transp
                try:
                    self.add_reader(pidfd, self._on_pidfd_ready, pidfd, transp)
                except BaseException:
                    del self._child_pidfds[pidfd]
                    os.close(pidfd)
                    raise
                return
        # Fallback, when pidfd_open is not there (Linux < 5.3, a seccomp profile that denies
        # it): one blocking waitpid() per child in a daemon thread, which is what asyncio's
        # default ThreadedChildWatcher does.  SIGCHLD with waitpid(-1) would steal the exit
        # status of children this loop did not start.
        threading.Thread(target=self._waitpid_thread, args=(transp, pid),
                         name=f'kbloop-waitpid-{pid}', daemon=True).start()

    def _waitpid_thread(self, transp, pid):
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            returncode = None
        else:
            returncode = _unix_events.waitstatus_to_exitcode(status)
        try:
            self.call_soon_threadsafe(self._child_exited, transp, returncode)
        except RuntimeError:
            pass    # the loop was closed meanwhile

    def _on_pidfd_ready(self, pidfd, transp):
        self.remove_reader(pidfd)
        if self._child_pidfds is not None:
            self._child_pidfds.pop(pidfd, None)
        os.close(pidfd)
        pid = transp.get_pid()
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            returncode = None   # Popen.poll() (e.g. from send_signal) reaped it first
        else:
            if wpid == 0:       # not exited after all: watch again
                self._watch_child(transp)
                return
            returncode = _unix_events.waitstatus_to_exitcode(status)
        proc = transp._proc
        if returncode is not None and proc is not None and proc.returncode is None:
            # Record it at once: a Popen.poll() before _process_exited runs would find no
            # child and report 0.
            proc.returncode = returncode
        # Like asyncio, report the exit on a later iteration, after pipe data already read.
        self.call_soon(self._child_exited, transp, returncode)

    def _child_exited(self, transp, returncode):
        if transp._returncode is not None:
            return
        proc = transp._proc
        if returncode is None:
            if proc is not None and proc.returncode is not None:
                returncode = proc.returncode
            else:
                logger.warning('Unknown child process pid %d, will report returncode 255',
                               transp.get_pid())
                returncode = 255
        transp._process_exited(returncode)
