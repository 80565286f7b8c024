"""Parsing of human-written sizes and durations (pure).

``parse_size("512MB") == 512_000_000``; ``parse_size("1GiB") == 2**30``;
``parse_duration("10ms") == 0.01``; bare numbers are bytes / seconds.
Both raise ``ValueError`` with a sentence naming the accepted forms, which the
config converter turns into a key-path error.
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "parse_duration", "format_size"]

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Return a size in bytes from ``512MB``, ``1GiB``, ``4096`` (an int is bytes)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size like 512MB, 64KiB or a number of bytes, got {value!r}")


def parse_duration(value: object) -> float:
    """Return seconds from ``10ms``, ``5s``, ``2m``, ``1h`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 5s, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m and m.group(2).lower() in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ValueError(f"expected a duration like 10ms, 5s, 2m, 1h or a number of seconds, got {value!r}")


def format_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
