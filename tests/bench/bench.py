#!/usr/bin/env python3
"""Benchmark ntsd against chrony with the same load in the same run.

Strategy: both servers run at once on loopback, pinned to the same core (only one is loaded at a
time, so they do not compete); a C load generator (loadgen.c, compiled here) runs on another core,
keeps a window of requests in flight and counts replies. Rounds alternate between the servers and
the medians are compared, because this machine's throughput drifts by +-10% between runs. Each
server's CPU use during its runs is read from /proc, to show that the load saturated it: a server
that is not at ~100% of its core is not being measured.

Usage: python3 tests/bench/bench.py [--seconds 3] [--rounds 5] [--window 64]
Needs: chronyd (Debian package chrony), gcc, taskset; run as root (chronyd -u root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_REQUEST = bytes([0x23]) + bytes(39) + struct.pack(">Q", 0x1234567890ABCDEF)  # NTPv4 mode 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_udp(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(CLIENT_REQUEST, ("127.0.0.1", port))
            try:
                s.recvfrom(1024)
                return
            except OSError:
                continue
    raise SystemExit(f"bench: no server answered on port {port}")


def run_load(loadgen: Path, core: int, port: int, seconds: float, window: int, packet: bytes) -> float:
    out = subprocess.run(
        ["taskset", "-c", str(core), str(loadgen), "127.0.0.1", str(port), str(seconds), str(window), packet.hex()],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = dict(kv.split("=") for kv in out.split())
    if int(fields["other"]):
        print(f"bench: warning: {fields['other']} replies were not mode 4", file=sys.stderr)
    return float(fields["rate"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--client-core", type=int, default=0)
    args = ap.parse_args()
    for tool in ("chronyd", "gcc", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is required", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="ntsd-bench-") as tmp:
        work = Path(tmp)
        loadgen = work / "loadgen"
        subprocess.run(["gcc", "-O2", "-o", str(loadgen), str(HERE / "loadgen.c")], check=True)
        chrony_port, ntsd_port = free_port(), free_port()
        (work / "chrony.conf").write_text(
            f"port {chrony_port}\nbindaddress 127.0.0.1\nlocal stratum 1\nallow 127.0.0.1\n"
            f"cmdport 0\npidfile {work}/chronyd.pid\n"
        )
        (work / "ntsd.yaml").write_text(
            f'ntp: {{listen: ["127.0.0.1:{ntsd_port}"]}}\nrate_limit: {{enabled: false}}\n'
            "clock: {local_reference: true, stratum: 1, reference_id: LOCL}\nmetrics: {listen: null}\n"
            "log: {level: warning}\n"
        )
        pin = ["taskset", "-c", str(args.server_core)]
        procs = {
            "chrony": subprocess.Popen(
                [*pin, "chronyd", "-x", "-u", "root", "-d", "-f", str(work / "chrony.conf")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            "ntsd": subprocess.Popen([*pin, sys.executable, "-m", "nts", "serve", "-c", str(work / "ntsd.yaml")]),
        }
        ports = {"chrony": chrony_port, "ntsd": ntsd_port}
        try:
            for port in ports.values():
                wait_udp(port)
            rates: dict[str, list[float]] = {"chrony": [], "ntsd": []}
            cpu: dict[str, list[float]] = {"chrony": [], "ntsd": []}
            for _ in range(args.rounds):
                for name in ("chrony", "ntsd"):
                    before, t0 = cpu_seconds(procs[name].pid), time.monotonic()
                    rate = run_load(loadgen, args.client_core, ports[name], args.seconds, args.window, CLIENT_REQUEST)
                    cpu[name].append((cpu_seconds(procs[name].pid) - before) / (time.monotonic() - t0))
                    rates[name].append(rate)
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(10)
        print(f"plain NTP, 48-byte mode 3, window {args.window}, {args.rounds} rounds x {args.seconds:g} s")
        print(f"{'server':8} {'median/s':>10} {'min/s':>10} {'max/s':>10} {'cpu':>6}")
        for name in ("chrony", "ntsd"):
            r = rates[name]
            print(
                f"{name:8} {statistics.median(r):10.0f} {min(r):10.0f} {max(r):10.0f} "
                f"{statistics.median(cpu[name]) * 100:5.0f}%"
            )
        ratio = statistics.median(rates["ntsd"]) / statistics.median(rates["chrony"])
        print(f"ratio ntsd/chrony: {ratio:.2f}")
        if statistics.median(cpu["chrony"]) < 0.9:
            print("bench: warning: chrony was not saturated; the ratio flatters ntsd", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
