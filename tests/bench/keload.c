/* NTS-KE handshake load generator: parallel TLS 1.3 sessions, each a full NTS-KE exchange.
 *
 * Strategy: THREADS threads each loop: connect, TLS 1.3 handshake with ALPN ntske/1 (no
 * certificate verification: we measure the server, not our client), send one NTS-KE request
 * (NTPv4, AES-SIV-CMAC-256), read until the response's End of Message (as real clients do; waiting
 * for the server's close instead adds a Nagle/delayed-ACK stall of ~40 ms with some servers), and
 * count the session as good only if the response holds an AEAD record and at least one cookie.
 * No session resumption.
 *
 * Two client TLS stacks, because what the client offers changes the server's work:
 * - OpenSSL (default build): one X25519 key share, offers session tickets (psk_key_exchange_modes),
 *   so an OpenSSL server sends two NewSessionTickets per session. NTPsec's client is OpenSSL.
 * - GnuTLS (built with -DKELOAD_GNUTLS): chrony's own NTS-KE client settings (GNUTLS_NO_TICKETS,
 *   the default priorities with everything below TLS 1.3 removed): P-256 and X25519 key shares, no
 *   tickets. chrony is the most common NTS client.
 * - tls13lite.c (built with -DKELOAD_LITE tls13lite.c -lcrypto): chrony's ClientHello from a
 *   load-only client that costs a fraction of a server's session, so one core saturates chrony
 *   (the two library clients above cannot with EC certificates: a client's ECDSA verify and key
 *   shares cost more than the server's sign). See its top comment for what it leaves out.
 * KELOAD_PROXY=1 begins each connection with a PROXY protocol v2 header (TCP over IPv4, the
 * connection's own addresses), as a load balancer with send-proxy-v2 does.
 * Usage: keload HOST PORT SECONDS THREADS
 * Prints: "sessions=N seconds=S rate=R failed=F"
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

const unsigned char REQUEST[16] = {0x80, 0x01, 0x00, 0x02, 0x00, 0x00, 0x80, 0x04, 0x00, 0x02,
                                        0x00, 0x0f, 0x80, 0x00, 0x00, 0x00};
int response_state(const unsigned char *buf, int len);

/* The TLS part: tls_setup() once, then tls_exchange() per connected socket (1: a good response). */
#if defined(KELOAD_LITE)
int tls_setup(void); /* tls13lite.c */
int tls_exchange(int fd, unsigned char *buf, int size);
#elif defined(KELOAD_GNUTLS)
#include <gnutls/gnutls.h>

static gnutls_certificate_credentials_t credentials;
static gnutls_priority_t priority;

static int tls_setup(void) {
    if (gnutls_global_init() < 0 || gnutls_certificate_allocate_credentials(&credentials) < 0) return 0;
    return gnutls_priority_init2(&priority, "-VERS-SSL3.0:-VERS-TLS1.0:-VERS-TLS1.1:-VERS-TLS1.2:-VERS-DTLS-ALL",
                                 NULL, GNUTLS_PRIORITY_INIT_DEF_APPEND) >= 0;
}

static int tls_exchange(int fd, unsigned char *buf, int size) {
    gnutls_session_t s;
    gnutls_datum_t alpn = {(unsigned char *)"ntske/1", 7};
    int ok = 0, len = 0, r;
    if (gnutls_init(&s, GNUTLS_CLIENT | GNUTLS_NO_TICKETS) < 0) return 0;
    gnutls_priority_set(s, priority);
    gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, credentials);
    gnutls_alpn_set_protocols(s, &alpn, 1, 0);
    gnutls_transport_set_int(s, fd);
    do { r = gnutls_handshake(s); } while (r < 0 && !gnutls_error_is_fatal(r));
    if (r == 0 && gnutls_record_send(s, REQUEST, sizeof REQUEST) == (ssize_t)sizeof REQUEST) {
        while (len < size) {
            r = gnutls_record_recv(s, buf + len, size - len);
            if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) continue;
            if (r <= 0) break;
            len += r;
            if ((ok = response_state(buf, len)) != 0) break;
        }
    }
    gnutls_deinit(s);
    return ok == 1;
}
#else
#include <openssl/ssl.h>

static const unsigned char ALPN[] = {7, 'n', 't', 's', 'k', 'e', '/', '1'};
static SSL_CTX *ctx;

static int tls_setup(void) {
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) return 0;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    return SSL_CTX_set_alpn_protos(ctx, ALPN, sizeof ALPN) == 0;
}

static int tls_exchange(int fd, unsigned char *buf, int size) {
    int ok = 0, len = 0, n;
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL) return 0;
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1 && SSL_write(ssl, REQUEST, sizeof REQUEST) == (int)sizeof REQUEST) {
        while (len < size && (n = SSL_read(ssl, buf + len, size - len)) > 0) {
            len += n;
            if ((ok = response_state(buf, len)) != 0) break;
        }
    }
    SSL_free(ssl);
    return ok == 1;
}
#endif

static struct addrinfo *target;
static double end_time;
static long good[256], failed[256];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* 1: a complete good response; 0: incomplete so far; -1: complete but bad */
int response_state(const unsigned char *buf, int len) {
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

static int proxy_header;  /* KELOAD_PROXY: send a PROXY v2 header first */

static int send_proxy_header(int fd) {
    struct sockaddr_in me, peer;
    socklen_t a = sizeof me, b = sizeof peer;
    if (getsockname(fd, (struct sockaddr *)&me, &a) < 0 || getpeername(fd, (struct sockaddr *)&peer, &b) < 0 ||
        me.sin_family != AF_INET)
        return 0;
    unsigned char h[28] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12};
    memcpy(h + 16, &me.sin_addr, 4);
    memcpy(h + 20, &peer.sin_addr, 4);
    memcpy(h + 24, &me.sin_port, 2);
    memcpy(h + 26, &peer.sin_port, 2);
    return send(fd, h, sizeof h, MSG_NOSIGNAL) == (ssize_t)sizeof h;
}

static int one_session(void) {
    int fd = socket(target->ai_family, SOCK_STREAM, 0), one = 1, ok = 0;
    unsigned char buf[8192];
    if (fd < 0) return 0;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, target->ai_addr, target->ai_addrlen) == 0 && (!proxy_header || send_proxy_header(fd)))
        ok = tls_exchange(fd, buf, sizeof buf);
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
    proxy_header = getenv("KELOAD_PROXY") != NULL;
    if (!tls_setup()) { fprintf(stderr, "TLS set-up failed\n"); return 2; }
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
