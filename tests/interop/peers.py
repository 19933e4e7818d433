"""Running real peers (chronyd -Q, tshark captures) from tests, in temp dirs, on loopback only."""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import free_port, need, wait_until

_WRONG_BY = re.compile(r"System clock wrong by (-?[0-9.]+) seconds")


def chrony_measure(tmp: Path, server_lines: str, extra: str = "", timeout: int = 20) -> tuple[float | None, str]:
    """Run `chronyd -Q` once against `server_lines`; return (offset or None, chrony's output)."""
    chronyd = need("chronyd")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "chrony-client.conf"
    conf.write_text(f"{server_lines}\ncmdport 0\npidfile {tmp}/chronyd-client.pid\n{extra}")
    proc = subprocess.run(
        [chronyd, "-Q", "-f", str(conf), "-L", "0", "-u", "root", "-t", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 15,
    )
    output = proc.stdout + proc.stderr
    m = _WRONG_BY.search(output)
    return (float(m.group(1)) if m else None), output


def _wait_for_sentinel(pcap: Path, sentinel: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Send a unique datagram until its bytes are in the capture file.

    tshark says "Capturing on" before its filter is live, and dumpcap writes in batches, so
    neither the start nor the end of a capture can be assumed. pcapng stores packet bytes as they
    are and in capture order: once this datagram's payload is in the file, so is all before it.
    """
    token = b"ntsd-sentinel-" + secrets.token_hex(8).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:

        def captured() -> bool:
            assert proc.poll() is None, "tshark exited before it captured the sentinel datagram"
            s.sendto(token, ("127.0.0.1", sentinel))
            return pcap.exists() and token in pcap.read_bytes()

        wait_until(captured, timeout, what="tshark writing the sentinel datagram to its capture file")


@contextmanager
def capture(tmp: Path, bpf: str) -> Iterator[Path]:
    """Capture loopback traffic matching `bpf` into a pcap, complete once the block has ended."""
    tshark = need("tshark")
    pcap, raw = tmp / "capture.pcapng", tmp / "capture-raw.pcapng"
    sentinel = free_port()
    proc = subprocess.Popen(
        [tshark, "-i", "lo", "-f", f"({bpf}) or udp port {sentinel}", "-w", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "Capturing on" in line:
                started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not started.wait(30) or proc.poll() is not None:
            raise AssertionError("tshark did not start capturing: " + "".join(lines))
        _wait_for_sentinel(raw, sentinel, proc)
        yield pcap
        _wait_for_sentinel(raw, sentinel, proc)
    finally:
        proc.terminate()
        proc.wait(15)
        reader.join(5)
    # Only the test's traffic goes on to be dissected: the sentinel datagrams leave from any
    # ephemeral port, which Wireshark may take for another protocol's (54328 once made them
    # "Malformed Packet: Elasticsearch" and failed a test that checks our packets).
    subprocess.run(
        [tshark, "-r", str(raw), "-Y", f"not udp.port == {sentinel}", "-w", str(pcap)],
        capture_output=True,
        timeout=60,
        check=True,
    )


def dissect(pcap: Path, *extra: str) -> str:
    tshark = need("tshark")
    return subprocess.run(
        [tshark, "-r", str(pcap), "-V", *extra], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def dissection_problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Malformed" in line or "Expert Info (Error" in line]


def decrypted_tls(pcap: Path, keylog: Path, port: int) -> list[tuple[int, bytes]]:
    """(source port, application bytes) of each TLS record tshark decrypts on `port`."""
    tshark = need("tshark")
    out = subprocess.run(
        [tshark, "-r", str(pcap), "-o", f"tls.keylog_file:{keylog}", "-d", f"tcp.port=={port},tls",
         "-Y", f"tcp.port=={port} && data", "-T", "fields", "-e", "tcp.srcport", "-e", "data.data"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        src, _, hexdata = line.partition("\t")
        rows.append((int(src), bytes.fromhex(hexdata.replace(",", ""))))
    return rows
