"""The supervision tree's trio shell: run children, report exits, apply decisions.

Every decision is made by the pure :func:`supervisor.core.policy.decide`; this
module only starts and cancels child tasks and sleeps through backoff. A
child is anything with ``name``, ``run(task_status=...)`` and ``status()``:
an :class:`~supervisor._cell.ActorCell` wrapper or another :class:`Supervisor`.

A child's exit is *normal* when its ``run`` returns (it may return a string saying
how, shown in status as ``last_exit``) and *abnormal* when it raises; a stop this
shell asked for (OTP's ``shutdown``: a sibling's restart, a removal, the host
stopping) is neither and never reaches the policy.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from .core import policy as policy
from .core.errors import single_error
from ._watch import cause_details

__all__ = ["Supervisor", "SupervisorGaveUp", "NotRunning", "Child"]

log = logging.getLogger("supervisor.tree")


class SupervisorGaveUp(Exception):
    """A supervisor exceeded its restart intensity and failed to its parent."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"supervisor {name!r} gave up: {reason}")
        self.name = name
        self.reason = reason


class NotRunning(Exception):
    """The supervisor is not running (it gave up, or its own parent is restarting it)."""

    def __init__(self, name: str):
        super().__init__(f"supervisor {name!r} is not running")
        self.name = name


class PermanentFailure(Exception):
    """A child failure that restarting cannot fix (e.g. a script that does not load).

    The child is marked failed and left stopped; it does not count toward intensity.
    """


class Child(Protocol):
    name: str
    restart_type: policy.RestartType

    async def run(self, *, task_status: Any = ...) -> str | None: ...

    def status(self) -> dict: ...

    def on_stopped(self, error: BaseException | None) -> None: ...


