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
import hmac
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
    pool_tokens: tuple[bytes, ...] = ()  # the NTS pool's authentication tokens (none: pool requests refused)
    pool_connections: int = 8  # Keep Alive connections at once


@dataclass(frozen=True, slots=True)
class KeReply:
    """What to send to the client, and the session's outcome (a metrics label). `keep_alive`: the
    reply granted the NTS pool's Keep Alive, so the connection stays open for another request."""

    data: bytes
    outcome: str
    keep_alive: bool = False


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


@dataclass(frozen=True, slots=True)
class PoolSupport:
    """The NTS pool asks what this server supports (an authenticated request)."""

    protocols: bool
    algorithms: bool
    keep_alive: bool


@dataclass(frozen=True, slots=True, repr=False)
class PoolFixedKey:
    """The NTS pool asks for cookies for keys it negotiated with a client (an authenticated request)."""

    aead: int
    c2s: bytes
    s2c: bytes
    keep_alive: bool

    def __repr__(self) -> str:  # (never the keys)
        return f"PoolFixedKey(aead={self.aead}, keep_alive={self.keep_alive})"


Outcome = Negotiation | KeRefusal | PoolSupport | PoolFixedKey


def negotiate(records: Sequence[Record], supported: Sequence[int], tokens: Sequence[bytes] = ()) -> Outcome:
    """Decide the answer to a complete request (records up to, excluding, End of Message).
    `tokens`: the NTS pool's authentication tokens; without one of them, the pool's requests
    (Supported ... List, Fixed Key Request) are refused with Error 1, as ntpd-rs does."""
    protocols: list[int] = []
    aeads: list[int] = []
    n_protocol = n_aead = 0
    compliant = False
    pool = _Pool()
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
        elif t in _POOL_RECORDS:
            refusal = pool.take(r)
            if refusal is not None:
                return refusal
        elif r.critical:
            return KeRefusal(ErrorCode.UNRECOGNIZED_CRITICAL_RECORD, "unknown_critical_record")
    if pool.wants_protocols or pool.wants_algorithms or pool.fixed_key is not None:
        return pool.decide(tokens, protocols, aeads, n_protocol, n_aead, supported)
    if n_protocol != 1:
        return KeRefusal(ErrorCode.BAD_REQUEST, "next_protocol_count")
    if NEXT_PROTOCOL_NTPV4 not in protocols:
        return Negotiation(None, None)
    if n_aead != 1:
        return KeRefusal(ErrorCode.BAD_REQUEST, "aead_count")
    chosen = next((a for a in aeads if a in supported and a in AEADS), None)
    return Negotiation(NEXT_PROTOCOL_NTPV4, chosen, compliant and chosen == AeadId.AES_128_GCM_SIV)


_POOL_RECORDS = frozenset({RecordType.KEEP_ALIVE, RecordType.SUPPORTED_NEXT_PROTOCOL_LIST,
                           RecordType.SUPPORTED_ALGORITHM_LIST, RecordType.FIXED_KEY_REQUEST,
                           RecordType.NTP_SERVER_DENY, RecordType.AUTHENTICATION})  # fmt: skip
_POOL_BAD = KeRefusal(ErrorCode.BAD_REQUEST, "pool_bad_record")


