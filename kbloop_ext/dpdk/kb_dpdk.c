/* kbloop's DPDK datapath, C side: see kb_dpdk.h. */
#include "kb_dpdk.h"

#include <string.h>
#include <time.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_mbuf_pool_ops.h>

/* DPDK pulls in <netinet/ip.h>, whose fragment flags lwIP defines again, identically. */
#undef IP_RF
#undef IP_DF
#undef IP_MF
#undef IP_OFFMASK
#include "lwip/init.h"
#include "lwip/etharp.h"
#include "lwip/ip4_addr.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/stats.h"
#include "lwip/tcp.h"
#include "lwip/udp.h"
#include "lwip/priv/tcp_priv.h"   /* tcp_active_pcbs, to abort them all at stop */
#include "lwip/timeouts.h"
#include "netif/ethernet.h"

#define KB_BURST 32
#define KB_TXQ 256
#define KB_HELD 8192     /* frames held back by fault injection, per direction */
#define KB_RX_RESERVE_DIV 8   /* an eighth of the pool stays free for receiving and sending */
#define KB_ZC_MIN 256    /* smaller no-copy pieces are copied: an mbuf of their own costs more */

/* Frames held back by fault injection: a FIFO (the delay is constant, so release order is
 * arrival order). */
typedef struct kb_held {
    struct rte_mbuf *m[KB_HELD];
    uint64_t due_ns[KB_HELD];
    unsigned head, count;
} kb_held;

struct kb_tcp_counters kb_tcp_counters;

/* One stack per process (the EAL and lwIP are process-global), so the state is static. */
static struct {
    int started;
    uint16_t port;
    struct rte_mempool *pool;
    uint32_t nb_mbufs;
    uint32_t rx_reserve;   /* free mbufs below which received frames are copied (kb_input) */
    struct rte_ether_addr mac;
    struct netif netif;
    char runtime_dir[4096];
    struct rte_mbuf *txq[KB_TXQ];
    unsigned ntx;
    kb_event *events;
    size_t nevents, cap_events;
    uint64_t next_conn_id;
    uint32_t conns_live;
    kb_dpdk_stats st;
    /* Zero-copy sends: the data of lwIP's PBUF_ROM pbufs (the application's Buffers, written
     * with kb_tcp_write's KB_WRITE_NOCOPY and held by the loop until acknowledged) goes out
     * as external-buffer mbufs.  One shared-info for all of them: its reference count is 1
     * plus the external mbufs not yet freed by the device (kb_zc_tx_inflight). */
    int zc_tx;
    struct rte_mbuf_ext_shared_info zc_shinfo;
    struct {
        uint32_t loss_ppm, reorder_ppm, dirs;
        uint64_t delay_ns, rng;
        kb_held rx, tx;
    } faults;
} S;

/* ------------------------------------------------------------------ lwIP's platform hooks */

/* lwIP's clock, in milliseconds.  It is read on every poll step and more than once per segment:
 * from the TSC (what DPDK times itself with) once the EAL is up, a few cycles instead of a
 * clock_gettime() each time. */
static uint64_t tsc_start, tsc_per_ms;

u32_t sys_now(void)
{
    if (tsc_per_ms)
        return (u32_t)((rte_get_tsc_cycles() - tsc_start) / tsc_per_ms);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u32_t)(ts.tv_sec * 1000u + ts.tv_nsec / 1000000u);
}

/* lwIP's LWIP_CHKSUM (lwipopts.h): the one's-complement sum of the bytes as 16-bit words in
 * memory order, not inverted.  Summing 32-bit halves of 64-bit loads into a 64-bit
 * accumulator and folding at the end gives the same sum (RFC 1071: deferred carries). */
unsigned short kb_chksum(const void *dataptr, int len)
{
    const unsigned char *p = dataptr;
    uint64_t sum = 0;
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        sum += (v & 0xffffffffu) + (v >> 32);
    }
    for (; len >= 2; p += 2, len -= 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        sum += v;
    }
    if (len > 0)
        sum += *p;   /* the last byte, as the first byte of a word (memory order) */
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (unsigned short)sum;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ fault injection */

static uint32_t fault_rand_ppm(void)
{
    uint64_t x = S.faults.rng;   /* xorshift64 */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    S.faults.rng = x;
    return (uint32_t)(x % 1000000u);
}

void kb_dpdk_set_faults(uint32_t loss_ppm, uint32_t delay_us, uint32_t reorder_ppm, uint64_t seed,
                        int directions)
{
    S.faults.dirs = (uint32_t)directions;
    S.faults.loss_ppm = loss_ppm;
    S.faults.delay_ns = (uint64_t)delay_us * 1000u;
    S.faults.reorder_ppm = reorder_ppm;
    S.faults.rng = seed ? seed : 0x9e3779b97f4a7c15ull;
}

/* Returns 1 when the frame goes on now, 0 when fault injection took it (dropped or held). */
static int fault_filter(kb_held *q, struct rte_mbuf *m)
{
    if (S.faults.loss_ppm && fault_rand_ppm() < S.faults.loss_ppm) {
        S.st.fault_dropped++;
        rte_pktmbuf_free(m);
        return 0;
    }
    if (S.faults.delay_ns == 0)
        return 1;
    if (S.faults.reorder_ppm && fault_rand_ppm() < S.faults.reorder_ppm) {
        if (q->count)   /* only a true overtaking counts */
            S.st.fault_reordered++;
        return 1;
    }
    if (q->count == KB_HELD)
        return 1;
    unsigned tail = (q->head + q->count) % KB_HELD;
    q->m[tail] = m;
    q->due_ns[tail] = now_ns() + S.faults.delay_ns;
    q->count++;
    S.st.fault_delayed++;
    return 0;
}

