/* Closed-loop UDP load generator for NTP benchmarks.
 *
 * Strategy: keep a fixed window of requests in flight on one socket, send a new request for every
 * reply received, batch with sendmmsg/recvmmsg, and refill the window when nothing has come back
 * for a while (lost packets). Counts only replies that look like NTP mode 4 packets.
 * Usage: loadgen HOST PORT SECONDS WINDOW HEXPACKET [HEXPACKET...]
 * Prints: "replies=N seconds=S rate=R other=K sent=N interleaved=I rtt_us=T" on one line (T: the
 * mean round trip, measured with WINDOW 1 only).
 * LOADGEN_RATE=R caps the requests sent to R per second (a partial load, for accuracy runs).
 * LOADGEN_XLEAVE=1 sends NTPv4 requests in interleaved mode (RFC 9769): each quotes, as its origin,
 * the receive timestamp of a reply received earlier, with receive and transmit fields of its own
 * (marked 0xAB and 0xCD in their top byte); a reply whose origin carries the 0xAB mark is counted
 * as interleaved.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXPKT 2048
#define BATCH 64
#define MAXTEMPLATES 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int unhex(const char *s, unsigned char *out, int max) {
    int n = (int)strlen(s) / 2;
    if (n > max) return -1;
    for (int i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (unsigned char)v;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s HOST PORT SECONDS WINDOW HEXPACKET...\n", argv[0]);
        return 2;
    }
    static unsigned char tmpl[MAXTEMPLATES][MAXPKT];
    int tlen[MAXTEMPLATES], ntmpl = 0;
    for (int i = 5; i < argc && ntmpl < MAXTEMPLATES; i++) {
        tlen[ntmpl] = unhex(argv[i], tmpl[ntmpl], MAXPKT);
        if (tlen[ntmpl] < 48) { fprintf(stderr, "bad packet hex\n"); return 2; }
        ntmpl++;
    }
    double seconds = atof(argv[3]);
    int window = atoi(argv[4]);
    struct addrinfo hints = {0}, *ai;
    hints.ai_socktype = SOCK_DGRAM;
    if (getaddrinfo(argv[1], argv[2], &hints, &ai) != 0) { fprintf(stderr, "bad address\n"); return 2; }
    int fd = socket(ai->ai_family, SOCK_DGRAM, 0);
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) { perror("connect"); return 2; }

    static unsigned char rbuf[BATCH][MAXPKT];
    struct mmsghdr rmsgs[BATCH], smsgs[BATCH];
    struct iovec riov[BATCH], siov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        riov[i].iov_base = rbuf[i];
        riov[i].iov_len = MAXPKT;
        memset(&rmsgs[i], 0, sizeof rmsgs[i]);
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
        memset(&smsgs[i], 0, sizeof smsgs[i]);
        smsgs[i].msg_hdr.msg_iov = &siov[i];
        smsgs[i].msg_hdr.msg_iovlen = 1;
    }
    long replies = 0, shortr = 0, sent = 0, interleaved = 0;
    const char *rate_env = getenv("LOADGEN_RATE");
    double rate = rate_env ? atof(rate_env) : 0;
    int xleave = getenv("LOADGEN_XLEAVE") != NULL;
    static unsigned char sbuf[BATCH][MAXPKT];
    static unsigned char seen[4096][8];  /* receive timestamps of replies, quoted by later requests */
    unsigned long nseen = 0, quoted = 0;
    int inflight = 0, next = 0;
    double start = now(), last_rx = start, end = start + seconds;
    double sent_at = 0, rtt_sum = 0;  /* with window 1: each answered request's round trip */
    long rtt_n = 0;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (1) {
        double t = now();
        if (t >= end) break;
        if (t - last_rx > 0.02) { inflight = 0; last_rx = t; }
        int want = window - inflight;
        if (rate > 0) {
            long allowed = (long)(rate * (t - start)) - sent;
            if (want > allowed) want = (int)allowed;
        }
        while (want > 0) {
            int n = want < BATCH ? want : BATCH;
            for (int i = 0; i < n; i++) {
                siov[i].iov_base = tmpl[next];
                siov[i].iov_len = tlen[next];
                if (xleave && tlen[next] >= 48) {
                    memcpy(sbuf[i], tmpl[next], tlen[next]);
                    if (quoted < nseen) memcpy(sbuf[i] + 24, seen[quoted++ % 4096], 8);
                    unsigned long long r = 0xAB00000000000000ULL | (unsigned long long)sent;
                    unsigned long long x = 0xCD00000000000000ULL | (unsigned long long)sent;
                    for (int b = 0; b < 8; b++) {
                        sbuf[i][32 + b] = (unsigned char)(r >> (56 - 8 * b));
                        sbuf[i][40 + b] = (unsigned char)(x >> (56 - 8 * b));
                    }
                    siov[i].iov_base = sbuf[i];
                }
                next = (next + 1) % ntmpl;
            }
            int s = sendmmsg(fd, smsgs, n, 0);
            if (s <= 0) break;
            if (window == 1) sent_at = now();
            inflight += s; sent += s; want -= s;
        }
        if (poll(&pfd, 1, 5) <= 0) continue;
        int r = recvmmsg(fd, rmsgs, BATCH, MSG_DONTWAIT, NULL);
        if (r <= 0) continue;
        for (int i = 0; i < r; i++) {
            unsigned len = rmsgs[i].msg_len;
            if (len >= 48 && (rbuf[i][0] & 7) == 4 && rbuf[i][1] != 0) replies++; else shortr++;
            if (xleave && len >= 48) {
                if (rbuf[i][24] == 0xAB) interleaved++;
                if (nseen - quoted < 4096) memcpy(seen[nseen++ % 4096], rbuf[i] + 32, 8);
            }
        }
        inflight -= r;
        if (inflight < 0) inflight = 0;
        last_rx = now();
        if (window == 1 && sent_at > 0) { rtt_sum += last_rx - sent_at; rtt_n++; sent_at = 0; }
    }
    double el = now() - start;
    printf("replies=%ld seconds=%.3f rate=%.0f other=%ld sent=%ld interleaved=%ld rtt_us=%.1f\n", replies, el,
           replies / el, shortr, sent, interleaved, rtt_n ? rtt_sum / rtt_n * 1e6 : 0.0);
    return 0;
}