class _Pool:
    """The NTS pool's records of one request (draft-ietf-ntp-nts-keyexchange-pool, as ntpd-rs)."""

    __slots__ = ("fixed_key", "keep_alive", "token", "wants_algorithms", "wants_protocols")

    def __init__(self) -> None:
        self.keep_alive = self.wants_protocols = self.wants_algorithms = False
        self.fixed_key: bytes | None = None
        self.token: bytes | None = None

    def take(self, r: Record) -> KeRefusal | None:
        t = r.type
        if t == RecordType.KEEP_ALIVE:
            if r.body:
                return _POOL_BAD
            self.keep_alive = True
        elif t == RecordType.SUPPORTED_NEXT_PROTOCOL_LIST:
            if self.wants_protocols:
                return _POOL_BAD
            self.wants_protocols = True
        elif t == RecordType.SUPPORTED_ALGORITHM_LIST:
            if self.wants_algorithms:
                return _POOL_BAD
            self.wants_algorithms = True
        elif t == RecordType.FIXED_KEY_REQUEST:
            if self.fixed_key is not None or not r.body or len(r.body) % 2:
                return _POOL_BAD
            self.fixed_key = r.body
        elif t == RecordType.AUTHENTICATION:
            if self.token is not None:
                return _POOL_BAD
            self.token = r.body
        return None  # (NTP Server Deny: this server names no alternatives to avoid)

    def decide(
        self, tokens: Sequence[bytes], protocols: list[int], aeads: list[int], n_protocol: int, n_aead: int,
        supported: Sequence[int],
    ) -> Outcome:  # fmt: skip
        token = self.token
        if token is None or not any(hmac.compare_digest(token, t) for t in tokens):
            return KeRefusal(ErrorCode.BAD_REQUEST, "pool_not_permitted")
        if self.wants_protocols or self.wants_algorithms:
            if self.fixed_key is not None or n_protocol or n_aead:
                return KeRefusal(ErrorCode.BAD_REQUEST, "pool_mixed_request")
            return PoolSupport(self.wants_protocols, self.wants_algorithms, self.keep_alive)
        keys = self.fixed_key
        assert keys is not None
        if n_protocol != 1 or n_aead != 1 or protocols != [NEXT_PROTOCOL_NTPV4] or len(aeads) != 1:
            return KeRefusal(ErrorCode.BAD_REQUEST, "pool_fixed_key_request")
        aead = aeads[0]
        if aead not in supported or aead not in AEADS:
            return KeRefusal(ErrorCode.BAD_REQUEST, "pool_aead")
        half = len(keys) // 2
        if half != AEADS[aead].key_len:
            return KeRefusal(ErrorCode.BAD_REQUEST, "pool_key_length")
        return PoolFixedKey(aead, keys[:half], keys[half:], self.keep_alive)


def response(
    outcome: Negotiation | KeRefusal,
    cookies: Sequence[bytes] = (),
    server: str | None = None,
    port: int | None = None,
    keep_alive: bool = False,
) -> bytes:
    """The bytes of the server's reply (always ending with End of Message)."""
    if isinstance(outcome, KeRefusal) or outcome.protocol is None or outcome.aead is None:
        return _refusal(outcome)
    head = _accepted(outcome.protocol, outcome.aead, outcome.compliant_gcm, port, server)
    cookie_records = [_COOKIE_HEAD.pack(RecordType.NEW_COOKIE, len(c)) + c for c in cookies]
    return b"".join([head, *cookie_records, _KEEP_ALIVE if keep_alive else b"", _END])


def support_response(outcome: PoolSupport, supported: Sequence[int], keep_alive: bool) -> bytes:
    """What this server supports, for the NTS pool: AEADs with their key lengths, protocols."""
    records = []
    if outcome.algorithms:
        body = b"".join(struct.pack(">HH", a, AEADS[a].key_len) for a in supported if a in AEADS)
        records.append(Record(True, RecordType.SUPPORTED_ALGORITHM_LIST, body))
    if outcome.protocols:
        records.append(Record(True, RecordType.SUPPORTED_NEXT_PROTOCOL_LIST, struct.pack(">H", NEXT_PROTOCOL_NTPV4)))
    return serialize_records(records) + (_KEEP_ALIVE if keep_alive else b"") + _END


_COOKIE_HEAD = struct.Struct(">HH")  # New Cookie records are not critical
_END = serialize_records([Record(True, RecordType.END_OF_MESSAGE)])
_KEEP_ALIVE = serialize_records([Record(False, RecordType.KEEP_ALIVE)])


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

    def keep(self, data: bytes, supported: tuple[int, ...], outcome: Outcome) -> None:
        """Keep an outcome that depends on the request and the AEADs alone: not the NTS pool's
        (they depend on the tokens configured, and carry keys)."""
        if isinstance(outcome, (PoolSupport, PoolFixedKey)) or (
            isinstance(outcome, KeRefusal) and outcome.reason.startswith("pool_")
        ):
            return
        if len(self.outcomes) < self.limit:
            self.outcomes[(data, supported)] = outcome


