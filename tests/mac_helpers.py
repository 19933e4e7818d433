"""Helpers for MAC tests: one set of secrets written as ntp.keys (ours, ntpdig) and chrony keyfile."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from legacy.keyfile import Algorithm, Key, format_ntp_keys
from nts.cli import main

ALGORITHMS = {
    1: Algorithm.MD5,
    2: Algorithm.SHA1,
    3: Algorithm.SHA256,
    4: Algorithm.AES128CMAC,
    5: Algorithm.SHA512,
    6: Algorithm.AES256CMAC,
}


def write_keys(tmp: Path) -> tuple[Path, Path]:
    """ntp.keys with a key of each algorithm, and the same keys for chrony as `ntsd keys convert`
    writes them (so the interop tests check the converter against a real chrony)."""
    keys = [Key(i, a, os.urandom(a.cmac_key_len if a.is_cmac else 20)) for i, a in ALGORITHMS.items()]
    ntp, chrony = tmp / "ntp.keys", tmp / "chrony.keys"
    ntp.write_text(format_ntp_keys(keys))
    ntp.chmod(0o600)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["keys", "convert", str(ntp), str(chrony), "--force"]) == 0
    return ntp, chrony


def mac_section(keys: Path, trusted: list[int] | None = None, extra: str = "") -> str:
    line = f"mac:\n  keys: {keys}\n  check_interval: 0.2\n"
    if trusted is not None:
        line += f"  trusted: [{', '.join(map(str, trusted))}]\n"
    return line + extra


def independent_mac(kind: str, key: bytes, data: bytes, length: int) -> bytes:
    """The MAC as RFC 5905 / RFC 8573 define it, computed without our code."""
    if kind == "cmac":
        c = CMAC(algorithms.AES(key))
        c.update(data)
        return c.finalize()
    return hashlib.new(kind, key + data).digest()[:length]
