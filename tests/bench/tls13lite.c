/* A minimal TLS 1.3 client for keload.c (built with -DKELOAD_LITE): load generation only.
 *
 * Strategy: what a server does per NTS-KE session must not change, only what the client spends.
 * A full client library spends more on a handshake than the server does (an ECDSA verify and
 * chain checks against the server's sign, two key-share generations), so one core of it cannot
 * saturate chrony's NTS-KE helper and a benchmark on two cores would measure the load generator.
 * This client sends the ClientHello that chrony's own client sends (GnuTLS with chrony's settings:
 * the same suites, groups, signature algorithms and extensions in the same order, P-256 and X25519
 * key shares, no session tickets; checked against a capture of that client with tshark's JA3), so
 * each server picks and does what it does for chrony's clients. What it leaves out is client-side
 * only: its two key shares are made once and reused (the server still makes a fresh one and does
 * its half of the exchange), the server's certificate, signature and Finished are not checked (the
 * server checks ours, so a wrong key schedule fails the session), and records are read blocking.
 * NOT a TLS implementation to use for anything else: it authenticates no one.
 *
 * Key schedule and records as RFC 8446 sections 7.1-7.3 and 5.2: HKDF with HMAC (SHA-256 or
 * SHA-384 by the suite), AES-GCM or ChaCha20-Poly1305, nonce = IV xor sequence number.
 */
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define REC_MAX (16384 + 256)

int tls_setup(void);
int tls_exchange(int fd, unsigned char *buf, int size);
int response_state(const unsigned char *buf, int len);

extern const unsigned char REQUEST[16]; /* keload.c's NTS-KE request */

static EC_GROUP *p256;
static BIGNUM *p256_priv;
static unsigned char p256_pub[65];
static EVP_PKEY *x25519_priv;
static unsigned char x25519_pub[32];
static unsigned char hello[512]; /* the ClientHello handshake message; random bytes set per session */
static int hello_len, hello_random_at;
static unsigned char early_derived[2][48]; /* Derive-Secret(Early Secret, "derived", "") per hash */
static unsigned char empty_hash[2][48];    /* Hash("") per hash: SHA-256, SHA-384 */

struct suite {
    const EVP_MD *md;
    const EVP_CIPHER *cipher;
    int hash_len, key_len;
};

static int put16(unsigned char *p, int v) { p[0] = v >> 8; p[1] = v; return 2; }

/* HKDF-Expand-Label(secret, label, context, out_len); out_len <= 2 hash lengths */
static int expand_label(const struct suite *s, const unsigned char *secret, const char *label,
                        const unsigned char *ctx, int ctx_len, unsigned char *out, int out_len) {
    unsigned char info[128 + 3], t[64], block[128 + 64 + 1];
    int label_len = (int)strlen(label), info_len = 0, done = 0, tlen = 0;
    unsigned int mlen;
    info_len += put16(info, out_len);
    info[info_len++] = (unsigned char)(6 + label_len);
    memcpy(info + info_len, "tls13 ", 6);
    memcpy(info + info_len + 6, label, label_len);
    info_len += 6 + label_len;
    info[info_len++] = (unsigned char)ctx_len;
    memcpy(info + info_len, ctx, ctx_len);
    info_len += ctx_len;
    for (int i = 1; done < out_len; i++) {
        memcpy(block, t, tlen);
        memcpy(block + tlen, info, info_len);
        block[tlen + info_len] = (unsigned char)i;
        if (HMAC(s->md, secret, s->hash_len, block, tlen + info_len + 1, t, &mlen) == NULL) return 0;
        tlen = (int)mlen;
        memcpy(out + done, t, out_len - done < tlen ? out_len - done : tlen);
        done += tlen;
    }
    return 1;
}

static int extract(const struct suite *s, const unsigned char *salt, const unsigned char *ikm, int ikm_len,
                   unsigned char *out) {
    unsigned int len;
    return HMAC(s->md, salt, s->hash_len, ikm, ikm_len, out, &len) != NULL;
}

static int transcript_hash(EVP_MD_CTX *th, unsigned char *out) {
    EVP_MD_CTX *copy = EVP_MD_CTX_new();
    int ok = copy != NULL && EVP_MD_CTX_copy_ex(copy, th) && EVP_DigestFinal_ex(copy, out, NULL);
    EVP_MD_CTX_free(copy);
    return ok;
}

