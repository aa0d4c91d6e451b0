# Handles: what call_soon/call_later return and what the ready queue and the timer heap hold.
# Same public surface and repr as asyncio.Handle/TimerHandle; weakref-able.


cdef class Handle:
    cdef:
        readonly object _callback
        readonly object _args            # tuple
        object _context         # contextvars.Context
        _CoreLoop _loop
        bint _cancelled
        object _repr            # repr frozen at cancel() in debug mode, as asyncio does
        readonly object _source_traceback
        object __weakref__

    def __init__(self, callback, args, _CoreLoop loop, context=None):
        if context is None:
            context = copy_context()
        self._context = context
        self._loop = loop
        self._callback = callback
        self._args = args
        if loop._debug:
            # compiled code has no frames: frame 0 is the Python code that made the handle,
            # whether it called Handle() itself or call_soon()/call_later()/call_at()
            self._source_traceback = format_helpers.extract_stack(sys._getframe(0))

    cdef inline void _run(self) except *:
        try:
            self._context.run(self._callback, *self._args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            cb = format_helpers._format_callback_source(self._callback, self._args)
            context = {
                'message': f'Exception in callback {cb}',
                'exception': exc,
                'handle': self,
            }
            if self._source_traceback:
                context['source_traceback'] = self._source_traceback
            self._loop.call_exception_handler(context)

    def _repr_info(self):
        info = [type(self).__name__]
        if self._cancelled:
            info.append('cancelled')
        if self._callback is not None:
            info.append(format_helpers._format_callback_source(self._callback, self._args))
        if self._source_traceback:
            frame = self._source_traceback[-1]
            info.append(f'created at {frame[0]}:{frame[1]}')
        return info

    def __repr__(self):
        if self._repr is not None:
            return self._repr
        return '<{}>'.format(' '.join(self._repr_info()))

    def get_context(self):
        return self._context

    def cancel(self):
        if not self._cancelled:
            self._cancelled = True
            if self._loop is not None and self._loop._debug:
                self._repr = repr(self)
            self._callback = None
            self._args = None

    def cancelled(self):
        return self._cancelled


cdef inline Handle _new_handle(callback, tuple args, _CoreLoop loop, context):
    """Handle(...) without a Python-level __init__ call: the ready queue's hot path."""
    cdef Handle h = Handle.__new__(Handle)
    h._context = copy_context() if context is None else context
    h._loop = loop
    h._callback = callback
    h._args = args
    if loop._debug:
        # compiled code has no frame of its own: frame 0 is whoever called call_soon()
        h._source_traceback = format_helpers.extract_stack(sys._getframe(0))
    return h


cdef class TimerHandle(Handle):
    cdef:
        double _when
        bint _scheduled         # in the heap; the loop counts cancelled ones to prune

    def __init__(self, double when, callback, args, _CoreLoop loop, context=None):
        Handle.__init__(self, callback, args, loop, context)
        self._when = when

    def _repr_info(self):
        info = Handle._repr_info(self)
        info.insert(1 + self._cancelled, f'when={self._when}')
        return info

    def __hash__(self):
        return hash(self._when)

    def __richcmp__(self, other, int op):
        if not isinstance(other, TimerHandle):
            return NotImplemented
        cdef double a = self._when, b = (<TimerHandle>other)._when
        if op == 0:
            return a < b
        if op == 1:
            return a <= b
        if op == 4:
            return a > b
        if op == 5:
            return a >= b
        eq = (a == b and self._callback == (<TimerHandle>other)._callback
              and self._args == (<TimerHandle>other)._args
              and self._cancelled == (<TimerHandle>other)._cancelled)
        return eq if op == 2 else not eq

    def cancel(self):
        if not self._cancelled and self._loop is not None:
            self._loop._timer_handle_cancelled(self)
        Handle.cancel(self)

    def when(self):
        return self._when
