"""`ntsd query`: an NTS (or plain) NTP client for checking servers, ours or anyone's.

Strategy: blocking sockets, one exchange at a time; this is a diagnostic tool, not a daemon. The
NTS-KE side uses pyOpenSSL (the exporter), verifies the chain against --ca (or the system store)
and the host name or address against the certificate. The NTP side builds the request from the
same wire and AEAD code the server uses, and checks everything in the reply a real client must:
origin timestamp, UID echo, the authenticator over the reply, and the new cookies inside it.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import select
import socket
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from OpenSSL import SSL

from .net import is_dns_name, is_ip_address
from .nts.aead import AEAD_NAMES, AEADS, DEFAULT_AEADS, AeadError, AeadId
from .nts.certs import ALPN
from .nts.ke_session import EXPORTER_LABEL, Negotiation
from .nts.packets import auth_field, open_auth
from .wire.errors import ParseError
from .wire.extensions import ExtensionField, FieldType, iter_extensions, make_field, serialize_extension
from .wire.ke_records import NEXT_PROTOCOL_NTPV4, Record, RecordReader, RecordType, serialize_records, u16_list
from .wire.packet import KISS_NTSN, parse_packet
from .wire.timestamps import ntp64_to_unix_ns, short_to_seconds, unix_ns_to_ntp64


class QueryError(Exception):
    """The server could not be queried; the message says what went wrong."""


@dataclass
class KeResult:
    aead: int
    c2s: bytes
    s2c: bytes
    cookies: list[bytes]
    server: str | None
    port: int | None
    subject: str
    expires: str
    compliant_gcm: bool = False


@dataclass
class Sample:
    offset: float
    delay: float
    stratum: int
    leap: int
    reference_id: str
    root_delay: float
    root_dispersion: float
    kiss: str | None = None
    new_cookies: list[bytes] = field(default_factory=list)


def _hostname_matches(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
        return ip in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in san.get_values_for_type(x509.DNSName):
        name = name.lower().rstrip(".")
        if name == host or (name.startswith("*.") and host.split(".", 1)[-1] == name[2:] and "." in host):
            return True
    return False


def key_exchange(
    host: str,
    port: int = 4460,
    ca: Path | None = None,
    aeads: tuple[int, ...] = DEFAULT_AEADS,
    timeout: float = 5.0,
    keylog: Path | None = None,
    compliant_gcm: bool = True,
    extra_records: tuple[Record, ...] = (),
) -> KeResult:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    if ca is not None:
        if not ca.is_file():
            raise QueryError(f"CA file {ca} does not exist (or is not a file)")
        try:
            ctx.load_verify_locations(str(ca))
        except SSL.Error as exc:
            raise QueryError(f"cannot use {ca} as CA certificates: {_ssl_text(exc)}") from None
    else:
        ctx.set_default_verify_paths()
    ctx.set_alpn_protos([ALPN])
    if keylog is not None:
        ctx.set_keylog_callback(lambda conn, line: _append(keylog, line))
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise QueryError(f"cannot connect to NTS-KE at {host} port {port}: {exc.strerror or exc}") from None
    # The whole exchange has one deadline: the socket is non-blocking and each TLS step that would
    # block waits in select() for what is left, so neither a silent server nor one that trickles its
    # bytes one at a time can hold us longer than `timeout`.
    sock.setblocking(False)
    conn = SSL.Connection(ctx, sock)
    step = _Stepper(sock, deadline, f"{host} port {port}")
    try:
        if not is_ip_address(host):
            conn.set_tlsext_host_name(host.encode("idna"))
        conn.set_connect_state()
        try:
            step(conn.do_handshake)
        except SSL.SysCallError as exc:
            raise QueryError(f"TLS handshake with {host} port {port} failed: {_syscall_reason(exc)}") from None
        except SSL.Error as exc:
            raise QueryError(f"TLS handshake with {host} port {port} failed: {_ssl_text(exc)}") from None
        if conn.get_alpn_proto_negotiated() != ALPN:
            raise QueryError("the server did not agree to NTS-KE (ALPN ntske/1)")
        peer = conn.get_peer_certificate()
        if peer is None:
            raise QueryError("the server sent no certificate")
        cert = peer.to_cryptography()
        if not _hostname_matches(cert, host):
            raise QueryError(f"the server's certificate is not valid for {host}")
        request = [Record(True, RecordType.NEXT_PROTOCOL, struct.pack(">H", NEXT_PROTOCOL_NTPV4))]
        request.append(Record(True, RecordType.AEAD_ALGORITHM, struct.pack(f">{len(aeads)}H", *aeads)))
        if compliant_gcm and AeadId.AES_128_GCM_SIV in aeads:
            request.append(Record(False, RecordType.COMPLIANT_128GCM_EXPORT))
        request += extra_records
        request.append(Record(True, RecordType.END_OF_MESSAGE))
        payload = serialize_records(request)  # one record: some servers need the request in one read
        step(lambda: conn.send(payload))
        records = _read_response(lambda: step(lambda: conn.recv(65536)))
        result = _interpret(records, cert)
        key_len = AEADS[result.aead].key_len
        negotiated = Negotiation(NEXT_PROTOCOL_NTPV4, result.aead, result.compliant_gcm)  # the server's contexts
        c2s = conn.export_keying_material(EXPORTER_LABEL, key_len, negotiated.exporter_context(False))
        s2c = conn.export_keying_material(EXPORTER_LABEL, key_len, negotiated.exporter_context(True))
        result.c2s, result.s2c = bytes(c2s), bytes(s2c)
        return result
    except (SSL.Error, OSError) as exc:
        raise QueryError(f"NTS-KE with {host} port {port} failed: {exc}") from None
    finally:
        conn.close()


def _ssl_text(exc: SSL.Error) -> str:
    parts = [str(p[2]) for p in exc.args[0] if isinstance(p, tuple) and len(p) == 3] if exc.args and exc.args[0] else []
    return "; ".join(parts) or exc.__class__.__name__


def _syscall_reason(exc: SSL.SysCallError) -> str:
    if exc.args and exc.args[0] in (11, -1):
        return "the server closed the connection or did not answer in time"
    return str(exc.args[1]) if len(exc.args) > 1 else "connection error"


def _append(path: Path, line: bytes) -> None:
    """Append a TLS secret line: the file is made 0600 (it decrypts the session)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.write(line + b"\n")