/* The next held frame whose delay is over, or NULL. */
static struct rte_mbuf *fault_release(kb_held *q, uint64_t now)
{
    if (q->count == 0 || q->due_ns[q->head] > now)
        return NULL;
    struct rte_mbuf *m = q->m[q->head];
    q->head = (q->head + 1) % KB_HELD;
    q->count--;
    return m;
}

static void fault_free_all(kb_held *q)
{
    struct rte_mbuf *m;
    while ((m = fault_release(q, UINT64_MAX)) != NULL)
        rte_pktmbuf_free(m);
}

/* ------------------------------------------------------------------ frames <-> pbufs */

/* A received frame is handed to lwIP without a copy: a custom pbuf, stored in the mbuf's private
 * area, points at the mbuf's data; freeing the pbuf frees the mbuf. */
static void kb_rx_pbuf_free(struct pbuf *p)
{
    struct rte_mbuf *m = (struct rte_mbuf *)((char *)p - sizeof(struct rte_mbuf));
    rte_pktmbuf_free(m);
}

static struct pbuf *kb_mbuf_to_pbuf(struct rte_mbuf *m)
{
    struct pbuf_custom *pc = rte_mbuf_to_priv(m);
    pc->custom_free_function = kb_rx_pbuf_free;
    uint16_t len = rte_pktmbuf_data_len(m);
    return pbuf_alloced_custom(PBUF_RAW, len, PBUF_REF, pc, rte_pktmbuf_mtod(m, void *), len);
}

void kb_dpdk_flush(void)
{
    unsigned sent = 0;
    int idle_tries = 0;
    while (sent < S.ntx && idle_tries < 4) {
        uint16_t n = rte_eth_tx_burst(S.port, 0, S.txq + sent, (uint16_t)(S.ntx - sent));
        sent += n;
        idle_tries = n ? 0 : idle_tries + 1;
    }
    S.st.tx_packets += sent;
    if (sent < S.ntx) {   /* the device queue stayed full: TCP retransmits what this drops */
        S.st.tx_dropped += S.ntx - sent;
        rte_pktmbuf_free_bulk(S.txq + sent, S.ntx - sent);
    }
    S.ntx = 0;
}

/* lwIP's link output: copy the frame (a pbuf chain) into one mbuf and queue it for the next
 * burst.  Zero-copy sends of pool Buffers come later as external-buffer mbufs. */
static void kb_zc_free(void *addr, void *opaque)
{
    (void)addr;
    (void)opaque;   /* never called: the shared-info's count never drops to zero */
}

/* Appends len bytes from src to the frame, in new mbufs as needed; 0 or -1 (no mbuf). */
static int kb_frame_copy(struct rte_mbuf *head, struct rte_mbuf **tail, const char *src,
                         size_t len)
{
    while (len) {
        struct rte_mbuf *t = *tail;
        if (RTE_MBUF_HAS_EXTBUF(t) || rte_pktmbuf_tailroom(t) == 0) {
            struct rte_mbuf *x = rte_pktmbuf_alloc(S.pool);
            if (x == NULL)
                return -1;
            t->next = x;
            head->nb_segs++;
            *tail = t = x;
        }
        size_t n = rte_pktmbuf_tailroom(t);
        if (n > len)
            n = len;
        memcpy(rte_pktmbuf_mtod_offset(t, char *, t->data_len), src, n);
        t->data_len += n;
        head->pkt_len += n;
        src += n;
        len -= n;
    }
    return 0;
}

/* lwIP's frame out: headers (and data lwIP copied) are copied into mbufs; the data of
 * no-copy writes is attached to the frame as external buffers, without a copy. */
static err_t kb_linkoutput(struct netif *nif, struct pbuf *p)
{
    (void)nif;
    struct rte_mbuf *m = rte_pktmbuf_alloc(S.pool), *tail = m;
    if (m == NULL)
        return ERR_MEM;
    for (struct pbuf *q = p; q != NULL; q = q->next) {
        if (S.zc_tx && q->type_internal == PBUF_ROM && q->len >= KB_ZC_MIN) {
            struct rte_mbuf *x = rte_pktmbuf_alloc(S.pool);
            if (x == NULL)
                goto nomem;
            rte_mbuf_ext_refcnt_update(&S.zc_shinfo, 1);
            rte_pktmbuf_attach_extbuf(x, q->payload, (rte_iova_t)(uintptr_t)q->payload, q->len,
                                      &S.zc_shinfo);
            x->data_len = q->len;
            tail->next = x;
            tail = x;
            m->nb_segs++;
            m->pkt_len += q->len;
            S.st.tx_zc_bytes += q->len;
        } else if (kb_frame_copy(m, &tail, q->payload, q->len) < 0) {
            goto nomem;
        }
    }
    S.st.tx_bytes += p->tot_len;
    if ((S.faults.loss_ppm || S.faults.delay_ns) && (S.faults.dirs & 2)
        && !fault_filter(&S.faults.tx, m))
        return ERR_OK;   /* "sent": the wire lost or delayed it */
    S.txq[S.ntx++] = m;
    if (S.ntx == KB_TXQ)
        kb_dpdk_flush();
    return ERR_OK;
nomem:
    rte_pktmbuf_free(m);
    return ERR_MEM;
}

