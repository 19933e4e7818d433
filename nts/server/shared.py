"""Counters and reports of worker processes, summed by the parent for the metrics endpoint.

Strategy: anonymous shared memory with one fixed slot per worker; each worker writes a JSON
snapshot of its counters and gauges into its slot five times a second, its reports once a second
(length last), and the
parent reads every slot when asked. A torn read fails to parse and the previous snapshot is used.
Reloads are numbered in a second, small block: the parent writes the number of the reload it
orders before it signals the workers, each worker records the number it saw once its reload is
done, and the parent reports the reload finished when every worker has caught up (numbers, not
counts, because signals sent close together arrive as one).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from typing import Any

SLOT_SIZE = 1 << 18  # shared memory per worker for its snapshot
_SLOT_HEAD = struct.Struct("<II")  # generation, length
_RELOAD = struct.Struct("<Q")  # slot 0: the reload the parent ordered; slot 1 + i: the one worker i finished


_PER_WORKER = ("_clients", "_entries", "_sessions", "_connections", "_timestamps")  # gauges summed over workers


class SharedCounters:
    """Per-worker counter snapshots in anonymous shared memory, summed by the parent."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.mem = mmap.mmap(-1, SLOT_SIZE * workers)
        self.reloads = mmap.mmap(-1, _RELOAD.size * (workers + 1))
        self._last: list[dict[tuple[str, ...], int]] = [{} for _ in range(workers)]
        self._last_reports: list[dict[str, Any]] = [{} for _ in range(workers)]
        self._reports_json: tuple[Mapping[str, Any] | None, str] = (None, "{}")  # in a worker: its last

    def publish(
        self,
        index: int,
        counts: Mapping[tuple[str, ...], int],
        gauges: Mapping[str, float],
        reports: Mapping[str, Any] | None = None,
    ) -> None:
        doc: dict[str, Any] = {"c": [[list(k), v] for k, v in counts.items()], "g": gauges, "r": reports or {}}
        cached, text = self._reports_json
        if cached is not reports:  # the reports, large, are encoded again only when they are new
            text = json.dumps(reports or {})
            self._reports_json = (reports, text)
        blob = (json.dumps({"c": doc["c"], "g": gauges})[:-1] + ', "r": ' + text + "}").encode()
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

    def order_reload(self) -> int:
        """Parent: number a new reload (before signalling the workers)."""
        number = self.ordered_reload() + 1
        _RELOAD.pack_into(self.reloads, 0, number)
        return number

    def ordered_reload(self) -> int:
        """Worker: the reload the parent ordered last (read when the signal arrives)."""
        return int(_RELOAD.unpack_from(self.reloads, 0)[0])

    def reload_done(self, index: int, number: int, applied: bool = True) -> None:
        """Worker `index` has finished reload `number` (and every one before it); `applied` False
        when it refused it or applied it in part. One word (number and outcome): never read in half.
        Two signals handled after the same order both carry its number; the later outcome stands."""
        if number >= self._reload_word(index) >> 1:
            _RELOAD.pack_into(self.reloads, _RELOAD.size * (index + 1), number << 1 | (not applied))

    def _reload_word(self, index: int) -> int:
        return int(_RELOAD.unpack_from(self.reloads, _RELOAD.size * (index + 1))[0])

    def behind(self, number: int) -> list[int]:
        """The workers that have not yet finished reload `number`."""
        return [i for i in range(self.workers) if self._reload_word(i) >> 1 < number]

    def failed(self) -> list[int]:
        """The workers whose last finished reload was refused or applied in part."""
        return [i for i in range(self.workers) if self._reload_word(i) & 1]

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
                for k, v in data["g"].items():  # what each worker holds adds up; the rest is the same in all
                    gauges[k] = gauges.get(k, 0) + v if k.endswith(_PER_WORKER) else v
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
