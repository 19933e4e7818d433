"""Interleaved mode (RFC 9769) and symmetric passive replies, against a real chrony client.

chronyd runs continuously (-x: it does not touch the clock) polling 16 times a second with
`xleave`, and logs each sample to measurements.log, whose MTxRx column says how the sample was
made: `4I K K` is mode 4, Interleaved, kernel transmit and receive timestamps. The test fails if
ntsd answers in basic mode (B) once the exchange could be interleaved (the third reply on).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.server.metrics import parse_text
from tests.helpers import free_port, lab_config, need, running_ntsd, wait_until
from tests.mac_helpers import mac_section, write_keys
from tests.nts_helpers import dev_certs, nts_config, ports

pytestmark = pytest.mark.interop
NO_RATE = "rate_limit: {enabled: false}\n"


def samples(log: Path) -> list[tuple[str, float]]:
    """(MTxRx, offset in seconds) of each sample chrony logged."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines() if line[:2] == "20"]
    return [(" ".join(r[-3:]), float(r[11])) for r in rows if len(r) >= 17]


def run_chrony(tmp: Path, server_line: str, extra: str, enough: Callable[[list[tuple[str, float]]], bool]) -> list:
    """chronyd -x with `server_line` until `enough(samples)` (at most 30 s); the samples."""
    chronyd = need("chronyd")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "chrony.conf"
    conf.write_text(f"{server_line}\nlogdir {tmp}\nlog measurements\ncmdport 0\npidfile {tmp}/chronyd.pid\n{extra}")
    proc = subprocess.Popen([chronyd, "-x", "-d", "-u", "root", "-f", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: enough(samples(tmp / "measurements.log")), 30, 0.2, what="chrony's samples")
    finally:
        proc.terminate()
        proc.wait(10)
    return samples(tmp / "measurements.log")


def interleaved_enough(got: list[tuple[str, float]]) -> bool:
    return len(got) >= 24


def check_interleaved(got: list[tuple[str, float]]) -> None:
    later = got[4:]  # (the first exchanges cannot be interleaved: the table learns the client)
    assert later and all(mtxrx == "4I K K" for mtxrx, _ in later), got
    offsets = [offset for _, offset in later]
    assert abs(statistics.median(offsets)) < 20e-6, offsets  # (the precise figures: tests/bench/accuracy.py)


@pytest.mark.parametrize("kind", ["plain", "mac", "nts"])
def test_chrony_gets_interleaved_samples_with_kernel_timestamps(tmp_path: Path, kind: str) -> None:
    if kind == "nts":
        ntp, ke, mport = ports()
        config, ca = nts_config(tmp_path, ntp, ke, mport), dev_certs(tmp_path).ca  # (rate limiting off)
        line = f"server 127.0.0.1 port {ntp} nts ntsport {ke} iburst minpoll -4 maxpoll -4 xleave"
        extra = f"ntstrustedcerts {ca}\nnocerttimecheck 1\n"
    else:
        ntp, mport = free_port(), free_port(socket.SOCK_STREAM)
        config = lab_config(ntp, metrics_port=mport, extra=NO_RATE)
        line, extra = f"server 127.0.0.1 port {ntp} iburst minpoll -4 maxpoll -4 xleave", ""
        if kind == "mac":
            ntp_keys, chrony_keys = write_keys(tmp_path)
            config += mac_section(ntp_keys)
            line, extra = line + " key 4", f"keyfile {chrony_keys}\n"
    with running_ntsd(tmp_path, config):
        check_interleaved(run_chrony(tmp_path / "chrony", line, extra, interleaved_enough))
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m["ntsd_interleaved_replies_total"] >= 20
        assert m['ntsd_tx_timestamps_total{source="kernel"}'] >= 20
        assert m["ntsd_interleaved_daemon_timestamps_total"] == 0
        replies = {"plain": "none", "mac": "mac", "nts": "nts"}[kind]
        assert m[f'ntsd_replies_total{{auth="{replies}"}}'] >= 24


def test_chrony_peer_gets_symmetric_passive_replies(tmp_path: Path) -> None:
    """A `peer` (mode 1, as Windows w32time sends) was dropped as mode_1; now answered in mode 2."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, extra=NO_RATE)):
        got = run_chrony(tmp_path / "chrony", f"peer 127.0.0.1 port {port} minpoll -4 maxpoll -4", "",
                         lambda s: len(s) >= 4)  # fmt: skip
        assert all(mtxrx.startswith("2") for mtxrx, _ in got), got  # mode 2, symmetric passive
        assert all(abs(offset) < 0.001 for _, offset in got), got
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m.get('ntsd_drops_total{reason="mode_1"}', 0) == 0


def test_tshark_dissects_interleaved_and_symmetric_passive_replies(tmp_path: Path) -> None:
    from tests.interop.peers import capture, dissect, dissection_problems

    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, extra=NO_RATE)):
        with capture(tmp_path, f"udp port {port}") as pcap:
            run_chrony(tmp_path / "x", f"server 127.0.0.1 port {port} iburst minpoll -4 maxpoll -4 xleave", "",
                       lambda s: len(s) >= 8)  # fmt: skip
            run_chrony(tmp_path / "p", f"peer 127.0.0.1 port {port} minpoll -4 maxpoll -4", "", lambda s: len(s) >= 2)
        assert parse_text(fetch_metrics("127.0.0.1", mport))["ntsd_interleaved_replies_total"] >= 4
    text = dissect(pcap, "-d", f"udp.port=={port},ntp")
    assert dissection_problems(text) == []
    assert "Mode: server (4)" in text and "Mode: symmetric passive (2)" in text
