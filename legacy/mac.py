"""MAC computation and the `mac` plugin.

Strategy: a request whose trailer is 20 or 24 bytes (key id + MAC) is this plugin's. The key id
selects the key; it must be in the file, trusted, allowed for the client's network, and of an
algorithm whose MAC has the trailer's length. Then the MAC over everything before the trailer is
compared in constant time. Success: the reply header signed with the same key and algorithm,
finished at once. (Not a Seal for late finishing, as NTS replies are: checking a MAC costs about
what signing one does, so a reply would wait behind little, and a Seal's extra steps cost ~5% of a
MAC request; the listener's `max_hold_us` still bounds how long a finished reply waits.) A bare
key id + MAC with a known key id is taken on the pipeline's fast path, in one piece for a trusted
key with no network restriction (no other plugin can claim it more firmly). Any
failure: a crypto-NAK (RFC 5905 section 7.4: key id 0, no MAC) on a header that carries no time
(stratum 0, leap 3, zero receive/transmit), counted by reason. Legacy digests are
H(key || data) truncated to 20 bytes; AES-CMAC (RFC 8573) is CMAC(key, data), 16 bytes.
The key table is swapped whole on reload, so a request sees the old table or the new, never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hmac import compare_digest
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from nts.config import (
    Node,
    PluginError,
    Reader,
    boolean,
    choice,
    integer,
    listof,
    located,
    network,
    number,
    path,
    read_settings,
)
from nts.core.decisions import Nak
from nts.core.handler import Client, ReplyContext, Request, RequestHandler
from nts.core.policy import Network, NetworkSet, Shared
from nts.core.stats import CounterHelp, GaugeHelp, SeriesHelp
from nts.files import FileIdentity, every, file_identity
from nts.wire.packet import HEADER_LEN, crypto_nak

from .keyfile import Algorithm, Key, KeyFile, KeyFileError, load_keyfile
from .migration import ClientLedger

log = logging.getLogger("ntsd.mac")
_KEYID = struct.Struct(">I")
_MAC_TRAILERS = frozenset({20, 24, 32, 36, 52, 68})  # key id + 16/20-byte MAC, or a full digest (NTPv1-3)


def compute_mac(algorithm: Algorithm, secret: bytes, data: bytes, length: int | None = None) -> bytes:
    """The MAC of `data`; digests are truncated to `length` (default: NTPv4's 20 bytes)."""
    return PreparedKey(Key(0, algorithm, secret)).mac(data, length or algorithm.mac_len)


@dataclass(frozen=True, slots=True)
class MacSettings:
    keys: Path
    format: str = "ntp"
    trusted: frozenset[int] | None = None  # None: every key in the file
    networks: Mapping[int, tuple[Network, ...]] = field(default_factory=dict)  # per-key allowed clients
    allow_bad_lines: bool = False
    check_interval: float = 5.0
    max_clients: int = 10_000


def _key_networks(node: Node) -> dict[int, tuple[Network, ...]]:
    networks: dict[int, tuple[Network, ...]] = {}
    for key_node_name, nets in node.mapping().items():
        if not (key_node_name.isascii() and key_node_name.isdigit()):
            raise nets.error("keys of mac.networks are key ids")
        networks[int(key_node_name)] = listof(network)(nets)
    return networks


_READERS: dict[str, Reader] = {
    "keys": path,
    "format": choice("ntp", "chrony"),
    "trusted": lambda n: frozenset(listof(integer(1, 2**32 - 1))(n)),
    "networks": _key_networks,
    "allow_bad_lines": boolean,
    "check_interval": number(0.1, 86400),
    "max_clients": integer(16, 10_000_000),
}


def parse_mac(node: Node) -> MacSettings:
    if "keys" not in node.mapping(tuple(_READERS)):
        raise node.error("'keys' is required (the key file)")
    return read_settings(node, MacSettings, _READERS)


class PreparedKey:
    """A key ready for the hot path: its keyed hash or CMAC state is set up once and copied per use
    (setting up CMAC's AES key schedule costs more than the MAC itself). `copy()` gives a fresh state
    holding the key, `finish(state)` its MAC (the digest, or CMAC's tag), to be cut to the MAC length;
    the MAC fast path calls the two directly (a method around them costs ~5% of a MAC request)."""

    __slots__ = ("copy", "finish", "key", "ledger_key", "lengths")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.lengths = frozenset(key.algorithm.mac_lengths)
        self.ledger_key = (key.algorithm.label, str(key.id))
        if key.algorithm.is_cmac:
            base: Any = CMAC(algorithms.AES(key.secret))
            self.finish: Callable[[Any], bytes] = CMAC.finalize
        else:
            base = hashlib.new(key.algorithm.value[1])
            base.update(key.secret)
            self.finish = type(base).digest
        self.copy: Callable[[], Any] = base.copy

    def mac(self, data: bytes, length: int) -> bytes:
        h = self.copy()
        h.update(data)
        return self.finish(h)[:length]


def _signed_reply(ctx: ReplyContext, data: bytes, rx_ns: int, key: PreparedKey, trailer_at: int, mac_len: int) -> bytes:
    """The reply to a verified request: header (transmit timestamp read now), the request's key id,
    the MAC over the header with the same key and length."""
    header = ctx.reply_header(data, rx_ns)
    return header + data[trailer_at : trailer_at + 4] + key.mac(header, mac_len)


@dataclass(frozen=True, slots=True)
class _Table:
    """What a request is checked against; replaced whole on reload. `ready`: the keys a request may
    use with no further check (trusted, no network restriction), for the fast path."""

    keys: dict[int, PreparedKey]
    trusted: frozenset[int] | None
    networks: dict[int, NetworkSet]
    ready: dict[int, PreparedKey] = field(init=False)

    def __post_init__(self) -> None:
        ready = {
            key_id: key
            for key_id, key in self.keys.items()
            if (self.trusted is None or key_id in self.trusted) and key_id not in self.networks
        }
        object.__setattr__(self, "ready", ready)


def _key_notes(settings: MacSettings, keyfile: KeyFile) -> list[tuple[int, str]]:
    """What loading `keyfile` has to say: skipped lines, odd keys, deprecated algorithms in use,
    trusted ids the file lacks."""
    notes = [(logging.ERROR, f"{keyfile.describe(p)} (line skipped)") for p in keyfile.problems]  # allow_bad_lines
    notes += [(logging.WARNING, keyfile.describe(p)) for p in keyfile.warnings]
    trusted = settings.trusted
    active = [k for k in keyfile.keys.values() if trusted is None or k.id in trusted]
    old = sorted(k.id for k in active if k.algorithm.deprecated)
    if old:
        notes.append((logging.WARNING, f"MD5/SHA1 keys in use, key ids {', '.join(map(str, old))} (deprecated by "
                      "RFC 8573; move these clients to NTS or AES-CMAC)"))  # fmt: skip
    if not keyfile.keys:
        notes.append((logging.WARNING, f"{settings.keys} holds no keys: every MAC request gets a crypto-NAK"))
    missing = sorted(trusted - keyfile.keys.keys()) if trusted is not None else []
    if missing:
        notes.append((logging.WARNING, f"trusted key ids not in {settings.keys}: {', '.join(map(str, missing))}"))
    return notes


class MacPlugin(RequestHandler):
    """Legacy symmetric-key MAC (RFC 5905 section 7.3, RFC 8573 AES-CMAC). A `RequestHandler` for the
    pipeline and, structurally, an `nts.server.plugin.Plugin` for the shell."""

    name: ClassVar[str] = "mac"
    section: ClassVar[str] = "mac"
    order: ClassVar[int] = 20
    listens: ClassVar[bool] = False
    COUNTERS: ClassVar[CounterHelp] = {
        "mac_requests": (("algorithm", "key"), "Requests authenticated with legacy MAC keys, by algorithm and key id."),
    }
    SERIES: ClassVar[SeriesHelp] = {
        "replies": (("mac",),),
        "naks": tuple(
            ("mac", reason)
            for reason in ("unknown_key", "bad_mac", "untrusted_key", "wrong_mac_length", "key_not_allowed_for_client")
        ),
    }
    GAUGES: ClassVar[GaugeHelp] = {
        "mac_ledger_entries": "(client, key id) pairs in the legacy-use ledger (bounded by mac.max_clients).",
    }
    may_bind = True

    @classmethod
    def parse_config(cls, node: Node) -> MacSettings:
        return parse_mac(node)

    @classmethod
    def listen_addresses(cls, settings: MacSettings) -> tuple[tuple[str, int], ...]:
        return ()

    @classmethod
    def restart_only(cls, running: MacSettings, new: MacSettings) -> list[str]:
        return []

    def close(self) -> None:
        """Nothing to release: the key table is memory."""

    def share(self, shared: Shared) -> None:
        """Nothing outside the pipeline, which applies the access lists itself."""

    def __init__(self, settings: MacSettings) -> None:
        self.settings = settings
        self.ledger = ClientLedger(settings.max_clients)
        self._seen: tuple[Path, FileIdentity] | None = None  # the key file, as it was when last read
        try:
            self._use(self._load(settings), settings)
        except KeyFileError as exc:
            raise PluginError(located("mac", str(exc), settings.keys)) from None
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def check(cls, settings: MacSettings) -> list[tuple[bool, str]]:
        try:
            keyfile = load_keyfile(settings.keys, settings.format, settings.allow_bad_lines)
        except KeyFileError as exc:
            return [(True, located("mac", str(exc), settings.keys))]
        return [(False, f"mac: {message}") for _, message in _key_notes(settings, keyfile)]

    @classmethod
    def describe(cls, settings: MacSettings) -> list[str]:
        try:
            keys = load_keyfile(settings.keys, settings.format, settings.allow_bad_lines).keys.values()
        except KeyFileError:
            return []
        by_algorithm = Counter(key.algorithm.label for key in keys)
        counts = ", ".join(f"{name} {n}" for name, n in sorted(by_algorithm.items())) or "none"
        trusted = "all" if settings.trusted is None else f"ids {', '.join(map(str, settings.trusted)) or 'none'}"
        return [f"mac keys: {len(keys)} from {settings.keys} ({counts}; trusted: {trusted})"]

    def _load(self, settings: MacSettings) -> _Table:
        self._seen = (settings.keys, file_identity(settings.keys))  # before reading: a change after is seen
        keyfile = load_keyfile(settings.keys, settings.format, settings.allow_bad_lines)
        for level, message in _key_notes(settings, keyfile):
            log.log(level, "%s", message)
        prepared = {key_id: PreparedKey(key) for key_id, key in keyfile.keys.items()}
        return _Table(prepared, settings.trusted, {k: NetworkSet(v) for k, v in settings.networks.items()})

    def _use(self, table: _Table, settings: MacSettings) -> None:
        """Serve with `table` from now on, then say so (the listener threads read `self.table`: a
        line logged before the swap could be acted on while the old keys still answer)."""
        self.table = table
        trusted = sum(1 for key_id in table.keys if table.trusted is None or key_id in table.trusted)
        log.info("loaded %d keys (%d trusted) from %s", len(table.keys), trusted, settings.keys)

    def matches(self, request: Request) -> int:
        trailer = request.trailer
        if len(trailer) not in _MAC_TRAILERS:
            return 0
        return 2 if _KEYID.unpack_from(trailer)[0] in self.table.keys else 1

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak:
        data = request.data
        (key_id,) = _KEYID.unpack_from(request.trailer)
        table = self.table
        key = table.keys.get(key_id)
        if key is None:
            self.ledger.refuse(request.client[0], key_id, "unknown_key", request.rx_ns)
            return Nak(crypto_nak(data), "unknown_key")
        return self._verify(table, key, key_id, data, len(request.trailer), request.client[0], request.rx_ns, ctx)

    def fast(self, data: bytes, client: Client, rx_ns: int, ctx: ReplyContext) -> bytes | Nak | None:
        """Key id + 16/20-byte MAC after the header and nothing else (`fast_takes`), with a key id we
        know: a claim of 2 that no plugin asked earlier can match (NTS sees no fields in so short a
        body). A ready key of the right MAC length is checked here, in one piece (the MAC hot path);
        anything else goes through `_verify`, which names the reason for its NAK."""
        (key_id,) = _KEYID.unpack_from(data, HEADER_LEN)
        table = self.table
        key = table.ready.get(key_id)
        mac_len = len(data) - HEADER_LEN - 4
        if key is None or mac_len not in key.lengths:
            key = table.keys.get(key_id)
            if key is None:  # only "the shape fits": MS-SNTP may claim it more firmly
                return None
            return self._verify(table, key, key_id, data, mac_len + 4, client[0], rx_ns, ctx)
        h, finish = key.copy(), key.finish  # key.mac and _signed_reply, inlined on the hot path
        h.update(data[:HEADER_LEN])
        if not compare_digest(finish(h)[:mac_len], data[HEADER_LEN + 4 :]):
            return Nak(crypto_nak(data), "bad_mac")
        self.ledger.record(client[0], key_id, key.key.algorithm, rx_ns, key.ledger_key)
        header = ctx.reply_header(data, rx_ns)
        h = key.copy()
        h.update(header)
        return header + data[HEADER_LEN : HEADER_LEN + 4] + finish(h)[:mac_len]

    def fast_takes(self, length: int) -> bool:
        return length - HEADER_LEN in (20, 24)

    def _verify(
        self,
        table: _Table,
        key: PreparedKey,
        key_id: int,
        data: bytes,
        tlen: int,
        ip: str,
        rx_ns: int,
        ctx: ReplyContext,
    ) -> bytes | Nak:
        """Check the MAC of the `tlen`-byte trailer (key id + MAC) and sign the reply with the same key."""
        if table.trusted is not None and key_id not in table.trusted:
            self.ledger.refuse(ip, key_id, "untrusted_key", rx_ns)
            return Nak(crypto_nak(data), "untrusted_key")
        mac_len = tlen - 4
        if mac_len not in key.lengths:
            return Nak(crypto_nak(data), "wrong_mac_length")
        allowed = table.networks.get(key_id)
        if allowed is not None and ip not in allowed:
            self.ledger.refuse(ip, key_id, "key_not_allowed_for_client", rx_ns)
            return Nak(crypto_nak(data), "key_not_allowed_for_client")
        split = len(data) - tlen
        if not compare_digest(key.mac(data[:split], mac_len), data[split + 4 :]):
            return Nak(crypto_nak(data), "bad_mac")
        self.ledger.record(ip, key_id, key.key.algorithm, rx_ns, key.ledger_key)
        return _signed_reply(ctx, data, rx_ns, key, split, mac_len)

    async def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(
            every(lambda: self.settings.check_interval, self.check_file)
        )

    def check_file(self) -> None:
        """Reload the key file if it changed since it was last read (or tried: a broken file is
        reported once per change)."""
        keys = self.settings.keys
        if (keys, file_identity(keys)) != self._seen:
            self._reload(self.settings, "the key file changed")

    def _reload(self, settings: MacSettings, why: str) -> bool:
        try:
            table = self._load(settings)
        except KeyFileError as exc:
            log.error("%s, but it cannot be used; keeping the keys in use: %s", why, exc)
            return False
        self._use(table, settings)
        return True

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    def reconfigure(self, settings: MacSettings) -> bool:
        if self._reload(settings, "reload"):
            self.settings = settings
            self.ledger.max_clients = settings.max_clients
        return True  # on failure the running keys stay; the error was logged

    def counters(self) -> Mapping[tuple[str, ...], int]:
        return {("mac_requests", alg, key): n for (alg, key), n in tuple(self.ledger.totals.items())}

    def reports(self) -> Mapping[str, Any]:
        return {"clients": self.ledger.report()}

    def gauges(self) -> Mapping[str, float]:
        return {"mac_ledger_entries": len(self.ledger)}  # (client, key id) pairs
