"""Shared test helpers: free ports, a running ntsd subprocess, NTP queries, real-peer lookup."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

REQUIRE_PEERS = os.environ.get("NTSD_REQUIRE_PEERS") == "1"
# the daemon's line once it serves ("ready", or "ready with N workers"); "ready" alone also matched
# "Address already in use", so a server that could not bind its port looked ready
READY = " INFO ntsd: ready"


T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Call `probe` until it returns something true, and return that; fail after `timeout` seconds
    with the last value seen. For what has no event to wait on (a counter a worker publishes once a
    second, a file another process writes); never a sleep in place of an event that can be awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s{': ' + what if what else ''} (last: {value!r})")
        time.sleep(interval)


async def async_wait_until(
    probe: Callable[[], T | Awaitable[T]], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> T:
    """wait_until for a test on the event loop: the loop runs while it waits."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s{': ' + what if what else ''} (last: {value!r})")
        await asyncio.sleep(interval)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        return s.connect_ex((host, port)) == 0


def need(tool: str) -> str:
    """Path of a real peer's binary; skip (or fail, when NTSD_REQUIRE_PEERS=1) if it is missing."""
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        if REQUIRE_PEERS:
            pytest.fail(f"{tool} is required (NTSD_REQUIRE_PEERS=1) but not installed")
        pytest.skip(f"{tool} not installed")
    return path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()
_pick = random.Random()  # its own: hypothesis seeds the global one, which would repeat picks across runs


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel chose (bind to 0) is
    one it may give next to any outgoing connection, and one did take it between this call and the
    server binding it (the server then could not listen, and the test saw "connection refused")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = _pick.randrange(10000, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family, kind) as s:  # a crowded machine: the kernel's choice after all
        s.bind((host, 0))
        return int(s.getsockname()[1])


def client_request(version: int = 4, transmit: int = 0x1234567890ABCDEF, poll: int = 6) -> bytes:
    return struct.pack(">BBbb", (version << 3) | 3, 0, poll, 0) + bytes(36) + struct.pack(">Q", transmit)


def query(
    port: int, packet: bytes, host: str = "127.0.0.1", timeout: float = 1.0, source: str | None = None
) -> bytes | None:
    """Send one datagram and return the reply, or None if none came within `timeout`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(packet, (host, port))
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


class Ntsd:
    """An `ntsd serve` subprocess whose log is collected line by line (no sleeps to synchronise)."""

    def __init__(self, config: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nts", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, text: str | tuple[str, ...], timeout: float = 15.0, start: int = 0) -> int:
        """Block until a log line containing `text` (or any of several) appears (at index >= start);
        return its index."""
        deadline = time.monotonic() + timeout
        texts = (text,) if isinstance(text, str) else text
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    if any(t in self.lines[i] for t in texts):
                        return i
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line with {text!r}; log:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.5))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return self.proc.returncode


@contextmanager
def running_ntsd(tmp_path: Path, config_text: str, env: dict[str, str] | None = None) -> Iterator[Ntsd]:
    cfg = tmp_path / "ntsd.yaml"
    cfg.write_text(config_text)
    server = Ntsd(cfg, tmp_path, env)
    try:
        server.wait_for(READY)
        yield server
    finally:
        server.stop()


def worker_reloaded(pid: int, workers: int = 2) -> tuple[str, ...]:
    """The debug line worker `pid` writes when it has applied a reload (the supervisor's INFO line
    says it for the whole server)."""
    return tuple(f"ntsd[{pid}] worker {i}/{workers} DEBUG ntsd: configuration reloaded" for i in range(1, workers + 1))


def lab_config(
    port: int,
    *,
    metrics_port: int | None = None,
    extra: str = "",
    listen: list[str] | None = None,
    ntp_extra: str = "",
) -> str:
    """A config serving as a local reference (this machine's kernel clock is unsynchronised)."""
    addrs = listen if listen is not None else [f"127.0.0.1:{port}"]
    quoted = ", ".join(f'"{a}"' for a in addrs)
    metrics = f'"127.0.0.1:{metrics_port}"' if metrics_port else "null"
    return (
        f"ntp: {{listen: [{quoted}]{', ' + ntp_extra if ntp_extra else ''}}}\n"
        "clock: {local_reference: true, stratum: 1, reference_id: LOCL}\n"
        f"metrics: {{listen: {metrics}}}\n"
        "log: {level: debug}\n" + extra
    )


def port_123_free() -> bool:
    """Whether this test run can have 127.0.0.1:123 (ntpdig only queries port 123)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", 123))
        except OSError:
            return False
    return True
