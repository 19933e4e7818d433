"""MS-SNTP against a real Samba AD DC (only its ntp_signd service), provisioned in a temp dir."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.client import run_query
from nts.server.metrics import parse_text
from tests.helpers import client_request, free_port, lab_config, need, query, running_ntsd
from tests.interop.samba import Samba, provision
from tests.nts_helpers import dev_certs, nts_config, ports

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def samba() -> Iterator[Samba]:
    for name in ("samba", "samba-tool", "ldbsearch"):
        need(name)
    if os.geteuid() != 0:
        pytest.skip("a Samba DC needs root")
    root = Path(tempfile.mkdtemp(prefix="ntsd-samba-"))
    try:
        dc = provision(root)
        dc.start()
        yield dc
        dc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mssntp_request(key_id: int) -> bytes:
    """As Windows sends it: NTPv3 client mode, key id little-endian, 16 bytes of checksum (ignored)."""
    return client_request(version=3) + struct.pack("<I", key_id) + bytes(16)


def mssntp_section(sock: Path) -> str:
    return (
        f"mssntp: {{socket: {sock}, networks: [127.0.0.0/8], deadline: 1.0, connections: 2, rate: 1000, burst: 1000}}\n"
    )


def test_signed_reply_verifies_with_the_accounts_nt_hash(samba: Samba, tmp_path: Path) -> None:
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport) + mssntp_section(samba.socket)):
        for key_id in (samba.rid, samba.rid | 0x80000000):  # both key selectors
            request = mssntp_request(key_id)
            reply = query(port, request, timeout=3)
            assert reply is not None and len(reply) == 68
            assert reply[24:32] == request[40:48]  # answers our request
            assert reply[48:52] == struct.pack("<I", key_id)
            assert hashlib.md5(samba.nt_hash + reply[:48]).digest() == reply[52:]  # [MS-SNTP] 3.2.5.1.1
        assert query(port, mssntp_request(987654), timeout=1.5) is None  # unknown RID: no reply
        assert query(port, mssntp_request(samba.disabled_rid), timeout=1.5) is None  # disabled: no reply
        reply = query(port, mssntp_request(samba.rid), timeout=3)  # and signing goes on
        assert reply is not None and hashlib.md5(samba.nt_hash + reply[:48]).digest() == reply[52:]
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_replies_total{auth="mssntp"}'] == 3
        assert m['ntsd_mssntp_sign_total{outcome="refused"}'] == 1
        assert m['ntsd_mssntp_sign_total{outcome="connection_closed"}'] == 1
        assert m.get('ntsd_replies_total{auth="none"}') == 0  # never an unsigned reply


def test_samba_down_others_served_then_signing_resumes(samba: Samba, tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport, extra="") + mssntp_section(samba.socket)
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, config):
        assert query(ntp, mssntp_request(samba.rid), timeout=3) is not None
        samba.stop()
        try:
            for _ in range(5):
                assert query(ntp, mssntp_request(samba.rid), timeout=1.5) is None  # dropped, never unsigned
                assert query(ntp, client_request(), timeout=1.0) is not None  # plain: served
                assert run_query("127.0.0.1", ke_port=ke, ca=ca)["authenticated"] is True  # NTS: served
        finally:
            samba.start()
        restarted = time.monotonic()
        while query(ntp, mssntp_request(samba.rid), timeout=1.0) is None:
            assert time.monotonic() - restarted < 10, "signing did not resume within 10 s"
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_drops_total{reason="mssntp_failed"}'] >= 5
        assert m['ntsd_replies_total{auth="none"}'] == 5 and m['ntsd_replies_total{auth="nts"}'] == 5


def _median_offset_us(port: int, rid: int, n: int = 40) -> float:
    """Median offset a client on this machine computes from MS-SNTP replies (the truth is 0)."""
    from nts.wire.timestamps import ntp64_to_unix_ns

    offsets = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        for _ in range(n):
            request = mssntp_request(rid)
            t1 = time.time_ns()
            s.sendto(request, ("127.0.0.1", port))
            reply = s.recv(200)
            t4 = time.time_ns()
            t2 = ntp64_to_unix_ns(int.from_bytes(reply[32:40], "big"), t1)
            t3 = ntp64_to_unix_ns(int.from_bytes(reply[40:48], "big"), t1)
            offsets.append(((t2 - t1) + (t3 - t4)) / 2e3)
    return sorted(offsets)[n // 2]


def test_signing_delay_compensation_brings_the_offset_error_down(samba: Samba, tmp_path: Path) -> None:
    """T3 is set before Samba signs; the reply leaves a signing delay later. Compensating moves T3 by
    the recent signing delay; measured here, the client's offset error shrinks by about 10x."""
    errors = {}
    for compensate in ("false", "true"):
        port = free_port()
        section = mssntp_section(samba.socket).replace("burst: 1000}", f"burst: 1000, compensate: {compensate}}}")
        (tmp_path / compensate).mkdir()
        config = lab_config(port, extra="rate_limit: {enabled: false}\n") + section
        with running_ntsd(tmp_path / compensate, config):
            _median_offset_us(port, samba.rid, 10)  # warm up the delay estimate
            errors[compensate] = abs(_median_offset_us(port, samba.rid))
    assert errors["true"] < errors["false"] / 2, errors
