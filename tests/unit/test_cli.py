"""The command line: mistakes in arguments are usage errors with a message, never tracebacks."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from nts.cli import main
from nts.client import QueryError, _interpret, run_query
from nts.nts.devcerts import make_dev_certs, subject_alt_name
from nts.wire.ke_records import Record, RecordType
from tests.helpers import need


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("ntp.example.org", x509.DNSName("ntp.example.org")),
        ("NTP.Example.ORG", x509.DNSName("ntp.example.org")),
        ("*.example.org", x509.DNSName("*.example.org")),
        ("\u00e9.example", x509.DNSName("xn--9ca.example")),  # internationalised: its ASCII form
    ],
)
def test_certificate_names_accepted(name: str, expected: x509.GeneralName) -> None:
    assert subject_alt_name(name) == expected


@pytest.mark.parametrize("name", ["", "a b", "-bad.example", "bad-.example", "a" * 64 + ".example", "a." * 127 + "a"])
def test_certificate_names_refused_with_a_message(name: str) -> None:
    with pytest.raises(ValueError, match=r"is neither an IP address nor a usable DNS name"):
        subject_alt_name(name)


def test_certs_command_refuses_a_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was a traceback from the X.509 builder (found by trying the commands with bad arguments)."""
    assert main(["certs", "--dir", str(tmp_path / "c"), "--name", "a b"]) == 2
    assert "ntsd: 'a b' is neither an IP address nor a usable DNS name" in capsys.readouterr().err
    assert not (tmp_path / "c" / "server.key").exists()


def test_a_long_first_name_still_makes_a_certificate(tmp_path: Path) -> None:
    """X.509 caps the common name at 64 characters; the name goes in the alternative names only."""
    long_name = ".".join(["a" * 60] * 3)
    certs = make_dev_certs(tmp_path, [long_name])
    cert = x509.load_pem_x509_certificate(certs.certificate.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [long_name]


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "::1", "--plain", "--port", "70000"],  # was an OverflowError traceback
        ["query", "::1", "--port", "0"],
        ["query", "::1", "--ke-port", "-1"],
        ["query", "::1", "--count", "0"],
        ["certs", "--days", "0"],
    ],
)
def test_numbers_out_of_range_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "invalid number from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("ca", "message"),
    [
        ("/nonexistent/ca.pem", "CA file /nonexistent/ca.pem does not exist (or is not a file)"),
        ("/", "CA file / does not exist (or is not a file)"),
    ],
)
def test_query_with_an_unusable_ca_file(ca: str, message: str) -> None:
    """Was an OpenSSL.SSL.Error traceback."""
    with pytest.raises(QueryError, match=f"^{re.escape(message)}$"):
        run_query("127.0.0.1", ke_port=1, ca=Path(ca))


def test_query_with_a_ca_file_that_holds_no_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "not-a-ca.pem"
    ca.write_text("hello\n")
    with pytest.raises(QueryError, match=r"^cannot use .* as CA certificates: no certificate or crl found"):
        run_query("127.0.0.1", ke_port=1, ca=ca)


