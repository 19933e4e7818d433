"""Counters and reports of worker processes, summed by the parent for the metrics endpoint.

Strategy: anonymous shared memory with one fixed slot per worker; each worker writes a JSON
snapshot of its counters, gauges and reports into its slot once a second (length last), and the
parent reads every slot when asked. A torn read fails to parse and the previous snapshot is used.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from typing import Any

SLOT_SIZE = 1 << 18  # shared memory per worker for its snapshot
_SLOT_HEAD = struct.Struct("<II")  # generation, length


class SharedCounters:
    """Per-worker counter snapshots in anonymous shared memory, summed by the parent."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.mem = mmap.mmap(-1, SLOT_SIZE * workers)
        self._last: list[dict[tuple[str, ...], int]] = [{} for _ in range(workers)]
        self._last_reports: list[dict[str, Any]] = [{} for _ in range(workers)]

    def publish(
        self,
        index: int,
        counts: Mapping[tuple[str, ...], int],
        gauges: Mapping[str, float],
        reports: Mapping[str, Any] | None = None,
    ) -> None:
        doc: dict[str, Any] = {"c": [[list(k), v] for k, v in counts.items()], "g": gauges, "r": reports or {}}
        blob = json.dumps(doc).encode()
        while len(blob) > SLOT_SIZE - _SLOT_HEAD.size and doc["r"]:
            # reports are the large part: keep the most recent half of each until the slot holds it
            doc["r"] = {k: v[: len(v) // 2] for k, v in doc["r"].items() if isinstance(v, list) and len(v) > 1}
            blob = json.dumps(doc).encode()
        if len(blob) > SLOT_SIZE - _SLOT_HEAD.size:
            return
        base = index * SLOT_SIZE
        gen = _SLOT_HEAD.unpack_from(self.mem, base)[0] + 1
        self.mem[base + _SLOT_HEAD.size : base + _SLOT_HEAD.size + len(blob)] = blob
        _SLOT_HEAD.pack_into(self.mem, base, gen, len(blob))

    def total(self) -> tuple[dict[tuple[str, ...], int], dict[str, float]]:
        counts: dict[tuple[str, ...], int] = {}
        gauges: dict[str, float] = {}
        for i in range(self.workers):
            base = i * SLOT_SIZE
            _, length = _SLOT_HEAD.unpack_from(self.mem, base)
            try:
                data = json.loads(self.mem[base + _SLOT_HEAD.size : base + _SLOT_HEAD.size + length])
                self._last[i] = {tuple(k): v for k, v in data["c"]}
                self._last_reports[i] = data.get("r", {})
                for k, v in data["g"].items():
                    gauges[k] = gauges.get(k, 0) + v if k.endswith(("_clients", "_entries")) else v  # per-worker tables
            except (ValueError, KeyError, TypeError):
                pass  # torn read: use the previous snapshot
            for k, v in self._last[i].items():
                counts[k] = counts.get(k, 0) + v
        gauges["workers"] = self.workers
        return counts, gauges

    def reports(self) -> dict[str, Any]:
        self.total()  # refresh the snapshots
        merged: dict[str, Any] = {}
        for worker in self._last_reports:
            for name, value in worker.items():
                merged[name] = merged.get(name, []) + value if isinstance(value, list) else value
        return merged
