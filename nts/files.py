"""Files that hold secrets or get replaced under a running server: shared by the plugins.

Strategy: a secret file must be a regular file that others cannot read or write; its group may read
it only when root owns it (mode 0640 root:GROUP, as Debian ships chrony's key file and as sites
share TLS keys with an ssl-cert group: root chose that group), never write it. Refused otherwise,
with the chmod that mends it (PostgreSQL's rule for its TLS key). Secrets are written atomically
with mode 0600; a watched file is recognised as changed by its identity (inode, size, mtime),
which also catches replace-by-rename. Each owner compares against the identity it took just before
it last read the file (not against what a watcher saw when it started, which missed a change made
between loading the file and the watcher's first look).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

FileIdentity = tuple[int, int, int] | None


class UnsafeFile(PermissionError):
    """A secret file that is not a regular file, or that others (or, unless root owns it, its group) can
    read, or that its group can write."""


def check_private_file(path: Path) -> None:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is not a regular file")
    problem = private_mode_problem(path, stat.S_IMODE(st.st_mode), st.st_uid)
    if problem:
        raise UnsafeFile(problem)


def private_mode_problem(path: Path, mode: int, owner: int) -> str | None:
    """What is wrong with a secret file of this mode and owner uid, and the chmod that mends it; or None."""
    if mode & 0o007:
        return f"{path} is accessible to others (mode {mode:04o}); run: chmod o-rwx {path}"
    if mode & 0o020:
        return f"{path} is writable by its group (mode {mode:04o}); run: chmod g-w {path}"
    if mode & 0o040 and owner != 0:
        return (f"{path} is readable by its group but owned by uid {owner}, not root (mode {mode:04o}); "
                f"run: chmod 600 {path}")  # fmt: skip
    return None


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_identity(path: Path) -> FileIdentity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


async def every(interval: Callable[[], float], tick: Callable[[], object]) -> None:
    """Call `tick()` every `interval()` seconds until cancelled (the file checks)."""
    while True:
        await asyncio.sleep(interval())
        tick()
