"""Configuration: defaults, and broken files that must fail with file:line:key messages and status 2."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nts.config import DEFAULT_CONFIG, ConfigError, load_config, parse_config
from nts.server.plugin import discover, sections

BROKEN = [
    ('ntp:\n  listen: ["127.0.0.1:99999"]\n', "2: ntp.listen[0]: '127.0.0.1:99999': port must be 1 to 65535"),
    # str.isdigit() takes these; int() fails on the first and reads the second as 123 (found by fuzzing)
    ('ntp:\n  listen: ["127.0.0.1:\u00b9"]\n', "2: ntp.listen[0]: '127.0.0.1:\u00b9': port must be 1 to 65535"),
    (
        'ntp:\n  listen: ["127.0.0.1:\u0661\u0662\u0663"]\n',
        "2: ntp.listen[0]: '127.0.0.1:\u0661\u0662\u0663': port must be 1 to 65535",
    ),
    (
        "mac:\n  keys: k\n  networks:\n    \u00b9: [10.0.0.0/8]\n",
        "4: mac.networks.\u00b9: keys of mac.networks are key ids",
    ),
    (
        'ntp:\n  listen: ["::1:123"]\n',
        "2: ntp.listen[0]: '::1:123': a port is required (ADDRESS:PORT, or [ADDRESS]:PORT for IPv6)",
    ),
    ("ntp:\n  workers: 0\n", "2: ntp.workers: expected a whole number from 1 to 64"),
    (
        "access:\n  allow:\n    - 10.0.0.0/8\n    - 10.0.0.300/32\n",
        "4: access.allow[1]: '10.0.0.300/32' is not an IP address or CIDR network",
    ),
    ("access:\n  deny_action: reject\n", "2: access.deny_action: expected one of: kod, ignore"),
    ("rate_limit:\n  enabled: yes please\n", "2: rate_limit.enabled: expected true or false"),
    ("clock:\n  stratum: 16\n", "2: clock.stratum: expected a whole number from 1 to 15"),
    (
        "clock:\n  refid: GPS\n",
        "2: clock.refid: unknown key (expected one of: stratum, reference_id, local_reference, root_delay, "
        "root_dispersion)",
    ),
    ("log:\n  level: loud\n", "2: log.level: expected one of: debug, info, warning, error"),
    ("metrics:\n  listen: localhost:9975\n", "2: metrics.listen: 'localhost:9975': 'localhost' is not an IP address"),
    ("ntp: {workers: 1}\nntp: {workers: 2}\n", "2: ntp: duplicate key"),
    ("ntp:\n  listen: [\n", "3: not valid YAML: expected the node content, but found '<stream end>'"),
    ("- just\n- a list\n", "1: expected a mapping of keys to values"),
    ("ntp:\n  batch: 0\n", "2: ntp.batch: expected a whole number from 1 to 1024"),
    ("mssntp:\n  max_clients: 8\n", "2: mssntp.max_clients: expected a whole number from 16 to 10000000"),
    # values YAML itself cannot construct were tracebacks (found by fuzzing the config with atheris)
    ("ntp:\n  workers: !!foo 2\n", "2: ntp.workers: unsupported YAML tag !!foo"),
    ("ntp:\n  workers: !!int abc\n", "2: ntp.workers: 'abc' is not a valid !!int (quote it if it is text)"),
    (
        "rate_limit:\n  enabled: !!bool maybe\n",
        "2: rate_limit.enabled: 'maybe' is not a valid !!bool (quote it if it is text)",
    ),
    (
        "clock:\n  reference_id: 2001-02-30\n",
        "2: clock.reference_id: '2001-02-30' is not a valid !!timestamp (quote it if it is text)",
    ),
    ("mac: {keys: k, trusted: [1, !local 2]}\n", "1: mac.trusted[1]: unsupported YAML tag !local"),
    ("[" * 5000 + "]" * 5000, " not a usable config: collections nested too deeply"),
    (
        'nts: {certificate: c, private_key: k, key_dir: d, ntp_server: "a b"}\n',
        "1: nts.ntp_server: expected a host name or an IP address",
    ),
    (
        'nts: {certificate: c, private_key: k, key_dir: d, ntp_server: "-x.example"}\n',
        "1: nts.ntp_server: expected a host name or an IP address",
    ),
    (
        'nts: {certificate: c, private_key: k, key_dir: d, ntp_server: [a.example, "b c"]}\n',
        "1: nts.ntp_server[1]: expected a host name or an IP address",
    ),
    (
        "nts: {certificate: c, private_key: k, key_dir: d, ntp_server: []}\n",
        "1: nts.ntp_server: at least one NTP server is required (or null: none)",
    ),
    ("ntp:\n  max_hold_us: -1\n", "2: ntp.max_hold_us: expected a whole number from 0 to 100000"),
]
SECTIONS = sections(discover())


@pytest.mark.parametrize(("text", "message"), BROKEN)
def test_broken_config_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), SECTIONS)
    assert str(exc.value) == f"{path}:{message}"


def test_section_of_a_plugin_that_is_not_installed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ntp: {workers: 1}\nmssntp:\n  socket: /x\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), {})
    assert str(exc.value) == (
        f"{path}:2: mssntp: unknown section: no installed plugin provides it "
        "(sections: ntp, access, rate_limit, clock, log, metrics)"
    )


@pytest.mark.parametrize(("text", "message"), BROKEN[:4] + BROKEN[10:12])
def test_cli_exits_2_with_the_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        proc = subprocess.run([sys.executable, "-m", "nts", *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert proc.stderr == f"ntsd: {path}:{message}\n"
        assert "Traceback" not in proc.stderr


def test_missing_file_is_status_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nts", "check-config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"ntsd: {tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


def test_embedded_default_is_valid_and_serves_loopback() -> None:
    config = load_config(None, SECTIONS)
    assert config.ntp.listen == (("127.0.0.1", 123), ("::1", 123))
    assert "nts" in config.plugins
    assert config.metrics_listen == ("127.0.0.1", 9975)
    assert config.rate_limit is not None
    assert config.source == "<default>"
    assert parse_config(DEFAULT_CONFIG, "x", SECTIONS) == parse_config(DEFAULT_CONFIG, "x", SECTIONS)


def test_relative_paths_start_at_the_config_file_and_errors_name_file_line_key(tmp_path: Path) -> None:
    """Relative paths resolved against the working directory (under systemd: /) and errors about
    files named neither the line nor the key: `nts: cannot read /tmp/op/nope.pem`."""
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    (etc / "ntsd.yaml").write_text(
        'ntp: {listen: ["127.0.0.1:12300"]}\nnts:\n  listen: ["127.0.0.1:14460"]\n  certificate: tls/server.pem\n'
        "  private_key: tls/server.key\n  key_dir: tls\nmac:\n  keys: ntp.keys\n"
    )
    config = load_config(str(etc / "ntsd.yaml"), SECTIONS)
    assert config.plugins["nts"].certificate == etc / "tls" / "server.pem"
    assert config.plugins["mac"].keys == etc / "ntp.keys"
    proc = subprocess.run([sys.executable, "-m", "nts", "check-config", str(etc / "ntsd.yaml")],
                          capture_output=True, text=True, timeout=30, cwd=elsewhere)  # fmt: skip
    assert proc.returncode == 2
    assert f"ntsd: {etc / 'ntsd.yaml'}:8: mac.keys: {etc / 'ntp.keys'}: no such key file\n" in proc.stderr
    assert f"ntsd: {etc / 'ntsd.yaml'}:5: nts.private_key: private key {etc / 'tls/server.key'} " in proc.stderr


def test_the_embedded_default_reads_its_files_from_a_fixed_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its relative `certs/...` paths loaded secrets from whatever directory the server started in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTSD_DIR", str(tmp_path / "state"))
    nts = load_config(None, SECTIONS).plugins["nts"]
    assert (nts.certificate, nts.private_key, nts.key_dir) == (
        tmp_path / "state" / "server.pem", tmp_path / "state" / "server.key", tmp_path / "state")  # fmt: skip
    monkeypatch.delenv("NTSD_DIR")
    from nts.files import default_dir

    assert default_dir() == (Path("/var/lib/ntsd") if os.geteuid() == 0 else Path.home() / ".local/state/ntsd")
    assert load_config(None, SECTIONS).plugins["nts"].key_dir == default_dir()


def test_the_default_reference_id_is_an_address_and_names_at_stratum_2_are_warned_about() -> None:
    """`reference_id: KERN` at stratum 2: RFC 5905 wants an address there (loop detection)."""
    assert parse_config("", "t").clock.reference_id == bytes([127, 0, 0, 1])
    assert load_config(None, SECTIONS).clock.reference_id == bytes([127, 0, 0, 1])
    named = parse_config("clock:\n  stratum: 2\n  reference_id: GPS\n", "t.yaml")
    assert any(w.startswith("t.yaml:3: clock.reference_id: 'GPS' is a source name") for w in named.warnings)
    assert not parse_config("clock: {stratum: 1, reference_id: GPS}\n", "t").warnings
    v6 = parse_config("clock: {reference_id: '2001:db8::1'}\n", "t").clock.reference_id
    assert v6 == hashlib.md5(ipaddress.ip_address("2001:db8::1").packed).digest()[:4]
    assert not parse_config("clock: {reference_id: 192.0.2.1}\n", "t").warnings


def test_full_config_values() -> None:
    text = """
