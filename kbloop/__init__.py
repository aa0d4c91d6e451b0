"""kbloop: a drop-in asyncio event loop whose I/O runs on kernel-bypass queues.

    kbloop.run(main())                                   # like asyncio.run
    asyncio.run(main(), loop_factory=kbloop.new_event_loop)   # Python 3.12+
    asyncio.Runner(loop_factory=kbloop.new_event_loop)
    python -m kbloop server.py                           # an unmodified asyncio program
"""
import sys

if not sys.platform.startswith('linux'):
    raise ImportError('kbloop runs on Linux only: it needs io_uring (Linux 5.19 or newer '
                      'for every feature); on this platform use asyncio or uvloop')

import asyncio
import ipaddress
import os
import platform
import shlex
import warnings

from kbloop_ext.core import (BackendUnavailable, Buffer, BufferPool, Server, SocketTransport,
                             StackSocket, UnixLoopMixin, ZeroCopyProtocol, DpdkDatapath,
                             RdmaDatapath, DpdkSocket, RdmaSocket,
                             UringDatapath, _CoreLoop, _set_worker_reuse_port, _tune_malloc,
                             force_uring_failure, probe_io_uring)

__all__ = ['Loop', 'new_event_loop', 'run', 'serve', 'install', 'EventLoopPolicy',
           'BackendUnavailable', 'info', 'Server', 'SocketTransport', 'Buffer', 'BufferPool',
           'ZeroCopyProtocol', 'StackSocket', 'DpdkSocket', 'RdmaSocket', 'format_stats']
__version__ = '0.1.0'     # the one place the version is written (pyproject.toml reads it)

BACKENDS = ('io_uring', 'dpdk', 'rdma')

if os.environ.get('KBLOOP_FORCE_URING_ERROR'):
    force_uring_failure(os.environ['KBLOOP_FORCE_URING_ERROR'])


