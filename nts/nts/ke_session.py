"""The server side of one NTS-KE exchange, sans-IO (RFC 8915 section 4), as h11 is for HTTP.

Strategy: `KeServerSession.receive(bytes, export, now)` takes the decrypted bytes the TLS shell
read, a function giving the TLS exporter's keys, and the time; it returns None until the request
is complete, then a `KeReply`: the bytes to send and the outcome (a metrics label). The shell only
runs TLS and moves bytes. Inside, `KeRequest` buffers records (bounded) until End of Message and
decides: a `Negotiation` (what to answer, and which exporter context to derive keys with) or a
`KeRefusal` (an Error record to send); for an accepted request the session exports the keys and has
the key ring seal the cookies. Validation follows RFC 8915 section 4 in record order, as chrony
does: the first problem wins, so an unrecognised critical record before Next Protocol or AEAD
yields Error 0, never Error 1; duplicate or missing records are checked last. Whole requests seen
before are answered from `DecidedRequests`, a bounded memory that the sessions' owner keeps.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..core.policy import Network
from ..wire.errors import ParseError
from ..wire.ke_records import (
    NEXT_PROTOCOL_NTPV4,
    ErrorCode,
    Record,
    RecordReader,
    RecordType,
    serialize_records,
    u16_list,
)
from .aead import AEADS, AeadId
from .cookies import CookieKeys, KeyRing

EXPORTER_LABEL = b"EXPORTER-network-time-security"
COOKIES_PER_RESPONSE = 8
MAX_REQUEST = 4096  # a request is a few dozen bytes; anything this large is abuse
Exporter = Callable[[bytes, int, bytes], bytes]  # (label, length, context) -> the TLS exporter's bytes


@dataclass(frozen=True, slots=True)
class KeSettings:
    supported_aeads: tuple[int, ...]
    max_connections: int = 256  # sessions under way (past their first bytes)
    session_timeout: float = 5.0
    max_pending: int = 16384  # connections accepted that have not sent a byte yet
    first_bytes_timeout: float = 2.0
    max_per_client: int = 16  # sessions under way at once per client address (IPv6: per /64)
    exempt: tuple[Network, ...] = ()  # clients the per-address rate and max_per_client do not apply to
    proxies: tuple[Network, ...] = ()  # load balancers whose connections begin with a PROXY header
    max_request: int = 1024
    rate: float = 2.0  # sessions per second per client address
    burst: int = 16
    ntp_server: tuple[str, ...] = ()  # Server Negotiation: one host, or several handed out in turn
    ntp_port: int | None = None


@dataclass(frozen=True, slots=True)
class KeReply:
    """What to send to the client, and the session's outcome (a metrics label)."""

    data: bytes
    outcome: str


@dataclass(frozen=True, slots=True)
class Negotiation:
    """A request that succeeded. `aead` is None when no offered AEAD is supported."""

    protocol: int | None
    aead: int | None
    compliant_gcm: bool = False

    def exporter_context(self, s2c: bool) -> bytes:
        """RFC 8915 section 5.1 context; chrony's pre-4.6 clients expect id 15 for AES-128-GCM-SIV."""
        assert self.protocol is not None and self.aead is not None
        compat = self.aead == AeadId.AES_128_GCM_SIV and not self.compliant_gcm
        context_aead = AeadId.AES_SIV_CMAC_256 if compat else self.aead
        return struct.pack(">HHB", self.protocol, context_aead, 1 if s2c else 0)


@dataclass(frozen=True, slots=True)
class KeRefusal:
    code: int
    reason: str  # metrics label


