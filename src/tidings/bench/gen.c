/*
 * tidings-bench-gen: the load generator of `tidings bench`.
 *
 * Compiled at bench time with the system C compiler. One thread, one epoll loop, many
 * non-blocking client sockets. It performs the WebSocket upgrade (and, in socketio mode,
 * the Engine.IO/Socket.IO v4 open and connect packets), waits for the server's
 * `connected` message, optionally subscribes every connection to one channel, answers
 * pings, and then counts event frames. It parses a frame's payload only where it must:
 * during setup, for control frames, and on "sampled" connections, where it reads the
 * publisher's CLOCK_MONOTONIC timestamp ("ts":<ns>) out of the event to measure
 * publish-to-receipt latency.
 *
 * Control on stdin, one command a line; results on stdout, one JSON object a line:
 *   (after start-up)                       -> {"event":"ready",...}
 *   measure EXPECTED IDLE_MS MAX_MS        -> {"event":"measuring",...} then {"event":"done",...}
 *   quit (or end of input)                 -> closes every socket (RST) and exits
 * With --ports P1,P2,... connections are spread over several servers, round robin.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { M_TIDINGS, M_FLOOR, M_SIO };
enum { S_IDLE, S_CONNECTING, S_HTTP, S_WAIT_OPEN, S_WAIT_CONNECTED, S_WAIT_SUBSCRIBED,
       S_READY, S_DONE };

typedef struct {
    int fd;
    uint8_t state, sampled, hlen, in_frame, opcode, keep;
    uint8_t hdr[14];
    uint64_t rem;
    char *buf;
    uint32_t blen, bcap;
    int64_t started;
} conn_t;

/* options */
static const char *o_host = "127.0.0.1";
static int o_port = 8000;
static int o_ports[16];
static int o_nports = 0;
static int o_mode = M_TIDINGS;
static int o_conns = 1;
static const char *o_tokens = NULL;
static const char *o_path = "/ws";
static const char *o_channel = "bench:fan";
static int o_subscribe = 1;
static int o_concurrency = 100;
static int o_sample_every = 0;
static int o_per_ip = 25000;
static int64_t o_setup_timeout_ms = 120000;

static conn_t *conns;
static char **tokens;
static int ntokens;
static int epfd;
static uint8_t mask_key[4];

/* setup counters */
static int next_conn, inflight, n_connected, n_ready, n_failed;
static int f_refused, f_http, f_closed, f_error, f_timeout, f_other;
static int64_t t_first_start, t_last_connected, t_last_ready;
static int ready_reported;
static char last_error[160];

/* measurement */
static int measuring;
static int64_t m_expected, m_idle_ns, m_max_ns, m_start;
static int64_t c_frames, c_bytes, c_first_rx, c_last_rx;
static int64_t *lat;
static size_t lat_n, lat_cap;
static int64_t closed_after_ready, write_errors;
static int close_codes[5000];

