"""Sandbox backends: bubblewrap (namespaces), microsandbox (microVM), process (none)."""

from __future__ import annotations

from ._base import ExitInfo, SandboxBackend, SandboxUnavailable, Worker, WorkerSpec, WorkerStartError

__all__ = ["ExitInfo", "SandboxBackend", "SandboxUnavailable", "Worker", "WorkerSpec", "WorkerStartError",
           "select_backend"]


def select_backend(name: str) -> SandboxBackend:
    """The backend named in the config; ``auto`` = microsandbox if a microVM boots, else bubblewrap.

    Raises SandboxUnavailable with what to install when nothing can run.
    """
    from ._bubblewrap import BubblewrapBackend
    from ._process import ProcessBackend

    if name == "process":
        return ProcessBackend()
    if name == "bubblewrap":
        b = BubblewrapBackend()
        b.check()
        return b
    if name in ("auto", "microsandbox"):
        try:
            from ._microsandbox import MicrosandboxBackend
        except ImportError as exc:
            if name == "microsandbox":
                raise SandboxUnavailable(f"the microsandbox backend is not available: {exc}") from exc
        else:
            ms = MicrosandboxBackend()
            reason = ms.probe()
            if reason is None:
                return ms
            if name == "microsandbox":
                raise SandboxUnavailable(f"microsandbox cannot boot a microVM here: {reason}")
        b = BubblewrapBackend()
        b.check()
        return b
    raise SandboxUnavailable(f"unknown sandbox backend {name!r}")