class Loop(_CoreLoop, UnixLoopMixin, asyncio.BaseEventLoop):
    """The kbloop event loop on the io_uring datapath.

    ring_entries: submission queue size.  recv_buffers / recv_buffer_size: the provided-buffer
    ring that multishot receives fill (a power of two / a multiple of the page size).  A
    buffer holds one receive, so 64 KiB lets a large message arrive in one data_received()
    call; pages never written stay unallocated, so small messages cost little memory.
    single_issuer: use SINGLE_ISSUER|DEFER_TASKRUN when the kernel has it (the ring then
    belongs to the first thread that runs the loop).

    Reactor modes (docs/modes.md):
    busy_poll: spin on the completion queue for up to spin_us microseconds before sleeping in
    the kernel (hybrid busy-poll); cpu: pin the thread that runs the loop to that core.
    sqpoll: a kernel thread submits for us (sq_cpu pins it, sq_idle_ms is how long it spins
    before it sleeps).  napi_busy_poll_us: register NAPI busy polling (Linux 6.9+).

    Zero-copy memory (docs/zerocopy.md): pool_limit_mb caps the buffer pool (the receive ring
    included); hugepages: back its 2 MiB slabs with hugepages when the system has some reserved.

    Each default can also be set with an environment variable, so that `python -m kbloop` and
    uvicorn users can tune them: KBLOOP_RING_ENTRIES, KBLOOP_RECV_BUFFERS,
    KBLOOP_RECV_BUFFER_SIZE, KBLOOP_SINGLE_ISSUER=0, KBLOOP_BUSY_POLL=1, KBLOOP_CPU,
    KBLOOP_SPIN_US, KBLOOP_SQPOLL=1, KBLOOP_SQ_CPU, KBLOOP_SQ_IDLE_MS, KBLOOP_NAPI_US,
    KBLOOP_POOL_LIMIT_MB, KBLOOP_HUGEPAGES=0.  KBLOOP_STATS=1 prints loop.stats() on one line
    to stderr when the loop closes.

    backend="dpdk" (docs/dpdk.md) adds the DPDK datapath, a user-space TCP/IP stack on a DPDK
    port, beside io_uring: TCP servers on the wildcard or the stack's address and connections
    to its network go through it, the rest (Unix sockets, pipes, 127.0.0.1, files) through the
    kernel.  ip: the stack's address with its prefix ("10.0.0.2/24"); gateway: the next hop
    for other networks; dpdk_vdev: a virtual device ("net_af_xdp0,iface=eth1"), or dpdk_args:
    the EAL's whole argument list (a real NIC: ["-a", "0000:03:00.0", ...]); dpdk_port: the
    port id.  Environment: KBLOOP_DPDK_IP, KBLOOP_DPDK_GATEWAY, KBLOOP_DPDK_VDEV,
    KBLOOP_DPDK_ARGS (shell words), KBLOOP_DPDK_PORT.  The loop then busy-polls: it never
    sleeps, as a poll-mode driver needs.

    backend="rdma" (docs/rdma.md) adds the RDMA datapath, streams over RC queue pairs (a RoCE
    NIC, or soft-RoCE), beside io_uring: TCP servers on the wildcard or an RDMA device's
    address, and connections to those devices' networks, go over RDMA; peers must speak it too
    (kbloop's RDMA datapath).  rdma_poll: "busy" (spin on the completion queues, the default)
    or "sleep" (sleep until a completion); rdma_buf_size, rdma_recv_depth, rdma_send_depth:
    bytes per receive buffer and send slot, and how many of each per connection.
    Environment: KBLOOP_RDMA_POLL, KBLOOP_RDMA_BUF_SIZE, KBLOOP_RDMA_RECV_DEPTH,
    KBLOOP_RDMA_SEND_DEPTH.
    """

    def __init__(self, *, ring_entries=None, recv_buffers=None, recv_buffer_size=None,
                 single_issuer=None, busy_poll=None, cpu=None, spin_us=None, sqpoll=None,
                 sq_cpu=None, sq_idle_ms=None, napi_busy_poll_us=None, pool_limit_mb=None,
                 hugepages=None, backend=None, ip=None, gateway=None, dpdk_vdev=None,
                 dpdk_args=None, dpdk_port=None, rdma_poll=None, rdma_buf_size=None,
                 rdma_recv_depth=None, rdma_send_depth=None):
        cpu = _option(cpu, 'KBLOOP_CPU', None)
        if cpu is not None and cpu not in os.sched_getaffinity(0):
            raise ValueError(f'cpu {cpu} is not one this process may run on '
                             f'({sorted(os.sched_getaffinity(0))})')
        limit_mb = _option(pool_limit_mb, 'KBLOOP_POOL_LIMIT_MB', 1024)
        if limit_mb < 2:
            raise ValueError(f'pool_limit_mb must be at least 2, got {limit_mb}')
        pool = BufferPool(limit_mb << 20, bool(_option(hugepages, 'KBLOOP_HUGEPAGES', 1)))
        backend = backend or os.environ.get('KBLOOP_BACKEND', 'io_uring')
        if backend not in BACKENDS:
            raise BackendUnavailable(
                f'unknown kbloop backend {backend!r}; available: {", ".join(BACKENDS)}')
        net = None
        if backend == 'dpdk':
            net = _dpdk_datapath(pool, cpu, ip, gateway, dpdk_vdev, dpdk_args, dpdk_port)
        elif backend == 'rdma':
            net = RdmaDatapath(
                pool, rdma_poll or os.environ.get('KBLOOP_RDMA_POLL', 'busy'),
                buf_size=_option(rdma_buf_size, 'KBLOOP_RDMA_BUF_SIZE', 8192),
                recv_depth=_option(rdma_recv_depth, 'KBLOOP_RDMA_RECV_DEPTH', 64),
                send_depth=_option(rdma_send_depth, 'KBLOOP_RDMA_SEND_DEPTH', 64))
        try:
            datapath = self._uring_datapath(
                pool, ring_entries, recv_buffers, recv_buffer_size, single_issuer, busy_poll,
                spin_us, sqpoll, sq_cpu, sq_idle_ms, napi_busy_poll_us)
        except BaseException:
            if net is not None:
                net.release()
            raise
        _CoreLoop.__init__(self, datapath, net)
        self._pin_cpu = cpu
        self._stats_at_close = os.environ.get('KBLOOP_STATS') == '1'
        _tune_malloc_once()

    @staticmethod
    def _uring_datapath(pool, ring_entries, recv_buffers, recv_buffer_size, single_issuer,
                        busy_poll, spin_us, sqpoll, sq_cpu, sq_idle_ms, napi_busy_poll_us):
        return UringDatapath(
            _option(ring_entries, 'KBLOOP_RING_ENTRIES', 4096),
            _option(recv_buffers, 'KBLOOP_RECV_BUFFERS', 512),
            _option(recv_buffer_size, 'KBLOOP_RECV_BUFFER_SIZE', 65536),
            bool(_option(single_issuer, 'KBLOOP_SINGLE_ISSUER', 1)),
            bool(_option(busy_poll, 'KBLOOP_BUSY_POLL', 0)),
            _option(spin_us, 'KBLOOP_SPIN_US', 50),
            bool(_option(sqpoll, 'KBLOOP_SQPOLL', 0)),
            _option(sq_cpu, 'KBLOOP_SQ_CPU', -1),
            _option(sq_idle_ms, 'KBLOOP_SQ_IDLE_MS', 1000),
            _option(napi_busy_poll_us, 'KBLOOP_NAPI_US', 0), pool)

    def close(self):
        if self._stats_at_close and not self.is_closed() and not self.is_running():
            print(format_stats(self.stats()), file=sys.stderr, flush=True)
        super().close()