static char rbuf[1 << 18];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *msg) {
    fprintf(stderr, "tidings-bench-gen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static void buf_append(conn_t *c, const char *p, size_t n) {
    if (c->blen + n > c->bcap) {
        uint32_t cap = c->bcap ? c->bcap : 512;
        while (cap < c->blen + n) cap *= 2;
        char *nb = realloc(c->buf, cap);
        if (!nb) die("out of memory");
        c->buf = nb;
        c->bcap = cap;
    }
    memcpy(c->buf + c->blen, p, n);
    c->blen += (uint32_t)n;
}

static void buf_free(conn_t *c) {
    free(c->buf);
    c->buf = NULL;
    c->blen = c->bcap = 0;
}

static void record_close(int code) {
    if (code >= 0 && code < 5000) close_codes[code]++;
}

static void finish(conn_t *c, int failure_kind, const char *why) {
    if (c->state == S_DONE || c->state == S_IDLE) return;
    int64_t now = now_ns();
    if (c->state == S_READY) {
        closed_after_ready++;
    } else {
        n_failed++;
        inflight--;
        switch (failure_kind) {
            case 1: f_refused++; break;
            case 2: f_http++; break;
            case 3: f_closed++; break;
            case 4: f_error++; break;
            case 5: f_timeout++; break;
            default: f_other++; break;
        }
        if (why) snprintf(last_error, sizeof last_error, "%s", why);
    }
    (void)now;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = S_DONE;
    buf_free(c);
}

static void send_frame(conn_t *c, int opcode, const char *data, size_t n) {
    unsigned char out[1024];
    size_t h = 0;
    if (n > sizeof out - 14) return;
    out[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        out[h++] = (unsigned char)(0x80 | n);
    } else {
        out[h++] = 0x80 | 126;
        out[h++] = (unsigned char)(n >> 8);
        out[h++] = (unsigned char)(n & 0xff);
    }
    memcpy(out + h, mask_key, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) out[h + i] = (unsigned char)data[i] ^ mask_key[i & 3];
    ssize_t w = write(c->fd, out, h + n);
    if (w != (ssize_t)(h + n)) write_errors++;
}

static void send_text(conn_t *c, const char *s) { send_frame(c, 0x1, s, strlen(s)); }

static void became_ready(conn_t *c, int64_t now) {
    c->state = S_READY;
    n_ready++;
    inflight--;
    t_last_ready = now;
    if (!c->sampled) buf_free(c);
}

static void became_connected(conn_t *c, int64_t now) {
    n_connected++;
    t_last_connected = now;
    if (!o_subscribe) {
        became_ready(c, now);
        return;
    }
    char msg[512];
    if (o_mode == M_SIO)
        snprintf(msg, sizeof msg, "42[\"subscribe\",{\"channel\":\"%s\"}]", o_channel);
    else
        snprintf(msg, sizeof msg,
                 "{\"type\":\"subscribe\",\"id\":\"s\",\"data\":{\"channel\":\"%s\"}}", o_channel);
    send_text(c, msg);
    c->state = S_WAIT_SUBSCRIBED;
}

static int contains(const conn_t *c, const char *needle) {
    return c->blen && memmem(c->buf, c->blen, needle, strlen(needle)) != NULL;
}

static void record_latency(conn_t *c, int64_t now) {
    const char *p = memmem(c->buf, c->blen, "\"ts\":", 5);
    if (!p) return;
    p += 5;
    const char *end = c->buf + c->blen;
    int64_t v = 0;
    int any = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        p++;
        any = 1;
    }
    if (!any) return;
    if (lat_n == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 65536;
        lat = realloc(lat, lat_cap * sizeof *lat);
        if (!lat) die("out of memory");
    }
    lat[lat_n++] = now - v;
}

static void text_frame(conn_t *c, int64_t now) {
    switch (c->state) {
        case S_WAIT_OPEN:
            if (c->blen && c->buf[0] == '0') {
                send_text(c, "40");
                c->state = S_WAIT_CONNECTED;
            } else {
                finish(c, 4, "unexpected first Engine.IO packet");
            }
            return;
        case S_WAIT_CONNECTED:
            if (o_mode == M_SIO) {
                if (c->blen >= 2 && c->buf[0] == '4' && c->buf[1] == '0') became_connected(c, now);
                else if (c->blen == 1 && c->buf[0] == '2') send_text(c, "3");
                else finish(c, 4, "Socket.IO connect refused");
            } else if (contains(c, "\"connected\"")) {
                became_connected(c, now);
            } else {
                finish(c, 4, "first message is not 'connected'");
            }
            return;
        case S_WAIT_SUBSCRIBED:
            if (o_mode == M_SIO && c->blen == 1 && c->buf[0] == '2') {
                send_text(c, "3");
            } else if (contains(c, "\"subscribed\"")) {
                became_ready(c, now);
            } else if (contains(c, "\"error\"")) {
                finish(c, 4, "subscribe refused");
            }
            return;
        case S_READY:
            if (o_mode == M_SIO && c->keep && c->blen == 1 && c->buf[0] == '2') {
                send_text(c, "3");
                return;
            }
            c_frames++;
            if (!c_first_rx) c_first_rx = now;
            c_last_rx = now;
            if (c->sampled && c->keep) record_latency(c, now);
            return;
        default:
            return;
    }
}

