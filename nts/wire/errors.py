"""The one parse-error family.

Every parser in the project raises ParseError (a ValueError) and nothing else for bad input; the
property tests hold every parser to that. `code` is a short, stable reason usable as a metrics label.
"""

from __future__ import annotations


class ParseError(ValueError):
    """Malformed protocol input. `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
