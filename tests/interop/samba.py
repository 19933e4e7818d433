"""A real Samba AD DC for MS-SNTP, provisioned in a directory: only its ntp_signd service runs.
Used by the interop tests (a module fixture) and by the flood harness (tests/bench/flood.py)."""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed")
    return path


@dataclass
class Samba:
    root: Path
    socket: Path
    rid: int  # an enabled machine account
    nt_hash: bytes
    disabled_rid: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30, prefix: tuple[str, ...] = ()) -> None:
        """Start ntp_signd; `prefix`: a command to run it under (taskset -c N: pinned)."""
        config = str(self.root / "dc/etc/smb.conf")
        self.proc = subprocess.Popen(
            [*prefix, tool("samba"), "-i", "-s", config, "--option=server services=ntp_signd"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not connectable(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError("Samba exited before its ntp_signd socket appeared")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ntp_signd socket within {timeout} s")
            time.sleep(0.1)  # (polling a socket path: nothing to wait on)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            self.proc = None


def connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _samba_tool(*args: str) -> str:
    return subprocess.run([tool("samba-tool"), *args], capture_output=True, text=True, timeout=120, check=True).stdout


def _account(sam: Path, name: str) -> tuple[int, bytes | None]:
    out = subprocess.run([tool("ldbsearch"), "-H", str(sam), f"(sAMAccountName={name})", "objectSid", "unicodePwd"],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    rid = int(re.search(r"^objectSid: S-[\d-]+-(\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    pwd = re.search(r"^unicodePwd:: (\S+)$", out, re.M)
    return rid, base64.b64decode(pwd.group(1)) if pwd else None


def provision(root: Path) -> Samba:
    """A domain NTS.TEST in `root` (not started): WS1$ enabled with a password, WS2$ disabled."""
    signd = root / "signd"
    _samba_tool("domain", "provision", "--realm=NTS.TEST", "--domain=NTSTEST", "--server-role=dc",
                "--dns-backend=NONE", f"--adminpass=A1-{secrets.token_hex(8)}", f"--targetdir={root / 'dc'}",
                f"--option=ntp signd socket directory={signd}", "--option=interfaces=lo",
                "--option=bind interfaces only=yes")  # fmt: skip
    signd.mkdir(mode=0o750)
    sam = root / "dc/private/sam.ldb"
    for name in ("WS1", "WS2"):
        _samba_tool("computer", "create", name, "-H", str(sam))
    _samba_tool("user", "setpassword", "WS1$", f"--newpassword=M1-{secrets.token_hex(12)}", "-H", str(sam))
    _samba_tool("user", "enable", "WS1$", "-H", str(sam))  # created disabled; WS2 stays disabled
    rid, nt_hash = _account(sam, "WS1$")
    disabled_rid, _ = _account(sam, "WS2$")
    assert nt_hash is not None and len(nt_hash) == 16
    return Samba(root, signd / "socket", rid, nt_hash, disabled_rid)
