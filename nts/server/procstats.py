"""Process metrics as Prometheus client libraries name them, for the main process and its workers.

Strategy: read /proc/PID/stat (CPU time, start time, resident pages) and count /proc/PID/fd for each
of ntsd's processes, and sum them: with workers, the server is all of them (an alert on memory or
descriptors is about the service, not one process). The start time is the main process's. On a
system without /proc the figures are simply absent.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

HELP = {
    "process_cpu_seconds_total": ("counter", "User and system CPU time of ntsd's processes, in seconds."),
    "process_resident_memory_bytes": ("gauge", "Resident memory of ntsd's processes, in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory of ntsd's processes, in bytes."),
    "process_open_fds": ("gauge", "Open file descriptors of ntsd's processes."),
    "process_max_fds": ("gauge", "The limit on open file descriptors of each process."),
    "process_start_time_seconds": ("gauge", "When the main process started, in seconds since the Unix epoch."),
}


def _boot_time() -> float:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return time.time() - time.monotonic()


_BOOT = _boot_time()


def process_metrics(pids: Iterable[int]) -> dict[str, float]:
    """The figures for `pids` (the first is the main process), summed; {} without /proc."""
    out: dict[str, float] = {}
    cpu = rss = vsize = fds = 0.0
    start = None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # a worker that just ended
        # fields[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24
        cpu += (int(fields[11]) + int(fields[12])) / _TICKS
        vsize += int(fields[20])
        rss += int(fields[21]) * _PAGE
        if start is None:
            start = _BOOT + int(fields[19]) / _TICKS
    if start is None:
        return out
    out["process_cpu_seconds_total"] = round(cpu, 2)
    out["process_resident_memory_bytes"] = rss
    out["process_virtual_memory_bytes"] = vsize
    out["process_open_fds"] = fds
    out["process_max_fds"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    out["process_start_time_seconds"] = round(start, 2)
    return out
