#!/usr/bin/env python3
"""What batching costs in accuracy: the offset chrony measures against ntsd, idle and saturated.

Strategy: ntsd runs pinned to core 1 (as in bench.py); `chronyd -Q` takes 8 samples of plain NTP
from it and reports the clock offset it would correct, first with ntsd idle, then while loadgen.c
(core 0) saturates ntsd with SHA1 MAC requests, alternating, for each set of ntp options given.
Both sides read the same kernel clock, so every microsecond of offset is measurement error: a
reply whose transmit timestamp was read early (waiting for a batch's send call) shows up as a
negative offset of half that wait.

Usage: python3 tests/bench/accuracy.py [--rounds 2] ["batch: 1" "max_hold_us: 10" ...]
Needs: chronyd, gcc, taskset; run as root.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench import Servers  # noqa: E402

from tests.interop.peers import chrony_measure  # noqa: E402


def measure(work: Path, options: str, rounds: int, loadgen: Path) -> dict[str, list[float]]:
    servers = Servers(work, "ec", 1, options)
    out: dict[str, list[float]] = {"idle": [], "saturated": []}
    try:
        packet = servers.mac_packet(servers.mac_keys[0]).hex()
        port = servers.ntp["ntsd"]
        for r in range(rounds):
            for state in ("idle", "saturated"):
                load = None
                if state == "saturated":
                    load = subprocess.Popen(
                        ["taskset", "-c", "0", str(loadgen), "127.0.0.1", str(port), "30", "64", packet],
                        stdout=subprocess.DEVNULL,
                    )
                    time.sleep(1)  # not synchronisation: lets the load reach its steady state first
                tmp = work / f"chrony-{state}-{r}"
                tmp.mkdir()
                offset, output = chrony_measure(tmp, f"server 127.0.0.1 port {port} iburst minsamples 8 maxsamples 8")
                if load is not None:
                    load.kill()
                    load.wait()
                if offset is None:
                    raise SystemExit(f"accuracy: chronyd measured nothing ({state}):\n{output}")
                out[state].append(offset * 1e6)
    finally:
        servers.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("options", nargs="*", help='ntsd ntp settings to compare, e.g. "batch: 1"')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntsd-accuracy-") as tmp:
        work = Path(tmp)
        loadgen = work / "loadgen"
        subprocess.run(["gcc", "-O2", "-o", str(loadgen), str(HERE / "loadgen.c")], check=True)
        print(f"{'ntp options':32} {'idle offset (us)':>18} {'saturated offset (us)':>22}")
        for i, options in enumerate(args.options or [""]):
            (work / str(i)).mkdir()
            got = measure(work / str(i), options, args.rounds, loadgen)
            idle, busy = (statistics.median(got[k]) for k in ("idle", "saturated"))
            print(f"{options or '(defaults)':32} {idle:18.1f} {busy:22.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
