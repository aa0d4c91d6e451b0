/* kbloop's RDMA datapath, device layer: see kb_rdma.h and docs/rdma.md ("Wire format"). */
#include "kb_rdma.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

/* ------------------------------------------------------------------ wire format */

#define HELLO_MAGIC 0x4B42524Du     /* "KBRM" */
#define HELLO_VERSION 1
#define HELLO_LEN 16
#define REJECT_LEN 8
#define HDR_LEN 12
#define F_EOF 1u
#define F_CREDIT 2u
#define F_KNOWN (F_EOF | F_CREDIT)
#define MIN_BUF 64
#define MAX_BUF (16u << 20)

static void put32(uint8_t *p, uint32_t v) { v = htonl(v); memcpy(p, &v, 4); }
static void put16(uint8_t *p, uint16_t v) { v = htons(v); memcpy(p, &v, 2); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return ntohl(v); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return ntohs(v); }

static void hello_pack(uint8_t *p, uint32_t credits, uint32_t buf_size)
{
    memset(p, 0, HELLO_LEN);
    put32(p, HELLO_MAGIC);
    p[4] = HELLO_VERSION;
    put32(p + 8, credits);
    put32(p + 12, buf_size);
}

/* 0, or the KB_RDMA_REJ_* reason the hello earns.  rdma_cm may pad private data (IB's CM
 * carries no length): only the first HELLO_LEN bytes count. */
static int hello_check(const void *data, size_t len, uint32_t *credits, uint32_t *buf_size)
{
    const uint8_t *p = data;
    if (p == NULL || len < HELLO_LEN || get32(p) != HELLO_MAGIC)
        return KB_RDMA_REJ_BAD_MAGIC;
    if (p[4] != HELLO_VERSION)
        return KB_RDMA_REJ_BAD_VERSION;
    *credits = get32(p + 8);
    *buf_size = get32(p + 12);
    /* Two credits at least: one is kept for returning credits. */
    if (*credits < 2 || *credits > 65535 || *buf_size < MIN_BUF || *buf_size > MAX_BUF)
        return KB_RDMA_REJ_BAD_PARAMS;
    return 0;
}

/* ------------------------------------------------------------------ state */

enum {
    ST_RESOLVING_ADDR = 1, ST_RESOLVING_ROUTE, ST_CONNECTING, ST_ACCEPTING, ST_ESTABLISHED,
    ST_DISCONNECTING, ST_DOWN, ST_LISTENING,
};
enum { RX_FREE = 0, RX_POSTED, RX_LENT };

/* A send-queue position covered by a signalled send: when it completes, every WR and send slot
 * before it has completed too (an RC send queue completes in order). */
typedef struct mark {
    uint64_t sq, slots, bytes;
} mark;

/* Memory of the caller's (kbloop's buffer pool) that frames may be sent from without a copy:
 * registered with every device's PD, the ones met later too. */
#define MAX_DEVS 8
typedef struct region {
    const uint8_t *addr;
    size_t len;
    struct ibv_mr *mr[MAX_DEVS];     /* by dev->idx */
} region;

typedef struct dev {
    struct dev *next;
    int idx;
    struct ibv_context *verbs;
    struct ibv_pd *pd;
    struct ibv_comp_channel *chan;
    struct ibv_cq *cq;
    int cq_size, cq_used, max_cqe;
    unsigned unacked;     /* completion events fetched, not yet acked */
    int armed;            /* notification requested: its event may be waiting on the fd */
} dev;

typedef struct conn {
    kb_rdma_conn pub;
    kb_rdma *r;
    struct rdma_cm_id *id;
    dev *dev;
    struct conn *listener;       /* an incoming one until established */
    struct conn *dirty_next;
    int state, err;
    int released, closing, ended, dirty, qp_alive, in_table;
    int eof_queued, eof_sent, eof_received, disconnect_called, waiting_credit;
    int pending_events, children;
    uint32_t slot, gen;
    /* memory: nrecv receive buffers, then nsend send slots, then sq_cap control headers */
    uint8_t *region;
    size_t region_len;
    struct ibv_mr *mr;
    uint32_t nrecv, nsend, sq_cap, buf_size, frame_max, inline_max, sig_every, thr;
    /* receive side */
    uint8_t *rx_state;
    uint32_t *rx_free;
    uint32_t nrx_free, rx_posted, rx_lent;
    uint32_t owed, owed_data, rx_seq;
    uint64_t granted, consumed;
    /* send side; the slot counters only grow (index = counter % nsend):
     * slot_done <= slot_post <= slot_tail */
    uint32_t credits, tx_seq, unsignalled;
    uint32_t *slot_len;
    uint16_t *slot_flags;
    const uint8_t **slot_ref;    /* a frame's payload in a registered region, not in the slot */
    uint32_t *slot_lkey;
    uint64_t slot_done, slot_post, slot_tail;
    uint64_t sq_posted, sq_done, bytes_posted, bytes_done;
    mark *marks;
    uint32_t mark_head, nmarks;
    uint64_t credit_waits, msgs_tx, msgs_rx;
    uint32_t peer_depth;         /* the peer's receive buffers: our credits never exceed it */
    int raw_priv_len;            /* test hook: connect with raw_priv instead of the hello */
    uint8_t raw_priv[56];
} conn;

struct kb_rdma {
    kb_rdma_config cfg;
    struct rdma_event_channel *ch;
    dev *devs;
    conn **table;
    uint32_t *gens;
    uint32_t table_cap, table_used;
    uint32_t *free_slots;
    uint32_t nfree_slots;
    kb_rdma_event *events;
    size_t nevents, cap_events;
    conn *dirty;
    uint64_t next_id;
    region *regions;
    uint32_t nregions, cap_regions;
    int ndevs;
    int backlog;            /* the last poll stopped at its limit, completions may be left */
    uint32_t cm_skip;       /* polls until the rdma_cm channel is read again */
    kb_rdma_stats st;
};

#define C(pc) ((conn *)(pc))

static void conn_fail(conn *c, int err);
static void conn_down(conn *c);
static void conn_maybe_free(conn *c);
static void flush_conn(conn *c);
static int post_receives(conn *c);
static void establish_passive(kb_rdma *r, conn *c);

/* ------------------------------------------------------------------ events */

static void push(kb_rdma *r, int kind, conn *c, conn *listener, int err, uint32_t len)
{
    if (r->nevents == r->cap_events) {
        size_t cap = r->cap_events ? r->cap_events * 2 : 256;
        kb_rdma_event *e = realloc(r->events, cap * sizeof *e);
        if (e == NULL)
            abort();    /* the connection's state already moved on: cannot be rolled back */
        r->events = e;
        r->cap_events = cap;
    }
    kb_rdma_event *e = &r->events[r->nevents++];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    e->err = err;
    e->len = len;
    e->conn = c ? &c->pub : NULL;
    e->listener = listener ? &listener->pub : NULL;
    if (c) c->pending_events++;
    if (listener) listener->pending_events++;
}

kb_rdma_event *kb_rdma_events(kb_rdma *r, size_t *count)
{
    *count = r->nevents;
    return r->events;
}

void kb_rdma_events_clear(kb_rdma *r)
{
    /* What is done here may queue new events (a repost that fails): they stay queued. */
    size_t n = r->nevents;
    for (size_t i = 0; i < n; i++) {
        kb_rdma_event e = r->events[i];      /* a copy: push() may move the array */
        conn *c = C(e.conn), *l = C(e.listener);
        if (e.kind == KB_RDMA_EV_RECV && e.data != NULL)     /* not taken: give it back */
            kb_rdma_recv_done(&c->pub, e.buf);
        /* An accepted connection nobody took (its listener was released): drop it. */
        if (e.kind == KB_RDMA_EV_ACCEPT && c->pub.owner == NULL && !c->released)
            kb_rdma_release(&c->pub);
        if (l) {
            l->pending_events--;
            conn_maybe_free(l);
        }
        if (c) {
            c->pending_events--;
            conn_maybe_free(c);
        }
    }
    memmove(r->events, r->events + n, (r->nevents - n) * sizeof *r->events);
    r->nevents -= n;
    kb_rdma_flush(r);
}

/* ------------------------------------------------------------------ connection table */

/* Work requests name their connection by table slot and generation (wr_id), so completions
 * still queued for a destroyed QP are recognised and dropped. */