T = TypeVar("T")


class _Stepper:
    """Runs a pyOpenSSL call on a connection over the non-blocking `sock` to completion, waiting in
    select() while it wants to read or write, until `deadline` (then QueryError)."""

    def __init__(self, sock: socket.socket, deadline: float, peer: str) -> None:
        self.sock, self.deadline, self.peer = sock, deadline, peer

    def __call__(self, call: Callable[[], T]) -> T:
        while True:
            try:
                return call()
            except SSL.WantReadError:
                readable, writable = [self.sock], []
            except SSL.WantWriteError:
                readable, writable = [], [self.sock]
            left = self.deadline - time.monotonic()
            if left <= 0 or not any(select.select(readable, writable, [], left)[:2]):
                raise QueryError(f"NTS-KE with {self.peer} did not finish in time")


def _read_response(recv: Callable[[], bytes]) -> list[Record]:
    reader = RecordReader(65536)
    records: list[Record] = []
    while not records or records[-1].type != RecordType.END_OF_MESSAGE:
        try:
            chunk = recv()
        except SSL.ZeroReturnError:
            chunk = b""
        if not chunk:
            raise QueryError("the server closed the connection before End of Message")
        try:
            records += reader.feed(chunk)
        except ParseError as exc:
            raise QueryError(f"bad NTS-KE response: {exc}") from None
    return records


def _interpret(records: list[Record], cert: x509.Certificate) -> KeResult:
    aead: int | None = None
    protocol_ok = compliant = False
    cookies: list[bytes] = []
    server: str | None = None
    port: int | None = None
    for r in records:
        if r.type == RecordType.ERROR:
            code = struct.unpack(">H", r.body)[0] if len(r.body) == 2 else -1
            raise QueryError(f"the server answered NTS-KE Error {code}")
        if r.type == RecordType.NEXT_PROTOCOL:
            protocol_ok = r.body == struct.pack(">H", NEXT_PROTOCOL_NTPV4)
        elif r.type == RecordType.AEAD_ALGORITHM:
            try:
                values = u16_list(r.body)
            except ParseError:
                raise QueryError("the server supports none of the offered AEAD algorithms") from None
            aead = values[0]
        elif r.type == RecordType.NEW_COOKIE:
            cookies.append(r.body)
        elif r.type == RecordType.NTPV4_SERVER:
            server = r.body.decode("ascii", "replace")
            if not (is_ip_address(server) or is_dns_name(server)):
                raise QueryError(f"the server named an NTP host that is not a host name or address: {server[:64]!r}")
        elif r.type == RecordType.NTPV4_PORT and len(r.body) == 2:
            port = struct.unpack(">H", r.body)[0]
        elif r.type == RecordType.COMPLIANT_128GCM_EXPORT:
            compliant = True
    if not protocol_ok:
        raise QueryError("the server does not offer NTPv4 over NTS")
    if aead is None or aead not in AEADS:
        raise QueryError("the server chose no AEAD algorithm that this client supports")
    if not cookies:
        raise QueryError("the server sent no cookies")
    return KeResult(
        aead, b"", b"", cookies, server, port, cert.subject.rfc4514_string(),
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}", compliant,
    )  # fmt: skip


