/* kbloop's RDMA datapath, device layer: byte streams over RC queue pairs (libibverbs) set up by
 * rdma_cm (librdmacm), driven single-threaded and without blocking by kb_rdma_poll().  What the
 * connections do becomes events in a queue that the caller drains after each poll, as in the
 * DPDK datapath (kb_dpdk.h).  The wire format is in docs/rdma.md ("Wire format").
 *
 * Per stack: one rdma_cm event channel (non-blocking; its fd wakes a sleeping loop).  Per RDMA
 * device met: a PD, one CQ shared by the stack's connections and its completion channel (fd).
 * Per connection: one RC QP and one registered region (LOCAL_WRITE only) holding its receive
 * buffers, its send slots and a small control area. */
#ifndef KB_RDMA_H
#define KB_RDMA_H

#include <stdint.h>
#include <stddef.h>

typedef struct kb_rdma kb_rdma;          /* a stack: opaque */

enum kb_rdma_event_kind {
    KB_RDMA_EV_ACCEPT = 1,   /* conn: a new connection, established; listener: its listener.
                              * Taken by setting conn->owner during the drain; one left
                              * without an owner is released by kb_rdma_events_clear */
    KB_RDMA_EV_CONNECTED,    /* conn: kb_rdma_connect completed */
    KB_RDMA_EV_RECV,         /* conn, data, len, buf: a receive buffer lent to the caller */
    KB_RDMA_EV_EOF,          /* conn: the peer wrote EOF (after all its data) */
    KB_RDMA_EV_SENT,         /* conn, len: payload bytes the peer has received; send slots
                              * were freed, so kb_rdma_write takes more */
    KB_RDMA_EV_ERROR,        /* conn, err (positive errno): the connection is dead; no more
                              * events follow for it.  ECONNREFUSED: connect refused or
                              * unreachable (len: the peer's reject reason, 0 if none);
                              * ECONNRESET: the peer went away without EOF; ETIMEDOUT: the
                              * peer stopped acknowledging (retries exhausted); EPROTO: the
                              * peer broke the wire format; EHOSTUNREACH: no route. */
    KB_RDMA_EV_CLOSED,       /* conn: disconnected in order (the peer's EOF was received, or
                              * we were closing, and all we wrote was delivered); no more
                              * events */
    KB_RDMA_EV_REJECT,       /* listener, err: an incoming request was rejected (err: the
                              * KB_RDMA_REJ_* reason sent to the peer) */
};

/* Reasons in a reject's private data (docs/rdma.md). */
enum {
    KB_RDMA_REJ_BAD_MAGIC = 1,
    KB_RDMA_REJ_BAD_VERSION = 2,
    KB_RDMA_REJ_BAD_PARAMS = 3,
    KB_RDMA_REJ_NO_RESOURCES = 4,
};

/* The public head of a connection or listener; the rest is kb_rdma.c's. */
typedef struct kb_rdma_conn {
    void *owner;             /* the caller's object, borrowed; NULL until taken */
    uint64_t id;
    int listening;
} kb_rdma_conn;

typedef struct kb_rdma_event {
    int kind;
    int err;
    uint32_t len;
    uint32_t buf;            /* KB_RDMA_EV_RECV: the lent buffer, for kb_rdma_recv_done */
    kb_rdma_conn *conn;
    kb_rdma_conn *listener;
    const void *data;        /* KB_RDMA_EV_RECV: the payload.  The caller sets it to NULL when
                              * it takes the buffer (then it must kb_rdma_recv_done it); a
                              * buffer still here at kb_rdma_events_clear is returned there */
} kb_rdma_event;

typedef struct kb_rdma_config {
    uint32_t buf_size;       /* bytes per receive buffer and send slot, frame header included */
    uint32_t recv_depth;     /* receive buffers per connection = credits granted at connect */
    uint32_t send_depth;     /* send slots per connection */
    uint32_t inline_max;     /* ask the QP for this much inline data (0: no inline sends) */
    uint8_t retry_count;     /* 0..6 (7 would be "for ever" to rxe) */
    uint32_t timeout_ms;     /* address and route resolution */
} kb_rdma_config;