#define WR_RECV (1ull << 13)
#define WR_IDX_MASK ((1ull << 13) - 1)
#define MAX_RECV_DEPTH 8192
#define MAX_SLOTS (1u << 18)

static uint64_t wr_id(conn *c, int recv, uint32_t idx)
{
    return ((uint64_t)c->gen << 32) | ((uint64_t)c->slot << 14) | (recv ? WR_RECV : 0) | idx;
}

static conn *wr_conn(kb_rdma *r, uint64_t id)
{
    uint32_t slot = (uint32_t)((id >> 14) & (MAX_SLOTS - 1));
    if (slot >= r->table_cap)
        return NULL;
    conn *c = r->table[slot];
    return c && c->gen == (uint32_t)(id >> 32) ? c : NULL;
}

static conn *conn_new(kb_rdma *r)
{
    if (r->nfree_slots == 0) {
        uint32_t cap = r->table_cap ? r->table_cap * 2 : 64;
        if (cap > MAX_SLOTS)
            return NULL;
        conn **t = realloc(r->table, cap * sizeof *t);
        if (t == NULL)
            return NULL;
        r->table = t;
        uint32_t *g = realloc(r->gens, cap * sizeof *g);
        if (g == NULL)
            return NULL;
        r->gens = g;
        uint32_t *f = realloc(r->free_slots, cap * sizeof *f);
        if (f == NULL)
            return NULL;
        r->free_slots = f;
        for (uint32_t i = cap; i > r->table_cap; i--) {
            r->table[i - 1] = NULL;
            r->gens[i - 1] = 0;
            r->free_slots[r->nfree_slots++] = i - 1;
        }
        r->table_cap = cap;
    }
    conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->r = r;
    c->slot = r->free_slots[--r->nfree_slots];
    c->gen = ++r->gens[c->slot];
    c->in_table = 1;
    r->table[c->slot] = c;
    c->pub.id = ++r->next_id;
    c->raw_priv_len = -1;
    r->cm_skip = 0;         /* its rdma_cm events are coming: look at every poll for now */
    r->st.conns++;
    return c;
}

/* ------------------------------------------------------------------ devices */

/* Local access only, as the connections' own regions: frames are sent from it, never read or
 * written by the peer.  A device that refuses leaves mr NULL: frames from it are copied. */
static void region_register(kb_rdma *r, region *g, dev *d)
{
    g->mr[d->idx] = ibv_reg_mr(d->pd, (void *)g->addr, g->len, IBV_ACCESS_LOCAL_WRITE);
    if (g->mr[d->idx])
        r->st.pool_mrs++;
}

static void region_unregister(kb_rdma *r, region *g)
{
    for (int i = 0; i < MAX_DEVS; i++)
        if (g->mr[i]) {
            ibv_dereg_mr(g->mr[i]);
            g->mr[i] = NULL;
            r->st.pool_mrs--;
        }
}

int kb_rdma_reg_mem(kb_rdma *r, const void *addr, size_t len)
{
    if (r->nregions == r->cap_regions) {
        uint32_t cap = r->cap_regions ? r->cap_regions * 2 : 16;
        region *g = realloc(r->regions, cap * sizeof *g);
        if (g == NULL)
            return -ENOMEM;
        r->regions = g;
        r->cap_regions = cap;
    }
    region *g = &r->regions[r->nregions++];
    memset(g, 0, sizeof *g);
    g->addr = addr;
    g->len = len;
    for (dev *d = r->devs; d; d = d->next)
        region_register(r, g, d);
    return 0;
}

void kb_rdma_unreg_mem(kb_rdma *r, const void *addr)
{
    for (uint32_t i = 0; i < r->nregions; i++)
        if (r->regions[i].addr == addr) {
            region_unregister(r, &r->regions[i]);
            r->regions[i] = r->regions[--r->nregions];
            return;
        }
}

/* The key of the registered memory holding [p, p + len) on d, 0 with none. */
static int region_lkey(kb_rdma *r, dev *d, const uint8_t *p, size_t len, uint32_t *lkey)
{
    for (uint32_t i = 0; i < r->nregions; i++) {
        region *g = &r->regions[i];
        if (p >= g->addr && p + len <= g->addr + g->len && g->mr[d->idx]) {
            *lkey = g->mr[d->idx]->lkey;
            return 1;
        }
    }
    return 0;
}

static dev *dev_get(kb_rdma *r, struct ibv_context *verbs)
{
    for (dev *d = r->devs; d; d = d->next)
        if (d->verbs == verbs)
            return d;
    if (r->ndevs >= MAX_DEVS)
        return NULL;
    dev *d = calloc(1, sizeof *d);
    if (d == NULL)
        return NULL;
    struct ibv_device_attr attr;
    d->verbs = verbs;
    d->max_cqe = ibv_query_device(verbs, &attr) == 0 ? attr.max_cqe : 4096;
    d->cq_size = d->max_cqe < 256 ? d->max_cqe : 256;     /* grown as QPs come */
    d->pd = ibv_alloc_pd(verbs);
    d->chan = d->pd ? ibv_create_comp_channel(verbs) : NULL;
    d->cq = d->chan ? ibv_create_cq(verbs, d->cq_size, d, d->chan, 0) : NULL;
    if (d->cq == NULL || fcntl(d->chan->fd, F_SETFL, fcntl(d->chan->fd, F_GETFL) | O_NONBLOCK) < 0
        || ibv_req_notify_cq(d->cq, 0) != 0) {
        if (d->cq) ibv_destroy_cq(d->cq);
        if (d->chan) ibv_destroy_comp_channel(d->chan);
        if (d->pd) ibv_dealloc_pd(d->pd);
        free(d);
        return NULL;
    }
    d->cq_size = d->cq->cqe;
    d->armed = 1;
    d->idx = r->ndevs++;
    for (uint32_t i = 0; i < r->nregions; i++)
        region_register(r, &r->regions[i], d);
    d->next = r->devs;
    r->devs = d;
    r->st.devices++;
    r->st.pds++;
    r->st.cqs++;
    r->st.fds_gen++;
    return d;
}

/* Room in the shared CQ for another QP's work requests (it must never overflow). */
static int dev_reserve(dev *d, int need)
{
    if (d->cq_used + need > d->cq_size) {
        int want = d->cq_size * 2;
        if (want < d->cq_used + need)
            want = d->cq_used + need;
        if (want > d->max_cqe || ibv_resize_cq(d->cq, want) != 0)
            return -ENOMEM;
        d->cq_size = d->cq->cqe;
    }
    d->cq_used += need;
    return 0;
}

static void dev_free(kb_rdma *r, dev *d)
{
    for (uint32_t i = 0; i < r->nregions; i++)
        if (r->regions[i].mr[d->idx]) {
            ibv_dereg_mr(r->regions[i].mr[d->idx]);
            r->regions[i].mr[d->idx] = NULL;
            r->st.pool_mrs--;
        }
    if (d->unacked)
        ibv_ack_cq_events(d->cq, d->unacked);
    ibv_destroy_cq(d->cq);
    ibv_destroy_comp_channel(d->chan);
    ibv_dealloc_pd(d->pd);
    free(d);
    r->st.devices--;
    r->st.pds--;
    r->st.cqs--;
    r->st.fds_gen++;
}

/* ------------------------------------------------------------------ connection resources */