ntp: {listen: ["0.0.0.0:123", "[::]:123"], workers: 2, user: nobody, batch: 8, max_hold_us: 0}
access: {allow: [10.0.0.0/8, "2001:db8::/32"], deny: [10.9.0.0/16], deny_action: ignore, require_auth: [10.1.0.0/16]}
rate_limit: {rate: 0.5, burst: 4, max_clients: 5000, action: ignore, kod_interval: 2}
clock: {stratum: 3, reference_id: 192.0.2.1, root_delay: 0.001, root_dispersion: 0.002}
log: {level: warning, file: /var/log/ntsd.log}
metrics: {listen: "[::1]:9975"}
"""
    c = parse_config(text, "t")
    assert c.ntp.listen == (("0.0.0.0", 123), ("::", 123)) and c.ntp.workers == 2 and c.ntp.user == "nobody"
    assert c.ntp.batch == 8 and c.ntp.max_hold_us == 0
    assert c.access.deny_kod is False
    assert c.access.require_auth == (ipaddress.ip_network("10.1.0.0/16"),)
    assert c.rate_limit is not None and (c.rate_limit.rate, c.rate_limit.burst, c.rate_limit.kod) == (0.5, 4, False)
    assert c.clock.reference_id == bytes([192, 0, 2, 1])
    assert c.metrics_listen == ("::1", 9975)
    assert parse_config("rate_limit: {enabled: false}\n", "t").rate_limit is None
    assert parse_config("metrics: {listen: null}\n", "t").metrics_listen is None


def test_an_oversized_config_is_refused_not_cut(tmp_path: Path) -> None:
    """It was read up to 1 MiB and the rest ignored: a long deny list could lose its tail quietly."""
    path = tmp_path / "big.yaml"
    denied = "".join(f"    - 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n" for i in range(60_000))
    path.write_text("access:\n  deny:\n" + denied)
    assert path.stat().st_size > 1 << 20
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), SECTIONS)
    assert str(exc.value) == f"{path}: larger than 1048576 characters; not a configuration file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ntp: {user: nosuchuser}\n", "t:1: ntp.user: no such user 'nosuchuser' on this host"),
        ("ntp: {user: nobody, group: nosuchgroup}\n", "t:1: ntp.group: no such group 'nosuchgroup' on this host"),
        (
            "log: {file: /nonexistent/dir/ntsd.log}\n",
            "t:1: log.file: /nonexistent/dir does not exist (the log file's directory)",
        ),
        (
            "access: {allow: [10.0.0.1/8]}\n",
            "t:1: access.allow[0]: '10.0.0.1/8' has host bits set: write 10.0.0.0/8 for the network, or "
            + "10.0.0.1/32 for one address",
        ),
    ],
)
def test_what_serve_would_refuse_is_a_config_error_with_its_line(text: str, message: str) -> None:
    """check-config said OK to these and `serve` then failed (exit 1) or took a typo silently."""
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "t")
    assert str(exc.value) == message


def test_log_levels_in_any_case() -> None:
    assert parse_config("log: {level: INFO}\n", "t").log.level == parse_config("log: {level: info}\n", "t").log.level
