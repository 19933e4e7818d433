"""Wire formats: bytes <-> frozen dataclasses. No I/O, no clocks."""
