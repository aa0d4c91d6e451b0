# What io_uring can do on this machine, for kbloop.info() and `python -m kbloop info`.

_FEATURE_NAMES = [
    (KB_F_SINGLE_ISSUER, 'single_issuer+defer_taskrun'), (KB_F_COOP_TASKRUN, 'coop_taskrun'),
    (KB_F_EXT_ARG, 'ext_arg_wait'), (KB_F_MULTISHOT_ACCEPT, 'multishot_accept'),
    (KB_F_MULTISHOT_RECV, 'multishot_recv'), (KB_F_PBUF_RING, 'provided_buffer_ring'),
    (KB_F_CANCEL_FD, 'cancel_fd'), (KB_F_POLL_MULTI, 'multishot_poll'),
    (KB_F_SEND_ZC, 'send_zc'), (KB_F_SUBMIT_ALL, 'submit_all'), (KB_F_NODROP, 'cq_nodrop'),
]
_SETUP_FLAG_NAMES = [
    (IORING_SETUP_SINGLE_ISSUER, 'SINGLE_ISSUER'), (IORING_SETUP_DEFER_TASKRUN, 'DEFER_TASKRUN'),
    (IORING_SETUP_COOP_TASKRUN, 'COOP_TASKRUN'), (IORING_SETUP_TASKRUN_FLAG, 'TASKRUN_FLAG'),
    (IORING_SETUP_SUBMIT_ALL, 'SUBMIT_ALL'), (IORING_SETUP_CQSIZE, 'CQSIZE'),
    (IORING_SETUP_R_DISABLED, 'R_DISABLED'), (IORING_SETUP_SQPOLL, 'SQPOLL'),
]
# Opcodes the datapath uses (name -> number in the kernel uapi).
_OPCODES = {'ACCEPT': 13, 'CONNECT': 16, 'CLOSE': 19, 'READ': 22, 'SEND': 26, 'RECV': 27,
            'SENDMSG': 9, 'POLL_ADD': 6, 'POLL_REMOVE': 7, 'ASYNC_CANCEL': 14, 'SHUTDOWN': 34,
            'PROVIDE_BUFFERS': 31, 'SOCKET': 45, 'SEND_ZC': 47, 'SENDMSG_ZC': 48,
            'READ_MULTISHOT': 49, 'BIND': 56, 'LISTEN': 57, 'RECV_ZC': 58}


cdef list _feature_names(unsigned f):
    return [name for bit, name in _FEATURE_NAMES if f & bit]


cdef list _setup_flag_names(unsigned f):
    return [name for bit, name in _SETUP_FLAG_NAMES if f & bit]


def probe_io_uring():
    """Open a small ring once and report what is usable, or exactly why not."""
    cdef unsigned features = 0, kfeatures = 0, setup_flags = 0
    cdef char why[512]
    why[0] = 0
    ret = kb_probe(&features, &kfeatures, &setup_flags, why, sizeof(why))
    if ret:
        return {'usable': False, 'reason': why.decode(), 'errno': errno.errorcode.get(-ret, ret),
                'features': [], 'setup_flags': [], 'opcodes': {}}
    return {
        'usable': True, 'reason': None, 'errno': None,
        'features': _feature_names(features),
        'setup_flags': _setup_flag_names(setup_flags),
        'opcodes': {name: kb_opcode_supported(op) == 1 for name, op in _OPCODES.items()},
    }


def force_uring_failure(str errname):
    """Make io_uring set-up fail with errno `errname` (tests of the fallback path)."""
    kb_force_failure(-getattr(errno, errname) if errname else 0)
