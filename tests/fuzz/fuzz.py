#!/usr/bin/env python3
"""Coverage-guided fuzzing of everything that reads untrusted bytes, with atheris (libFuzzer).

Strategy: the property tests (hypothesis) hold every parser to "parse or raise its error"; this
goes further for long unattended runs, steered by coverage. Each target is one entry point that
takes bytes from outside and states what must hold whatever they are:
- `pipeline`: datagrams through one pipeline with every authenticator (NTS, MAC keys of every
  algorithm, some untrusted or restricted, MS-SNTP, plain), with and without the fast paths,
  from four client addresses, finished late or at once: a Drop, a Defer or a reply no longer than
  the request, never an exception.
- `parsers`: NTS-KE requests cut into arbitrary pieces (and the response to what they negotiate),
  key files in both formats, the YAML config with every plugin's section, Samba's signing
  replies: a result or the parser's own error.
- `client`: what a hostile server sends `ntsd query` (KE records, NTP replies, and the plaintext
  inside a reply that authenticates): a result or QueryError.
Seeds are made here from valid inputs (`--seeds DIR`), so the fuzzer starts past the checks a
random input never passes (MACs, AEAD tags, cookies).

Usage: pip install atheris
       python3 tests/fuzz/fuzz.py TARGET --seeds CORPUS
       python3 tests/fuzz/fuzz.py TARGET CORPUS [libFuzzer options, e.g. -max_total_time=600]
Found so far (each fixed, with a unit test): superscript and non-Latin digits taken as key numbers
and ports (str.isdigit says yes to them); config values YAML cannot construct (an unknown tag,
'!!int abc', 2001-02-30 read as a date) raising past the config checks; a malformed reply reaching
`ntsd query` as a usage error.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

with atheris.instrument_imports(include=["nts", "legacy", "mssntp"]):
    from legacy.keyfile import Algorithm, Key, KeyFileError, format_ntp_keys, parse_keyfile
    from legacy.mac import MacPlugin, MacSettings, compute_mac
    from mssntp.auth import MsSntpPlugin, MsSntpSettings
    from mssntp.signd import ReplyReader, check_signed, encode_reply, parse_reply
    from nts.client import KeResult, QueryError, _interpret, check_nts_reply, nts_request, sample
    from nts.config import DEFAULT_CONFIG, ConfigError, parse_config
    from nts.core.clockstate import ClockSettings, server_state
    from nts.core.decisions import Defer, Drop, Seal
    from nts.core.handler import RequestHandler
    from nts.core.pipeline import Pipeline
    from nts.core.plain import PlainHandler
    from nts.core.policy import RateLimiter, RateSettings
    from nts.nts.aead import AEADS
    from nts.nts.cookies import CookieKeys, KeyRing
    from nts.nts.devcerts import make_dev_certs
    from nts.nts.ke_session import KeServerSession, Negotiation, response
    from nts.nts.packets import NtsPackets, auth_field
    from nts.nts.plugin import NtsPlugin
    from nts.server.plugin import discover, sections
    from nts.wire.errors import ParseError
    from nts.wire.extensions import ExtensionField, FieldType, serialize_extension
    from nts.wire.ke_records import Record, RecordType, parse_records, serialize_records

logging.disable(logging.CRITICAL)
HEADER = bytes([0x23]) + bytes(39) + struct.pack(">Q", 42)
WORK = Path(tempfile.mkdtemp(prefix="ntsd-fuzz-"))
RING = KeyRing(bytes(32))


# -- pipeline ---------------------------------------------------------------------------------------
KEYS = [Key(i + 1, a, os.urandom(a.cmac_key_len if a.is_cmac else 20)) for i, a in enumerate(Algorithm)]
CLIENTS: list[Any] = [("127.0.0.1", 123), ("10.1.2.3", 5), ("::1", 7, 0, 0), ("192.0.2.1", 9)]


def _pipelines() -> list[Pipeline]:
    (WORK / "ntp.keys").write_text(format_ntp_keys(KEYS))
    (WORK / "ntp.keys").chmod(0o600)
    mac = MacPlugin(
        MacSettings(
            keys=WORK / "ntp.keys",
            trusted=frozenset(k.id for k in KEYS[:-1]),  # the last one untrusted
            networks={2: (ip_network("10.0.0.0/8"),)},  # the second only for 10/8
        )
    )
    nts = NtsPlugin.__new__(NtsPlugin)  # the packet path only: no sockets, no certificates
    nts.packets = NtsPackets(RING, (15, 17, 30), time.time)
    mssntp = MsSntpPlugin(MsSntpSettings(networks=(ip_network("127.0.0.0/8"), ip_network("::1/128"))))
    auths: list[RequestHandler] = [nts, mac, mssntp, PlainHandler()]
    state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())
    rate = RateLimiter(RateSettings(rate=1e9, burst=10**9))
    return [
        Pipeline(state=state, authenticators=auths, clock=time.time_ns, fast_paths=fast, rate=rate)
        for fast in (True, False)
    ]


def pipeline_seeds() -> list[bytes]:
    items = [HEADER, HEADER + bytes(20), HEADER + struct.pack("<I", 5) + bytes(16)]
    items += [HEADER + struct.pack(">I", k.id) + compute_mac(k.algorithm, k.secret, HEADER) for k in KEYS]
    for aead in (15, 17, 30):
        size = AEADS[aead].key_len
        keys = CookieKeys(aead, os.urandom(size), os.urandom(size))
        ke = KeResult(aead, keys.c2s, keys.s2c, [], None, None, "", "")
        for placeholders in (0, 2):
            items.append(nts_request(ke, RING.seal(keys, time.time()), placeholders)[0])
    return [bytes([selector]) + item for item in items for selector in (0, 9)]


def pipeline_target() -> Callable[[bytes], None]:
    pipelines = _pipelines()

    def one(buf: bytes) -> None:
        if not buf:
            return
        data, late = buf[1:], bool(buf[0] & 8)
        p = pipelines[buf[0] & 1]
        decision = p.handle(data, CLIENTS[(buf[0] >> 1) & 3], time.time_ns(), None, late)
        if type(decision) is Seal:
            assert late
            decision = p.seal(decision)
        if isinstance(decision, bytes):
            assert len(decision) <= len(data), (len(decision), len(data))
            assert decision[0] & 7 == 4
        else:
            assert isinstance(decision, Drop | Defer), decision

    return one


# -- parsers ----------------------------------------------------------------------------------------
def parser_seeds() -> list[bytes]:
    request = serialize_records([
        Record(True, RecordType.NEXT_PROTOCOL, b"\0\0"), Record(True, RecordType.AEAD_ALGORITHM, b"\0\x0f\0\x11\0\x1e"),
        Record(False, RecordType.COMPLIANT_128GCM_EXPORT), Record(True, RecordType.END_OF_MESSAGE),
    ])  # fmt: skip
    ntp_keys = b"1 MD5 secret\n2 SHA1 " + b"ab" * 20 + b"\n3 AES128CMAC " + b"cd" * 16 + b"\n# comment\n"
    chrony_keys = b"1 MD5 HEX:" + b"ab" * 10 + b"\n2 SHA1 ASCII:secret\n3 AES128 HEX:" + b"cd" * 16 + b"\n"
    config = b"mac: {keys: k, trusted: [1, 2], networks: {1: [10.0.0.0/8]}}\nmssntp: {networks: [127.0.0.0/8]}\n"
    signd = encode_reply(3, 7, bytes(48) + struct.pack("<I", 9) + bytes(16)) + encode_reply(4, 8)
    return [
        b"\0\x03" + request, b"\0\x40" + request, b"\1\0" + ntp_keys, b"\2\0" + chrony_keys,
        b"\3\0" + DEFAULT_CONFIG.encode(), b"\3\0" + config, b"\4\0" + signd,
    ]  # fmt: skip


def parsers_target() -> Callable[[bytes], None]:
    plugins = sections(discover())

    def one(buf: bytes) -> None:
        if len(buf) < 2:
            return
        kind, data = buf[0] % 5, buf[2:]
        if kind == 0:  # an NTS-KE request, fed in pieces of buf[1] % 16 + 1 bytes
            cut = buf[1] % 16 + 1
            session = KeServerSession((15, 17, 30), 1024)
            outcome = None
            try:
                for i in range(0, len(data), cut):
                    outcome = session.receive(data[i : i + cut]) or outcome
            except ParseError:
                return
            if isinstance(outcome, Negotiation) and outcome.aead is not None:
                size = AEADS[outcome.aead].key_len
                cookies = RING.seal_many(CookieKeys(outcome.aead, bytes(size), bytes(size)), time.time(), 8)
                outcome.exporter_context(True)
                assert response(outcome, cookies, "ntp.example", 123)
            elif outcome is not None:
                assert response(outcome)
        elif kind in (1, 2):
            try:
                parse_keyfile(data.decode("utf-8", "replace"), "fuzz", "ntp" if kind == 1 else "chrony")
            except KeyFileError:
                pass
        elif kind == 3:
            try:
                parse_config(data.decode("utf-8", "replace"), "fuzz", plugins)
            except ConfigError:
                pass
        else:
            try:
                for reply in ReplyReader().feed(data):
                    check_signed(reply, 7, 9, bytes(48))
                parse_reply(data)
            except ParseError:
                pass

    return one


# -- client -----------------------------------------------------------------------------------------
UID = bytes(range(32))
TRANSMIT = struct.pack(">Q", 42)


def client_seeds() -> list[bytes]:
    reply = bytes([0x24, 1]) + bytes(38) + TRANSMIT + bytes(16)
    records = serialize_records([
        Record(True, RecordType.NEXT_PROTOCOL, b"\0\0"), Record(True, RecordType.AEAD_ALGORITHM, b"\0\x0f"),
        Record(False, RecordType.NEW_COOKIE, bytes(100)), Record(True, RecordType.NTPV4_SERVER, b"host"),
        Record(True, RecordType.NTPV4_PORT, b"\0\x7b"), Record(True, RecordType.END_OF_MESSAGE),
    ])  # fmt: skip
    uid = serialize_extension(ExtensionField(FieldType.UNIQUE_IDENTIFIER, UID))
    authenticator = serialize_extension(ExtensionField(FieldType.NTS_AUTHENTICATOR, bytes(40)))
    return [
        b"\0" + reply, b"\1" + reply + uid + authenticator,
        b"\2" + serialize_extension(ExtensionField(FieldType.NTS_COOKIE, bytes(100))) * 2, b"\3" + records,
    ]  # fmt: skip


def client_target() -> Callable[[bytes], None]:
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(make_dev_certs(WORK / "certs", ["localhost"]).certificate.read_bytes())
    sessions = []
    for aead in (15, 17, 30):
        size = AEADS[aead].key_len
        sessions.append(KeResult(aead, os.urandom(size), os.urandom(size), [b"c"], None, None, "", ""))

    def one(buf: bytes) -> None:
        if len(buf) < 2:
            return
        kind, data, ke = buf[0] % 4, buf[1:], sessions[buf[0] // 4 % 3]
        try:
            if kind == 0:
                sample(data, TRANSMIT, time.time_ns(), time.time_ns())
            elif kind == 1:
                check_nts_reply(ke, data, UID)
            elif kind == 2:  # a reply that authenticates, around the fuzzer's plaintext
                ad = bytes([0x24, 1]) + bytes(38) + TRANSMIT
                ad += serialize_extension(ExtensionField(FieldType.UNIQUE_IDENTIFIER, UID))
                check_nts_reply(ke, ad + auth_field(AEADS[ke.aead], ke.s2c, os.urandom(16), data, ad, 0), UID)
            else:
                try:
                    records = parse_records(data)
                except ParseError:
                    return
                _interpret(records, certificate)
        except QueryError:
            pass

    return one


TARGETS = {
    "pipeline": (pipeline_target, pipeline_seeds),
    "parsers": (parsers_target, parser_seeds),
    "client": (client_target, client_seeds),
}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(TARGETS)} --seeds DIR | CORPUS [libFuzzer options]")
    make_target, make_seeds = TARGETS[sys.argv[1]]
    if sys.argv[2] == "--seeds":
        out = Path(sys.argv[3])
        out.mkdir(parents=True, exist_ok=True)
        for n, seed in enumerate(make_seeds()):
            (out / f"seed-{n}").write_bytes(seed)
        sys.exit(0)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], make_target())
    atheris.Fuzz()
