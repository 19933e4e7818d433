"""nts.nts.tlsconf: which OpenSSL configuration a process ends up with, and what its start-up line says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHOW = "import nts.nts.tlsconf as t; t.apply(); print(t.state); print(t.note())"


def run(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_ntsd_reads_its_own_file_and_children_do_not_inherit_it() -> None:
    state, note = run(SHOW + "; import os; print(os.environ.get('OPENSSL_CONF'))")[:2]
    assert state == "ours"
    assert note.startswith("NTS-KE sends no TLS session tickets")
    assert run("import nts, os; print(os.environ.get('OPENSSL_CONF'))") == ["None"]


def test_importing_the_packages_has_no_side_effects() -> None:
    """Importing the core, the wire layer, the NTS package and the CLI neither touches the environment
    nor initialises OpenSSL; only the commands do (before anything else reads OpenSSL's configuration)."""
    code = (
        "import os, sys, nts, nts.wire.packet, nts.core.pipeline, nts.nts.plugin, nts.cli, nts.nts.tlsconf as t"
        "; print(t.state, os.environ.get('OPENSSL_CONF'))"
    )
    assert run(code) == ["not applied None"]
    code = (
        "import nts.cli, nts.nts.tlsconf as t\n"
        "try:\n    nts.cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(t.state)"
    )
    assert run(code)[-1] == "ours"


def test_an_operators_openssl_conf_is_left_alone(tmp_path: Path) -> None:
    conf = tmp_path / "op.cnf"
    conf.write_text("\n")
    state, note = run(SHOW, OPENSSL_CONF=str(conf))
    assert state == "operator's"
    assert note.startswith(f"OpenSSL reads '{conf}' (OPENSSL_CONF): NTS-KE sends TLS session tickets unless")


def test_too_late_when_openssl_was_initialised_first() -> None:
    state, note = run("import cryptography.hazmat.bindings._rust; " + SHOW)
    assert state == "too late"
    assert "sends TLS session tickets" in note


def test_the_file_is_shipped_beside_the_module() -> None:
    from nts.nts import tlsconf

    text = tlsconf.FILE.read_text()
    assert "NumTickets = 0" in text and "system_default" in text


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_an_in_memory_handshake_brings_no_ticket(tmp_path: Path, kind: str) -> None:
    """The setting reaches the contexts ntsd builds: after the client's Finished, the server has nothing to say."""
    code = f"""
import json
import nts.nts.tlsconf
nts.nts.tlsconf.apply()
from pathlib import Path
from OpenSSL import SSL
from nts.nts.certs import build_context
from nts.nts.devcerts import make_dev_certs
c = make_dev_certs(Path({str(tmp_path)!r}), ["localhost"], kind={kind!r})
server = SSL.Connection(build_context(c.certificate, c.private_key)[0]); server.set_accept_state()
ctx = SSL.Context(SSL.TLS_CLIENT_METHOD); ctx.set_alpn_protos([b"ntske/1"])
client = SSL.Connection(ctx); client.set_connect_state()
sent = []
for _ in range(4):
    for end in (client, server):
        try:
            end.do_handshake()
        except SSL.WantReadError:
            pass
    for a, b in ((client, server), (server, client)):
        try:
            data = a.bio_read(65536)
        except SSL.WantReadError:
            data = b""
        b.bio_write(data) if data else None
        sent.append(len(data))
print(json.dumps(sent))
"""
    sent = json.loads(run(code)[0])
    # each round: client to server, server to client: the hello, the server's flight, the client's Finished
    assert sent[0] > 0 and sent[3] > 0 and sent[4] > 0, sent
    assert sent[7] == 0, sent  # and after the client's Finished, no NewSessionTicket


def test_a_missing_file_is_said_and_changes_nothing() -> None:
    module = Path(__file__).parents[2] / "nts" / "nts" / "tlsconf.py"
    code = (  # the module on its own, before anything imported OpenSSL (the package's __init__ would)
        "import importlib.util, os, pathlib"
        f"; spec = importlib.util.spec_from_file_location('alone', {str(module)!r})"
        "; t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)"
        "; t.FILE = pathlib.Path('/nonexistent/openssl.cnf'); t.apply()"
        "; print(t.state); print(t.note()); print(os.environ.get('OPENSSL_CONF'))"
    )
    state, note, env = run(code)
    assert state == "missing" and env == "None"
    assert note.startswith("/nonexistent/openssl.cnf is missing from this installation: NTS-KE sends TLS session")


def test_a_system_crypto_policy_that_is_not_read_is_said(tmp_path: Path) -> None:
    policy = tmp_path / "opensslcnf.config"
    policy.write_text("[crypto_policy]\n")
    code = (
        f"import pathlib, nts.nts.tlsconf as t; t.SYSTEM_POLICIES = (pathlib.Path({str(policy)!r}),)"
        "; t.apply(); print(t.note())"
    )
    (note,) = run(code)
    assert f"the system's crypto policy ({policy}) does not apply to NTS-KE" in note
    code = "import pathlib, nts.nts.tlsconf as t; t.SYSTEM_POLICIES = (pathlib.Path('/nonexistent'),); t.apply()"
    assert "crypto policy" not in run(code + "; print(t.note())")[0]