static err_t kb_netif_init(struct netif *nif)
{
    nif->name[0] = 'k';
    nif->name[1] = 'b';
    nif->output = etharp_output;
    nif->linkoutput = kb_linkoutput;
    nif->mtu = 1500;
    nif->hwaddr_len = ETH_HWADDR_LEN;
    memcpy(nif->hwaddr, S.mac.addr_bytes, ETH_HWADDR_LEN);
    nif->flags = NETIF_FLAG_BROADCAST | NETIF_FLAG_ETHARP | NETIF_FLAG_ETHERNET;
    return ERR_OK;
}

/* ------------------------------------------------------------------ start, poll, stop */

/* The mbuf pool, its objects packed edge to edge.  DPDK 22.11's af_xdp registers the pool's
 * memory with the kernel as its UMEM, sized (number of mbufs) x (object size) from the first
 * object: it assumes no gaps.  rte_pktmbuf_pool_create keeps each object inside one page
 * when it must keep objects IOVA-contiguous, and with 4 KiB pages (--no-huge) that spaced
 * the 2.5 KiB objects 4 KiB apart: the UMEM covered 39 of the pool's 64 MiB.  The kernel
 * rejected every frame sent from an mbuf past its end (XDP_STATISTICS tx_invalid_descs) and
 * every such fill-ring slot, without a completion: frames vanished, their mbufs leaked, and
 * once a busy stack had cycled through the pool its connections stalled in retransmission
 * backoff (issue 18).  With IOVA as VA, a virtually contiguous area is IOVA-contiguous, so
 * the objects need no padding: a packed pool is what any device that maps it as one region
 * expects, and takes less memory. */
static struct rte_mempool *kb_pool_create(unsigned n)
{
    unsigned priv = RTE_ALIGN(sizeof(struct pbuf_custom), RTE_MBUF_PRIV_ALIGN);
    unsigned flags = rte_eal_iova_mode() == RTE_IOVA_VA ? RTE_MEMPOOL_F_NO_IOVA_CONTIG : 0;
    struct rte_pktmbuf_pool_private mbp;
    memset(&mbp, 0, sizeof mbp);
    mbp.mbuf_data_room_size = RTE_MBUF_DEFAULT_BUF_SIZE;
    mbp.mbuf_priv_size = (uint16_t)priv;
    struct rte_mempool *mp = rte_mempool_create_empty(
        "kbloop_rx", n, sizeof(struct rte_mbuf) + priv + RTE_MBUF_DEFAULT_BUF_SIZE, 256,
        sizeof mbp, rte_socket_id(), flags);
    if (mp == NULL)
        return NULL;
    if (rte_mempool_set_ops_byname(mp, rte_mbuf_best_mempool_ops(), NULL) != 0)
        goto fail;
    rte_pktmbuf_pool_init(mp, &mbp);
    if (rte_mempool_populate_default(mp) < 0)
        goto fail;
    rte_mempool_obj_iter(mp, rte_pktmbuf_init, NULL);
    return mp;
fail:
    rte_mempool_free(mp);
    return NULL;
}

/* Every object lies within (first object) + (number) x (object size): what af_xdp registers. */
static int kb_pool_is_packed(struct rte_mempool *mp)
{
    struct rte_mempool_memhdr *h = STAILQ_FIRST(&mp->mem_list);
    size_t obj = rte_mempool_calc_obj_size(mp->elt_size, mp->flags, NULL);
    return mp->nb_mem_chunks == 1 && h != NULL
           && h->len < (size_t)mp->populated_size * obj + obj;
}