def _serve_once(answer: bytes, pause: float = 0.0) -> int:
    """A one-connection TCP server on loopback that reads a request and sends `answer` (a byte at a
    time, `pause` seconds apart, when given)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):  # the client may hang up first
                conn.recv(4096)
                if not pause:
                    conn.sendall(answer)
                for i in range(len(answer) if pause else 0):
                    conn.sendall(answer[i : i + 1])
                    time.sleep(pause)

    threading.Thread(target=run, daemon=True).start()
    return int(listener.getsockname()[1])


OK = b"HTTP/1.0 200 OK\r\n\r\n"


@pytest.mark.parametrize(
    ("command", "answer", "message"),
    [
        ("clients", OK + b'[1, 2, {"x": 1}]', "not a clients report (unexpected JSON)"),  # was a TypeError
        ("clients", OK + b"[" * 100_000, "not a clients report (nested too deeply)"),  # was a RecursionError
        ("clients", OK + b"\xff\xfe", "unexpected answer: not UTF-8 text"),
        ("status", OK + b"\xff\xfe", "unexpected answer: not UTF-8 text"),  # was a UnicodeDecodeError
        ("status", OK + b"<html>hello</html>", "no counters in what 127.0.0.1:"),
        ("status", b"SSH-2.0-OpenSSH_9.2\r\n", "unexpected answer: SSH-2.0-OpenSSH_9.2"),
    ],
)
def test_status_and_clients_pointed_at_something_else(
    command: str, answer: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _serve_once(answer)
    assert main([command, "--metrics", f"127.0.0.1:{port}"]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("host", ["a\x00b", "a b", "-x.example", ""])
def test_query_refuses_an_ntp_host_the_server_names_badly(tmp_path: Path, host: str) -> None:
    """The NTPv4 Server record comes from the server: a NUL in it was a ValueError (exit 2) later."""
    records = [
        Record(True, RecordType.NEXT_PROTOCOL, b"\0\0"), Record(True, RecordType.AEAD_ALGORITHM, b"\0\x0f"),
        Record(False, RecordType.NEW_COOKIE, bytes(100)), Record(True, RecordType.NTPV4_SERVER, host.encode()),
    ]  # fmt: skip
    certificate = x509.load_pem_x509_certificate(make_dev_certs(tmp_path, ["localhost"]).certificate.read_bytes())
    with pytest.raises(QueryError, match=r"^the server named an NTP host that is not a host name or address"):
        _interpret(records, certificate)


def test_status_gives_up_on_an_answer_that_trickles(capsys: pytest.CaptureFixture[str]) -> None:
    """Each read had a time-out, the answer as a whole none: a byte every second held `ntsd status`."""
    port = _serve_once(OK + b"ntsd_requests_total 1\n" * 10, pause=0.5)
    assert main(["status", "--metrics", f"127.0.0.1:{port}"]) == 1
    assert "no complete answer in time" in capsys.readouterr().err  # the whole answer's deadline, not a read's


def test_reference_ids_are_logged_as_operators_write_them() -> None:
    from nts.server.serving import _refid

    assert _refid(b"LOCL") == "LOCL"
    assert _refid(b"GPS\0") == "GPS"
    assert _refid(bytes([192, 0, 2, 1])) == "192.0.2.1"  # stratum 2+: the upstream's address
    assert _refid(b"\0\0\0\0") == "0.0.0.0"
    assert _refid(b"A\nB\0") == "65.10.66.0"  # never a control character in the log


def test_gauges_keep_every_digit() -> None:
    from nts.server.metrics import parse_text, render

    gauges = {"uptime_seconds": 1_234_567.891, "expiry": 1_796_223_389.0, "leap": 0, "ratio": 0.1}
    text = render({}, gauges)
    assert "ntsd_expiry 1796223389\n" in text and "ntsd_uptime_seconds 1234567.891\n" in text
    assert parse_text(text) == {f"ntsd_{k}": v for k, v in gauges.items()}


def test_counters_in_microseconds_are_served_in_seconds() -> None:
    """Prometheus's base unit (promtool refuses `_us`); the pipeline counts whole microseconds."""
    from nts.server.metrics import parse_text, render

    text = render({("mssntp_sign_delay_us",): 1_234_567, ("requests",): 3}, {})
    assert "# TYPE ntsd_mssntp_sign_delay_seconds_total counter\n" in text
    assert parse_text(text) == {"ntsd_mssntp_sign_delay_seconds_total": 1.234567, "ntsd_requests_total": 3}


