"""A seccomp filter that makes io_uring_setup(2) fail with EPERM, the way container runtimes
(Docker's default profile, gVisor, ...) deny io_uring.

Usage (in a throw-away process; a seccomp filter cannot be removed):

    from seccomp_no_uring import install_no_uring_filter
    install_no_uring_filter()
"""
import ctypes
import errno
import platform

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# classic BPF opcodes
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

# offsets in struct seccomp_data
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4

AUDIT_ARCH = {
    "x86_64": 0xC000003E,  # AUDIT_ARCH_X86_64
    "aarch64": 0xC00000B7,  # AUDIT_ARCH_AARCH64
}

NR_IO_URING_SETUP = 425  # same number on every architecture (unified syscall table)


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_ushort),
        ("filter", ctypes.POINTER(SockFilter)),
    ]


def supported():
    return platform.machine() in AUDIT_ARCH


def install_no_uring_filter(err=errno.EPERM, syscall_nr=NR_IO_URING_SETUP):
    """Install a filter: io_uring_setup -> -1/err, every other syscall allowed."""
    arch = AUDIT_ARCH[platform.machine()]
    prog = [
        SockFilter(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        SockFilter(BPF_JMP_JEQ_K, 0, 3, arch),  # other arch -> ALLOW
        SockFilter(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        SockFilter(BPF_JMP_JEQ_K, 0, 1, syscall_nr),
        SockFilter(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | (err & 0xFFFF)),
        SockFilter(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    filters = (SockFilter * len(prog))(*prog)
    fprog = SockFprog(len(prog), filters)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "prctl(PR_SET_NO_NEW_PRIVS): " + errno.errorcode.get(e, str(e)))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "prctl(PR_SET_SECCOMP): " + errno.errorcode.get(e, str(e)))


def io_uring_setup_errno():
    """Call io_uring_setup(8, params) directly; return 0 on success (fd closed) or the errno."""
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    fd = libc.syscall(NR_IO_URING_SETUP, 8, params)
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


if __name__ == "__main__":
    print("before:", io_uring_setup_errno())
    install_no_uring_filter()
    print("after:", errno.errorcode.get(io_uring_setup_errno()))