/* The QP, the registered region, receives posted.  0 or a negative errno. */
static int conn_setup_qp(conn *c)
{
    kb_rdma *r = c->r;
    const kb_rdma_config *cfg = &r->cfg;
    c->dev = dev_get(r, c->id->verbs);
    if (c->dev == NULL)
        return -ENODEV;
    c->nrecv = cfg->recv_depth;
    c->nsend = cfg->send_depth;
    c->buf_size = cfg->buf_size;
    c->sq_cap = c->nsend + 8;       /* + credit-only messages between signalled sends */
    c->sig_every = c->sq_cap / 4 < 16 ? (c->sq_cap / 4 ? c->sq_cap / 4 : 1) : 16;
    c->thr = c->nrecv / 4 ? c->nrecv / 4 : 1;
    int need = (int)(c->nrecv + c->sq_cap);
    int err = dev_reserve(c->dev, need);
    if (err)
        return err;

    c->region_len = (size_t)(c->nrecv + c->nsend) * c->buf_size + (size_t)c->sq_cap * HDR_LEN;
    if (posix_memalign((void **)&c->region, 4096, c->region_len) != 0) {
        c->region = NULL;
        c->dev->cq_used -= need;
        return -ENOMEM;
    }
    c->rx_state = calloc(c->nrecv, 1);
    c->rx_free = calloc(c->nrecv, sizeof *c->rx_free);
    c->slot_len = calloc(c->nsend, sizeof *c->slot_len);
    c->slot_flags = calloc(c->nsend, sizeof *c->slot_flags);
    c->slot_ref = calloc(c->nsend, sizeof *c->slot_ref);
    c->slot_lkey = calloc(c->nsend, sizeof *c->slot_lkey);
    c->marks = calloc(c->sq_cap, sizeof *c->marks);
    if (!c->rx_state || !c->rx_free || !c->slot_len || !c->slot_flags || !c->slot_ref
        || !c->slot_lkey || !c->marks) {
        c->dev->cq_used -= need;
        return -ENOMEM;
    }
    /* Local access only: the peer never reads or writes our memory. */
    c->mr = ibv_reg_mr(c->dev->pd, c->region, c->region_len, IBV_ACCESS_LOCAL_WRITE);
    if (c->mr == NULL) {
        c->dev->cq_used -= need;
        return -errno ? -errno : -ENOMEM;
    }
    r->st.mrs++;

    struct ibv_qp_init_attr qa;
    memset(&qa, 0, sizeof qa);
    qa.send_cq = qa.recv_cq = c->dev->cq;
    qa.qp_type = IBV_QPT_RC;
    qa.sq_sig_all = 0;
    qa.cap.max_send_wr = c->sq_cap;
    qa.cap.max_recv_wr = c->nrecv;
    qa.cap.max_send_sge = 2;        /* a frame's header, and its payload in caller memory */
    qa.cap.max_recv_sge = 1;
    qa.cap.max_inline_data = cfg->inline_max;
    if (rdma_create_qp(c->id, c->dev->pd, &qa) != 0) {
        qa.cap.max_inline_data = 0;    /* a device without inline sends */
        if (rdma_create_qp(c->id, c->dev->pd, &qa) != 0) {
            c->dev->cq_used -= need;
            return errno ? -errno : -ENOMEM;
        }
    }
    c->qp_alive = 1;
    r->st.qps++;
    c->inline_max = qa.cap.max_inline_data;
    for (uint32_t i = 0; i < c->nrecv; i++)
        c->rx_free[c->nrx_free++] = i;
    int posted = post_receives(c);
    c->owed = 0;        /* the initial ones are granted by the hello, not by frames */
    c->owed_data = 0;
    c->granted = c->nrecv;
    return posted;
}

static void conn_release_memory(conn *c)
{
    if (c->mr) {
        ibv_dereg_mr(c->mr);
        c->mr = NULL;
        c->r->st.mrs--;
    }
    free(c->region);
    c->region = NULL;
}

static void conn_destroy_qp(conn *c)
{
    if (c->qp_alive) {
        rdma_destroy_qp(c->id);
        c->qp_alive = 0;
        c->r->st.qps--;
        c->dev->cq_used -= (int)(c->nrecv + c->sq_cap);
    }
}

/* The connection is over: QP and cm id destroyed; memory kept while buffers are lent. */
static void conn_down(conn *c)
{
    kb_rdma *r = c->r;
    if (c->state == ST_DOWN)
        return;
    c->state = ST_DOWN;
    conn_destroy_qp(c);
    r->st.rx_posted -= c->rx_posted;
    c->rx_posted = 0;
    if (c->rx_state)
        for (uint32_t i = 0; i < c->nrecv; i++)
            if (c->rx_state[i] == RX_POSTED)
                c->rx_state[i] = RX_FREE;
    c->nrx_free = 0;
    r->st.tx_slots_busy -= (uint32_t)(c->slot_tail - c->slot_done);
    r->st.credits_avail -= c->credits;
    c->credits = 0;
    c->slot_done = c->slot_post = c->slot_tail;
    if (c->id) {
        rdma_destroy_id(c->id);
        c->id = NULL;
        r->st.cm_ids--;
    }
    if (c->listener) {          /* never established */
        conn *l = c->listener;
        c->listener = NULL;
        l->children--;
        conn_maybe_free(l);
    }
    if (c->rx_lent == 0)
        conn_release_memory(c);
}

/* A connection's own allocations, once its memory region and QP are gone. */
static void conn_free(conn *c)
{
    free(c->rx_state);
    free(c->rx_free);
    free(c->slot_len);
    free(c->slot_flags);
    free(c->slot_ref);
    free(c->slot_lkey);
    free(c->marks);
    free(c);
}

static void conn_maybe_free(conn *c)
{
    if (!c->released || c->state != ST_DOWN || c->rx_lent || c->pending_events || c->children
        || c->dirty)
        return;
    kb_rdma *r = c->r;
    conn_release_memory(c);
    if (c->in_table) {
        r->table[c->slot] = NULL;
        r->free_slots[r->nfree_slots++] = c->slot;
    }
    r->st.conns--;
    conn_free(c);
}

static void mark_dirty(conn *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        c->dirty_next = c->r->dirty;
        c->r->dirty = c;
    }
}

/* The end of a connection's events: ERROR (err) or CLOSED (0); then disconnect. */
static void conn_end(conn *c, int err)
{
    if (c->ended)
        return;
    c->ended = 1;
    if (err) {
        c->err = err;
        c->r->st.errors++;
        if (err == EPROTO)
            c->r->st.eproto++;
    }
    if (!c->released)
        push(c->r, err ? KB_RDMA_EV_ERROR : KB_RDMA_EV_CLOSED, c, NULL, err, 0);
}

static void conn_disconnect(conn *c)
{
    if (c->disconnect_called || c->state == ST_DOWN)
        return;
    c->disconnect_called = 1;
    if (c->state == ST_ESTABLISHED)
        c->state = ST_DISCONNECTING;
    /* Moves the QP to the error state (its work requests flush) and sends a DREQ (or answers
     * the peer's); RDMA_CM_EVENT_DISCONNECTED follows. */
    if (rdma_disconnect(c->id) != 0)
        conn_down(c);
}

static void conn_fail(conn *c, int err)
{
    if (c->state == ST_DOWN)
        return;
    conn_end(c, err);
    if (c->state == ST_ESTABLISHED || c->state == ST_DISCONNECTING)
        conn_disconnect(c);
    else
        conn_down(c);       /* not connected yet: nothing to tell the peer */
}

/* ------------------------------------------------------------------ receive side */

/* Post the buffers given back; 0, or -EIO when the QP refused them. */
static int post_receives(conn *c)
{
    struct ibv_recv_wr wrs[64], *bad;
    struct ibv_sge sges[64];
    while (c->nrx_free && c->qp_alive) {
        uint32_t n = c->nrx_free < 64 ? c->nrx_free : 64;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t idx = c->rx_free[c->nrx_free - n + i];
            sges[i].addr = (uintptr_t)(c->region + (size_t)idx * c->buf_size);
            sges[i].length = c->buf_size;
            sges[i].lkey = c->mr->lkey;
            wrs[i].wr_id = wr_id(c, 1, idx);
            wrs[i].sg_list = &sges[i];
            wrs[i].num_sge = 1;
            wrs[i].next = i + 1 < n ? &wrs[i + 1] : NULL;
        }
        if (ibv_post_recv(c->id->qp, wrs, &bad) != 0)
            return -EIO;
        for (uint32_t i = 0; i < n; i++)
            c->rx_state[c->rx_free[c->nrx_free - n + i]] = RX_POSTED;
        c->nrx_free -= n;
        c->rx_posted += n;
        c->owed += n;
        c->r->st.rx_posted += n;
        c->r->st.recv_posts++;
    }
    return 0;
}

void kb_rdma_recv_done(kb_rdma_conn *pc, uint32_t buf)
{
    conn *c = C(pc);
    if (buf >= c->nrecv || c->rx_state == NULL || c->rx_state[buf] != RX_LENT)
        return;
    c->rx_state[buf] = RX_FREE;
    c->rx_lent--;
    c->r->st.rx_lent--;
    if (c->state == ST_DOWN) {
        if (c->rx_lent == 0) {
            conn_release_memory(c);
            conn_maybe_free(c);
        }
        return;
    }
    c->rx_free[c->nrx_free++] = buf;
    c->owed_data++;
    /* Reposted in batches: at once when a batch is ready, else at the next poll/flush. */
    if (c->nrx_free >= c->thr)
        flush_conn(c);
    else
        mark_dirty(c);
}

