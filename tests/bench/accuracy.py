#!/usr/bin/env python3
"""The time ntsd serves, against chrony's server in the same run: offset and spread as a chrony
client measures them, basic and interleaved, idle and under partial load; and interleaved throughput.

Strategy: ntsd and chronyd serve on loopback, pinned to core 1 (bench.py's `Servers`); for each of
them, a chronyd client (-x: it never touches the clock) polls 16 times a second for `--seconds`,
in basic mode or with `xleave`, logging each sample (measurements.log). Both sides read the same
kernel clock, so every microsecond of offset is the server's error: the median offset and the
median absolute deviation (spread) of the samples of the mode asked (I or B in chrony's MTxRx
column) are printed. Under load, loadgen.c (core 0) sends plain requests at `--load` times the
rate that saturates that server (measured first). Last, loadgen.c saturates each server with
interleaved requests (LOADGEN_XLEAVE: each quotes an earlier reply's receive timestamp) and the
rates and the share answered in interleaved mode are compared.

Usage: python3 tests/bench/accuracy.py [--seconds 15] [--load 0.5] [--ntp-options "max_hold_us: 0"]
       [--python /usr/bin/python3] [--only-throughput]
Needs: chronyd, gcc, taskset; run as root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench import PLAIN_REQUEST, Servers, tree_cpu_seconds  # noqa: E402


def loadgen(binary: Path, port: int, seconds: float, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["taskset", "-c", "0", str(binary), "127.0.0.1", str(port), str(seconds), "64", PLAIN_REQUEST.hex()],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def result(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate()
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


def chrony_samples(work: Path, port: int, xleave: bool, seconds: float) -> list[tuple[str, float]]:
    """(MTxRx, offset in us) of the samples a chronyd client took from 127.0.0.1:port."""
    work.mkdir(parents=True)
    conf = work / "chrony.conf"
    conf.write_text(
        f"server 127.0.0.1 port {port} iburst minpoll -4 maxpoll -4{' xleave' if xleave else ''}\n"
        f"logdir {work}\nlog measurements\ncmdport 0\npidfile {work}/chronyd.pid\n"
    )
    proc = subprocess.Popen(["chronyd", "-x", "-d", "-u", "root", "-f", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(seconds)  # not synchronisation: the sampling period itself
    proc.terminate()
    proc.wait(10)
    log = work / "measurements.log"
    rows = [line.split() for line in log.read_text().splitlines() if line[:2] == "20"] if log.exists() else []
    return [(r[-3], float(r[11]) * 1e6) for r in rows if len(r) >= 17]


def summary(samples: list[tuple[str, float]], flag: str) -> str:
    offsets = [offset for mtxrx, offset in samples[4:] if mtxrx.endswith(flag)]  # (chrony's first ones: basic)
    if not offsets:
        return f"no {flag} samples of {len(samples)}"
    median = statistics.median(offsets)
    spread = statistics.median(abs(o - median) for o in offsets)
    return f"median {median:+7.3f} us  spread {spread:6.3f} us  ({len(offsets)} samples)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="sampling time per row (default 15)")
    ap.add_argument("--load", type=float, default=0.5, help="partial load, as a share of saturation (default 0.5)")
    ap.add_argument("--ntp-options", default="", help="ntsd's ntp options, e.g. 'max_hold_us: 0'")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs ntsd")
    ap.add_argument("--only-throughput", action="store_true", help="only the interleaved throughput")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved throughput rounds (default 5)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntsd-accuracy-") as tmp:
        work = Path(tmp)
        binary = work / "loadgen"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "loadgen.c")], check=True)
        servers = Servers(work, "ec", 1, args.ntp_options, args.python)
        try:
            saturation = {n: result(loadgen(binary, servers.ntp[n], 3))["rate"] for n in ("ntsd", "chrony")}
            print(f"saturation (plain): ntsd {saturation['ntsd']:.0f}/s, chrony {saturation['chrony']:.0f}/s")
            for mode, flag in () if args.only_throughput else (("basic", "B"), ("interleaved", "I")):
                for state in ("idle", "load"):
                    for name in ("ntsd", "chrony"):
                        load = None
                        if state == "load":
                            rate = args.load * saturation[name]
                            load = loadgen(binary, servers.ntp[name], args.seconds + 5, {"LOADGEN_RATE": str(rate)})
                        got = chrony_samples(work / f"{name}-{mode}-{state}", servers.ntp[name], mode != "basic",
                                             args.seconds)  # fmt: skip
                        if load is not None:
                            load.kill()
                            load.wait()
                        what = f"{state} ({args.load:.0%} load)" if state == "load" else state
                        print(f"{mode:11} {what:15} {name:6} {summary(got, flag)}")
            runs: dict[str, list[tuple[float, float, float]]] = {"ntsd": [], "chrony": []}
            for r in range(args.rounds):  # alternating which goes first
                for name in ("ntsd", "chrony") if r % 2 == 0 else ("chrony", "ntsd"):
                    cpu0, t0 = tree_cpu_seconds(servers.procs[name].pid), time.monotonic()
                    got = result(loadgen(binary, servers.ntp[name], 3, {"LOADGEN_XLEAVE": "1"}))
                    cpu = (tree_cpu_seconds(servers.procs[name].pid) - cpu0) / (time.monotonic() - t0)
                    runs[name].append((got["rate"], got["interleaved"] / max(got["replies"], 1), cpu))
            for name, got in runs.items():
                rate, share, cpu = (statistics.median(column) for column in zip(*got, strict=True))
                print(f"interleaved throughput {name:6} {rate:9.0f}/s ({share:.0%} interleaved, {cpu:.0%} of its core; "
                      f"median of {args.rounds})")  # fmt: skip
            ratios = [a[0] / b[0] for a, b in zip(runs["ntsd"], runs["chrony"], strict=True)]
            print(f"  ratio ntsd/chrony, round by round: median {statistics.median(ratios):.2f}, "
                  f"from {min(ratios):.2f} to {max(ratios):.2f}")  # fmt: skip
        finally:
            servers.stop()


if __name__ == "__main__":
    main()