def _dpdk_datapath(pool, cpu, ip, gateway, vdev, args, port):
    """The DPDK datapath from the loop's options, or the environment (docs/dpdk.md)."""
    ip = ip or os.environ.get('KBLOOP_DPDK_IP')
    if not ip:
        raise ValueError('backend="dpdk" needs the stack\'s address: ip="10.0.0.2/24" '
                         '(or KBLOOP_DPDK_IP, or python -m kbloop --ip)')
    try:
        iface = ipaddress.IPv4Interface(ip)
    except ValueError as exc:
        raise ValueError(f'ip must be an IPv4 address with a prefix, e.g. "10.0.0.2/24": '
                         f'{exc}') from None
    gateway = gateway or os.environ.get('KBLOOP_DPDK_GATEWAY') or '0.0.0.0'
    try:
        gateway = str(ipaddress.IPv4Address(gateway))
    except ValueError as exc:
        raise ValueError(f'gateway must be an IPv4 address: {exc}') from None
    if args is None and os.environ.get('KBLOOP_DPDK_ARGS'):
        args = shlex.split(os.environ['KBLOOP_DPDK_ARGS'])
    vdev = vdev or os.environ.get('KBLOOP_DPDK_VDEV')
    if args is None:
        if not vdev:
            raise ValueError('backend="dpdk" needs a device: dpdk_vdev="net_af_xdp0,iface=eth1" '
                             '(KBLOOP_DPDK_VDEV, --dpdk-vdev) or the EAL\'s arguments in '
                             'dpdk_args (KBLOOP_DPDK_ARGS, --dpdk-args)')
        args = default_eal_args(vdev, cpu)
    elif isinstance(args, str):
        args = shlex.split(args)
    return DpdkDatapath(list(args), _option(port, 'KBLOOP_DPDK_PORT', 0), str(iface.ip),
                        str(iface.netmask), gateway, pool)


def default_eal_args(vdev, cpu=None):
    """EAL arguments for one virtual device without hugepages or PCI devices: what tests and
    virtual machines use.  The EAL pins its main thread to its lcore; without cpu= the lcore
    may float over every CPU this process may use, so the loop's thread keeps its affinity."""
    cpus = [cpu] if cpu is not None else sorted(os.sched_getaffinity(0))
    return ['--no-huge', '-m', '256', '--no-pci', '--lcores', f'0@({",".join(map(str, cpus))})',
            '--no-shconf', '--no-telemetry', '--file-prefix', f'kbloop{os.getpid()}',
            '--log-level', 'lib.*:error',
            '--vdev', vdev]


def format_stats(stats):
    """loop.stats() as one line (what KBLOOP_STATS=1 / python -m kbloop --stats print at close)."""
    iterations = stats['iterations'] or 1
    pool = stats['pool']
    return (f"kbloop[{os.getpid()}] mode={stats['mode']} iterations={stats['iterations']} "
            f"sqes={stats['submissions']} cqes={stats['completions']} "
            f"enters={stats['enters']} ({stats['enters'] / iterations:.2f}/iteration) "
            f"cqes/iteration={stats['completions'] / iterations:.1f} "
            f"max_batch={stats['max_cqe_batch']} spin_hits={stats['spin_hits']} "
            f"sleeps={stats['sleeps']} recv_lends={stats['recv_lends']} "
            f"throttles={stats['recv_throttles']} starved={stats['recv_starved']} "
            f"send_zc={stats['send_zc']} (kernel copied {stats['send_zc_copied']}) "
            f"pool={pool['in_use_bytes']}/{pool['mapped_bytes']} bytes in use")


_malloc_tuned = None


