/* kbloop's DPDK datapath, C side: the DPDK port (EAL, queues, mbuf pool, rx/tx bursts) and the
 * lwIP stack above it, driven single-threaded by kb_dpdk_poll().  lwIP's callbacks become
 * events in a queue that the Cython side drains after each poll (the completion model of the
 * datapath contract).  One stack per process: DPDK's EAL and lwIP are both process-global. */
#ifndef KB_DPDK_H
#define KB_DPDK_H

#include <stdint.h>
#include <stddef.h>

struct pbuf;
struct tcp_pcb;
struct udp_pcb;

enum kb_event_kind {
    KB_EV_ACCEPT = 1,    /* conn: the new connection; listener: the listening conn */
    KB_EV_CONNECTED,     /* conn: an active open completed */
    KB_EV_RECV,          /* conn, p: received data (the event owns p) */
    KB_EV_EOF,           /* conn: the peer sent FIN */
    KB_EV_SENT,          /* conn, len: bytes acknowledged by the peer */
    KB_EV_ERROR,         /* conn, err: lwIP's err_t; the pcb is gone */
    KB_EV_DGRAM,         /* conn (UDP), p, addr, port: a datagram and its sender */
};

typedef struct kb_conn {
    struct tcp_pcb *pcb;     /* NULL once lwIP freed it (error) or we closed it */
    struct udp_pcb *upcb;    /* a UDP endpoint instead: until released */
    void *owner;             /* the Cython side's object, borrowed */
    uint64_t id;
    int listening;
    int closed;              /* kb_tcp_close/abort called */
    int released;            /* the Cython side dropped it: free when no event refers to it */
    int pending_events;
} kb_conn;

typedef struct kb_event {
    int kind;
    int err;
    uint32_t len;
    kb_conn *conn;
    kb_conn *listener;
    struct pbuf *p;
    uint32_t addr;           /* KB_EV_DGRAM: the sender (network byte order) and its port */
    uint16_t port;
} kb_event;

typedef struct kb_dpdk_config {
    int argc;
    char **argv;             /* EAL arguments, argv[0] a program name */
    uint16_t port;
    uint32_t ip, netmask, gateway;   /* network byte order */
    uint32_t nb_mbufs;
    uint16_t nb_rx_desc, nb_tx_desc;
} kb_dpdk_config;

typedef struct kb_dpdk_stats {
    uint64_t rx_packets, tx_packets, tx_dropped, rx_bytes, tx_bytes, polls;
    uint32_t mbufs_total, mbufs_in_use;
    uint32_t conns_live;
    uint32_t tcp_pcbs_used, tcp_segs_used, pbufs_used, heap_used;
    uint32_t tcp_active, tcp_time_wait;   /* pcbs on lwIP's active and TIME_WAIT lists */
    uint32_t tcp_syn_rcvd, tcp_established;   /* of the active ones: half-open, established */
    uint32_t tcp_fin_wait, tcp_close_wait, tcp_last_ack;  /* FIN_WAIT_1/2 and CLOSING; the rest */
    uint32_t lwip_errors;    /* memp/mem allocation failures counted by lwIP */
    uint64_t fault_dropped, fault_delayed, fault_reordered;   /* kb_dpdk_set_faults */
    uint32_t fault_held;     /* frames held back right now (their mbufs count as in use) */
    /* lwIP's own drop counters: TCP segments dropped (all causes), with a bad checksum, a
     * protocol error or for want of memory; IP packets dropped; frames dropped by the link */
    uint32_t tcp_drop, tcp_chkerr, tcp_proterr, tcp_memerr, ip_drop, link_drop;
    uint64_t tx_zc_bytes;    /* bytes sent from the application's memory (external mbufs) */
    uint32_t tx_zc_inflight; /* external mbufs the device holds now */
    int zc_tx;               /* zero-copy sends on (the device takes multi-segment frames) */
    /* lwIP's sender recovering from loss (our patches count them): fast retransmits, NewReno
     * partial ACKs (a further hole resent at once), retransmission timeouts */
    uint64_t tcp_fast_rexmits, tcp_partial_acks, tcp_rto_rexmits;
    /* frames received while fewer than mbufs_reserve mbufs were free: copied to the heap,
     * their mbufs freed at once (kb_input) */
    uint64_t rx_copied;
    uint32_t mbufs_reserve;
} kb_dpdk_stats;