/* A receive completed: check the frame, take its credits, lend its payload. */
static void on_recv(conn *c, uint32_t idx, uint32_t byte_len)
{
    kb_rdma *r = c->r;
    c->rx_state[idx] = RX_FREE;
    c->rx_posted--;
    r->st.rx_posted--;
    /* The active side may send as soon as it has our accept, before rdma_cm tells us the
     * connection is established: its first frame establishes it (IB's "communication
     * established" event). */
    if (c->state == ST_ACCEPTING && !c->ended)
        establish_passive(r, c);
    if (c->ended || c->state != ST_ESTABLISHED)
        return;             /* closing with an error or gone: the data has nowhere to go */
    const uint8_t *p = c->region + (size_t)idx * c->buf_size;
    c->consumed++;
    if (byte_len < HDR_LEN) {
        conn_fail(c, EPROTO);
        return;
    }
    uint32_t len = get32(p);
    uint16_t credits = get16(p + 4), flags = get16(p + 6);
    uint32_t seq = get32(p + 8);
    /* The frame must be exactly what arrived, be in sequence, use a credit we granted, and
     * make sense: a credit-only frame has no payload, nothing follows EOF but credits. */
    if ((uint64_t)len + HDR_LEN != byte_len || seq != c->rx_seq || c->consumed > c->granted
        || (flags & ~F_KNOWN) || ((flags & F_CREDIT) && (len || (flags & F_EOF)))
        || (!(flags & F_CREDIT) && len == 0 && !(flags & F_EOF))
        || (c->eof_received && !(flags & F_CREDIT))) {
        conn_fail(c, EPROTO);
        return;
    }
    c->rx_seq++;
    c->msgs_rx++;
    r->st.msgs_rx++;
    if ((uint64_t)c->credits + credits > c->peer_depth) {   /* more than it has buffers */
        conn_fail(c, EPROTO);
        return;
    }
    c->credits += credits;
    r->st.credits_avail += credits;
    if (flags & F_CREDIT)
        r->st.credit_msgs_rx++;
    if (len) {
        c->rx_state[idx] = RX_LENT;
        c->rx_lent++;
        r->st.rx_lent++;
        r->st.bytes_rx += len;
        if (!c->released) {
            push(r, KB_RDMA_EV_RECV, c, NULL, 0, len);
            r->events[r->nevents - 1].buf = idx;
            r->events[r->nevents - 1].data = p + HDR_LEN;
        } else {
            kb_rdma_recv_done(&c->pub, idx);
        }
    } else {
        c->rx_free[c->nrx_free++] = idx;    /* nothing to lend: repost with the next batch */
    }
    if (flags & F_EOF) {
        c->eof_received = 1;
        if (!c->released)
            push(r, KB_RDMA_EV_EOF, c, NULL, 0, 0);
    }
    mark_dirty(c);
}

/* ------------------------------------------------------------------ send side */

static int sq_full(conn *c)
{
    return c->sq_posted - c->sq_done >= c->sq_cap;
}

static uint16_t take_owed(conn *c)
{
    uint32_t n = c->owed < 65535 ? c->owed : 65535;
    c->owed -= n;
    c->granted += n;
    if (c->owed == 0)
        c->owed_data = 0;
    return (uint16_t)n;
}

/* Post one SEND gathered from nsge pieces (len bytes in all); signalled sends record what they
 * cover. */
static int post_send_sg(conn *c, struct ibv_sge *sge, int nsge, uint32_t len, int signal)
{
    kb_rdma *r = c->r;
    struct ibv_send_wr wr, *bad;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id(c, 0, 0);
    wr.sg_list = sge;
    wr.num_sge = nsge;
    wr.opcode = IBV_WR_SEND;
    if (c->unsignalled + 1 >= c->sig_every)
        signal = 1;
    if (signal)
        wr.send_flags |= IBV_SEND_SIGNALED;
    if (len <= c->inline_max) {
        wr.send_flags |= IBV_SEND_INLINE;
        r->st.sends_inline++;
    }
    if (ibv_post_send(c->id->qp, &wr, &bad) != 0)
        return -EIO;
    c->sq_posted++;
    r->st.sends++;
    if (signal) {
        c->unsignalled = 0;
        r->st.sends_signalled++;
        return 1;
    }
    c->unsignalled++;
    return 0;
}

static int post_send(conn *c, void *addr, uint32_t len, int signal)
{
    struct ibv_sge sge = {.addr = (uintptr_t)addr, .length = len, .lkey = c->mr->lkey};
    return post_send_sg(c, &sge, 1, len, signal);
}

static void push_mark(conn *c)
{
    mark *m = &c->marks[(c->mark_head + c->nmarks) % c->sq_cap];
    m->sq = c->sq_posted;
    m->slots = c->slot_post;
    m->bytes = c->bytes_posted;
    c->nmarks++;
}

/* Post queued frames while the peer has credits (one kept for credit returns). */
static void flush_sends(conn *c)
{
    kb_rdma *r = c->r;
    while (c->slot_post < c->slot_tail && !sq_full(c)) {
        if (c->credits < 2) {
            if (!c->waiting_credit) {
                c->waiting_credit = 1;
                c->credit_waits++;
                r->st.credit_waits++;
            }
            return;
        }
        c->waiting_credit = 0;
        uint32_t idx = (uint32_t)(c->slot_post % c->nsend);
        uint8_t *f = c->region + (size_t)(c->nrecv + idx) * c->buf_size;
        uint32_t len = c->slot_len[idx];
        put32(f, len);
        put16(f + 4, take_owed(c));
        put16(f + 6, c->slot_flags[idx]);
        put32(f + 8, c->tx_seq);
        /* The last frame of a burst is signalled so its slots come back soon. */
        int last = c->slot_post + 1 == c->slot_tail;
        int sig;
        if (c->slot_ref[idx]) {         /* the header here, the payload where the caller has it */
            struct ibv_sge sge[2] = {
                {.addr = (uintptr_t)f, .length = HDR_LEN, .lkey = c->mr->lkey},
                {.addr = (uintptr_t)c->slot_ref[idx], .length = len, .lkey = c->slot_lkey[idx]},
            };
            sig = post_send_sg(c, sge, len ? 2 : 1, HDR_LEN + len, last);
        } else {
            sig = post_send(c, f, HDR_LEN + len, last);
        }
        if (sig < 0) {
            conn_fail(c, EIO);
            return;
        }
        c->tx_seq++;
        c->credits--;
        r->st.credits_avail--;
        c->slot_post++;
        c->bytes_posted += len;
        c->msgs_tx++;
        r->st.msgs_tx++;
        if (c->slot_flags[idx] & F_EOF)
            c->eof_sent = 1;
        if (sig)
            push_mark(c);
    }
}

/* Return credits in a frame of their own when the peer needs them: many are owed, or the
 * peer is nearly out and the application gave buffers back.  Never a reply to a credit-only
 * frame alone (owed_data), so two idle peers do not trade credits for ever. */
static void maybe_send_credits(conn *c)
{
    if (c->owed == 0 || c->credits < 1 || sq_full(c) || c->state != ST_ESTABLISHED || c->ended)
        return;
    uint64_t peer_left = c->granted - c->consumed;
    if (c->owed < c->thr && !(c->owed_data && peer_left < 2))
        return;
    uint8_t *h = c->region + (size_t)(c->nrecv + c->nsend) * c->buf_size
                 + (size_t)(c->sq_posted % c->sq_cap) * HDR_LEN;
    put32(h, 0);
    put16(h + 4, take_owed(c));
    put16(h + 6, F_CREDIT);
    put32(h + 8, c->tx_seq);
    /* Unsignalled (its control header is reused only after sq_cap later sends, which the
     * signalled ones cover); post_send signals it when sig_every calls for it. */
    int sig = post_send(c, h, HDR_LEN, 0);
    if (sig < 0) {
        conn_fail(c, EIO);
        return;
    }
    c->tx_seq++;
    c->credits--;
    c->r->st.credits_avail--;
    c->msgs_tx++;
    c->r->st.msgs_tx++;
    c->r->st.credit_msgs_tx++;
    if (sig)
        push_mark(c);
}

