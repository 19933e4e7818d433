"""Key files: every accepted form, every rejected form with its exact message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from legacy.keyfile import Algorithm, KeyFileError, load_keyfile, parse_keyfile
from nts.files import private_mode_problem

NTP_ACCEPTED = [
    ("1 MD5 abcdefghij", 1, Algorithm.MD5, b"abcdefghij"),
    ("2 md5 12345678901234567890", 2, Algorithm.MD5, b"12345678901234567890"),  # 20 chars: still ASCII
    ("3 SHA1 " + "ab" * 20, 3, Algorithm.SHA1, bytes([0xAB]) * 20),  # > 20 chars: hex
    ("4 sha256 " + "0F" * 16 + "  # comment", 4, Algorithm.SHA256, bytes([0x0F]) * 16),
    (
        "5 AES " + "00112233445566778899aabbccddeeff",
        5,
        Algorithm.AES128CMAC,
        bytes.fromhex("00112233445566778899aabbccddeeff"),
    ),
    ("6 AES128CMAC " + "11" * 16, 6, Algorithm.AES128CMAC, bytes([0x11]) * 16),
    ("7 M secret", 7, Algorithm.MD5, b"secret"),  # NTPsec: unknown names starting with M mean MD5
    ("65535 SHA512 " + "22" * 32, 65535, Algorithm.SHA512, bytes([0x22]) * 32),
    ("\t8\tSHA1\tpass#word", 8, Algorithm.SHA1, b"pass"),  # '#' starts a comment, even inside a token
]


@pytest.mark.parametrize(("line", "key_id", "algorithm", "secret"), NTP_ACCEPTED)
def test_ntp_keys_accepted(line: str, key_id: int, algorithm: Algorithm, secret: bytes) -> None:
    kf = parse_keyfile(f"# header\n\n{line}\n", "ntp.keys", "ntp")
    assert kf.problems == ()
    key = kf.keys[key_id]
    assert (key.algorithm, key.secret, key.line) == (algorithm, secret, 3)
    assert secret.hex() not in repr(key) and "secret" not in repr(key).replace("secret=", "")


def test_ntp_cmac_keys_padded_or_truncated_with_warnings() -> None:
    kf = parse_keyfile("1 AES short\n2 AES " + "33" * 20 + "\n", "k", "ntp")
    assert kf.keys[1].secret == b"short" + bytes(11)
    assert kf.keys[2].secret == bytes([0x33]) * 16
    assert [kf.describe(w) for w in kf.warnings] == [
        "k:1: key 1: AES-128-CMAC key padded to 16 bytes",
        "k:2: key 2: AES-128-CMAC key truncated to 16 bytes",
    ]


NTP_TYPES = (
    "MD5, SHA1, SHA-1, SHA224, SHA256, SHA384, SHA512, SHA3-224, SHA3-256, SHA3-384, SHA3-512, AES, AES128CMAC, "
)
NTP_TYPES += "AES-128, AES-256"
CHRONY_TYPES = "MD5, SHA1, SHA256, SHA384, SHA512, SHA3-224, SHA3-256, SHA3-384, SHA3-512, AES128, AES256"
NTP_REJECTED = [
    ("0 MD5 abc", "the key number is outside 1..65535"),
    ("65536 MD5 abc", "the key number is outside 1..65535"),
    ("x1 MD5 abc", "the first field is not a key number"),
    ("\u00b9 MD5 abc", "the first field is not a key number"),  # str.isdigit() says yes, int() no (found by fuzzing)
    ("\u0661 MD5 abc", "the first field is not a key number"),  # an Arabic-Indic 1, which int() would take
    ("1", "key 1: expected a key type and a key after the key number"),
    (
        "1 BLAKE2 abc",
        f"key 1: unknown key type (expected one of {NTP_TYPES})",
    ),
    ("1 SHA1", "key 1: expected a key type and a key after the key number"),
    ("1 SHA1 " + "zz" * 12, "key 1: a key longer than 20 characters must be hex, and this is not"),
    ("1 SHA1 abc def", "key 1: unexpected text after the key"),
]


@pytest.mark.parametrize(("line", "message"), NTP_REJECTED)
def test_ntp_keys_rejected(line: str, message: str) -> None:
    kf = parse_keyfile("1 MD5 fine\n" * 0 + line + "\n", "ntp.keys", "ntp")
    assert [kf.describe(p) for p in kf.problems] == [f"ntp.keys:1: {message}"]


CHRONY_ACCEPTED = [
    ("1 secretpassword", 1, Algorithm.MD5, b"secretpassword"),  # no type: MD5
    ("2 SHA1 HEX:" + "AB" * 20, 2, Algorithm.SHA1, bytes([0xAB]) * 20),
    ("3 SHA256 ASCII:" + "x" * 40, 3, Algorithm.SHA256, b"x" * 40),  # 40 chars, but ASCII in chrony
    ("4 AES128 HEX:" + "00" * 16, 4, Algorithm.AES128CMAC, bytes(16)),
    ("5 AES256 HEX:" + "01" * 32, 5, Algorithm.AES256CMAC, bytes([1]) * 32),
    ("4294967295 SHA512 " + "y" * 30, 4294967295, Algorithm.SHA512, b"y" * 30),
    ("6 SHA3-256 HEX:" + "02" * 20, 6, Algorithm.SHA3_256, bytes([2]) * 20),
    ("7 MD5 ab#cdefghij", 7, Algorithm.MD5, b"ab#cdefghij"),  # '#' inside a word is part of it (chrony)
    ("\t8\tMD5\tabcdefghij\r", 8, Algorithm.MD5, b"abcdefghij"),  # tabs, and a CRLF file's \r
]


def test_comments_follow_each_implementation() -> None:
    # Debian installs /etc/chrony/chrony.keys with typographic quotes in its comments (UTF-8).
    debian_like = "# Keys made with \u201cchronyc keygen\u201d, for example:\n#\n! old-style\n; also\n% and this\n"
    kf = parse_keyfile(debian_like + "  # indented\n1 SHA1 HEX:" + "ab" * 20 + "\n", "chrony.keys", "chrony")
    assert (kf.problems, list(kf.keys)) == ((), [1])
    kf = parse_keyfile("1 MD5 abcdefghij # trailing text\n", "chrony.keys", "chrony")  # chrony: four words
    assert [kf.describe(p) for p in kf.problems] == ["chrony.keys:1: key 1: expected ID [TYPE] KEY"]
    # ntp.keys (NTPsec's tokenizer): a '#' ends the line wherever it is, comments may hold anything
    kf = parse_keyfile(
        "# Schl\u00fcssel\u2028not a line\n1 MD5 abcdefghij#rest \u00fc\n2 SHA1 klmnopqrst # note \u201cx\u201d\n",
        "k",
        "ntp",
    )
    assert kf.problems == () and [k.secret for k in kf.keys.values()] == [b"abcdefghij", b"klmnopqrst"]


def test_a_file_as_ntpkeygen_writes_it() -> None:
    """NTPsec's ntpkeygen: two comment lines, then `%2d AES key` lines: 16 printable characters from
    '!' to '}' (which may include '#'), then 32 hex digits. NTPsec's reader, and ntpdig's, end a line
    at '#' and NTPsec pads a short CMAC key with zeros; so does this reader (with a warning)."""
    ascii_keys = ["q7!Vd$0p(Lm]z^K{", "ab#defghijklmnop", *(chr(0x41 + i) * 16 for i in range(8))]
    hex_keys = [f"{i:02x}" * 16 for i in range(10)]
    text = "# ntpkey_AES_host.3972913482\n# Sun Nov 22 17:44:42 2026\n"
    text += "".join(f"{i:2d} AES {k}\n" for i, k in enumerate(ascii_keys + hex_keys, 1))
    kf = parse_keyfile(text, "ntp.keys", "ntp")
    assert kf.problems == () and len(kf.keys) == 20
    assert kf.keys[1].secret == b"q7!Vd$0p(Lm]z^K{" and kf.keys[20].secret == bytes([9]) * 16
    assert kf.keys[2].secret == b"ab" + bytes(14)
    assert [kf.describe(w) for w in kf.warnings] == ["ntp.keys:4: key 2: AES-128-CMAC key padded to 16 bytes"]


@pytest.mark.parametrize("fmt", ["ntp", "chrony"])
def test_text_other_than_ascii_outside_comments_is_refused(fmt: str) -> None:
    lines = [
        "1 MD5 abcdefgh\u00e9",  # a key
        "2 \u017fha1 abcdefghij",  # a type that str.upper() would make SHA1 of
        "3\u00a0MD5 abcdefghij",  # a space that is not ASCII: NTPsec and chrony see one word
        "4 MD5 abcdefghij\ufffd",  # a byte that is not UTF-8, after decoding
    ]
    kf = parse_keyfile("\n".join(lines) + "\n", "k", fmt)
    assert (len(kf.problems), list(kf.keys)) == (4, [])


def test_a_key_file_in_another_encoding_loads_what_is_ascii(tmp_path: Path) -> None:
    path = tmp_path / "ntp.keys"
    path.write_bytes(b"# Schl\xfcssel (Latin-1)\n1 MD5 abcdefghij\n")
    path.chmod(0o600)
    assert list(load_keyfile(path, "ntp").keys) == [1]
    path.write_bytes(b"1 MD5 abcdefgh\xe9\n")
    with pytest.raises(KeyFileError, match="1 bad line"):
        load_keyfile(path, "ntp")


@pytest.mark.parametrize(("line", "key_id", "algorithm", "secret"), CHRONY_ACCEPTED)
def test_chrony_keys_accepted(line: str, key_id: int, algorithm: Algorithm, secret: bytes) -> None:
    kf = parse_keyfile(line + "\n", "chrony.keys", "chrony")
    assert kf.problems == ()
    assert (kf.keys[key_id].algorithm, kf.keys[key_id].secret) == (algorithm, secret)


CHRONY_REJECTED = [
    ("0 MD5 abc", "the first field is not a key ID from 1 to 4294967295"),
    ("\u00b2 MD5 abc", "the first field is not a key ID from 1 to 4294967295"),
    ("\u0662 MD5 abc", "the first field is not a key ID from 1 to 4294967295"),
    (
        "1 SHA2 abc",
        f"key 1: unknown key type (expected one of {CHRONY_TYPES})",
    ),
    ("1 SHA1 HEX:abc", "key 1: HEX: must be followed by an even number of hex digits"),
    ("1 SHA1 HEX:zz", "key 1: HEX: must be followed by an even number of hex digits"),
    ("1 AES128 HEX:" + "00" * 15, "key 1: AES-128-CMAC keys must be exactly 16 bytes"),
    ("1 AES256 shortkey", "key 1: AES-256-CMAC keys must be exactly 32 bytes"),
    ("1 MD5 ASCII:", "key 1: the key is empty or not printable ASCII"),
    ("1 MD5 a b", "key 1: expected ID [TYPE] KEY"),
]


@pytest.mark.parametrize(("line", "message"), CHRONY_REJECTED)
def test_chrony_keys_rejected(line: str, message: str) -> None:
    kf = parse_keyfile(line + "\n", "chrony.keys", "chrony")
    assert [kf.describe(p) for p in kf.problems] == [f"chrony.keys:1: {message}"]


def test_duplicate_key_is_a_problem() -> None:
    kf = parse_keyfile("1 MD5 first\n1 MD5 second\n", "k", "ntp")
    assert [kf.describe(p) for p in kf.problems] == ["k:2: key 1 is defined again (first on line 1)"]
    assert kf.keys[1].secret == b"first"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_load_refuses_bad_lines_unless_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "ntp.keys", "1 MD5 good\n2 NOPE x\n3 SHA1\n")
    with pytest.raises(KeyFileError) as exc:
        load_keyfile(path, "ntp")
    assert str(exc.value) == (
        f"{path}: 2 bad line(s); refusing the file:\n"
        f"  {path}:2: key 2: unknown key type (expected one of {NTP_TYPES})\n"
        f"  {path}:3: key 3: expected a key type and a key after the key number"
    )
    assert list(load_keyfile(path, "ntp", allow_bad_lines=True).keys) == [1]


def test_load_refuses_files_others_can_read(tmp_path: Path) -> None:
    path = write(tmp_path / "ntp.keys", "1 MD5 good\n", 0o644)
    with pytest.raises(KeyFileError) as exc:
        load_keyfile(path, "ntp")
    assert str(exc.value) == f"{path} is accessible to others (mode 0644); run: chmod o-rwx {path}"
    with pytest.raises(KeyFileError, match="no such key file"):
        load_keyfile(tmp_path / "missing", "ntp")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to root or another user needs root")
def test_group_may_read_a_key_file_only_when_root_owns_it(tmp_path: Path) -> None:
    # Debian ships chrony's key file as 0640 root:_chrony; it must load unchanged.
    path = write(tmp_path / "chrony.keys", "1 SHA1 HEX:" + "ab" * 20 + "\n", 0o640)
    os.chown(path, 0, 0)
    assert list(load_keyfile(path, "chrony").keys) == [1]
    os.chown(path, 65534, -1)
    with pytest.raises(KeyFileError) as exc:
        load_keyfile(path, "chrony")
    assert str(exc.value) == (
        f"{path} is readable by its group but owned by uid 65534, not root (mode 0640); run: chmod 600 {path}"
    )
    os.chown(path, 0, -1)
    path.chmod(0o660)
    with pytest.raises(KeyFileError) as exc:
        load_keyfile(path, "chrony")
    assert str(exc.value) == f"{path} is writable by its group (mode 0660); run: chmod g-w {path}"


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [
        (0o600, 1000, None),
        (0o400, 1000, None),
        (0o700, 0, None),
        (0o640, 0, None),
        (0o440, 0, None),
        (0o640, 1000, "is readable by its group but owned by uid 1000, not root (mode 0640)"),
        (0o620, 0, "is writable by its group (mode 0620)"),
        (0o604, 0, "is accessible to others (mode 0604)"),
        (0o601, 1000, "is accessible to others (mode 0601)"),
        (0o602, 0, "is accessible to others (mode 0602)"),
    ],
)
def test_private_file_modes(mode: int, owner: int, problem: str | None) -> None:
    found = private_mode_problem(Path("k"), mode, owner)
    assert (found.split(";")[0].removeprefix("k ") if found else None) == problem


SECRET = "Zq7secretKEY9"  # a key's text, misplaced in every way a line can be broken


@pytest.mark.parametrize("fmt", ["ntp", "chrony"])
@pytest.mark.parametrize(
    "line",
    [
        SECRET,  # a key alone on a line (a wrapped long key, say)
        f"{SECRET} MD5 abc",
        f"1 {SECRET}",  # the type left out
        f"1 {SECRET} MD5",  # type and key swapped
        f"1 MD5 {SECRET} extra",
        f"1 SHA1 {SECRET}{SECRET}",  # too long for ASCII, not hex
        f"99999 MD5 {SECRET}",
        "1234567890123",  # a numeric key alone on a line
    ],
)
def test_rejected_lines_never_quote_their_fields(fmt: str, line: str) -> None:
    """Keys never appear in logs: a broken line's message names fields by position only."""
    keyfile = parse_keyfile(f"{line}\n", "keys", fmt)  # some of these are valid lines in chrony's format
    messages = [keyfile.describe(p) for p in (*keyfile.problems, *keyfile.warnings)]
    assert not [m for m in messages if SECRET[:6] in m or "1234567890123" in m]


