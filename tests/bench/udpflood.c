/* UDP flood on loopback: NTP requests from many source addresses, or malformed datagrams.
 *
 * Strategy: one socket bound to 0.0.0.0:SPORT sends with sendmmsg, each datagram's source address
 * set by an IP_PKTINFO control message (ipi_spec_dst): every address of 127/8 is local, so no raw
 * socket is needed and the server's replies come back to this socket, where they are counted.
 * MODE spoofed sends the 48-byte request HEX from ADDRESSES distinct sources (127.1.0.0 onwards,
 * cycling); MODE malformed sends datagrams of 1 to 120 random bytes (first byte random too) from
 * as many sources. It sends at most RATE datagrams per second (0: as fast as it can) and stops
 * by itself after SECONDS. Loopback only.
 * Usage: udpflood HOST PORT SECONDS RATE ADDRESSES spoofed|malformed [HEX]
 * Prints: "sent=N replies=R seconds=S"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: udpflood HOST PORT SECONDS RATE ADDRESSES spoofed|malformed [HEX]\n");
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) return 2;
    double seconds = atof(argv[3]), rate = atof(argv[4]);
    unsigned long addresses = strtoul(argv[5], NULL, 10);
    int malformed = strcmp(argv[6], "malformed") == 0;
    unsigned char request[48] = {0x23};
    if (!malformed) {
        if (argc < 8 || strlen(argv[7]) != 96) return 2;
        for (int i = 0; i < 48; i++) sscanf(argv[7] + 2 * i, "%2hhx", &request[i]);
    }
    if (addresses < 1 || addresses > 254UL * 65536) return 2;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
    int big = 1 << 22;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind(fd, (struct sockaddr *)&any, sizeof any) < 0) {
        perror("bind");
        return 1;
    }
    static unsigned char payload[BATCH][128];
    static char control[BATCH][CMSG_SPACE(sizeof(struct in_pktinfo))];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    static unsigned char rbuf[BATCH][512];
    struct mmsghdr rmsgs[BATCH];
    struct iovec riov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        riov[i].iov_base = rbuf[i];
        riov[i].iov_len = sizeof rbuf[i];
        memset(&rmsgs[i], 0, sizeof rmsgs[i]);
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long sent = 0, replies = 0, next_source = 0;
    unsigned int seed = 12345;
    double start = now(), end = start + seconds;
    while (now() < end) {
        int want = BATCH;
        if (rate > 0) {
            long allowed = (long)(rate * (now() - start)) - (long)sent;
            if (allowed < want) want = allowed > 0 ? (int)allowed : 0;
        }
        for (int i = 0; i < want; i++) {
            unsigned long a = next_source++ % addresses;
            struct in_pktinfo info = {0};
            info.ipi_spec_dst.s_addr = htonl(0x7f010000u + (unsigned)((a / 65536) << 16) + (unsigned)(a % 65536));
            if ((info.ipi_spec_dst.s_addr & htonl(0xff)) == 0) info.ipi_spec_dst.s_addr |= htonl(1);
            size_t len = 48;
            if (malformed) {
                len = 1 + (size_t)(rand_r(&seed) % 120);
                for (size_t k = 0; k < len; k++) payload[i][k] = (unsigned char)rand_r(&seed);
            } else {
                memcpy(payload[i], request, 48);
            }
            iov[i].iov_base = payload[i];
            iov[i].iov_len = len;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_name = &dst;
            msgs[i].msg_hdr.msg_namelen = sizeof dst;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = control[i];
            msgs[i].msg_hdr.msg_controllen = sizeof control[i];
            struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr);
            c->cmsg_level = IPPROTO_IP;
            c->cmsg_type = IP_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof info);
            memcpy(CMSG_DATA(c), &info, sizeof info);
        }
        if (want > 0) {
            int n = sendmmsg(fd, msgs, (unsigned)want, 0);
            if (n > 0) sent += (unsigned long)n;
        }
        int got = recvmmsg(fd, rmsgs, BATCH, MSG_DONTWAIT, NULL);
        if (got > 0) replies += (unsigned long)got;
        if (want == 0) usleep(200);
    }
    for (int k = 0; k < 50; k++) {  /* replies still on their way */
        int got = recvmmsg(fd, rmsgs, BATCH, MSG_DONTWAIT, NULL);
        if (got > 0) replies += (unsigned long)got;
        else usleep(1000);
    }
    printf("sent=%lu replies=%lu seconds=%.3f\n", sent, replies, now() - start);
    return 0;
}