static void frame_done(conn_t *c, int64_t now) {
    switch (c->opcode) {
        case 0x8: {
            int code = c->blen >= 2 ? (((unsigned char)c->buf[0] << 8) | (unsigned char)c->buf[1])
                                    : 1005;
            record_close(code);
            char why[64];
            snprintf(why, sizeof why, "closed by the server with %d", code);
            finish(c, 3, why);
            return;
        }
        case 0x9:
            send_frame(c, 0xA, c->buf ? c->buf : "", c->blen);
            return;
        case 0xA:
            return;
        default:
            if (c->state == S_READY) c_bytes += c->blen ? c->blen : 0;
            text_frame(c, now);
            return;
    }
}

static int decide_keep(const conn_t *c, uint64_t len) {
    if (c->opcode >= 8) return 1;
    if (c->state != S_READY) return 1;
    if (c->sampled) return 1;
    if (o_mode == M_SIO && len <= 2) return 1;
    return 0;
}

/* Feed received bytes to the connection's frame parser. */
static void feed(conn_t *c, const char *p, size_t n, int64_t now) {
    while (n > 0 && c->state != S_DONE) {
        if (!c->in_frame && c->hlen == 0 && c->state == S_READY && n >= 2 && !c->sampled &&
            (p[0] & 0x0f) < 8 && !((uint8_t)p[1] & 0x80)) {
            /* Fast path: a whole uninspected data frame in the buffer is only counted. */
            uint8_t l7 = (uint8_t)p[1] & 0x7f;
            size_t hl = l7 < 126 ? 2 : l7 == 126 ? 4 : 10;
            if (n >= hl) {
                uint64_t len = l7;
                if (l7 == 126) {
                    len = ((uint64_t)(uint8_t)p[2] << 8) | (uint8_t)p[3];
                } else if (l7 == 127) {
                    len = 0;
                    for (int i = 0; i < 8; i++) len = (len << 8) | (uint8_t)p[2 + i];
                }
                if (!(o_mode == M_SIO && len <= 2) && n - hl >= len) {
                    p += hl + len;
                    n -= hl + len;
                    c_frames++;
                    c_bytes += (int64_t)len;
                    if (!c_first_rx) c_first_rx = now;
                    c_last_rx = now;
                    continue;
                }
            }
        }
        if (!c->in_frame) {
            size_t need;
            for (;;) {
                need = 2;
                if (c->hlen >= 2) {
                    uint8_t l7 = c->hdr[1] & 0x7f;
                    need += (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((c->hdr[1] & 0x80) ? 4 : 0);
                }
                if (c->hlen >= need || n == 0) break;
                c->hdr[c->hlen++] = (uint8_t)*p++;
                n--;
            }
            if (c->hlen < need) return;
            uint8_t l7 = c->hdr[1] & 0x7f;
            uint64_t len = l7;
            if (l7 == 126) {
                len = ((uint64_t)c->hdr[2] << 8) | c->hdr[3];
            } else if (l7 == 127) {
                len = 0;
                for (int i = 0; i < 8; i++) len = (len << 8) | c->hdr[2 + i];
            }
            c->opcode = c->hdr[0] & 0x0f;
            c->hlen = 0;
            c->rem = len;
            c->in_frame = 1;
            c->keep = (uint8_t)decide_keep(c, len);
            c->blen = 0;
            if (len == 0) {
                c->in_frame = 0;
                frame_done(c, now);
            } else if (!c->keep && c->state == S_READY) {
                c_bytes += (int64_t)len;
            }
        } else {
            size_t take = c->rem < n ? (size_t)c->rem : n;
            if (c->keep) buf_append(c, p, take);
            p += take;
            n -= take;
            c->rem -= take;
            if (c->rem == 0) {
                c->in_frame = 0;
                if (!c->keep) {
                    /* An uninspected event frame on a ready connection. */
                    c_frames++;
                    if (!c_first_rx) c_first_rx = now;
                    c_last_rx = now;
                } else {
                    frame_done(c, now);
                }
            }
        }
    }
}

static void http_response(conn_t *c, int64_t now) {
    char *end = memmem(c->buf, c->blen, "\r\n\r\n", 4);
    if (!end) {
        if (c->blen > 8192) finish(c, 2, "HTTP response too long");
        return;
    }
    if (c->blen < 12 || memcmp(c->buf, "HTTP/1.1 101", 12) != 0) {
        char why[80];
        snprintf(why, sizeof why, "upgrade refused: %.40s", c->buf);
        for (char *q = why; *q; q++) if (*q == '\r' || *q == '\n') *q = ' ';
        finish(c, 2, why);
        return;
    }
    size_t head = (size_t)(end - c->buf) + 4;
    size_t extra = c->blen - head;
    static char tmp[1 << 16];
    if (extra > sizeof tmp) extra = sizeof tmp;
    memcpy(tmp, c->buf + head, extra);
    c->blen = 0;
    c->state = o_mode == M_SIO ? S_WAIT_OPEN : S_WAIT_CONNECTED;
    if (extra) feed(c, tmp, extra, now);
}

static void on_readable(conn_t *c) {
    for (;;) {
        ssize_t r = read(c->fd, rbuf, sizeof rbuf);
        if (r > 0) {
            int64_t now = now_ns();
            if (c->state == S_HTTP) {
                buf_append(c, rbuf, (size_t)r);
                http_response(c, now);
            } else {
                feed(c, rbuf, (size_t)r, now);
            }
            if (c->state == S_DONE) return;
            if ((size_t)r < sizeof rbuf) return;
            continue;
        }
        if (r == 0) {
            finish(c, 3, "connection closed by the server");
            return;
        }
        if (errno == EAGAIN || errno == EINTR) return;
        finish(c, errno == ECONNREFUSED ? 1 : 4, strerror(errno));
        return;
    }
}

/* Connection idx goes to the (idx mod number of ports)-th port given. */
static int port_of(int idx) { return o_nports ? o_ports[idx % o_nports] : o_port; }

static void send_request(conn_t *c, int idx) {
    char req[10240];
    const char *tok = ntokens ? tokens[idx % ntokens] : "none";
    const char *sep = strchr(o_path, '?') ? "&" : "?";
    int n = snprintf(req, sizeof req,
                     "GET %s%stoken=%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     o_path, sep, tok, o_host, port_of(idx));
    if (n <= 0 || n >= (int)sizeof req) {
        finish(c, 0, "request too long");
        return;
    }
    ssize_t w = write(c->fd, req, (size_t)n);
    if (w != n) {
        finish(c, 4, "cannot write the upgrade request");
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)idx + 1};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->state = S_HTTP;
}

static void start_conn(int idx) {
    conn_t *c = &conns[idx];
    int64_t now = now_ns();
    if (!t_first_start) t_first_start = now;
    c->started = now;
    c->sampled = (uint8_t)(o_sample_every > 0 && idx % o_sample_every == 0);
    inflight++;
    c->state = S_CONNECTING;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->fd = -1;
        c->state = S_HTTP; /* so that finish() counts it */
        n_failed++;
        inflight--;
        f_other++;
        snprintf(last_error, sizeof last_error, "socket: %s", strerror(errno));
        c->state = S_DONE;
        return;
    }
    c->fd = fd;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (o_conns > o_per_ip) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(idx / o_per_ip));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) {
            struct epoll_event dummy = {0};
            (void)dummy;
            c->state = S_HTTP;
            close(fd);
            c->fd = -1;
            n_failed++;
            inflight--;
            f_other++;
            snprintf(last_error, sizeof last_error, "bind: %s", strerror(errno));
            c->state = S_DONE;
            return;
        }
    }
    struct sockaddr_in dst = {.sin_family = AF_INET,
                              .sin_port = htons((uint16_t)port_of(idx))};
    inet_pton(AF_INET, o_host, &dst.sin_addr);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                             .data.u64 = (uint64_t)idx + 1};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) != 0 && errno != EINPROGRESS) {
        char why[96];
        snprintf(why, sizeof why, "connect: %s", strerror(errno));
        finish(c, errno == ECONNREFUSED ? 1 : 4, why);
    }
}

