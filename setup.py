"""Build kbloop: the Cython core (kbloop_ext.core) linked against liburing; where DPDK and
lwIP's source are present, the DPDK datapath's device layer (kbloop_ext.dpdk.stack); where
libibverbs and librdmacm are, the RDMA one (kbloop_ext.rdma.verbs).  The metadata and the
build requirements are in pyproject.toml, the version in kbloop/__init__.py only.

liburing is linked statically when its archive is there (Debian's liburing-dev ships it), so
that the core, like uvloop with libuv, needs no shared library at run time:
KBLOOP_URING_STATIC=0 links the shared one, =1 makes the archive's absence an error.
KBLOOP_DPDK=0 skips the DPDK part, KBLOOP_DPDK=1 makes its absence an error; by default it is
built when `pkg-config libdpdk` works and lwIP's source is in .deps/lwip (scripts/setup.sh
fetches Debian's) or in KBLOOP_LWIP_SRC.  KBLOOP_RDMA likewise for the RDMA layer (built by
default when libibverbs-dev and librdmacm-dev are installed).  scripts/wheels.sh builds with
KBLOOP_DPDK=0 KBLOOP_RDMA=0: a wheel of the io_uring core only (docs/install.md).
"""
import glob
import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

if not sys.platform.startswith('linux'):
    raise SystemExit('kbloop runs on Linux only (it needs io_uring).')

SANITIZE = os.environ.get('KBLOOP_SANITIZE')   # e.g. "address" for an ASan build
extra_compile = ['-O2', '-g', '-Wno-unused-function', '-Wno-unreachable-code']
extra_link = []
if SANITIZE:
    extra_compile += [f'-fsanitize={SANITIZE}', '-fno-omit-frame-pointer', '-O1']
    extra_link += [f'-fsanitize={SANITIZE}']

URING_MISSING = """kbloop: liburing.h not found. Building kbloop from source needs liburing:
    Debian/Ubuntu: apt-get install liburing-dev
    Fedora/RHEL:   dnf install liburing-devel
(or install a kbloop wheel, which has liburing built in; see docs/install.md)"""


def liburing():
    """(include_dirs, libraries, extra_objects) for liburing, or a SystemExit saying what to
    install."""
    includes = [f[2:] for f in pkg_config('--cflags-only-I', 'liburing') or [] if f[:2] == '-I']
    libdirs = [f[2:] for f in pkg_config('--libs-only-L', 'liburing') or [] if f[:2] == '-L']
    libdirs += pkg_config('--variable=libdir', 'liburing') or []
    if not any(os.path.exists(os.path.join(d, 'liburing.h'))
               for d in includes + ['/usr/include', '/usr/local/include']):
        raise SystemExit(URING_MISSING)
    want = os.environ.get('KBLOOP_URING_STATIC', 'auto')
    multiarch = f'/usr/lib/{os.uname().machine}-linux-gnu'
    archive = next((a for a in (os.path.join(d, 'liburing.a') for d in libdirs + [
        multiarch, '/usr/lib64', '/usr/lib', '/usr/local/lib', '/usr/local/lib64'])
        if os.path.exists(a)), None)
    if want != '0' and archive:
        return includes, [], [archive]
    if want == '1':
        raise SystemExit('KBLOOP_URING_STATIC=1 but liburing.a was not found.\n' + URING_MISSING)
    return includes, ['uring'], []


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


class build_ext(_build_ext):
    """Chooses and cythonizes the extensions only when building: an sdist or the metadata
    needs neither Cython's output nor liburing, DPDK or RDMA."""

    def finalize_options(self):
        try:
            from Cython.Build import cythonize
        except ImportError:
            raise SystemExit('kbloop: building needs Cython 3 (pip install "cython>=3"; '
                             'pip install . declares it in pyproject.toml)') from None
        includes, libraries, objects = liburing()
        core = Extension(
            'kbloop_ext.core',
            sources=['kbloop_ext/core.pyx', 'kbloop_ext/uring/kb_uring.c'],
            include_dirs=['kbloop_ext/uring', 'kbloop_ext/dpdk'] + includes,
            libraries=libraries,
            extra_objects=objects,
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
        extensions = [core] + [ext for ext in (dpdk_extension(), rdma_extension()) if ext]
        self.distribution.ext_modules[:] = cythonize(
            extensions, language_level=3, compiler_directives={'embedsignature': True},
            include_path=['.'], quiet=True)
        super().finalize_options()


setup(
    # A stand-in until build_ext chooses the real ones: it makes the wheel platform-specific.
    ext_modules=[Extension('kbloop_ext.core', sources=['kbloop_ext/core.pyx'])],
    cmdclass={'build_ext': build_ext},
)
