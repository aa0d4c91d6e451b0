"""Build kbloop: the Cython core (kbloop_ext.core) linked against liburing."""
import os
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
    include_dirs=['kbloop_ext/uring'],
    libraries=['uring'],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)

setup(
    name='kbloop',
    version='0.1.0',
    description='A drop-in asyncio event loop on io_uring (and, later, DPDK and RDMA)',
    packages=['kbloop', 'kbloop_ext'],
    python_requires='>=3.11',
    ext_modules=cythonize([core], language_level=3,
                          compiler_directives={'embedsignature': True},
                          include_path=['.']),
    zip_safe=False,
)
