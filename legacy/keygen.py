"""`ntsd keygen`: write a new symmetric key file, as ntpkeygen does; `ntsd keys convert`: the same
keys in the other format (ntp.keys <-> chrony's), to hand MAC keys to chrony clients. Both are
registered as plugin commands.

Strategy: keys from the OS random source; AES-128-CMAC by default (RFC 8573's recommendation);
written atomically with mode 0600; an existing file is never overwritten without --force. A file
to convert is read as a secret (the same checks as the server's) and refused whole if a line is bad.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

from nts.files import write_private_file

from .keyfile import Algorithm, Key, KeyFileError, format_chrony_keys, format_ntp_keys, load_keyfile

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


def convert(args: argparse.Namespace) -> int:
    source, out = Path(args.input), Path(args.output)
    target = args.to or ("chrony" if args.source_format == "ntp" else "ntp")
    if target == args.source_format:
        print(f"ntsd: {source} is in {target} format already", file=sys.stderr)
        return 2
    try:
        keys = sorted(load_keyfile(source, args.source_format).keys.values(), key=lambda k: k.id)
    except KeyFileError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return 1
    if not keys:
        print(f"ntsd: {source} holds no keys", file=sys.stderr)
        return 1
    too_high = [k.id for k in keys if k.id > 65535]
    if target == "ntp" and too_high:
        print(f"ntsd: key ids above 65535 do not fit ntp.keys: {', '.join(map(str, too_high[:10]))}", file=sys.stderr)
        return 1
    if out.exists() and not args.force:
        print(f"ntsd: {out} exists; use --force to replace it", file=sys.stderr)
        return 1
    by = f"ntsd keys convert from {source}"
    text = format_ntp_keys(keys, by) if target == "ntp" else format_chrony_keys(keys, by)
    try:
        write_private_file(out, text.encode("ascii"))
    except OSError as exc:
        print(f"ntsd: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {len(keys)} keys from {source} ({args.source_format} format) to {out} ({target} format, mode 0600)")
    return 0


def register_keys(sub: Any) -> None:
    p = sub.add_parser("keys", help="work with symmetric key files")
    keys = p.add_subparsers(dest="keys_command", required=True)
    c = keys.add_parser("convert", help="write the keys of a key file in the other format (ntp.keys <-> chrony)")
    c.add_argument("input", help="the key file to read (checked as a secret, as the server does)")
    c.add_argument("output", help="the key file to write (mode 0600)")
    c.add_argument("--from", dest="source_format", choices=("ntp", "chrony"), default="ntp",
                   help="the input's format (default ntp)")  # fmt: skip
    c.add_argument("--to", choices=("ntp", "chrony"), help="the output's format (default: the other one)")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    c.set_defaults(func=convert)


def register(sub: Any) -> None:
    p = sub.add_parser("keygen", help="write a new symmetric key file (ntp.keys or chrony format)")
    p.add_argument("output", help="the key file to write")
    p.add_argument("--type", default="AES128CMAC", type=str.upper, choices=sorted(TYPES), help="default AES128CMAC")
    p.add_argument("--count", type=int, default=10, help="number of keys (default 10)")
    p.add_argument("--first-id", type=int, default=1, help="first key id (default 1)")
    p.add_argument("--format", choices=("ntp", "chrony"), default="ntp", help="ntp.keys (default) or chrony")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=run)