/* A graceful close disconnects once EOF went out and every frame completed. */
static void maybe_finish_close(conn *c)
{
    if (c->closing && c->state == ST_ESTABLISHED && !c->ended && c->eof_sent
        && c->slot_done == c->slot_tail)
        conn_disconnect(c);
}

static void flush_conn(conn *c)
{
    if (c->state != ST_ESTABLISHED || c->ended)
        return;
    if (post_receives(c) != 0) {
        conn_fail(c, EIO);
        return;
    }
    flush_sends(c);
    if (c->ended)
        return;
    maybe_send_credits(c);
    maybe_finish_close(c);
}

static void on_send_done(conn *c)
{
    kb_rdma *r = c->r;
    if (c->nmarks == 0 || c->state == ST_DOWN)
        return;
    mark *m = &c->marks[c->mark_head];
    c->mark_head = (c->mark_head + 1) % c->sq_cap;
    c->nmarks--;
    c->sq_done = m->sq;
    uint64_t freed = m->slots - c->slot_done;
    uint32_t bytes = (uint32_t)(m->bytes - c->bytes_done);
    c->slot_done = m->slots;
    c->bytes_done = m->bytes;
    r->st.tx_slots_busy -= (uint32_t)freed;
    r->st.bytes_tx += bytes;
    if (bytes && !c->released && !c->ended)
        push(r, KB_RDMA_EV_SENT, c, NULL, 0, bytes);
    mark_dirty(c);
}

/* Whether c takes writes now: 0, or the negative errno a write returns. */
static int write_refused(conn *c)
{
    if (c->ended)
        return c->err ? -c->err : -EPIPE;
    if (c->pub.listening)
        return -EINVAL;
    if (c->state != ST_ESTABLISHED)
        return c->state == ST_DOWN || c->state == ST_DISCONNECTING ? -EPIPE : -ENOTCONN;
    if (c->eof_queued || c->closing)
        return -EPIPE;
    return 0;
}

/* Liveness probe: a zero-length RDMA WRITE takes no receive buffer, no credit and no memory key
 * at the peer, but the peer's adapter must acknowledge it, so a peer that is gone makes its
 * retries run out (ETIMEDOUT) even on a connection with nothing else in flight: one waiting
 * for credits that will never come, or an idle one.  (RC responders accept zero-length
 * writes without checking a key; rdma_cm enables remote write on its QPs.) */
static void probe(conn *c)
{
    struct ibv_send_wr wr, *bad;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id(c, 0, 0);
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.num_sge = 0;
    wr.send_flags = IBV_SEND_SIGNALED;
    if (ibv_post_send(c->id->qp, &wr, &bad) != 0) {
        conn_fail(c, EIO);
        return;
    }
    c->sq_posted++;
    c->unsignalled = 0;
    c->r->st.probes++;
    push_mark(c);
}

void kb_rdma_tick(kb_rdma *r)
{
    for (uint32_t i = 0; i < r->table_cap; i++) {
        conn *c = r->table[i];
        /* No signalled send outstanding (those are retried, and tell, on their own); the
         * unsignalled ones since are covered by the probe's completion. */
        if (c && !c->pub.listening && c->state == ST_ESTABLISHED && !c->ended && c->qp_alive
            && c->nmarks == 0 && !sq_full(c))
            probe(c);
    }
}

long kb_rdma_write(kb_rdma_conn *pc, const void *data, size_t len)
{
    conn *c = C(pc);
    int refused = write_refused(c);
    if (refused)
        return refused;
    uint32_t room = c->frame_max - HDR_LEN;
    const uint8_t *src = data;
    size_t taken = 0;
    /* Small writes waiting for credits share a frame (not one sent from caller memory). */
    if (c->slot_tail > c->slot_post && !c->slot_ref[(c->slot_tail - 1) % c->nsend]) {
        uint32_t idx = (uint32_t)((c->slot_tail - 1) % c->nsend);
        uint32_t n = room - c->slot_len[idx];
        if (n > len)
            n = (uint32_t)len;
        memcpy(c->region + (size_t)(c->nrecv + idx) * c->buf_size + HDR_LEN + c->slot_len[idx],
               src, n);
        c->slot_len[idx] += n;
        taken = n;
    }
    while (taken < len && c->slot_tail - c->slot_done < c->nsend) {
        uint32_t idx = (uint32_t)(c->slot_tail % c->nsend);
        uint32_t n = len - taken < room ? (uint32_t)(len - taken) : room;
        memcpy(c->region + (size_t)(c->nrecv + idx) * c->buf_size + HDR_LEN, src + taken, n);
        c->slot_len[idx] = n;
        c->slot_flags[idx] = 0;
        c->slot_ref[idx] = NULL;
        c->slot_tail++;
        c->r->st.tx_slots_busy++;
        taken += n;
    }
    flush_sends(c);
    return (long)taken;
}

long kb_rdma_write_ref(kb_rdma_conn *pc, const void *data, size_t len)
{
    conn *c = C(pc);
    int refused = write_refused(c);
    if (refused)
        return refused;
    uint32_t lkey;
    if (!region_lkey(c->r, c->dev, data, len, &lkey))
        return -EFAULT;
    uint32_t room = c->frame_max - HDR_LEN;
    const uint8_t *src = data;
    size_t taken = 0;
    while (taken < len && c->slot_tail - c->slot_done < c->nsend) {
        uint32_t idx = (uint32_t)(c->slot_tail % c->nsend);
        uint32_t n = len - taken < room ? (uint32_t)(len - taken) : room;
        c->slot_len[idx] = n;
        c->slot_flags[idx] = 0;
        c->slot_ref[idx] = src + taken;
        c->slot_lkey[idx] = lkey;
        c->slot_tail++;
        c->r->st.tx_slots_busy++;
        c->r->st.ref_frames++;
        taken += n;
    }
    flush_sends(c);
    return (long)taken;
}

size_t kb_rdma_write_room(kb_rdma_conn *pc)
{
    conn *c = C(pc);
    if (c->state != ST_ESTABLISHED || c->ended || c->eof_queued || c->closing)
        return 0;
    size_t room = (size_t)(c->nsend - (c->slot_tail - c->slot_done)) * (c->frame_max - HDR_LEN);
    if (c->slot_tail > c->slot_post && !c->slot_ref[(c->slot_tail - 1) % c->nsend])
        room += c->frame_max - HDR_LEN - c->slot_len[(c->slot_tail - 1) % c->nsend];
    return room;
}

int kb_rdma_write_eof(kb_rdma_conn *pc)
{
    conn *c = C(pc);
    if (c->ended)
        return c->err ? -c->err : -EPIPE;
    if (c->state != ST_ESTABLISHED)
        return -ENOTCONN;
    if (c->eof_queued)
        return 0;
    if (c->slot_tail > c->slot_post) {          /* on the last queued frame */
        c->slot_flags[(c->slot_tail - 1) % c->nsend] |= F_EOF;
    } else {
        if (c->slot_tail - c->slot_done >= c->nsend)
            return -EAGAIN;     /* cannot happen: a slot is free whenever none is queued */
        uint32_t idx = (uint32_t)(c->slot_tail % c->nsend);
        c->slot_len[idx] = 0;
        c->slot_flags[idx] = F_EOF;
        c->slot_ref[idx] = NULL;
        c->slot_tail++;
        c->r->st.tx_slots_busy++;
    }
    c->eof_queued = 1;
    flush_sends(c);
    return 0;
}

/* ------------------------------------------------------------------ completions */

static int errno_of_wc(enum ibv_wc_status s)
{
    switch (s) {
    case IBV_WC_RETRY_EXC_ERR: return ETIMEDOUT;
    case IBV_WC_RNR_RETRY_EXC_ERR: return EPROTO;   /* a credit bug, ours or the peer's */
    case IBV_WC_REM_ACCESS_ERR:
    case IBV_WC_REM_OP_ERR:
    case IBV_WC_REM_INV_REQ_ERR:
    case IBV_WC_REM_ABORT_ERR: return ECONNRESET;
    case IBV_WC_LOC_LEN_ERR: return EPROTO;         /* the peer sent more than a buffer */
    default: return EIO;
    }
}

