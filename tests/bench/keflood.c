/* NTS-KE connection flood: many TCP connections that never complete a TLS handshake.
 *
 * Strategy: one epoll loop holds CONNECTIONS non-blocking connections to HOST:PORT, spread over
 * ADDRESSES loopback source addresses (127.1.0.1 upwards; with ADDRESSES 1, 127.0.0.2 alone, so a
 * legitimate client on 127.0.0.1 is never one of them). Each connection is reopened as soon as the
 * server closes or refuses it (as a slowloris attacker does: the connections the server gives up
 * are the ones that come back). MODE idle sends nothing; MODE trickle sends the first bytes of a
 * TLS record header one byte every TRICKLE_MS (200 ms) and never finishes it. Stops by itself
 * after SECONDS. Loopback only: the source addresses are 127/8.
 * Usage: keflood HOST PORT SECONDS CONNECTIONS ADDRESSES idle|trickle
 * Prints: "opened=N closed_by_server=M failed=F"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TRICKLE_MS 200
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static struct sockaddr_in server;
static int addresses, trickle;
static unsigned long opened, closed_by_server, failed;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct conn {
    int fd;
    int sent;  /* header bytes trickled so far */
};

static int open_one(int ep, struct conn *c, int index) {
    struct sockaddr_in src = {.sin_family = AF_INET};
    if (addresses == 1) {
        src.sin_addr.s_addr = htonl(0x7f000002);
    } else {
        unsigned a = (unsigned)(index % addresses);
        src.sin_addr.s_addr = htonl(0x7f010001 + ((a / 250) << 8) + (a % 250));
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        failed++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0 ||
        (connect(fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS)) {
        close(fd);
        failed++;
        return -1;
    }
    c->fd = fd;
    c->sent = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (unsigned)index};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    opened++;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: keflood HOST PORT SECONDS CONNECTIONS ADDRESSES idle|trickle\n");
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) return 2;
    double seconds = atof(argv[3]);
    int n = atoi(argv[4]);
    addresses = atoi(argv[5]);
    trickle = strcmp(argv[6], "trickle") == 0;
    if (n < 1 || addresses < 1) return 2;
    struct rlimit rl = {(rlim_t)n + 64, (rlim_t)n + 64};
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) perror("setrlimit");
    struct conn *conns = calloc((size_t)n, sizeof *conns);
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        conns[i].fd = -1;
        open_one(ep, &conns[i], i);
    }
    static const unsigned char header[5] = {0x16, 0x03, 0x01, 0x02, 0x00};
    struct epoll_event events[256];
    double start = now(), end = start + seconds, next_trickle = start + TRICKLE_MS / 1000.0;
    while (now() < end) {
        int got = epoll_wait(ep, events, 256, 20);
        for (int k = 0; k < got; k++) {
            struct conn *c = &conns[events[k].data.u32];
            if (c->fd < 0) continue;
            char buf[512];
            ssize_t r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r > 0) continue;  /* an alert or the like: wait for the close */
            if (r < 0 && errno == EAGAIN) continue;
            close(c->fd);  /* the server closed or refused it: come straight back */
            c->fd = -1;
            closed_by_server++;
            open_one(ep, c, (int)events[k].data.u32);
        }
        double t = now();
        for (int i = 0; i < n; i++)  /* descriptors lost to a failed reopen are retried */
            if (conns[i].fd < 0 && (i & 63) == ((int)(t * 50) & 63)) open_one(ep, &conns[i], i);
        if (trickle && t >= next_trickle) {
            next_trickle = t + TRICKLE_MS / 1000.0;
            for (int i = 0; i < n; i++) {
                struct conn *c = &conns[i];
                if (c->fd >= 0 && c->sent < (int)sizeof header && send(c->fd, header + c->sent, 1, MSG_NOSIGNAL) == 1)
                    c->sent++;
            }
        }
    }
    printf("opened=%lu closed_by_server=%lu failed=%lu\n", opened, closed_by_server, failed);
    return 0;
}
