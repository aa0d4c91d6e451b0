/* See kb_uring.h. */
#define _GNU_SOURCE
#include "kb_uring.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int forced_failure = 0;

void kb_force_failure(int neg_errno) { forced_failure = neg_errno; }

static int read_io_uring_disabled(void) {
    FILE *f = fopen("/proc/sys/kernel/io_uring_disabled", "r");
    int v = 0;
    if (!f) return 0;             /* kernels before 6.6 have no such switch */
    if (fscanf(f, "%d", &v) != 1) v = 0;
    fclose(f);
    return v;
}

static void explain(int err, char *why, size_t why_len) {
    int disabled = read_io_uring_disabled();
    if (err == -ENOSYS)
        snprintf(why, why_len, "io_uring_setup: ENOSYS: the kernel has no io_uring "
                 "(older than 5.1 or built without CONFIG_IO_URING)");
    else if (err == -EPERM && disabled == 2)
        snprintf(why, why_len, "io_uring_setup: EPERM: kernel.io_uring_disabled=2 "
                 "(io_uring is disabled for all processes)");
    else if (err == -EPERM && disabled == 1)
        snprintf(why, why_len, "io_uring_setup: EPERM: kernel.io_uring_disabled=1 and this "
                 "process is not in kernel.io_uring_group");
    else if (err == -EPERM)
        snprintf(why, why_len, "io_uring_setup: EPERM: blocked by a seccomp profile "
                 "(Docker's and Kubernetes' default profiles deny io_uring) or an LSM");
    else if (err == -ENOMEM)
        snprintf(why, why_len, "io_uring_setup: ENOMEM: cannot allocate or lock ring memory "
                 "(check RLIMIT_MEMLOCK)");
    else
        snprintf(why, why_len, "io_uring_setup: %s", strerror(-err));
}