class KeRequest:
    """Collects one request from the TLS stream and decides on it (no keys, no cookies)."""

    def __init__(
        self,
        supported: Sequence[int],
        max_request: int = MAX_REQUEST,
        decided: DecidedRequests | None = None,
        tokens: Sequence[bytes] = (),
    ) -> None:
        self._reader = RecordReader(max_request)
        self._records: list[Record] = []
        self._supported = tuple(supported)
        self._decided = decided
        self._tokens = tokens
        self._first = True
        self.done = False

    def receive(self, data: bytes) -> Outcome | None:
        """Feed decrypted bytes; None until a whole request has arrived. Raises ParseError when
        the request is longer than allowed or continues after End of Message."""
        if not self._first or self._decided is None:
            self._first = False
            return self._receive(data)
        self._first = False
        known = self._decided.get(data, self._supported)
        if known is not None and len(data) <= self._reader.max_bytes:
            self.done = True
            return known
        outcome = self._receive(data)
        if outcome is not None:
            self._decided.keep(data, self._supported, outcome)
        return outcome

    def _receive(self, data: bytes) -> Outcome | None:
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
        return negotiate(self._records, self._supported, self._tokens)


class KeServerSession:
    """One NTS-KE exchange: bytes in, the reply's bytes and outcome out (see the module comment)."""

    __slots__ = ("keep_alive", "keyring", "request", "settings", "turns")

    def __init__(
        self,
        settings: KeSettings,
        keyring: KeyRing,
        decided: DecidedRequests | None = None,
        turns: Iterator[int] | None = None,
        keep_alive: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.request = KeRequest(settings.supported_aeads, settings.max_request, decided, settings.pool_tokens)
        self.keep_alive = keep_alive  # whether the server grants one more Keep Alive connection now
        self.turns = turns  # shared by the server's sessions: which of several NTP servers to name next

    def receive(self, data: bytes, export: Exporter, now: float) -> KeReply | None:
        """Feed decrypted bytes. None until the request is complete; then what to send. Raises
        ParseError as KeRequest.receive does (the shell closes the connection)."""
        outcome = self.request.receive(data)
        if outcome is None:
            return None
        if isinstance(outcome, KeRefusal):
            return KeReply(response(outcome), f"error_{outcome.reason}")
        if isinstance(outcome, (PoolSupport, PoolFixedKey)):
            return self._pool(outcome, now)
        if outcome.aead is None:
            missing = "aead" if outcome.protocol is not None else "protocol"
            return KeReply(response(outcome), f"no_common_{missing}")
        key_len = AEADS[outcome.aead].key_len
        c2s = export(EXPORTER_LABEL, key_len, outcome.exporter_context(False))
        s2c = export(EXPORTER_LABEL, key_len, outcome.exporter_context(True))
        cookies = self.keyring.seal_many(CookieKeys(outcome.aead, c2s, s2c), now, COOKIES_PER_RESPONSE)
        return KeReply(response(outcome, cookies, self._server(), self.settings.ntp_port), f"ok_aead_{outcome.aead}")

    def _server(self) -> str | None:
        """The NTP server this answer names (Server Negotiation): the next of several, in turn."""
        servers = self.settings.ntp_server
        if not servers:
            return None
        return servers[next(self.turns, 0) % len(servers) if self.turns else 0]

    def _pool(self, outcome: PoolSupport | PoolFixedKey, now: float) -> KeReply:
        """The NTS pool's requests: what is supported, or cookies for keys the pool negotiated with a
        client; Keep Alive granted while the server has room for another such connection."""
        keep = outcome.keep_alive and self.keep_alive is not None and self.keep_alive()
        if isinstance(outcome, PoolSupport):
            return KeReply(support_response(outcome, self.settings.supported_aeads, keep), "pool_support", keep)
        keys = CookieKeys(outcome.aead, outcome.c2s, outcome.s2c)
        cookies = self.keyring.seal_many(keys, now, COOKIES_PER_RESPONSE)
        accepted = Negotiation(NEXT_PROTOCOL_NTPV4, outcome.aead)
        data = response(accepted, cookies, self._server(), self.settings.ntp_port, keep)
        return KeReply(data, "pool_fixed_key", keep)
