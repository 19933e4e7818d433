"""Plain NTP against real peers: chrony measures us, ntpdig queries us, tshark dissects us."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import client_request, free_port, lab_config, need, port_123_free, query, running_ntsd
from tests.interop.peers import capture, chrony_measure, dissect, dissection_problems

pytestmark = pytest.mark.interop


def test_chrony_measures_our_server_within_1ms_over_ipv4_and_ipv6(tmp_path: Path) -> None:
    p4, p6 = free_port(), free_port(host="::1")
    config = lab_config(p4, listen=[f"127.0.0.1:{p4}", f"[::1]:{p6}"])
    with running_ntsd(tmp_path, config):
        for host, port in (("127.0.0.1", p4), ("::1", p6)):
            offset, output = chrony_measure(
                tmp_path / host.replace(":", "_"), f"server {host} port {port} iburst maxsamples 4"
            )
            assert offset is not None, output
            assert abs(offset) < 0.001, output


def test_chrony_takes_no_sample_from_an_unsynchronised_server(tmp_path: Path) -> None:
    """With no local reference and an unsynchronised kernel clock we say leap 3; chrony must refuse."""
    port = free_port()
    config = lab_config(port).replace("clock: {local_reference: true, stratum: 1, reference_id: LOCL}\n", "")
    with running_ntsd(tmp_path, config):
        reply = query(port, client_request())
        assert reply is not None and reply[0] >> 6 == 3  # this machine's kernel clock is unsynchronised
        offset, output = chrony_measure(tmp_path, f"server 127.0.0.1 port {port} iburst maxsamples 4", timeout=6)
        assert offset is None, output
        assert "Timeout reached" in output


def test_ntpdig_gets_a_valid_answer_on_port_123(tmp_path: Path) -> None:
    ntpdig = need("ntpdig")
    if os.geteuid() != 0:
        pytest.skip("binding port 123 needs root")
    assert port_123_free(), "something already listens on 127.0.0.1:123"
    with running_ntsd(tmp_path, lab_config(123, listen=["127.0.0.1:123", "[::1]:123"])):
        for args in (["-j", "127.0.0.1"], ["-j", "-6", "::1"]):
            proc = subprocess.run([ntpdig, *args], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            answer = json.loads(proc.stdout)
            assert answer["stratum"] == 1
            assert answer["leap"] == "no-leap"
            assert abs(answer["offset"]) < 0.01


def test_tshark_dissects_our_replies_and_kod_without_errors(tmp_path: Path) -> None:
    port = free_port()
    extra = "rate_limit: {rate: 1, burst: 8, kod_interval: 1}\n"
    with running_ntsd(tmp_path, lab_config(port, extra=extra)), capture(tmp_path, f"udp port {port}") as pcap:
        for version in (1, 2, 3, 4):
            assert query(port, client_request(version=version)) is not None
        offset, output = chrony_measure(tmp_path / "c", f"server 127.0.0.1 port {port} iburst maxsamples 2")
        assert offset is not None, output
        kods = [query(port, client_request(), timeout=0.3) for _ in range(10)]
        assert any(r is not None and r[12:16] == b"RATE" for r in kods)
        assert query(port, bytes.fromhex("160200010000000000000000"), timeout=0.3) is None
    text = dissect(pcap, "-d", f"udp.port=={port},ntp")
    assert dissection_problems(text) == []
    assert text.count("Network Time Protocol") >= 10
    assert "Mode: server (4)" in text
    for version in (1, 2, 3, 4):
        assert f"Version number: NTP Version {version}, Mode: server" in text
    assert "Reference ID: Unidentified reference source 'RATE'" in text  # our RATE KoD
    assert "Reference ID: uncalibrated local clock" in text  # LOCL from our time replies
