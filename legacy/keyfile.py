"""Symmetric key files as they exist in the field: NTPsec/ntp.org `ntp.keys` and chrony's keyfile.

Strategy: each format has its own line parser that returns a Key or a problem (line number and
reason); nothing is guessed across formats, because the same line means different keys in each
(a 40-character key is hex to NTPsec and ASCII to chrony), so the config names the format.
Length rules follow the implementations: NTPsec reads keys of up to 20 characters as ASCII and
longer ones as hex (at most 64 digits), and pads or truncates CMAC keys to the cipher's size;
chrony takes `HEX:`/`ASCII:` prefixes (bare means ASCII) and requires CMAC keys of exactly 16 or
32 bytes. Comments follow each implementation too: in ntp.keys a `#` ends the line wherever it is
(NTPsec's tokenizer); in chrony's file a line is a comment when its first character is one of `!;#%`,
and a `#` anywhere else is part of a word (so `1 MD5 ab#cd` is the key `ab#cd` there). Comments may
hold any text (Debian's own chrony.keys has typographic quotes in them); words are split on ASCII
white space only, and whatever is not a comment must be ASCII or its line is refused. Secret bytes
never appear in a message or a repr.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from nts.files import UnsafeFile, read_private_file


class Algorithm(Enum):
    """MAC algorithms: (name, digest or cipher, MAC bytes on the wire)."""

    MD5 = ("MD5", "md5", 16)
    SHA1 = ("SHA1", "sha1", 20)
    SHA224 = ("SHA224", "sha224", 20)
    SHA256 = ("SHA256", "sha256", 20)  # digests longer than 20 bytes are truncated (RFC 5905 7.3)
    SHA384 = ("SHA384", "sha384", 20)
    SHA512 = ("SHA512", "sha512", 20)
    SHA3_224 = ("SHA3-224", "sha3_224", 20)
    SHA3_256 = ("SHA3-256", "sha3_256", 20)
    SHA3_384 = ("SHA3-384", "sha3_384", 20)
    SHA3_512 = ("SHA3-512", "sha3_512", 20)
    AES128CMAC = ("AES-128-CMAC", "aes128", 16)  # RFC 8573
    AES256CMAC = ("AES-256-CMAC", "aes256", 16)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def mac_len(self) -> int:
        """The MAC length NTPv4 carries (digests truncated to 20 bytes)."""
        return self.value[2]

    @property
    def mac_lengths(self) -> tuple[int, ...]:
        """Accepted MAC lengths: truncated, and the full digest that chrony sends in NTPv3 packets."""
        if self.is_cmac:
            return (16,)
        full = hashlib.new(self.value[1]).digest_size
        return (self.mac_len,) if full == self.mac_len else (self.mac_len, full)

    @property
    def is_cmac(self) -> bool:
        return self in (Algorithm.AES128CMAC, Algorithm.AES256CMAC)

    @property
    def cmac_key_len(self) -> int:
        return 16 if self is Algorithm.AES128CMAC else 32

    @property
    def deprecated(self) -> bool:
        """MD5 and SHA-1 MACs are deprecated by RFC 8573."""
        return self in (Algorithm.MD5, Algorithm.SHA1)


@dataclass(frozen=True, slots=True)
class Key:
    id: int
    algorithm: Algorithm
    secret: bytes = field(repr=False)
    line: int = 0


@dataclass(frozen=True, slots=True)
class Problem:
    line: int
    message: str


@dataclass(frozen=True, slots=True)
class KeyFile:
    source: str
    keys: dict[int, Key]
    problems: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()

    def describe(self, problem: Problem) -> str:
        return f"{self.source}:{problem.line}: {problem.message}"


class KeyFileError(Exception):
    """The key file cannot be used: the message lists each problem as file:line: reason."""


_NTP_TYPES = {
    "MD5": Algorithm.MD5,
    "SHA1": Algorithm.SHA1,
    "SHA-1": Algorithm.SHA1,
    "SHA224": Algorithm.SHA224,
    "SHA256": Algorithm.SHA256,
    "SHA384": Algorithm.SHA384,
    "SHA512": Algorithm.SHA512,
    "SHA3-224": Algorithm.SHA3_224,
    "SHA3-256": Algorithm.SHA3_256,
    "SHA3-384": Algorithm.SHA3_384,
    "SHA3-512": Algorithm.SHA3_512,
    "AES": Algorithm.AES128CMAC,
    "AES128CMAC": Algorithm.AES128CMAC,
    "AES-128": Algorithm.AES128CMAC,
    "AES-256": Algorithm.AES256CMAC,
}
_CHRONY_TYPES = {
    "MD5": Algorithm.MD5,
    "SHA1": Algorithm.SHA1,
    "SHA256": Algorithm.SHA256,
    "SHA384": Algorithm.SHA384,
    "SHA512": Algorithm.SHA512,
    "SHA3-224": Algorithm.SHA3_224,
    "SHA3-256": Algorithm.SHA3_256,
    "SHA3-384": Algorithm.SHA3_384,
    "SHA3-512": Algorithm.SHA3_512,
    "AES128": Algorithm.AES128CMAC,
    "AES256": Algorithm.AES256CMAC,
}
_HEX = set("0123456789abcdefABCDEF")

_NTP_TYPE_NAMES = ", ".join(_NTP_TYPES)
_CHRONY_TYPE_NAMES = ", ".join(_CHRONY_TYPES)


_SPACE = re.compile(r"[ \t\r\v\f]+")  # C's isspace() within a line, as both implementations split


def _words(text: str) -> list[str]:
    return [w for w in _SPACE.split(text) if w]


def _tokens(line: str) -> list[str]:
    """The words of an ntp.keys line: a `#` starts a comment wherever it is."""
    return _words(line.split("#", 1)[0])


def _chrony_tokens(line: str) -> list[str]:
    """The words of a chrony keyfile line: a comment line starts with one of `!;#%`."""
    words = _words(line)
    return [] if not words or words[0][0] in "!;#%" else words


def parse_ntp_line(number: int, line: str, warnings: list[Problem]) -> Key | Problem | None:
    """One line of an NTPsec/ntp.org ntp.keys file (`keyno type key`)."""
    tokens = _tokens(line)
    if not tokens:
        return None
    # Messages name fields by position and never quote them: on a broken line any field may be a key.
    if not (tokens[0].isascii() and tokens[0].isdigit()):  # isdigit alone takes superscripts, other scripts' digits
        return Problem(number, "the first field is not a key number")
    keyno = int(tokens[0])
    if not 1 <= keyno <= 65535:
        return Problem(number, "the key number is outside 1..65535")
    if len(tokens) < 3:
        return Problem(number, f"key {keyno}: expected a key type and a key after the key number")
    upper = tokens[1].upper() if tokens[1].isascii() else ""  # str.upper() maps some letters to ASCII
    algorithm = _NTP_TYPES.get(upper) or (Algorithm.MD5 if upper.startswith("M") else None)
    if algorithm is None:
        return Problem(number, f"key {keyno}: unknown key type (expected one of {_NTP_TYPE_NAMES})")
    if len(tokens) > 3:
        return Problem(number, f"key {keyno}: unexpected text after the key")
    text = tokens[2]
    if len(text) <= 20:
        if not text.isascii() or not text.isprintable():
            return Problem(number, f"key {keyno}: an ASCII key must be printable ASCII")
        secret = text.encode("ascii")
    else:
        if not set(text) <= _HEX:
            return Problem(number, f"key {keyno}: a key longer than 20 characters must be hex, and this is not")
        if len(text) > 64:
            warnings.append(Problem(number, f"key {keyno}: hex key longer than 64 digits, truncated to 32 bytes"))
            text = text[:64]
        secret = bytes.fromhex(text[: len(text) // 2 * 2])
    if algorithm.is_cmac and len(secret) != algorithm.cmac_key_len:
        verb = "padded" if len(secret) < algorithm.cmac_key_len else "truncated"
        warnings.append(Problem(number, f"key {keyno}: {algorithm.label} key {verb} to {algorithm.cmac_key_len} bytes"))
        secret = secret[: algorithm.cmac_key_len].ljust(algorithm.cmac_key_len, b"\0")
    return Key(keyno, algorithm, secret, number)


def parse_chrony_line(number: int, line: str, warnings: list[Problem]) -> Key | Problem | None:
    """One line of a chrony keyfile (`ID [TYPE] KEY`)."""
    tokens = _chrony_tokens(line)
    if not tokens:
        return None
    if not (tokens[0].isascii() and tokens[0].isdigit()) or not 0 < int(tokens[0]) < 2**32:
        return Problem(number, "the first field is not a key ID from 1 to 4294967295")
    key_id = int(tokens[0])
    if len(tokens) == 2:
        algorithm, text = Algorithm.MD5, tokens[1]
    elif len(tokens) == 3:
        found = _CHRONY_TYPES.get(tokens[1].upper()) if tokens[1].isascii() else None
        if found is None:
            return Problem(number, f"key {key_id}: unknown key type (expected one of {_CHRONY_TYPE_NAMES})")
        algorithm, text = found, tokens[2]
    else:
        return Problem(number, f"key {key_id}: expected ID [TYPE] KEY")
    if text.upper().startswith("HEX:"):
        digits = text[4:]
        if not digits or len(digits) % 2 or not set(digits) <= _HEX:
            return Problem(number, f"key {key_id}: HEX: must be followed by an even number of hex digits")
        secret = bytes.fromhex(digits)
    else:
        ascii_text = text[6:] if text.upper().startswith("ASCII:") else text
        if not ascii_text or not ascii_text.isascii() or not ascii_text.isprintable():
            return Problem(number, f"key {key_id}: the key is empty or not printable ASCII")
        secret = ascii_text.encode("ascii")
    if algorithm.is_cmac and len(secret) != algorithm.cmac_key_len:
        return Problem(number, f"key {key_id}: {algorithm.label} keys must be exactly {algorithm.cmac_key_len} bytes")
    if len(secret) < 10:
        warnings.append(Problem(number, f"key {key_id}: shorter than 80 bits"))
    return Key(key_id, algorithm, secret, number)


PARSERS = {"ntp": parse_ntp_line, "chrony": parse_chrony_line}


def parse_keyfile(text: str, source: str, fmt: str) -> KeyFile:
    parse = PARSERS[fmt]
    keys: dict[int, Key] = {}
    problems: list[Problem] = []
    warnings: list[Problem] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): it breaks lines at \x85, \u2028 ...
        result = parse(number, line, warnings)
        if isinstance(result, Problem):
            problems.append(result)
        elif result is not None:
            if result.id in keys:
                first = keys[result.id].line
                problems.append(Problem(number, f"key {result.id} is defined again (first on line {first})"))
                continue
            keys[result.id] = result
    return KeyFile(source, keys, tuple(problems), tuple(warnings))


def load_keyfile(path: Path, fmt: str, allow_bad_lines: bool = False) -> KeyFile:
    """Read and check a key file. Raises KeyFileError (all problems listed) unless allowed."""
    try:
        data = read_private_file(path, (1 << 20) + 1)
    except UnsafeFile as exc:
        raise KeyFileError(str(exc)) from None
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > 1 << 20:
        raise KeyFileError(f"{path}: larger than 1 MiB; not a key file")
    # Comments may be in any encoding; a byte that is not UTF-8 becomes U+FFFD, which no key, number
    # or type name accepts, so such a line outside a comment is refused by its parser.
    keyfile = parse_keyfile(data.decode("utf-8", errors="replace"), str(path), fmt)
    if keyfile.problems and not allow_bad_lines:
        lines = "\n  ".join(keyfile.describe(p) for p in keyfile.problems)
        other = "ntp" if fmt == "chrony" else "chrony"
        if not parse_keyfile(data.decode("utf-8", errors="replace"), str(path), other).problems:
            lines += f"\n  (the whole file reads as {other} format: set mac.format: {other})"
        raise KeyFileError(f"{path}: {len(keyfile.problems)} bad line(s); refusing the file:\n  {lines}")
    return keyfile


def format_ntp_keys(keys: list[Key], by: str = "ntsd keygen") -> str:
    names = {Algorithm.AES128CMAC: "AES128CMAC", Algorithm.AES256CMAC: "AES-256"}
    lines = [f"# ntp.keys written by {by}: keyno type key (hex). Keep it mode 0600."]
    lines += [f"{k.id} {names.get(k.algorithm, k.algorithm.label)} {k.secret.hex()}" for k in keys]
    return "\n".join(lines) + "\n"


def format_chrony_keys(keys: list[Key], by: str = "ntsd keygen") -> str:
    names = {Algorithm.AES128CMAC: "AES128", Algorithm.AES256CMAC: "AES256"}
    lines = [f"# chrony keyfile written by {by}: ID TYPE HEX:key. Keep it mode 0600."]
    lines += [f"{k.id} {names.get(k.algorithm, k.algorithm.label)} HEX:{k.secret.hex().upper()}" for k in keys]
    return "\n".join(lines) + "\n"
