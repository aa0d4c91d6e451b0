/* lwIP options for kbloop's DPDK datapath: lwIP's core compiled into the extension, driven by
 * the loop's poll step on one thread (NO_SYS=1: no OS layer, no locks, raw API only).
 * lwIP's opt.h documents each option; only the ones that differ from its defaults are here. */
#ifndef KBLOOP_LWIPOPTS_H
#define KBLOOP_LWIPOPTS_H

#define NO_SYS                      1
#define SYS_LIGHTWEIGHT_PROT        0
#define LWIP_NETCONN                0
#define LWIP_SOCKET                 0
#define LWIP_IPV4                   1
#define LWIP_IPV6                   0
#define LWIP_ARP                    1
#define LWIP_ETHERNET               1
#define LWIP_ICMP                   1
#define LWIP_UDP                    1
#define LWIP_TCP                    1
#define LWIP_RAW                    0
#define LWIP_DHCP                   0
#define LWIP_AUTOIP                 0
#define LWIP_IGMP                   0
#define LWIP_DNS                    0
#define IP_REASSEMBLY               1   /* fragments are reassembled, never trusted blindly */
#define IP_FRAG                     1
#define ETHARP_SUPPORT_STATIC_ENTRIES 0
#define ARP_QUEUEING                1
#define ARP_QUEUE_LEN               1024   /* packets waiting for one ARP reply (a burst of SYN-ACKs) */
#define ARP_TABLE_SIZE              64

/* Memory: lwIP's pools (pcbs, segments, pbuf headers, timers) are static arrays sized for a
 * server, counted per pool by MEMP_STATS; the heap (PBUF_RAM: outgoing segments' data and
 * headers) comes from malloc and is counted by MEM_STATS, so an idle stack holds no heap at
 * all, which the leak tests check.  PBUF_POOL is never used: received frames arrive as custom
 * pbufs over the DPDK mbufs. */
#define MEM_LIBC_MALLOC             1
#define MEMP_MEM_MALLOC             0
#define MEM_ALIGNMENT               8
#define MEM_SIZE                    (16 * 1024 * 1024)   /* only makes mem_size_t 32-bit */
#define MEMP_NUM_PBUF               32768
#define MEMP_NUM_UDP_PCB            256
#define MEMP_NUM_TCP_PCB            4096
#define MEMP_NUM_TCP_PCB_LISTEN     64
#define MEMP_NUM_TCP_SEG            32768
#define MEMP_NUM_REASSDATA          64
#define IP_REASS_MAX_PBUFS          512     /* fragments held for reassembly, all datagrams */
#define MEMP_NUM_FRAG_PBUF          256
#define MEMP_NUM_ARP_QUEUE          1024
#define PBUF_POOL_SIZE              0
#define LWIP_SUPPORT_CUSTOM_PBUF    1

/* TCP sized for a server on a fast link: a window of 1 MiB (scaled), 1 MiB of send buffer. */
#define TCP_MSS                     1460
#define LWIP_WND_SCALE              1
#define TCP_RCV_SCALE               5
#define TCP_WND                     (1024 * 1024)
#define TCP_SND_BUF                 (1024 * 1024)
#define TCP_SND_QUEUELEN            8192
#define TCP_SNDLOWAT                (32 * 1024)   /* lwIP: below 0xFFFF - 4 * MSS */
#define TCP_SNDQUEUELOWAT           (TCP_SND_QUEUELEN / 4)
#define TCP_OVERSIZE                TCP_MSS
#define TCP_QUEUE_OOSEQ             1
#define LWIP_TCP_SACK_OUT           1   /* tell the peer which segments arrived: its recovery needs it */
#define LWIP_TCP_MAX_SACK_NUM       4
/* lwIP's TCP timers tick every TCP_TMR_INTERVAL ms (fast: delayed ACKs) and twice that (slow:
 * retransmission timeouts, counted in slow ticks).  The default of 250 ms sets a floor of
 * about 0.5-1 s on the RTO: on a 5 %-lossy link that made 2 MiB take 50 s.  A datacenter link
 * has a round trip of microseconds, so tick every 10 ms (RTO floor 20-40 ms, as fine as
 * Linux's 200 ms minimum or finer). */
