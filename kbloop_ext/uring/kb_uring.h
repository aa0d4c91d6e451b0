/* kb_uring: the small C layer under the io_uring datapath.
 *
 * Cython calls liburing's static-inline prep helpers directly (see liburing.pxd); this file holds
 * what is easier to get right in C: feature probing with the constants newer than Debian's
 * liburing 2.3 headers, ring set-up with fallbacks, the provided-buffer ring over a page-aligned
 * pool, and the one "submit + wait" call the loop makes per iteration.
 */
#ifndef KB_URING_H
#define KB_URING_H

#include <liburing.h>
#include <stddef.h>
#include <stdint.h>

/* Constants newer than liburing 2.3's headers (values from the kernel uapi). */
#ifndef IORING_SETUP_NO_SQARRAY
#define IORING_SETUP_NO_SQARRAY (1U << 16)
#endif
#ifndef IORING_CQE_F_BUF_MORE
#define IORING_CQE_F_BUF_MORE (1U << 4)
#endif
#ifndef IORING_RECVSEND_BUNDLE
#define IORING_RECVSEND_BUNDLE (1U << 4)
#endif
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif
#ifndef IORING_OP_BIND
#define IORING_OP_BIND 56
#endif
#ifndef IORING_OP_LISTEN
#define IORING_OP_LISTEN 57
#endif

/* Features the datapath may use, decided once per ring from the probe. */
enum {
    KB_F_SINGLE_ISSUER   = 1 << 0,   /* SINGLE_ISSUER|DEFER_TASKRUN ring */
    KB_F_COOP_TASKRUN    = 1 << 1,   /* COOP_TASKRUN|TASKRUN_FLAG ring (fallback) */
    KB_F_EXT_ARG         = 1 << 2,   /* wait with a timeout in one io_uring_enter */
    KB_F_MULTISHOT_ACCEPT= 1 << 3,
    KB_F_MULTISHOT_RECV  = 1 << 4,   /* recv multishot + provided buffer ring */
    KB_F_PBUF_RING       = 1 << 5,
    KB_F_CANCEL_FD       = 1 << 6,
    KB_F_POLL_MULTI      = 1 << 7,
    KB_F_SEND_ZC         = 1 << 8,
    KB_F_SUBMIT_ALL      = 1 << 9,
    KB_F_NODROP          = 1 << 10,
};

typedef struct kb_ring {
    struct io_uring ring;
    unsigned features;         /* KB_F_* */
    unsigned setup_flags;      /* IORING_SETUP_* the ring was created with */
    unsigned kernel_features;  /* IORING_FEAT_* reported by the kernel */
    int ring_open;
    int enabled;               /* R_DISABLED rings: enabled by the first running thread */
    /* provided buffer ring (group kb_ring.bgid) over a page-aligned pool */
    struct io_uring_buf_ring *br;
    size_t br_bytes;
    char *pool;
    size_t pool_bytes;
    int pool_owned;            /* pool mapped here (else it belongs to kbloop's buffer pool) */
    unsigned nbufs, bufsize, bgid, br_mask;
    unsigned pending_recycle;  /* buffers added but not yet published (advance) */
    unsigned bufs_out;         /* buffers handed to us by the kernel, not yet recycled */
    /* The ring is FIFO: given all nbufs buffers, receives would cycle through all of them
     * (32 MiB by default) and every copy would miss the caches.  So only a window of buffers
     * is in the ring; the others wait in a LIFO stack, and refills take the most recently
     * returned (cache-hot) buffers first.  The window doubles whenever the ring runs dry. */
    uint16_t *spare;           /* stack of buffer ids not in the ring; top = last returned */
    unsigned nspare;
    unsigned window;           /* most buffers in the ring at once */
    unsigned in_ring;          /* buffers in the ring (published or pending), not consumed */
    unsigned window_growths;
} kb_ring;

#define KB_BUFRING_FIRST_WINDOW 32

/* Ring modes.  DEFAULT sleeps in the kernel and prefers SINGLE_ISSUER|DEFER_TASKRUN.  BUSY is
 * a plain ring: completions land in the CQ without us entering the kernel, so the reactor can
 * spin on it.  SQPOLL adds a kernel thread that submits for us (optionally pinned). */
