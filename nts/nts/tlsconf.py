"""The one OpenSSL setting pyOpenSSL cannot make per context: no TLS session tickets.

Strategy: an NTS-KE client never resumes a TLS session (one handshake, one request, close), so
session tickets are work and bytes for nothing, and OpenSSL sends two after every TLS 1.3
handshake unless `SSL_CTX_set_num_tickets` says otherwise, which pyOpenSSL does not bind
(measured: about a tenth of an NTS-KE session's CPU with an EC certificate; chrony's server sends
none). OpenSSL applies the `system_default` section of its configuration file to every context it
creates, and reads that file once, as it initialises. So `apply()`, run by `nts/__init__.py`
before anything imports cryptography, points OPENSSL_CONF at ntsd's own file (`openssl.cnf`
beside this module: NumTickets = 0, nothing else), has OpenSSL initialise, and restores the
environment, so that no child process inherits the setting. An OPENSSL_CONF the operator set is
left alone; `note()` is the start-up line that says which configuration OpenSSL read.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

FILE = Path(__file__).with_name("openssl.cnf")
SYSTEM_POLICIES = (  # where distributions keep the system-wide OpenSSL policy
    Path("/etc/crypto-policies/back-ends/opensslcnf.config"),
    Path("/etc/ssl/openssl.cnf"),
    Path("/etc/pki/tls/openssl.cnf"),
)
ENV = "OPENSSL_CONF"

state = "not applied"  # "ours", "operator's", "too late" or "missing" once apply() ran


def apply() -> None:
    global state
    if state != "not applied":
        return
    if ENV in os.environ:
        state = "operator's"
        return
    if "cryptography.hazmat.bindings._rust" in sys.modules:  # OpenSSL read its configuration already
        state = "too late"
        return
    if not FILE.is_file():  # an installation without its data file (OpenSSL would go on without it)
        state = "missing"
        return
    os.environ[ENV] = str(FILE)
    try:
        from OpenSSL import SSL

        SSL.Context(SSL.TLS_METHOD)  # initialises libssl (and reads the file) if importing did not
    finally:
        del os.environ[ENV]
    state = "ours"


def note() -> str:
    """One line for the log: what OpenSSL's configuration means for NTS-KE's session tickets."""
    sent = "NTS-KE sends TLS session tickets"
    why = "(no NTS-KE client uses them)"
    if state == "operator's":
        unless = "unless its system_default section sets NumTickets = 0"
        return f"OpenSSL reads {os.environ.get(ENV)!r} (OPENSSL_CONF): {sent} {unless} {why}"
    if state == "too late":
        return f"OpenSSL was initialised before ntsd: {sent} {why}"
    if state == "missing":
        return f"{FILE} is missing from this installation: {sent} {why}"
    line = f"NTS-KE sends no TLS session tickets {why}"
    system = _library_config()
    if system is not None:  # a cryptography linked to the system's OpenSSL: say whose file was read
        line += f"; OpenSSL read {FILE} instead of {system} (set OPENSSL_CONF to read that file instead)"
    policy = next((p for p in SYSTEM_POLICIES if p.exists() and p != system), None)
    if policy is not None:  # a site's crypto policy that this OpenSSL does not read: say so
        line += (f"; the system's crypto policy ({policy}) does not apply to NTS-KE, which is TLS 1.3 only "
                 "with ntsd's own cipher suites (set OPENSSL_CONF to a file that includes it)")  # fmt: skip
    return line


def _library_config() -> Path | None:
    """The OpenSSL library's own configuration file, if it has one (a system library does)."""
    from OpenSSL import SSL

    found = re.search(rb'"(.*)"', SSL.OpenSSL_version(SSL.OPENSSL_DIR))
    if found is None:
        return None
    path = Path(os.fsdecode(found.group(1))) / "openssl.cnf"
    return path if path.is_file() else None
