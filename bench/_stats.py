"""Percentiles and the shape of a figure (pure)."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["Figures", "pct"]


def pct(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; raises ValueError on no samples."""
    if not samples:
        raise ValueError("no samples")
    s = sorted(samples)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


class Figures:
    """Measured figures (name -> value, unit, raw samples) and skipped ones (name -> reason)."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}

    def add(self, name: str, value: float, unit: str, samples: list[float] | None = None, note: str = "") -> None:
        self.figures[name] = {"value": float(value), "unit": unit, "samples": list(samples or []), "note": note}

    def latency(self, prefix: str, samples_s: list[float], note: str = "") -> None:
        """p50 and p99 in ms from samples in seconds."""
        ms = [x * 1e3 for x in samples_s]
        self.add(f"{prefix}.p50", pct(ms, 50), "ms", ms, note)
        self.add(f"{prefix}.p99", pct(ms, 99), "ms", [], note)

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def value(self, name: str) -> float | None:
        f = self.figures.get(name)
        return None if f is None else f["value"]


def median(xs: list[float]) -> float:
    return statistics.median(xs)
