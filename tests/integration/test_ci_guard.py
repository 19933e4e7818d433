"""The test command refuses to stop time daemons that serve on the machine (it pkills chronyd)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def guard(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / ".ci" / "serving-daemons")], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})  # fmt: skip


def test_a_serving_chronyd_makes_the_suite_refuse(tmp_path: Path) -> None:
    """`bash .ci/run`, the README's test command, pkilled chronyd: on a real time server that stops
    the clock discipline. A daemon that is not the tests' own (no /tmp/ in its command line) stops it."""
    fake = tmp_path / "chronyd"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    daemon = subprocess.Popen(["chronyd", "60"], executable=str(fake))  # command line "chronyd 60", like a real one
    try:
        refused = guard({"NTSD_CI_STOP_DAEMONS": "0"})
        assert refused.returncode == 3
        assert f"ci:   {daemon.pid} chronyd 60" in refused.stderr
        assert "--stop-daemons" in refused.stderr
        assert guard({"NTSD_CI_STOP_DAEMONS": "1"}).returncode == 0
    finally:
        daemon.kill()
        daemon.wait()
    assert guard({"NTSD_CI_STOP_DAEMONS": "0"}).returncode == 0
