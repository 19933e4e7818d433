"""Legacy symmetric-key MAC authentication (RFC 5905 / RFC 8573) and the migration path to NTS."""
