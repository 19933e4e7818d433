"""Addresses and listening sockets: the helpers the I/O shell, the CLI and plugins share.

Strategy: small and dependency-free, so that a plugin can import it without reaching into the
shell (`nts.server`) or the configuration loader.
"""

from __future__ import annotations

import ipaddress
import re
import socket

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def format_addr(addr: tuple[str, int]) -> str:
    """'127.0.0.1:123' or '[::1]:123', as operators write addresses."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def client_key(ip: str) -> str:
    """What counts as one client for per-client limits: the IPv4 address, or the /64 an IPv6 address
    is in (one host, or one subscriber's network, gets a /64: it can pick any address inside it)."""
    if ":" not in ip:
        return ip
    try:
        return str(ipaddress.IPv6Network((ip.partition("%")[0], 64), strict=False).network_address) + "/64"
    except ValueError:
        return ip


def is_dns_name(name: str) -> bool:
    """An ASCII host name by RFC 1123 (letters, digits, inner hyphens; labels of 1-63; 253 in all)."""
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.removesuffix(".").split("."))


def open_tcp_listener(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (IPv6 sockets are IPv6-only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