def negotiate(records: Sequence[Record], supported: Sequence[int]) -> Negotiation | KeRefusal:
    """Decide the answer to a complete request (records up to, excluding, End of Message)."""
    protocols: list[int] = []
    aeads: list[int] = []
    n_protocol = n_aead = 0
    compliant = False
    for r in records:
        t = r.type
        if t == RecordType.NEXT_PROTOCOL:
            if not r.critical or len(r.body) < 2 or len(r.body) % 2:
                return KeRefusal(ErrorCode.BAD_REQUEST, "bad_next_protocol")
            n_protocol += 1
            protocols += u16_list(r.body)
        elif t == RecordType.AEAD_ALGORITHM:
            if len(r.body) < 2 or len(r.body) % 2:
                return KeRefusal(ErrorCode.BAD_REQUEST, "bad_aead")
            n_aead += 1
            aeads += u16_list(r.body)
        elif t == RecordType.COMPLIANT_128GCM_EXPORT:
            if r.body:
                return KeRefusal(ErrorCode.BAD_REQUEST, "bad_compliance_record")
            compliant = True
        elif t in (RecordType.ERROR, RecordType.WARNING, RecordType.NEW_COOKIE):
            return KeRefusal(ErrorCode.BAD_REQUEST, "client_sent_server_record")
        elif t in (RecordType.NTPV4_SERVER, RecordType.NTPV4_PORT, RecordType.END_OF_MESSAGE):
            continue  # server/port are requests we may ignore (section 4.1.7, 4.1.8)
        elif r.critical:
            return KeRefusal(ErrorCode.UNRECOGNIZED_CRITICAL_RECORD, "unknown_critical_record")
    if n_protocol != 1:
        return KeRefusal(ErrorCode.BAD_REQUEST, "next_protocol_count")
    if NEXT_PROTOCOL_NTPV4 not in protocols:
        return Negotiation(None, None)
    if n_aead != 1:
        return KeRefusal(ErrorCode.BAD_REQUEST, "aead_count")
    chosen = next((a for a in aeads if a in supported and a in AEADS), None)
    return Negotiation(NEXT_PROTOCOL_NTPV4, chosen, compliant and chosen == AeadId.AES_128_GCM_SIV)


def response(
    outcome: Negotiation | KeRefusal,
    cookies: Sequence[bytes] = (),
    server: str | None = None,
    port: int | None = None,
) -> bytes:
    """The bytes of the server's reply (always ending with End of Message)."""
    if isinstance(outcome, KeRefusal) or outcome.protocol is None or outcome.aead is None:
        return _refusal(outcome)
    head = _accepted(outcome.protocol, outcome.aead, outcome.compliant_gcm, port, server)
    return b"".join([head, *[_COOKIE_HEAD.pack(RecordType.NEW_COOKIE, len(c)) + c for c in cookies], _END])


_COOKIE_HEAD = struct.Struct(">HH")  # New Cookie records are not critical
_END = serialize_records([Record(True, RecordType.END_OF_MESSAGE)])


@functools.lru_cache(maxsize=64)
def _accepted(protocol: int, aead: int, compliant_gcm: bool, port: int | None, server: str | None) -> bytes:
    """The records before the cookies of an accepted request: the same for every session alike."""
    records = [
        Record(True, RecordType.NEXT_PROTOCOL, struct.pack(">H", protocol)),
        Record(True, RecordType.AEAD_ALGORITHM, struct.pack(">H", aead)),
    ]
    if compliant_gcm:
        records.append(Record(False, RecordType.COMPLIANT_128GCM_EXPORT))
    if port is not None:
        records.append(Record(True, RecordType.NTPV4_PORT, struct.pack(">H", port)))
    if server is not None:
        records.append(Record(True, RecordType.NTPV4_SERVER, server.encode("ascii")))
    return serialize_records(records)


def _refusal(outcome: Negotiation | KeRefusal) -> bytes:
    if isinstance(outcome, KeRefusal):
        records = [Record(True, RecordType.ERROR, struct.pack(">H", outcome.code))]
    elif outcome.protocol is None:
        records = [Record(True, RecordType.NEXT_PROTOCOL)]
    else:
        records = [
            Record(True, RecordType.NEXT_PROTOCOL, struct.pack(">H", outcome.protocol)),
            Record(True, RecordType.AEAD_ALGORITHM),
        ]
    return serialize_records([*records, Record(True, RecordType.END_OF_MESSAGE)])