enum { KB_MODE_DEFAULT = 0, KB_MODE_NO_SINGLE_ISSUER = 1, KB_MODE_BUSY = 2, KB_MODE_SQPOLL = 3 };

/* Returns 0 or -errno; on failure writes a one-line reason into why.  sq_cpu < 0: unpinned. */
int kb_ring_open(kb_ring *r, unsigned entries, unsigned cq_entries, int mode, int sq_cpu,
                 unsigned sq_idle_ms, char *why, size_t why_len);
/* Spin on the completion queue for up to spin_ns; returns the number of CQEs ready. */
unsigned kb_spin_for_completions(kb_ring *r, int64_t spin_ns);
/* NAPI busy polling of the NIC queues behind this ring's sockets (kernel 6.9+). */
int kb_register_napi(kb_ring *r, unsigned busy_poll_us, int prefer_busy_poll);
/* Bind a SINGLE_ISSUER ring to the calling thread (no-op for other rings). */
int kb_ring_enable(kb_ring *r);
int kb_bufring_setup(kb_ring *r, char *mem, unsigned nbufs, unsigned bufsize, unsigned bgid,
                     char *why, size_t why_len);
void kb_ring_close(kb_ring *r);

static inline char *kb_buf_ptr(kb_ring *r, unsigned bid) {
    return r->pool + (size_t)bid * r->bufsize;
}
/* A completion handed us a buffer of the ring. */
static inline void kb_buf_taken(kb_ring *r) {
    r->bufs_out++;
    r->in_ring--;
}
/* Give buffer bid back; it goes to the top of the spare stack, and from there to the ring at
 * the next kb_bufring_publish(). */
static inline void kb_buf_recycle(kb_ring *r, unsigned bid) {
    r->spare[r->nspare++] = (uint16_t)bid;
    r->bufs_out--;
}
/* Top the ring up to its window from the spare stack's top, and publish. */
static inline void kb_bufring_publish(kb_ring *r) {
    while (r->in_ring < r->window && r->nspare) {
        unsigned bid = r->spare[--r->nspare];
        io_uring_buf_ring_add(r->br, kb_buf_ptr(r, bid), r->bufsize, bid, r->br_mask,
                              r->pending_recycle);
        r->pending_recycle++;
        r->in_ring++;
    }
    if (r->pending_recycle) {
        io_uring_buf_ring_advance(r->br, r->pending_recycle);
        r->pending_recycle = 0;
    }
}
/* A receive found the ring empty: allow more buffers in it. */
static inline void kb_bufring_grow(kb_ring *r) {
    if (r->window < r->nbufs) {
        r->window = r->window * 2 < r->nbufs ? r->window * 2 : r->nbufs;
        r->window_growths++;
    }
}

/* Wake-up coalescing (call_soon_threadsafe() from other threads): the first wake-up since the
 * loop last read its eventfd claims the write; later ones see a write pending and skip the
 * syscall.  The loop resets the claim when the read completes, before it looks at what the
 * wakers queued, so a callback queued after the reset writes again and none is missed. */
static inline int kb_wake_claim(int *pending) {
    return __atomic_exchange_n(pending, 1, __ATOMIC_SEQ_CST) == 0;
}
static inline void kb_wake_reset(int *pending) {
    __atomic_store_n(pending, 0, __ATOMIC_SEQ_CST);
}

/* Submit what is queued and wait for at least one completion, up to timeout_ns
 * (<0: forever, 0: do not wait).  Makes at most one io_uring_enter, and none when nothing is
 * queued and completions are already waiting.  Returns 1 if it entered the kernel, 0 if not,
 * or -errno (-EINTR: a signal arrived; -ETIME is not an error and is mapped to 1). */
int kb_submit_and_wait(kb_ring *r, int64_t timeout_ns);

/* Probe without keeping a ring: fills features and writes why io_uring is unusable, if so.
 * Returns 0 when usable, else -errno. */
int kb_probe(unsigned *features, unsigned *kernel_features, unsigned *setup_flags,
             char *why, size_t why_len);
/* Is opcode op supported by this kernel?  (-1 if the probe itself failed.) */
int kb_opcode_supported(int op);

/* Force a failure of ring creation, for tests of the fallback path: "EPERM", "ENOSYS"... */
void kb_force_failure(int neg_errno);

#endif
