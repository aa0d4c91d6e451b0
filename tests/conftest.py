"""Shared fixtures: every parity test runs on asyncio (the control) and on kbloop.

Tests call ``run(coro)`` (or ``run(async_fn)``) which executes it on a fresh loop of the
parametrised kind via ``asyncio.Runner(loop_factory=...)`` -- the same entry point users have.
"""
import asyncio
import gc
import inspect
import os
import socket

import pytest

import kbloop

from loops import LOOPS, MODE_LOOPS  # noqa: E402  (tests/ is on sys.path)

MODE_MODULES = {"test_tcp", "test_streams", "test_unix", "test_udp", "test_sock_ops",
                "test_sendfile", "test_adversarial", "test_divergences", "test_order_context"}


# The core suite (`pytest -m core`): what every supported Python and the installed wheel run
# (scripts/wheels.sh --test).  Left out: the DPDK and RDMA datapaths (network namespaces, QEMU
# guests), the services (PostgreSQL, redis-server), the benchmark smoke tests and the packaging
# tests that build wheels themselves.
NOT_CORE = ("test_dpdk_", "test_rdma_", "test_bench_", "test_thirdparty_asyncpg",
            "test_thirdparty_redis", "test_packaging")


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the core suite (every module but DPDK, RDMA, "
                                       "services, benchmarks and packaging)")


def pytest_ignore_collect(collection_path, config):
    # Under `-m core` the other modules are not even imported: they may need packages that an
    # installed wheel's test venv does not have (bench/, redis, asyncpg).
    if config.getoption("markexpr", "") == "core" and collection_path.suffix == ".py":
        return collection_path.stem.startswith(NOT_CORE) or None
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.module.__name__.rpartition(".")[2].startswith(NOT_CORE):
            item.add_marker(pytest.mark.core)


def pytest_generate_tests(metafunc):
    if "loop_name" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0]
        if "loop_name" in (argnames.split(",") if isinstance(argnames, str) else argnames):
            return      # the test chooses its loops itself
    names = list(LOOPS)
    module = metafunc.module.__name__.rpartition(".")[2]
    # Tests that look at loop_name themselves pick commands by it: default modes only.
    asks_name = "loop_name" in inspect.signature(metafunc.function).parameters
    if module in MODE_MODULES and not asks_name:
        names += list(MODE_LOOPS)
    metafunc.parametrize("loop_name", names)


@pytest.fixture
def loop_name(request):
    return request.param


@pytest.fixture
def loop_factory(loop_name):
    return {**LOOPS, **MODE_LOOPS}[loop_name]


@pytest.fixture
def run(loop_factory):
    """run(coro_or_async_fn, timeout=60, debug=False) -> result, on a fresh loop."""

    def _run(coro, *, timeout=60, debug=False):
        if callable(coro):
            coro = coro()

        async def guarded():
            return await asyncio.wait_for(coro, timeout)

        with asyncio.Runner(loop_factory=loop_factory, debug=debug) as runner:
            return runner.run(guarded())

    return _run


@pytest.fixture
def kb_run():
    """Like ``run`` but kbloop only (tests of kbloop-specific behaviour)."""

    def _run(coro, *, timeout=60, debug=False):
        if callable(coro):
            coro = coro()

        async def guarded():
            return await asyncio.wait_for(coro, timeout)

        with asyncio.Runner(loop_factory=LOOPS["kbloop"], debug=debug) as runner:
            return runner.run(guarded())

    return _run


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    """Assert the test leaves no file descriptor behind (after a GC pass)."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    after = open_fds()
    leaked = {fd: _describe(fd) for fd in after - before}
    leaked = {fd: d for fd, d in leaked.items() if d is not None}
    assert not leaked, f"leaked fds: {leaked}"


def _describe(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None  # the fd used by listdir itself


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