int kb_ring_open(kb_ring *r, unsigned entries, unsigned cq_entries, int mode, int sq_cpu,
                 unsigned sq_idle_ms, char *why, size_t why_len) {
    /* Strongest set-up first; EINVAL means "this kernel lacks a flag": try the next. */
    static const unsigned sleeping[] = {
        /* R_DISABLED: the single issuer is whichever thread first runs the loop (asyncio lets
         * a loop be created in one thread and run in another); kb_ring_enable() binds it. */
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG |
            IORING_SETUP_SUBMIT_ALL | IORING_SETUP_R_DISABLED,
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL |
            IORING_SETUP_R_DISABLED,
        IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_SUBMIT_ALL,
        0,
    };
    /* Busy-poll and SQPOLL rings must post completions without waiting for us to enter:
     * no DEFER_TASKRUN and no COOP_TASKRUN. */
    static const unsigned spinning[] = { IORING_SETUP_SUBMIT_ALL, 0 };
    const unsigned *attempts = mode >= KB_MODE_BUSY ? spinning : sleeping;
    size_t n = mode >= KB_MODE_BUSY ? 2 : 5;
    size_t first = mode == KB_MODE_NO_SINGLE_ISSUER ? 2 : 0;
    int ret = -EINVAL;
    memset(r, 0, sizeof(*r));
    if (forced_failure) {
        explain(forced_failure, why, why_len);
        strncat(why, " [forced by KBLOOP_FORCE_URING_ERROR]", why_len - strlen(why) - 1);
        return forced_failure;
    }
    for (size_t i = first; i < n; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = attempts[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = cq_entries;
        if (mode == KB_MODE_SQPOLL) {
            p.flags |= IORING_SETUP_SQPOLL;
            p.sq_thread_idle = sq_idle_ms;
            if (sq_cpu >= 0) {
                p.flags |= IORING_SETUP_SQ_AFF;
                p.sq_thread_cpu = (unsigned)sq_cpu;
            }
        }
        ret = io_uring_queue_init_params(entries, &r->ring, &p);
        if (ret == 0) {
            r->setup_flags = p.flags;
            r->kernel_features = p.features;
            r->ring_open = 1;
            break;
        }
        if (ret != -EINVAL) break;
    }
    if (ret) {
        explain(ret, why, why_len);
        return ret;
    }
    if (r->setup_flags & IORING_SETUP_DEFER_TASKRUN) r->features |= KB_F_SINGLE_ISSUER;
    if (r->setup_flags & IORING_SETUP_COOP_TASKRUN) r->features |= KB_F_COOP_TASKRUN;
    if (r->setup_flags & IORING_SETUP_SUBMIT_ALL) r->features |= KB_F_SUBMIT_ALL;
    if (r->kernel_features & IORING_FEAT_EXT_ARG) r->features |= KB_F_EXT_ARG;
    if (r->kernel_features & IORING_FEAT_NODROP) r->features |= KB_F_NODROP;

    struct io_uring_probe *probe = io_uring_get_probe_ring(&r->ring);
    if (probe) {
        /* Multishot variants have no opcode of their own; they arrived with these kernels:
         * accept multishot 5.19, recv multishot 6.0 (same release as SEND_ZC, opcode 47),
         * poll multishot 5.13 (with LINKAT, opcode 39), cancel by fd 5.19 (SOCKET, 45). */
        if (io_uring_opcode_supported(probe, IORING_OP_SEND_ZC)) {
            r->features |= KB_F_MULTISHOT_RECV | KB_F_SEND_ZC;
        }
        if (io_uring_opcode_supported(probe, IORING_OP_SOCKET))
            r->features |= KB_F_MULTISHOT_ACCEPT | KB_F_CANCEL_FD;
        if (io_uring_opcode_supported(probe, IORING_OP_LINKAT))
            r->features |= KB_F_POLL_MULTI;
        io_uring_free_probe(probe);
    }
    return 0;
}

int kb_ring_enable(kb_ring *r) {
    if (r->enabled) return 0;
    if (!(r->setup_flags & IORING_SETUP_R_DISABLED)) {
        r->enabled = 1;     /* nothing to do: the ring was usable from the start */
        return 0;
    }
    /* liburing 2.3 has no io_uring_enable_rings(): make the register call ourselves. */
    long ret = syscall(__NR_io_uring_register, r->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS,
                       NULL, 0);
    if (ret < 0) return -errno;
    r->enabled = 1;
    return 0;
}

int kb_bufring_setup(kb_ring *r, char *mem, unsigned nbufs, unsigned bufsize, unsigned bgid,
                     char *why, size_t why_len) {
    long page = sysconf(_SC_PAGESIZE);
    if (nbufs == 0 || (nbufs & (nbufs - 1)) || nbufs > 32768) {
        snprintf(why, why_len, "buffer count must be a power of two <= 32768, got %u", nbufs);
        return -EINVAL;
    }
    if (bufsize == 0 || bufsize % page) {
        snprintf(why, why_len, "buffer size must be a multiple of the page size (%ld), got %u",
                 page, bufsize);
        return -EINVAL;
    }
    /* liburing 2.3 has no io_uring_setup_buf_ring: map the ring ourselves and register it. */
    r->br_bytes = ((size_t)nbufs * sizeof(struct io_uring_buf) + page - 1) & ~(size_t)(page - 1);
    void *br = mmap(NULL, r->br_bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (br == MAP_FAILED) {
        snprintf(why, why_len, "mmap of the buffer ring: %s", strerror(errno));
        return -errno;
    }
    r->pool_bytes = (size_t)nbufs * bufsize;
    /* mem: memory the caller owns (kbloop's buffer pool); NULL: map and own our own. */
    void *pool = mem ? mem : mmap(NULL, r->pool_bytes, PROT_READ | PROT_WRITE,
                                  MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (pool == MAP_FAILED) {
        int e = errno;
        munmap(br, r->br_bytes);
        snprintf(why, why_len, "mmap of the buffer pool: %s", strerror(e));
        return -e;
    }
    uint16_t *spare = malloc(sizeof(uint16_t) * nbufs);
    if (!spare) {
        munmap(br, r->br_bytes);
        if (!mem) munmap(pool, r->pool_bytes);
        snprintf(why, why_len, "out of memory for the buffer ring");
        return -ENOMEM;
    }
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)br;
    reg.ring_entries = nbufs;
    reg.bgid = (unsigned short)bgid;
    int ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (ret) {
        munmap(br, r->br_bytes);
        if (!mem) munmap(pool, r->pool_bytes);
        free(spare);
        snprintf(why, why_len, "io_uring_register_buf_ring: %s", strerror(-ret));
        return ret;
    }
    r->br = br;
    r->pool = pool;
    r->pool_owned = mem == NULL;
    r->nbufs = nbufs;
    r->bufsize = bufsize;
    r->bgid = bgid;
    r->br_mask = io_uring_buf_ring_mask(nbufs);
    io_uring_buf_ring_init(r->br);
    r->spare = spare;
    r->nspare = 0;
    r->in_ring = 0;
    r->window = nbufs < KB_BUFRING_FIRST_WINDOW ? nbufs : KB_BUFRING_FIRST_WINDOW;
    r->bufs_out = nbufs;   /* kb_buf_recycle decrements: every buffer starts spare */
    for (unsigned i = nbufs; i-- > 0;) kb_buf_recycle(r, i);   /* buffer 0 on top */
    kb_bufring_publish(r);
    r->features |= KB_F_PBUF_RING;
    return 0;
}

void kb_ring_close(kb_ring *r) {
    if (r->br) {
        if (r->ring_open) io_uring_unregister_buf_ring(&r->ring, (int)r->bgid);
        munmap(r->br, r->br_bytes);
        r->br = NULL;
        free(r->spare);
        r->spare = NULL;
    }
    if (r->ring_open) {
        io_uring_queue_exit(&r->ring);
        r->ring_open = 0;
    }
    if (r->pool) {
        if (r->pool_owned) munmap(r->pool, r->pool_bytes);
        r->pool = NULL;
    }
}

int kb_submit_and_wait(kb_ring *r, int64_t timeout_ns) {
    unsigned queued = io_uring_sq_ready(&r->ring);
    unsigned ready = io_uring_cq_ready(&r->ring);
    int ret;
    if (ready || timeout_ns == 0) {
        if (!queued && ready) return 0;
        /* Plain rings post completions without our help; deferred/cooperative ones only when
         * we enter the kernel. */
        if (!queued && !(r->setup_flags & (IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN)))
            return 0;
        /* With TASKRUN_FLAG the kernel flags the SQ ring when completions wait for us to enter
         * (and when the CQ overflowed): a look that finds neither has nothing to fetch, and a
         * loop with callbacks ready makes no syscall per iteration. */
        if (!queued && (r->setup_flags & IORING_SETUP_TASKRUN_FLAG) &&
                !(IO_URING_READ_ONCE(*r->ring.sq.kflags) & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)))
            return 0;
        ret = io_uring_submit_and_get_events(&r->ring);
        return ret < 0 ? ret : 1;
    }
    struct __kernel_timespec ts, *tsp = NULL;
    if (timeout_ns > 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    struct io_uring_cqe *cqe = NULL;
    ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, tsp, NULL);
    if (ret == -ETIME || ret >= 0) return 1;
    return ret;
}

unsigned kb_spin_for_completions(kb_ring *r, int64_t spin_ns) {
    struct timespec t0, t;
    unsigned ready = io_uring_cq_ready(&r->ring);
    if (ready || spin_ns <= 0) return ready;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            ready = io_uring_cq_ready(&r->ring);
            if (ready) return ready;
            __builtin_ia32_pause();
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec) >= spin_ns)
            return io_uring_cq_ready(&r->ring);
    }
}