def nts_request(ke: KeResult, cookie: bytes, placeholders: int = 0) -> tuple[bytes, bytes, bytes]:
    """(packet, uid, transmit) for one NTS-protected request."""
    transmit = secrets.token_bytes(8)
    header = bytes([0x23]) + bytes(39) + transmit
    uid = secrets.token_bytes(32)
    fields = serialize_extension(ExtensionField(FieldType.UNIQUE_IDENTIFIER, uid))
    fields += serialize_extension(ExtensionField(FieldType.NTS_COOKIE, cookie))
    for _ in range(placeholders):
        fields += serialize_extension(make_field(FieldType.NTS_COOKIE_PLACEHOLDER, bytes(len(cookie))))
    ad = header + fields
    nonce = secrets.token_bytes(16)
    return ad + auth_field(AEADS[ke.aead], ke.c2s, nonce, b"", ad, 0), uid, transmit


def check_nts_reply(ke: KeResult, reply: bytes, uid: bytes) -> tuple[bool, list[bytes]]:
    """(is_nak, new cookies) after verifying the reply's UID and authenticator."""
    try:
        packet = parse_packet(reply)
    except ParseError as exc:
        raise QueryError(f"malformed reply: {exc}") from None
    uid_ok = any(f.type == FieldType.UNIQUE_IDENTIFIER and f.value[: len(uid)] == uid for f in packet.extensions)
    if not uid_ok:
        raise QueryError("the reply does not echo our unique identifier")
    if packet.header.stratum == 0 and packet.header.reference_id == KISS_NTSN:
        return True, []
    pos = 48
    for f in packet.extensions:
        if f.type == FieldType.NTS_AUTHENTICATOR:
            opened = open_auth(f.value, 0, len(f.value))
            if opened is None:
                raise QueryError("malformed authenticator in the reply")
            try:
                plaintext = AEADS[ke.aead].decrypt(ke.s2c, opened[0], opened[1], reply[:pos])
            except AeadError:
                raise QueryError("the reply's authenticator does not verify") from None
            try:
                cookies = [inner.value for inner in iter_extensions(plaintext) if inner.type == FieldType.NTS_COOKIE]
            except ParseError as exc:
                raise QueryError(f"malformed fields inside the reply's authenticator: {exc}") from None
            return False, cookies
        pos += 4 + len(f.value)
    raise QueryError("the reply is not authenticated")


