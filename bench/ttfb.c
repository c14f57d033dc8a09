/* Streaming time-to-first-byte client for bench/perf.py.
 *
 *   ttfb HOST PORT PATH BODY_FILE CONCURRENCY DURATION_S MAX_REQUESTS
 *
 * Keeps CONCURRENCY keep-alive HTTP/1.1 connections busy with the POST in
 * BODY_FILE (one epoll loop, one thread) and times, per request, from writing
 * it to receiving the first SSE event ("data:" in the body). Each response is
 * then read to its end (Content-Length or chunked) before the next request on
 * that connection. Prints one JSON line: {"n":..,"p50_ms":..,"p99_ms":..}; any
 * bad or missing answer ends it with exit status 1 and a message on stderr.
 *
 * Why C: the Python (aiohttp) client this replaces cost ~150 us of CPU per
 * stream on the load core, as much as the proxies it measured, so its own
 * queueing dominated "TTFB" and moved between runs. Bounded by DURATION_S and
 * MAX_REQUESTS; it connects only where it is told (perf.py: 127.0.0.1).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 262144

struct conn {
    int fd;
    char *buf;
    size_t len;
    double t0;      /* request written */
    int timed;      /* first event seen for this request */
    long header_end; /* offset of the body, -1 until headers are complete */
    long content_length; /* -1: chunked */
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int dial(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    int one = 1;
    if (fd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1) return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { close(fd); return -1; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static char *request; static size_t request_len;

static int send_request(struct conn *c) {
    size_t off = 0;
    c->len = 0; c->timed = 0; c->header_end = -1; c->content_length = -1;
    c->t0 = now();
    while (off < request_len) { /* small request: one write in practice */
        ssize_t n = write(c->fd, request + off, request_len - off);
        if (n < 0) { if (errno == EAGAIN) continue; return -1; }
        off += n;
    }
    return 0;
}

/* 1 when the response in c->buf is complete, 0 when more is needed, -1 on error. */
static int complete(struct conn *c) {
    if (c->header_end < 0) {
        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!end) return 0;
        c->header_end = end + 4 - c->buf;
        if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0) return -1;
        for (char *p = c->buf; p < end; p++) {
            if (*p == '\n' && strncasecmp(p + 1, "content-length:", 15) == 0) c->content_length = atol(p + 16);
        }
    }
    if (c->content_length >= 0) return (long)c->len - c->header_end >= c->content_length;
    return c->len >= 5 && memcmp(c->buf + c->len - 5, "0\r\n\r\n", 5) == 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT PATH BODY_FILE CONCURRENCY DURATION_S MAX_REQUESTS\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *path = argv[3];
    int port = atoi(argv[2]), conc = atoi(argv[5]);
    double duration = atof(argv[6]);
    long max_requests = atol(argv[7]);

    FILE *f = fopen(argv[4], "rb");
    if (!f) { perror("body"); return 2; }
    static char body[65536];
    size_t body_len = fread(body, 1, sizeof body, f);
    fclose(f);
    request = malloc(body_len + 512);
    request_len = snprintf(request, 512,
        "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer sk-bench\r\nContent-Length: %zu\r\n\r\n",  /* bench/perf.py's BENCH_KEY */
        path, host, port, body_len);
    memcpy(request + request_len, body, body_len);
    request_len += body_len;

    double *samples = malloc(sizeof(double) * (max_requests + conc));
    long n = 0;
    int ep = epoll_create1(0);
    struct conn *conns = calloc(conc, sizeof *conns);
    for (int i = 0; i < conc; i++) {
        conns[i].buf = malloc(BUF);
        if ((conns[i].fd = dial(host, port)) < 0) { perror("connect"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
    }
    double deadline = now() + duration;
    for (int i = 0; i < conc; i++) if (send_request(&conns[i]) < 0) { perror("write"); return 1; }
    int open = conc;
    struct epoll_event events[64];
    while (open > 0) {
        int k = epoll_wait(ep, events, 64, 1000);
        if (k == 0 && now() > deadline + 10) { fprintf(stderr, "ttfb: no answer for 10 s\n"); return 1; }
        for (int e = 0; e < k; e++) {
            struct conn *c = events[e].data.ptr;
            for (;;) {
                ssize_t r = read(c->fd, c->buf + c->len, BUF - 1 - c->len);
                if (r < 0 && errno == EAGAIN) break;
                if (r <= 0) { fprintf(stderr, "ttfb: connection closed by the server\n"); return 1; }
                c->len += r;
                if (c->len >= BUF - 1) { fprintf(stderr, "ttfb: response too large\n"); return 1; }
            }
            int done = complete(c);
            if (done < 0) { fprintf(stderr, "ttfb: bad answer: %.80s\n", c->buf); return 1; }
            if (!c->timed && c->header_end >= 0 && memmem(c->buf + c->header_end, c->len - c->header_end, "data:", 5)) {
                samples[n++] = (now() - c->t0) * 1000.0;
                c->timed = 1;
            }
            if (done) {
                if (!c->timed) { fprintf(stderr, "ttfb: answer without an SSE event\n"); return 1; }
                if (now() < deadline && n < max_requests) {
                    if (send_request(c) < 0) { perror("write"); return 1; }
                } else {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    open--;
                }
            }
        }
    }
    if (n == 0) { fprintf(stderr, "ttfb: no samples\n"); return 1; }
    qsort(samples, n, sizeof(double), cmp);
    printf("{\"n\": %ld, \"p50_ms\": %.4f, \"p99_ms\": %.4f}\n", n, samples[n / 2], samples[(long)(n * 0.99)]);
    return 0;
}