int kb_dpdk_start(const kb_dpdk_config *cfg, char *errbuf, size_t errlen)
{
    if (S.started) {
        snprintf(errbuf, errlen, "the DPDK datapath is already running in this process");
        return -1;
    }
    /* rte_eal_init permutes argv: give it a copy. */
    char *argv[cfg->argc + 1];
    for (int i = 0; i < cfg->argc; i++)
        argv[i] = cfg->argv[i];
    argv[cfg->argc] = NULL;
    int eal = rte_eal_init(cfg->argc, argv);
    /* Known even when the EAL failed after creating it (a device that does not probe), so
     * that the caller can remove it. */
    snprintf(S.runtime_dir, sizeof S.runtime_dir, "%s", rte_eal_get_runtime_dir());
    if (eal < 0) {
        snprintf(errbuf, errlen, "rte_eal_init failed: %s", rte_strerror(rte_errno));
        return -1;
    }
    S.port = cfg->port;
    const char *what = NULL;
    int rc = 0;
    if (!rte_eth_dev_is_valid_port(S.port)) {
        snprintf(errbuf, errlen, "no DPDK port %u (%u available): give a --vdev or a bound NIC",
                 S.port, rte_eth_dev_count_avail());
        goto fail_eal;
    }
    S.nb_mbufs = cfg->nb_mbufs ? cfg->nb_mbufs : 16383;
    S.rx_reserve = S.nb_mbufs / KB_RX_RESERVE_DIV;
    S.pool = kb_pool_create(S.nb_mbufs);
    if (S.pool == NULL) {
        snprintf(errbuf, errlen, "mbuf pool of %u: %s (give the EAL more memory with -m)",
                 S.nb_mbufs, rte_strerror(rte_errno));
        goto fail_eal;
    }
    struct rte_eth_conf conf;
    memset(&conf, 0, sizeof conf);
    uint16_t nrx = cfg->nb_rx_desc ? cfg->nb_rx_desc : 1024;
    uint16_t ntx = cfg->nb_tx_desc ? cfg->nb_tx_desc : 1024;
    int sock = rte_eth_dev_socket_id(S.port);
    /* Zero-copy sends need frames of several segments (a header mbuf, then the data's) and
     * the data's address as the device sees it: its virtual address in IOVA-as-VA mode.
     * DPDK 22.11's af_xdp takes one segment only, so it gets copies.  KBLOOP_DPDK_ZC_TX=0
     * turns it off. */
    struct rte_eth_dev_info info;
    const char *zc_env = getenv("KBLOOP_DPDK_ZC_TX");
    int have_info = rte_eth_dev_info_get(S.port, &info) == 0;
    if (have_info && info.driver_name && strcmp(info.driver_name, "net_af_xdp") == 0
        && !kb_pool_is_packed(S.pool)) {
        snprintf(errbuf, errlen, "the af_xdp device needs its mbuf pool in one packed memory "
                 "area (IOVA-as-VA mode), and this one is not: frames in mbufs outside the "
                 "area it registers would be dropped by the kernel");
        rte_mempool_free(S.pool);
        S.pool = NULL;
        goto fail_eal;
    }
    S.zc_tx = have_info
              && (info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS)
              && rte_eal_iova_mode() == RTE_IOVA_VA
              && !(zc_env && zc_env[0] == '0');
    if (S.zc_tx)
        conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
    S.zc_shinfo.free_cb = kb_zc_free;
    S.zc_shinfo.fcb_opaque = NULL;
    rte_mbuf_ext_refcnt_set(&S.zc_shinfo, 1);
    if ((rc = rte_eth_dev_configure(S.port, 1, 1, &conf)) < 0) { what = "configure"; goto fail_port; }
    if ((rc = rte_eth_dev_adjust_nb_rx_tx_desc(S.port, &nrx, &ntx)) < 0) { what = "descriptors"; goto fail_port; }
    if ((rc = rte_eth_rx_queue_setup(S.port, 0, nrx, sock, NULL, S.pool)) < 0) { what = "rx queue"; goto fail_port; }
    if ((rc = rte_eth_tx_queue_setup(S.port, 0, ntx, sock, NULL)) < 0) { what = "tx queue"; goto fail_port; }
    if ((rc = rte_eth_dev_start(S.port)) < 0) { what = "start"; goto fail_port; }
    rte_eth_promiscuous_enable(S.port);   /* some PMDs cannot: harmless, lwIP filters by MAC */
    rte_eth_macaddr_get(S.port, &S.mac);

    tsc_per_ms = rte_get_tsc_hz() / 1000;
    tsc_start = rte_get_tsc_cycles();
    lwip_init();
    ip4_addr_t ip, mask, gw;
    ip.addr = cfg->ip;
    mask.addr = cfg->netmask;
    gw.addr = cfg->gateway;
    netif_add(&S.netif, &ip, &mask, &gw, NULL, kb_netif_init, ethernet_input);
    netif_set_default(&S.netif);
    netif_set_up(&S.netif);
    netif_set_link_up(&S.netif);
    S.started = 1;
    return 0;

fail_port:
    snprintf(errbuf, errlen, "DPDK port %u %s: %s", S.port, what, rte_strerror(-rc));
    rte_eth_dev_close(S.port);
    rte_mempool_free(S.pool);
    S.pool = NULL;
fail_eal:
    rte_eal_cleanup();
    return -1;
}

static void kb_conn_free_if_done(kb_conn *c);

void kb_dpdk_stop(void)
{
    if (!S.started)
        return;
    /* Abort every connection still open: lwIP frees its pcbs (and their pbufs) and sends RSTs. */
    while (tcp_active_pcbs != NULL) {
        struct tcp_pcb *pcb = tcp_active_pcbs;
        kb_conn *c = pcb->callback_arg;
        tcp_arg(pcb, NULL);
        tcp_err(pcb, NULL);
        if (c) c->pcb = NULL;
        tcp_abort(pcb);
    }
    kb_dpdk_events_clear();
    kb_dpdk_flush();
    fault_free_all(&S.faults.rx);
    fault_free_all(&S.faults.tx);
    netif_set_down(&S.netif);
    netif_remove(&S.netif);
    rte_eth_dev_stop(S.port);
    rte_eth_dev_close(S.port);
    rte_mempool_free(S.pool);
    S.pool = NULL;
    free(S.events);
    S.events = NULL;
    S.nevents = S.cap_events = 0;
    rte_eal_cleanup();
    S.started = 0;
}

const uint8_t *kb_dpdk_mac(void) { return S.mac.addr_bytes; }
const char *kb_dpdk_runtime_dir(void) { return S.runtime_dir; }

/* A frame lwIP keeps (data not read yet, out-of-order segments, lent Buffers) keeps its mbuf,
 * and the device refills its receive ring from the same pool.  Connections whose readers are
 * slow or paused could take the whole pool and leave none for the frames that carry the
 * acknowledgements and data everything else waits for: the stack would stop for every
 * connection.  So once fewer than this reserve are free, received frames are copied into
 * heap pbufs and their mbufs go back at once (lwIP's windows still bound what it holds). */
static struct pbuf *kb_mbuf_copy_to_pbuf(struct rte_mbuf *m)
{
    uint16_t len = rte_pktmbuf_data_len(m);
    struct pbuf *p = pbuf_alloc(PBUF_RAW, len, PBUF_RAM);
    if (p != NULL) {
        pbuf_take(p, rte_pktmbuf_mtod(m, void *), len);
        S.st.rx_copied++;
    }
    rte_pktmbuf_free(m);
    return p;
}

