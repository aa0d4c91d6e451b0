"""The loops every parity test runs on: asyncio (the control) and kbloop in each reactor mode.
Shared by tests/conftest.py and the child-process scripts in tests/scripts/."""
import asyncio

import kbloop

LOOPS = {
    "asyncio": asyncio.new_event_loop,
    "kbloop": lambda: kbloop.new_event_loop(backend="io_uring"),
}

# kbloop's other reactor modes must serve the same transport tests as the default mode.
MODE_LOOPS = {
    "kbloop-busy_poll": lambda: kbloop.new_event_loop(backend="io_uring", busy_poll=True,
                                                      spin_us=20),
    "kbloop-sqpoll": lambda: kbloop.new_event_loop(backend="io_uring", sqpoll=True,
                                                   sq_idle_ms=10),
}


def make_loop(name):
    return {**LOOPS, **MODE_LOOPS}[name]()
