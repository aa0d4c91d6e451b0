/*
 * echo_load: TCP echo load generator, closed-loop or open-loop.
 *
 * Closed loop (default, "ping-pong"): each of N connections sends one
 * message, waits for the complete echo, and sends the next.  The offered load
 * is whatever the server sustains.
 *
 * Open loop (-r RATE): messages are due at a fixed total rate, RATE per
 * second, request k at t0 + k/RATE on connection k mod N, whether or not
 * earlier echoes have come back (a connection may have several messages in
 * flight).  Latency is measured from the *intended* send time, not from when
 * the generator got round to sending, so a server that stalls is charged for
 * every request that queued behind the stall (no coordinated omission).
 *
 * Both modes check every echoed byte against what was sent, count round trips
 * completed after the warm-up, record their latency in a log-linear histogram
 * (~1.6% resolution), and report the generator's own CPU use, so a reader can
 * tell when the generator rather than the server was the limit.  Single
 * thread, level-triggered epoll: pin it to its own CPU.  Prints one JSON line.
 *
 *   gcc -O2 -o bench/.build/echo_load bench/echo_load.c
 *   echo_load -p PORT [-H 127.0.0.1] [-c 1] [-s 1024] [-d 3] [-w 1] [-r RATE]
 *
 * Built with -DECHO_LOAD_TLS (and -lssl -lcrypto) it speaks TLS instead
 * (OpenSSL, the library's default protocol and cipher choice, no certificate
 * check): each connection does a blocking handshake right after its connect,
 * before the clock starts, then the same loop runs over SSL_write/SSL_read.
 *
 *   gcc -O2 -DECHO_LOAD_TLS -o bench/.build/echo_load_tls bench/echo_load.c -lssl -lcrypto
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
#ifdef ECHO_LOAD_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

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

/* Messages in flight on one connection: a ring of their intended send times.
 * The echo is one byte stream, the same message repeated, so byte number i of
 * the stream must equal msg[i % msg_size]. */
#define MAX_INFLIGHT 4096

struct conn {
    int fd;
#ifdef ECHO_LOAD_TLS
    SSL *ssl;
#endif
    uint64_t due;        /* messages scheduled so far (sent or still to send) */
    uint64_t done;       /* messages whose echo is complete */
    uint64_t sent_bytes, recvd_bytes;
    uint64_t *intended;  /* ring[MAX_INFLIGHT]: intended send time of message i */
    int want_out;        /* EPOLLOUT currently registered */
};

static int epfd;
static size_t msg_size;
static char *msg, *rbuf;
static size_t rbuf_size;
static int alive, open_loop;
static uint64_t errors, requests, t_measure, t_end;

static void fail(struct conn *c, const char *why) {
    fprintf(stderr, "echo_load: connection %d: %s\n", c->fd, why);
    errors++;
#ifdef ECHO_LOAD_TLS
    ERR_clear_error(); /* SSL_get_error() on the other connections needs an empty queue */
#endif
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    alive--;
}

/* send()/recv() on the connection, over TLS in the TLS build: n > 0 bytes moved,
 * 0 = closed by the peer, -1 with errno (EAGAIN: try again when epoll says so). */
static ssize_t conn_send(struct conn *c, const char *buf, size_t len) {
#ifdef ECHO_LOAD_TLS
    int n = SSL_write(c->ssl, buf, (int)len);
    if (n > 0) return n;
    int err = SSL_get_error(c->ssl, n);
    errno = err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ ? EAGAIN
            : err == SSL_ERROR_SYSCALL && errno ? errno : EPROTO;
    return -1;
#else
    return send(c->fd, buf, len, MSG_NOSIGNAL);
#endif
}

static ssize_t conn_recv(struct conn *c, char *buf, size_t len) {
#ifdef ECHO_LOAD_TLS
    int n = SSL_read(c->ssl, buf, (int)len);
    if (n > 0) return n;
    int err = SSL_get_error(c->ssl, n);
    if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && errno == 0)) return 0;
    /* OpenSSL 3 reports a FIN without the peer's close_notify as an error: a close too. */
    if (err == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
        return 0;
    /* WANT_READ: a partial record, or only a post-handshake message (session ticket). */
    errno = err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE ? EAGAIN
            : err == SSL_ERROR_SYSCALL ? errno : EPROTO;
    return -1;
#else
    return recv(c->fd, buf, len, 0);
#endif
}

