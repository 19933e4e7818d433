"""The running server's own record: which process to signal and where its metrics are.

Strategy: at start the main process writes a small JSON file (pid, configuration file, metrics
address as bound, version) into a runtime directory, under a name derived from the configuration
file's absolute path, and removes it when it stops. `ntsd reload` and `ntsd status -c FILE` find the
server through it without reading the configuration file again: that file may have been edited
since (a metrics address changed, not applied until a restart) or be broken (a refused reload),
which is exactly when an operator asks. A record whose process is gone is stale and says so.
The directory: $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), /run/ntsd for root,
$XDG_RUNTIME_DIR/ntsd, else ntsd's default directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import files


def runtime_dir() -> Path:
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/ntsd")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "ntsd"
    return files.default_dir() / "run"


def record_path(config_path: str | None) -> Path:
    """The record of the server started with `config_path` (None: the embedded default)."""
    if config_path is None:
        return runtime_dir() / "default.json"
    digest = hashlib.sha256(os.path.abspath(config_path).encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.json"


@dataclass(frozen=True, slots=True)
class Record:
    pid: int
    config: str
    metrics: tuple[str, int] | None
    version: str


def write(config_path: str | None, record: Record) -> Path | None:
    """Write the record (atomically; handed to the service user); None, and nothing written, when
    the directory cannot be made or written (the caller logs it: reload then needs the pid)."""
    path = record_path(config_path)
    data = {"pid": record.pid, "config": record.config, "version": record.version,
            "metrics": list(record.metrics) if record.metrics else None}  # fmt: skip
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o755, parents=True)
            files.hand_over(path.parent)
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_text(json.dumps(data) + "\n")
        files.hand_over(temp)
        os.replace(temp, path)
    except OSError:
        return None
    return path


def remove(path: Path) -> None:
    """Remove the record if it is still this process's (a newer server may have replaced it)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


class NotRunning(Exception):
    """No server runs with that configuration (or its record is stale); the message says which."""


def find(config_path: str | None) -> Record:
    """The record of the running server started with `config_path`; NotRunning otherwise."""
    path = record_path(config_path)
    named = config_path or "the embedded default configuration"
    try:
        data = json.loads(path.read_text())
        record = Record(int(data["pid"]), str(data["config"]),
                        (str(data["metrics"][0]), int(data["metrics"][1])) if data.get("metrics") else None,
                        str(data.get("version", "")))  # fmt: skip
    except FileNotFoundError:
        raise NotRunning(f"no ntsd runs with {named} (no {path})") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise NotRunning(f"cannot read {path}: {exc}") from None
    if not _alive(record.pid):
        raise NotRunning(f"no ntsd runs with {named} ({path} names process {record.pid}, which is gone)")
    return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True