static void on_wc(kb_rdma *r, struct ibv_wc *wc)
{
    conn *c = wr_conn(r, wc->wr_id);
    if (c == NULL || !c->qp_alive)
        return;             /* from a QP destroyed since */
    int recv = (wc->wr_id & WR_RECV) != 0;
    if (wc->status != IBV_WC_SUCCESS) {
        if (recv) {
            uint32_t idx = (uint32_t)(wc->wr_id & WR_IDX_MASK);
            if (idx < c->nrecv && c->rx_state[idx] == RX_POSTED) {
                c->rx_state[idx] = RX_FREE;
                c->rx_posted--;
                r->st.rx_posted--;
            }
        }
        /* Flushes follow a disconnect (rdma_cm's DISCONNECTED says how it ended) or a first
         * error that was reported already. */
        if (wc->status == IBV_WC_WR_FLUSH_ERR)
            return;
        r->st.wc_errors++;
        /* A receive that failed (too long for the buffer: rxe reports it in several ways) is
         * the peer breaking the wire format. */
        conn_fail(c, recv ? EPROTO : errno_of_wc(wc->status));
        return;
    }
    if (recv) {
        uint32_t idx = (uint32_t)(wc->wr_id & WR_IDX_MASK);
        if (idx < c->nrecv && c->rx_state[idx] == RX_POSTED)
            on_recv(c, idx, wc->byte_len);
    } else {
        on_send_done(c);
    }
}

#define POLL_BATCH 32
#define CM_POLL_EVERY 64
#define POLL_BATCHES 16

static int poll_cq(kb_rdma *r, dev *d, int max_batches)
{
    struct ibv_wc wc[POLL_BATCH];
    int total = 0;
    for (int b = 0; b < max_batches; b++) {
        int n = ibv_poll_cq(d->cq, POLL_BATCH, wc);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++)
            on_wc(r, &wc[i]);
        total += n;
        if (n < POLL_BATCH)
            break;
    }
    return total;
}

/* ------------------------------------------------------------------ rdma_cm */

static void fill_conn_param(struct rdma_conn_param *p, const void *priv, uint8_t len, uint8_t retry)
{
    memset(p, 0, sizeof *p);
    p->private_data = priv;
    p->private_data_len = len;
    p->responder_resources = 0;     /* no RDMA reads: two-sided only */
    p->initiator_depth = 0;
    p->retry_count = retry;
    p->rnr_retry_count = 0;         /* credits make RNR impossible; never retry it */
}

static void on_connect_request(kb_rdma *r, struct rdma_cm_id *id, conn *l,
                               const void *priv, uint8_t priv_len)
{
    uint32_t credits = 0, buf_size = 0;
    int reason = l->state == ST_LISTENING && !l->released
                 ? hello_check(priv, priv_len, &credits, &buf_size) : KB_RDMA_REJ_NO_RESOURCES;
    conn *c = NULL;
    if (reason == 0) {
        c = conn_new(r);
        if (c == NULL)
            reason = KB_RDMA_REJ_NO_RESOURCES;
    }
    if (c) {
        c->id = id;
        id->context = c;
        r->st.cm_ids++;
        c->state = ST_ACCEPTING;
        c->released = 1;        /* nobody's until ACCEPT is taken */
        c->listener = l;
        l->children++;
        c->credits = c->peer_depth = credits;
        r->st.credits_avail += credits;
        c->frame_max = buf_size < r->cfg.buf_size ? buf_size : r->cfg.buf_size;
        uint8_t hello[HELLO_LEN];
        struct rdma_conn_param param;
        if (conn_setup_qp(c) == 0) {
            hello_pack(hello, c->nrecv, c->buf_size);
            fill_conn_param(&param, hello, HELLO_LEN, r->cfg.retry_count);
            if (rdma_accept(id, &param) == 0)
                return;         /* ESTABLISHED (or CONNECT_ERROR) follows */
        }
        reason = KB_RDMA_REJ_NO_RESOURCES;
        conn_destroy_qp(c);
        c->id = NULL;           /* rejected and destroyed below, not by conn_down */
        r->st.cm_ids--;
        conn_down(c);
        conn_maybe_free(c);
    }
    uint8_t rej[REJECT_LEN] = {0};
    put32(rej, HELLO_MAGIC);
    rej[4] = HELLO_VERSION;
    rej[5] = (uint8_t)reason;
    rdma_reject(id, rej, REJECT_LEN);
    rdma_destroy_id(id);
    r->st.rejects++;
    if (!l->released)
        push(r, KB_RDMA_EV_REJECT, NULL, l, reason, 0);
}

static void establish_passive(kb_rdma *r, conn *c)
{
    conn *l = c->listener;
    c->listener = NULL;
    c->state = ST_ESTABLISHED;
    r->st.accepts++;
    if (l->released || l->state != ST_LISTENING) {
        c->ended = 1;
        conn_disconnect(c);         /* its listener is gone */
    } else {
        c->released = 0;            /* the ACCEPT event hands it over */
        push(r, KB_RDMA_EV_ACCEPT, c, l, 0, 0);
    }
    l->children--;
    conn_maybe_free(l);
    mark_dirty(c);
}

static void on_established(kb_rdma *r, conn *c, const void *priv, uint8_t priv_len)
{
    if (c->state == ST_ACCEPTING) {
        establish_passive(r, c);
        return;
    }
    if (c->state != ST_CONNECTING)
        return;
    uint32_t credits, buf_size;
    c->state = ST_ESTABLISHED;
    r->st.connects++;
    if (hello_check(priv, priv_len, &credits, &buf_size) != 0) {
        conn_fail(c, EPROTO);
        return;
    }
    c->credits = c->peer_depth = credits;
    r->st.credits_avail += credits;
    c->frame_max = buf_size < c->buf_size ? buf_size : c->buf_size;
    if (!c->released)
        push(r, KB_RDMA_EV_CONNECTED, c, NULL, 0, 0);
    mark_dirty(c);
}

static void on_disconnected(kb_rdma *r, conn *c)
{
    if (c->state == ST_DOWN)
        return;
    /* Frames that completed before the peer's DREQ are in the CQ: take them first. */
    if (c->dev)
        poll_cq(r, c->dev, 1 << 20);
    if (c->state == ST_DOWN)
        return;
    if (!c->ended) {
        /* Orderly only if the peer ended its stream and all we wrote got through. */
        int lost = c->slot_done != c->slot_tail;
        conn_end(c, (c->eof_received || c->closing) && !lost ? 0 : ECONNRESET);
    }
    if (!c->disconnect_called) {
        c->disconnect_called = 1;
        rdma_disconnect(c->id);     /* answer the DREQ, QP to error */
    }
    conn_down(c);
    conn_maybe_free(c);
}