static void on_event(conn_t *c, int idx, uint32_t events) {
    if (c->state == S_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                char why[96];
                snprintf(why, sizeof why, "connect: %s", strerror(err));
                finish(c, err == ECONNREFUSED ? 1 : 4, why);
                return;
            }
            send_request(c, idx);
        }
        return;
    }
    if (events & EPOLLIN) on_readable(c);
    if (c->state != S_DONE && (events & (EPOLLERR | EPOLLHUP))) {
        finish(c, 3, "connection reset");
    }
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct(double q) {
    if (!lat_n) return 0;
    size_t i = (size_t)(q * (double)lat_n);
    if (i >= lat_n) i = lat_n - 1;
    return (double)lat[i] / 1000.0;
}

static void report_ready(void) {
    printf("{\"event\":\"ready\",\"ok\":%d,\"connected\":%d,\"failed\":%d,"
           "\"t_first_start\":%lld,\"t_last_connected\":%lld,\"t_last_ready\":%lld,"
           "\"fail\":{\"refused\":%d,\"http\":%d,\"closed\":%d,\"error\":%d,\"timeout\":%d,"
           "\"other\":%d},\"last_error\":\"%s\"}\n",
           n_ready, n_connected, n_failed, (long long)t_first_start,
           (long long)t_last_connected, (long long)t_last_ready, f_refused, f_http, f_closed,
           f_error, f_timeout, f_other, last_error);
    fflush(stdout);
    ready_reported = 1;
}