def exchange(host: str, port: int, packet: bytes, timeout: float = 3.0) -> tuple[bytes, int, int]:
    """Send one request; return (reply, t1_ns, t4_ns)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect((host, port))
    except OSError as exc:
        raise QueryError(f"cannot reach {host} port {port}: {exc.strerror or exc}") from None
    with s:
        s.settimeout(timeout)
        t1 = time.time_ns()
        s.send(packet)
        try:
            reply = s.recv(4096)
        except TimeoutError:
            raise QueryError(f"no reply from {host} port {port} within {timeout:g} s") from None
        except OSError as exc:  # e.g. ICMP port unreachable: nothing listens there
            raise QueryError(f"NTP to {host} port {port} failed: {exc.strerror or exc}") from None
        t4 = time.time_ns()
    return reply, t1, t4


def sample(reply: bytes, transmit: bytes, t1: int, t4: int) -> Sample:
    try:
        h = parse_packet(reply).header
    except ParseError as exc:
        raise QueryError(f"malformed reply: {exc}") from None
    if h.mode != 4 or struct.pack(">Q", h.origin_ts) != transmit:
        raise QueryError("the reply does not answer our request (mode or origin timestamp)")
    t2 = ntp64_to_unix_ns(h.receive_ts, t1)
    t3 = ntp64_to_unix_ns(h.transmit_ts, t1)
    # T1 is our own clock reading: the transmit field we sent may be random (RFC 8915 privacy)
    offset = ((t2 - t1) + (t3 - t4)) / 2e9
    delay = ((t4 - t1) - (t3 - t2)) / 1e9
    refid = h.reference_id
    text = refid.rstrip(b"\0")
    printable = h.stratum <= 1 and text.isascii() and text.decode("ascii").isprintable()
    ref = text.decode("ascii") if printable else str(ipaddress.IPv4Address(refid))
    kiss = ref if h.stratum == 0 else None
    return Sample(
        offset, delay, h.stratum, h.leap, ref, short_to_seconds(h.root_delay), short_to_seconds(h.root_dispersion), kiss
    )


def plain_request() -> tuple[bytes, bytes]:
    transmit = struct.pack(">Q", unix_ns_to_ntp64(time.time_ns()) ^ secrets.randbits(24))
    return bytes([0x23]) + bytes(39) + transmit, transmit


def _parse_aead(text: str) -> int:
    if text.upper() in AEAD_NAMES:
        return AEAD_NAMES[text.upper()]
    if text.isascii() and text.isdigit() and int(text) in AEADS:
        return int(text)
    raise ValueError(f"unknown AEAD {text!r} (expected one of: {', '.join(AEAD_NAMES)})")


def run_query(
    host: str,
    *,
    port: int | None = None,
    ke_port: int = 4460,
    ca: Path | None = None,
    plain: bool = False,
    count: int = 1,
    aeads: tuple[str, ...] | None = None,
    keylog: Path | None = None,
    timeout: float = 3.0,
) -> dict[str, object]:
    """Query `host` `count` times (`timeout` seconds for NTS-KE and for each reply); return what a
    person wants to see, as a flat dict (also the JSON output). With several samples, offset and
    delay are their medians, beside each one's minimum and maximum and the samples themselves;
    a Kiss-o'-Death ends the series."""
    if count < 1:
        raise ValueError("--count must be at least 1")
    out: dict[str, object] = {}
    samples: list[Sample] = []
    if plain:
        ntp_host, ntp_port = host, port or 123
        out["server"] = f"{ntp_host} port {ntp_port}"
        out["mode"] = "plain"
        for _ in range(count):
            packet, transmit = plain_request()
            reply, t1, t4 = exchange(ntp_host, ntp_port, packet, timeout)
            samples.append(sample(reply, transmit, t1, t4))
            if samples[-1].kiss:
                break
    else:
        offered = tuple(_parse_aead(a) for a in aeads) if aeads else DEFAULT_AEADS
        ke = key_exchange(host, ke_port, ca, offered, timeout=timeout, keylog=keylog)
        ntp_host, ntp_port = ke.server or host, port or ke.port or 123
        cookies = list(ke.cookies)
        out["server"] = f"{ntp_host} port {ntp_port}"
        out["mode"] = "nts"
        out["nts_ke"] = f"{host} port {ke_port}"
        out["certificate"] = ke.subject
        out["certificate_expires"] = ke.expires
        out["aead"] = f"{AeadId(ke.aead).name.replace('_', '-')} ({ke.aead})"
        out["cookies_from_ke"] = len(ke.cookies)
        fresh = 0
        for _ in range(count):
            if not cookies:
                raise QueryError("out of cookies")
            packet, uid, transmit = nts_request(ke, cookies.pop(0))
            reply, t1, t4 = exchange(ntp_host, ntp_port, packet, timeout)
            if len(reply) > len(packet):
                raise QueryError("the reply is longer than the request")
            nak, new = check_nts_reply(ke, reply, uid)
            if nak:
                raise QueryError("the server answered NTS NAK (cookie or authenticator refused)")
            cookies += new
            fresh += len(new)
            samples.append(sample(reply, transmit, t1, t4))
            if samples[-1].kiss:
                break
        out["cookies_per_reply"] = fresh / len(samples)
        out["authenticated"] = True
    result = samples[-1]
    offsets, delays = [s.offset for s in samples], [s.delay for s in samples]
    out["offset"] = round(statistics.median(offsets), 9)
    out["delay"] = round(statistics.median(delays), 9)
    if len(samples) > 1:
        out["samples"] = len(samples)
        out["offset_min"], out["offset_max"] = round(min(offsets), 9), round(max(offsets), 9)
        out["delay_min"], out["delay_max"] = round(min(delays), 9), round(max(delays), 9)
        out["each"] = [{"offset": round(s.offset, 9), "delay": round(s.delay, 9)} for s in samples]
    out["stratum"] = result.stratum
    out["leap"] = result.leap
    out["reference_id"] = result.reference_id
    out["root_delay"] = result.root_delay
    out["root_dispersion"] = result.root_dispersion
    if result.kiss:
        out["kiss"] = result.kiss
    return out
