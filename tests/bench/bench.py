#!/usr/bin/env python3
"""Benchmark ntsd against chrony with the same load in the same run.

Strategy: both servers run at once on loopback, pinned to the same core (only one is loaded at a
time, so they do not compete), and C load generators run on another core: loadgen.c keeps a
window of NTP requests in flight and counts replies (Kiss-o'-Death and NTS NAK excluded);
keload.c runs parallel NTS-KE sessions (TLS 1.3 handshake + request + response). Rounds
alternate between the servers (each goes first in every other round) and medians are compared,
because this machine's throughput drifts by 10-30% between runs; the median of the round by
round ratios is printed too (two back-to-back runs share the machine's mood). Each server's CPU
use (its whole process tree: chrony's NTS-KE helper is a child process) is read from /proc
during its runs: a server below ~90% of its core was not saturated, so its figure is the load
generator's limit, not the server's, and the script says so.

Tests: plain 48-byte requests; legacy MAC requests (SHA1 and AES-128-CMAC keys, the same secrets
in each server's key file format); NTS requests (one cookie, AES-SIV-CMAC-256; each server's own
cookie from a real NTS-KE); NTS-KE sessions with 16 parallel clients, with EC (P-256) and RSA
(2048) certificates, the same certificate files for both servers. The NTS-KE client sends chrony's
own ClientHello (P-256 and X25519 key shares, of which chrony's GnuTLS server takes P-256 and
OpenSSL X25519; no tickets offered) from tls13lite.c, a load-only TLS 1.3 client that reuses its
key shares and checks nothing of the server's, so it costs a fraction of a server's session: a
full TLS library costs the client more than the server (an ECDSA verify against a sign), and one
core of it could not saturate chrony with an EC certificate. `--ke-tls openssl,gnutls` adds those
libraries' clients (OpenSSL: an X25519 key share, tickets offered; GnuTLS with chrony's settings),
for what real clients cost; with EC certificates they saturate ntsd but not chrony.

`--baseline DIR` runs a second ntsd, the tree in DIR (with `--baseline-python`, an interpreter that
has that tree's dependencies and entry points installed), in the same rounds, and prints this
tree's rate over the baseline's round by round: a before/after comparison that the machine's drift
between two runs cannot blur.

Usage: python3 tests/bench/bench.py [--seconds 3] [--rounds 3] [--only plain,mac,nts,ke]
       [--ntp-options "max_hold_us: 10, batch: 32"] [--python /usr/bin/python3] [--ke-tls lite,gnutls]
       [--baseline DIR --baseline-python PYTHON]
The interpreter matters: CPython built without PGO/LTO (pyenv's default) runs ntsd's hot path
20-25% slower than a distribution's optimized build; the script prints which one ran ntsd.
Needs: chronyd (Debian chrony), gcc, libssl-dev, libgnutls28-dev, taskset; run as root (chronyd -u root).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from legacy.keyfile import Algorithm, Key, format_chrony_keys, format_ntp_keys  # noqa: E402
from legacy.mac import compute_mac  # noqa: E402
from nts.client import check_nts_reply, exchange, key_exchange, nts_request  # noqa: E402
from nts.nts.devcerts import make_dev_certs  # noqa: E402

PLAIN_REQUEST = bytes([0x23]) + bytes(39) + struct.pack(">Q", 0x1234567890ABCDEF)  # NTPv4 mode 3
SATURATED = 0.9
KE_CLIENTS = {  # --ke-tls name: (title, gcc flags for keload.c)
    "lite": ("chrony-like (load-only TLS client)", ["-DKELOAD_LITE", str(HERE / "tls13lite.c"), "-lcrypto"]),
    "openssl": ("OpenSSL", ["-lssl", "-lcrypto"]),
    "gnutls": ("GnuTLS (chrony's client settings)", ["-DKELOAD_GNUTLS", "-lgnutls"]),
}


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[list[str]]:
    """The /proc stat fields (after the command name) of a process and its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            out.append(stats[p])
        todo += children.get(p, [])
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children (threads included), in seconds."""
    return sum(int(f[11]) + int(f[12]) for f in process_tree(pid)) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, kind: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if kind == socket.SOCK_STREAM:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                s.sendto(PLAIN_REQUEST, ("127.0.0.1", port))
                s.recvfrom(1024)
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing answered on port {port}")


def run_tool(cmd: list[str], core: int, env: dict[str, str] | None = None) -> dict[str, str]:
    out = subprocess.run(["taskset", "-c", str(core), *cmd], check=True, capture_output=True, text=True,
                         env={**os.environ, **env} if env else None).stdout  # fmt: skip
    return dict(kv.split("=") for kv in out.split())


class Servers:
    """chrony and ntsd side by side with the same certificate, NTP and NTS-KE on loopback."""

    def __init__(
        self,
        work: Path,
        cert_kind: str,
        core: int,
        ntp_options: str = "",
        python: str = sys.executable,
        baseline: tuple[Path, str] | None = None,
        proxy: bool = False,
    ) -> None:
        self.work = work / cert_kind
        self.work.mkdir()
        self.certs = make_dev_certs(self.work / "certs", ["localhost", "127.0.0.1"], kind=cert_kind)
        self.mac_keys = [Key(1, Algorithm.SHA1, os.urandom(20)), Key(2, Algorithm.AES128CMAC, os.urandom(16))]
        for path, text in (
            ("ntp.keys", format_ntp_keys(self.mac_keys)),
            ("chrony.keys", format_chrony_keys(self.mac_keys)),
        ):
            (self.work / path).write_text(text)
            (self.work / path).chmod(0o600)
        names = ["chrony", "ntsd", *(["base"] if baseline is not None else []), *(["proxy"] if proxy else [])]
        self.ntp = {name: free_port() for name in names}
        self.ke = {name: free_port(socket.SOCK_STREAM) for name in names}
        (self.work / "chrony.conf").write_text(
            f"port {self.ntp['chrony']}\nntsport {self.ke['chrony']}\nbindaddress 127.0.0.1\n"
            f"ntsservercert {self.certs.certificate}\nntsserverkey {self.certs.private_key}\n"
            f"ntsdumpdir {self.work}\nlocal stratum 1\nallow 127.0.0.1\ncmdport 0\nkeyfile {self.work}/chrony.keys\n"
            f"pidfile {self.work}/chronyd.pid\n"
        )
        for name in names[1:]:
            (self.work / f"{name}.yaml").write_text(
                f'ntp: {{listen: ["127.0.0.1:{self.ntp[name]}"]{", " + ntp_options if ntp_options else ""}}}\n'
                "rate_limit: {enabled: false}\n"
                "clock: {local_reference: true, stratum: 1, reference_id: LOCL}\nmetrics: {listen: null}\n"
                "log: {level: warning}\n"
                f'nts: {{listen: ["127.0.0.1:{self.ke[name]}"], certificate: {self.certs.certificate}, '
                f"private_key: {self.certs.private_key}, key_dir: {self.work / (name + '-keys')}, "
                f"ntp_port: {self.ntp[name]}, ke_rate: 1000000, ke_burst: 1000000, max_connections: 1024"
                f"{', proxy_protocol: [127.0.0.1/32]' if name == 'proxy' else ''}}}\n"
                f"mac: {{keys: {self.work / 'ntp.keys'}}}\n"
            )
        pin = ["taskset", "-c", str(core)]
        self.procs = {
            "chrony": subprocess.Popen(
                [*pin, "chronyd", "-x", "-u", "root", "-d", "-f", str(self.work / "chrony.conf")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            "ntsd": subprocess.Popen(
                [*pin, python, "-m", "nts", "serve", "-c", str(self.work / "ntsd.yaml")],
                cwd=HERE.parent.parent,  # this tree's ntsd, whatever the interpreter has installed
            ),
        }
        if baseline is not None:
            tree, base_python = baseline
            self.procs["base"] = subprocess.Popen(
                [*pin, base_python, "-m", "nts", "serve", "-c", str(self.work / "base.yaml")], cwd=tree
            )
        if proxy:  # this tree's ntsd again, its NTS-KE behind PROXY headers (KELOAD_PROXY)
            self.procs["proxy"] = subprocess.Popen(
                [*pin, python, "-m", "nts", "serve", "-c", str(self.work / "proxy.yaml")], cwd=HERE.parent.parent
            )
        for name in self.procs:
            wait_port(self.ntp[name], socket.SOCK_DGRAM)
            if name == "proxy":
                continue  # (its NTS-KE port wants a PROXY header first)
            wait_port(self.ke[name], socket.SOCK_STREAM)

    def nts_packet(self, name: str) -> bytes:
        """A valid NTS request (one cookie, AES-SIV-CMAC-256) for `name`, checked once."""
        ke = key_exchange("127.0.0.1", self.ke[name], self.certs.ca, (15,))
        packet, uid, _ = nts_request(ke, ke.cookies[0])
        reply, _, _ = exchange("127.0.0.1", self.ntp[name], packet)
        nak, cookies = check_nts_reply(ke, reply, uid)
        if nak or len(cookies) != 1:
            raise SystemExit(f"bench: {name} did not answer a valid NTS request")
        return packet

    def mac_packet(self, key: Key) -> bytes:
        """A 48-byte NTPv4 request signed with `key`, checked once against both servers."""
        request = PLAIN_REQUEST
        packet = request + struct.pack(">I", key.id) + compute_mac(key.algorithm, key.secret, request)
        for name in self.procs:
            reply, _, _ = exchange("127.0.0.1", self.ntp[name], packet)
            if reply[48:52] != struct.pack(">I", key.id) or len(reply) != len(packet):
                raise SystemExit(f"bench: {name} did not sign a reply with key {key.id}")
        return packet

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(10)


def compare(
    title: str, servers: Servers, rounds: int, load: Callable[[str], float]
) -> tuple[dict[str, float], dict[str, float]]:
    names = list(servers.procs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # none always goes first
            pid = servers.procs[name].pid
            before, t0 = tree_cpu_seconds(pid), time.monotonic()
            rates[name].append(load(name))
            cpu[name].append((tree_cpu_seconds(pid) - before) / (time.monotonic() - t0))
    med = {n: statistics.median(r) for n, r in rates.items()}
    used = {n: statistics.median(c) for n, c in cpu.items()}
    print(f"\n{title}")
    print(f"  {'server':8} {'median/s':>10} {'min/s':>10} {'max/s':>10} {'cpu':>6}")
    for name in names:
        r = rates[name]
        print(f"  {name:8} {med[name]:10.0f} {min(r):10.0f} {max(r):10.0f} {used[name] * 100:5.0f}%")
    note = ""
    if used["chrony"] < SATURATED:
        note = (
            f"  (chrony was not saturated: the load generator is the limit; chrony could do about "
            f"{med['chrony'] / max(used['chrony'], 0.01):.0f}/s at 100% of its core, "
            f"ratio per core about {med['ntsd'] / used['ntsd'] / (med['chrony'] / used['chrony']):.2f})"
        )
    print(f"  ratio ntsd/chrony: {med['ntsd'] / med['chrony']:.2f}{note}")
    # Back-to-back runs share the machine's mood: the ratio within each round drifts less than
    # either server's rate does over the whole test.
    print_paired("ratio", rates["ntsd"], rates["chrony"], 2)
    if "base" in rates:
        print(f"  ratio base/chrony: {med['base'] / med['chrony']:.2f}")
        print_paired("ratio ntsd/base", rates["ntsd"], rates["base"], 3)
    if "proxy" in rates:
        print_paired("ratio proxy/ntsd (PROXY v2 header path)", rates["proxy"], rates["ntsd"], 3)
    return med, used


def print_paired(label: str, numerators: list[float], denominators: list[float], digits: int) -> None:
    """The ratios of two servers' rates round by round: median, range and (5 rounds or more) the
    median's 95% interval."""
    paired = sorted(n / d for n, d in zip(numerators, denominators, strict=True))
    f = f".{digits}f"
    print(f"  {label} round by round: median {statistics.median(paired):{f}}, from {paired[0]:{f}} to {paired[-1]:{f}}")
    if len(paired) >= 5:
        low, high = median_interval(paired)
        print(f"  that median's 95% interval (bootstrap over the rounds): {low:{f}} to {high:{f}}")


