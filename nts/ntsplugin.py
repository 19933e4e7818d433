"""The `nts` authenticator plugin: NTS-KE listener, cookie key ring and NTS-protected NTP.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from . import nettle, tlsconf
from .aead import AEADS, DEFAULT_AEADS
from .config import Node, format_addr, is_dns_name, is_ip_address
from .cookies import KeyRing, check_secret, load_or_create_secret
from .core.auth import Authenticator, PluginError, ReplyContext, Request
from .core.decisions import Drop, Nak, Seal, Stats, describe_gauge
from .files import every
from .ke.certs import CertError, CertStore, expiry_problem
from .ke.listener import KeServer, KeSettings
from .ntsauth import NtsPacketAuth
from .server.udp import open_tcp_listener
from .wire.extensions import FieldType
from .wire.packet import HEADER_LEN, MAX_MAC_LEN

log = logging.getLogger("ntsd.nts")
describe_gauge("nts_certificate_expiry_timestamp_seconds", "When the NTS-KE certificate in use expires (notAfter).")
_NTS_TYPES = (FieldType.NTS_COOKIE, FieldType.NTS_AUTHENTICATOR)
_EXPIRY_CHECK_S = 3600.0  # how often the certificate's expiry is looked at (the log says so once a day)
AEAD_NAMES = {
    "AES-SIV-CMAC-256": 15,
    "AES-SIV-CMAC-384": 16,
    "AES-SIV-CMAC-512": 17,
    "AES-128-GCM-SIV": 30,
    "AES-256-GCM-SIV": 31,
}


@dataclass(frozen=True, slots=True)
class NtsSettings:
    listen: tuple[tuple[str, int], ...]
    certificate: Path
    private_key: Path
    key_dir: Path
    rotate_interval: int = 3600
    keep_keys: int = 24
    aeads: tuple[int, ...] = DEFAULT_AEADS
    ntp_server: str | None = None
    ntp_port: int | None = None
    max_connections: int = 256
    session_timeout: float = 5.0
    max_request: int = 1024
    ke_rate: float = 2.0
    ke_burst: int = 16
    cert_check_interval: float = 5.0

    def ke(self) -> KeSettings:
        return KeSettings(
            supported_aeads=self.aeads,
            max_connections=self.max_connections,
            session_timeout=self.session_timeout,
            max_request=self.max_request,
            rate=self.ke_rate,
            burst=self.ke_burst,
            ntp_server=self.ntp_server,
            ntp_port=self.ntp_port,
        )


_KEYS = (
    "listen", "certificate", "private_key", "key_dir", "rotate_interval", "keep_keys", "aeads", "ntp_server",
    "ntp_port", "max_connections", "session_timeout", "max_request", "ke_rate", "ke_burst", "cert_check_interval",
)  # fmt: skip


def _aead(node: Node) -> int:
    value = node.scalar()
    if isinstance(value, str) and value.upper() in AEAD_NAMES:
        return AEAD_NAMES[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and value in AEADS:
        return value
    raise node.error(f"unknown AEAD (expected one of: {', '.join(AEAD_NAMES)} or their IANA numbers)")


def parse_nts(node: Node) -> NtsSettings:
    m = node.mapping(_KEYS)
    for required in ("certificate", "private_key", "key_dir"):
        if required not in m:
            raise node.error(f"'{required}' is required")
    d = NtsSettings((), Path(), Path(), Path())
    listen = tuple(n.address() for n in m["listen"].items()) if "listen" in m else (("127.0.0.1", 4460),)
    if not listen:
        raise m["listen"].error("at least one listen address is required")
    aeads = tuple(_aead(n) for n in m["aeads"].items()) if "aeads" in m else d.aeads
    if "aeads" in m and not aeads:
        raise m["aeads"].error("at least one AEAD is required")
    server = m["ntp_server"].string() if "ntp_server" in m and not m["ntp_server"].is_null else None
    if server is not None and not (is_ip_address(server) or is_dns_name(server)):
        raise m["ntp_server"].error("expected a host name or an IP address")
    return NtsSettings(
        listen=listen,
        certificate=Path(m["certificate"].string()),
        private_key=Path(m["private_key"].string()),
        key_dir=Path(m["key_dir"].string()),
        rotate_interval=m["rotate_interval"].integer(60, 30 * 86400) if "rotate_interval" in m else d.rotate_interval,
        keep_keys=m["keep_keys"].integer(1, 1000) if "keep_keys" in m else d.keep_keys,
        aeads=aeads,
        ntp_server=server,
        ntp_port=m["ntp_port"].integer(1, 65535) if "ntp_port" in m and not m["ntp_port"].is_null else None,
        max_connections=m["max_connections"].integer(1, 100_000) if "max_connections" in m else d.max_connections,
        session_timeout=m["session_timeout"].number(0.1, 300) if "session_timeout" in m else d.session_timeout,
        max_request=m["max_request"].integer(64, 65536) if "max_request" in m else d.max_request,
        ke_rate=m["ke_rate"].number(0.001, 1e6) if "ke_rate" in m else d.ke_rate,
        ke_burst=m["ke_burst"].integer(1, 1_000_000) if "ke_burst" in m else d.ke_burst,
        cert_check_interval=(
            m["cert_check_interval"].number(0.1, 86400) if "cert_check_interval" in m else d.cert_check_interval
        ),
    )


def bind_tcp(host: str, port: int) -> socket.socket:
    try:
        return open_tcp_listener(host, port)
    except OSError as exc:
        raise PluginError(f"cannot listen for NTS-KE on {format_addr((host, port))}: {exc.strerror}") from None


_SHORTEST = HEADER_LEN + MAX_MAC_LEN  # a body this short holds no field (it is a MAC, if anything)


class NtsAuthenticator(Authenticator):
    """NTS (RFC 8915): key establishment over TLS and authenticated NTP."""

    name: ClassVar[str] = "nts"
    section: ClassVar[str | None] = "nts"
    order: ClassVar[int] = 10
    listens: ClassVar[bool] = True

    @classmethod
    def listen_addresses(cls, settings: Any) -> tuple[tuple[str, int], ...]:
        return tuple(settings.listen)

    @classmethod
    def restart_only(cls, running: Any, new: Any) -> list[str]:
        return ["nts.key_dir"] if new.key_dir != running.key_dir else []

    @classmethod
    def parse_config(cls, node: Any) -> NtsSettings:
        return parse_nts(node)

    @classmethod
    def check(cls, settings: NtsSettings) -> list[tuple[bool, str]]:
        out = []
        try:
            store = CertStore(settings.certificate, settings.private_key)
        except CertError as exc:
            out.append((True, f"nts: {exc}"))
        else:
            problem = expiry_problem(store.not_after, datetime.datetime.now(datetime.UTC))
            if problem is not None:
                out.append((False, f"nts: certificate {store.subject} {problem[1]}"))
        why = check_secret(settings.key_dir)
        if why is not None:
            out.append((True, f"nts.key_dir: {why}"))
        return out

    def __init__(self, settings: NtsSettings) -> None:
        self.settings = settings
        self.stats = Stats()
        try:
            self.certs = CertStore(settings.certificate, settings.private_key)
        except CertError as exc:
            raise PluginError(f"nts: {exc} (for a development certificate run: ntsd certs)") from None
        try:
            secret, created = load_or_create_secret(settings.key_dir)
        except (OSError, ValueError) as exc:
            raise PluginError(f"nts.key_dir: {exc}") from None
        if created:
            log.info("created a new NTS master secret in %s", settings.key_dir)
        self.keyring = KeyRing(secret, settings.rotate_interval, settings.keep_keys)
        self.packets = NtsPacketAuth(self.keyring, settings.aeads, time.time)
        self.ke = KeServer(self.certs, self.keyring, settings.ke(), self.stats)
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

    def respond(self, request: Request, ctx: ReplyContext) -> Nak | Drop | Seal:
        return self.packets.respond(request, ctx)

    def fast(self, data: bytes, client: tuple[str, int], rx_ns: int, ctx: ReplyContext) -> Nak | Drop | Seal | None:
        if data[0] & 0x38 != 0x20:  # fields exist only in NTPv4 (the length: fast_takes)
            return None
        return self.packets.answer(data, rx_ns, ctx)

    def fast_takes(self, length: int) -> bool:
        return length > _SHORTEST and length % 4 == 0  # fields come in multiples of 4 bytes

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

    def reconfigure(self, config: Any) -> bool:
        new: NtsSettings = config
        old = self.settings
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
        self.packets.supported = new.aeads
        self.ke.configure(new.ke())
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
        return dict(self.stats.counts)

    def gauges(self) -> Mapping[str, float]:
        not_after = self.certs.not_after
        return {"nts_certificate_expiry_timestamp_seconds": not_after.timestamp()} if not_after else {}

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets = {}