static void kb_input(struct rte_mbuf *m, int copy)
{
    if (m->nb_segs != 1) {   /* jumbo chains: not configured, so not expected */
        rte_pktmbuf_free(m);
        return;
    }
    if (copy) {
        struct pbuf *c = kb_mbuf_copy_to_pbuf(m);
        if (c != NULL && S.netif.input(c, &S.netif) != ERR_OK)
            pbuf_free(c);
        return;
    }
    struct pbuf *p = kb_mbuf_to_pbuf(m);
    if (p == NULL || S.netif.input(p, &S.netif) != ERR_OK) {
        if (p) pbuf_free(p); else rte_pktmbuf_free(m);
    }
}

int kb_dpdk_poll(void)
{
    struct rte_mbuf *rx[KB_BURST], *m;
    int faults = S.faults.loss_ppm || S.faults.delay_ns || S.faults.rx.count || S.faults.tx.count;
    if (faults) {   /* held frames whose delay is over go first, in order */
        uint64_t now = now_ns();
        while ((m = fault_release(&S.faults.rx, now)) != NULL)
            kb_input(m, rte_mempool_avail_count(S.pool) < S.rx_reserve);
        while ((m = fault_release(&S.faults.tx, now)) != NULL) {
            S.txq[S.ntx++] = m;
            if (S.ntx == KB_TXQ)
                kb_dpdk_flush();
        }
    }
    uint16_t n = rte_eth_rx_burst(S.port, 0, rx, KB_BURST);
    int copy = n && rte_mempool_avail_count(S.pool) < S.rx_reserve;
    for (uint16_t i = 0; i < n; i++) {
        S.st.rx_bytes += rte_pktmbuf_pkt_len(rx[i]);
        if (faults && (S.faults.dirs & 1) && !fault_filter(&S.faults.rx, rx[i]))
            continue;
        kb_input(rx[i], copy);
    }
    S.st.rx_packets += n;
    /* lwIP's timers tick every 10 ms (TCP_TMR_INTERVAL): looking at the clock on one idle poll
     * step in 64 (microseconds apart) is plenty, and a busy-polling loop no longer spends a
     * sixth of its time reading the TSC.  With traffic, one step in 8: a loop whose steps are
     * far apart (long callbacks) still runs its timers in time. */
    if ((S.st.polls++ & (n ? 7 : 63)) == 0)
        sys_check_timeouts();
    kb_dpdk_flush();
    return n;
}

/* ------------------------------------------------------------------ events */

static void kb_push(int kind, kb_conn *c, kb_conn *listener, struct pbuf *p, int err, uint32_t len)
{
    if (S.nevents == S.cap_events) {
        size_t cap = S.cap_events ? S.cap_events * 2 : 256;
        kb_event *e = realloc(S.events, cap * sizeof *e);
        if (e == NULL)
            abort();   /* out of memory while lwIP holds state we cannot roll back */
        S.events = e;
        S.cap_events = cap;
    }
    kb_event *e = &S.events[S.nevents++];
    e->kind = kind;
    e->conn = c;
    e->listener = listener;
    e->p = p;
    e->err = err;
    e->len = len;
    if (c) c->pending_events++;
    if (listener) listener->pending_events++;
}

kb_event *kb_dpdk_events(size_t *count)
{
    *count = S.nevents;
    return S.events;
}

void kb_dpdk_events_clear(void)
{
    for (size_t i = 0; i < S.nevents; i++) {
        kb_event *e = &S.events[i];
        if (e->p) {   /* data the Cython side did not take: its connection is gone */
            pbuf_free(e->p);
            e->p = NULL;
        }
        if (e->listener) {
            e->listener->pending_events--;
            kb_conn_free_if_done(e->listener);
        }
        /* An accepted connection nobody took (its listener closed meanwhile): abort it. */
        if (e->kind == KB_EV_ACCEPT && e->conn->owner == NULL && !e->conn->released) {
            kb_tcp_abort(e->conn);
            e->conn->released = 1;
        }
        e->conn->pending_events--;
        kb_conn_free_if_done(e->conn);
    }
    S.nevents = 0;
}

/* ------------------------------------------------------------------ TCP */

static kb_conn *kb_conn_new(struct tcp_pcb *pcb)
{
    kb_conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->pcb = pcb;
    c->id = ++S.next_conn_id;
    S.conns_live++;
    return c;
}

static void kb_conn_free_if_done(kb_conn *c)
{
    if (c->released && c->pcb == NULL && c->pending_events == 0) {
        S.conns_live--;
        free(c);
    }
}

static void kb_detach(kb_conn *c)
{
    struct tcp_pcb *pcb = c->pcb;
    if (pcb == NULL)
        return;
    tcp_arg(pcb, NULL);
    if (c->listening) {
        tcp_accept(pcb, NULL);
    } else {
        tcp_recv(pcb, NULL);
        tcp_sent(pcb, NULL);
        tcp_err(pcb, NULL);
    }
    c->pcb = NULL;
}

static err_t kb_on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err)
{
    kb_conn *c = arg;
    (void)pcb;
    if (c == NULL) {   /* detached meanwhile: drop */
        if (p) pbuf_free(p);
        return ERR_OK;
    }
    if (p == NULL)
        kb_push(KB_EV_EOF, c, NULL, NULL, err, 0);
    else
        kb_push(KB_EV_RECV, c, NULL, p, 0, p->tot_len);   /* tcp_recved once consumed */
    return ERR_OK;
}

static err_t kb_on_sent(void *arg, struct tcp_pcb *pcb, u16_t len)
{
    (void)pcb;
    if (arg)
        kb_push(KB_EV_SENT, arg, NULL, NULL, 0, len);
    return ERR_OK;
}

static void kb_on_err(void *arg, err_t err)
{
    kb_conn *c = arg;
    if (c == NULL)
        return;
    c->pcb = NULL;   /* lwIP has freed it */
    kb_push(KB_EV_ERROR, c, NULL, NULL, err, 0);
}

