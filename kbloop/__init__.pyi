# Types of kbloop's public API (PEP 561: this package ships py.typed).  Keep in step with
# kbloop/__init__.py: tests/test_typing.py compares the signatures and runs mypy over a program.
import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict, TypeVar

from kbloop_ext.core import (BackendUnavailable as BackendUnavailable, Buffer as Buffer,
                             BufferPool as BufferPool, DpdkSocket as DpdkSocket,
                             RdmaSocket as RdmaSocket, Server as Server,
                             SocketTransport as SocketTransport, StackSocket as StackSocket,
                             ZeroCopyProtocol as ZeroCopyProtocol)

__all__ = ['Loop', 'new_event_loop', 'run', 'serve', 'install', 'EventLoopPolicy',
           'BackendUnavailable', 'info', 'Server', 'SocketTransport', 'Buffer', 'BufferPool',
           'ZeroCopyProtocol', 'StackSocket', 'DpdkSocket', 'RdmaSocket', 'format_stats']
__version__: str

Backend = Literal['io_uring', 'dpdk', 'rdma']
BACKENDS: tuple[Backend, ...]
MALLOC_TRIM_THRESHOLD: int
MALLOC_MMAP_THRESHOLD: int

_T = TypeVar('_T')


class Loop(asyncio.BaseEventLoop):
    def __init__(self, *, ring_entries: int | None = None, recv_buffers: int | None = None,
                 recv_buffer_size: int | None = None, single_issuer: bool | None = None,
                 busy_poll: bool | None = None, cpu: int | None = None,
                 spin_us: int | None = None, sqpoll: bool | None = None,
                 sq_cpu: int | None = None, sq_idle_ms: int | None = None,
                 napi_busy_poll_us: int | None = None, pool_limit_mb: int | None = None,
                 hugepages: bool | None = None, backend: Backend | None = None,
                 ip: str | None = None, gateway: str | None = None,
                 dpdk_vdev: str | None = None, dpdk_args: Sequence[str] | str | None = None,
                 dpdk_port: int | None = None, rdma_poll: Literal['busy', 'sleep'] | None = None,
                 rdma_buf_size: int | None = None, rdma_recv_depth: int | None = None,
                 rdma_send_depth: int | None = None) -> None: ...
    @property
    def backend(self) -> str: ...
    @property
    def buffer_pool(self) -> BufferPool: ...
    def alloc_buffer(self, nbytes: int) -> Buffer: ...
    def stats(self) -> dict[str, Any]: ...


def new_event_loop(*, backend: Backend | None = None, ring_entries: int | None = None,
                   recv_buffers: int | None = None, recv_buffer_size: int | None = None,
                   single_issuer: bool | None = None, busy_poll: bool | None = None,
                   cpu: int | None = None, spin_us: int | None = None,
                   sqpoll: bool | None = None, sq_cpu: int | None = None,
                   sq_idle_ms: int | None = None, napi_busy_poll_us: int | None = None,
                   pool_limit_mb: int | None = None, hugepages: bool | None = None,
                   ip: str | None = None, gateway: str | None = None,
                   dpdk_vdev: str | None = None, dpdk_args: Sequence[str] | str | None = None,
                   dpdk_port: int | None = None,
                   rdma_poll: Literal['busy', 'sleep'] | None = None,
                   rdma_buf_size: int | None = None, rdma_recv_depth: int | None = None,
                   rdma_send_depth: int | None = None) -> asyncio.AbstractEventLoop:
    """A kbloop Loop; asyncio's default loop (with a warning) when io_uring is unusable here
    and no backend was asked for."""


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None,
        backend: Backend | None = None, ring_entries: int | None = None,
        recv_buffers: int | None = None, recv_buffer_size: int | None = None,
        single_issuer: bool | None = None, busy_poll: bool | None = None,
        cpu: int | None = None, spin_us: int | None = None, sqpoll: bool | None = None,
        sq_cpu: int | None = None, sq_idle_ms: int | None = None,
        napi_busy_poll_us: int | None = None, pool_limit_mb: int | None = None,
        hugepages: bool | None = None, ip: str | None = None, gateway: str | None = None,
        dpdk_vdev: str | None = None, dpdk_args: Sequence[str] | str | None = None,
        dpdk_port: int | None = None, rdma_poll: Literal['busy', 'sleep'] | None = None,
        rdma_buf_size: int | None = None, rdma_recv_depth: int | None = None,
        rdma_send_depth: int | None = None) -> _T: ...


def serve(main: Callable[[], Awaitable[object]], *, workers: int,
          cpus: Iterable[int] | None = None, backend: Backend | None = None,
          ring_entries: int | None = None, recv_buffers: int | None = None,
          recv_buffer_size: int | None = None, single_issuer: bool | None = None,
          busy_poll: bool | None = None, spin_us: int | None = None,
          sqpoll: bool | None = None, sq_cpu: int | None = None, sq_idle_ms: int | None = None,
          napi_busy_poll_us: int | None = None, pool_limit_mb: int | None = None,
          hugepages: bool | None = None, ip: str | None = None, gateway: str | None = None,
          dpdk_vdev: str | None = None, dpdk_args: Sequence[str] | str | None = None,
          dpdk_port: int | None = None, rdma_poll: Literal['busy', 'sleep'] | None = None,
          rdma_buf_size: int | None = None, rdma_recv_depth: int | None = None,
          rdma_send_depth: int | None = None) -> int: ...


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy): ...


def install() -> None: ...


class IoUringInfo(TypedDict):
    usable: bool
    reason: str | None
    errno: int | None
    features: list[str]
    setup_flags: list[str]
    opcodes: dict[str, bool]


class DpdkInfo(TypedDict):
    built: bool
    reason: str


class RdmaInfo(TypedDict):
    built: bool
    interfaces: list[Any]
    reason: str


Info = TypedDict('Info', {'dpdk': DpdkInfo, 'rdma': RdmaInfo, 'kbloop': str, 'python': str,
                          'kernel': str, 'io_uring': IoUringInfo, 'default_backend': str})


def info() -> Info: ...
def format_stats(stats: Mapping[str, Any]) -> str: ...
def default_eal_args(vdev: str, cpu: int | None = None) -> list[str]: ...
