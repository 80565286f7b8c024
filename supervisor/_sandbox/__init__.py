"""Sandbox backends: bubblewrap (namespaces), microsandbox (microVM), process (none)."""

from __future__ import annotations

import logging

from ._base import ExitInfo, SandboxBackend, SandboxUnavailable, Worker, WorkerSpec, WorkerStartError

__all__ = ["ExitInfo", "SandboxBackend", "SandboxUnavailable", "Worker", "WorkerSpec", "WorkerStartError",
           "select_backend"]

log = logging.getLogger("supervisor.sandbox")


def select_backend(name: str) -> SandboxBackend:
    """The backend named in the config; ``auto`` = microsandbox if a microVM boots, else bubblewrap.

    Logs at info which backend and isolation tier it chose and why. For ``auto``
    the microVM probe's verdict is remembered on disk (see
    ``MicrosandboxBackend.probe``), so only the first start on a machine pays
    for a test boot. Blocks while it probes: call it from a thread under trio.

    Raises SandboxUnavailable with what to install when nothing can run.
    """
    from ._bubblewrap import BubblewrapBackend
    from ._process import ProcessBackend

    if name == "process":
        return _chosen(ProcessBackend(), "configured by name")
    if name == "bubblewrap":
        b = BubblewrapBackend()
        b.check()
        return _chosen(b, "configured by name")
    if name in ("auto", "microsandbox"):
        try:
            from ._microsandbox import MicrosandboxBackend
        except ImportError as exc:
            if name == "microsandbox":
                raise SandboxUnavailable(f"the microsandbox backend is not available: {exc}") from exc
            why = f"microsandbox is not installed ({exc})"
        else:
            ms = MicrosandboxBackend()
            reason = ms.probe()
            if reason is None:
                return _chosen(ms, f"a test microVM booted ({ms.probe_note()})")
            if name == "microsandbox":
                raise SandboxUnavailable(f"microsandbox cannot boot a microVM here: {reason}")
            why = f"microVM probe failed: {reason}; {ms.probe_note()}"
        b = BubblewrapBackend()
        b.check()
        return _chosen(b, why)
    raise SandboxUnavailable(f"unknown sandbox backend {name!r}")


def _chosen(backend: SandboxBackend, why: str) -> SandboxBackend:
    log.info("using %s (%s) — %s", backend.name, backend.tier, why,
             extra={"backend": backend.name, "tier": backend.tier})
    return backend
