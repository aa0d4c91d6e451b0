"""Every public asyncio.AbstractEventLoop method exists on kbloop.Loop and is implemented:
none is AbstractEventLoop's stub, and none of the private factories that asyncio's own
methods call (_make_*_transport) is BaseEventLoop's NotImplementedError stub."""
import asyncio
import inspect

import pytest

import kbloop

PUBLIC = sorted(name for name, member in vars(asyncio.AbstractEventLoop).items()
                if not name.startswith("_") and callable(member))
FACTORIES = ["_make_socket_transport", "_make_ssl_transport", "_make_datagram_transport",
             "_make_read_pipe_transport", "_make_write_pipe_transport",
             "_make_subprocess_transport", "_write_to_self"]


def _raises_not_implemented(func):
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False          # compiled (Cython) code: not a Python stub
    body = [line.strip() for line in source.splitlines()[1:]
            if line.strip() and not line.strip().startswith(('"""', "#"))]
    return bool(body) and body[-1] == "raise NotImplementedError" and len(body) <= 3


def test_public_method_list_is_the_real_one():
    assert {"create_server", "sock_sendfile", "add_signal_handler", "subprocess_exec",
            "create_datagram_endpoint", "sock_recvfrom"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_method_is_implemented(name):
    impl = getattr(kbloop.Loop, name)
    assert impl is not getattr(asyncio.AbstractEventLoop, name), name
    assert not _raises_not_implemented(impl), f"{name} is a NotImplementedError stub"


@pytest.mark.parametrize("name", FACTORIES)
def test_transport_factory_is_implemented(name):
    impl = getattr(kbloop.Loop, name)
    assert impl is not getattr(asyncio.BaseEventLoop, name), name
    assert not _raises_not_implemented(impl), name


def test_stub_detector_detects_stubs():
    assert _raises_not_implemented(asyncio.AbstractEventLoop.add_reader)
    assert _raises_not_implemented(asyncio.BaseEventLoop._make_datagram_transport)
    assert not _raises_not_implemented(asyncio.BaseEventLoop.create_connection)
