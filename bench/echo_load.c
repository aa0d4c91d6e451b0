/*
 * echo_load: closed-loop (ping-pong) TCP echo load generator.
 *
 * Each of N connections sends one message, waits for the complete echo,
 * checks it, and sends the next.  Single thread, level-triggered epoll, so
 * the generator itself uses one CPU and can be pinned away from the server.
 * Round trips completed after the warm-up are counted and their latency is
 * recorded in a log-linear histogram (~1.6% resolution).  Prints one JSON line.
 *
 *   gcc -O2 -o bench/.build/echo_load bench/echo_load.c
 *   echo_load -p PORT [-H 127.0.0.1] [-c 1] [-s 1024] [-d 3] [-w 1]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Log-linear histogram of nanoseconds: values < 2*SUB are exact, above that
 * each power of two is split into SUB linear buckets. */
#define SUB_BITS 6
#define SUB (1 << SUB_BITS)
#define NBUCKETS (64 * SUB)
static uint64_t hist[NBUCKETS];

static int bucket_of(uint64_t v) {
    if (v < 2 * SUB) return (int)v;
    int shift = (63 - __builtin_clzll(v)) - SUB_BITS;
    return shift * SUB + (int)(v >> shift);
}

static double bucket_mid(int i) { /* midpoint of bucket i, in ns */
    if (i < 2 * SUB) return i;
    int shift = i / SUB - 1;
    uint64_t lo = (uint64_t)(i - shift * SUB) << shift;
    return lo + ((1ULL << shift) - 1) / 2.0;
}

static double percentile_us(uint64_t total, double q) {
    uint64_t rank = (uint64_t)(q * total), seen = 0;
    if (rank >= total) rank = total ? total - 1 : 0;
    for (int i = 0; i < NBUCKETS; i++)
        if ((seen += hist[i]) > rank) return bucket_mid(i) / 1000.0;
    return 0;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static double cpu_s(struct timeval tv) { return tv.tv_sec + tv.tv_usec / 1e6; }

struct conn {
    int fd;
    size_t sent, recvd;  /* progress of the current round trip */
    uint64_t start_ns;   /* when the current message was first sent */
    int want_out;        /* EPOLLOUT currently registered */
};

static int epfd;
static size_t msg_size;
static char *msg, *rbuf;
static int alive;
static uint64_t errors;

static void fail(struct conn *c, const char *why) {
    fprintf(stderr, "echo_load: connection %d: %s\n", c->fd, why);
    errors++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    alive--;
}

static void set_out(struct conn *c, int on) {
    if (c->want_out == on) return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = on;
}

/* Write as much of the current message as the socket takes; ask for EPOLLOUT
 * only while something is left, so the common case costs no extra syscalls. */
static void flush_send(struct conn *c) {
    while (c->sent < msg_size) {
        ssize_t n = send(c->fd, msg + c->sent, msg_size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            fail(c, strerror(errno));
            return;
        }
        c->sent += n;
    }
    set_out(c, c->sent < msg_size);
}

static void start_round_trip(struct conn *c) {
    c->sent = c->recvd = 0;
    c->start_ns = now_ns();
    flush_send(c);
}

static void usage(void) {
    fprintf(stderr, "usage: echo_load -p PORT [-H HOST] [-c CONNS] [-s BYTES] [-d SECONDS] [-w WARMUP_SECONDS]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = NULL;
    int nconns = 1, opt;
    double duration = 3, warmup = 1;
    msg_size = 1024;
    while ((opt = getopt(argc, argv, "H:p:c:s:d:w:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 's': msg_size = strtoul(optarg, NULL, 10); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        default: usage();
        }
    }
    if (!port || nconns < 1 || msg_size < 1 || duration <= 0 || warmup < 0) usage();

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) { fprintf(stderr, "echo_load: %s\n", gai_strerror(rc)); return 1; }

    /* Random payload, so an echo that mixes up or corrupts bytes is caught. */
    msg = malloc(msg_size);
    rbuf = malloc(msg_size);
    srand(42);
    for (size_t i = 0; i < msg_size; i++) msg[i] = (char)rand();

    epfd = epoll_create1(0);
    struct conn *conns = calloc(nconns, sizeof *conns);
    /* Blocking connects up front keep the event loop below simple. */
    for (int i = 0; i < nconns; i++) {
        int fd = socket(ai->ai_family, SOCK_STREAM, 0), one = 1;
        if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            perror("echo_load: connect");
            return 1;
        }
        /* Small messages must go out immediately, not wait for Nagle. */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd, F_SETFL, O_NONBLOCK);
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    freeaddrinfo(ai);
    alive = nconns;

    uint64_t t0 = now_ns();
    uint64_t t_measure = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(duration * 1e9);
    int measuring = 0;
    uint64_t requests = 0;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);

    for (int i = 0; i < nconns; i++) start_round_trip(&conns[i]);

    struct epoll_event events[256];
    while (alive > 0) {
        uint64_t now = now_ns();
        if (!measuring && now >= t_measure) {
            measuring = 1;
            getrusage(RUSAGE_SELF, &ru0); /* CPU counted for the measured part only */
        }
        if (now >= t_end) break;
        uint64_t next = measuring ? t_end : t_measure;
        int timeout_ms = (int)((next - now) / 1000000) + 1;
        int n = epoll_wait(epfd, events, 256, timeout_ms);
        if (n < 0 && errno != EINTR) { perror("echo_load: epoll_wait"); return 1; }
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (c->fd < 0) continue;
            if (events[e].events & EPOLLOUT) {
                flush_send(c);
                if (c->fd < 0) continue;
            }
            if (!(events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            /* Never read past the current message: the server must not send
             * more than it received, and a one-message window keeps it honest. */
            ssize_t r = recv(c->fd, rbuf + c->recvd, msg_size - c->recvd, 0);
            if (r == 0) { fail(c, "closed by server"); continue; }
            if (r < 0) {
                if (errno != EAGAIN && errno != EINTR) fail(c, strerror(errno));
                continue;
            }
            c->recvd += r;
            if (c->recvd < msg_size) continue;
            if (c->sent < msg_size || memcmp(rbuf, msg, msg_size) != 0) {
                fail(c, "echo does not match what was sent");
                continue;
            }
            uint64_t done = now_ns();
            if (done >= t_measure && done < t_end) {
                requests++;
                hist[bucket_of(done - c->start_ns)]++;
            }
            start_round_trip(c);
        }
    }
    uint64_t t_stop = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    if (!measuring) t_measure = t_stop; /* all connections died during warm-up */

    double elapsed = (t_stop > t_measure ? t_stop - t_measure : 1) / 1e9;
    printf("{\"requests\": %llu, \"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f, \"errors\": %llu, "
           "\"connections\": %d, \"msg_size\": %zu, \"elapsed_s\": %.3f}\n",
           (unsigned long long)requests, requests / elapsed, percentile_us(requests, 0.50),
           percentile_us(requests, 0.99), percentile_us(requests, 0.999),
           cpu_s(ru1.ru_utime) - cpu_s(ru0.ru_utime), cpu_s(ru1.ru_stime) - cpu_s(ru0.ru_stime),
           (unsigned long long)errors, nconns, msg_size, elapsed);
    return errors ? 3 : 0;
}
