"""ntsd: an NTS-KE and NTP server with legacy MAC and MS-SNTP authenticators.

Importing any part of it has no side effects: OpenSSL's configuration is applied by the commands
that serve or query (`nts.cli`), before anything initialises OpenSSL.
"""

__version__ = "0.1.0"