static void kb_attach(kb_conn *c)
{
    tcp_arg(c->pcb, c);
    tcp_recv(c->pcb, kb_on_recv);
    tcp_sent(c->pcb, kb_on_sent);
    tcp_err(c->pcb, kb_on_err);
}

static err_t kb_on_accept(void *arg, struct tcp_pcb *newpcb, err_t err)
{
    kb_conn *l = arg;
    if (l == NULL || err != ERR_OK || newpcb == NULL)
        return ERR_VAL;
    kb_conn *c = kb_conn_new(newpcb);
    if (c == NULL) {
        tcp_abort(newpcb);
        return ERR_ABRT;
    }
    kb_attach(c);
    tcp_backlog_accepted(newpcb);
    kb_push(KB_EV_ACCEPT, c, l, NULL, 0, 0);
    return ERR_OK;
}

static err_t kb_on_connected(void *arg, struct tcp_pcb *pcb, err_t err)
{
    (void)pcb;
    if (arg)
        kb_push(KB_EV_CONNECTED, arg, NULL, NULL, err, 0);
    return ERR_OK;
}

kb_conn *kb_tcp_listen(uint32_t ip, uint16_t port, int backlog, int *err)
{
    struct tcp_pcb *pcb = tcp_new_ip_type(IPADDR_TYPE_V4);
    if (pcb == NULL) { *err = ERR_MEM; return NULL; }
    ip_addr_t a;
    ip_addr_set_ip4_u32_val(a, ip);
    if ((*err = tcp_bind(pcb, &a, port)) != ERR_OK) {
        tcp_close(pcb);
        return NULL;
    }
    err_t e = ERR_OK;
    struct tcp_pcb *lpcb = tcp_listen_with_backlog_and_err(pcb, backlog > 255 ? 255 : backlog, &e);
    if (lpcb == NULL) {
        tcp_close(pcb);
        *err = e;
        return NULL;
    }
    kb_conn *c = kb_conn_new(lpcb);
    if (c == NULL) { tcp_close(lpcb); *err = ERR_MEM; return NULL; }
    c->listening = 1;
    tcp_arg(lpcb, c);
    tcp_accept(lpcb, kb_on_accept);
    *err = ERR_OK;
    return c;
}

kb_conn *kb_tcp_connect(uint32_t ip, uint16_t port, int *err)
{
    struct tcp_pcb *pcb = tcp_new_ip_type(IPADDR_TYPE_V4);
    if (pcb == NULL) { *err = ERR_MEM; return NULL; }
    kb_conn *c = kb_conn_new(pcb);
    if (c == NULL) { tcp_abort(pcb); *err = ERR_MEM; return NULL; }
    kb_attach(c);
    ip_addr_t a;
    ip_addr_set_ip4_u32_val(a, ip);
    if ((*err = tcp_connect(pcb, &a, port, kb_on_connected)) != ERR_OK) {
        kb_detach(c);
        tcp_abort(pcb);
        c->released = 1;
        kb_conn_free_if_done(c);
        return NULL;
    }
    return c;
}

long kb_tcp_write(kb_conn *c, const void *data, size_t len, int flags)
{
    if (c->pcb == NULL || c->listening)
        return ERR_CONN;
    size_t room = tcp_sndbuf(c->pcb);
    size_t n = len < room ? len : room;
    if (n > 0xffff) n = 0xffff;     /* tcp_write takes a u16_t length */
    if (n == 0)
        return 0;
    u8_t wflags = ((flags & KB_WRITE_NOCOPY) ? 0 : TCP_WRITE_FLAG_COPY)
                  | ((flags & KB_WRITE_MORE) || n < len ? TCP_WRITE_FLAG_MORE : 0);
    err_t e = tcp_write(c->pcb, data, (u16_t)n, wflags);
    if (e == ERR_MEM)   /* too many segments queued: try again after some are acknowledged */
        return 0;
    return e == ERR_OK ? (long)n : e;
}

int kb_tcp_output(kb_conn *c)
{
    return c->pcb ? tcp_output(c->pcb) : ERR_CONN;
}

size_t kb_tcp_sndbuf(kb_conn *c)
{
    return c->pcb && !c->listening ? tcp_sndbuf(c->pcb) : 0;
}

void kb_tcp_recved(kb_conn *c, uint32_t len)
{
    /* tcp_recved takes a u16_t */
    while (c->pcb && len) {
        u16_t n = len > 0xffff ? 0xffff : (u16_t)len;
        tcp_recved(c->pcb, n);
        len -= n;
    }
}

int kb_tcp_shutdown_write(kb_conn *c)
{
    return c->pcb ? tcp_shutdown(c->pcb, 0, 1) : ERR_CONN;
}

int kb_tcp_close(kb_conn *c, int linger)
{
    c->closed = 1;
    struct tcp_pcb *pcb = c->pcb;
    if (pcb == NULL)
        return ERR_OK;
    if (linger) {
        /* lwIP still sends data that references the caller's memory: keep reporting
         * acknowledgements (KB_EV_SENT) and the pcb's end (KB_EV_ERROR) until released.
         * Data that arrives meanwhile is dropped by lwIP (no receive callback). */
        tcp_recv(pcb, NULL);
    } else {
        kb_detach(c);
    }
    if (tcp_close(pcb) != ERR_OK) {   /* no memory for the FIN: reset instead */
        kb_detach(c);
        tcp_abort(pcb);
        return ERR_ABRT;
    }
    return linger ? 1 : ERR_OK;
}

