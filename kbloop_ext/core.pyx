# cython: language_level=3, cdivision=True
"""kbloop's compiled core: the loop, the transports and the datapaths, in one module.

The pieces live in their own files (included below) so that the layout shows the architecture:
  loop/        the device-agnostic loop core (handles, the iteration step, servers)
  transports/  stream transports written once against the datapath contract
  datapath.pxi the contract itself
  uring/       the io_uring datapath (liburing)
  stack.pxi    what the datapaths with their own transport protocol (DPDK, RDMA) share
  dpdk/        the DPDK datapath (lwIP over a DPDK port, driven through kbloop_ext.dpdk.stack)
  rdma/        the RDMA datapath (framed streams over RC queue pairs, kbloop_ext.rdma.verbs)
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset
cdef extern from "<errno.h>":
    int ECANCELED, ENOBUFS, EINTR, EEXIST, EBUSY, EAGAIN, EBADF, EINPROGRESS
    int c_errno "errno"
from posix.unistd cimport close, write
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_Check
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.contextvars cimport (PyContext_Copy, PyContext_CopyCurrent, PyContext_Enter,
                                  PyContext_Exit)

cdef extern from "Python.h":
    ctypedef struct _kb_tstate "PyThreadState":
        PyObject *context       # the current contextvars.Context (CPython 3.7+)
    _kb_tstate *PyThreadState_Get()

from kbloop_ext.uring.liburing cimport *

cdef extern from "<sys/eventfd.h>":
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC

cdef extern from "<sys/socket.h>":
    int MSG_NOSIGNAL, MSG_DONTWAIT
    int SHUT_WR, SHUT_RDWR
    ssize_t c_send "send" (int fd, const void *buf, size_t n, int flags)
    ssize_t c_sendto "sendto" (int fd, const void *buf, size_t n, int flags,
                               const sockaddr *addr, socklen_t addrlen)
    int c_connect "connect" (int fd, const sockaddr *addr, socklen_t addrlen)
    int c_shutdown "shutdown" (int fd, int how)

cdef extern from "<malloc.h>":
    int mallopt(int param, int value)
    int M_TRIM_THRESHOLD, M_MMAP_THRESHOLD

cdef extern from "<poll.h>":
    int POLLIN, POLLOUT

import atexit
import collections.abc
import concurrent.futures
import contextvars
import errno
import io
import itertools
import logging
import mmap
import os
import selectors
import stat
import sys
import threading
import time
import warnings
import weakref
from contextvars import copy_context
from heapq import heappush, heappop, heapify
from socket import (socket as socket_socket, inet_pton, inet_ntop, if_nametoindex,
                    if_indextoname, getaddrinfo, SOCK_DGRAM, AF_INET, AF_INET6,
                    AF_UNIX, AF_UNSPEC, AI_PASSIVE, SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC,
                    SOL_SOCKET, SO_REUSEADDR, SO_KEEPALIVE, SO_ERROR, IPPROTO_TCP, IPPROTO_IPV6, IPV6_V6ONLY,
                    TCP_NODELAY, SHUT_RD as SHUT_RD_PY)
from struct import pack as struct_pack, unpack as struct_unpack

from asyncio import (base_events, constants, coroutines, events, exceptions, format_helpers,
                     futures, protocols, sslproto, tasks, transports, trsock)

logger = logging.getLogger('asyncio')


class BackendUnavailable(RuntimeError):
    """The requested datapath cannot run on this machine; the message says why."""


# Forward declarations: the included files refer to each other's classes.
cdef class _CoreLoop
cdef class Datapath
cdef class TransportCore
cdef class StreamCore
cdef class DatagramCore
cdef class Listener
cdef class FdWatch
cdef class StackDatapath
cdef class StackSocket
cdef class DpdkDatapath
cdef class DpdkSocket
cdef class RdmaDatapath
cdef class RdmaSocket
cdef class TLSProtocol

include "loop/handles.pxi"
include "buffers/pool.pxi"
include "datapath.pxi"
include "transports/base.pxi"
include "transports/stream.pxi"
include "transports/datagram.pxi"
include "transports/tls.pxi"
include "uring/datapath.pxi"
include "uring/probe.pxi"
include "stack.pxi"
include "dpdk/datapath.pxi"
include "rdma/datapath.pxi"
include "loop/loop.pxi"
include "loop/server.pxi"
include "loop/unix.pxi"