/* One direction of record protection. */
struct keys {
    const EVP_CIPHER *cipher;
    unsigned char key[32], iv[12];
    uint64_t seq;
};

static int traffic_keys(const struct suite *s, const unsigned char *secret, struct keys *k) {
    k->cipher = s->cipher;
    k->seq = 0;
    return expand_label(s, secret, "key", NULL, 0, k->key, s->key_len) && expand_label(s, secret, "iv", NULL, 0, k->iv, 12);
}

/* Seal (enc=1: in -> out, out gets in_len + 16) or open (enc=0: in holds in_len + 16) one record body. */
static int aead(struct keys *k, int enc, const unsigned char *aad, const unsigned char *in, int in_len,
                unsigned char *out) {
    unsigned char nonce[12];
    int len, ok;
    memcpy(nonce, k->iv, 12);
    for (int i = 0; i < 8; i++) nonce[11 - i] ^= (unsigned char)(k->seq >> (8 * i));
    k->seq++;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL) return 0;
    ok = EVP_CipherInit_ex(c, k->cipher, NULL, k->key, nonce, enc) && EVP_CipherUpdate(c, NULL, &len, aad, 5) &&
         EVP_CipherUpdate(c, out, &len, in, in_len) &&
         (enc || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, 16, (void *)(in + in_len))) &&
         EVP_CipherFinal_ex(c, out + len, &len) &&
         (!enc || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, out + in_len));
    EVP_CIPHER_CTX_free(c);
    return ok;
}

/* Buffered blocking reads of whole records. */
struct reader {
    int fd, start, end;
    unsigned char buf[2 * REC_MAX];
};

static unsigned char *next_record(struct reader *r, int *type, int *len) {
    for (;;) {
        int have = r->end - r->start;
        if (have >= 5) {
            int body = (r->buf[r->start + 3] << 8) | r->buf[r->start + 4];
            if (body > REC_MAX) return NULL;
            if (have >= 5 + body) {
                unsigned char *rec = r->buf + r->start;
                *type = rec[0];
                *len = body;
                r->start += 5 + body;
                return rec;
            }
        }
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, have);
            r->start = 0;
            r->end = have;
        }
        ssize_t n = recv(r->fd, r->buf + r->end, sizeof r->buf - r->end, 0);
        if (n <= 0) return NULL;
        r->end += (int)n;
    }
}

/* The inner plaintext of a protected record (its type in *inner), or NULL. */
static unsigned char *open_record(struct keys *k, unsigned char *rec, int len, int *inner, int *plain_len) {
    unsigned char *out = rec + 5; /* decrypted in place: the tag stays behind the plaintext */
    if (len < 17 || !aead(k, 0, rec, rec + 5, len - 16, out)) return NULL;
    int n = len - 16;
    while (n > 0 && out[n - 1] == 0) n--;
    if (n == 0) return NULL;
    *inner = out[n - 1];
    *plain_len = n - 1;
    return out;
}

static int seal_record(struct keys *k, int inner, const unsigned char *data, int len, unsigned char *out) {
    unsigned char plain[512];
    if (len + 1 > (int)sizeof plain) return 0;
    memcpy(plain, data, len);
    plain[len] = (unsigned char)inner;
    out[0] = 23;
    out[1] = 3;
    out[2] = 3;
    put16(out + 3, len + 1 + 16);
    return aead(k, 1, out, plain, len + 1, out + 5) ? 5 + len + 1 + 16 : 0;
}

static int shared_secret(int group, const unsigned char *peer, int peer_len, unsigned char *out, int *out_len) {
    int ok = 0;
    if (group == 23 && peer_len == 65) {
        EC_POINT *p = EC_POINT_new(p256), *r = EC_POINT_new(p256);
        BIGNUM *x = BN_new();
        ok = p && r && x && EC_POINT_oct2point(p256, p, peer, peer_len, NULL) &&
             EC_POINT_mul(p256, r, NULL, p, p256_priv, NULL) &&
             EC_POINT_get_affine_coordinates(p256, r, x, NULL, NULL) && BN_bn2binpad(x, out, 32) == 32;
        *out_len = 32;
        BN_free(x);
        EC_POINT_free(r);
        EC_POINT_free(p);
    } else if (group == 29 && peer_len == 32) {
        EVP_PKEY *pub = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer, 32);
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new(x25519_priv, NULL);
        size_t n = 32;
        ok = pub && c && EVP_PKEY_derive_init(c) > 0 && EVP_PKEY_derive_set_peer(c, pub) > 0 &&
             EVP_PKEY_derive(c, out, &n) > 0;
        *out_len = (int)n;
        EVP_PKEY_CTX_free(c);
        EVP_PKEY_free(pub);
    }
    return ok;
}