class _StartSignal:
    """A task_status whose ``started()`` just sets an event (the child may fail before it)."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


class _Node:
    def __init__(self, child: Child):
        self.child = child
        self.state = "stopped"
        self.restarts = 0
        self.started_at: float | None = None
        self.last_error: dict | None = None
        self.scope: trio.CancelScope | None = None
        self.exited = trio.Event()
        self.timer: trio.CancelScope | None = None
        self.last_exit: dict | None = None        # how its last run ended: {"reason", "message", "at"}
        self.last_restart_cause: str | None = None
        self.requested = False                    # killed for actor.restart: its exit is not a failure
        self.starts = 0                           # runs started (each _start that got as far as started)


def error_info(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "at": time.time(), **cause_details(exc)}


class Supervisor:
    """An OTP-style supervisor of child tasks.

    ``run`` starts the children in order and returns only when cancelled; when
    its policy says give up it raises :class:`SupervisorGaveUp` (after stopping
    every child) so that its own parent can decide.
    """

    kind = "supervisor"
    # Told of every change of a child's state: (event, this supervisor, the child's node or
    # None for the supervisor itself). Set by the API's watchers (_watch.Watchers.attach).
    notify: Callable[[str, Supervisor, _Node | None], None] | None = None

    def __init__(self, name: str, pol: policy.Policy, children: Sequence[Child], *,
                 restart_type: policy.RestartType = policy.RestartType.PERMANENT,
                 rng: random.Random | None = None):
        self.name = name
        self.policy = pol
        self.restart_type = restart_type
        self._nodes = {c.name: _Node(c) for c in children}
        self._rng = rng or random.Random()
        self.state = "stopped"
        self.restarts = 0
        self.last_error: dict | None = None
        self.started_at: float | None = None
        self._nursery: trio.Nursery | None = None
        self._events: trio.MemorySendChannel | None = None
        self._last_exited: str | None = None
        self._runs = 0
        # Set (and replaced) whenever a child's start ends, a child is stopped or removed, or
        # this supervisor stops: what restart_child waits on (see _progressed).
        self._progress = trio.Event()

    # -- introspection ----------------------------------------------------
    def children(self) -> list[Child]:
        return [n.child for n in self._nodes.values()]

    def status(self) -> dict:
        out = {"name": self.name, "kind": "supervisor", "strategy": self.policy.strategy.value,
               "state": self.state, "restarts": self.restarts, "last_error": self.last_error,
               "uptime": _uptime(self.started_at), "children": []}
        for node in self._nodes.values():
            st = node.child.status()
            if node.state != "running" or "state" not in st:
                # A running child may report a finer state of its own: a supervisor's (e.g.
                # failed), an actor's that runs on another host ("remote", see CellChild).
                st["state"] = node.state
            st.update(restarts=node.restarts, last_error=node.last_error or st.get("last_error"),
                      last_exit=node.last_exit, last_restart_cause=node.last_restart_cause,
                      uptime=_uptime(node.started_at))
            out["children"].append(st)
        return out

    def on_stopped(self, error: BaseException | None) -> None:
        for node in self._nodes.values():
            node.child.on_stopped(error)

    def find(self, name: str) -> Any:
        for node in self._nodes.values():
            if node.child.name == name:
                return node.child
            if isinstance(node.child, Supervisor):
                found = node.child.find(name)
                if found is not None:
                    return found
        return None

    def parent_of(self, name: str) -> Supervisor | None:
        """The supervisor (this one or below) whose direct child is ``name``."""
        if name in self._nodes:
            return self
        for node in self._nodes.values():
            if isinstance(node.child, Supervisor):
                found = node.child.parent_of(name)
                if found is not None:
                    return found
        return None

    # -- changes while running (hot reload) --------------------------------
    async def add_child(self, child: Child) -> None:
        """Add a child at the end of the start order and start it (OTP's start_child)."""
        self._nodes[child.name] = _Node(child)
        if self._nursery is not None:
            self._pstate, _ = policy.decide(self._pstate, policy.ChildAdded(child.name, child.restart_type))
            await self._start(child.name)

    async def remove_child(self, name: str) -> None:
        """Stop a child and forget it (OTP's terminate_child + delete_child)."""
        await self._stop(name)
        if self._nursery is not None:
            self._pstate, _ = policy.decide(self._pstate, policy.ChildRemoved(name))
        node = self._nodes.pop(name, None)
        if node is not None:
            node.child.on_stopped(None)
            self._progressed()

    async def replace_child(self, name: str) -> None:
        """Stop a child and start it again on purpose (new code): not a failure, so it
        counts neither as a restart nor against the restart intensity."""
        node = self._nodes[name]
        await self._stop(name)
        node.last_error = None
        if self._nursery is not None:
            await self._start(name)

    async def restart_child(self, name: str) -> None:
        """Restart a direct child now, whatever its restart type and state (OTP's
        ``restart_child``, for ``actor.restart``): one that runs is interrupted (its work in
        hand fails as in a crash) and started again; one that is stopped, failed or backing
        off is started at once. Counted as a restart, not toward the intensity.

        Returns once the new incarnation runs (or its start ended: a start that fails is
        the policy's, as any failure), so that whatever is sent to the child after this
        returned reaches the new incarnation, never the one being interrupted. Cancelled
        meanwhile, the restart still happens.

        Raises:
            KeyError: no such child.
            NotRunning: this supervisor is not running, so it cannot start anything.
        """
        node = self._nodes[name]
        if self._nursery is None or self._pstate.failed:
            raise NotRunning(self.name)
        interrupt = getattr(node.child, "interrupt", None)
        if node.scope is not None and interrupt is not None and interrupt():
            node.requested = True  # its exit comes back through run's loop, which starts it again
            # The old run lives on until it sees its worker die: answering now would let a
            # message sent after the answer reach that run, and fail with the kill.
            starts = node.starts
            while not (node.starts != starts                  # started again (or its start ended)
                       or self._nodes.get(name) is not node   # removed meanwhile (hot reload)
                       or self._nursery is None               # this supervisor stopped or gave up
                       or (node.scope is None and not node.requested and node.state == "stopped")):
                # (the last: a stop overtook the kill, and nothing starts it again)
                await self._progress.wait()
            if self._nursery is None:
                raise NotRunning(self.name)
            return
        await self._stop(name)
        self._pstate, actions = policy.decide(self._pstate, policy.RestartRequested(name, time.monotonic()))
        for action in actions:
            await self._apply(action, cause="actor.restart", inline=True)  # (answered once it runs)

    # -- the task ---------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._pstate = policy.initial_state(self.policy,
                                            [(n, node.child.restart_type) for n, node in self._nodes.items()])
        self._runs += 1
        if self._runs > 1:
            # Our parent restarted us: every child gets a new incarnation, which is a restart
            # of it too, whatever its own history.
            gave_up = self.state == "failed" and self.last_error  # (its last run's end, if it gave up)
            why = f"supervisor {self.name!r} restarted" + (f" ({self.last_error['message']})" if gave_up else "")
            for node in self._nodes.values():
                node.restarts += 1
                node.last_restart_cause = why
        send, recv = trio.open_memory_channel[tuple[str, BaseException | None, str | None]](float("inf"))
        self._events = send
        self.state = "starting"
        self.started_at = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for name in list(self._nodes):
                    await self._start(name)
                self.state = "running"
                task_status.started()
                async for name, error, how in recv:
                    node = self._nodes.get(name)
                    if node is None:
                        continue
                    if node.requested:  # killed for actor.restart (see restart_child)
                        node.requested = False
                        self._pstate, actions = policy.decide(self._pstate,
                                                              policy.RestartRequested(name, time.monotonic()))
                        for action in actions:
                            await self._apply(action, cause="actor.restart")
                        continue
                    abnormal = error is not None
                    if isinstance(error, PermanentFailure):
                        node.state = "failed"
                        node.last_error = error_info(error)
                        node.child.on_stopped(error)
                        self._tell("failed", node)
                        log.error("%s", error, extra={"actor": name, "supervisor": self.name})
                        continue
                    self._last_exited = name
                    if abnormal:
                        node.last_error = error_info(error)
                        log.error("child failed", exc_info=error,
                                  extra={"child": name, "supervisor": self.name})
                    else:
                        log.info("child exited normally: %s", how or "returned",
                                 extra={"child": name, "supervisor": self.name})
                    self._tell("exited", node)
                    self._pstate, actions = policy.decide(self._pstate, policy.ChildExited(
                        name, abnormal, time.monotonic(), jitter_u=self._rng.uniform(-1, 1),
                        reason=str(error) if error else "normal"))
                    what = "failed" if abnormal else "exited normally"
                    for action in actions:
                        await self._apply(action, cause=what, trigger=name)
        except SupervisorGaveUp:
            self.state = "failed"
            raise
        except BaseExceptionGroup as group:
            error = single_error(group)
            if isinstance(error, SupervisorGaveUp):
                self.state = "failed"
                raise error from None
            raise
        finally:
            if self.state != "failed":
                self.state = "stopped"
            self._nursery = None
            self._progressed()

    def _progressed(self) -> None:
        """Wake whoever waits for a child to start, stop or leave (restart_child)."""
        self._progress.set()
        self._progress = trio.Event()

    async def _apply(self, action: Any, *, cause: str = "", trigger: str | None = None,
                     inline: bool = False) -> None:
        """Carry out one action. ``cause`` says why, for status: the trigger's own restart
        gets it as is; a sibling restarted with it (one_for_all, rest_for_one) is told it
        was that sibling, under which strategy. ``inline``: a restart without delay starts
        its children before this returns (not from run's loop, which must not wait)."""
        if isinstance(action, policy.Escalate):
            self.last_error = {"type": "SupervisorGaveUp", "message": action.reason, "at": time.time()}
            for name in reversed(list(self._nodes)):
                await self._stop(name)
            if self._last_exited in self._nodes:
                self._nodes[self._last_exited].state = "failed"
            err = SupervisorGaveUp(self.name, action.reason)
            self._tell("gave_up", None)
            # Not on_stopped() here: our parent decides whether we come back; messages
            # wait in the mailboxes until it does, or fail when the root gives up.
            log.error("%s", err, extra={"supervisor": self.name})
            raise err
        if isinstance(action, policy.Restart):
            for name in action.stop_order:
                await self._stop(name)
            for name in action.children:
                node = self._nodes[name]
                node.restarts += 1
                node.last_restart_cause = cause if trigger in (None, name) else \
                    f"sibling {trigger!r} {cause} ({self.policy.strategy.value})"
                node.state = "backing-off" if action.delay > 0 else "restarting"
                self._tell("restarting", node)
            self.restarts += 1
            assert self._nursery is not None
            if inline and not action.delay:
                for name in action.children:
                    await self._start(name)
                return
            self._nursery.start_soon(self._restart_later, action.children, action.delay)
            return
        child = getattr(action, "child", None)
        if child in self._nodes:
            node = self._nodes[child]
            await self._stop(child)
            node.state = "stopped"
            node.child.on_stopped(None)
            if isinstance(action, policy.Remove):
                del self._nodes[child]
            self._progressed()

    async def _restart_later(self, names: tuple[str, ...], delay: float) -> None:
        with trio.CancelScope() as timer:
            for name in names:
                self._nodes[name].timer = timer
            await trio.sleep(delay)
            for name in names:
                if name in self._nodes:
                    await self._start(name)

    async def _start(self, name: str) -> None:
        node = self._nodes[name]
        if node.scope is not None:
            return  # already running
        again = node.state in ("restarting", "backing-off")
        node.state = "starting"
        node.requested = False  # (a kill for actor.restart that a stop overtook: this run is new)
        node.exited = trio.Event()
        signal = _StartSignal()
        node.scope = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._child_task, node, node.scope, signal)
        await signal.event.wait()
        if node.scope is not None:
            node.state = "running"
            node.started_at = time.monotonic()
            self._pstate, _ = policy.decide(self._pstate, policy.ChildStarted(name, node.started_at))
            self._tell("restarted" if again else "started", node)
        node.starts += 1
        self._progressed()

    async def _child_task(self, node: _Node, scope: trio.CancelScope, signal: _StartSignal) -> None:
        error: BaseException | None = None
        how: str | None = None
        with scope:
            try:
                how = await node.child.run(task_status=signal)  # returned: a normal exit
            except Exception as exc:  # a child's failure is data for the policy, not ours
                error = exc
        intentional = scope.cancel_called
        node.scope = None
        node.started_at = None
        signal.event.set()
        node.exited.set()
        if not intentional and self._events is not None:
            node.last_exit = {"reason": "error" if error is not None else "normal",
                              "message": str(error) if error is not None else (how or "returned"), "at": time.time()}
            if error is None:
                node.state = "stopped"
            self._events.send_nowait((node.child.name, error, how))

    async def _stop(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            return
        if node.timer is not None:
            node.timer.cancel()
            node.timer = None
        running = node.scope is not None
        if running:
            node.scope.cancel()
            await node.exited.wait()
            # (A kill for actor.restart that this stop overtook: the exit is ours, so no
            # event comes back to run's loop and nothing of the request is left to do.)
            node.requested = False
        node.state = "stopped"
        if running:
            self._tell("stopped", node)
        self._progressed()

    def _tell(self, event: str, node: _Node | None) -> None:
        if self.notify is not None:
            self.notify(event, self, node)

    async def stop_children(self) -> None:
        """Stop every child in reverse start order (as OTP does at shutdown)."""
        for name in reversed(list(self._nodes)):
            child = self._nodes[name].child
            if isinstance(child, Supervisor):
                await child.stop_children()
            await self._stop(name)


def _uptime(started_at: float | None) -> float | None:
    return None if started_at is None else round(time.monotonic() - started_at, 3)