int kb_register_napi(kb_ring *r, unsigned busy_poll_us, int prefer_busy_poll) {
    /* liburing 2.3 has no io_uring_register_napi(); the uapi struct is
     * {u32 busy_poll_to; u8 prefer_busy_poll; u8 pad[3]; u64 resv}. */
    struct { uint32_t busy_poll_to; uint8_t prefer; uint8_t pad[3]; uint64_t resv; } arg;
    memset(&arg, 0, sizeof(arg));
    arg.busy_poll_to = busy_poll_us;
    arg.prefer = (uint8_t)(prefer_busy_poll != 0);
    long ret = syscall(__NR_io_uring_register, r->ring.ring_fd, 27 /* IORING_REGISTER_NAPI */,
                       &arg, 1);
    return ret < 0 ? -errno : 0;
}

static struct io_uring_probe *cached_probe;
static int cached_probe_done;

int kb_opcode_supported(int op) {
    if (!cached_probe_done) {
        cached_probe_done = 1;
        if (!forced_failure) cached_probe = io_uring_get_probe();
    }
    if (!cached_probe) return -1;
    return io_uring_opcode_supported(cached_probe, op);
}

int kb_probe(unsigned *features, unsigned *kernel_features, unsigned *setup_flags,
             char *why, size_t why_len) {
    kb_ring r;
    int ret = kb_ring_open(&r, 8, 16, KB_MODE_DEFAULT, -1, 0, why, why_len);
    if (ret) return ret;
    kb_ring_enable(&r);
    ret = kb_bufring_setup(&r, NULL, 8, (unsigned)sysconf(_SC_PAGESIZE), 0, why, why_len);
    if (ret == 0) r.features |= KB_F_PBUF_RING;
    *features = r.features;
    *kernel_features = r.kernel_features;
    *setup_flags = r.setup_flags;
    kb_ring_close(&r);
    return 0;
}
