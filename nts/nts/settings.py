"""The `nts` config section: what it may hold, its defaults, and how it is read.

Strategy: one frozen dataclass holds the section with its defaults; a table of key -> reader
(`nts.config.read_settings`) validates it, so every key is read one way and errors name file, line
and key. The NTS-KE listener's own settings are derived from it (`ke()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Node, Reader, address, integer, listof, network, number, optional, path, read_settings
from ..core.policy import Network
from ..net import is_dns_name, is_ip_address
from .aead import AEAD_NAMES, AEADS, DEFAULT_AEADS
from .ke_session import KeSettings


@dataclass(frozen=True, slots=True)
class NtsSettings:
    certificate: Path
    private_key: Path
    key_dir: Path
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 4460),)
    rotate_interval: int = 3600
    keep_keys: int = 24
    aeads: tuple[int, ...] = DEFAULT_AEADS
    ntp_server: tuple[str, ...] = ()  # one host, or several handed out in turn
    ntp_port: int | None = None
    max_connections: int = 256
    session_timeout: float = 5.0
    max_pending_connections: int = 16384
    first_bytes_timeout: float = 2.0
    max_connections_per_client: int = 16
    ke_exempt: tuple[Network, ...] = ()
    proxy_protocol: tuple[Network, ...] = ()
    chrony_keys: Path | None = None
    pool_tokens: Path | None = None
    pool_connections: int = 8
    max_request: int = 1024
    ke_rate: float = 2.0
    ke_burst: int = 16
    cert_check_interval: float = 5.0

    def ke(self) -> KeSettings:
        return KeSettings(
            supported_aeads=self.aeads,
            max_connections=self.max_connections,
            session_timeout=self.session_timeout,
            max_pending=self.max_pending_connections,
            first_bytes_timeout=self.first_bytes_timeout,
            max_per_client=self.max_connections_per_client,
            exempt=self.ke_exempt,
            proxies=self.proxy_protocol,
            pool_connections=self.pool_connections,
            max_request=self.max_request,
            rate=self.ke_rate,
            burst=self.ke_burst,
            ntp_server=self.ntp_server,
            ntp_port=self.ntp_port,
        )


def _aead(node: Node) -> int:
    value = node.scalar()
    if isinstance(value, str) and value.upper() in AEAD_NAMES:
        return AEAD_NAMES[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and value in AEADS:
        return value
    raise node.error(f"unknown AEAD (expected one of: {', '.join(AEAD_NAMES)} or their IANA numbers)")


def _non_empty(read: Reader, what: str) -> Reader:
    def checked(node: Node) -> tuple[object, ...]:
        value: tuple[object, ...] = read(node)
        if not value:
            raise node.error(f"at least one {what} is required")
        return value

    return checked


def _host(node: Node) -> str:
    name = node.string()
    if not (is_ip_address(name) or is_dns_name(name)):
        raise node.error("expected a host name or an IP address")
    return name


def _hosts(node: Node) -> tuple[str, ...]:
    """One host name or address, or a list of them (NTP servers handed out in turn)."""
    if node.is_null:
        return ()
    if isinstance(node.node, yaml.SequenceNode):
        return tuple(_host(item) for item in node.items()) or _no_server(node)
    return (_host(node),)


def _no_server(node: Node) -> tuple[str, ...]:
    raise node.error("at least one NTP server is required (or null: none)")


_READERS: dict[str, Reader] = {
    "listen": _non_empty(listof(address), "listen address"),
    "certificate": path,
    "private_key": path,
    "key_dir": path,
    "rotate_interval": integer(60, 30 * 86400),
    "keep_keys": integer(1, 1000),
    "aeads": _non_empty(listof(_aead), "AEAD"),
    "ntp_server": _hosts,
    "ntp_port": optional(integer(1, 65535)),
    "max_connections": integer(1, 100_000),
    "session_timeout": number(0.1, 300),
    "max_pending_connections": integer(1, 1_000_000),
    "first_bytes_timeout": number(0.05, 300),
    "max_connections_per_client": integer(1, 100_000),
    "ke_exempt": listof(network),
    "proxy_protocol": listof(network),
    "chrony_keys": optional(path),
    "pool_tokens": optional(path),
    "pool_connections": integer(1, 10_000),
    "max_request": integer(64, 65536),
    "ke_rate": number(0.001, 1e6),
    "ke_burst": integer(1, 1_000_000),
    "cert_check_interval": number(0.1, 86400),
}


def parse_nts(node: Node) -> NtsSettings:
    m = node.mapping(tuple(_READERS))
    for required in ("certificate", "private_key", "key_dir"):
        if required not in m:
            raise node.error(f"'{required}' is required")
    return read_settings(node, NtsSettings, _READERS)
