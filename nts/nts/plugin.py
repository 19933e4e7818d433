"""The `nts` plugin: NTS-KE listener, cookie key ring and NTS-protected NTP.

Strategy: everything privileged or fallible happens in the constructor, before the daemon drops
privileges and before any worker is forked: the master secret is loaded (or created), the
certificate and key are checked and loaded, and the NTS-KE sockets are bound. `start()` then only
attaches the listener to the running loop and begins watching the certificate files. A reload
applies new limits, negotiation records and rotation settings in place and re-reads the
certificate. In a single process it also opens new listen addresses and closes dropped ones; with
workers (which share the sockets bound before they started) that takes a restart, as a new
key_dir always does (the main process names both; the running ones are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ..config import Node, PluginError, located
from ..core.decisions import Answer, drop
from ..core.handler import Client, ReplyContext, Request, RequestHandler
from ..core.policy import Shared
from ..core.stats import CounterHelp, Counters, GaugeHelp, SeriesHelp
from ..files import every, read_private_file
from ..net import format_addr, open_tcp_listener
from ..wire.errors import ParseError
from ..wire.extensions import FieldType
from ..wire.packet import HEADER_LEN, MAX_MAC_LEN
from . import chrony_keys, nettle, tlsconf
from .aead import AeadId
from .certs import CertError, CertStore, expiry_problem
from .cookies import KeyRing, check_secret, load_or_create_secret
from .ke_listener import KeServer
from .ke_session import KeSettings
from .packets import NtsPackets
from .settings import NtsSettings, parse_nts

log = logging.getLogger("ntsd.nts")
_NTS_TYPES = (FieldType.NTS_COOKIE, FieldType.NTS_AUTHENTICATOR)
_D_NOT_CLIENT = drop("nts_not_client_mode")
_EXPIRY_CHECK_S = 3600.0  # how often the certificate's expiry is looked at (the log says so once a day)


def bind_tcp(host: str, port: int) -> socket.socket:
    try:
        return open_tcp_listener(host, port)
    except OSError as exc:
        raise PluginError(f"cannot listen for NTS-KE on {format_addr((host, port))}: {exc.strerror}") from None


_SHORTEST = HEADER_LEN + MAX_MAC_LEN  # a body this short holds no field (it is a MAC, if anything)


def read_pool_tokens(path: Path) -> tuple[bytes, ...]:
    """The NTS pool's authentication tokens, one per line (# comments): a secret file, checked so."""
    tokens = []
    for number, line in enumerate(read_private_file(path, 64 * 1024).decode("ascii", "replace").splitlines(), 1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if len(token) < 16 or not token.isprintable() or " " in token:
            raise ParseError("pool_token", f"line {number}: a token is 16 or more printable characters, no spaces")
        tokens.append(token.encode())
    return tuple(tokens)


def read_chrony_keys(path: Path) -> tuple[chrony_keys.ChronyKey, ...]:
    """A chrony server's ntskeys file: a secret, so checked as ntsd's own (not readable by others)."""
    return chrony_keys.parse(read_private_file(path, 64 * 1024).decode("ascii", "replace"))


class NtsPlugin(RequestHandler):
    """NTS (RFC 8915): key establishment over TLS and authenticated NTP. A `RequestHandler` for the
    pipeline and, structurally, an `nts.server.plugin.Plugin` for the shell."""

    name: ClassVar[str] = "nts"
    section: ClassVar[str] = "nts"
    order: ClassVar[int] = 10
    listens: ClassVar[bool] = True
    COUNTERS: ClassVar[CounterHelp] = {
        "nts_ke_connections": ((), "NTS-KE connections accepted; each ends in one nts_ke_sessions outcome."),
        "nts_ke_sessions": (
            ("outcome", "aead"),
            "NTS-KE sessions (accepted connections) by how they ended: ok (aead: the one agreed), "
            "error_* (an Error record sent), no_common_*, refused_* (ALPN, a malformed request), timeout, "
            "handshake_failed, tls_error, client_closed_early, internal_error; no_first_bytes (silent past "
            "first_bytes_timeout), evicted (closed for a newer connection: idle, or the idlest handshake), "
            "busy and per_client (left unread to their deadline: no session slot, or the client had "
            "max_connections_per_client), unexpected_proxy_header (from an address not in proxy_protocol); "
            "the NTS pool's: pool_support, pool_fixed_key, pool_closed (it closed a kept connection).",
        ),
        "nts_ke_refused": (
            ("reason",),
            ("NTS-KE connections refused: access lists, rate; proxy_* (a balancer's without a good PROXY header)."),
        ),
        "nts_ke_accept_errors": (("error",), "Failed accept() calls on NTS-KE sockets (accepting pauses)."),
        "nts_ke_pool_replies": (
            ("kind",),
            "Replies the NTS pool kept its connection open after (Keep Alive), by request: pool_support, "
            "pool_fixed_key (a connection's last reply is its nts_ke_sessions outcome).",
        ),
    }
    SERIES: ClassVar[SeriesHelp] = {
        "nts_ke_connections": ((),),
        "nts_ke_refused": (("access",), ("rate",)),
        "nts_ke_sessions": (
            ("timeout", ""),
            ("handshake_failed", ""),
            ("tls_error", ""),
            ("internal_error", ""),
            ("no_first_bytes", ""),
            ("evicted", ""),
            ("busy", ""),
        ),
        "replies": (("nts",),),
        "naks": (("nts", "cookie_malformed"), ("nts", "cookie_forged"), ("nts", "cookie_key_unknown")),
    }
    GAUGES: ClassVar[GaugeHelp] = {
        "nts_certificate_expiry_timestamp_seconds": "When the NTS-KE certificate in use expires (notAfter).",
        "nts_ke_open_sessions": "NTS-KE sessions under way (past their first bytes; max_connections).",
        "nts_ke_pending_connections": "NTS-KE connections that have sent nothing yet (max_pending_connections).",
    }
    may_bind = True

    @classmethod
    def listen_addresses(cls, settings: NtsSettings) -> tuple[tuple[str, int], ...]:
        return tuple(settings.listen)

    @classmethod
    def restart_only(cls, running: NtsSettings, new: NtsSettings) -> list[str]:
        return ["nts.key_dir"] if new.key_dir != running.key_dir else []

    @classmethod
    def parse_config(cls, node: Node) -> NtsSettings:
        return parse_nts(node)

    @classmethod
    def check(cls, settings: NtsSettings) -> list[tuple[bool, str]]:
        out = []
        try:
            store = CertStore(settings.certificate, settings.private_key)
        except CertError as exc:
            out.append((True, located("nts", str(exc), settings.certificate, settings.private_key)))
        else:
            problem = expiry_problem(store.not_after, datetime.datetime.now(datetime.UTC))
            if problem is not None:
                out.append((False, f"nts: certificate {store.subject} {problem[1]}"))
        why = check_secret(settings.key_dir)
        if why is not None:
            out.append((True, located("nts.key_dir", why, settings.key_dir)))
        for key, path, read in (("nts.chrony_keys", settings.chrony_keys, read_chrony_keys),
                                 ("nts.pool_tokens", settings.pool_tokens, read_pool_tokens)):  # fmt: skip
            if path is not None:
                try:
                    read(path)
                except (OSError, ParseError) as exc:
                    out.append((True, located(key, str(exc), path)))
        return out

    @classmethod
    def describe(cls, settings: NtsSettings) -> list[str]:
        aeads = ", ".join(AeadId(a).name.replace("_", "-") for a in settings.aeads)
        out = [f"nts-ke listen: {', '.join(format_addr(a) for a in settings.listen)} (AEADs {aeads}; master secret "
               f"in {settings.key_dir})"]  # fmt: skip
        with contextlib.suppress(CertError):
            store = CertStore(settings.certificate, settings.private_key)
            if store.not_after is not None:
                days = (store.not_after - datetime.datetime.now(datetime.UTC)).days
                out.append(f"nts certificate: {store.subject}, expires {store.not_after:%Y-%m-%d %H:%MZ} (in {days} "
                           f"days), from {settings.certificate}")  # fmt: skip
        return out

    def __init__(self, settings: NtsSettings) -> None:
        self.settings = settings
        self.stats = Counters()
        try:
            self.certs = CertStore(settings.certificate, settings.private_key)
        except CertError as exc:
            message = f"{exc} (for a development certificate run: ntsd certs)"
            raise PluginError(located("nts", message, settings.certificate, settings.private_key)) from None
        try:
            secret, created = load_or_create_secret(settings.key_dir)
        except (OSError, ValueError) as exc:
            raise PluginError(located("nts.key_dir", str(exc), settings.key_dir)) from None
        if created:
            log.info("created a new NTS master secret in %s", settings.key_dir)
        self.keyring = KeyRing(secret, settings.rotate_interval, settings.keep_keys)
        self.pool_tokens: tuple[bytes, ...] = ()
        self._read_extra_files(settings, starting=True)
        self.packets = NtsPackets(self.keyring, settings.aeads, time.time)
        self.ke = KeServer(self.certs, self.keyring, replace(settings.ke(), pool_tokens=self.pool_tokens), self.stats)
        self.sockets: dict[tuple[str, int], socket.socket] = {}  # by configured address
        try:
            for host, port in settings.listen:
                self.sockets[(host, port)] = bind_tcp(host, port)
        except PluginError:
            self.close()
            raise
        self._watch: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None

    def matches(self, request: Request) -> int:
        for f in request.extensions:
            if f.type in _NTS_TYPES:
                return 2
        return 0

    def respond(self, request: Request, ctx: ReplyContext) -> Answer:
        if request.data[0] & 7 != 3:  # RFC 8915 protects client/server mode only (chrony drops the rest)
            return _D_NOT_CLIENT
        return self.packets.respond(request, ctx)

    def fast(self, data: bytes, client: Client, rx_ns: int, ctx: ReplyContext) -> Answer | None:
        if data[0] & 0x3F != 0x23:  # fields exist only in NTPv4 (the length: fast_takes); client mode only
            return None
        return self.packets.answer(data, rx_ns, ctx)

    def fast_takes(self, length: int) -> bool:
        return length > _SHORTEST and length % 4 == 0  # fields come in multiples of 4 bytes

    def share(self, shared: Shared) -> None:
        self.ke.share(shared)
        self.ke.configure(self._ke_settings(self.settings))

    def _ke_settings(self, settings: NtsSettings) -> KeSettings:
        """The NTS-KE settings, with a Port record when NTP is not on 123 and nts.ntp_port is unset:
        clients that follow RFC 8915 would otherwise go to port 123, where nothing answers."""
        ke, ports = replace(settings.ke(), pool_tokens=self.pool_tokens), self.ke.shared.ntp_ports
        if ke.ntp_port is None and ports and 123 not in ports:
            ke = replace(ke, ntp_port=ports[0])
        return ke

    async def start(self) -> None:
        await self.ke.start(list(self.sockets.values()))
        for sock in self.sockets.values():
            log.info("serving NTS-KE on %s", format_addr(sock.getsockname()))
        log.info("NTS-KE certificate %s", self.certs.description)
        log.info("%s", tlsconf.note())
        self.certs.report_expiry(force=True)
        if nettle.AVAILABLE:
            log.info("AES-SIV-CMAC-256/-512 through %s (libnettle.so.8)", nettle.VERSION)
        else:
            log.info("AES-SIV through cryptography (Nettle not used: %s)", nettle.WHY)
        self._watch = asyncio.get_running_loop().create_task(
            every(lambda: self.settings.cert_check_interval, lambda: self.certs.check())
        )
        self._expiry = asyncio.get_running_loop().create_task(self._watch_expiry())

    async def _watch_expiry(self) -> None:
        while True:
            await asyncio.sleep(_EXPIRY_CHECK_S)
            self.certs.report_expiry()

    async def stop(self) -> None:
        for task in (self._watch, self._expiry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.ke.stop()

    def reconfigure(self, settings: NtsSettings) -> bool:
        new, old = settings, self.settings
        if new.listen != old.listen and self.may_bind:
            self._relisten(new.listen)
        # where it listens, whatever the file says; and the secret stays where it was (restart_only)
        new = replace(new, listen=tuple(self.sockets), key_dir=old.key_dir)
        if (new.certificate, new.private_key) != (old.certificate, old.private_key):
            try:
                self.ke.certs = self.certs = CertStore(new.certificate, new.private_key)
                self.certs.report_expiry(force=True)
            except CertError as exc:
                log.error("nts: new certificate settings not applied: %s", exc)
        else:
            self.certs.check(force=True)
        self.keyring.set_rotation(new.rotate_interval, new.keep_keys)
        self._reload_secret(new.key_dir)
        self._read_extra_files(new, starting=False)
        self.packets.supported = new.aeads
        self.ke.configure(self._ke_settings(new))
        self.settings = new
        return True

    def _relisten(self, wanted: tuple[tuple[str, int], ...]) -> None:
        """Listen where `wanted` says: the new addresses first, then the others closed (their
        sessions under way finish). An address that cannot be bound is an error, and skipped."""
        for host, port in wanted:
            if (host, port) in self.sockets:
                continue
            try:
                sock = bind_tcp(host, port)
            except PluginError as exc:
                log.error("nts: %s", exc)
                continue
            self.sockets[(host, port)] = sock
            self.ke.listen(sock)
            log.info("serving NTS-KE on %s", format_addr(sock.getsockname()))
        for addr in [a for a in self.sockets if a not in wanted]:
            self.ke.unlisten(self.sockets.pop(addr))
            log.info("stopped serving NTS-KE on %s", format_addr(addr))

    def _read_extra_files(self, settings: NtsSettings, starting: bool) -> None:
        """The NTS pool's tokens and a chrony server's keys, when configured (else none). A file that
        cannot be used stops a start; on a reload it is logged and what is in use stays."""
        if settings.pool_tokens is None:
            self.pool_tokens = ()
        if settings.chrony_keys is None:
            self.keyring.foreign = {}
        for key, path, use in (("nts.pool_tokens", settings.pool_tokens, self._use_pool_tokens),
                               ("nts.chrony_keys", settings.chrony_keys, self._use_chrony_keys)):  # fmt: skip
            if path is None:
                continue
            try:
                use(path)
            except (OSError, ParseError) as exc:
                if starting:
                    raise PluginError(located(key, str(exc), path)) from None
                log.error("nts: %s: %s not read again, keeping what is in use: %s", key, path, exc)

    def _use_pool_tokens(self, path: Path) -> None:
        self.pool_tokens = read_pool_tokens(path)

    def _use_chrony_keys(self, path: Path) -> None:
        """Open the cookies a chrony server issued with the keys in its ntskeys file (read-only)."""
        keys = read_chrony_keys(path)
        self.keyring.foreign = chrony_keys.key_ids(keys)
        log.info("nts: opening chrony's cookies too: %d keys (ids %s) from %s", len(keys),
                 ", ".join(f"{k.key_id:08X}" for k in keys), path)  # fmt: skip

    def _reload_secret(self, key_dir: Path) -> None:
        """A replaced master secret file (rotating a fleet's secret) takes effect on reload."""
        try:
            secret, _ = load_or_create_secret(key_dir)
        except (OSError, ValueError) as exc:
            log.error("nts: the master secret in %s cannot be used, keeping the one in use: %s", key_dir, exc)
            return
        if self.keyring.set_secret(secret):
            log.warning("nts: a new master secret from %s: cookies issued before are refused (clients redo NTS-KE)",
                        key_dir)  # fmt: skip

    def counters(self) -> Mapping[tuple[str, ...], int]:
        return self.stats.snapshot()

    def reports(self) -> Mapping[str, Any]:
        return {}

    def gauges(self) -> Mapping[str, float]:
        out = {"nts_ke_open_sessions": float(self.ke.active), "nts_ke_pending_connections": float(self.ke.waiting)}
        not_after = self.certs.not_after
        if not_after:
            out["nts_certificate_expiry_timestamp_seconds"] = not_after.timestamp()
        return out

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets = {}