/* The server's key share and suite from its ServerHello (1), or 0. */
static int parse_server_hello(const unsigned char *m, int len, int *suite_id, int *group, const unsigned char **share,
                              int *share_len) {
    static const unsigned char HRR[8] = {0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11};
    if (len < 4 + 2 + 32 + 1 || m[0] != 2) return 0;
    int pos = 4 + 2;
    if (memcmp(m + pos, HRR, 8) == 0) return 0; /* HelloRetryRequest: not expected with both shares */
    pos += 32;
    pos += 1 + m[pos];
    if (pos + 5 > len) return 0;
    *suite_id = (m[pos] << 8) | m[pos + 1];
    pos += 3;
    int end = pos + 2 + ((m[pos] << 8) | m[pos + 1]);
    if (end > len) return 0;
    *share = NULL;
    for (pos += 2; pos + 4 <= end;) {
        int type = (m[pos] << 8) | m[pos + 1], elen = (m[pos + 2] << 8) | m[pos + 3];
        if (pos + 4 + elen > end) return 0;
        if (type == 51 && elen >= 4) {
            *group = (m[pos + 4] << 8) | m[pos + 5];
            *share_len = (m[pos + 6] << 8) | m[pos + 7];
            *share = m + pos + 8;
            if (4 + *share_len != elen) return 0;
        }
        pos += 4 + elen;
    }
    return *share != NULL;
}

static int suite_for(int id, struct suite *s) {
    switch (id) {
    case 0x1301: *s = (struct suite){EVP_sha256(), EVP_aes_128_gcm(), 32, 16}; return 1;
    case 0x1302: *s = (struct suite){EVP_sha384(), EVP_aes_256_gcm(), 48, 32}; return 1;
    case 0x1303: *s = (struct suite){EVP_sha256(), EVP_chacha20_poly1305(), 32, 32}; return 1;
    default: return 0;
    }
}

static int add_ext(unsigned char *p, int type, const unsigned char *body, int len) {
    put16(p, type);
    put16(p + 2, len);
    memcpy(p + 4, body, len);
    return 4 + len;
}

