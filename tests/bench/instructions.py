#!/usr/bin/env python3
"""User-space instructions per request, counted by callgrind: a repeatable figure on a noisy machine.

Strategy: throughput on this VM drifts by 5-10% between runs, which hides the effect of a small
change. Instruction counts do not drift: ntsd runs under `valgrind --tool=callgrind` (all of the
server's own and its libraries' instructions, none of the kernel's), the counters are zeroed once it
answers, loadgen.c keeps 64 requests in flight for a few seconds, the counters are dumped, and the
total is divided by the replies counted. The same tree measured twice agrees to about 0.1%. Compare
two trees (e.g. a `git worktree` of the base commit and the working tree) with the same arguments.

`--server chrony` measures chronyd (4.3, Debian) the same way, for scale: its per-request cost is
mostly the kernel's, which callgrind does not count, so compare these figures between trees of
ours, and use bench.py for ratios.

`--kind ke` counts per NTS-KE session instead (EC certificate; keload.c with the chrony-like
client of bench.py, 4 sessions in parallel), and divides by the sessions completed.

Usage: python3 tests/bench/instructions.py [--repo DIR] [--kind plain|mac|cmac|nts|ke] [--seconds 8]
       [--server ntsd|chrony] [--keep FILE]
Needs: valgrind (Debian valgrind), gcc (and libssl-dev for ke); chronyd and root for --server chrony.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from legacy.keyfile import Algorithm, Key, format_chrony_keys, format_ntp_keys  # noqa: E402
from legacy.mac import compute_mac  # noqa: E402
from nts.client import key_exchange, nts_request  # noqa: E402
from nts.nts.devcerts import make_dev_certs  # noqa: E402

HEADER = bytes([0x23]) + bytes(39) + struct.pack(">Q", 42)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_answer(port: int, packet: bytes, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Valgrind starts Python slowly: ask until the server answers (or has died)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline and proc.poll() is None:
            s.sendto(packet, ("127.0.0.1", port))
            try:
                s.recv(2048)
                return
            except OSError:
                continue
    raise SystemExit("instructions: ntsd did not answer under valgrind")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(HERE.parent.parent), help="the tree whose ntsd is measured")
    ap.add_argument("--kind", choices=("plain", "mac", "cmac", "nts", "ke"), default="mac")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--keep", metavar="FILE", help="copy the callgrind dump here (for callgrind_annotate)")
    ap.add_argument("--server", choices=("ntsd", "chrony"), default="ntsd", help="the server measured")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "gcc", *(("chronyd",) if args.server == "chrony" else ())):
        if shutil.which(tool) is None:
            print(f"instructions: {tool} is required", file=sys.stderr)
            return 2
    repo = Path(args.repo).resolve()
    with tempfile.TemporaryDirectory(prefix="ntsd-instructions-") as tmp:
        work = Path(tmp)
        loadgen = work / "loadgen"
        subprocess.run(["gcc", "-O2", "-o", str(loadgen), str(HERE / "loadgen.c")], check=True)
        keload = work / "keload"
        if args.kind == "ke":
            lite = ["-DKELOAD_LITE", str(HERE / "tls13lite.c"), "-lcrypto", "-lpthread"]
            subprocess.run(["gcc", "-O2", "-o", str(keload), str(HERE / "keload.c"), *lite], check=True)
        key = Key(1, Algorithm.SHA1, bytes(range(20)))
        if args.kind == "cmac":
            key = Key(1, Algorithm.AES128CMAC, bytes(range(16)))
        (work / "ntp.keys").write_text(format_ntp_keys([key]))
        (work / "chrony.keys").write_text(format_chrony_keys([key]))
        for name in ("ntp.keys", "chrony.keys"):
            (work / name).chmod(0o600)
        port, ke_port = free_port(), free_port(socket.SOCK_STREAM)
        certs = make_dev_certs(work / "certs", ["localhost", "127.0.0.1"])
        config = (
            f'ntp: {{listen: ["127.0.0.1:{port}"]}}\nrate_limit: {{enabled: false}}\n'
            "clock: {local_reference: true, stratum: 1, reference_id: LOCL}\nmetrics: {listen: null}\n"
            f"log: {{level: warning}}\nmac: {{keys: {work / 'ntp.keys'}}}\n"
        )
        if args.kind in ("nts", "ke"):
            config += (
                f'nts: {{listen: ["127.0.0.1:{ke_port}"], certificate: {certs.certificate}, '
                f"private_key: {certs.private_key}, key_dir: {work / 'keys'}, ntp_port: {port}, "
                "ke_rate: 1000000, ke_burst: 1000000}\n"
            )
        (work / "ntsd.yaml").write_text(config)
        (work / "chrony.conf").write_text(
            f"port {port}\nntsport {ke_port}\nbindaddress 127.0.0.1\nntsservercert {certs.certificate}\n"
            f"ntsserverkey {certs.private_key}\nntsdumpdir {work}\nntsprocesses 0\nlocal stratum 1\n"
            f"allow 127.0.0.1\ncmdport 0\nkeyfile {work / 'chrony.keys'}\npidfile {work / 'chronyd.pid'}\n"
        )
        out = work / "callgrind.out"
        server = [sys.executable, "-m", "nts", "serve", "-c", str(work / "ntsd.yaml")]
        if args.server == "chrony":
            server = ["chronyd", "-x", "-u", "root", "-d", "-f", str(work / "chrony.conf")]
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *server],
            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            packet = HEADER
            if args.kind in ("mac", "cmac"):
                packet = HEADER + struct.pack(">I", key.id) + compute_mac(key.algorithm, key.secret, HEADER)
            wait_answer(port, HEADER, proc)
            if args.kind == "nts":
                ke = key_exchange("127.0.0.1", ke_port, certs.ca, aeads=(15,), timeout=120)
                packet = nts_request(ke, ke.cookies[0])[0]
            if args.kind == "ke":  # one session first, so that nothing done once is counted
                key_exchange("127.0.0.1", ke_port, certs.ca, aeads=(15,), timeout=120)
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            if args.kind == "ke":
                cmd = [str(keload), "127.0.0.1", str(ke_port), str(args.seconds), "4"]
            else:
                cmd = [str(loadgen), "127.0.0.1", str(port), str(args.seconds), "64", packet.hex()]
            load = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            counts = dict(kv.split("=") for kv in load.split())
            if int(counts.get("failed", 0)):  # refused or broken sessions would cost without counting
                print(f"instructions: the load generator saw failures: {load.strip()}", file=sys.stderr)
                return 1
            replies = int(counts["sessions" if args.kind == "ke" else "replies"])
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        finally:
            proc.terminate()
            proc.wait(60)
        dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        found = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M) if dumps else None
        if found is None or not replies:
            print("instructions: no dump or no replies", file=sys.stderr)
            return 1
        if args.keep:
            shutil.copyfile(dumps[-1], args.keep)
        where = repo if args.server == "ntsd" else "chronyd"
        unit = "session" if args.kind == "ke" else "reply"
        print(f"{args.kind}: {replies} {unit}s, {int(found.group(1)) / replies:,.0f} instructions per {unit} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
