"""What ships with the package for operators: the sample configuration, the man page, the unit."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import legacy.mac
import mssntp.auth
import nts.config
import nts.nts.settings
from nts.cli import main

KEYS = {
    "ntp": nts.config._NTP,
    "access": nts.config._ACCESS,
    "rate_limit": nts.config._RATE,
    "clock": nts.config._CLOCK,
    "log": nts.config._LOG,
    "metrics": {"listen": None, "reports": None},
    "nts": nts.nts.settings._READERS,
    "mac": legacy.mac._READERS,
    "mssntp": mssntp.auth._READERS,
}
ALL_KEYS = [f"{section}.{key}" for section, keys in KEYS.items() for key in keys]


def printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_the_sample_configuration_passes_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = printed(["example-config"], capsys)
    assert main(["certs", "--dir", str(tmp_path)]) == 0  # server.pem and server.key beside the file
    (tmp_path / "ntsd.yaml").write_text(sample.replace("/var/lib/ntsd", str(tmp_path / "state")))
    (tmp_path / "state").mkdir(mode=0o700)
    capsys.readouterr()
    assert main(["check-config", str(tmp_path / "ntsd.yaml")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ntp listen: 0.0.0.0:123, [::]:123" in out and "nts-ke listen: 0.0.0.0:4460, [::]:4460" in out
    # the commented sections are valid too, once uncommented
    enabled = re.sub(r"^# (mac|mssntp):$", r"\1:", sample, flags=re.M)
    enabled = re.sub(r"^#   ", "  ", enabled, flags=re.M).replace("/var/lib/ntsd", str(tmp_path / "state"))
    keys = tmp_path / "ntp.keys"
    assert main(["keygen", str(keys)]) == 0
    (tmp_path / "all.yaml").write_text(enabled)
    capsys.readouterr()
    assert main(["check-config", str(tmp_path / "all.yaml")]) == 0, capsys.readouterr().err


def test_the_sample_shows_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    sample = printed(["example-config"], capsys)
    section = ""
    seen = set()
    for line in sample.splitlines():
        text = line[2:] if re.match(r"# (\w+:|  \w+:)", line) else line  # a commented section or its key
        if m := re.match(r"^(\w+):", text):
            section = m.group(1)
        elif m := re.match(r"^ {2}(?:# )?(\w+):", text):
            seen.add(f"{section}.{m.group(1)}")
    assert sorted(set(ALL_KEYS) - seen) == []


def test_the_man_page_renders_and_names_every_command_and_key(capsys: pytest.CaptureFixture[str]) -> None:
    page = printed(["manpage"], capsys)
    groff = shutil.which("groff")
    assert groff, "groff is needed to render the man page (Debian: groff-base)"
    rendered = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-rHY=0", "-rLL=250n"], input=page,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    text = re.sub(r"\s+", " ", re.sub(r".\x08", "", rendered.stdout))  # plain text (no overstrike), one line
    assert "ntsd - NTS, NTP, legacy MAC and MS-SNTP time server" in text
    missing = [key for key in ALL_KEYS if key not in text]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["--help"])
    commands = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out)
    assert commands is not None
    for command in commands.group(1).split(","):
        assert f"ntsd {command}" in text, command