int tls_setup(void) {
    /* chrony's client (GnuTLS 3.7, chrony's priorities): suites, groups, signature algorithms */
    static const unsigned char SUITES[] = {0x13, 0x02, 0x13, 0x03, 0x13, 0x01, 0x13, 0x04};
    static const unsigned char GROUPS[] = {0, 20, 0, 23, 0, 24, 0, 25, 0, 29, 0, 30, 1, 0, 1, 1, 1, 2, 1, 3, 1, 4};
    static const unsigned char SIGALGS[] = {0, 32, 4, 1, 8, 9, 8, 4, 4, 3, 8, 7, 5, 1, 8, 10, 8, 5,
                                            5, 3, 8, 8, 6, 1, 8, 11, 8, 6, 6, 3, 2, 1, 2, 3};
    static const unsigned char STATUS[] = {1, 0, 0, 0, 0}, POINTS[] = {1, 0}, RSL[] = {0x40, 0x01};
    static const unsigned char ALPN[] = {0, 8, 7, 'n', 't', 's', 'k', 'e', '/', '1'};
    static const unsigned char VERSIONS[] = {2, 3, 4}, RENEG[] = {0};
    unsigned char shares[2 + 4 + 65 + 4 + 32], ext[400];
    size_t n = 32;
    int e = 0, p = 0;

    p256 = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1);
    p256_priv = BN_new();
    EC_POINT *pub = p256 ? EC_POINT_new(p256) : NULL;
    if (pub == NULL || p256_priv == NULL || !BN_rand_range(p256_priv, EC_GROUP_get0_order(p256)) ||
        !EC_POINT_mul(p256, pub, p256_priv, NULL, NULL, NULL) ||
        EC_POINT_point2oct(p256, pub, POINT_CONVERSION_UNCOMPRESSED, p256_pub, 65, NULL) != 65)
        return 0;
    EC_POINT_free(pub);
    x25519_priv = EVP_PKEY_Q_keygen(NULL, NULL, "X25519");
    if (x25519_priv == NULL || !EVP_PKEY_get_raw_public_key(x25519_priv, x25519_pub, &n)) return 0;

    put16(shares, sizeof shares - 2);
    put16(shares + 2, 23);
    put16(shares + 4, 65);
    memcpy(shares + 6, p256_pub, 65);
    put16(shares + 71, 29);
    put16(shares + 73, 32);
    memcpy(shares + 75, x25519_pub, 32);
    e += add_ext(ext + e, 5, STATUS, sizeof STATUS);
    e += add_ext(ext + e, 10, GROUPS, sizeof GROUPS);
    e += add_ext(ext + e, 11, POINTS, sizeof POINTS);
    e += add_ext(ext + e, 13, SIGALGS, sizeof SIGALGS);
    e += add_ext(ext + e, 16, ALPN, sizeof ALPN);
    e += add_ext(ext + e, 22, NULL, 0);
    e += add_ext(ext + e, 23, NULL, 0);
    e += add_ext(ext + e, 51, shares, sizeof shares);
    e += add_ext(ext + e, 43, VERSIONS, sizeof VERSIONS);
    e += add_ext(ext + e, 65281, RENEG, sizeof RENEG);
    e += add_ext(ext + e, 28, RSL, sizeof RSL);

    hello[p++] = 1;
    p += 3; /* length, below */
    hello[p++] = 3;
    hello[p++] = 3;
    hello_random_at = p;
    p += 32;
    hello[p++] = 32; /* a legacy session id, as GnuTLS sends (middlebox compatibility) */
    if (RAND_bytes(hello + p, 32) != 1) return 0;
    p += 32;
    p += put16(hello + p, sizeof SUITES);
    memcpy(hello + p, SUITES, sizeof SUITES);
    p += sizeof SUITES;
    hello[p++] = 1;
    hello[p++] = 0;
    p += put16(hello + p, e);
    memcpy(hello + p, ext, e);
    p += e;
    hello[1] = 0;
    put16(hello + 2, p - 4);
    hello_len = p;

    for (int h = 0; h < 2; h++) {
        struct suite s;
        unsigned char zeros[48] = {0}, early[48];
        suite_for(h == 0 ? 0x1301 : 0x1302, &s);
        if (!extract(&s, zeros, zeros, s.hash_len, early) || !EVP_Digest("", 0, empty_hash[h], NULL, s.md, NULL) ||
            !expand_label(&s, early, "derived", empty_hash[h], s.hash_len, early_derived[h], s.hash_len))
            return 0;
    }
    return 1;
}

static __thread struct reader reader;
static __thread uint64_t random_state;