def test_check_config_looks_at_what_the_sections_point_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ExecStartPre=ntsd check-config must catch what `serve` would refuse: a missing certificate, a
    broken key file, an unusable key directory (it said OK to all of them); and it binds nothing."""
    certs = make_dev_certs(tmp_path / "certs", ["localhost"], days=5)
    keys = tmp_path / "ntp.keys"
    keys.write_text("1 MD5 abcdefghij\n")
    keys.chmod(0o600)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))  # the running server's port: checking must not need it
    port = busy.getsockname()[1]

    def check(nts_cert: Path, key_text: str, key_dir: Path) -> tuple[int, str, str]:
        keys.write_text(key_text)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f'nts: {{listen: ["127.0.0.1:{port}"], certificate: {nts_cert}, private_key: {certs.private_key}, '
            f"key_dir: {key_dir}}}\nmac: {{keys: {keys}}}\n"
            f"mssntp: {{socket: {tmp_path / 'no-signd'}, networks: [127.0.0.0/8]}}\n"
        )
        code = main(["check-config", str(cfg)])
        out = capsys.readouterr()
        return code, out.out, out.err

    with busy:
        code, out, err = check(certs.certificate, "1 MD5 abcdefghij\n", tmp_path / "keys")
        assert (code, err) == (0, "")
        assert "warning: nts: certificate CN=localhost expires in 4 days" in out
        assert "warning: mac: MD5/SHA1 keys in use, key ids 1" in out
        assert f"warning: mssntp: {tmp_path / 'no-signd'} does not exist (yet)" in out
        assert not (tmp_path / "keys").exists()  # nothing created
        code, out, err = check(certs.certificate, "# only comments, as Debian installs chrony.keys\n", tmp_path / "k")
        assert (code, err) == (0, "")
        assert f"warning: mac: {keys} holds no keys: every MAC request gets a crypto-NAK" in out
        code, out, err = check(tmp_path / "gone.pem", "1 MD5 abcdefghij\nfoo\n", keys / "sub")  # under a file
        assert code == 2 and out == ""
        assert f"nts.certificate: cannot read {tmp_path / 'gone.pem'}: No such file or directory" in err
        assert "mac.keys: " in err and "ntp.keys:2: the first field is not a key number" in err
        assert f"nts.key_dir: {keys / 'sub'}: the master secret cannot be created there" in err
        assert all(line.startswith(f"ntsd: {tmp_path / 'c.yaml'}:") for line in err.splitlines() if "ntsd" in line)


def test_check_secret_reads_without_creating(tmp_path: Path) -> None:
    from nts.nts.cookies import MASTER_FILE, check_secret, load_or_create_secret

    assert check_secret(tmp_path / "new") is None and not (tmp_path / "new").exists()
    load_or_create_secret(tmp_path / "new")
    assert check_secret(tmp_path / "new") is None
    (tmp_path / "new" / MASTER_FILE).write_text("not hex\n")
    assert check_secret(tmp_path / "new") == f"{tmp_path / 'new' / MASTER_FILE}: not a hex-encoded secret"
    (tmp_path / "new" / MASTER_FILE).chmod(0o644)
    assert "is accessible to others (mode 0644)" in (check_secret(tmp_path / "new") or "")


def test_the_shipped_systemd_unit_verifies_and_is_hardened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The unit ran everything as root (systemd-analyze security: 9.6 UNSAFE); the shipped one runs as a
    service user with CAP_NET_BIND_SERVICE alone and systemd's sandboxing."""
    analyze = need("systemd-analyze")
    assert main(["systemd-unit", "--ntsd", sys.executable]) == 0
    unit = tmp_path / "ntsd.service"
    unit.write_text(capsys.readouterr().out)
    text = unit.read_text()
    assert f"ExecStart={sys.executable} serve --config /etc/ntsd/ntsd.yaml" in text
    for line in (
        "User=ntsd",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert line in text.splitlines()
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True)
    exposure = float(re.search(r"Overall exposure level for ntsd.service: ([\d.]+)", security.stdout).group(1))  # type: ignore[union-attr]
    assert exposure <= 2.0, security.stdout


