import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import os
import shutil
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_dirs():  # type: ignore[no-untyped-def]
    """ntsd's default and runtime directories (/var/lib/ntsd, /run/ntsd for root) are the host's:
    every test, and every server it starts, uses directories of the test run's own instead."""
    base = tempfile.mkdtemp(prefix="ntsd-test-dirs-")
    saved = {k: os.environ.get(k) for k in ("NTSD_DIR", "RUNTIME_DIRECTORY")}
    os.environ["NTSD_DIR"] = os.path.join(base, "state")
    os.environ["RUNTIME_DIRECTORY"] = os.path.join(base, "run")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(base, ignore_errors=True)
