"""Fast paths decide exactly as the general path: the same decision and the same counters.

The NTS and MAC plugins answer their common shapes from the raw datagram before the pipeline splits
fields (`RequestHandler.fast`). Two pipelines with the same plugins, one with its fast paths switched
off, are fed the same generated datagrams: near-valid NTS requests (fields in any order, duplicated,
truncated, with trailers, forged cookies and authenticators) and key id + MAC requests that MAC and
MS-SNTP both may claim. Every decision (kind, drop or NAK reason, reply length) and every counter
must agree.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from legacy.keyfile import Algorithm, Key, format_ntp_keys
from legacy.mac import MacPlugin, MacSettings
from mssntp.auth import MsSntpPlugin, MsSntpSettings
from nts.core.clockstate import ClockSettings, server_state
from nts.core.decisions import Defer, Drop
from nts.core.handler import RequestHandler
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.nts.aead import AEADS
from nts.nts.cookies import CookieKeys, KeyRing
from nts.nts.packets import NtsPackets, auth_field
from nts.nts.plugin import NtsPlugin

NOW = 1_800_000_000.0
RING = KeyRing(bytes(range(32)))
SESSION = CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))
COOKIE = RING.seal(SESSION, NOW)
_KEYS_DIR = Path(tempfile.mkdtemp(prefix="ntsd-fast-"))
atexit.register(shutil.rmtree, _KEYS_DIR, True)
SHA1 = Key(1, Algorithm.SHA1, bytes(range(20)))
KEYS = [SHA1, Key(2, Algorithm.AES128CMAC, bytes(16)), Key(3, Algorithm.MD5, bytes(range(16)))]
UNKNOWN = [Key(9, Algorithm.SHA1, bytes(20)), Key(8, Algorithm.MD5, bytes(16))]  # not in the file
(_KEYS_DIR / "ntp.keys").write_text(format_ntp_keys(KEYS))
(_KEYS_DIR / "ntp.keys").chmod(0o600)


def _plugins() -> list[RequestHandler]:
    nts = NtsPlugin.__new__(NtsPlugin)
    nts.packets = NtsPackets(RING, (15, 30), lambda: NOW)
    mac = MacPlugin(MacSettings(_KEYS_DIR / "ntp.keys", trusted=frozenset({1, 2})))
    mssntp = MsSntpPlugin(MsSntpSettings(networks=(ipaddress.ip_network("127.0.0.0/8"),), burst=10**6))
    return [nts, mac, mssntp, PlainHandler()]


def _pipelines() -> tuple[Pipeline, Pipeline]:
    state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())
    fast = Pipeline(state=state, authenticators=_plugins(), clock=lambda: 7 * 10**18)
    general = Pipeline(state=state, authenticators=_plugins(), clock=lambda: 7 * 10**18, fast_paths=False)
    assert fast._fast  # the NTS and MAC plugins offer fast paths
    return fast, general


def _field(ftype: int, body: bytes) -> bytes:
    return struct.pack(">HH", ftype, 4 + len(body)) + body


def _outcome(decision: Any) -> tuple[Any, ...]:
    if isinstance(decision, Drop):
        return ("drop", decision.reason)
    if isinstance(decision, Defer):
        return ("defer",)
    assert isinstance(decision, bytes)
    return ("reply", len(decision), decision[1], decision[12:16] if decision[1] == 0 else b"")


def _same(packets: list[bytes], clients: list[str]) -> None:
    fast, general = _pipelines()
    for data, ip in zip(packets, clients, strict=True):
        a = fast.handle(data, (ip, 123), 10**18)
        b = general.handle(data, (ip, 123), 10**18)
        assert _outcome(a) == _outcome(b), data.hex()
    assert fast.counters() == general.counters()


PIECES = st.sampled_from(["uid", "short_uid", "cookie", "bad_cookie", "placeholder", "odd_placeholder",
                          "unknown", "auth", "bad_auth", "trailer20", "trailer4", "junk"])  # fmt: skip


def _nts_packet(version: int, pieces: list[str]) -> bytes:
    data = bytes([version << 3 | 3]) + bytes(39) + struct.pack(">Q", 42)
    for piece in pieces:
        if piece == "uid":
            data += _field(0x0104, bytes(32))
        elif piece == "short_uid":
            data += _field(0x0104, bytes(16))
        elif piece == "cookie":
            data += _field(0x0204, COOKIE)
        elif piece == "bad_cookie":
            data += _field(0x0204, COOKIE[:-4] + b"xxxx")
        elif piece == "placeholder":
            data += _field(0x0304, bytes(len(COOKIE)))
        elif piece == "odd_placeholder":
            data += _field(0x0304, bytes(len(COOKIE) - 8))
        elif piece == "unknown":
            data += _field(0x7777, bytes(12))
        elif piece == "auth":
            data += auth_field(AEADS[15], SESSION.c2s, bytes(16), b"", data, 0)
        elif piece == "bad_auth":
            data += auth_field(AEADS[15], bytes(32), bytes(16), b"", data, 0)
        elif piece == "trailer20":
            data += bytes(20)
        elif piece == "trailer4":
            data += bytes(4)
        else:
            data += b"\x00\x10\x00"  # a field header cut short
    return data


@given(st.lists(st.tuples(st.sampled_from([3, 4, 4, 4]), st.lists(PIECES, max_size=7)), min_size=1, max_size=6))
@settings(max_examples=400, deadline=None)
def test_nts_fast_path_decides_as_the_general_path(cases: list[tuple[int, list[str]]]) -> None:
    packets = [_nts_packet(v, ["uid", "cookie", *p, "auth"][: 2 + len(p) + (len(p) % 3 != 0)]) for v, p in cases]
    packets += [_nts_packet(v, p) for v, p in cases]
    _same(packets, ["127.0.0.1"] * len(packets))


def _mac_packet(version: int, key: Key, mac_key: bytes, long_mac: bool) -> bytes:
    head = bytes([version << 3 | 3]) + bytes(39) + struct.pack(">Q", 42)
    if key.algorithm == Algorithm.AES128CMAC:
        from legacy.mac import compute_mac

        return head + struct.pack(">I", key.id) + compute_mac(key.algorithm, mac_key, head)
    digest = hashlib.new(key.algorithm.value[1], mac_key + head).digest()
    return head + struct.pack(">I", key.id) + (digest if long_mac else digest[:20])


@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 4]),
            st.sampled_from([*KEYS, *UNKNOWN]),
            st.booleans(),  # the right secret
            st.booleans(),  # a full-length digest (NTPv3 style) instead of 20 bytes
            st.sampled_from(["127.0.0.1", "10.1.2.3"]),  # inside and outside MS-SNTP's networks
        ),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=300, deadline=None)
def test_mac_fast_path_decides_as_the_general_path(cases: list[tuple[int, Key, bool, bool, str]]) -> None:
    packets = [
        _mac_packet(v, k, k.secret if right else os.urandom(len(k.secret)), full) for v, k, right, full, _ in cases
    ]
    _same(packets, [ip for *_, ip in cases])