/* Why the last conn_send/conn_recv failed (OpenSSL's reason for a TLS protocol error). */
static const char *conn_error(void) {
#ifdef ECHO_LOAD_TLS
    if (errno == EPROTO && ERR_peek_error()) return ERR_reason_error_string(ERR_get_error());
#endif
    return strerror(errno);
}

/* Decrypted bytes OpenSSL holds that epoll cannot signal (always 0 over plain TCP). */
static int conn_pending(struct conn *c) {
#ifdef ECHO_LOAD_TLS
    return c->fd >= 0 && SSL_pending(c->ssl) > 0;
#else
    (void)c;
    return 0;
#endif
}

static void set_out(struct conn *c, int on) {
    if (c->want_out == on) return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = on;
}

/* Write as much of the scheduled stream as the socket takes; ask for EPOLLOUT
 * only while something is left, so the common case costs no extra syscalls. */
static void flush_send(struct conn *c) {
    uint64_t target = c->due * msg_size;
    while (c->sent_bytes < target) {
        size_t off = c->sent_bytes % msg_size;
        size_t len = msg_size - off;
        if (len > target - c->sent_bytes) len = target - c->sent_bytes;
        ssize_t n = conn_send(c, msg + off, len);
        if (n < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            fail(c, conn_error());
            return;
        }
        c->sent_bytes += n;
    }
    set_out(c, c->sent_bytes < target);
}

/* Schedule one more message on c, intended to leave at time t.  Returns 0 if
 * too many are already in flight (open loop far beyond what the server takes). */
static int schedule(struct conn *c, uint64_t t) {
    if (c->due - c->done >= MAX_INFLIGHT) return 0;
    c->intended[c->due % MAX_INFLIGHT] = t;
    c->due++;
    return 1;
}

/* Read what the connection has, check it, count completed round trips and (closed
 * loop) send the next message. */
static void on_readable(struct conn *c) {
    /* Never read past what was sent: the server must not send more
     * than it received, and this keeps it honest. */
    uint64_t want = c->sent_bytes - c->recvd_bytes;
    if (want == 0) want = 1; /* read to detect close or excess bytes */
    if (want > rbuf_size) want = rbuf_size;
    ssize_t r = conn_recv(c, rbuf, want);
    if (r == 0) { fail(c, "closed by server"); return; }
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR) fail(c, conn_error());
        return;
    }
    if (c->recvd_bytes + r > c->sent_bytes) { fail(c, "server sent more than it received"); return; }
    /* Check the bytes against the repeated message. */
    size_t checked = 0;
    while (checked < (size_t)r) {
        size_t off = (c->recvd_bytes + checked) % msg_size;
        size_t len = msg_size - off;
        if (len > r - checked) len = r - checked;
        if (memcmp(rbuf + checked, msg + off, len) != 0) break;
        checked += len;
    }
    if (checked < (size_t)r) { fail(c, "echo does not match what was sent"); return; }
    c->recvd_bytes += r;
    uint64_t complete = c->recvd_bytes / msg_size;
    if (complete == c->done) return;
    uint64_t t = now_ns();
    for (; c->done < complete; c->done++) {
        if (t >= t_measure && t < t_end) {
            requests++;
            hist[bucket_of(t - c->intended[c->done % MAX_INFLIGHT])]++;
        }
    }
    if (!open_loop) {
        schedule(c, t);
        flush_send(c);
    }
}