static void report_done(const char *reason, int64_t now) {
    double mean = 0;
    if (lat_n) {
        qsort(lat, lat_n, sizeof *lat, cmp_i64);
        long double sum = 0;
        for (size_t i = 0; i < lat_n; i++) sum += lat[i];
        mean = (double)(sum / lat_n) / 1000.0;
    }
    printf("{\"event\":\"done\",\"reason\":\"%s\",\"frames\":%lld,\"bytes\":%lld,"
           "\"t_start\":%lld,\"t_end\":%lld,\"first_rx\":%lld,\"last_rx\":%lld,"
           "\"open\":%d,\"closed_after_ready\":%lld,\"write_errors\":%lld,\"close_codes\":{",
           reason, (long long)c_frames, (long long)c_bytes, (long long)m_start, (long long)now,
           (long long)c_first_rx, (long long)c_last_rx, n_ready - (int)closed_after_ready,
           (long long)closed_after_ready, (long long)write_errors);
    int first = 1;
    for (int i = 0; i < 5000; i++) {
        if (close_codes[i]) {
            printf("%s\"%d\":%d", first ? "" : ",", i, close_codes[i]);
            first = 0;
        }
    }
    printf("},\"lat\":{\"count\":%zu,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
           "\"p999_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f}}\n",
           lat_n, pct(0.50), pct(0.90), pct(0.99), pct(0.999),
           lat_n ? (double)lat[lat_n - 1] / 1000.0 : 0.0, mean);
    fflush(stdout);
    measuring = 0;
}

static void close_all_and_exit(void) {
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < o_conns; i++) {
        if (conns[i].fd >= 0 && conns[i].state != S_DONE && conns[i].state != S_IDLE) {
            setsockopt(conns[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(conns[i].fd);
        }
    }
    exit(0);
}

static void command(char *line) {
    long long expected = 0, idle_ms = 5000, max_ms = 600000;
    if (strncmp(line, "measure", 7) == 0) {
        sscanf(line + 7, "%lld %lld %lld", &expected, &idle_ms, &max_ms);
        m_expected = expected;
        m_idle_ns = idle_ms * 1000000LL;
        m_max_ns = max_ms * 1000000LL;
        m_start = now_ns();
        c_frames = c_bytes = c_first_rx = c_last_rx = 0;
        lat_n = 0;
        closed_after_ready = 0;
        write_errors = 0;
        memset(close_codes, 0, sizeof close_codes);
        measuring = 1;
        printf("{\"event\":\"measuring\",\"t\":%lld}\n", (long long)m_start);
        fflush(stdout);
    } else if (strncmp(line, "quit", 4) == 0) {
        close_all_and_exit();
    } else if (strncmp(line, "stats", 5) == 0) {
        printf("{\"event\":\"stats\",\"frames\":%lld,\"ready\":%d,\"failed\":%d}\n",
               (long long)c_frames, n_ready, n_failed);
        fflush(stdout);
    }
}

static void on_stdin(void) {
    static char line[4096];
    static size_t used;
    for (;;) {
        ssize_t r = read(0, line + used, sizeof line - 1 - used);
        if (r == 0) close_all_and_exit();
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            close_all_and_exit();
        }
        used += (size_t)r;
        line[used] = 0;
        char *nl;
        while ((nl = memchr(line, '\n', used)) != NULL) {
            *nl = 0;
            command(line);
            size_t rest = used - (size_t)(nl + 1 - line);
            memmove(line, nl + 1, rest);
            used = rest;
            line[used] = 0;
        }
        if (used >= sizeof line - 1) used = 0;
    }
}

