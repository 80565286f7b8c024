"""The components this package ships (CONTRACT §7): ``core/Repeat``, ``core/Drop``,
``core/Output``. They are ordinary script actors (``core/*.actor.py``), read by the
same static discovery and run in the same sandboxes as a workspace's; their
component name is their directory and actor name, ``core/Repeat``."""

from __future__ import annotations

import functools
from pathlib import Path

import attrs

__all__ = ["package_components"]

ROOT = Path(__file__).resolve().parent


@functools.cache
def package_components() -> dict:
    """``{"core/Repeat": ComponentSpec, …}``; a script here that does not read is a bug of
    this package, so it raises rather than being skipped."""
    from .._scan import discover

    found = discover(ROOT, ["*/*.actor.py"], [], [], discover_scripts=True)
    if found.problems:
        raise RuntimeError("; ".join(str(p) for p in found.problems))
    out = {}
    for comp in found.components:
        library = comp.file.parent.name
        out[f"{library}/{comp.name}"] = attrs.evolve(comp, name=f"{library}/{comp.name}")
    return out
