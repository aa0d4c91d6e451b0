/* A closed-loop echo load generator on the DPDK stack itself, for the benchmarks over net_memif
 * where no kernel is in the path (bench/dpdk_echo_load.py).  Each of N connections sends one
 * message, waits for the whole echo, checks it, and sends the next; the poll loop runs in C,
 * so the generator costs what a C client on lwIP costs, not what Python would.  Latencies go
 * into a log-linear histogram (values < 128 ns exact, then 64 buckets per power of two), as
 * bench/echo_load.c does for the kernel side. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kb_dpdk.h"

#define SUB_BITS 6
#define SUB (1 << SUB_BITS)
#define NBUCKETS (64 * SUB)

typedef struct {
    kb_conn *c;
    size_t sent, recvd;          /* bytes of the current message */
    uint64_t t_sent;
    int up;
} load_conn;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static int bucket_of(uint64_t v)
{
    if (v < 2 * SUB)
        return (int)v;
    int shift = (63 - __builtin_clzll(v)) - SUB_BITS;
    return shift * SUB + (int)(v >> shift);
}

static double bucket_mid_us(int i)
{
    if (i < 2 * SUB)
        return i / 1000.0;
    int shift = i / SUB - 1;
    uint64_t lo = (uint64_t)(i - shift * SUB) << shift;
    return (lo + ((1ULL << shift) - 1) / 2.0) / 1000.0;
}

static double percentile_us(const uint64_t *hist, uint64_t total, double q)
{
    uint64_t rank = (uint64_t)(q * total), seen = 0;
    if (rank >= total)
        rank = total ? total - 1 : 0;
    for (int i = 0; i < NBUCKETS; i++)
        if ((seen += hist[i]) > rank)
            return bucket_mid_us(i);
    return 0;
}

static void pump(load_conn *lc, const char *msg, size_t size)
{
    while (lc->sent < size) {
        long n = kb_tcp_write(lc->c, msg + lc->sent, size - lc->sent, 0);
        if (n <= 0)
            break;
        lc->sent += (size_t)n;
    }
    kb_tcp_output(lc->c);
}

int kb_echo_load(uint32_t ip, uint16_t port, int nconns, size_t size, double seconds,
                 double warmup, kb_echo_load_result *res)
{
    memset(res, 0, sizeof *res);
    load_conn *conns = calloc((size_t)nconns, sizeof *conns);
    uint64_t *hist = calloc(NBUCKETS, sizeof *hist);
    char *msg = malloc(size), *check = malloc(size);
    if (conns == NULL || hist == NULL || msg == NULL || check == NULL) {
        free(conns); free(hist); free(msg); free(check);
        return -1;
    }
    for (size_t i = 0; i < size; i++)
        msg[i] = (char)('a' + i % 26);
    int err = 0, up = 0, alive = nconns;
    for (int i = 0; i < nconns; i++) {
        conns[i].c = kb_tcp_connect(ip, port, &err);
        if (conns[i].c == NULL) {
            res->errors++;
            alive--;
            continue;
        }
        conns[i].c->owner = &conns[i];
    }
    uint64_t start = now_ns();
    uint64_t t_measure = start + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(seconds * 1e9);
    uint64_t connect_deadline = start + 10ULL * 1000000000ULL;
    uint64_t now = start;
    while (alive > 0 && now < t_end) {
        kb_dpdk_poll();
        size_t count = 0;
        kb_event *ev = kb_dpdk_events(&count);
        now = now_ns();
        for (size_t k = 0; k < count; k++) {
            kb_event *e = &ev[k];
            load_conn *lc = e->conn ? e->conn->owner : NULL;
            if (lc == NULL)
                continue;
            switch (e->kind) {
            case KB_EV_CONNECTED:
                lc->up = 1;
                up++;
                kb_tcp_set_nodelay(lc->c, 1);
                lc->t_sent = now;
                pump(lc, msg, size);
                break;
            case KB_EV_SENT:
                pump(lc, msg, size);
                break;
            case KB_EV_RECV: {
                size_t n = e->len;
                if (lc->recvd + n > size) {     /* more than was sent: a broken echo */
                    res->errors++;
                    n = size - lc->recvd;
                }
                kb_pbuf_copy(e->p, check + lc->recvd, n);
                kb_tcp_recved(lc->c, e->len);
                lc->recvd += n;
                if (lc->recvd == size) {
                    if (memcmp(check, msg, size) != 0)
                        res->errors++;
                    if (now >= t_measure) {
                        res->requests++;
                        hist[bucket_of(now - lc->t_sent)]++;
                    }
                    lc->sent = lc->recvd = 0;
                    lc->t_sent = now;
                    pump(lc, msg, size);
                }
                break;
            }
            case KB_EV_EOF:
            case KB_EV_ERROR:
                res->errors++;
                alive--;
                lc->up = 0;
                e->conn->owner = NULL;
                break;
            }
        }
        kb_dpdk_events_clear();
        if (up < nconns && now > connect_deadline) {
            res->errors += (uint64_t)(nconns - up);
            break;
        }
    }
    uint64_t measured = now > t_measure ? now - t_measure : 1;
    res->seconds = measured / 1e9;
    res->rps = res->requests / res->seconds;
    res->p50_us = percentile_us(hist, res->requests, 0.50);
    res->p90_us = percentile_us(hist, res->requests, 0.90);
    res->p99_us = percentile_us(hist, res->requests, 0.99);
    for (int i = 0; i < nconns; i++) {
        if (conns[i].c) {
            conns[i].c->owner = NULL;
            kb_tcp_close(conns[i].c, 0);
            kb_conn_release(conns[i].c);
        }
    }
    for (int i = 0; i < 50; i++)   /* the FINs go out */
        kb_dpdk_poll(), kb_dpdk_events_clear();
    free(conns); free(hist); free(msg); free(check);
    return 0;
}