void kb_tcp_abort(kb_conn *c)
{
    c->closed = 1;
    struct tcp_pcb *pcb = c->pcb;
    if (pcb == NULL)
        return;
    int listening = c->listening;
    kb_detach(c);
    if (listening)
        tcp_close(pcb);   /* a listening pcb is simply freed */
    else
        tcp_abort(pcb);
}

void kb_conn_release(kb_conn *c)
{
    c->owner = NULL;
    if (c->upcb != NULL) {   /* a UDP endpoint: nothing to tear down gracefully */
        udp_recv(c->upcb, NULL, NULL);
        udp_remove(c->upcb);
        c->upcb = NULL;
    }
    if (c->pcb != NULL && c->closed)
        kb_detach(c);       /* closed with linger: the close goes on in lwIP */
    else if (c->pcb != NULL)
        kb_tcp_abort(c);
    c->released = 1;
    kb_conn_free_if_done(c);
}

int kb_tcp_addrs(kb_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport)
{
    if (c->upcb != NULL) {
        *lip = ip_2_ip4(&c->upcb->local_ip)->addr;
        *lport = c->upcb->local_port;
        int connected = (c->upcb->flags & UDP_FLAGS_CONNECTED) != 0;
        *rip = connected ? ip_2_ip4(&c->upcb->remote_ip)->addr : 0;
        *rport = connected ? c->upcb->remote_port : 0;
        return ERR_OK;
    }
    if (c->pcb == NULL)
        return ERR_CONN;
    *lip = ip_2_ip4(&c->pcb->local_ip)->addr;
    *lport = c->pcb->local_port;
    if (c->listening) {
        *rip = 0;
        *rport = 0;
    } else {
        *rip = ip_2_ip4(&c->pcb->remote_ip)->addr;
        *rport = c->pcb->remote_port;
    }
    return ERR_OK;
}

/* ------------------------------------------------------------------ UDP */

static void kb_on_udp_recv(void *arg, struct udp_pcb *pcb, struct pbuf *p,
                           const ip_addr_t *addr, u16_t port)
{
    (void)pcb;
    kb_conn *c = arg;
    if (c == NULL) {
        pbuf_free(p);
        return;
    }
    kb_push(KB_EV_DGRAM, c, NULL, p, 0, p->tot_len);
    S.events[S.nevents - 1].addr = ip_2_ip4(addr)->addr;
    S.events[S.nevents - 1].port = port;
}

kb_conn *kb_udp_open(uint32_t ip, uint16_t port, int *err)
{
    struct udp_pcb *upcb = udp_new_ip_type(IPADDR_TYPE_V4);
    if (upcb == NULL) { *err = ERR_MEM; return NULL; }
    ip_addr_t a;
    ip_addr_set_ip4_u32_val(a, ip);
    if ((*err = udp_bind(upcb, &a, port)) != ERR_OK) {
        udp_remove(upcb);
        return NULL;
    }
    kb_conn *c = kb_conn_new(NULL);
    if (c == NULL) { udp_remove(upcb); *err = ERR_MEM; return NULL; }
    c->upcb = upcb;
    udp_recv(upcb, kb_on_udp_recv, c);
    return c;
}

int kb_udp_connect(kb_conn *c, uint32_t ip, uint16_t port)
{
    if (c->upcb == NULL)
        return ERR_CONN;
    ip_addr_t a;
    ip_addr_set_ip4_u32_val(a, ip);
    return udp_connect(c->upcb, &a, port);
}

int kb_udp_sendto(kb_conn *c, const void *data, size_t len, uint32_t ip, uint16_t port)
{
    if (c->upcb == NULL)
        return ERR_CONN;
    if (len > 0xffff - 8 - 20)
        return ERR_VAL;          /* larger than an IPv4 datagram can be */
    struct pbuf *p = pbuf_alloc(PBUF_TRANSPORT, (u16_t)len, PBUF_RAM);
    if (p == NULL)
        return ERR_MEM;
    memcpy(p->payload, data, len);
    err_t e;
    if (ip == 0 && port == 0) {
        e = udp_send(c->upcb, p);
    } else {
        ip_addr_t a;
        ip_addr_set_ip4_u32_val(a, ip);
        e = udp_sendto(c->upcb, p, &a, port);
    }
    pbuf_free(p);
    return e;
}

/* ------------------------------------------------------------------ pbufs and stats */

size_t kb_pbuf_len(struct pbuf *p) { return p->tot_len; }

size_t kb_pbuf_copy(struct pbuf *p, void *dst, size_t len)
{
    return pbuf_copy_partial(p, dst, (u16_t)(len < p->tot_len ? len : p->tot_len), 0);
}

void kb_pbuf_free(struct pbuf *p) { pbuf_free(p); }

