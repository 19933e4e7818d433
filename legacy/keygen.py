"""`ntsd keygen`: write a new symmetric key file, as ntpkeygen does (registered as a plugin command).

Strategy: keys from the OS random source; AES-128-CMAC by default (RFC 8573's recommendation);
written atomically with mode 0600; an existing file is never overwritten without --force.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

from nts.files import write_private_file

from .keyfile import Algorithm, Key, format_chrony_keys, format_ntp_keys

TYPES = {
    "AES128CMAC": Algorithm.AES128CMAC,
    "AES256CMAC": Algorithm.AES256CMAC,
    "SHA1": Algorithm.SHA1,
    "SHA256": Algorithm.SHA256,
    "SHA512": Algorithm.SHA512,
    "MD5": Algorithm.MD5,
}


def make_keys(algorithm: Algorithm, count: int, first_id: int = 1) -> list[Key]:
    size = algorithm.cmac_key_len if algorithm.is_cmac else 20
    return [Key(first_id + i, algorithm, secrets.token_bytes(size)) for i in range(count)]


def run(args: argparse.Namespace) -> int:
    algorithm = TYPES[args.type.upper()]
    limit = 65535 if args.format == "ntp" else 2**32 - 1
    if not 1 <= args.count <= 1000 or not 1 <= args.first_id or args.first_id + args.count - 1 > limit:
        print(f"ntsd: --count must be 1..1000 and key ids must stay within 1..{limit}", file=sys.stderr)
        return 2
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"ntsd: {out} exists; use --force to replace it", file=sys.stderr)
        return 1
    keys = make_keys(algorithm, args.count, args.first_id)
    text = format_ntp_keys(keys) if args.format == "ntp" else format_chrony_keys(keys)
    try:
        write_private_file(out, text.encode("ascii"))
    except OSError as exc:
        print(f"ntsd: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(keys)} {algorithm.label} keys (ids {keys[0].id}..{keys[-1].id}) to {out} (mode 0600, "
        f"{args.format} format)"
    )
    if algorithm.deprecated:
        print(f"note: {algorithm.label} is deprecated by RFC 8573; prefer AES128CMAC, or better, NTS")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("keygen", help="write a new symmetric key file (ntp.keys or chrony format)")
    p.add_argument("output", help="the key file to write")
    p.add_argument("--type", default="AES128CMAC", type=str.upper, choices=sorted(TYPES), help="default AES128CMAC")
    p.add_argument("--count", type=int, default=10, help="number of keys (default 10)")
    p.add_argument("--first-id", type=int, default=1, help="first key id (default 1)")
    p.add_argument("--format", choices=("ntp", "chrony"), default="ntp", help="ntp.keys (default) or chrony")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=run)
