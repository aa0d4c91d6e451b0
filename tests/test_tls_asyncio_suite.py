"""CPython's own TLS suite (Lib/test/test_asyncio/test_ssl.py, taken from uvloop's) run on asyncio
(the control) and on kbloop's TLS transport, unchanged: the same assertions on both.

It holds the behaviours of issue 15 that asyncio itself gets right: trailing data delivered and
our backlog flushed when the peer sends close_notify or a bare FIN
(test_remote_shutdown_receives_trailing_data), "flush, then shut down"
(test_flush_before_shutdown), clean shutdowns, the shutdown timeout with and without a handler
set (test_shutdown_timeout_handler_*), start_tls with a BufferedProtocol and with a plain one on
the client and the server side with no call to the exception handler
(test_start_tls_client_buf_proto_1, _reg_proto_1, test_start_tls_server_1), corrupted TLS after
start_tls, TLS over TLS, handshake timeouts and a peer lost mid-handshake, and no reference cycle
keeping the SSL context alive.  Each interpreter runs its own version of the suite."""

import pytest

import kbloop

T = pytest.importorskip("test.test_asyncio.test_ssl",
                        reason="this interpreter ships without its test package")


def _kbloop_case(name, factory):
    class Case(T.TestSSL):
        def setUp(self):
            T.test_utils.TestCase.setUp(self)
            self.loop = factory()
            self.set_event_loop(self.loop)
            self.addCleanup(self.loop.close)

        def new_loop(self):
            return factory()

    Case.__name__ = Case.__qualname__ = name
    return Case


class TestSSL_asyncio(T.TestSSL):
    """The control: asyncio's own loop and sslproto."""


TestSSL_kbloop = _kbloop_case("TestSSL_kbloop",
                              lambda: kbloop.new_event_loop(backend="io_uring"))
TestSSL_kbloop_sqpoll = _kbloop_case(
    "TestSSL_kbloop_sqpoll",
    lambda: kbloop.new_event_loop(backend="io_uring", sqpoll=True, sq_idle_ms=10))

