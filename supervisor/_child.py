"""The supervision tree's view of an actor: ``CellChild`` adapts an ``ActorCell`` to the
child interface of ``_tree``; shared by the host, which builds the tree from the graph,
and the FBP protocol, which adds nodes to a running network."""

from __future__ import annotations

from typing import Any

import trio

from .core import policy as policy
from ._cell import ActorCell, ScriptLoadFailed
from ._cluster import StartedOnce
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
        """Run the cell while this host holds its process's lease (CONTRACT §6).

        Held elsewhere, the child counts as started (its supervisor goes on with its
        siblings, as the process runs on another host) and waits for the lease. A lease lost
        mid-run (taken over, or handed to a host that joined) cancels the run; that is no
        failure of the actor, so it waits for the lease again instead of returning to its
        supervisor, whose restart intensity it would otherwise spend."""
        own = self.cell.ownership
        started = StartedOnce(task_status)
        while True:
            if not own.held:
                started.started()
                await own.wait_held()
            own.stopped = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    own.run_scope = scope
                    if not own.held:  # (lost between the wait and here)
                        continue
                    try:
                        return await self.cell.run(task_status=started)
                    except ScriptLoadFailed as exc:
                        raise PermanentFailure(str(exc)) from exc
                    except Exception:
                        if own.held:
                            raise
                        # (a write refused as Fenced as the lease went: the loss, not a crash)
            finally:
                own.run_scope = None
                own.stopped.set()
            self.cell.moved(own.lost_reason or "its lease moved to another host")

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
        own = c.ownership
        holder = own.holder
        out = {"name": c.name, "kind": "actor", "component": c.component.name, "restart": self.restart_type.value,
               "runtime": c.component.runtime, "tier": c.tier, "pid": w.pid if w else None,
               "pending": c.pending(), "processed": c.processed, "bytes": bytes_path(w),
               "host": holder.host if holder is not None else None,
               "fence": holder.fence if holder is not None else None}
        if not own.held:
            # (a finer state than its supervisor's "running": it runs on another host, or
            # waits for a host that may own it)
            out["state"] = "remote" if holder is not None else "unplaced"
        return out


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
