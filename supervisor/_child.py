"""The supervision tree's view of an actor: ``CellChild`` adapts an ``ActorCell`` to the
child interface of ``_tree``; shared by the host, which builds the tree from the graph,
and the FBP protocol, which adds nodes to a running network."""

from __future__ import annotations

from typing import Any

import trio

from .core import policy as policy
from ._cell import ActorCell, ScriptLoadFailed
from .core.errors import ActorStopped
from ._tree import PermanentFailure

__all__ = ["CellChild", "bytes_path", "runtime_unavailable"]


class CellChild:
    """Adapts an ActorCell to the supervisor's child interface."""

    kind = "actor"

    def __init__(self, cell: ActorCell, restart_type: policy.RestartType):
        self.cell = cell
        self.name = cell.name
        self.restart_type = restart_type

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> str | None:
        try:
            return await self.cell.run(task_status=task_status)
        except ScriptLoadFailed as exc:
            raise PermanentFailure(str(exc)) from exc

    def interrupt(self) -> bool:
        """Kill the worker (for actor.restart): False if there is none to kill."""
        worker = self.cell.worker
        if worker is None:
            return False
        worker.kill()
        return True

    def on_stopped(self, error: BaseException | None) -> None:
        if error is not None:
            why = f": {error}"
        elif self.cell.exit_detail is not None:  # it stopped itself, and its restart type keeps it so
            why = (f": it exited normally ({self.cell.exit_detail}) and, being {self.restart_type.value}, "
                   "is not restarted" + ("" if self.restart_type is policy.RestartType.TEMPORARY
                                         else "; actor.restart starts it again"))
        elif self.restart_type is policy.RestartType.TEMPORARY:
            why = ": it was temporary and exited (temporary actors are never restarted)"
        else:
            why = ""
        self.cell.fail_queued(ActorStopped(f"actor {self.name!r} is not running{why}"))

    def status(self) -> dict:
        c = self.cell
        w = c.worker
        return {"name": c.name, "kind": "actor", "component": c.component.name, "restart": self.restart_type.value,
                "runtime": c.component.runtime, "tier": c.tier, "pid": w.pid if w else None,
                "pending": c.pending(), "processed": c.processed, "bytes": bytes_path(w)}


def bytes_path(worker: Any) -> str | None:
    """How bytes payloads reach this worker: "shared-memory" (with attachments below the
    threshold), "attachments" (raw on the channel), "base64" (a channel that carries only
    text, e.g. a microVM's stdio); None while it has no worker."""
    if worker is None:
        return None
    if getattr(worker, "shm", None) is not None:
        return "shared-memory"
    return "attachments" if getattr(worker, "ready_info", {}).get("attachments") is True else "base64"


def runtime_unavailable(runtime: str) -> str | None:
    """Why scripts of ``runtime`` cannot run on this machine, or None."""
    if runtime == "javascript":
        import shutil

        from ._sandbox._bubblewrap import runtime_dir  # (a lower module: kept lazy, as it was)

        if shutil.which("node") is None:
            return "Node.js is not installed (JavaScript actors need the node binary)"
        if not (runtime_dir() / "js" / "reflow_worker.js").exists():
            return "this build has no JavaScript runtime (supervisor/runtime/js)"
    return None
