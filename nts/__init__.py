"""ntsd: an NTS-KE and NTP server with legacy MAC and MS-SNTP authenticators."""

__version__ = "0.1.0"