static void on_cm_event(kb_rdma *r, struct rdma_cm_event *ev)
{
    struct rdma_cm_id *id = ev->id;
    int status = ev->status;
    enum rdma_cm_event_type type = ev->event;
    uint8_t priv[256];
    uint8_t priv_len = ev->param.conn.private_data_len;
    if (ev->param.conn.private_data && priv_len)
        memcpy(priv, ev->param.conn.private_data, priv_len);
    else
        priv_len = 0;
    conn *l = ev->listen_id ? ev->listen_id->context : NULL;
    r->st.cm_events++;
    rdma_ack_cm_event(ev);      /* copied what we need: ids may be destroyed below */

    if (type == RDMA_CM_EVENT_CONNECT_REQUEST) {
        if (l == NULL) {
            rdma_reject(id, NULL, 0);
            rdma_destroy_id(id);
            return;
        }
        on_connect_request(r, id, l, priv, priv_len);
        return;
    }
    conn *c = id->context;
    if (c == NULL || c->state == ST_DOWN)
        return;
    switch (type) {
    case RDMA_CM_EVENT_ADDR_RESOLVED:
        if (c->state != ST_RESOLVING_ADDR)
            break;
        c->state = ST_RESOLVING_ROUTE;
        if (rdma_resolve_route(id, (int)r->cfg.timeout_ms) != 0)
            conn_fail(c, errno ? errno : EHOSTUNREACH);
        break;
    case RDMA_CM_EVENT_ROUTE_RESOLVED: {
        if (c->state != ST_RESOLVING_ROUTE)
            break;
        int err = conn_setup_qp(c);
        if (err) {
            conn_fail(c, -err);
            break;
        }
        uint8_t hello[HELLO_LEN];
        struct rdma_conn_param param;
        hello_pack(hello, c->nrecv, c->buf_size);
        if (c->raw_priv_len >= 0)
            fill_conn_param(&param, c->raw_priv, (uint8_t)c->raw_priv_len, r->cfg.retry_count);
        else
            fill_conn_param(&param, hello, HELLO_LEN, r->cfg.retry_count);
        c->state = ST_CONNECTING;
        if (rdma_connect(id, &param) != 0)
            conn_fail(c, errno ? errno : ECONNREFUSED);
        break;
    }
    case RDMA_CM_EVENT_ESTABLISHED:
        on_established(r, c, priv, priv_len);
        break;
    case RDMA_CM_EVENT_ADDR_ERROR:
    case RDMA_CM_EVENT_ROUTE_ERROR:
        conn_fail(c, status < 0 ? -status : EHOSTUNREACH);
        break;
    case RDMA_CM_EVENT_REJECTED: {
        /* Our own reject carries a reason; rdma_cm's (no listener: status 8, invalid
         * service id) does not. */
        uint32_t reason = priv_len >= REJECT_LEN && get32(priv) == HELLO_MAGIC ? priv[5] : 0;
        if (c->state == ST_ACCEPTING) {     /* the active side gave up on our accept */
            conn_down(c);
            conn_maybe_free(c);
            break;
        }
        conn_end(c, ECONNREFUSED);
        if (r->nevents && C(r->events[r->nevents - 1].conn) == c)
            r->events[r->nevents - 1].len = reason;
        conn_down(c);
        conn_maybe_free(c);
        break;
    }
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_CONNECT_ERROR:
        if (c->state == ST_ACCEPTING) {
            conn_down(c);
            conn_maybe_free(c);
            break;
        }
        conn_end(c, ECONNREFUSED);
        conn_down(c);
        conn_maybe_free(c);
        break;
    case RDMA_CM_EVENT_DISCONNECTED:
        on_disconnected(r, c);
        break;
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
        conn_end(c, ENODEV);
        conn_down(c);
        conn_maybe_free(c);
        break;
    default:    /* TIMEWAIT_EXIT, ADDR_CHANGE, ...: nothing to do */
        break;
    }
}

/* ------------------------------------------------------------------ the stack */