int tls_exchange(int fd, unsigned char *buf, int size) {
    unsigned char out[1024], th_sh[48], th_sf[48], hs[48], c_hs[48], s_hs[48], secret[48], master[48], c_ap[48],
        s_ap[48], ecdhe[66], finished[4 + 48], zeros[48] = {0}, msgs[16384], *rec, *plain;
    struct keys s_hs_keys, c_hs_keys, s_ap_keys, c_ap_keys;
    struct suite s;
    const unsigned char *share;
    int type, len, suite_id, group, share_len, ecdhe_len, inner, plain_len, have = 0, got = 0, ok = 0, o;
    EVP_MD_CTX *th = NULL;

    /* ClientHello: a fresh client random (the server's work does not depend on it) */
    out[0] = 22, out[1] = 3, out[2] = 1;
    put16(out + 3, hello_len);
    memcpy(out + 5, hello, hello_len);
    if (random_state == 0) random_state = (uint64_t)(uintptr_t)&reader ^ 0x9e3779b97f4a7c15u;
    for (int i = 0; i < 32; i += 8) {
        random_state ^= random_state << 13, random_state ^= random_state >> 7, random_state ^= random_state << 17;
        memcpy(out + 5 + hello_random_at + i, &random_state, 8);
    }
    if (send(fd, out, 5 + hello_len, MSG_NOSIGNAL) != 5 + hello_len) return 0;
    reader.fd = fd, reader.start = reader.end = 0;

    /* ServerHello: the suite, the key share, the handshake secrets */
    if ((rec = next_record(&reader, &type, &len)) == NULL || type != 22 ||
        !parse_server_hello(rec + 5, len, &suite_id, &group, &share, &share_len) || !suite_for(suite_id, &s) ||
        !shared_secret(group, share, share_len, ecdhe, &ecdhe_len))
        return 0;
    th = EVP_MD_CTX_new();
    if (th == NULL || !EVP_DigestInit_ex(th, s.md, NULL) || !EVP_DigestUpdate(th, out + 5, hello_len) ||
        !EVP_DigestUpdate(th, rec + 5, len) || !transcript_hash(th, th_sh) ||
        !extract(&s, early_derived[s.hash_len == 48], ecdhe, ecdhe_len, hs) ||
        !expand_label(&s, hs, "c hs traffic", th_sh, s.hash_len, c_hs, s.hash_len) ||
        !expand_label(&s, hs, "s hs traffic", th_sh, s.hash_len, s_hs, s.hash_len) ||
        !traffic_keys(&s, s_hs, &s_hs_keys) || !traffic_keys(&s, c_hs, &c_hs_keys))
        goto done;

    /* EncryptedExtensions .. Finished: hashed, not checked (see the top) */
    for (int server_done = 0; !server_done;) {
        if ((rec = next_record(&reader, &type, &len)) == NULL) goto done;
        if (type == 20) continue; /* the compatibility ChangeCipherSpec */
        if (type != 23 || (plain = open_record(&s_hs_keys, rec, len, &inner, &plain_len)) == NULL || inner != 22 ||
            have + plain_len > (int)sizeof msgs)
            goto done;
        memcpy(msgs + have, plain, plain_len);
        have += plain_len;
        int pos = 0;
        while (pos + 4 <= have) {
            int mlen = 4 + ((msgs[pos + 1] << 16) | (msgs[pos + 2] << 8) | msgs[pos + 3]);
            if (pos + mlen > have) break;
            if (!EVP_DigestUpdate(th, msgs + pos, mlen)) goto done;
            if (msgs[pos] == 20) server_done = 1;
            pos += mlen;
        }
        memmove(msgs, msgs + pos, have - pos);
        have -= pos;
    }

    /* client Finished, application secrets, the request: one write */
    unsigned int mac_len;
    if (!transcript_hash(th, th_sf) || !expand_label(&s, c_hs, "finished", NULL, 0, secret, s.hash_len) ||
        HMAC(s.md, secret, s.hash_len, th_sf, s.hash_len, finished + 4, &mac_len) == NULL ||
        !expand_label(&s, hs, "derived", empty_hash[s.hash_len == 48], s.hash_len, secret, s.hash_len) ||
        !extract(&s, secret, zeros, s.hash_len, master) ||
        !expand_label(&s, master, "c ap traffic", th_sf, s.hash_len, c_ap, s.hash_len) ||
        !expand_label(&s, master, "s ap traffic", th_sf, s.hash_len, s_ap, s.hash_len) ||
        !traffic_keys(&s, c_ap, &c_ap_keys) || !traffic_keys(&s, s_ap, &s_ap_keys))
        goto done;
    finished[0] = 20, finished[1] = 0;
    put16(finished + 2, s.hash_len);
    memcpy(out, "\x14\x03\x03\x00\x01\x01", 6);
    o = 6;
    if ((len = seal_record(&c_hs_keys, 22, finished, 4 + s.hash_len, out + o)) == 0) goto done;
    o += len;
    if ((len = seal_record(&c_ap_keys, 23, REQUEST, sizeof REQUEST, out + o)) == 0) goto done;
    o += len;
    if (send(fd, out, o, MSG_NOSIGNAL) != o) goto done;

    /* the response, until its End of Message */
    while (ok == 0 && (rec = next_record(&reader, &type, &len)) != NULL && type == 23 &&
           (plain = open_record(&s_ap_keys, rec, len, &inner, &plain_len)) != NULL) {
        if (inner == 21) break; /* an alert: close_notify or an error, before the End of Message */
        if (inner != 23) continue; /* post-handshake messages (NewSessionTicket) */
        if (got + plain_len > size) break;
        memcpy(buf + got, plain, plain_len);
        got += plain_len;
        ok = response_state(buf, got);
    }
done:
    EVP_MD_CTX_free(th);
    return ok == 1;
}