static void load_tokens(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open the tokens file");
    size_t cap = 1024;
    tokens = malloc(cap * sizeof *tokens);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t n;
    while ((n = getline(&line, &lcap, f)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (!n) continue;
        if ((size_t)ntokens == cap) {
            cap *= 2;
            tokens = realloc(tokens, cap * sizeof *tokens);
        }
        tokens[ntokens++] = strdup(line);
    }
    free(line);
    fclose(f);
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) o_host = v;
        else if (!strcmp(k, "--port")) o_port = atoi(v);
        else if (!strcmp(k, "--ports")) {
            /* comma-separated: connections are spread over these ports, round robin */
            char *copy = strdup(v), *save = NULL;
            for (char *tok = strtok_r(copy, ",", &save); tok && o_nports < 16;
                 tok = strtok_r(NULL, ",", &save))
                o_ports[o_nports++] = atoi(tok);
            free(copy);
        }
        else if (!strcmp(k, "--mode"))
            o_mode = !strcmp(v, "socketio") ? M_SIO : !strcmp(v, "floor") ? M_FLOOR : M_TIDINGS;
        else if (!strcmp(k, "--conns")) o_conns = atoi(v);
        else if (!strcmp(k, "--tokens")) o_tokens = v;
        else if (!strcmp(k, "--path")) o_path = v;
        else if (!strcmp(k, "--channel")) o_channel = v;
        else if (!strcmp(k, "--subscribe")) o_subscribe = atoi(v);
        else if (!strcmp(k, "--concurrency")) o_concurrency = atoi(v);
        else if (!strcmp(k, "--sample-every")) o_sample_every = atoi(v);
        else if (!strcmp(k, "--per-ip")) o_per_ip = atoi(v);
        else if (!strcmp(k, "--setup-timeout-ms")) o_setup_timeout_ms = atoll(v);
        else {
            fprintf(stderr, "tidings-bench-gen: unknown option %s\n", k);
            return 2;
        }
    }
    if (o_conns < 1 || o_concurrency < 1 || o_per_ip < 1) {
        fprintf(stderr, "tidings-bench-gen: bad numbers\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (o_tokens) load_tokens(o_tokens);
    srand((unsigned)now_ns());
    for (int i = 0; i < 4; i++) mask_key[i] = (uint8_t)(rand() & 0xff);
    conns = calloc((size_t)o_conns, sizeof *conns);
    if (!conns) die("out of memory");
    for (int i = 0; i < o_conns; i++) conns[i].fd = -1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = 0};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev);

    static struct epoll_event evs[1024];
    int64_t setup_deadline = now_ns() + o_setup_timeout_ms * 1000000LL;
    for (;;) {
        while (next_conn < o_conns && inflight < o_concurrency) start_conn(next_conn++);
        int n = epoll_wait(epfd, evs, 1024, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            uint64_t id = evs[i].data.u64;
            if (id == 0) {
                on_stdin();
                continue;
            }
            int idx = (int)(id - 1);
            conn_t *c = &conns[idx];
            if (c->state == S_DONE || c->fd < 0) continue;
            on_event(c, idx, evs[i].events);
        }
        int64_t now = now_ns();
        if (!ready_reported) {
            if (now > setup_deadline) {
                for (int i = 0; i < o_conns; i++) {
                    conn_t *c = &conns[i];
                    if (c->state != S_READY && c->state != S_DONE && c->state != S_IDLE)
                        finish(c, 5, "setup timed out");
                }
                next_conn = o_conns;
            }
            if (next_conn == o_conns && n_ready + n_failed == o_conns) report_ready();
        }
        if (measuring) {
            int64_t last = c_last_rx > m_start ? c_last_rx : m_start;
            if (c_frames >= m_expected) report_done("complete", now);
            else if (now - last > m_idle_ns) report_done("idle", now);
            else if (now - m_start > m_max_ns) report_done("max", now);
        }
    }
}