/* Returns 0, or -1 with a message in errbuf. */
int kb_dpdk_start(const kb_dpdk_config *cfg, char *errbuf, size_t errlen);
/* Stops and closes the port, frees lwIP's connections, cleans up the EAL and removes its
 * runtime directory.  Safe to call once after a successful start. */
void kb_dpdk_stop(void);
const uint8_t *kb_dpdk_mac(void);
const char *kb_dpdk_runtime_dir(void);

/* One poll step: receive a burst into lwIP, run lwIP's timers, send what lwIP queued.
 * Returns the number of frames received. */
int kb_dpdk_poll(void);
void kb_dpdk_flush(void);

/* Fault injection for tests (the kernels here have no netem): each frame, received or sent,
 * is dropped with probability loss_ppm/1e6; the others are held for delay_us, except a
 * fraction reorder_ppm/1e6 that go at once, overtaking the held ones (netem's model).  All
 * zero: off (the default). */
void kb_dpdk_set_faults(uint32_t loss_ppm, uint32_t delay_us, uint32_t reorder_ppm, uint64_t seed,
                        int directions);   /* 1: received frames, 2: sent frames, 3: both */

/* Events produced since the last drain.  Valid until the next kb_dpdk_poll/flush/tcp call. */
kb_event *kb_dpdk_events(size_t *count);
void kb_dpdk_events_clear(void);
void kb_dpdk_get_stats(kb_dpdk_stats *st);

/* TCP on lwIP's raw API.  Return 0 or a negative lwIP err_t. */
kb_conn *kb_tcp_listen(uint32_t ip, uint16_t port, int backlog, int *err);
kb_conn *kb_tcp_connect(uint32_t ip, uint16_t port, int *err);
/* Queue up to len bytes; returns bytes taken (>= 0; 0 when the send buffer is full) or a
 * negative err_t.  Copied into lwIP's segments, or with KB_WRITE_NOCOPY referenced: the
 * memory must then stay valid until acknowledged (KB_EV_SENT) or the connection is gone,
 * and until kb_zc_tx_inflight() says the device let go of it. */
enum { KB_WRITE_MORE = 1, KB_WRITE_NOCOPY = 2 };
long kb_tcp_write(kb_conn *c, const void *data, size_t len, int flags);
/* External-buffer mbufs (no-copy data) the device has not freed yet. */
uint32_t kb_zc_tx_inflight(void);
int kb_tcp_output(kb_conn *c);
size_t kb_tcp_sndbuf(kb_conn *c);
void kb_tcp_recved(kb_conn *c, uint32_t len);
int kb_tcp_shutdown_write(kb_conn *c);
/* Graceful; falls back to abort when lwIP has no memory (returns ERR_ABRT).  linger: no-copy
 * data is still queued, so keep reporting KB_EV_SENT and KB_EV_ERROR for c until
 * kb_conn_release; returns 1 when it does (0: the connection was gone already). */
int kb_tcp_close(kb_conn *c, int linger);
void kb_tcp_abort(kb_conn *c);
void kb_conn_release(kb_conn *c);  /* the Cython side is done with c */
int kb_tcp_addrs(kb_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport);

/* UDP on lwIP's raw API.  kb_udp_open binds (port 0: lwIP picks one); kb_udp_sendto with
 * ip 0 and port 0 sends to the connected peer.  Return 0 or a negative err_t; the endpoint is
 * closed by kb_conn_release. */
kb_conn *kb_udp_open(uint32_t ip, uint16_t port, int *err);
int kb_udp_connect(kb_conn *c, uint32_t ip, uint16_t port);
int kb_udp_sendto(kb_conn *c, const void *data, size_t len, uint32_t ip, uint16_t port);

