"""ntsd: an NTS-KE and NTP server with legacy MAC and MS-SNTP authenticators."""

from . import tlsconf

tlsconf.apply()  # before anything else initialises OpenSSL: it reads its configuration once

__version__ = "0.1.0"