static void usage(void) {
    fprintf(stderr, "usage: echo_load -p PORT [-H HOST] [-c CONNS] [-s BYTES] [-d SECONDS] "
                    "[-w WARMUP_SECONDS] [-r RATE (open loop, requests/s over all connections)]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = NULL;
    int nconns = 1, opt;
    double duration = 3, warmup = 1, rate = 0;
    msg_size = 1024;
    while ((opt = getopt(argc, argv, "H:p:c:s:d:w:r:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 's': msg_size = strtoul(optarg, NULL, 10); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'r': rate = atof(optarg); break;
        default: usage();
        }
    }
    if (!port || nconns < 1 || msg_size < 1 || duration <= 0 || warmup < 0 || rate < 0) usage();
    open_loop = rate > 0;

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) { fprintf(stderr, "echo_load: %s\n", gai_strerror(rc)); return 1; }

    /* Random payload, so an echo that mixes up or corrupts bytes is caught. */
    msg = malloc(msg_size);
    rbuf_size = msg_size < 65536 ? 65536 : msg_size;
    rbuf = malloc(rbuf_size);
    srand(42);
    for (size_t i = 0; i < msg_size; i++) msg[i] = (char)rand();

#ifdef ECHO_LOAD_TLS
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) { ERR_print_errors_fp(stderr); return 1; }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL); /* a benchmark's self-signed server */
    /* Partial writes, as send() does; the buffer of a retried write is msg + offset. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
#endif
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
#ifdef ECHO_LOAD_TLS
        conns[i].ssl = SSL_new(ctx);
        SSL_set_fd(conns[i].ssl, fd);
        if (SSL_connect(conns[i].ssl) != 1) {
            fprintf(stderr, "echo_load: TLS handshake failed\n");
            ERR_print_errors_fp(stderr);
            return 1;
        }
#endif
        fcntl(fd, F_SETFL, O_NONBLOCK);
        conns[i].fd = fd;
        conns[i].intended = malloc(MAX_INFLIGHT * sizeof(uint64_t));
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    freeaddrinfo(ai);
    alive = nconns;

    uint64_t t0 = now_ns();
    t_measure = t0 + (uint64_t)(warmup * 1e9);
    t_end = t_measure + (uint64_t)(duration * 1e9);
    int measuring = 0;
    uint64_t offered = 0, missed = 0, next_k = 0;
    double interval_ns = open_loop ? 1e9 / rate : 0;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);

    if (!open_loop)
        for (int i = 0; i < nconns; i++) {
            schedule(&conns[i], t0);
            flush_send(&conns[i]);
        }

    struct epoll_event events[256];
    while (alive > 0) {
        uint64_t now = now_ns();
        if (!measuring && now >= t_measure) {
            measuring = 1;
            getrusage(RUSAGE_SELF, &ru0); /* CPU counted for the measured part only */
        }
        if (now >= t_end) break;
        uint64_t wake = measuring ? t_end : t_measure;
        if (open_loop) {
            /* Send everything that is due by now, in order, round robin. */
            uint64_t due_at;
            while ((due_at = t0 + (uint64_t)(next_k * interval_ns)) <= now) {
                struct conn *c = &conns[next_k++ % nconns];
                if (c->fd < 0) continue;
                if (due_at >= t_measure && due_at < t_end) offered++;
                if (!schedule(c, due_at)) {
                    if (due_at >= t_measure) missed++;
                    continue;
                }
                flush_send(c);
            }
            if (due_at < wake) wake = due_at;
        }
        struct timespec timeout = {0, 0};
        if (wake > now) {
            timeout.tv_sec = (wake - now) / 1000000000ULL;
            timeout.tv_nsec = (wake - now) % 1000000000ULL;
        }
        int n = epoll_pwait2(epfd, events, 256, &timeout, NULL);
        if (n < 0 && errno != EINTR) { perror("echo_load: epoll_pwait2"); return 1; }
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (c->fd < 0) continue;
            if (events[e].events & EPOLLOUT) {
                flush_send(c);
                if (c->fd < 0) continue;
            }
            if (!(events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            do on_readable(c); while (conn_pending(c));
        }
    }
    uint64_t t_stop = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    if (!measuring) t_measure = t_stop; /* all connections died during warm-up */

    double elapsed = (t_stop > t_measure ? t_stop - t_measure : 1) / 1e9;
    double user = cpu_s(ru1.ru_utime) - cpu_s(ru0.ru_utime);
    double sys = cpu_s(ru1.ru_stime) - cpu_s(ru0.ru_stime);
#ifdef ECHO_LOAD_TLS
    for (int i = 0; i < nconns; i++) /* our close_notify (not waiting for the peer's) */
        if (conns[i].fd >= 0) SSL_shutdown(conns[i].ssl);
#endif
    printf("{\"mode\": \"%s\", \"requests\": %llu, \"rps\": %.1f, \"offered_rps\": %.1f, "
           "\"missed\": %llu, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f, \"gen_cpu_pct\": %.1f, "
           "\"errors\": %llu, \"connections\": %d, \"msg_size\": %zu, \"elapsed_s\": %.3f}\n",
           open_loop ? "open" : "closed", (unsigned long long)requests, requests / elapsed,
           open_loop ? offered / elapsed : 0.0, (unsigned long long)missed,
           percentile_us(requests, 0.50), percentile_us(requests, 0.90),
           percentile_us(requests, 0.99), percentile_us(requests, 0.999),
           user, sys, 100 * (user + sys) / elapsed,
           (unsigned long long)errors, nconns, msg_size, elapsed);
    return errors ? 3 : 0;
}
