"""Files that hold secrets or get replaced under a running server: shared by the plugins.

Strategy: a secret file must be a regular file that others cannot read or write; its group may read
it only when root owns it (mode 0640 root:GROUP, as Debian ships chrony's key file and as sites
share TLS keys with an ssl-cert group: root chose that group), never write it. Refused otherwise,
with the chmod that mends it (PostgreSQL's rule for its TLS key). Its owner must be root, the user
the server runs as, or the one it will drop to (`allow_owner`): a key that another user owns is one
that user can change (a master secret owned by `nobody` let nobody forge NTS time). It is opened
once, without following a symbolic link, and the checks are made on the open file (`fstat`), so
nothing can be swapped in between; a directory others may write to (without the sticky bit) is
refused, as they could replace the file. Secrets are written atomically with mode 0600; a watched
file is recognised as changed by its identity (inode, size, mtime), which also catches replace-by-
rename. Each owner compares against the identity it took just before it last read the file (not
against what a watcher saw when it started, which missed a change made between loading the file and
the watcher's first look).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

FileIdentity = tuple[int, int, int] | None
_OWNERS = {0}  # uids a secret file may belong to, besides the effective user's (allow_owner)
_SERVICE: tuple[str, int, int, frozenset[int]] | None = None  # the user to drop to: name, uid, gid, groups


class UnsafeFile(PermissionError):
    """A secret file that is not a regular file, or that others (or, unless root owns it, its group) can
    read, or that its group can write."""


def default_dir() -> Path:
    """Where the embedded default keeps its certificate and master secret, and where `ntsd certs`
    writes: $NTSD_DIR, else /var/lib/ntsd for root, else $XDG_STATE_HOME/ntsd (~/.local/state/ntsd).
    Fixed, so that a server started from another directory (under systemd: /) loads nothing from it."""
    if os.environ.get("NTSD_DIR"):
        return Path(os.environ["NTSD_DIR"]).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/ntsd")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state).absolute() / "ntsd"


def allow_owner(uid: int) -> None:
    """Secret files may also belong to `uid` (the user the server drops its privileges to)."""
    _OWNERS.add(uid)


def set_service_user(name: str, uid: int, gid: int) -> None:
    """The user the server will drop its privileges to: files it creates before are handed to it,
    and a secret it could not read after the drop is refused now, not at the first reload."""
    global _SERVICE
    _OWNERS.add(uid)
    _SERVICE = (name, uid, gid, frozenset(os.getgrouplist(name, gid)))


def hand_over(path: Path) -> None:
    """Give `path` (a file or directory the server just made) to the user it will run as."""
    if _SERVICE is not None and os.geteuid() == 0:
        os.chown(path, _SERVICE[1], _SERVICE[2], follow_symlinks=False)


def unreadable_after_drop(path: Path, st: os.stat_result) -> str | None:
    """Why the user the server drops to could not read `path` (with status `st`), or None."""
    if _SERVICE is None or os.geteuid() != 0:
        return None
    name, uid, _, groups = _SERVICE
    if uid == 0:
        return None

    def allowed(st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & bits[0])
        return bool(st.st_mode & (bits[1] if st.st_gid in groups else bits[2]))

    for directory in Path(os.path.abspath(path)).parents:
        if not allowed(os.stat(directory), (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return (f"{path} could not be reached by {name} (ntp.user) once privileges are dropped "
                    f"({directory} is closed to it), so reloads would fail; run: chmod o+x {directory}, or move "
                    "the file")  # fmt: skip
    if allowed(st, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
        return None
    return (f"{path} could not be read by {name} (ntp.user) once privileges are dropped, so reloads would fail; "
            f"run: chown {name} {path}, or chgrp a group of {name} and chmod 640 it if root keeps it")  # fmt: skip


def read_private_file(path: Path, limit: int) -> bytes:
    """Up to `limit` bytes of the secret file at `path`, checked on the open file (see the module
    comment). Raises UnsafeFile for a file or directory that fails the checks, OSError (e.g.
    FileNotFoundError) for one that cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last part of the path is a symbolic link
            raise UnsafeFile(f"{path} is a symbolic link; name the file itself") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check(path, st)
        _check_directory(path)
        problem = unreadable_after_drop(path, st)
        if problem is not None:
            raise UnsafeFile(problem)
        return f.read(limit)


def check_private_file(path: Path) -> None:
    """The checks of read_private_file, without keeping what it reads."""
    read_private_file(path, 0)


def _check(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is not a regular file")
    problem = private_mode_problem(path, stat.S_IMODE(st.st_mode), st.st_uid)
    if problem:
        raise UnsafeFile(problem)
    if st.st_uid not in _OWNERS and st.st_uid != os.geteuid():
        raise UnsafeFile(f"{path} belongs to uid {st.st_uid}, not root or the user ntsd runs as, who could change "
                         f"it; run: chown root {path}")  # fmt: skip


def _check_directory(path: Path) -> None:
    directory = path.parent
    st = os.stat(directory)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafeFile(f"{path}: its directory {directory} is writable by others, who could replace it; "
                         f"run: chmod o-w {directory}")  # fmt: skip


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
