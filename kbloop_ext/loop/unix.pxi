# Signals, pipes and subprocesses: the Unix parts of the loop API.
#
# UnixLoopMixin sits between _CoreLoop and asyncio.BaseEventLoop in kbloop.Loop's MRO, so its
# methods replace BaseEventLoop's NotImplementedError stubs.


class UnixLoopMixin:
    pass