def test_certs_keeps_an_existing_ca_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ntsd certs` overwrote an existing CA silently (every client trusting it broke)."""
    assert main(["certs", "--dir", str(tmp_path)]) == 0
    ca = (tmp_path / "ca.pem").read_bytes()
    capsys.readouterr()
    assert main(["certs", "--dir", str(tmp_path)]) == 0  # the quick start may be run again
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert "already holds a development CA and certificate: kept (--force makes new ones" in capsys.readouterr().err
    assert main(["certs", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca


def test_query_refuses_a_key_log_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It printed five `Exception ignored from cffi callback` tracebacks and exited 0."""
    missing = tmp_path / "nonexistent" / "k"
    assert main(["query", "127.0.0.1", "--keylog", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"ntsd: cannot write the TLS key log {missing}: No such file or directory\n"


def test_query_says_what_a_kiss_o_death_means(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A KoD printed offset and delay, exited 1 and said nothing on stderr."""
    from tests.helpers import free_port, lab_config, running_ntsd

    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, extra="access: {allow: [10.0.0.0/8]}\n")):
        assert main(["query", "127.0.0.1", "--plain", "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "ntsd: the server answered with a Kiss-o'-Death, RSTR: access restricted\n"


def test_an_empty_file_is_not_silently_plain_ntp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty file (or /dev/null) was "OK" and served plain NTP without NTS without a word."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["check-config", "--config", str(empty)]) == 0  # (--config, as serve takes it)
    out = capsys.readouterr().out
    assert "warning: the file sets nothing: ntsd serves plain NTP only" in out and "without NTS" in out


def test_status_takes_a_host_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`--metrics localhost:9975` was refused ("not an IP address")."""
    if socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost resolves to ::1 first here (the stand-in server listens on 127.0.0.1)")
    port = _serve_once(OK + b"ntsd_requests_total 7\n")
    assert main(["status", "--metrics", f"localhost:{port}"]) == 0
    assert "7" in capsys.readouterr().out
    assert main(["status", "--metrics", "no-such-host.invalid:9975"]) == 2
    assert "cannot resolve 'no-such-host.invalid'" in capsys.readouterr().err


def test_query_count_shows_every_sample_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--count 3` printed only the last sample."""
    from tests.helpers import free_port, lab_config, running_ntsd

    port = free_port()
    with running_ntsd(tmp_path, lab_config(port)):
        assert main(["query", "127.0.0.1", "--plain", "--port", str(port), "--count", "3"]) == 0
        out = capsys.readouterr().out
        assert [line.split(":")[0] for line in out.splitlines()[:3]] == ["sample 1", "sample 2", "sample 3"]
        fields = dict(line.split(None, 1) for line in out.splitlines()[3:])
        assert fields["samples"] == "3"
        low, mid, high = (float(fields[k].split()[0]) for k in ("offset_min", "offset", "offset_max"))
        assert low <= mid <= high
        assert main(["query", "127.0.0.1", "--plain", "--port", str(port), "--count", "2", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["samples"] == 2 and len(doc["each"]) == 2
        assert doc["delay"] == pytest.approx(sum(e["delay"] for e in doc["each"]) / 2, abs=2e-9)  # the median of two


def test_query_timeout_is_the_operators(capsys: pytest.CaptureFixture[str]) -> None:
    """There was no --timeout: a silent server always cost 3 s per sample."""
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()
        code = main(["query", "127.0.0.1", "--plain", "--port", str(silent.getsockname()[1]), "--timeout", "0.2"])
        assert code == 1 and time.monotonic() - started < 2.5
        assert "within 0.2 s" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", "127.0.0.1", "--timeout", "0"])


def test_clients_without_a_mac_section_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It printed `unexpected answer: HTTP/1.0 404 Not Found` and exited 1."""
    from tests.helpers import free_port, lab_config, running_ntsd

    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport).replace("metrics: {listen:", "metrics: {reports: true, listen:")
    with running_ntsd(tmp_path, config):
        assert main(["clients", "--metrics", f"127.0.0.1:{mport}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ntsd: no mac section configured: the server at 127.0.0.1:{mport} keeps no clients report")
    assert "404" not in err


def test_check_config_summary_names_what_serves_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The summary said `authenticator section: nts` and nothing of the addresses, certificate or keys."""
    from nts.nts.devcerts import make_dev_certs
    from tests.mac_helpers import write_keys

    certs = make_dev_certs(tmp_path / "certs", ["localhost"])
    ntp_keys, _ = write_keys(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        'ntp: {listen: ["127.0.0.1:12300"]}\n'
        f'nts: {{listen: ["127.0.0.1:14460"], certificate: {certs.certificate}, private_key: {certs.private_key}, '
        f"key_dir: {tmp_path}}}\nmac: {{keys: {ntp_keys}, trusted: [4, 6]}}\n"
    )
    assert main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "  nts-ke listen: 127.0.0.1:14460 (AEADs AES-SIV-CMAC-256" in out
    assert re.search(r"  nts certificate: CN=localhost, expires \d{4}-\d\d-\d\d \d\d:\d\dZ \(in \d+ days\)", out), out
    assert f"  mac keys: 6 from {ntp_keys} (AES-128-CMAC 1, AES-256-CMAC 1, MD5 1, SHA1 1, SHA256 1, SHA512 1; " in out
    assert "trusted: ids 4, 6)" in out
