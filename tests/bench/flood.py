#!/usr/bin/env python3
"""Floods, and what honest clients keep: ntsd against chrony's server, same load, same run.

Strategy: ntsd and chronyd serve NTP and NTS-KE on loopback, pinned to one core (`--server-core`);
the clients, the attackers and Samba run on another. For each server in turn:
- NTS-KE (`ke`): keload.c (16 parallel chrony-like sessions from 127.0.0.1) measures sessions/s
  alone, then while keflood.c holds 8,000 connections that never finish a handshake, reopened the
  moment the server drops them: idle (no byte) and trickling (a byte every 200 ms), from 1,000
  source addresses with ntsd's per-address limits off, and from one with its defaults (the honest
  client exempt, nts.ke_exempt). chrony has no per-address NTS-KE limit unless configured.
- UDP (`udp`): an honest client (loadgen.c, 1,000 requests/s, one in flight) alone, then while
  udpflood.c sends valid requests from `--spoofed` distinct 127/8 addresses (more than ntsd's rate
  table holds) or malformed datagrams, at `--udp-rate` and flat out: the share answered and the
  round trip; ntsd's counters must add up (requests = replies + NAKs + drops; requests + kernel
  drops = datagrams sent).
- MS-SNTP (`mssntp`): a real Samba AD DC (provisioned in a temp dir) signs flat out for MS-SNTP
  requests while a plain client with one request in flight measures its replies/s, against alone.
- Memory: the server's resident memory (its whole process tree) idle, during and after each flood;
  `--mixed MINUTES` then runs every flood at once against ntsd and samples it every 10 s.
Every loop is bounded by `--seconds` (or `--mixed`); all traffic stays on 127/8.

Usage: python3 tests/bench/flood.py [--seconds 8] [--only ke,udp,mssntp] [--mixed 10] [--python PY]
Needs: chronyd, gcc, libssl-dev, taskset, Samba (mssntp); run as root (descriptor limits, 127/8
source addresses).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench import KE_CLIENTS, PLAIN_REQUEST, free_port, process_tree, tree_cpu_seconds, wait_port  # noqa: E402

from nts.nts.devcerts import make_dev_certs  # noqa: E402

CONNECTIONS = 8000
PLAIN_V3 = bytes([0x1B]) + bytes(39) + struct.pack(">Q", 0x1234567890ABCDEF)  # NTPv3, client


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MB."""
    return sum(int(f[21]) for f in process_tree(pid)) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Pair:
    """ntsd and chronyd with the same certificate. `limits`: ntsd's per-address NTS-KE limits at
    their defaults, with the honest client's address exempt (nts.ke_exempt); else lifted. chrony
    has none unless configured (ntsratelimit would throttle the honest client too)."""

    def __init__(
        self, work: Path, core: int, python: str, limits: bool, ntsd_extra: str = "", chrony_extra: str = ""
    ) -> None:
        work.mkdir()
        certs = make_dev_certs(work / "certs", ["localhost", "127.0.0.1"], kind="ec")
        self.ntp = {n: free_port() for n in ("ntsd", "chrony")}
        self.metrics = free_port(socket.SOCK_STREAM)
        self.ke = {n: free_port(socket.SOCK_STREAM) for n in ("ntsd", "chrony")}
        (work / "chrony.conf").write_text(
            f"port {self.ntp['chrony']}\nntsport {self.ke['chrony']}\nbindaddress 127.0.0.1\n"
            f"ntsservercert {certs.certificate}\nntsserverkey {certs.private_key}\nntsdumpdir {work}\n"
            f"local stratum 1\nallow 127.0.0.0/8\ncmdport 0\npidfile {work}/chronyd.pid\n{chrony_extra}"
        )
        ke_limits = ", ke_exempt: [127.0.0.1/32]" if limits else ", ke_rate: 1000000, ke_burst: 1000000"
        (work / "ntsd.yaml").write_text(
            f'ntp: {{listen: ["127.0.0.1:{self.ntp["ntsd"]}"]}}\n'
            "clock: {local_reference: true, stratum: 1, reference_id: LOCL}\n"
            f'metrics: {{listen: "127.0.0.1:{self.metrics}"}}\n'
            "log: {level: warning}\n"
            f'nts: {{listen: ["127.0.0.1:{self.ke["ntsd"]}"], certificate: {certs.certificate}, '
            f"private_key: {certs.private_key}, key_dir: {work / 'keys'}{ke_limits}}}\n{ntsd_extra}"
        )
        pin = ["taskset", "-c", str(core)]
        self.procs = {
            "chrony": subprocess.Popen(
                [*pin, "chronyd", "-x", "-u", "root", "-d", "-f", str(work / "chrony.conf")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            "ntsd": subprocess.Popen(
                [*pin, python, "-m", "nts", "serve", "-c", str(work / "ntsd.yaml")], cwd=HERE.parent.parent
            ),
        }
        for name in self.procs:
            wait_port(self.ntp[name], socket.SOCK_DGRAM)
            wait_port(self.ke[name], socket.SOCK_STREAM)

    def rss(self, name: str) -> float:
        return tree_rss_mb(self.procs[name].pid)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(10)


def tool(cmd: list[str], core: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["taskset", "-c", str(core), *cmd], stdout=subprocess.PIPE, text=True)


def figures(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=600)
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


def ke_floods(work: Path, args: argparse.Namespace, keload: Path, keflood: Path) -> None:
    secs = args.seconds
    for addresses, limits in ((1000, False), (1, True)):
        for mode in ("idle", "trickle"):
            pair = Pair(work / f"ke-{addresses}-{mode}", args.server_core, args.python, limits)
            try:
                print(f"\nNTS-KE, {CONNECTIONS} {mode} connections from {addresses} address(es); "
                      f"ntsd's per-address limits {'default, honest client exempt' if limits else 'off'}")  # fmt: skip
                print(f"  {'server':8} {'alone/s':>9} {'flood/s':>9} {'share':>6} {'rss idle':>9} {'flood':>7} "
                      f"{'after':>7}  flood connections")  # fmt: skip
                for name in ("ntsd", "chrony"):
                    port = str(pair.ke[name])
                    idle = pair.rss(name)
                    alone = figures(tool([str(keload), "127.0.0.1", port, str(secs), "16"], args.client_core))
                    flood = tool([str(keflood), "127.0.0.1", port, str(secs + 4), str(CONNECTIONS), str(addresses),
                                  mode], args.client_core)  # fmt: skip
                    time.sleep(2)  # not synchronisation: the flood builds up before the honest client starts
                    under = figures(tool([str(keload), "127.0.0.1", port, str(secs), "16"], args.client_core))
                    during = pair.rss(name)
                    attack = figures(flood)
                    time.sleep(3)  # (the server's own deadlines close what the flood left open)
                    after = pair.rss(name)
                    share = under["rate"] / max(alone["rate"], 1)
                    print(f"  {name:8} {alone['rate']:9.0f} {under['rate']:9.0f} {share:6.0%} {idle:8.0f}M "
                          f"{during:6.0f}M {after:6.0f}M  opened {attack['opened']:.0f}, "
                          f"closed by server {attack['closed_by_server']:.0f}")  # fmt: skip
            finally:
                pair.stop()


def loadgen(
    binary: Path,
    port: int,
    seconds: float,
    window: int,
    packet: bytes,
    core: int,
    rate: float = 0,
    prefix: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    env = {**os.environ, "LOADGEN_RATE": str(rate)} if rate else None
    cmd = [*prefix, "taskset", "-c", str(core), str(binary), "127.0.0.1", str(port), str(seconds), str(window),
           packet.hex()]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def mssntp_saturation(work: Path, args: argparse.Namespace, binary: Path) -> None:
    """Plain requests, one in flight, alone and while MS-SNTP requests keep Samba signing flat out.
    The plain client runs at real-time priority (SCHED_FIFO) so that Samba and the signing load,
    which share its core, cannot slow the measuring instrument itself: what is left is the
    server's. Rounds alternate which server goes first; medians are printed."""
    sys.path.insert(0, str(HERE.parent.parent))
    from tests.interop.samba import provision  # (needs samba, samba-tool, ldbsearch)

    dc = provision(work / "samba")
    dc.start(prefix=("taskset", "-c", str(args.client_core)))  # (off the server's core, as the clients)
    try:
        signed = PLAIN_V3 + struct.pack("<I", dc.rid) + bytes(16)  # as Windows sends it
        mssntp = f"mssntp: {{socket: {dc.socket}, networks: [127.0.0.0/8], rate: 1000000, burst: 1000000}}\n"
        pair = Pair(work / "mssntp", args.server_core, args.python, False,
                    "rate_limit: {enabled: false}\n" + mssntp, f"ntpsigndsocket {dc.socket.parent}\n")  # fmt: skip
        rt = ("chrt", "-f", "50")
        try:
            secs = args.seconds
            rows: dict[str, list[tuple[float, float, float, float, float]]] = {"ntsd": [], "chrony": []}
            for r in range(args.rounds):
                for name in ("ntsd", "chrony") if r % 2 == 0 else ("chrony", "ntsd"):
                    port = pair.ntp[name]
                    alone = figures(loadgen(binary, port, secs, 1, PLAIN_REQUEST, args.client_core, prefix=rt))
                    # the ceiling: what a busy client core alone (saturated Samba keeps it 95-99% busy)
                    # costs the plain client, with no signing at all
                    busy = subprocess.Popen(["taskset", "-c", str(args.client_core), "sh", "-c", "while :; do :; done"])
                    try:
                        ceiling = figures(loadgen(binary, port, secs, 1, PLAIN_REQUEST, args.client_core, prefix=rt))
                    finally:
                        busy.kill()
                        busy.wait()
                    load = loadgen(binary, port, secs + 2, 64, signed, args.client_core)
                    time.sleep(1)  # not synchronisation: signing reaches its pace first
                    cpu0, t0 = tree_cpu_seconds(pair.procs[name].pid), time.monotonic()
                    beside = figures(loadgen(binary, port, secs, 1, PLAIN_REQUEST, args.client_core, prefix=rt))
                    cpu = (tree_cpu_seconds(pair.procs[name].pid) - cpu0) / (time.monotonic() - t0)
                    rows[name].append((alone["rate"], beside["rate"], figures(load)["rate"], cpu, ceiling["rate"]))
            print(f"\nMS-SNTP saturation through one Samba (RID {dc.rid}): plain replies/s with one request in "
                  f"flight, medians of {args.rounds} rounds; ceiling: the share kept beside a busy client core "
                  "alone (no signing)")  # fmt: skip
            print(f"  {'server':8} {'alone/s':>9} {'beside/s':>9} {'share':>6} {'range':>9} {'signed/s':>9} "
                  f"{'cpu':>6} {'ceiling':>8}")  # fmt: skip
            for name, got in rows.items():
                alone_m, beside_m, signed_m, cpu_m, _ = (statistics.median(col) for col in zip(*got, strict=True))
                shares = sorted(b / a for a, b, *_ in got)
                ceiling_m = statistics.median(c / a for a, *_, c in got)
                print(f"  {name:8} {alone_m:9.0f} {beside_m:9.0f} {statistics.median(shares):6.0%} "
                      f"{'-'.join(f'{x:.0%}' for x in (shares[0], shares[-1])):>9} {signed_m:9.0f} "
                      f"{cpu_m:6.0%} {ceiling_m:8.0%}")  # fmt: skip
        finally:
            pair.stop()
    finally:
        dc.stop()


def counters(port: int) -> dict[str, float]:
    from nts.cli import fetch_metrics
    from nts.server.metrics import parse_text

    return parse_text(fetch_metrics("127.0.0.1", port))


def family(m: dict[str, float], *names: str) -> float:
    return sum(v for k, v in m.items() if k.split("{")[0] in names)


def udp_floods(work: Path, args: argparse.Namespace, loadgen_bin: Path, flood_bin: Path) -> None:
    """An honest client (127.0.0.1, 1,000 requests/s, one in flight) alone and while a flood comes
    from `--spoofed` other addresses (valid requests: more clients than ntsd's rate table holds),
    or of malformed datagrams, at `--udp-rate` and flat out: the share of its requests answered and
    its round trip. ntsd's rate limiting is on (its rate lifted so that only the table's bound
    matters), chrony's as by default (none)."""
    secs = args.seconds
    limits = "rate_limit: {enabled: true, rate: 1000000, burst: 1000000}\n"
    for mode in ("spoofed", "malformed"):
        pair = Pair(work / f"udp-{mode}", args.server_core, args.python, False, limits)
        try:
            for rate in (args.udp_rate, 0):
                print(f"\nUDP flood, {mode}, {f'{rate:.0f}/s' if rate else 'flat out'} from {args.spoofed} addresses; "
                      "an honest client at 1,000/s")  # fmt: skip
                print(f"  {'server':8} {'answered':>9} {'rtt us':>7} {'alone':>7} {'flood sent':>11} {'rss idle':>9} "
                      f"{'flood':>7} {'after':>7}")  # fmt: skip
                for name in ("ntsd", "chrony"):
                    port = pair.ntp[name]
                    idle = pair.rss(name)
                    alone = figures(loadgen(loadgen_bin, port, secs, 1, PLAIN_REQUEST, args.client_core, 1000))
                    before = counters(pair.metrics) if name == "ntsd" else {}
                    cmd = [str(flood_bin), "127.0.0.1", str(port), str(secs + 2), str(rate), str(args.spoofed), mode]
                    flood = tool([*cmd, PLAIN_REQUEST.hex()], args.client_core)
                    time.sleep(1)  # not synchronisation: the flood reaches its pace first
                    under = figures(loadgen(loadgen_bin, port, secs, 1, PLAIN_REQUEST, args.client_core, 1000))
                    during = pair.rss(name)
                    sent = figures(flood)
                    time.sleep(2)  # (the server drains its queue)
                    after = pair.rss(name)
                    print(f"  {name:8} {under['replies'] / max(under['sent'], 1):9.1%} {under.get('rtt_us', 0):7.0f} "
                          f"{alone.get('rtt_us', 0):7.0f} {sent['sent']:11.0f} {idle:8.0f}M {during:6.0f}M "
                          f"{after:6.0f}M")  # fmt: skip
                    if name == "ntsd":
                        m = counters(pair.metrics)
                        delta = {k: m.get(k, 0) - before.get(k, 0) for k in m}
                        requests = family(delta, "ntsd_requests_total")
                        outcomes = family(delta, "ntsd_replies_total", "ntsd_naks_total", "ntsd_drops_total")
                        kernel = family(delta, "ntsd_kernel_drops_total")
                        datagrams = sent["sent"] + under["sent"]
                        print(f"    ntsd counters: requests {requests:.0f} = replies+naks+drops {outcomes:.0f} "
                              f"({'exact' if requests == outcomes else 'MISMATCH'}); requests + kernel drops "
                              f"{requests + kernel:.0f} of {datagrams:.0f} datagrams sent; rate table "
                              f"{m.get('ntsd_rate_limit_clients', 0):.0f} clients")  # fmt: skip
        finally:
            pair.stop()


def mixed(work: Path, args: argparse.Namespace, binaries: dict[str, Path]) -> None:
    """Everything at once for `--mixed` minutes against ntsd alone: idle and trickling NTS-KE
    connections (4,000 each, from 1,000 addresses), valid UDP requests from a million addresses
    and malformed datagrams, beside an honest NTS-KE client and an honest NTP client; ntsd's
    resident memory every 10 s."""
    pair = Pair(work / "mixed", args.server_core, args.python, False, "rate_limit: {rate: 1000000, burst: 1000000}\n")
    try:
        pair.procs["chrony"].terminate()  # (ntsd's memory over time is the figure here; stop() reaps it)
        port, ke, secs = pair.ntp["ntsd"], str(pair.ke["ntsd"]), args.mixed * 60
        idle = pair.rss("ntsd")
        core = args.client_core
        udp = [str(binaries["udpflood"]), "127.0.0.1", str(port), str(secs)]
        tools = [
            tool([str(binaries["keflood"]), "127.0.0.1", ke, str(secs), "4000", "1000", "idle"], core),
            tool([str(binaries["keflood"]), "127.0.0.1", ke, str(secs), "4000", "1000", "trickle"], core),
            tool([*udp, "30000", "1000000", "spoofed", PLAIN_REQUEST.hex()], core),
            tool([*udp, "20000", "1000000", "malformed"], core),
        ]
        honest_ke = tool([str(binaries["keload"]), "127.0.0.1", ke, str(secs), "4"], core)
        honest_ntp = loadgen(binaries["loadgen"], port, secs, 1, PLAIN_REQUEST, core, 100)
        samples: list[float] = []
        start = time.monotonic()
        while time.monotonic() - start < secs:
            time.sleep(10)  # (a sampling period: nothing to wait on)
            samples.append(pair.rss("ntsd"))
        attacks = [figures(t) for t in tools]
        ke_rate, ntp = figures(honest_ke), figures(honest_ntp)
        time.sleep(3)
        after = pair.rss("ntsd")
        per_minute = samples[5::6]
        print(f"\nMixed flood, {args.mixed} minutes (ntsd): resident memory idle {idle:.0f} MB, at each minute "
              + ", ".join(f"{m:.0f}" for m in per_minute) + f" MB, 3 s after {after:.0f} MB")  # fmt: skip
        first = per_minute[0] if per_minute else samples[-1]
        print(f"  last minute / first minute: {samples[-1] / first:.2f}; last / idle: {samples[-1] / idle:.2f}")
        opened, datagrams = attacks[0]["opened"] + attacks[1]["opened"], attacks[2]["sent"] + attacks[3]["sent"]
        print(f"  honest NTS-KE {ke_rate['rate']:.0f} sessions/s ({ke_rate['failed']:.0f} failed); honest NTP "
              f"{ntp['replies'] / max(ntp['sent'], 1):.1%} answered; attack connections {opened:.0f}, "
              f"datagrams {datagrams:.0f}")  # fmt: skip
    finally:
        pair.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="each measurement's length (default 8)")
    ap.add_argument("--only", default="ke,udp,mssntp", help="comma-separated: ke, udp, mssntp")
    ap.add_argument("--spoofed", type=int, default=1_000_000, help="source addresses of the UDP flood")
    ap.add_argument("--udp-rate", type=float, default=50_000, help="the UDP flood's datagrams/s (0: flat out)")
    ap.add_argument("--mixed", type=float, default=0, help="then MINUTES of every flood at once (ntsd's memory)")
    ap.add_argument("--rounds", type=int, default=3, help="MS-SNTP: rounds, alternating the servers (default 3)")
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--client-core", type=int, default=0)
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs ntsd")
    args = ap.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="ntsd-flood-") as tmp:
        work = Path(tmp)
        binaries = {}
        tools = (("keflood", []), ("udpflood", []), ("loadgen", []), ("keload", [*KE_CLIENTS["lite"][1], "-lpthread"]))
        for name, flags in tools:
            binaries[name] = work / name
            source = HERE / ("keload.c" if name == "keload" else f"{name}.c")
            subprocess.run(["gcc", "-O2", "-o", str(binaries[name]), str(source), *flags], check=True)
        if "ke" in only:
            ke_floods(work, args, binaries["keload"], binaries["keflood"])
        if "udp" in only:
            udp_floods(work, args, binaries["loadgen"], binaries["udpflood"])
        if "mssntp" in only:
            mssntp_saturation(work, args, binaries["loadgen"])
        if args.mixed:
            mixed(work, args, binaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