def median_interval(values: list[float], resamples: int = 4000) -> tuple[float, float]:
    """A percentile-bootstrap 95% interval for the median of `values` (seeded: the same input
    prints the same interval). On this machine a server's rate drifts by 10-30% between rounds;
    the interval says whether a ratio is below or above a goal by more than that noise."""
    draw = random.Random(len(values))
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def run_all(
    servers: Servers, kind: str, args: argparse.Namespace, only: set[str], loadgen: Path, keload: dict[str, Path]
) -> None:
    secs, core = str(args.seconds), args.client_core

    def udp_load(packets: dict[str, str]) -> Callable[[str], float]:
        def load(n: str) -> float:
            cmd = [str(loadgen), "127.0.0.1", str(servers.ntp[n]), secs, str(args.window), packets[n]]
            return float(run_tool(cmd, core)["rate"])

        return load

    def ke_load(tool: Path) -> Callable[[str], float]:
        def load(n: str) -> float:
            cmd = [str(tool), "127.0.0.1", str(servers.ke[n]), secs, str(args.ke_clients)]
            return float(run_tool(cmd, core, {"KELOAD_PROXY": "1"} if n == "proxy" else None)["rate"])

        return load

    if kind == "ec" and "plain" in only:
        title = f"plain NTP, 48-byte mode 3 requests, window {args.window}, {args.rounds} rounds x {secs} s"
        compare(title, servers, args.rounds, udp_load({n: PLAIN_REQUEST.hex() for n in servers.procs}))
    if kind == "ec" and "mac" in only:
        for key in servers.mac_keys:
            packet = servers.mac_packet(key).hex()
            title = f"MAC requests, {key.algorithm.label} ({len(packet) // 2} bytes), window {args.window}"
            compare(title, servers, args.rounds, udp_load({n: packet for n in servers.procs}))
    if kind == "ec" and "nts" in only:
        packets = {n: servers.nts_packet(n).hex() for n in servers.procs}
        title = f"NTS requests (1 cookie, AES-SIV-CMAC-256, {len(packets['ntsd']) // 2} bytes), window {args.window}"
        compare(title, servers, args.rounds, udp_load(packets))
    if "ke" in only:
        for client, tool in keload.items():
            title = f"NTS-KE sessions, {args.ke_clients} parallel {client} clients, {kind.upper()} certificate"
            compare(title, servers, args.rounds, ke_load(tool))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--ke-clients", type=int, default=16)
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--client-core", type=int, default=0)
    ap.add_argument("--only", default="plain,mac,nts,ke", help="comma-separated: plain, mac, nts, ke")
    ap.add_argument("--ke-tls", default="lite", help="NTS-KE client TLS stacks, comma-separated: lite, openssl, gnutls")
    ap.add_argument("--ntp-options", default="", help='extra ntsd ntp settings, e.g. "max_hold_us: 10"')
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs ntsd (it needs the dependencies), e.g. a distribution's optimized build",
    )
    ap.add_argument("--baseline", metavar="DIR", help="another ntsd tree, measured in the same rounds")
    ap.add_argument("--baseline-python", default=sys.executable, help="the interpreter that runs the baseline")
    proxy_help = "with --only ke: also an ntsd taking PROXY v2 headers (nts.proxy_protocol), driven with them"
    ap.add_argument("--proxy", action="store_true", help=proxy_help)
    args = ap.parse_args()
    baseline = (Path(args.baseline).resolve(), args.baseline_python) if args.baseline else None
    only = set(args.only.split(","))
    if args.proxy and only != {"ke"}:
        print("bench: --proxy measures NTS-KE only (--only ke)", file=sys.stderr)
        return 2
    for tool in ("chronyd", "gcc", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is required", file=sys.stderr)
            return 2
    which = subprocess.run(
        [args.python, "-c", "import os, sys; print(os.path.realpath(sys.executable), sys.version.split()[0])"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    print(f"ntsd runs on {which[0]} (Python {which[1]})")
    with tempfile.TemporaryDirectory(prefix="ntsd-bench-") as tmp:
        work = Path(tmp)
        loadgen = work / "loadgen"
        subprocess.run(["gcc", "-O2", "-o", str(loadgen), str(HERE / "loadgen.c")], check=True)
        keload: dict[str, Path] = {}
        for tls in args.ke_tls.split(","):
            title, flags = KE_CLIENTS[tls]
            keload[title] = work / f"keload-{tls}"
            subprocess.run(
                ["gcc", "-O2", "-o", str(keload[title]), str(HERE / "keload.c"), *flags, "-lpthread"], check=True
            )
        for kind in ("ec", "rsa"):
            if kind == "ec" or "ke" in only:
                servers = Servers(work, kind, args.server_core, args.ntp_options, args.python, baseline, args.proxy)
                try:
                    run_all(servers, kind, args, only, loadgen, keload)
                finally:
                    servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
