"""NTS key establishment: sans-IO session logic, the TLS listener and certificate handling."""