typedef struct kb_rdma_stats {
    /* alive now: nothing leaks when these come back to where they started */
    uint32_t devices, cqs, pds, qps, mrs, cm_ids, conns, listeners;
    uint32_t rx_posted, rx_lent;         /* receive buffers posted to QPs / lent to callers */
    uint32_t tx_slots_busy;              /* send slots holding frames not yet completed */
    uint64_t credits_avail;              /* sum of the credits the peers granted us, unused */
    /* totals */
    uint64_t sends, sends_inline, sends_signalled, credit_msgs_tx, credit_msgs_rx;
    uint64_t msgs_tx, msgs_rx, bytes_tx, bytes_rx;
    uint64_t credit_waits;   /* a flush found frames queued but no credit to send them */
    uint64_t recv_posts;     /* ibv_post_recv calls (each posts a batch) */
    uint64_t rejects, accepts, connects, errors, eproto, wc_errors, cm_events, polls;
    uint32_t pool_mrs;       /* registrations of kb_rdma_reg_mem memory (one per device) */
    uint64_t ref_frames;     /* frames sent from registered caller memory (kb_rdma_write_ref) */
    uint64_t probes;         /* liveness probes sent (kb_rdma_tick) */
    uint32_t fds_gen;        /* changes when kb_rdma_fds would return a different set */
    uint32_t cq_entries;     /* the CQs' sizes (grown as QPs are added) */
} kb_rdma_stats;

typedef struct kb_rdma_conn_stats {
    uint32_t credits;        /* the peer's receive buffers we may still fill */
    uint32_t peer_credits;   /* ours the peer may still fill (granted - consumed) */
    uint32_t owed;           /* reposted, not yet granted to the peer */
    uint32_t rx_posted, rx_lent, tx_queued, tx_busy;
    uint32_t frame_max;      /* largest frame we send: the peer's buffer size */
    uint32_t inline_max;
    int retry_cnt, rnr_retry, timeout;   /* the QP's, as the device reports them (-1: none) */
    uint64_t credit_waits, msgs_tx, msgs_rx;
    int state;
} kb_rdma_conn_stats;

/* A stack; NULL config fields take defaults.  NULL with a message in errbuf on failure. */
kb_rdma *kb_rdma_new(const kb_rdma_config *cfg, char *errbuf, size_t errlen);
/* Destroys every connection and device resource; kb_rdma_conn pointers die with it. */
void kb_rdma_free(kb_rdma *r);

/* One step: completions (in batches), then rdma_cm events, then deferred reposts and credit
 * returns.  Returns the number of events in the queue. */
int kb_rdma_poll(kb_rdma *r);
/* Post returned buffers and send owed credits now (kb_rdma_poll does it too). */
void kb_rdma_flush(kb_rdma *r);
/* Sleep mode: the fds to wait on (the rdma_cm channel's, each device's completion
 * channel's); returns how many (at most max). */
uint32_t kb_rdma_fds(kb_rdma *r, int *fds, uint32_t max);
/* Before sleeping on the fds: flushes, then asks each CQ that is not armed to notify its next
 * completion.  Returns 1 when the caller must poll (and then arm) again before it may sleep:
 * a CQ had to be armed (completions that came before do not wake the fd), or the last poll
 * left completions behind.  0: everything is armed and flushed; sleep. */
int kb_rdma_arm(kb_rdma *r);

/* Events produced since the last clear; valid until the next call into the stack. */
kb_rdma_event *kb_rdma_events(kb_rdma *r, size_t *count);
void kb_rdma_events_clear(kb_rdma *r);
void kb_rdma_get_stats(kb_rdma *r, kb_rdma_stats *st);
int kb_rdma_conn_get_stats(kb_rdma_conn *c, kb_rdma_conn_stats *st);

/* ip in network byte order.  Return the conn, or NULL with a negative errno in *err.
 * listen: port 0 picks one (kb_rdma_addrs tells which).  connect: completes with
 * KB_RDMA_EV_CONNECTED or fails with KB_RDMA_EV_ERROR. */
kb_rdma_conn *kb_rdma_listen(kb_rdma *r, uint32_t ip, uint16_t port, int backlog, int *err);
kb_rdma_conn *kb_rdma_connect(kb_rdma *r, uint32_t ip, uint16_t port, int *err);

/* Copy up to len bytes into send slots (framed, sent as credits allow); returns bytes taken
 * (0: the slots are full: wait for KB_RDMA_EV_SENT) or a negative errno (-EPIPE after EOF
 * or close, -ENOTCONN before CONNECTED/ACCEPT, the error of a dead connection). */
long kb_rdma_write(kb_rdma_conn *c, const void *data, size_t len);
/* Memory that frames may be sent from without a copy (kbloop's buffer pool): registered with
 * every RDMA device (LOCAL_WRITE only), now and as devices are met.  0 or a negative errno. */