#define TCP_TMR_INTERVAL            10
/* Bounds on the retransmission timeout, in slow ticks (2 * TCP_TMR_INTERVAL = 20 ms), applied
 * by our patch 0004 (lwip/patches): at least 60 ms (the floor lwIP's integer estimator settled
 * at on this link anyway) and, backed off, at most 10 s.  lwIP gives up after TCP_MAXRTX (12)
 * retransmissions, up to 128 RTOs apart: with these bounds a peer that vanished is given up on
 * after 46 s to 2 minutes, instead of a time that grew with an inflated estimate (10 minutes
 * and more; Linux: about 15, with TCP_RTO_MAX 120 s). */
#define KB_TCP_RTO_MIN              (60 / (2 * TCP_TMR_INTERVAL))
#define KB_TCP_RTO_MAX              (10000 / (2 * TCP_TMR_INTERVAL))
#define KB_TCP_RTO_BOUND(x)         ((s16_t)LWIP_MIN(LWIP_MAX((x), KB_TCP_RTO_MIN), KB_TCP_RTO_MAX))
#define TCP_LISTEN_BACKLOG          1
#define TCP_DEFAULT_LISTEN_BACKLOG  0xff
#define LWIP_TCP_KEEPALIVE          1
#define LWIP_TCP_TIMESTAMPS         0
#define LWIP_CALLBACK_API           1
#define LWIP_EVENT_API              0

/* Checksums in software both ways: the virtual devices offload nothing. */
#define CHECKSUM_GEN_IP             1
#define CHECKSUM_GEN_UDP            1
#define CHECKSUM_GEN_TCP            1
#define CHECKSUM_GEN_ICMP           1
#define CHECKSUM_CHECK_IP           1
#define CHECKSUM_CHECK_UDP          1
#define CHECKSUM_CHECK_TCP          1
#define CHECKSUM_CHECK_ICMP         1
/* Our checksum routine (kb_dpdk.c): 8 bytes per step instead of lwIP's 2; and the TCP data's
 * sum taken while tcp_write copies it, rather than in a second pass. */
#define LWIP_CHKSUM                 kb_chksum
unsigned short kb_chksum(const void *dataptr, int len);
#define LWIP_CHECKSUM_ON_COPY       1

#define LWIP_NETIF_STATUS_CALLBACK  0
#define LWIP_NETIF_LINK_CALLBACK    0
#define LWIP_HAVE_LOOPIF            0
#define LWIP_NETIF_LOOPBACK         0

/* Counters for the leak tests and loop.stats(). */
#define LWIP_STATS                  1
#define LWIP_STATS_DISPLAY          0
#define MEM_STATS                   1
#define MEMP_STATS                  1
#define LINK_STATS                  1
#define TCP_STATS                   1
#define IP_STATS                    1

/* The C library (and DPDK) provide htons & co.; lwIP uses its own lwip_htons inside. */
#define LWIP_DONT_PROVIDE_BYTEORDER_FUNCTIONS 1

/* Randomness for initial sequence numbers and ephemeral ports. */
#include <stdlib.h>
#define LWIP_RAND()                 ((u32_t)random())

/* LWIP_DEBUG and LWIP_NOASSERT are tested with #ifdef: never define them here. */

/* Counters bumped by our patches to lwIP's TCP (lwip/patches/0002-*), reported in the stack's
 * stats: how the sender recovered from losses. */
struct kb_tcp_counters {
    unsigned long fast_rexmits;   /* fast retransmits (three duplicate ACKs) */
    unsigned long partial_acks;   /* NewReno partial ACKs: a further hole resent at once */
    unsigned long rto_rexmits;    /* retransmission timeouts */
};
extern struct kb_tcp_counters kb_tcp_counters;

#endif
