"""Helpers for NTS tests: development certificates, server configs, raw NTS-KE connections."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from nts.net import format_addr
from nts.nts.devcerts import DevCerts, make_dev_certs
from nts.wire.ke_records import Record, RecordReader, RecordType, serialize_records
from tests.helpers import free_port, lab_config


def nts_config(
    tmp: Path,
    ntp_port: int,
    ke_port: int,
    metrics_port: int | None = None,
    extra: str = "",
    ke_host: str = "127.0.0.1",
    **ntp: Any,
) -> str:
    """lab_config (its `listen` and `ntp_extra` pass through) with rate limiting off, plus NTS
    (NTS-KE on `ke_host`)."""
    certs = tmp / "certs"
    if not (certs / "server.pem").exists():
        make_dev_certs(certs, ["localhost", "127.0.0.1", "::1"])
    plain = lab_config(ntp_port, metrics_port=metrics_port, extra="rate_limit: {enabled: false}\n", **ntp)
    return plain + (
        "nts:\n"
        f'  listen: ["{format_addr((ke_host, ke_port))}"]\n'
        f"  certificate: {certs / 'server.pem'}\n"
        f"  private_key: {certs / 'server.key'}\n"
        f"  key_dir: {tmp / 'keys'}\n"
        f"  ntp_port: {ntp_port}\n"
        "  ke_rate: 1000\n  ke_burst: 1000\n" + extra
    )


def dev_certs(tmp: Path) -> DevCerts:
    certs = tmp / "certs"
    return DevCerts(certs / "ca.pem", certs / "server.pem", certs / "server.key")


def ports() -> tuple[int, int, int]:
    return free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)


NP = Record(True, RecordType.NEXT_PROTOCOL, b"\x00\x00")
AEAD15 = Record(True, RecordType.AEAD_ALGORITHM, struct.pack(">H", 15))
EOM = Record(True, RecordType.END_OF_MESSAGE)


def ke_raw(
    port: int,
    payload: bytes | None,
    *,
    alpn: list[bytes] | None = None,
    max_version: int | None = None,
    timeout: float = 10.0,
    source: str | None = None,
    prefix: bytes = b"",
) -> list[Record] | str:
    """One raw NTS-KE session; returns the server's records, or a string saying how it ended.
    `source`: the local address to connect from; `prefix`: bytes sent before TLS (a PROXY header)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if alpn != []:  # [] offers no ALPN at all
        ctx.set_alpn_protos(alpn if alpn is not None else [b"ntske/1"])
    bind = (source, 0) if source else None
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=bind)
    sock.sendall(prefix)
    sock.settimeout(None)
    tv = struct.pack("@qq", int(timeout), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    try:
        try:
            conn.do_handshake()
        except SSL.Error as exc:
            return f"handshake failed: {exc.__class__.__name__}"
        if payload is None:  # say nothing; see what the server does
            try:
                data = conn.recv(100)
                return f"server sent {data!r}"
            except SSL.ZeroReturnError:
                return "closed"
            except SSL.SysCallError as exc:
                return "closed" if exc.args[0] in (-1, 104) else f"error {exc.args}"
        conn.sendall(payload)
        reader = RecordReader(65536)
        records: list[Record] = []
        while not records or records[-1].type != RecordType.END_OF_MESSAGE:
            try:
                chunk = conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return "closed" if not records else "closed mid-response"
            records += reader.feed(chunk)
        return records
    finally:
        conn.close()


def request(*records: Record) -> bytes:
    return serialize_records([*records, EOM])
