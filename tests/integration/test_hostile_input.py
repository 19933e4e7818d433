"""Hostile input at the running daemon: random and mutated datagrams and KE bytes, all accounted for.

The fuzzers (tests/fuzz) and the property tests drive the sans-IO code in process; this sends the
same kinds of input through the real sockets, batches and threads (MS-SNTP through a stand-in for
Samba's signing socket), and checks what an operator would: every datagram is answered or counted
as a drop (nothing lost, no internal error), no reply is longer than the longest request, nothing
reaches the log as a traceback, and the daemon still serves NTS, MAC and plain clients afterwards.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from pathlib import Path

import pytest

from legacy.keyfile import load_keyfile
from legacy.mac import compute_mac
from nts.cli import fetch_metrics
from nts.client import check_nts_reply, key_exchange, nts_request
from nts.server.metrics import parse_text
from tests.helpers import client_request, query, running_ntsd, wait_until
from tests.mac_helpers import mac_section, write_keys
from tests.mssntp_helpers import FakeSigner
from tests.nts_helpers import AEAD15, NP, dev_certs, ke_raw, nts_config, ports, request

SEED = 20261122  # fixed: a failure replays exactly
DATAGRAMS = 3000
BURST = 100  # datagrams sent before the counters are read back (well within the socket's buffer)


def _metrics(port: int) -> dict[str, float]:
    return parse_text(fetch_metrics("127.0.0.1", port))


def _mutations(valid: list[bytes], rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(DATAGRAMS):
        base = bytearray(rng.choice(valid))
        kind = rng.randrange(5)
        if kind == 0:  # noise of any length, some with an NTP-looking first byte
            base = bytearray(rng.randbytes(rng.randrange(0, 700)))
            if base and rng.random() < 0.5:
                base[0] = 0x23
        elif kind == 1:  # a few flipped bytes anywhere
            for _ in range(rng.randrange(1, 5)):
                base[rng.randrange(len(base))] ^= rng.randrange(1, 256)
        elif kind == 2:  # cut short
            del base[rng.randrange(len(base)) :]
        elif kind == 3:  # extra bytes after a valid request
            base += rng.randbytes(rng.choice([4, 16, 20, 24, 28, 100, 300]))
        else:  # a length field of an extension field (or the trailer) rewritten
            at = rng.randrange(48, max(49, len(base) - 3))
            if at + 4 <= len(base):
                struct.pack_into(">H", base, at + 2, rng.choice([0, 3, 4, 16, 0xFFFF, rng.randrange(65536)]))
        out.append(bytes(base))
    return out


@pytest.mark.parametrize(
    ("host", "ntp_extra"),
    [("127.0.0.1", ""), ("::1", ""), ("127.0.0.1", "batch: 1")],
    ids=["ipv4-batched", "ipv6-batched", "ipv4-one-by-one"],
)
def test_random_and_mutated_input_is_all_accounted_for(tmp_path: Path, host: str, ntp_extra: str) -> None:
    ntp, ke, mport = ports()
    keys_file, _ = write_keys(tmp_path)
    listen = [f"[{host}]:{ntp}" if ":" in host else f"{host}:{ntp}"]
    config = nts_config(tmp_path, ntp, ke, mport, listen=listen, ntp_extra=ntp_extra)
    config += mac_section(keys_file, trusted=[1, 2, 3, 4, 5])
    signd = tmp_path / "signd.socket"
    config += f"mssntp: {{socket: {signd}, networks: [127.0.0.0/8, '::1/128'], rate: 100000, burst: 100000}}\n"
    signer = FakeSigner(signd)
    with contextlib.closing(signer), running_ntsd(tmp_path, config) as server:
        session = key_exchange("127.0.0.1", ke, dev_certs(tmp_path).ca)
        keys = load_keyfile(keys_file, "ntp").keys.values()
        header = client_request()
        valid = [header] + [header + struct.pack(">I", k.id) + compute_mac(k.algorithm, k.secret, header) for k in keys]
        valid += [nts_request(session, cookie, placeholders=i % 3)[0] for i, cookie in enumerate(session.cookies[:6])]
        valid += [header + struct.pack("<I", rid) + bytes(16) for rid in (1105, 1107, 70001)]  # MS-SNTP
        datagrams = _mutations(valid, random.Random(SEED))
        longest = max(len(d) for d in datagrams)

        before = _metrics(mport).get("ntsd_requests_total", 0)
        replies = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            for start in range(0, len(datagrams), BURST):
                for d in datagrams[start : start + BURST]:
                    s.sendto(d, (host, ntp))
                # the daemon has taken the burst once a query sent after it is answered (one socket, in order)
                assert query(ntp, client_request(), host=host, timeout=5) is not None
                s.setblocking(False)
                while True:
                    try:
                        reply = s.recv(65536)
                    except BlockingIOError:
                        break
                    replies += 1
                    assert len(reply) <= longest
                    assert reply[0] & 7 in (4, 2)  # server replies (symmetric passive to mode 1), whatever came in
                s.setblocking(True)

        # NTS-KE: noise instead of TLS, and noise inside TLS after a good handshake
        rng = random.Random(SEED + 1)
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", ke), timeout=5) as c:
                try:
                    c.sendall(rng.randbytes(rng.randrange(1, 600)))
                    c.shutdown(socket.SHUT_WR)
                    while c.recv(4096):  # the server answers (an alert) or closes; never hangs
                        pass
                except TimeoutError:
                    raise
                except OSError:  # reset, broken pipe, not connected: the server closed first, as it may
                    pass
        for _ in range(20):  # the zeros end the request at once (records of type 0) or overrun its size bound
            outcome = ke_raw(ke, rng.randbytes(rng.randrange(1, 300)) + bytes(1100), timeout=5)
            assert isinstance(outcome, str | list)

        # MS-SNTP replies finish asynchronously (through the signer): wait until all are accounted for
        def accounting() -> tuple[dict[str, float], float]:
            m = _metrics(mport)
            prefixes = ("ntsd_replies_total", "ntsd_naks_total", "ntsd_drops_total")
            return m, sum(v for k, v in m.items() if k.startswith(prefixes))

        try:
            m, accounted = wait_until(lambda: (a := accounting())[1] == a[0]["ntsd_requests_total"] and a, 20, 0.1)
        except AssertionError:
            m, accounted = accounting()  # the assertions below say what is missing
        sent = DATAGRAMS + len(datagrams) // BURST  # the noise and one plain query per burst
        assert m["ntsd_requests_total"] - before == sent
        assert accounted == m["ntsd_requests_total"]  # every datagram answered or counted as a drop
        assert replies > 0 and m.get('ntsd_naks_total{auth="nts",reason="cookie_forged"}', 0) > 0
        assert m.get('ntsd_replies_total{auth="mssntp"}', 0) > 0 and m.get('ntsd_deferred_total{auth="mssntp"}', 0) > 0
        assert m["ntsd_mssntp_rate_limit_clients"] > 0
        assert not [k for k, v in m.items() if "internal_error" in k and v], m  # (present at zero from the start)
        assert not [line for line in server.lines if "Traceback" in line or "internal error" in line]

        # still serving all three modes, and NTS-KE
        assert query(ntp, client_request(), host=host) is not None
        k = next(iter(keys))
        reply = query(ntp, header + struct.pack(">I", k.id) + compute_mac(k.algorithm, k.secret, header), host=host)
        assert reply is not None and reply[48:52] == struct.pack(">I", k.id)
        packet, uid, _ = nts_request(session, session.cookies[7])
        nts_reply = query(ntp, packet, host=host)
        assert nts_reply is not None and check_nts_reply(session, nts_reply, uid)[0] is False
        assert isinstance(ke_raw(ke, request(NP, AEAD15)), list)
