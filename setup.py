"""Build kbloop: the Cython core (kbloop_ext.core) linked against liburing, and, where DPDK
and lwIP's source are present, the DPDK datapath's device layer (kbloop_ext.dpdk.stack).

KBLOOP_DPDK=0 skips the DPDK part, KBLOOP_DPDK=1 makes its absence an error; by default it is
built when `pkg-config libdpdk` works and lwIP's source is in .deps/lwip (scripts/setup.sh
fetches Debian's) or in KBLOOP_LWIP_SRC.
"""
import glob
import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup

if not sys.platform.startswith('linux'):
    raise SystemExit('kbloop runs on Linux only (it needs io_uring).')

from Cython.Build import cythonize  # noqa: E402  (after the platform check)

SANITIZE = os.environ.get('KBLOOP_SANITIZE')   # e.g. "address" for an ASan build
extra_compile = ['-O2', '-g', '-Wno-unused-function', '-Wno-unreachable-code']
extra_link = []
if SANITIZE:
    extra_compile += [f'-fsanitize={SANITIZE}', '-fno-omit-frame-pointer', '-O1']
    extra_link += [f'-fsanitize={SANITIZE}']

core = Extension(
    'kbloop_ext.core',
    sources=['kbloop_ext/core.pyx', 'kbloop_ext/uring/kb_uring.c'],
    include_dirs=['kbloop_ext/uring', 'kbloop_ext/dpdk'],
    libraries=['uring'],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)



def pkg_config(*args):
    try:
        out = subprocess.run(['pkg-config', *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out.stdout)


def dpdk_extension():
    """kbloop_ext.dpdk.stack: DPDK's port + lwIP's core compiled in with our lwipopts.h."""
    want = os.environ.get('KBLOOP_DPDK', 'auto')
    if want == '0':
        return None
    lwip = os.environ.get('KBLOOP_LWIP_SRC', '.deps/lwip')
    cflags, libs = pkg_config('--cflags', 'libdpdk'), pkg_config('--libs', 'libdpdk')
    missing = [what for what, ok in [('libdpdk (apt-get install libdpdk-dev)', cflags),
                                     (f'lwIP source in {lwip} (bash scripts/setup.sh)',
                                      os.path.isdir(os.path.join(lwip, 'src', 'core')))] if not ok]
    if missing:
        if want == '1':
            raise SystemExit('KBLOOP_DPDK=1 but missing: ' + ', '.join(missing))
        print('kbloop: DPDK datapath not built (missing ' + ', '.join(missing) + ')', file=sys.stderr)
        return None
    lwip_sources = sorted(glob.glob(os.path.join(lwip, 'src', 'core', '*.c'))
                          + glob.glob(os.path.join(lwip, 'src', 'core', 'ipv4', '*.c'))
                          + [os.path.join(lwip, 'src', 'netif', 'ethernet.c')])
    # pkg-config's cflags include "-include rte_config.h" and -march: compile args, as given.
    return Extension(
        'kbloop_ext.dpdk.stack',
        sources=['kbloop_ext/dpdk/stack.pyx', 'kbloop_ext/dpdk/kb_dpdk.c',
                 'kbloop_ext/dpdk/kb_echo_load.c'] + lwip_sources,
        include_dirs=['kbloop_ext/dpdk', 'kbloop_ext/dpdk/lwip', os.path.join(lwip, 'src', 'include')],
        extra_compile_args=extra_compile + cflags + ['-Wno-address', '-Wno-unused-but-set-variable'],
        extra_link_args=extra_link + libs,
    )


def rdma_extension():
    """kbloop_ext.rdma.verbs: RC queue pairs over libibverbs, set up by librdmacm."""
    want = os.environ.get('KBLOOP_RDMA', 'auto')
    if want == '0':
        return None
    cflags = pkg_config('--cflags', 'libibverbs', 'librdmacm')
    libs = pkg_config('--libs', 'libibverbs', 'librdmacm')
    if libs is None and all(os.path.exists(h) for h in ('/usr/include/infiniband/verbs.h',
                                                        '/usr/include/rdma/rdma_cma.h')):
        cflags, libs = [], ['-libverbs', '-lrdmacm']     # headers without .pc files
    if libs is None:
        why = 'libibverbs and librdmacm (apt-get install libibverbs-dev librdmacm-dev)'
        if want == '1':
            raise SystemExit('KBLOOP_RDMA=1 but missing: ' + why)
        print('kbloop: RDMA datapath not built (missing ' + why + ')', file=sys.stderr)
        return None
    return Extension(
        'kbloop_ext.rdma.verbs',
        sources=['kbloop_ext/rdma/verbs.pyx', 'kbloop_ext/rdma/kb_rdma.c'],
        include_dirs=['kbloop_ext/rdma'],
        extra_compile_args=extra_compile + cflags,
        extra_link_args=extra_link + libs,
    )


extensions = [core]
dpdk = dpdk_extension()
if dpdk is not None:
    extensions.append(dpdk)
rdma = rdma_extension()
if rdma is not None:
    extensions.append(rdma)

setup(
    name='kbloop',
    version='0.1.0',
    description='A drop-in asyncio event loop on io_uring (and, later, DPDK and RDMA)',
    packages=['kbloop', 'kbloop_ext', 'kbloop_ext.uring', 'kbloop_ext.dpdk', 'kbloop_ext.rdma'],
    python_requires='>=3.11',
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={'embedsignature': True},
                          include_path=['.']),
    zip_safe=False,
)
