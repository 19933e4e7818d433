#!/usr/bin/env python3
"""Soak: run ntsd for many minutes under mixed, changing load and check that nothing leaks or is lost.

Strategy: one ntsd with two worker processes serves plain, MAC and NTS requests and NTS-KE on
loopback, with a short key rotation and rate limiting on. The run is a series of cycles; each
cycle sends (a) a burst from the C load generator (MAC SHA1, AES-CMAC and NTS requests from one
address), (b) requests from thousands of addresses never seen before (127.0.0.0/8 is all local
on Linux), so every per-client table (rate limiter, legacy-use ledger, MS-SNTP rate table,
address caches) reaches its bound and must evict, (c) parallel NTS-KE sessions, (d) silent NTS-KE connections left for
the session deadline and garbage datagrams, and (e) a SIGHUP, with the MAC key file rewritten
every other cycle and the certificate replaced every fourth. After each cycle it records the
process tree's resident memory, open descriptors and threads, and the request counters.

It passes (exit 0) when, after the load stops: every request is accounted for (requests =
replies + NAKs + drops, exactly), the number of open descriptors is what it was after the first
cycle, resident memory grew by less than 10% over
the second half of the run (the tables are full by then; growth there is a leak), each table's
gauge is within its bound, the log has no traceback or internal error, and ntsd still answers and
stops on SIGTERM with exit 0.

Usage: python3 tests/bench/soak.py [--minutes 10] [--python /usr/bin/python3]
Needs: gcc, libssl-dev (the load generators), taskset. Not part of the test suite (it runs for
minutes by design); its figures go into the README's operations notes.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from bench import PLAIN_REQUEST, free_port, wait_port  # noqa: E402

from legacy.keyfile import Algorithm, Key, format_ntp_keys  # noqa: E402
from legacy.mac import compute_mac  # noqa: E402
from nts.cli import fetch_metrics  # noqa: E402
from nts.client import QueryError, exchange, key_exchange, nts_request  # noqa: E402
from nts.nts.devcerts import make_dev_certs  # noqa: E402
from nts.server.metrics import parse_text  # noqa: E402
from nts.wire.packet import HEADER_LEN  # noqa: E402
from tests.mssntp_helpers import FakeSigner  # noqa: E402

_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ntsd\[\d+\] [A-Z]+ ")
KEYS = [Key(1, Algorithm.SHA1, os.urandom(20)), Key(2, Algorithm.AES128CMAC, os.urandom(16))]
SPARE = Key(3, Algorithm.SHA256, os.urandom(32))  # added and removed by the key-file rewrites
# per-client tables (gauge: bound), small enough to fill early in a run, so the second half's memory
# shows whether they stay bounded (the MS-SNTP table sees ~900 new addresses a cycle)
BOUNDS = {"rate_limit_clients": 20_000, "mac_ledger_entries": 2_000, "mssntp_rate_limit_clients": 20_000}


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return out


def resources(pid: int) -> tuple[int, int, int]:
    """Resident KiB, open descriptors and threads of a process tree."""
    rss = fds = threads = 0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
        fds += len(os.listdir(f"/proc/{p}/fd"))
    return rss, fds, threads


def mac_packet(key: Key) -> bytes:
    return PLAIN_REQUEST + struct.pack(">I", key.id) + compute_mac(key.algorithm, key.secret, PLAIN_REQUEST)


def from_many(port: int, packets: list[bytes], first: int, count: int) -> int:
    """One request from each of `count` fresh addresses 127.x.y.z; returns the replies seen."""
    socks = []
    for n in range(first, first + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.{1 + (n >> 16) % 254}.{(n >> 8) & 255}.{n & 255 or 1}", 0))
        s.setblocking(False)
        s.sendto(packets[n % len(packets)], ("127.0.0.1", port))
        socks.append(s)
    time.sleep(0.3)  # the replies are on their way; any still missing is counted by ntsd all the same
    got = 0
    for s in socks:
        try:
            s.recv(2048)
            got += 1
        except BlockingIOError:
            pass
        s.close()
    return got


def silent_connections(port: int, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        out.append(s)
    return out


def metrics(port: int) -> dict[str, float]:
    return parse_text(fetch_metrics("127.0.0.1", port))


def accounted(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith(("ntsd_replies_total", "ntsd_naks_total", "ntsd_drops_total")))


class Soak:
    """One ntsd (two workers) in a temporary directory, and the cycles run against it."""

    def __init__(self, work: Path, python: str) -> None:
        self.work = work
        self.rng = random.Random(1)
        self.loadgen, self.keload = work / "loadgen", work / "keload"
        subprocess.run(["gcc", "-O2", "-o", str(self.loadgen), str(HERE / "loadgen.c")], check=True)
        subprocess.run(["gcc", "-O2", "-o", str(self.keload), str(HERE / "keload.c"), "-lssl", "-lcrypto",
                        "-lpthread"], check=True)  # fmt: skip
        self.certs = make_dev_certs(work / "certs", ["localhost", "127.0.0.1"], kind="ec")
        self.keyfile = work / "ntp.keys"
        self.write_keys(True)
        self.ntp, self.ke, self.mport = free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        self.log = work / "ntsd.log"
        self.signd = work / "signd.socket"
        self.signer = FakeSigner(self.signd)  # Samba's signing socket; restarted every fifth cycle
        (work / "ntsd.yaml").write_text(
            f'ntp: {{listen: ["127.0.0.1:{self.ntp}"], workers: 2}}\n'
            f"rate_limit: {{enabled: true, rate: 20000, burst: 20000, max_clients: {BOUNDS['rate_limit_clients']}}}\n"
            "clock: {local_reference: true, stratum: 1, reference_id: LOCL}\n"
            f'metrics: {{listen: "127.0.0.1:{self.mport}"}}\n'
            f"log: {{level: info, file: {self.log}}}\n"
            f'nts: {{listen: ["127.0.0.1:{self.ke}"], certificate: {self.certs.certificate}, '
            f"private_key: {self.certs.private_key}, key_dir: {work / 'keys'}, rotate_interval: 60, keep_keys: 2, "
            "ke_rate: 1000000, ke_burst: 1000000, session_timeout: 2, cert_check_interval: 1}\n"
            f"mac: {{keys: {self.keyfile}, max_clients: {BOUNDS['mac_ledger_entries']}, check_interval: 1}}\n"
            f"mssntp: {{socket: {self.signd}, networks: [127.0.0.0/8], rate: 1000000, burst: 1000000, "
            f"max_clients: {BOUNDS['mssntp_rate_limit_clients']}}}\n"
        )
        self.proc = subprocess.Popen(
            ["taskset", "-c", "1", python, "-m", "nts", "serve", "-c", str(work / "ntsd.yaml")],
            cwd=HERE.parent.parent,
        )
        wait_port(self.ntp, socket.SOCK_DGRAM)
        wait_port(self.ke, socket.SOCK_STREAM)
        self.samples: list[tuple[float, int, int, int]] = []  # (seconds, resident KiB, descriptors, threads)
        self.first_address = 0
        self.key_mismatches = 0  # the key file's spare key served when removed, or refused when present

    def write_keys(self, with_spare: bool) -> None:
        staged = self.work / "ntp.keys.new"
        staged.write_text(format_ntp_keys([*KEYS, SPARE] if with_spare else KEYS))
        staged.chmod(0o600)
        staged.replace(self.keyfile)

    def cycle(self, n: int, per_cycle: int) -> int:
        """One cycle of every kind of load and change; returns the replies to the fresh addresses."""
        ke_state = key_exchange("127.0.0.1", self.ke, self.certs.ca, (15,))
        nts = [nts_request(ke_state, c)[0] for c in ke_state.cookies[:4]]
        mssntp = [PLAIN_REQUEST + struct.pack("<I", rid) + bytes(16) for rid in (1105, 1107)]  # signed, refused
        packets = [PLAIN_REQUEST, mac_packet(KEYS[0]), mac_packet(KEYS[1]), *nts, *mssntp]
        subprocess.run(["taskset", "-c", "0", str(self.loadgen), "127.0.0.1", str(self.ntp), "2", "64",
                        *(p.hex() for p in packets[1:])], check=True, capture_output=True)  # fmt: skip
        got = from_many(self.ntp, packets, self.first_address, per_cycle)
        self.first_address += per_cycle
        silent = silent_connections(self.ke, 20)
        subprocess.run(["taskset", "-c", "0", str(self.keload), "127.0.0.1", str(self.ke), "1", "8"], check=True,
                       capture_output=True)  # fmt: skip
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(200):
                s.sendto(self.rng.randbytes(self.rng.randrange(0, 300)), ("127.0.0.1", self.ntp))
        if n % 2 == 0:
            self.write_keys(n % 4 != 0)
        if n % 4 == 0:  # a new CA and certificate, swapped in as a renewal would be
            fresh = make_dev_certs(self.work / f"certs{n}", ["localhost", "127.0.0.1"], kind="ec")
            os.replace(fresh.private_key, self.certs.private_key)
            os.replace(fresh.certificate, self.certs.certificate)
            os.replace(fresh.ca, self.certs.ca)
        if n % 5 == 0:  # Samba restarted: ntsd's connections to the signer break and must be made again
            self.signer.close()
            self.signer = FakeSigner(self.signd)
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(2.5)  # past the session deadline (2 s): ntsd has closed the silent connections
        for s in silent:
            s.close()
        last_write = n - n % 2  # key files are written in even cycles, without the spare in every fourth
        spare_in_file = last_write == 0 or last_write % 4 != 0
        reply, _, _ = exchange("127.0.0.1", self.ntp, mac_packet(SPARE))
        signed = reply[HEADER_LEN : HEADER_LEN + 4] == struct.pack(">I", SPARE.id)
        if signed != spare_in_file:
            self.key_mismatches += 1
        return got

    def run(self, minutes: float, per_cycle: int) -> None:
        start = time.monotonic()
        end = start + minutes * 60
        print(f"{'cycle':>5} {'min':>5} {'rss MiB':>8} {'fds':>4} {'thr':>4} {'requests':>10} {'unaccounted':>11} "
              f"{'ke ok':>7} {'ms-sntp':>8} {'many':>9}")  # fmt: skip
        n = 0
        while time.monotonic() < end:
            n += 1
            got = self.cycle(n, per_cycle)
            m = metrics(self.mport)
            rss, fds, threads = resources(self.proc.pid)
            self.samples.append((time.monotonic() - start, rss, fds, threads))
            ke_ok = sum(v for k, v in m.items() if k.startswith('ntsd_nts_ke_sessions_total{outcome="ok"'))
            signed = m.get('ntsd_replies_total{auth="mssntp"}', 0)
            print(f"{n:5} {(time.monotonic() - start) / 60:5.1f} {rss / 1024:8.1f} {fds:4} {threads:4} "
                  f"{m['ntsd_requests_total']:10.0f} {m['ntsd_requests_total'] - accounted(m):11.0f} {ke_ok:7.0f} "
                  f"{signed:8.0f} "
                  f"{got:4}/{per_cycle}", flush=True)  # fmt: skip

    def verdict(self) -> list[str]:
        """What went wrong, after the load: an empty list when nothing did."""
        failures = []
        deadline = time.monotonic() + 10
        m = metrics(self.mport)
        while accounted(m) != m["ntsd_requests_total"] and time.monotonic() < deadline:
            time.sleep(0.2)
            m = metrics(self.mport)
        if accounted(m) != m["ntsd_requests_total"]:
            failures.append(f"{m['ntsd_requests_total'] - accounted(m):.0f} requests neither answered nor counted")
        _, fds, _ = resources(self.proc.pid)
        if fds != self.samples[0][2]:
            failures.append(f"open descriptors {self.samples[0][2]} after the first cycle, {fds} at the end")
        half = len(self.samples) // 2
        mid_rss, end_rss = self.samples[half][1], max(s[1] for s in self.samples[half:])
        growth = (end_rss - mid_rss) / mid_rss
        print(
            f"\nresident memory: {self.samples[0][1] / 1024:.1f} MiB after the first cycle, {mid_rss / 1024:.1f} "
            f"at half time, {end_rss / 1024:.1f} at most after it ({growth * 100:+.1f}%); requests "
            f"{m['ntsd_requests_total']:.0f}, all accounted for: {accounted(m) == m['ntsd_requests_total']}"
        )
        if growth > 0.10:
            failures.append(f"resident memory grew {growth * 100:.1f}% over the second half")
        for gauge, bound in BOUNDS.items():  # each of the two workers keeps its own table
            if not 0 < m.get(f"ntsd_{gauge}", 0) <= 2 * bound:
                failures.append(f"ntsd_{gauge} is {m.get(f'ntsd_{gauge}', 0):.0f}; expected 1 to 2 x {bound}")
        for name, packet, size in (
            ("plain", PLAIN_REQUEST, 48),
            ("MS-SNTP", PLAIN_REQUEST + struct.pack("<I", 1105) + bytes(16), 68),  # the signer restarted meanwhile
        ):
            try:
                reply, _, _ = exchange("127.0.0.1", self.ntp, packet)
            except QueryError:
                reply = b""
            if len(reply) != size:
                failures.append(f"no {name} answer after the soak")
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(30) != 0:
            failures.append(f"exit status {self.proc.returncode} on SIGTERM")
        if self.key_mismatches:
            failures.append(f"{self.key_mismatches} cycles where the spare MAC key's state did not follow the key file")
        text = self.log.read_text(errors="replace")
        failures += [f"the log has '{bad}'" for bad in ("Traceback", "internal error", " ERROR ") if bad in text]
        entries = [line for line in text.splitlines() if _LOG_LINE.match(line)]
        levels = [line.split()[3] for line in entries]
        print("log lines by level:", {level: levels.count(level) for level in sorted(set(levels))})
        warnings = sorted({line.split(": ", 1)[-1] for line in text.splitlines() if " WARNING " in line})
        for w in warnings[:10]:
            print(f"  warning: {w}")
        lines = text.splitlines()
        for i, line in enumerate(lines):  # each error with what follows it (a traceback), once
            if " ERROR " in line:
                print("\n".join(["  " + x for x in lines[i : i + 25]]))
                break
        return failures

    def close(self) -> None:
        self.signer.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs ntsd")
    ap.add_argument("--per-cycle", type=int, default=4000, help="fresh client addresses per cycle")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntsd-soak-") as tmp:
        soak = Soak(Path(tmp), args.python)
        try:
            soak.run(args.minutes, args.per_cycle)
            failures = soak.verdict()
        finally:
            soak.close()
    for f in failures:
        print(f"FAIL: {f}")
    print("soak: " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