kb_rdma *kb_rdma_new(const kb_rdma_config *cfg, char *errbuf, size_t errlen)
{
    kb_rdma *r = calloc(1, sizeof *r);
    if (r == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    if (cfg)
        r->cfg = *cfg;
    if (!r->cfg.buf_size) r->cfg.buf_size = 8192;
    if (!r->cfg.recv_depth) r->cfg.recv_depth = 32;
    if (!r->cfg.send_depth) r->cfg.send_depth = 32;
    if (!r->cfg.retry_count) r->cfg.retry_count = 6;
    if (!r->cfg.timeout_ms) r->cfg.timeout_ms = 2000;
    if (r->cfg.buf_size < MIN_BUF || r->cfg.buf_size > MAX_BUF || r->cfg.recv_depth < 4
        || r->cfg.recv_depth > MAX_RECV_DEPTH || r->cfg.send_depth < 2
        || r->cfg.send_depth > 16384 || r->cfg.retry_count > 6) {
        snprintf(errbuf, errlen, "bad configuration: buf_size %u..%u, recv_depth 4..%u, "
                 "send_depth 2..16384, retry_count 0..6", MIN_BUF, MAX_BUF, MAX_RECV_DEPTH);
        free(r);
        return NULL;
    }
    r->ch = rdma_create_event_channel();
    if (r->ch == NULL || fcntl(r->ch->fd, F_SETFL, fcntl(r->ch->fd, F_GETFL) | O_NONBLOCK) < 0) {
        snprintf(errbuf, errlen, "rdma_create_event_channel: %s", strerror(errno));
        if (r->ch)
            rdma_destroy_event_channel(r->ch);
        free(r);
        return NULL;
    }
    r->st.fds_gen = 1;
    return r;
}

void kb_rdma_free(kb_rdma *r)
{
    if (r == NULL)
        return;
    r->nevents = 0;
    for (uint32_t i = 0; i < r->table_cap; i++) {
        conn *c = r->table[i];
        if (c == NULL)
            continue;
        if (c->state != ST_DOWN && c->id && !c->disconnect_called && c->qp_alive)
            rdma_disconnect(c->id);
        c->listener = NULL;
        conn_down(c);
        conn_release_memory(c);
        conn_free(c);
    }
    for (uint32_t i = 0; i < r->nregions; i++)
        region_unregister(r, &r->regions[i]);
    free(r->regions);
    while (r->devs) {
        dev *d = r->devs;
        r->devs = d->next;
        dev_free(r, d);
    }
    rdma_destroy_event_channel(r->ch);
    free(r->table);
    free(r->gens);
    free(r->free_slots);
    free(r->events);
    free(r);
}

void kb_rdma_flush(kb_rdma *r)
{
    while (r->dirty) {
        conn *c = r->dirty;
        r->dirty = c->dirty_next;
        c->dirty = 0;
        flush_conn(c);
        conn_maybe_free(c);
    }
}

int kb_rdma_poll(kb_rdma *r)
{
    r->st.polls++;
    r->backlog = 0;
    for (dev *d = r->devs; d; d = d->next) {
        struct ibv_cq *cq;
        void *ctx;
        /* Armed: take the notification once it came, so that the fd is quiet until the next
         * arm.  Busy polling does not arm: no syscall here then. */
        if (d->armed) {
            while (ibv_get_cq_event(d->chan, &cq, &ctx) == 0)
                d->unacked++;
            if (d->unacked) {
                ibv_ack_cq_events(d->cq, d->unacked);
                d->unacked = 0;
                d->armed = 0;
            }
        }
        if (poll_cq(r, d, POLL_BATCHES) == POLL_BATCHES * POLL_BATCH)
            r->backlog = 1;     /* completions may be left: a sleeper must poll again */
    }
    /* Reading the rdma_cm channel is a system call: a busy poller looks at it every
     * CM_POLL_EVERY polls; the first poll after an arm (a sleeper just woken, maybe by that
     * channel) and after a listen or connect always looks. */
    if (r->cm_skip == 0) {
        struct rdma_cm_event *ev;
        int n = 0;
        while (n < 64 && rdma_get_cm_event(r->ch, &ev) == 0) {
            on_cm_event(r, ev);
            n++;
        }
        /* Busy with connections: keep looking at every poll. */
        r->cm_skip = n ? 0 : CM_POLL_EVERY;
    } else {
        r->cm_skip--;
    }
    kb_rdma_flush(r);
    return (int)r->nevents;
}

uint32_t kb_rdma_fds(kb_rdma *r, int *fds, uint32_t max)
{
    uint32_t n = 0;
    if (n < max)
        fds[n++] = r->ch->fd;
    for (dev *d = r->devs; d && n < max; d = d->next)
        fds[n++] = d->chan->fd;
    return n;
}

int kb_rdma_arm(kb_rdma *r)
{
    kb_rdma_flush(r);
    r->cm_skip = 0;
    int again = r->backlog;
    for (dev *d = r->devs; d; d = d->next)
        if (!d->armed) {
            if (ibv_req_notify_cq(d->cq, 0) == 0)
                d->armed = 1;
            again = 1;
        }
    return again;
}

void kb_rdma_get_stats(kb_rdma *r, kb_rdma_stats *st)
{
    *st = r->st;
    st->cq_entries = 0;
    for (dev *d = r->devs; d; d = d->next)
        st->cq_entries += (uint32_t)d->cq_size;
    st->listeners = 0;
    for (uint32_t i = 0; i < r->table_cap; i++)
        if (r->table[i] && r->table[i]->pub.listening && r->table[i]->state == ST_LISTENING)
            st->listeners++;
}

int kb_rdma_conn_get_stats(kb_rdma_conn *pc, kb_rdma_conn_stats *st)
{
    conn *c = C(pc);
    memset(st, 0, sizeof *st);
    st->credits = c->credits;
    st->peer_credits = (uint32_t)(c->granted - c->consumed);
    st->owed = c->owed;
    st->rx_posted = c->rx_posted;
    st->rx_lent = c->rx_lent;
    st->tx_queued = (uint32_t)(c->slot_tail - c->slot_post);
    st->tx_busy = (uint32_t)(c->slot_tail - c->slot_done);
    st->frame_max = c->frame_max;
    st->inline_max = c->inline_max;
    st->retry_cnt = st->rnr_retry = st->timeout = -1;
    st->credit_waits = c->credit_waits;
    st->msgs_tx = c->msgs_tx;
    st->msgs_rx = c->msgs_rx;
    st->state = c->state;
    if (c->qp_alive) {
        struct ibv_qp_attr a;
        struct ibv_qp_init_attr ia;
        if (ibv_query_qp(c->id->qp, &a, IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_TIMEOUT,
                         &ia) == 0) {
            st->retry_cnt = a.retry_cnt;
            st->rnr_retry = a.rnr_retry;
            st->timeout = a.timeout;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ listen, connect, close */

static void sin_of(struct sockaddr_in *sin, uint32_t ip, uint16_t port)
{
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = ip;
    sin->sin_port = htons(port);
}

kb_rdma_conn *kb_rdma_listen(kb_rdma *r, uint32_t ip, uint16_t port, int backlog, int *err)
{
    conn *c = conn_new(r);
    if (c == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    c->pub.listening = 1;
    struct sockaddr_in sin;
    sin_of(&sin, ip, port);
    if (rdma_create_id(r->ch, &c->id, c, RDMA_PS_TCP) != 0) {
        *err = -errno;
        c->id = NULL;
    } else {
        r->st.cm_ids++;
        if (rdma_bind_addr(c->id, (struct sockaddr *)&sin) != 0
            || rdma_listen(c->id, backlog > 0 ? backlog : 128) != 0)
            *err = -errno;
        else
            *err = 0;
    }
    if (*err) {
        c->released = 1;
        c->state = ST_LISTENING;
        conn_down(c);
        conn_maybe_free(c);
        return NULL;
    }
    c->state = ST_LISTENING;
    return &c->pub;
}

static kb_rdma_conn *connect_common(kb_rdma *r, uint32_t ip, uint16_t port, int *err)
{
    conn *c = conn_new(r);
    if (c == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    struct sockaddr_in sin;
    sin_of(&sin, ip, port);
    c->state = ST_RESOLVING_ADDR;
    if (rdma_create_id(r->ch, &c->id, c, RDMA_PS_TCP) != 0) {
        *err = -errno;
        c->id = NULL;
    } else {
        r->st.cm_ids++;
        *err = rdma_resolve_addr(c->id, NULL, (struct sockaddr *)&sin, (int)r->cfg.timeout_ms)
               ? -errno : 0;
    }
    if (*err) {
        c->released = 1;
        conn_down(c);
        conn_maybe_free(c);
        return NULL;
    }
    return &c->pub;
}

kb_rdma_conn *kb_rdma_connect(kb_rdma *r, uint32_t ip, uint16_t port, int *err)
{
    return connect_common(r, ip, port, err);
}

void kb_rdma_close(kb_rdma_conn *pc)
{
    conn *c = C(pc);
    if (c->pub.listening) {
        if (c->state != ST_DOWN)
            conn_down(c);
        return;
    }
    if (c->closing || c->ended || c->state == ST_DOWN)
        return;
    c->closing = 1;
    if (c->state == ST_ESTABLISHED) {
        if (!c->eof_queued)
            kb_rdma_write_eof(pc);
        maybe_finish_close(c);
    } else if (c->state == ST_ACCEPTING || c->state == ST_CONNECTING) {
        c->ended = 1;       /* not established: nothing to deliver */
        conn_disconnect(c);
        if (c->state != ST_DOWN && c->state != ST_DISCONNECTING)
            conn_down(c);
    } else if (c->state != ST_DISCONNECTING) {
        c->ended = 1;
        conn_down(c);
    }
}

void kb_rdma_abort(kb_rdma_conn *pc)
{
    conn *c = C(pc);
    if (c->pub.listening) {
        kb_rdma_close(pc);
        return;
    }
    c->ended = 1;       /* the caller asked for it: no event */
    if (c->state == ST_ESTABLISHED || c->state == ST_CONNECTING || c->state == ST_ACCEPTING) {
        conn_disconnect(c);
        if (c->state == ST_CONNECTING || c->state == ST_ACCEPTING)
            conn_down(c);
    } else if (c->state != ST_DISCONNECTING) {
        conn_down(c);
    }
}

void kb_rdma_release(kb_rdma_conn *pc)
{
    conn *c = C(pc);
    c->pub.owner = NULL;
    if (c->released)
        return;
    if (c->pub.listening)
        kb_rdma_close(pc);
    else if (!c->closing && !c->ended)
        kb_rdma_close(pc);
    c->released = 1;
    conn_maybe_free(c);
}

int kb_rdma_addrs(kb_rdma_conn *pc, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport)
{
    conn *c = C(pc);
    *lip = *rip = 0;
    *lport = *rport = 0;
    if (c->id == NULL)
        return -ENOTCONN;
    struct sockaddr *la = rdma_get_local_addr(c->id), *ra = rdma_get_peer_addr(c->id);
    if (la && la->sa_family == AF_INET) {
        *lip = ((struct sockaddr_in *)la)->sin_addr.s_addr;
        *lport = ntohs(((struct sockaddr_in *)la)->sin_port);
    }
    if (!c->pub.listening && ra && ra->sa_family == AF_INET) {
        *rip = ((struct sockaddr_in *)ra)->sin_addr.s_addr;
        *rport = ntohs(((struct sockaddr_in *)ra)->sin_port);
    }
    return 0;
}

/* ------------------------------------------------------------------ test hooks */

kb_rdma_conn *kb_rdma_test_connect_raw(kb_rdma *r, uint32_t ip, uint16_t port,
                                       const void *private_data, uint8_t len, int *err)
{
    kb_rdma_conn *pc = connect_common(r, ip, port, err);
    if (pc == NULL)
        return NULL;
    conn *c = C(pc);
    if (len > sizeof c->raw_priv)
        len = sizeof c->raw_priv;
    memcpy(c->raw_priv, private_data, len);
    c->raw_priv_len = len;      /* sent at ROUTE_RESOLVED instead of the hello */
    return pc;
}

int kb_rdma_test_send_frame(kb_rdma_conn *pc, uint32_t length_field, uint16_t flags,
                            const void *payload, uint32_t n, int force)
{
    conn *c = C(pc);
    if (c->state != ST_ESTABLISHED || c->ended || sq_full(c) || (c->credits < 1 && !force)
        || c->slot_tail - c->slot_done >= c->nsend || HDR_LEN + n > c->buf_size)
        return -EAGAIN;
    uint32_t idx = (uint32_t)(c->slot_tail % c->nsend);
    uint8_t *f = c->region + (size_t)(c->nrecv + idx) * c->buf_size;
    put32(f, length_field);
    put16(f + 4, 0);
    put16(f + 6, flags);
    put32(f + 8, c->tx_seq++);
    memcpy(f + HDR_LEN, payload, n);
    c->slot_len[idx] = n;
    c->slot_ref[idx] = NULL;
    c->slot_tail++;
    c->slot_post++;
    c->r->st.tx_slots_busy++;
    c->bytes_posted += n;
    if (c->credits) {
        c->credits--;
        c->r->st.credits_avail--;
    }
    int sig = post_send(c, f, HDR_LEN + n, 1);
    if (sig < 0)
        return sig;
    push_mark(c);
    return 0;
}

const kb_rdma_api kb_rdma_api_table = {
    .version = KB_RDMA_API_VERSION,
    .create = kb_rdma_new,
    .destroy = kb_rdma_free,
    .poll = kb_rdma_poll,
    .flush = kb_rdma_flush,
    .fds = kb_rdma_fds,
    .arm = kb_rdma_arm,
    .events = kb_rdma_events,
    .events_clear = kb_rdma_events_clear,
    .listen = kb_rdma_listen,
    .connect = kb_rdma_connect,
    .write = kb_rdma_write,
    .write_room = kb_rdma_write_room,
    .write_eof = kb_rdma_write_eof,
    .recv_done = kb_rdma_recv_done,
    .close = kb_rdma_close,
    .abort = kb_rdma_abort,
    .release = kb_rdma_release,
    .addrs = kb_rdma_addrs,
    .get_stats = kb_rdma_get_stats,
    .reg_mem = kb_rdma_reg_mem,
    .unreg_mem = kb_rdma_unreg_mem,
    .write_ref = kb_rdma_write_ref,
    .tick = kb_rdma_tick,
};
