"""NTS against real peers: chrony as our NTS client, our client against chrony's NTS server, and
tshark dissecting the exchange (NTS-KE decrypted with the TLS key log)."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.client import run_query
from nts.nts.devcerts import make_dev_certs
from nts.server.metrics import parse_text
from nts.wire.ke_records import Record, RecordType, parse_records
from tests.helpers import free_port, need, running_ntsd, wait_until
from tests.interop.peers import capture, chrony_measure, decrypted_tls, dissect, dissection_problems
from tests.nts_helpers import dev_certs, nts_config, ports

pytestmark = pytest.mark.interop


def chrony_nts_client_conf(tmp: Path, ntp: int, ke: int, ca: Path) -> tuple[str, str]:
    dump = tmp / "chrony-nts-dump"
    dump.mkdir(exist_ok=True)
    return (
        f"server 127.0.0.1 port {ntp} nts ntsport {ke} iburst maxsamples 4",
        f"ntstrustedcerts {ca}\nnocerttimecheck 1\nntsdumpdir {dump}\n",
    )


def test_chrony_gets_authenticated_samples_from_our_nts_server(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport)):
        server_line, extra = chrony_nts_client_conf(tmp_path, ntp, ke, dev_certs(tmp_path).ca)
        offset, output = chrony_measure(tmp_path / "chrony", server_line, extra)
        assert offset is not None, output
        assert abs(offset) < 0.001, output
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert (
            m['ntsd_nts_ke_sessions_total{outcome="ok",aead="AES-SIV-CMAC-256"}'] == 1
        )  # chrony 4.3 offers AES-SIV-CMAC-256 only
        assert m['ntsd_replies_total{auth="nts"}'] >= 3
        assert m.get('ntsd_replies_total{auth="none"}') == 0  # every sample was NTS-authenticated


def test_chrony_gets_authenticated_samples_over_ipv6(tmp_path: Path) -> None:
    """NTS-KE and NTS-protected NTP on ::1 only; the certificate names ::1 (an IP address SAN)."""
    ntp, ke, mport = free_port(host="::1"), free_port(socket.SOCK_STREAM, host="::1"), free_port(socket.SOCK_STREAM)
    config = nts_config(tmp_path, ntp, ke, mport, ke_host="::1", listen=[f"[::1]:{ntp}"])
    with running_ntsd(tmp_path, config):
        extra = f"ntstrustedcerts {dev_certs(tmp_path).ca}\nnocerttimecheck 1\nntsdumpdir {tmp_path}\n"
        offset, output = chrony_measure(
            tmp_path / "chrony", f"server ::1 port {ntp} nts ntsport {ke} iburst maxsamples 4", extra
        )
        assert offset is not None, output
        assert abs(offset) < 0.001, output
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_nts_ke_sessions_total{outcome="ok",aead="AES-SIV-CMAC-256"}'] == 1
        assert m['ntsd_replies_total{auth="nts"}'] >= 3 and m.get('ntsd_replies_total{auth="none"}') == 0


def test_chrony_rejects_a_server_it_cannot_authenticate(tmp_path: Path) -> None:
    """The negative control: with a CA chrony does not trust, it takes no sample from us."""
    ntp, ke, mport = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport)):
        other = make_dev_certs(tmp_path / "other", ["localhost"])
        server_line, extra = chrony_nts_client_conf(tmp_path, ntp, ke, other.ca)
        offset, output = chrony_measure(tmp_path / "chrony", server_line, extra, timeout=6)
        assert offset is None, output
        assert parse_text(fetch_metrics("127.0.0.1", mport)).get('ntsd_replies_total{auth="nts"}') == 0


@contextmanager
def chrony_nts_server(tmp: Path) -> Iterator[tuple[int, int, Path]]:
    chronyd = need("chronyd")
    certs = make_dev_certs(tmp / "chrony-certs", ["localhost", "127.0.0.1"])
    ntp, ke = free_port(), free_port(socket.SOCK_STREAM)
    conf = tmp / "chrony-server.conf"
    conf.write_text(
        f"port {ntp}\nntsport {ke}\nbindaddress 127.0.0.1\nntsservercert {certs.certificate}\n"
        f"ntsserverkey {certs.private_key}\nntsdumpdir {tmp}\nlocal stratum 1\nallow 127.0.0.1\n"
        f"cmdport 0\npidfile {tmp}/chronyd-server.pid\n"
    )
    proc = subprocess.Popen(
        [chronyd, "-x", "-u", "root", "-d", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, "chronyd exited before its NTS-KE port opened"
            try:
                socket.create_connection(("127.0.0.1", ke), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, 15, what="chronyd's NTS-KE port open")
        yield ntp, ke, certs.ca
    finally:
        proc.terminate()
        proc.wait(10)


def test_our_client_against_chronys_nts_server(tmp_path: Path) -> None:
    with chrony_nts_server(tmp_path) as (ntp, ke, ca):
        out = run_query("127.0.0.1", ke_port=ke, ca=ca, count=3)
        assert out["authenticated"] is True
        assert out["server"] == f"127.0.0.1 port {ntp}"  # from chrony's Port Negotiation record
        assert out["aead"] == "AES-SIV-CMAC-256 (15)"
        assert out["cookies_from_ke"] == 8 and out["cookies_per_reply"] == 1.0
        assert out["stratum"] == 1 and abs(float(out["offset"])) < 0.01  # type: ignore[arg-type]


def test_tshark_dissects_nts_ke_and_nts_ntp_without_errors(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    keylog = tmp_path / "tls-keys.log"
    with (
        running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport)),
        capture(tmp_path, f"udp port {ntp} or tcp port {ke}") as pcap,
    ):
        for aead in ("AES-SIV-CMAC-256", "AES-128-GCM-SIV"):
            run_query("127.0.0.1", ke_port=ke, ca=dev_certs(tmp_path).ca, aeads=(aead,), count=2, keylog=keylog)
    # NTS-KE: tshark 4.0 (Debian 12) has no NTS-KE dissector (Wireshark 4.2 added one), so check
    # that tshark, decrypting TLS 1.3 on its own from the key log, finds well-formed records.
    sessions = decrypted_tls(pcap, keylog, ke)
    requests = [parse_records(data) for src, data in sessions if src != ke]
    responses = [parse_records(data) for src, data in sessions if src == ke]
    assert len(requests) == 2 and len(responses) == 2
    for aead, request, response in zip((15, 30), requests, responses, strict=True):
        assert request[0] == Record(True, RecordType.NEXT_PROTOCOL, b"\x00\x00")
        assert response[1] == Record(True, RecordType.AEAD_ALGORITHM, struct.pack(">H", aead))
        assert [r.type for r in response].count(RecordType.NEW_COOKIE) == 8
        assert response[-1] == Record(True, RecordType.END_OF_MESSAGE)
    # NTS-protected NTP: dissected field by field.
    text = dissect(pcap, "-o", f"tls.keylog_file:{keylog}", "-d", f"tcp.port=={ke},tls", "-d", f"udp.port=={ntp},ntp")
    assert dissection_problems(text) == []
    assert "ALPN Next Protocol: ntske/1" in text
    assert text.count("Field Type: Unique Identifier (0x0104)") == 8  # four requests, four replies
    assert text.count("Field Type: NTS Cookie (0x0204)") == 4  # requests only: replies carry theirs encrypted
    assert text.count("Field Type: NTS Authenticator and Encrypted Extension Fields (0x0404)") == 8
