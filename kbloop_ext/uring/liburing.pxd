# Declarations of the liburing (2.3) and kb_uring pieces the datapath uses.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

cdef extern from "<sys/uio.h>":
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "kb_uring.h" nogil:
    struct io_uring:
        int ring_fd
    struct io_uring_sqe:
        uint8_t flags
        uint16_t ioprio
        uint64_t user_data
        uint16_t buf_group
        uint32_t msg_flags
    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    int IORING_CQE_F_MORE
    unsigned IORING_RECVSEND_POLL_FIRST
    int IORING_CQE_F_NOTIF
    unsigned IORING_SEND_ZC_REPORT_USAGE
    unsigned IORING_NOTIF_USAGE_ZC_COPIED
    int IORING_CQE_F_BUFFER
    int IORING_CQE_BUFFER_SHIFT
    int IOSQE_BUFFER_SELECT
    int IOSQE_IO_HARDLINK
    int IOSQE_CQE_SKIP_SUCCESS
    int IORING_ASYNC_CANCEL_ALL
    int IORING_ASYNC_CANCEL_FD
    int IORING_ASYNC_CANCEL_ANY
    int IORING_POLL_ADD_MULTI
    unsigned IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_COOP_TASKRUN
    unsigned IORING_SETUP_TASKRUN_FLAG, IORING_SETUP_SUBMIT_ALL, IORING_SETUP_CQSIZE
    unsigned IORING_SETUP_R_DISABLED, IORING_SETUP_SQPOLL, IORING_SETUP_SQ_AFF
    unsigned IORING_FEAT_EXT_ARG, IORING_FEAT_NODROP, IORING_FEAT_FAST_POLL
    unsigned IORING_FEAT_SINGLE_MMAP, IORING_FEAT_SUBMIT_STABLE, IORING_FEAT_NATIVE_WORKERS
    unsigned IORING_FEAT_CQE_SKIP, IORING_FEAT_LINKED_FILE

    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    unsigned io_uring_sq_ready(io_uring *ring)
    unsigned io_uring_cq_ready(io_uring *ring)
    unsigned io_uring_peek_batch_cqe(io_uring *ring, io_uring_cqe **cqes, unsigned count)
    void io_uring_cq_advance(io_uring *ring, unsigned nr)
    int io_uring_submit(io_uring *ring)
    int io_uring_submit_and_get_events(io_uring *ring)
    void io_uring_sqe_set_data64(io_uring_sqe *sqe, uint64_t data)
    void io_uring_sqe_set_flags(io_uring_sqe *sqe, unsigned flags)

    void io_uring_prep_multishot_accept(io_uring_sqe *sqe, int fd, sockaddr *addr,
                                        socklen_t *addrlen, int flags)
    void io_uring_prep_accept(io_uring_sqe *sqe, int fd, sockaddr *addr,
                              socklen_t *addrlen, int flags)
    void io_uring_prep_recv_multishot(io_uring_sqe *sqe, int sockfd, void *buf, size_t len,
                                      int flags)
    void io_uring_prep_recv(io_uring_sqe *sqe, int sockfd, void *buf, size_t len, int flags)
    void io_uring_prep_send(io_uring_sqe *sqe, int sockfd, const void *buf, size_t len,
                            int flags)
    void io_uring_prep_sendmsg(io_uring_sqe *sqe, int fd, const msghdr *msg, unsigned flags)
    void io_uring_prep_recvmsg(io_uring_sqe *sqe, int fd, msghdr *msg, unsigned flags)
    void io_uring_prep_connect(io_uring_sqe *sqe, int fd, const sockaddr *addr,
                               socklen_t addrlen)
    void io_uring_prep_shutdown(io_uring_sqe *sqe, int fd, int how)
    void io_uring_prep_close(io_uring_sqe *sqe, int fd)
    void io_uring_prep_cancel64(io_uring_sqe *sqe, uint64_t user_data, int flags)
    void io_uring_prep_cancel_fd(io_uring_sqe *sqe, int fd, unsigned flags)
    void io_uring_prep_poll_add(io_uring_sqe *sqe, int fd, unsigned poll_mask)
    void io_uring_prep_poll_multishot(io_uring_sqe *sqe, int fd, unsigned poll_mask)
    void io_uring_prep_poll_remove(io_uring_sqe *sqe, uint64_t user_data)
    void io_uring_prep_read(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                            uint64_t offset)
    void io_uring_prep_nop(io_uring_sqe *sqe)
    void io_uring_prep_send_zc_fixed(io_uring_sqe *sqe, int sockfd, const void *buf, size_t len,
                                     int flags, unsigned zc_flags, unsigned buf_index)
    int io_uring_register_buffers_sparse(io_uring *ring, unsigned nr)
    int io_uring_register_buffers_update_tag(io_uring *ring, unsigned off, const iovec *iovecs,
                                             const uint64_t *tags, unsigned nr)

    enum:
        KB_F_SINGLE_ISSUER, KB_F_COOP_TASKRUN, KB_F_EXT_ARG, KB_F_MULTISHOT_ACCEPT
        KB_F_MULTISHOT_RECV, KB_F_PBUF_RING, KB_F_CANCEL_FD, KB_F_POLL_MULTI, KB_F_SEND_ZC
        KB_F_SUBMIT_ALL, KB_F_NODROP

    ctypedef struct kb_ring:
        io_uring ring
        unsigned features
        unsigned setup_flags
        unsigned kernel_features
        int ring_open
        int enabled
        char *pool
        unsigned nbufs, bufsize, bgid
        unsigned bufs_out
        unsigned window, in_ring, nspare, window_growths

    enum:
        KB_MODE_DEFAULT, KB_MODE_NO_SINGLE_ISSUER, KB_MODE_BUSY, KB_MODE_SQPOLL
    int kb_ring_open(kb_ring *r, unsigned entries, unsigned cq_entries, int mode, int sq_cpu,
                     unsigned sq_idle_ms, char *why, size_t why_len)
    unsigned kb_spin_for_completions(kb_ring *r, int64_t spin_ns)
    int kb_register_napi(kb_ring *r, unsigned busy_poll_us, int prefer_busy_poll)
    int kb_ring_enable(kb_ring *r)
    int kb_bufring_setup(kb_ring *r, char *mem, unsigned nbufs, unsigned bufsize, unsigned bgid,
                         char *why, size_t why_len)
    void kb_ring_close(kb_ring *r)
    char *kb_buf_ptr(kb_ring *r, unsigned bid)
    void kb_buf_taken(kb_ring *r)
    void kb_buf_recycle(kb_ring *r, unsigned bid)
    void kb_bufring_grow(kb_ring *r)
    void kb_bufring_publish(kb_ring *r)
    int kb_submit_and_wait(kb_ring *r, int64_t timeout_ns)
    bint kb_wake_claim(int *pending)
    void kb_wake_reset(int *pending)
    int kb_probe(unsigned *features, unsigned *kernel_features, unsigned *setup_flags,
                 char *why, size_t why_len)
    int kb_opcode_supported(int op)
    void kb_force_failure(int neg_errno)