/* pbufs handed out in KB_EV_RECV events */
size_t kb_pbuf_len(struct pbuf *p);
size_t kb_pbuf_copy(struct pbuf *p, void *dst, size_t len);
void kb_pbuf_free(struct pbuf *p);

const char *kb_lwip_strerr(int err);

/* TCP options: Nagle off (asyncio's TCP_NODELAY default), keep-alive on or off. */
void kb_tcp_set_nodelay(kb_conn *c, int on);
void kb_tcp_set_keepalive(kb_conn *c, int on);
/* One piece of a pbuf chain: its payload and length; returns the next piece or NULL. */
struct pbuf *kb_pbuf_segment(struct pbuf *p, const void **payload, size_t *len);
/* The same, but cuts the first piece off the chain: both are then the caller's to free (a
 * piece of received data lent to the application on its own). */
struct pbuf *kb_pbuf_detach(struct pbuf *p, const void **payload, size_t *len);

/* Closed-loop echo load on this stack (kb_echo_load.c, for bench/dpdk_echo_load.py):
 * nconns connections to ip:port exchange size-byte messages for warmup + seconds.
 * Returns 0 (errors counted in res) or -1 without memory. */
typedef struct kb_echo_load_result {
    uint64_t requests, errors;
    double seconds, rps, p50_us, p90_us, p99_us;
} kb_echo_load_result;
int kb_echo_load(uint32_t ip, uint16_t port, int nconns, size_t size, double seconds,
                 double warmup, kb_echo_load_result *res);

/* The functions the loop's DPDK datapath calls on its hot path, as a table exported by the
 * kbloop_ext.dpdk.stack module in a PyCapsule (KB_DPDK_API_CAPSULE): the loop core includes
 * this header for the types and calls through the table, so it has no link-time dependency
 * on DPDK or lwIP and loads on machines without them. */
#define KB_DPDK_API_CAPSULE "kbloop_ext.dpdk.stack._C_API"
#define KB_DPDK_API_VERSION 4
typedef struct kb_dpdk_api {
    int version;
    int (*poll)(void);
    kb_event *(*events)(size_t *count);
    void (*events_clear)(void);
    kb_conn *(*tcp_listen)(uint32_t ip, uint16_t port, int backlog, int *err);
    kb_conn *(*tcp_connect)(uint32_t ip, uint16_t port, int *err);
    long (*tcp_write)(kb_conn *c, const void *data, size_t len, int flags);
    int (*tcp_output)(kb_conn *c);
    void (*tcp_recved)(kb_conn *c, uint32_t len);
    int (*tcp_shutdown_write)(kb_conn *c);
    int (*tcp_close)(kb_conn *c, int linger);
    void (*tcp_abort)(kb_conn *c);
    void (*conn_release)(kb_conn *c);
    int (*tcp_addrs)(kb_conn *c, uint32_t *lip, uint16_t *lport, uint32_t *rip, uint16_t *rport);
    void (*tcp_set_nodelay)(kb_conn *c, int on);
    void (*tcp_set_keepalive)(kb_conn *c, int on);
    struct pbuf *(*pbuf_segment)(struct pbuf *p, const void **payload, size_t *len);
    void (*pbuf_free)(struct pbuf *p);
    kb_conn *(*udp_open)(uint32_t ip, uint16_t port, int *err);
    int (*udp_connect)(kb_conn *c, uint32_t ip, uint16_t port);
    int (*udp_sendto)(kb_conn *c, const void *data, size_t len, uint32_t ip, uint16_t port);
    size_t (*pbuf_copy)(struct pbuf *p, void *dst, size_t len);
    struct pbuf *(*pbuf_detach)(struct pbuf *p, const void **payload, size_t *len);
    uint32_t (*zc_tx_inflight)(void);
} kb_dpdk_api;

extern const kb_dpdk_api kb_dpdk_api_table;

#endif
