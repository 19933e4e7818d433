"""The server side of one NTS-KE exchange, sans-IO (RFC 8915 section 4).

Strategy: `KeServerSession.receive(bytes)` buffers records (bounded) until End of Message, then
returns a `Negotiation` (what to answer, and which exporter context to derive keys with) or a
`KeRefusal` (an Error record to send). The TLS shell exports the keys, asks the key ring for
cookies and calls `response(...)` for the bytes to send. Validation follows RFC 8915 section 4 in
record order, as chrony does: the first problem wins, so an unrecognised critical record before
Next Protocol or AEAD yields Error 0, never Error 1; duplicate or missing records are checked last.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..aead import AEADS
from ..wire.errors import ParseError
from ..wire.ke_records import NEXT_PROTOCOL_NTPV4, ErrorCode, Record, RecordReader, RecordType, serialize_records

EXPORTER_LABEL = b"EXPORTER-network-time-security"
COOKIES_PER_RESPONSE = 8
MAX_REQUEST = 4096  # a request is a few dozen bytes; anything this large is abuse


@dataclass(frozen=True, slots=True)
class Negotiation:
    """A request that succeeded. `aead` is None when no offered AEAD is supported."""

    protocol: int | None
    aead: int | None
    compliant_gcm: bool = False

    def exporter_context(self, s2c: bool) -> bytes:
        """RFC 8915 section 5.1 context; chrony's pre-4.6 clients expect id 15 for AES-128-GCM-SIV."""
        assert self.protocol is not None and self.aead is not None
        context_aead = 15 if self.aead == 30 and not self.compliant_gcm else self.aead
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
            protocols += struct.unpack(f">{len(r.body) // 2}H", r.body)
        elif t == RecordType.AEAD_ALGORITHM:
            if len(r.body) < 2 or len(r.body) % 2:
                return KeRefusal(ErrorCode.BAD_REQUEST, "bad_aead")
            n_aead += 1
            aeads += struct.unpack(f">{len(r.body) // 2}H", r.body)
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
    return Negotiation(NEXT_PROTOCOL_NTPV4, chosen, compliant and chosen == 30)


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


# Whole requests that came in one read, with the AEADs supported then -> their outcome. Clients of
# one implementation send the same bytes every time, so most sessions skip parsing (negotiate() is
# pure). Bounded: once full, new requests are parsed as usual and not kept.
_DECIDED: dict[tuple[bytes, tuple[int, ...]], Negotiation | KeRefusal] = {}
_DECIDED_MAX = 64


class KeServerSession:
    """Collects one request from the TLS stream and decides on it."""

    def __init__(self, supported: Sequence[int], max_request: int = MAX_REQUEST) -> None:
        self._reader = RecordReader(max_request)
        self._records: list[Record] = []
        self._supported = tuple(supported)
        self._first = True
        self.done = False

    def receive(self, data: bytes) -> Negotiation | KeRefusal | None:
        """Feed decrypted bytes; None until a whole request has arrived. Raises ParseError when
        the request is longer than allowed or continues after End of Message."""
        if not self._first:
            return self._receive(data)
        self._first = False
        key = (data, self._supported)
        outcome = _DECIDED.get(key)
        if outcome is not None and len(data) <= self._reader.max_bytes:
            self.done = True
            return outcome
        outcome = self._receive(data)
        if outcome is not None and len(_DECIDED) < _DECIDED_MAX:
            _DECIDED[key] = outcome
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