class DecidedRequests:
    """Whole requests that came in one read, with the AEADs supported then -> their outcome. Clients
    of one implementation send the same bytes every time, so most sessions skip parsing
    (negotiate() is pure). Bounded: once full, new requests are parsed as usual and not kept."""

    __slots__ = ("limit", "outcomes")

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.outcomes: dict[tuple[bytes, tuple[int, ...]], Negotiation | KeRefusal] = {}

    def get(self, data: bytes, supported: tuple[int, ...]) -> Negotiation | KeRefusal | None:
        return self.outcomes.get((data, supported))

    def keep(self, data: bytes, supported: tuple[int, ...], outcome: Negotiation | KeRefusal) -> None:
        if len(self.outcomes) < self.limit:
            self.outcomes[(data, supported)] = outcome


class KeRequest:
    """Collects one request from the TLS stream and decides on it (no keys, no cookies)."""

    def __init__(
        self, supported: Sequence[int], max_request: int = MAX_REQUEST, decided: DecidedRequests | None = None
    ) -> None:
        self._reader = RecordReader(max_request)
        self._records: list[Record] = []
        self._supported = tuple(supported)
        self._decided = decided
        self._first = True
        self.done = False

    def receive(self, data: bytes) -> Negotiation | KeRefusal | None:
        """Feed decrypted bytes; None until a whole request has arrived. Raises ParseError when
        the request is longer than allowed or continues after End of Message."""
        if not self._first or self._decided is None:
            self._first = False
            return self._receive(data)
        self._first = False
        outcome = self._decided.get(data, self._supported)
        if outcome is not None and len(data) <= self._reader.max_bytes:
            self.done = True
            return outcome
        outcome = self._receive(data)
        if outcome is not None:
            self._decided.keep(data, self._supported, outcome)
        return outcome

    def _receive(self, data: bytes) -> Negotiation | KeRefusal | None:
        if self.done:
            if data:
                raise ParseError("ke_after_end", "data after End of Message")
            return None
        for record in self._reader.feed(data):
            if self.done:
                raise ParseError("ke_after_end", "data after End of Message")
            if record.type == RecordType.END_OF_MESSAGE:
                self.done = True
                if not record.critical or record.body:
                    return KeRefusal(ErrorCode.BAD_REQUEST, "bad_end_of_message")
            else:
                self._records.append(record)
        if not self.done:
            return None
        if self._reader.pending:
            raise ParseError("ke_after_end", "data after End of Message")
        return negotiate(self._records, self._supported)


class KeServerSession:
    """One NTS-KE exchange: bytes in, the reply's bytes and outcome out (see the module comment)."""

    __slots__ = ("keyring", "request", "settings", "turns")

    def __init__(
        self,
        settings: KeSettings,
        keyring: KeyRing,
        decided: DecidedRequests | None = None,
        turns: Iterator[int] | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.request = KeRequest(settings.supported_aeads, settings.max_request, decided)
        self.turns = turns  # shared by the server's sessions: which of several NTP servers to name next

    def receive(self, data: bytes, export: Exporter, now: float) -> KeReply | None:
        """Feed decrypted bytes. None until the request is complete; then what to send. Raises
        ParseError as KeRequest.receive does (the shell closes the connection)."""
        outcome = self.request.receive(data)
        if outcome is None:
            return None
        if isinstance(outcome, KeRefusal):
            return KeReply(response(outcome), f"error_{outcome.reason}")
        if outcome.aead is None:
            missing = "aead" if outcome.protocol is not None else "protocol"
            return KeReply(response(outcome), f"no_common_{missing}")
        key_len = AEADS[outcome.aead].key_len
        c2s = export(EXPORTER_LABEL, key_len, outcome.exporter_context(False))
        s2c = export(EXPORTER_LABEL, key_len, outcome.exporter_context(True))
        cookies = self.keyring.seal_many(CookieKeys(outcome.aead, c2s, s2c), now, COOKIES_PER_RESPONSE)
        settings, servers = self.settings, self.settings.ntp_server
        server = servers[next(self.turns, 0) % len(servers) if self.turns else 0] if servers else None
        return KeReply(response(outcome, cookies, server, settings.ntp_port), f"ok_aead_{outcome.aead}")