int kb_rdma_reg_mem(kb_rdma *r, const void *addr, size_t len);
void kb_rdma_unreg_mem(kb_rdma *r, const void *addr);
/* kb_rdma_write without the copy: frames whose payload stays at data (in registered memory,
 * else -EFAULT) until KB_RDMA_EV_SENT has counted past it.  Returns the bytes taken. */
long kb_rdma_write_ref(kb_rdma_conn *c, const void *data, size_t len);
/* Call about once a second: probes every established connection with no signalled send in flight
 * (a zero-length RDMA WRITE the peer's adapter must acknowledge), so that a vanished peer ends
 * it with ETIMEDOUT (retries exhausted) instead of never being noticed. */
void kb_rdma_tick(kb_rdma *r);
/* Bytes kb_rdma_write would take now. */
size_t kb_rdma_write_room(kb_rdma_conn *c);
/* End our direction after what was written; 0 or a negative errno. */
int kb_rdma_write_eof(kb_rdma_conn *c);
/* Give back a buffer lent by KB_RDMA_EV_RECV; it is reposted (in a batch) and its credit
 * goes back to the peer.  Allowed after kb_rdma_release too (the memory stays valid until
 * every lent buffer is back). */
void kb_rdma_recv_done(kb_rdma_conn *c, uint32_t buf);
/* Graceful: EOF after what was written, disconnect once all of it was received. */
void kb_rdma_close(kb_rdma_conn *c);
/* At once: disconnect, unsent data dropped (the peer sees ECONNRESET). */
void kb_rdma_abort(kb_rdma_conn *c);
/* The caller is done with c (no more events for it); a connection not closed is closed
 * gracefully, a listener stops listening. */
void kb_rdma_release(kb_rdma_conn *c);
/* Addresses in network byte order; rip/rport 0 for a listener.  0 or a negative errno. */
int kb_rdma_addrs(kb_rdma_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport);

/* Tests only: kb_rdma_connect with this private data instead of the hello (garbage, wrong
 * magic); and sending one frame whose header says length_field/flags, followed by n payload
 * bytes (a malformed frame: the peer must close the connection with EPROTO); with force,
 * even without a credit (the peer must notice the overrun, or its QP answer RNR). */
kb_rdma_conn *kb_rdma_test_connect_raw(kb_rdma *r, uint32_t ip, uint16_t port,
                                       const void *private_data, uint8_t len, int *err);
int kb_rdma_test_send_frame(kb_rdma_conn *c, uint32_t length_field, uint16_t flags,
                            const void *payload, uint32_t n, int force);

/* The functions the loop's RDMA datapath calls, as a table exported by the
 * kbloop_ext.rdma.verbs module in a PyCapsule (KB_RDMA_API_CAPSULE): the loop core includes
 * this header for the types and calls through the table, so it has no link-time dependency on
 * libibverbs or librdmacm and loads on machines without them. */
#define KB_RDMA_API_CAPSULE "kbloop_ext.rdma.verbs._C_API"
#define KB_RDMA_API_VERSION 4
typedef struct kb_rdma_api {
    int version;
    kb_rdma *(*create)(const kb_rdma_config *cfg, char *errbuf, size_t errlen);
    void (*destroy)(kb_rdma *r);
    int (*poll)(kb_rdma *r);
    void (*flush)(kb_rdma *r);
    uint32_t (*fds)(kb_rdma *r, int *fds, uint32_t max);
    int (*arm)(kb_rdma *r);
    kb_rdma_event *(*events)(kb_rdma *r, size_t *count);
    void (*events_clear)(kb_rdma *r);
    kb_rdma_conn *(*listen)(kb_rdma *r, uint32_t ip, uint16_t port, int backlog, int *err);
    kb_rdma_conn *(*connect)(kb_rdma *r, uint32_t ip, uint16_t port, int *err);
    long (*write)(kb_rdma_conn *c, const void *data, size_t len);
    size_t (*write_room)(kb_rdma_conn *c);
    int (*write_eof)(kb_rdma_conn *c);
    void (*recv_done)(kb_rdma_conn *c, uint32_t buf);
    void (*close)(kb_rdma_conn *c);
    void (*abort)(kb_rdma_conn *c);
    void (*release)(kb_rdma_conn *c);
    int (*addrs)(kb_rdma_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport);
    void (*get_stats)(kb_rdma *r, kb_rdma_stats *st);
    int (*reg_mem)(kb_rdma *r, const void *addr, size_t len);
    void (*unreg_mem)(kb_rdma *r, const void *addr);
    long (*write_ref)(kb_rdma_conn *c, const void *data, size_t len);
    void (*tick)(kb_rdma *r);
} kb_rdma_api;

extern const kb_rdma_api kb_rdma_api_table;

#endif
