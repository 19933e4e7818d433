/* NTS-KE handshake load generator: parallel TLS 1.3 sessions, each a full NTS-KE exchange.
 *
 * Strategy: THREADS threads each loop: connect, TLS 1.3 handshake with ALPN ntske/1 (no
 * certificate verification: we measure the server, not our client), send one NTS-KE request
 * (NTPv4, AES-SIV-CMAC-256), read until the response's End of Message (as real clients do; waiting
 * for the server's close instead adds a Nagle/delayed-ACK stall of ~40 ms with some servers), and
 * count the session as good only if the response holds an AEAD record and at least one cookie.
 * No session resumption.
 * Usage: keload HOST PORT SECONDS THREADS
 * Prints: "sessions=N seconds=S rate=R failed=F"
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const unsigned char REQUEST[] = {0x80, 0x01, 0x00, 0x02, 0x00, 0x00, 0x80, 0x04, 0x00, 0x02,
                                        0x00, 0x0f, 0x80, 0x00, 0x00, 0x00};
static const unsigned char ALPN[] = {7, 'n', 't', 's', 'k', 'e', '/', '1'};

static struct addrinfo *target;
static SSL_CTX *ctx;
static double end_time;
static long good[256], failed[256];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* 1: a complete good response; 0: incomplete so far; -1: complete but bad */
static int response_state(const unsigned char *buf, int len) {
    int pos = 0, aead = 0, cookies = 0;
    while (pos + 4 <= len) {
        int type = ((buf[pos] << 8) | buf[pos + 1]) & 0x7fff, blen = (buf[pos + 2] << 8) | buf[pos + 3];
        if (pos + 4 + blen > len) return 0;
        if (type == 4 && blen == 2) aead = 1;
        if (type == 5) cookies++;
        if (type == 0) return aead && cookies > 0 ? 1 : -1;
        pos += 4 + blen;
    }
    return 0;
}

static int one_session(void) {
    int fd = socket(target->ai_family, SOCK_STREAM, 0), one = 1, ok = 0, len = 0, n;
    unsigned char buf[8192];
    if (fd < 0) return 0;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, target->ai_addr, target->ai_addrlen) != 0) { close(fd); return 0; }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1 && SSL_write(ssl, REQUEST, sizeof REQUEST) == (int)sizeof REQUEST) {
        while (len < (int)sizeof buf && (n = SSL_read(ssl, buf + len, sizeof buf - len)) > 0) {
            len += n;
            if ((ok = response_state(buf, len)) != 0) break;
        }
        ok = ok == 1;
    }
    SSL_free(ssl);
    close(fd);
    return ok;
}

static void *worker(void *arg) {
    long i = (long)arg;
    while (now() < end_time) {
        if (one_session()) good[i]++; else failed[i]++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s HOST PORT SECONDS THREADS\n", argv[0]); return 2; }
    struct addrinfo hints = {0};
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(argv[1], argv[2], &hints, &target) != 0) { fprintf(stderr, "bad address\n"); return 2; }
    int threads = atoi(argv[4]);
    if (threads < 1 || threads > 256) threads = 16;
    signal(SIGPIPE, SIG_IGN); /* a refused connection must count as a failure, not kill us */
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_alpn_protos(ctx, ALPN, sizeof ALPN);
    double start = now();
    end_time = start + atof(argv[3]);
    pthread_t tids[256];
    for (long i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, (void *)i);
    long total = 0, bad = 0;
    for (int i = 0; i < threads; i++) { pthread_join(tids[i], NULL); total += good[i]; bad += failed[i]; }
    double el = now() - start;
    printf("sessions=%ld seconds=%.3f rate=%.0f failed=%ld\n", total, el, total / el, bad);
    return 0;
}