def test_secret_files_are_checked_on_the_open_file_owner_and_directory_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0600 key owned by another user was accepted (that user could change it); a symbolic link was
    followed between the check and the read; a directory others may write to let them replace it."""
    from nts import files
    from nts.files import UnsafeFile, allow_owner, read_private_file

    monkeypatch.setattr(files, "_OWNERS", set(files._OWNERS))  # allow_owner below stays in this test

    key = tmp_path / "k"
    key.write_text("1 MD5 secret\n")
    key.chmod(0o600)
    assert read_private_file(key, 100) == b"1 MD5 secret\n"
    link = tmp_path / "link"
    link.symlink_to(key)
    with pytest.raises(UnsafeFile, match="is a symbolic link"):
        read_private_file(link, 100)
    os.chown(key, 65534, 65534)  # nobody (the tests run as root)
    with pytest.raises(UnsafeFile, match=r"belongs to uid 65534, not root or the user ntsd runs as"):
        read_private_file(key, 100)
    allow_owner(65534)  # the user the server drops to (ntp.user) may own it
    assert read_private_file(key, 100) == b"1 MD5 secret\n"
    os.chown(key, 0, 0)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "k").write_text("1 MD5 secret\n")
    (shared / "k").chmod(0o600)
    shared.chmod(0o777)
    with pytest.raises(UnsafeFile, match="writable by others, who could replace it"):
        read_private_file(shared / "k", 100)
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot replace another's file
    assert read_private_file(shared / "k", 100) == b"1 MD5 secret\n"


def test_a_key_file_in_the_other_format_says_which_format_it_is(tmp_path: Path) -> None:
    """`format: chrony` on an ntp.keys file listed its bad lines without saying why."""
    path = tmp_path / "ntp.keys"
    path.write_text("1 MD5 abcdefghij\n2 AES128CMAC 0123456789abcdef0123456789abcdef\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as exc:
        load_keyfile(path, "chrony")
    assert str(exc.value).endswith("\n  (the whole file reads as ntp format: set mac.format: ntp)")
    assert len(load_keyfile(path, "ntp").keys) == 2


def test_keys_convert_round_trips_and_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    """`ntsd keys convert`: ntp.keys to chrony's format (for chrony clients) and back, same keys."""
    from nts.cli import main
    from tests.mac_helpers import write_keys

    ntp, chrony = write_keys(tmp_path)  # (ntp.keys written, chrony's converted by the command)
    original = load_keyfile(ntp, "ntp").keys
    assert load_keyfile(chrony, "chrony").keys == original
    assert oct(chrony.stat().st_mode & 0o777) == "0o600"
    back = tmp_path / "back.keys"
    assert main(["keys", "convert", str(chrony), str(back), "--from", "chrony"]) == 0
    assert load_keyfile(back, "ntp").keys == original
    assert main(["keys", "convert", str(chrony), str(back), "--from", "chrony"]) == 1  # exists: --force
    big = tmp_path / "big.chrony"
    big.write_text("70000 AES128 HEX:" + "00" * 16 + "\n")
    big.chmod(0o600)
    assert main(["keys", "convert", str(big), str(tmp_path / "x.keys"), "--from", "chrony"]) == 1
    ntp.chmod(0o644)
    assert main(["keys", "convert", str(ntp), str(tmp_path / "y.chrony")]) == 1  # a secret others can read
    assert not (tmp_path / "y.chrony").exists()
