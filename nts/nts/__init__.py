"""NTS (RFC 8915) as a plugin on the association core.

Strategy: everything NTS lives here and reads like `legacy/` and `mssntp/`: `aead` and `nettle`
(the AEADs), `cookies` (the key ring and cookie seal), `packets` (NTS-protected NTP: verify a
request, seal its reply), `ke_session` (NTS-KE, sans-IO), `ke_listener` (the TLS shell around it),
`certs` and `devcerts` (certificates), `tlsconf` (OpenSSL's configuration), `settings` and
`plugin` (the `nts` config section and the plugin class). Nothing here is imported by the core.
"""