void kb_dpdk_get_stats(kb_dpdk_stats *st)
{
    if (S.started) {
        /* Some devices free sent mbufs only when they next transmit (af_xdp reaps its
         * completion ring in tx_burst): reap now, so that mbufs_in_use counts the mbufs that
         * are held, not frames already sent. */
        struct rte_mbuf *none[1];
        rte_eth_tx_done_cleanup(S.port, 0, 0);
        rte_eth_tx_burst(S.port, 0, none, 0);
    }
    *st = S.st;
    st->mbufs_total = S.nb_mbufs;
    st->mbufs_reserve = S.rx_reserve;
    st->mbufs_in_use = S.pool ? S.nb_mbufs - rte_mempool_avail_count(S.pool) : 0;
    st->conns_live = S.conns_live;
    st->fault_held = S.faults.rx.count + S.faults.tx.count;
    st->tcp_pcbs_used = lwip_stats.memp[MEMP_TCP_PCB]->used;
    st->tcp_segs_used = lwip_stats.memp[MEMP_TCP_SEG]->used;
    st->pbufs_used = lwip_stats.memp[MEMP_PBUF]->used;
    st->heap_used = lwip_stats.mem.used;
    st->tcp_drop = lwip_stats.tcp.drop;
    st->tcp_chkerr = lwip_stats.tcp.chkerr;
    st->tcp_proterr = lwip_stats.tcp.proterr;
    st->tcp_memerr = lwip_stats.tcp.memerr;
    st->ip_drop = lwip_stats.ip.drop;
    st->link_drop = lwip_stats.link.drop;
    st->tcp_active = st->tcp_time_wait = st->tcp_syn_rcvd = st->tcp_established = 0;
    st->tcp_fin_wait = st->tcp_close_wait = st->tcp_last_ack = 0;
    for (struct tcp_pcb *pcb = tcp_active_pcbs; pcb != NULL; pcb = pcb->next) {
        st->tcp_active++;
        st->tcp_syn_rcvd += pcb->state == SYN_RCVD;
        st->tcp_established += pcb->state == ESTABLISHED;
        st->tcp_fin_wait += pcb->state == FIN_WAIT_1 || pcb->state == FIN_WAIT_2 ||
                            pcb->state == CLOSING;
        st->tcp_close_wait += pcb->state == CLOSE_WAIT;
        st->tcp_last_ack += pcb->state == LAST_ACK;
    }
    for (struct tcp_pcb *pcb = tcp_tw_pcbs; pcb != NULL; pcb = pcb->next)
        st->tcp_time_wait++;
    uint32_t errs = lwip_stats.mem.err;
    for (int i = 0; i < MEMP_MAX; i++)
        errs += lwip_stats.memp[i]->err;
    st->lwip_errors = errs;
    st->tx_zc_inflight = rte_mbuf_ext_refcnt_read(&S.zc_shinfo) - 1;
    st->zc_tx = S.zc_tx;
    st->tcp_fast_rexmits = kb_tcp_counters.fast_rexmits;
    st->tcp_partial_acks = kb_tcp_counters.partial_acks;
    st->tcp_rto_rexmits = kb_tcp_counters.rto_rexmits;
}

const char *kb_lwip_strerr(int err)
{
    static const char *const names[] = {
        "ok", "out of memory", "buffer error", "timeout", "routing problem",
        "operation in progress", "illegal value", "operation would block", "address in use",
        "already connecting", "already connected", "not connected", "low-level netif error",
        "connection aborted", "connection reset", "connection closed", "illegal argument",
    };
    return err <= 0 && -err < (int)(sizeof names / sizeof names[0]) ? names[-err] : "unknown";
}

/* ------------------------------------------------------------------ options, API table */

void kb_tcp_set_nodelay(kb_conn *c, int on)
{
    if (c->pcb == NULL || c->listening)
        return;
    if (on)
        tcp_nagle_disable(c->pcb);
    else
        tcp_nagle_enable(c->pcb);
}

void kb_tcp_set_keepalive(kb_conn *c, int on)
{
    if (c->pcb == NULL)
        return;
    if (on)
        ip_set_option(c->pcb, SOF_KEEPALIVE);
    else
        ip_reset_option(c->pcb, SOF_KEEPALIVE);
}

struct pbuf *kb_pbuf_segment(struct pbuf *p, const void **payload, size_t *len)
{
    *payload = p->payload;
    *len = p->len;
    return p->next;
}

struct pbuf *kb_pbuf_detach(struct pbuf *p, const void **payload, size_t *len)
{
    /* The chain's reference to the next piece passes to the caller with it (lwIP chains
     * received data with pbuf_cat, which does not take a reference of its own). */
    struct pbuf *next = p->next;
    p->next = NULL;
    p->tot_len = p->len;
    *payload = p->payload;
    *len = p->len;
    return next;
}

uint32_t kb_zc_tx_inflight(void)
{
    uint32_t n = rte_mbuf_ext_refcnt_read(&S.zc_shinfo) - 1;
    if (n && S.started)     /* a real NIC frees sent mbufs lazily: ask it now */
        rte_eth_tx_done_cleanup(S.port, 0, 0);
    return rte_mbuf_ext_refcnt_read(&S.zc_shinfo) - 1;
}

const kb_dpdk_api kb_dpdk_api_table = {
    .version = KB_DPDK_API_VERSION,
    .poll = kb_dpdk_poll,
    .events = kb_dpdk_events,
    .events_clear = kb_dpdk_events_clear,
    .tcp_listen = kb_tcp_listen,
    .tcp_connect = kb_tcp_connect,
    .tcp_write = kb_tcp_write,
    .tcp_output = kb_tcp_output,
    .tcp_recved = kb_tcp_recved,
    .tcp_shutdown_write = kb_tcp_shutdown_write,
    .tcp_close = kb_tcp_close,
    .tcp_abort = kb_tcp_abort,
    .conn_release = kb_conn_release,
    .tcp_addrs = kb_tcp_addrs,
    .tcp_set_nodelay = kb_tcp_set_nodelay,
    .tcp_set_keepalive = kb_tcp_set_keepalive,
    .pbuf_segment = kb_pbuf_segment,
    .pbuf_free = kb_pbuf_free,
    .udp_open = kb_udp_open,
    .udp_connect = kb_udp_connect,
    .udp_sendto = kb_udp_sendto,
    .pbuf_copy = kb_pbuf_copy,
    .pbuf_detach = kb_pbuf_detach,
    .zc_tx_inflight = kb_zc_tx_inflight,
};
