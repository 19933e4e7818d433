"""The NTS-KE listener: TLS 1.3 over TCP, driven from asyncio through pyOpenSSL memory BIOs.

Strategy: each connection is an asyncio Protocol that feeds received bytes into an
`SSL.Connection` whose network side is a memory BIO, and writes whatever TLS produces back to the
transport, so no call ever blocks the loop. The handshake's cost is OpenSSL's; nothing waits on a
slow peer. Limits, each refused fast and counted: concurrent connections, a per-address rate,
a deadline for the whole session, and the request size (enforced by the sans-IO session).
After End of Message the server answers, sends close_notify and closes (RFC 8915 section 4).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from OpenSSL import SSL

from ..aead import AEADS
from ..cookies import CookieKeys, KeyRing
from ..core.decisions import Stats
from ..core.policy import RATE_OK, RateLimiter, RateSettings
from ..logutil import RateLimitedLog
from ..wire.errors import ParseError
from .certs import ALPN, AlpnRefused, CertStore
from .session import COOKIES_PER_RESPONSE, EXPORTER_LABEL, KeRefusal, KeServerSession, Negotiation, response

log = logging.getLogger("ntsd.nts")


@dataclass(frozen=True, slots=True)
class KeSettings:
    supported_aeads: tuple[int, ...]
    max_connections: int = 256
    session_timeout: float = 5.0
    max_request: int = 1024
    rate: float = 2.0  # sessions per second per client address
    burst: int = 16
    ntp_server: str | None = None
    ntp_port: int | None = None


class KeServer:
    """Accepts NTS-KE sessions on any number of listening sockets."""

    def __init__(self, certs: CertStore, keyring: KeyRing, settings: KeSettings, stats: Stats) -> None:
        self.certs = certs
        self.keyring = keyring
        self.settings = settings
        self.stats = stats
        self.active = 0
        self._limiter = RateLimiter(RateSettings(rate=settings.rate, burst=settings.burst, kod=False))
        self._servers: list[asyncio.base_events.Server] = []
        self._events = RateLimitedLog(log)
        self.wall_clock: Callable[[], float] = time.time

    def configure(self, settings: KeSettings) -> None:
        if (settings.rate, settings.burst) != (self.settings.rate, self.settings.burst):
            self._limiter = RateLimiter(RateSettings(rate=settings.rate, burst=settings.burst, kod=False))
        self.settings = settings

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(lambda: KeConnection(self), sock=sock, backlog=1024)
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def count(self, what: str, peer: str | None = None) -> None:
        self.stats.inc(("nts_ke", what))
        if peer is not None:  # a refusal or failure worth a (rate-limited) log line
            self._events(what, "NTS-KE session from %s: %s", peer, what)

    def admit(self, ip: str) -> str | None:
        """None to accept a new connection, else the reason to refuse it."""
        if self.active >= self.settings.max_connections:
            return "refused_busy"
        if self._limiter.check(ip, time.monotonic_ns()) != RATE_OK:
            return "refused_rate"
        return None

    def answer(self, conn: SSL.Connection, outcome: Negotiation | KeRefusal) -> bytes:
        if isinstance(outcome, KeRefusal):
            self.count(f"error_{outcome.reason}")
            return response(outcome)
        if outcome.aead is None:
            self.count("no_common_aead" if outcome.protocol is not None else "no_common_protocol")
            return response(outcome)
        key_len = AEADS[outcome.aead].key_len
        c2s = conn.export_keying_material(EXPORTER_LABEL, key_len, outcome.exporter_context(False))
        s2c = conn.export_keying_material(EXPORTER_LABEL, key_len, outcome.exporter_context(True))
        keys = CookieKeys(outcome.aead, bytes(c2s), bytes(s2c))
        now = self.wall_clock()
        cookies = self.keyring.seal_many(keys, now, COOKIES_PER_RESPONSE)
        self.count(f"ok_aead_{outcome.aead}")
        return response(outcome, cookies, self.settings.ntp_server, self.settings.ntp_port)


class KeConnection(asyncio.Protocol):
    """One NTS-KE session."""

    def __init__(self, server: KeServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.tls: SSL.Connection | None = None
        self.session = KeServerSession(server.settings.supported_aeads, server.settings.max_request)
        self.handshaken = False
        self.finished = False
        self._timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        refusal = self.server.admit(self.peer)
        if refusal is not None:
            self.server.count(refusal, self.peer)
            transport.abort()
            return
        self.server.active += 1
        self.server.count("connections")
        self.tls = SSL.Connection(self.server.certs.context, None)
        self.tls.set_accept_state()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.settings.session_timeout, self._timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tls is not None:
            self.server.active -= 1
            self.tls = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> None:
        self._timer = None
        self.server.count("timeout", self.peer)
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.tls is None or self.finished:
            return
        self.tls.bio_write(data)
        try:
            self._advance()
        except AlpnRefused:
            self.server.count("refused_alpn", self.peer)
            self._flush()  # the no_application_protocol alert
            self._abort()
        except SSL.Error:
            self.server.count("tls_error" if self.handshaken else "handshake_failed", self.peer)
            self._flush()
            self._abort()
        except Exception:  # a bug must cost this session only, and say so once
            self.server.count("internal_error")
            log.exception("internal error in an NTS-KE session with %s (closed)", self.peer)
            self._abort()

    def eof_received(self) -> bool | None:
        if not self.finished:
            self.server.count("client_closed_early")
        return False  # close the transport

    def _advance(self) -> None:
        tls = self.tls
        assert tls is not None
        if not self.handshaken:
            try:
                tls.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            self.handshaken = True
            if tls.get_alpn_proto_negotiated() != ALPN:  # a client that offered no ALPN at all
                self.server.count("refused_no_alpn", self.peer)
                self._flush()
                self._abort()
                return
        while not self.finished:
            try:
                chunk = tls.recv(4096)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.server.count("client_closed_early")
                self._abort()
                return
            try:
                outcome = self.session.receive(chunk)
            except ParseError as exc:
                self.server.count(f"refused_{exc.code}", self.peer)
                self._abort()
                return
            if outcome is not None:
                self._reply(self.server.answer(tls, outcome))
        self._flush()

    def _reply(self, payload: bytes) -> None:
        tls = self.tls
        assert tls is not None and self.transport is not None
        self.finished = True
        tls.sendall(payload)  # one TLS record: some clients need the answer in a single write
        try:
            tls.shutdown()
        except SSL.Error:
            pass
        self._flush()
        self.transport.close()

    def _flush(self) -> None:
        tls, transport = self.tls, self.transport
        if tls is None or transport is None:
            return
        while True:
            try:
                out = tls.bio_read(65536)
            except SSL.WantReadError:
                return
            if not out:
                return
            transport.write(out)