def _tune_malloc_once():
    """Raise glibc's heap trim threshold once per process (see docs/differences.md).

    KBLOOP_MALLOC_TUNE=0 opts out; MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ or malloc
    GLIBC_TUNABLES set by the user win, so we leave the allocator alone then.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    user_set = ('MALLOC_TRIM_THRESHOLD_' in os.environ or 'MALLOC_MMAP_THRESHOLD_' in os.environ
                or 'glibc.malloc.' in os.environ.get('GLIBC_TUNABLES', ''))
    if os.environ.get('KBLOOP_MALLOC_TUNE', '1') == '0' or user_set:
        _malloc_tuned = False
    else:
        _malloc_tuned = _tune_malloc(MALLOC_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    return _malloc_tuned


# Freed heap memory up to this size stays in the process for the next receive; blocks from this
# size up are mmapped (and unmapped on free) as glibc does for big blocks by default.
MALLOC_TRIM_THRESHOLD = 32 << 20
MALLOC_MMAP_THRESHOLD = 4 << 20


def _option(value, env, default):
    if value is not None:
        return value
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f'{env} must be an integer, got {raw!r}') from None


_fallback_warned = False


def new_event_loop(*, backend=None, **options):
    """Create a kbloop loop.

    backend=None picks the best available datapath (io_uring; KBLOOP_BACKEND overrides) and,
    when io_uring cannot be used here, warns once and returns asyncio's default loop so that
    programs keep running.  An explicit backend raises BackendUnavailable instead.
    """
    global _fallback_warned
    explicit = backend is not None or 'KBLOOP_BACKEND' in os.environ
    backend = backend or os.environ.get('KBLOOP_BACKEND', 'io_uring')
    if backend not in BACKENDS:
        raise BackendUnavailable(
            f'unknown kbloop backend {backend!r}; available: {", ".join(BACKENDS)}')
    try:
        return Loop(backend=backend, **options)
    except BackendUnavailable as exc:
        if explicit:
            raise
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(f'kbloop: io_uring is unavailable ({exc}); falling back to '
                          f"asyncio's default event loop", RuntimeWarning, stacklevel=2)
        return asyncio.SelectorEventLoop()


def run(main, *, debug=None, **options):
    """Run a coroutine on a new kbloop loop, like asyncio.run()."""
    if asyncio._get_running_loop() is not None:
        raise RuntimeError('kbloop.run() cannot be called from a running event loop')
    with asyncio.Runner(debug=debug, loop_factory=lambda: new_event_loop(**options)) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Policy shim (policies are deprecated from Python 3.14): prefer loop_factory/run()."""

    def _loop_factory(self):
        return new_event_loop()


def install():
    """Make asyncio create kbloop loops (sets the event loop policy).  Deprecated on 3.12+
    in favour of kbloop.run() or asyncio.run(..., loop_factory=kbloop.new_event_loop)."""
    if sys.version_info >= (3, 12):
        warnings.warn('kbloop.install() is deprecated: use kbloop.run() or '
                      'asyncio.run(main, loop_factory=kbloop.new_event_loop)',
                      DeprecationWarning, stacklevel=1)
    asyncio.set_event_loop_policy(EventLoopPolicy())


def serve(main, *, workers, cpus=None, **loop_options):
    """Run the coroutine function `main` in `workers` processes, one pinned kbloop loop each,
    sharing listening ports (SO_REUSEPORT).  See kbloop.workers."""
    from kbloop.workers import serve as _serve
    return _serve(main, workers=workers, cpus=cpus, **loop_options)


def _apply_worker_env():
    """In a forked worker: pick up KBLOOP_REUSE_PORT set after the core was imported."""
    _set_worker_reuse_port(os.environ.get('KBLOOP_REUSE_PORT') == '1')


def info():
    """What kbloop can use on this machine, and why not where it cannot."""
    uring = probe_io_uring()
    from kbloop_ext import dpdk
    dpdk_built, dpdk_why = dpdk.available()
    from kbloop_ext import rdma
    rdma_built, rdma_why = rdma.available()
    if rdma_built:
        from kbloop_ext.core import rdma_interfaces
        devices = rdma_interfaces()
        rdma_why = '' if devices else ('no RDMA device with an IPv4 address (soft-RoCE: '
                                       'rdma link add rxe0 type rxe netdev eth0)')
    else:
        devices = []
    return {
        'dpdk': {'built': dpdk_built, 'reason': dpdk_why},
        'rdma': {'built': rdma_built, 'interfaces': devices, 'reason': rdma_why},
        'kbloop': __version__,
        'python': platform.python_version(),
        'kernel': platform.release(),
        'io_uring': uring,
        'default_backend': 'io_uring' if uring['usable'] else 'asyncio (fallback)',
    }
