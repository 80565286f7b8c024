"""The host: assembles Redis, the pools, the supervision tree and the API.

``Host.main`` is the root task of ``python -m supervisor run``::

    Host nursery
    ├── embedded redis-server (unless redis.url)     _redis.serve_embedded_redis
    ├── Redis client (reader tasks)                  _redis.open_redis
    ├── Cluster (leases, host record, Pub/Sub)       _cluster.Cluster.run
    ├── WorkerPool (warm sandboxes, refill)          _pool.WorkerPool.serve
    ├── Supervisor "root" → Supervisor "network" → one ActorCell per process
    └── WebSocket API                                _server.serve_api
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import trio

from .core import policy as policy
from ._cell import ActorCell
from ._child import CellChild, runtime_unavailable
from ._cluster import LOCAL, Cluster, ClusterRefused, Forwarder, labels_of
from .core.messages import NOTHING_TO_COMMIT, Commit, Envelope, ProcessSpec, new_message_id
from ._mailbox import done_cmds, enqueue_cmd, enqueue_if_room_cmd, entry_body
from .core.config import Config
from .core.keys import Keys
from ._scan import discover
from .core.discovery import ComponentSpec, Discovery, ScriptProblem
from .core.errors import (ActorError, ActorFailed, ActorRemoved, ActorStopped, HostError, InvalidParams, Overloaded,
                          UnknownActor)
from ._files import write_atomic
from ._fanin import assemble, push_cmd, push_if_room_cmd
from ._outbox import Relay, outbox_cmd
from ._packages import PackageInstallFailed, ensure_packages
from ._pool import WorkerPool
from .core.protocol import wrap
from ._reload import plan_reload, watch_scripts
from ._redis import Fenced, RedisError, RedisUnavailable, open_redis, serve_embedded_redis
from ._sandbox import select_backend
from ._sandbox._base import SandboxBackend, SandboxUnavailable, WorkerSpec
from ._server import serve_api
from ._tree import NotRunning, Supervisor, SupervisorGaveUp

__all__ = ["Host"]

log = logging.getLogger("supervisor.host")


class _Started:
    """A task_status whose ``started()`` sets an event."""

    def __init__(self, event: trio.Event):
        self.event = event

    def started(self, value: object = None) -> None:
        self.event.set()


def _policy_from(sup_cfg: Any) -> policy.Policy:
    b = sup_cfg.backoff
    return policy.Policy(strategy=policy.Strategy(sup_cfg.strategy), max_restarts=sup_cfg.max_restarts,
                         max_seconds=sup_cfg.max_seconds, backoff_min=b.min, backoff_max=b.max,
                         jitter=b.jitter, reset_after=b.reset)


class Host:
    def __init__(self, config: Config, *, extra_scripts: Sequence[str] = (),
                 backend: SandboxBackend | None = None):
        self.config = config
        self.extra_scripts = tuple(extra_scripts)
        self.backend = backend
        self.discovery: Discovery | None = None
        self.cells: dict[str, ActorCell] = {}
        self.unavailable: dict[str, str] = {}   # component name -> why it cannot run
        self.routes: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
        self._fan_in: dict[str, dict[str, collections.deque]] = {}
        self._fan_in_locks: dict[str, trio.Lock] = {}
        self.root: Supervisor | None = None
        # (ask, done) while the tree has given up: restart_actor sets ask, _run_root sets done
        self._revive: tuple[trio.Event, trio.Event] | None = None
        self.pool: WorkerPool | None = None
        self.redis: Any = None
        # Where everything lives in Redis; its layout is known once connected (core.keys).
        self.keys = Keys(config.workspace.redis.namespace)
        self.relay: Relay | None = None  # routes across slots, in a Redis Cluster (see _outbox)
        self.url: str | None = None
        self.started = trio.Event()
        self.watching = trio.Event()
        self.package_dirs: dict[str, str] = {}  # runtime -> host dir of its installed packages
        self._reported: set[str] = set()
        self._trial_reported: set[str] = set()
        self.stopping = False
        self.durable = config.workspace.mailbox.kind == "redis"
        self.api: Any = None  # the WebSocket API (_server.Api) once it serves
        self.cluster: Cluster | None = None  # this host's leases and view of the others, once Redis is up
        self.forwarder: Forwarder | None = None  # requests for processes other hosts own

    # -- assembly -----------------------------------------------------------
    def rediscover(self) -> Discovery:
        """Read the workspace's scripts now (nothing of them runs)."""
        ws = self.config.workspace
        scripts = [*ws.scripts, *self.extra_scripts]
        return discover(ws.root, ws.script_patterns, ws.excluded_paths, scripts, discover_scripts=ws.discover_scripts)

    def discover(self) -> Discovery:
        self.discovery = self.rediscover()
        for p in self.discovery.problems:
            log.error("script not loaded: %s", p)
        self._reported = {str(p) for p in self.discovery.problems}
        return self.discovery

    async def apply_reload(self, found: Discovery) -> None:
        """Bring the running processes in line with a fresh discovery (hot reload)."""
        assert self.discovery is not None
        for p in found.problems:
            if str(p) not in self._reported:
                log.error("script not reloaded: %s", p)
        self._reported = {str(p) for p in found.problems}
        plan = plan_reload(self.discovery.components, found)
        for comp in plan.kept:
            log.warning("%s keeps running its previous code until %s reads again", comp.name, comp.file.name)
        # Code that does not load (a JavaScript syntax error, a failing import…) is found by
        # loading it in a throwaway worker first: it never replaces code that runs.
        running = {c.name: c for c in self.discovery.components}
        components = {c.name: c for c in plan.components}
        replace, problems = [], list(found.problems)
        for comp in plan.replace:
            cells = self._cells_of(comp.name)
            why = await ActorCell(self._process_spec(cells[0].name, comp, None), self).trial_load() if cells else None
            if why is None:
                replace.append(comp)
                continue
            m = re.search(r"line (\d+)", why)
            problems.append(ScriptProblem(comp.file, int(m.group(1)) if m else 0, why))
            components[comp.name] = running[comp.name]
            if why not in self._trial_reported:
                log.error("script not reloaded, %s keeps its previous code: %s", comp.name, why)
        self._trial_reported = {p.message for p in problems[len(found.problems):]}
        self.discovery = Discovery(tuple(components.values()), tuple(problems))
        for comp in plan.stop:
            for cell in self._cells_of(comp.name):
                log.info("stopping %s: its script is gone", cell.name)
                await self._remove_cell(cell)
            self.unavailable.pop(comp.name, None)
        for comp in replace:
            for cell in self._cells_of(comp.name):
                log.info("restarting %s on the new code of %s", cell.name, comp.file.name)
                await self._replace_cell(cell, comp)
        for comp in plan.start:
            await self._start_component(comp)
        if getattr(self, "fbp", None) is not None:  # FBP clients hear of new and changed components
            self.fbp.components_changed([*plan.start, *replace])

    def new_cell(self, spec: ProcessSpec) -> ActorCell:
        """A process's cell, registered, holding (once the cluster runs) its lease's ownership."""
        cell = ActorCell(spec, self)
        self.cells[spec.name] = cell
        if self.cluster is not None:
            self._own(cell)
        return cell

    def _own(self, cell: ActorCell) -> None:
        assert self.cluster is not None
        cell.ownership = self.cluster.ownership(cell.name, labels_of(self.config.supervision.actors, cell.name))

    def _cells_of(self, component: str) -> list[ActorCell]:
        return [c for c in self.cells.values() if c.component.name == component]

    async def _remove_cell(self, cell: ActorCell) -> None:
        await self._drain(cell)
        parent = self.root.parent_of(cell.name) if self.root else None
        if parent is not None:
            await parent.remove_child(cell.name)
        self.cells.pop(cell.name, None)
        if self.cluster is not None:
            self.cluster.forget(cell.name)
        self._fan_in.pop(cell.name, None)
        self._fan_in_locks.pop(cell.name, None)

    async def _replace_cell(self, cell: ActorCell, comp: ComponentSpec) -> None:
        net = self.config.network
        net_config = net.processes[cell.name].config if net is not None and cell.name in net.processes else None
        await self._drain(cell)
        cell.process = self._process_spec(cell.name, comp, net_config)
        if comp.await_all_inports and cell.name not in self._fan_in:
            self._fan_in[cell.name] = {p: collections.deque() for p in comp.inports}
        elif not comp.await_all_inports:
            self._fan_in.pop(cell.name, None)
        parent = self.root.parent_of(cell.name) if self.root else None
        if parent is not None:
            await parent.replace_child(cell.name)

    async def _start_component(self, comp: ComponentSpec) -> None:
        if self.config.network is not None:
            log.info("new actor %s is not in the network: not started", comp.name)
            return
        why = runtime_unavailable(comp.runtime)
        if why is not None:
            self.unavailable[comp.name] = why
            log.error("actor %s cannot run: %s", comp.name, why)
            return
        try:
            await self._ensure_packages(comp.runtime)
        except HostError as exc:
            self.unavailable[comp.name] = str(exc)
            log.error("actor %s cannot run: %s", comp.name, exc)
            return
        self.unavailable.pop(comp.name, None)
        network = self.root.find("network") if self.root else None
        if network is None or self.pool is None:
            return
        spec = self._process_spec(comp.name, comp, None)
        self.pool.add_runtime(comp.runtime, self._worker_specs([spec])[comp.runtime])
        cell = self.new_cell(spec)
        if comp.await_all_inports:
            self._fan_in[spec.name] = {p: collections.deque() for p in comp.inports}
        log.info("starting new actor %s from %s", comp.name, comp.file.name)
        await network.add_child(CellChild(cell, policy.RestartType(spec.restart)))

    async def _drain(self, cell: ActorCell) -> None:
        """Let the message in hand finish (bounded by shutdown_grace) before a stop."""
        with trio.move_on_after(self.config.supervision.shutdown_grace):
            while cell.current is not None:  # polled: reloads are rare, cells stay simple
                await trio.sleep(0.02)

    def plan(self) -> list[ProcessSpec]:
        """The processes to run: the network's, or one per discovered component."""
        assert self.discovery is not None
        from .components import package_components  # core/Repeat … (a graph may name them)

        comps = {**package_components(), **{c.name: c for c in self.discovery.components}}
        net = self.config.network
        specs: list[ProcessSpec] = []
        problems: list[str] = []
        if net is None:
            items = [(c.name, c.name, None) for c in self.discovery.components]
        else:
            items = [(name, p.component, p.config) for name, p in net.processes.items()]
        for name, comp_name, net_config in items:
            comp = comps.get(comp_name)
            why = runtime_unavailable(comp.runtime) if comp is not None else None
            if why is not None:
                assert comp is not None
                self.unavailable[comp.name] = why
                log.error("actor %s cannot run: %s", comp.name, why)
                if net is not None:
                    problems.append(f"network.processes.{name}.component: {comp.name} cannot run: {why}")
                continue
            if comp is None:
                found = ", ".join(sorted(c.name for c in self.discovery.components)) or "none"
                problems.append(f"network.processes.{name}.component: unknown component {comp_name!r}"
                                f" (discovered: {found})")
                continue
            specs.append(self._process_spec(name, comp, net_config))
        if net is not None:
            by_name = {s.name: s for s in specs}
            for i, conn in enumerate(net.connections):
                tgt = by_name.get(conn.tgt.process)
                if tgt is not None and not tgt.component.dynamic_ports and conn.tgt.port not in tgt.component.inports:
                    problems.append(f"network.connections[{i}].tgt.port: {tgt.component.name} has no inport "
                                    f"{conn.tgt.port!r} (inports: {', '.join(tgt.component.inports)})")
                src = by_name.get(conn.src.process) if conn.src is not None else None
                if src is not None and not src.component.dynamic_ports and conn.src.port not in (
                        *src.component.outports, "error"):
                    problems.append(f"network.connections[{i}].src.port: {src.component.name} has no outport "
                                    f"{conn.src.port!r} (outports: {', '.join(src.component.outports)})")
                if conn.src is not None:
                    self.routes[(conn.src.process, conn.src.port)].append((conn.tgt.process, conn.tgt.port))
        if problems:
            raise HostError("\n".join(problems))
        return specs

    def _process_spec(self, name: str, comp: ComponentSpec, net_config: dict | None) -> ProcessSpec:
        ov = self.config.supervision.actors.get(name)
        config = dict(net_config) if net_config is not None else dict((ov.config if ov else None) or {})
        return ProcessSpec(
            name=name, component=comp, config=config,
            restart=ov.restart if ov else "permanent",
            timeout=(ov.timeout if ov and ov.timeout is not None else comp.timeout),
            max_deliveries=ov.max_deliveries if ov else 5,
            memory=(ov.memory if ov and ov.memory else comp.memory))

    def _build_tree(self, specs: list[ProcessSpec]) -> Supervisor:
        sup = self.config.supervision
        children = []
        for spec in specs:
            cell = self.new_cell(spec)
            if spec.component.await_all_inports:
                self._fan_in[spec.name] = {p: collections.deque() for p in spec.component.inports}
            children.append(CellChild(cell, policy.RestartType(spec.restart)))
        # Groups nest supervisors with their own policies under "network".
        grouped: dict[str, Supervisor] = {}
        for gname, g in sup.groups.items():
            members = [c for c in children if c.name in g.members]
            grouped[gname] = Supervisor(gname, _policy_from(g), members)
        in_group = {m for g in sup.groups.values() for m in g.members}
        top = [c for c in children if c.name not in in_group] + list(grouped.values())
        network = Supervisor("network", _policy_from(sup), top)
        return Supervisor("root", _policy_from(sup), [network])

    def _worker_specs(self, specs_needed: list[ProcessSpec]) -> dict[str, WorkerSpec]:
        sb = self.config.workspace.sandbox
        needed = {p.component.runtime for p in specs_needed}
        specs = {}
        for rt, rc in (("python", sb.python), ("javascript", sb.javascript)):
            if rt not in needed:
                continue
            specs[rt] = WorkerSpec(runtime=rt, memory=rc.memory, cpu=rc.cpu, cpu_seconds=sb.cpu_seconds,
                                   max_processes=sb.max_processes, tmp_size=sb.tmp_size, max_output=sb.max_output,
                                   packages=self.package_dirs.get(rt),
                                   # shared memory is capped by the worker's memory (a quarter per ring)
                                   shm_size=min(sb.shm_size, rc.memory // 4) if rt == "python" else 0,
                                   shm_threshold=sb.shm_threshold)
        return specs

    async def _ensure_packages(self, runtime: str) -> None:
        """Install the runtime's ``packages:`` once (cached under .reflow/packages)."""
        rc = getattr(self.config.workspace.sandbox, runtime)
        if not rc.packages or runtime in self.package_dirs:
            return
        try:
            where = await ensure_packages(self.config.workspace.state_dir, runtime, rc.packages)
        except PackageInstallFailed as exc:
            raise HostError(str(exc)) from None
        if where is not None:
            self.package_dirs[runtime] = str(where)

    # -- the API's view -----------------------------------------------------
    def cell(self, name: Any) -> ActorCell:
        """The process a request names: a process name; else (Reflow's ``process`` call sends
        the component's name) a component that one process runs, or "component:process".

        Raises:
            UnknownActor: nothing of that name.
            InvalidParams: a component that several processes run: which one is meant
                cannot be told (a process named after its component is always chosen).
        """
        if isinstance(name, str):
            cell = self.cells.get(name)
            if cell is not None:
                return cell
            comp, _, proc = name.partition(":")
            cell = self.cells.get(proc) if proc else None
            if cell is not None and cell.component.name == comp:
                return cell
            of = [c for c in self.cells.values() if c.component.name == comp]
            if len(of) == 1:
                return of[0]
            if of:
                names = ", ".join(c.name for c in of)
                raise InvalidParams(f"{name!r} names component {comp}, which runs as {len(of)} processes "
                                    f"({names}): name one of them, e.g. {of[0].name!r} or "
                                    f"'{comp}:{of[0].name}'", {"actor": name, "processes": [c.name for c in of]})
        raise UnknownActor(name)

    def list_actors(self) -> list[dict]:
        out = []
        tree = {c["name"]: c for c in self._flat_status()}
        for name, cell in self.cells.items():
            c = cell.component
            st = tree.get(name, {})
            out.append({"name": name, "component": c.name, "runtime": c.runtime, "inports": list(c.inports),
                        "outports": list(c.outports), "description": c.description, "version": c.version,
                        "file": c.file.name, "status": st.get("state", "stopped"), "tier": cell.tier})
        for comp, why in self.unavailable.items():
            out.append({"name": comp, "component": comp, "status": "unavailable", "reason": why})
        return out

    def _flat_status(self) -> list[dict]:
        if self.root is None:
            return []
        out, todo = [], [self.root.status()]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.get("children") or [])
        return out

    def status(self) -> dict:
        tree = self.root.status() if self.root else {"name": "root", "kind": "supervisor", "state": "stopped",
                                                     "restarts": 0, "last_error": None, "children": []}
        tree["pools"] = self.pool.status() if self.pool else {}
        tree["backend"] = self.backend.name if self.backend else None
        tree["redis"] = {"url": self.redis.describe() if self.redis else None,
                         "connected": bool(self.redis and self.redis.connected)}
        tree["hot_reload"] = ("watching" if self.watching.is_set() else "starting") \
            if self.config.workspace.hot_reload else "off"
        tree["script_problems"] = [str(p) for p in self.discovery.problems] if self.discovery else []
        if self.api is not None:
            tree["api"] = self.api.status()
        if self.cluster is not None:
            tree["host"] = self.cluster.id
            tree["hosts"] = self.cluster.status()
        return tree

    async def restart_actor(self, name: str) -> None:
        """actor.restart: restart the actor now whatever its restart type and state (see
        Supervisor.restart_child). If the tree gave up, the whole tree starts again (fresh
        restart intensity), since no actor runs without its supervisors; this returns once
        it runs.

        Raises:
            UnknownActor: no such actor; ActorRemoved: a temporary actor that exited.
            ActorStopped: the host is stopping, or the actor's supervisor is itself being
                restarted by its parent (the actor comes back with it).
        """
        cell = self.cell(name)
        if self.stopping or self.root is None:
            raise ActorStopped("the host is not running its supervision tree (starting or stopping)")
        if self.root.state == "failed":
            if self._revive is None:  # (gave up this instant: _run_root has not caught it yet)
                raise ActorStopped("the supervision tree is giving up; retry")
            ask, done = self._revive
            ask.set()
            await done.wait()
            if self.root.state != "running":
                why = (self.root.last_error or {}).get("message", "")
                raise ActorStopped(f"the supervision tree was started again and gave up again: {why}")
            return
        parent = self.root.parent_of(cell.name)
        if parent is None:
            if cell.process.restart == "temporary":
                raise ActorRemoved(cell.name, "it was temporary and was removed from the supervision tree when "
                                              "it exited (temporary actors are never restarted)")
            raise ActorRemoved(cell.name, "it is no longer in the supervision tree")
        try:
            await parent.restart_child(cell.name)
        except NotRunning as exc:
            raise ActorStopped(f"actor {cell.name!r} cannot be restarted now: its supervisor {exc.name!r} is "
                               "itself being restarted; the actor comes back with it") from None

    # -- what cells call ----------------------------------------------------
    async def commit(self, cell: ActorCell, txn: Any, routed: list, env: Envelope, *, ack: bool = True) -> None:
        """Commit one message in one script fenced by its process's lease (``ActorCell.guarded``):
        its state changes, the messages it sends downstream (durable mode) and its
        acknowledgement; then route what stays in memory.

        Raises:
            ActorFailed: Redis refused the commit or could not be reached (its ``__cause__``).
        """
        commit = self.start_commit(cell, txn, routed, env, ack=ack)
        if commit.finish is not None:
            await commit.finish()

    def start_commit(self, cell: ActorCell, txn: Any, routed: list, env: Envelope, *,
                     ack: bool = True) -> Commit:
        """``commit`` in two steps: the script is queued for Redis now (so whatever is
        sent after it, on the connection, sees it done), and ``finish`` waits for it."""
        cmds = txn.commands()
        later: list[tuple[str, str, dict]] = []
        woken: list[ActorCell] = []
        gathering: list[ActorCell] = []
        outbox: list[dict] = []  # (in a Redis Cluster: see _outbox)
        clustered = self.keys.clustered
        for port, message in routed:
            for tgt, tport in self.routes.get((cell.name, port), ()):
                target = self.cells.get(tgt)
                if not self.durable or target is None:
                    later.append((tgt, tport, message))
                elif tgt in self._fan_in:
                    if tport not in self._fan_in[tgt]:
                        continue
                    if clustered:
                        outbox.append({"t": tgt, "p": tport, "v": message})
                    else:
                        cmds.append(push_cmd(self._fanin_key(tgt, tport), message))
                        gathering.append(target)
                elif clustered:
                    outbox.append({"t": tgt, "b": {"id": new_message_id(), "inputs": {tport: message}}})
                else:
                    cmds.append(enqueue_cmd(target.inbox, new_message_id(), {tport: message}))
                    if not target.ownership.held and self.cluster is not None:
                        cmds.append(self.cluster.publish_wake(tgt))  # (its owner is another host)
                    woken.append(target)
                    # Not read yet: a send must not start ahead of it (see ActorCell.start_now);
                    # the feeder is woken once the commit is in.
                    target.durable_inbox.mark_unread()
        if outbox:
            cmds.append(outbox_cmd(self.keys.outbox(cell.name), outbox))
        if ack and env.stream_id is not None:
            cmds += done_cmds(cell.inbox, env.stream_id)
        if not cmds and not later and not gathering:
            return NOTHING_TO_COMMIT
        reply = cell.guarded(cmds) if cmds else None
        delivered = 0

        async def finish() -> None:
            """Safe to call again after a cancel: it resumes with the first delivery not
            made (waking and assembling may repeat; they are idempotent)."""
            nonlocal delivered
            try:
                if reply is not None:
                    await reply()
            except (RedisUnavailable, RedisError) as exc:
                if isinstance(exc, Fenced):  # (another host holds the lease: stop serving now)
                    cell.ownership.lose("a commit was refused: another host holds the lease")
                raise ActorFailed(f"actor {cell.name!r}: state not committed: {exc}",
                                  {"type": type(exc).__name__, "message": str(exc)}) from exc
            finally:  # (committed or not, a read settles the unread set above)
                for target in woken:
                    target.durable_inbox.poke()
                if outbox and self.relay is not None:  # (even unanswered: it may be in)
                    self.relay.mark(cell.name)
            for target in dict.fromkeys(gathering):
                await self._assemble(target)
            while delivered < len(later):
                tgt, tport, message = later[delivered]
                if not self._fan_in_put(tgt, tport, message):  # (buffered: flushed below)
                    await self._send_to(tgt, tport, message)
                delivered += 1
            for tgt in dict.fromkeys(t for t, _, _ in later if t in self._fan_in):
                await self._flush_fan_in(tgt)
        return Commit(reply, finish)

    def _fanin_key(self, process: str, port: str) -> str:
        return self.keys.fanin(process, port)

    def relay_outbox(self, process: str) -> None:
        """``process``'s run starts here: relay what its outbox holds (in a Redis Cluster)."""
        if self.relay is not None:
            self.relay.mark(process)

    async def assemble_fan_in(self, process: str) -> None:
        """The relay put values on ``process``'s fan-in lists (see _outbox)."""
        target = self.cells.get(process)
        if target is not None and process in self._fan_in:
            await self._assemble(target)

    async def _assemble(self, target: ActorCell) -> None:
        """Turn complete sets of buffered port values into inbox messages (durable fan-in).
        A failure here loses nothing: the values stay buffered and the next assembly (or
        the next start) moves them."""
        try:
            ports = list(self._fan_in[target.name])
            made = await assemble(self.redis, target.inbox, [self._fanin_key(target.name, p) for p in ports], ports,
                                  new_message_id)
        except (RedisUnavailable, RedisError) as exc:
            log.error("fan-in for %s not assembled yet: %s", target.name, exc)
            return
        if made:
            self.wake(target.name)

    async def enqueue(self, cell: ActorCell, inputs: dict) -> str:
        """Accept a message for ``cell`` (``actor.send``); returns once it is durable (or queued,
        with memory mailboxes). Raises Overloaded past ``max_pending``, ActorFailed if Redis is down."""
        if not self.durable:
            return self.enqueue_memory(cell, inputs)
        return await self.enqueue_durable(cell, inputs)()

    def enqueue_durable(self, cell: ActorCell, inputs: dict) -> Callable[[], Awaitable[str]]:
        """``enqueue`` in two steps: the message is queued for Redis now, so messages taken in
        one order reach the inbox in that order; what this returns waits until Redis has it."""
        if cell.stopped_reason is not None:
            raise ActorStopped(cell.stopped_reason, {"actor": cell.name})
        limit = self.config.workspace.mailbox.max_pending
        mid = new_message_id()
        ports = self._fan_in.get(cell.name)
        if ports is None:
            body = entry_body(mid, inputs)  # (first: nothing may raise between claim and claim_read)
            inbox = cell.durable_inbox
            batch = inbox.claim()
            reply = self.redis.submit(*enqueue_if_room_cmd(cell.inbox, limit, body, batch, cell.lease,
                                                           cell.ownership.token_value or ""))
            if not cell.ownership.held and self.cluster is not None:
                self.redis.submit(*self.cluster.publish_wake(cell.name))  # (its owner is another host)
            if batch:  # the feeder waits, with everything read: the add reads for it
                inbox.claim_read(reply, body if cell.start_now(mid, body, reply) else None)
            else:
                # Wake the feeder now, not once Redis has answered: its read is submitted behind
                # the add (see _mailbox._read_new), so it finds the message one round trip sooner.
                inbox.poke()
        else:  # one value per port waits for the others (await_all_inports)
            reply = self.redis.submit(*push_if_room_cmd(
                cell.inbox, limit, [(self._fanin_key(cell.name, p), v) for p, v in inputs.items() if p in ports]))

        async def accepted() -> str:
            try:
                length = await reply()
            except RedisUnavailable as exc:  # an outage is a retry-later, not the actor's failure
                raise Overloaded(f"message not accepted, Redis is unavailable ({exc}); retry later",
                                 {"actor": cell.name, "redis": "unavailable"}) from exc
            except RedisError as exc:
                raise ActorFailed(f"message not accepted: {exc}", {"type": type(exc).__name__}) from exc
            if isinstance(length, list):  # added, and read for the feeder
                return mid
            if length >= limit:
                raise Overloaded(f"actor {cell.name!r} has {length} messages waiting (max_pending {limit}); "
                                 "retry later", {"actor": cell.name})
            if ports is not None:
                await self._assemble(cell)  # (which wakes the feeder if it made a message)
            return mid
        return accepted

    def enqueue_memory(self, cell: ActorCell, inputs: dict) -> str:
        """``enqueue`` with memory mailboxes: queued at once (or Overloaded, see ``submit``)."""
        env = Envelope(inputs=inputs)
        cell.submit(env)
        return env.message_id

    async def deliver(self, process: str, port: str, message: dict) -> None:
        """Route a value into ``process``'s memory mailbox, waiting for room (cancelled, it
        was not delivered). A fan-in process's value joins its port's buffer at once (even
        if the wait that follows is cancelled), and every complete set goes on as one
        message."""
        if self._fan_in_put(process, port, message):
            await self._flush_fan_in(process)
        else:
            await self._send_to(process, port, message)

    async def _send_to(self, process: str, port: str, message: dict) -> None:
        target = self.cells.get(process)
        if target is None:
            return
        if target.ownership.held or self.forwarder is None or self.cluster is None or len(self.cluster.hosts) < 2:
            await target.put(Envelope(inputs={port: message}))
            return
        # A memory mailbox lives on its owner's host: send it there (actor.send, forwarded),
        # waiting while that mailbox is full as a local one would make this wait.
        for attempt in range(100):
            try:
                answer = await self.forwarder.request(process, "actor.send",
                                                      {"actor": process, "port": port, "value": message})
            except ActorError as exc:
                if getattr(exc, "code", None) == Overloaded.code and attempt < 99:
                    await trio.sleep(min(0.5, 0.01 * 2 ** min(attempt, 6)))  # (its owner's mailbox is full)
                    continue
                log.error("a message routed to %s.%s was lost on the way to its host: %s", process, port, exc)
                return
            if answer is LOCAL:  # (this host holds it by now)
                await target.put(Envelope(inputs={port: message}))
            return

    def _fan_in_put(self, process: str, port: str, message: dict) -> bool:
        """Buffer a value for an ``await_all_inports`` process (memory mailboxes); False if
        ``process`` is not one."""
        buffers = self._fan_in.get(process)
        if buffers is None or process not in self.cells:
            return False
        if port in buffers:
            buffers[port].append(message)
        return True

    async def _flush_fan_in(self, process: str) -> None:
        """Send each complete set of ``process``'s buffered values as one message. A set
        leaves its buffers only once sent, so a wait for room that is cancelled loses
        nothing; one task at a time waits, so no set goes twice."""
        target, buffers = self.cells.get(process), self._fan_in.get(process)
        if target is None or buffers is None:
            return
        async with self._fan_in_locks.setdefault(process, trio.Lock()):
            while all(buffers.values()):
                await target.put(Envelope(inputs={p: q[0] for p, q in buffers.items()}))
                for q in buffers.values():
                    q.popleft()

    def publish(self, cell: ActorCell, routed: list, message_id: str) -> None:
        if not cell.subscribers:
            return
        for callback in list(cell.subscribers.values()):
            for port, message in routed:
                callback(cell.name, port, message, message_id)

    def _idle(self, process: str) -> bool:
        cell = self.cells.get(process)
        return cell is None or cell.idle()

    def _resweep(self, process: str) -> None:
        cell = self.cells.get(process)
        if cell is not None and cell.ownership.held:
            cell.durable_inbox.sweep_again()

    def wake(self, process: str) -> None:
        """``process``'s inbox has new entries: poke its feeder, here or on its owner's host."""
        cell = self.cells.get(process)
        if cell is None:
            return
        if cell.ownership.held or self.cluster is None:
            cell.durable_inbox.poke()
        else:
            self.redis.submit(*self.cluster.publish_wake(process))

    # -- the task -------------------------------------------------------------
    def select_backend(self) -> SandboxBackend:
        if self.backend is None:
            try:
                self.backend = select_backend(self.config.workspace.sandbox.backend)
            except SandboxUnavailable as exc:
                raise HostError(str(exc)) from exc
        if self.backend.name == "process":
            log.warning("SANDBOX BACKEND 'process' HAS NO ISOLATION: scripts run as plain host processes "
                        "with the host's privileges. Use it only for trusted scripts.")
            print("WARNING: workspace.sandbox.backend is 'process': scripts run WITHOUT ANY ISOLATION",
                  file=sys.stderr)
        for what in self.backend.limits_not_enforced():
            log.warning("not enforced by the %s backend on this machine: %s", self.backend.name, what)
        return self.backend

    async def main(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or signalled; SIGINT/SIGTERM stop gracefully, a second one at once."""
        if self.discovery is None:
            self.discover()
        specs = self.plan()
        # A microVM boot probe can take seconds: keep it off the trio thread.
        backend = await trio.to_thread.run_sync(self.select_backend)
        ws = self.config.workspace
        for rt in sorted({p.component.runtime for p in specs}):
            await self._ensure_packages(rt)
        self.pool = WorkerPool(backend, self._worker_specs(specs), preload=ws.sandbox.pool.preload_count,
                               max_size=ws.sandbox.pool.max_size, idle_timeout=ws.sandbox.pool.idle_timeout)
        self.root = self._build_tree(specs)

        async with trio.open_nursery() as nursery:
            self._nursery_for_drain = nursery
            nursery.start_soon(self._signals, nursery.cancel_scope)
            url = ws.redis.url
            if url is None:
                url = await nursery.start(serve_embedded_redis, ws.state_dir, ws.redis.appendfsync)
            async with contextlib.AsyncExitStack() as stack:
                try:  # (it tells one Redis from a Redis Cluster, so it connects first)
                    redis = await stack.enter_async_context(open_redis(url))
                except (RedisUnavailable, RedisError) as exc:
                    raise HostError(str(exc)) from exc
                self.redis = redis
                self.keys = Keys(ws.redis.namespace, redis.clustered)
                self.cluster = cluster = Cluster(self.config, redis, idle=self._idle, wake=self.wake,
                                                 resweep=self._resweep, alone=ws.redis.url is None, keys=self.keys)
                self.forwarder = Forwarder(cluster, ws.websocket.token)
                if redis.clustered and self.durable:
                    self.relay = Relay(self)
                try:
                    await redis.execute("PING")
                    await cluster.join()
                    for cell in self.cells.values():  # (built before the cluster ran)
                        cell.rekey(self.keys)
                        self._own(cell)
                    await cluster.tick()  # (the leases placement gives this host, before the tree starts)
                except (RedisUnavailable, RedisError) as exc:
                    raise HostError(str(exc)) from exc
                except ClusterRefused as exc:
                    raise HostError(str(exc)) from None
                async with trio.open_nursery() as inner:
                    await inner.start(cluster.run)
                    if self.relay is not None:
                        await inner.start(self.relay.run)
                    await inner.start(self.pool.serve)
                    await inner.start(self._run_root)
                    await inner.start(self.forwarder.run)
                    server = await inner.start(serve_api, self)
                    self.url = f"ws://{ws.websocket.host}:{server.port}/"
                    cluster.url = self.config.cluster.advertise or self.url
                    cluster.on_event = self.api.watchers.cluster_event
                    cluster.on_hosts = self.api.hosts_changed
                    self.api.hosts_changed(len(cluster.hosts))
                    cluster.kick()  # (tell the others this host's url now)
                    self._write_host_file(server.port)
                    log.info("rpc server started", extra={"url": self.url, "pools": self.pool.readiness()})
                    await self._send_iips()
                    if ws.hot_reload:
                        await inner.start(watch_scripts, self)
                    self.started.set()
                    task_status.started(self)
                    try:
                        await trio.sleep_forever()
                    finally:
                        with trio.CancelScope(shield=True):
                            await backend.aclose()

    async def _run_root(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.root is not None
        done: trio.Event | None = None
        while True:
            try:
                await self.root.run(task_status=task_status)
                return
            except SupervisorGaveUp as exc:
                # OTP would end the node here. We keep the API up so that status shows what
                # failed and callers get -32002 instead of a refused connection, and an
                # actor.restart starts the tree again (restart_actor).
                log.critical("the supervision tree gave up: %s; the host keeps answering status", exc)
                self.root.on_stopped(exc)
            if done is not None:
                done.set()  # (a revived tree that gave up before it ran: its asker hears)
            ask, done = self._revive = trio.Event(), trio.Event()
            await ask.wait()
            self._revive = None
            log.warning("actor.restart: starting the supervision tree again")
            task_status = _Started(done)

    async def _send_iips(self) -> None:
        if self.durable:  # finish any fan-in assembly a crash interrupted
            for name in self._fan_in:
                await self._assemble(self.cells[name])
        net = self.config.network
        if net is None:
            return
        for conn in net.connections:
            if conn.src is None and conn.tgt.process in self.cells:
                target = self.cells[conn.tgt.process]
                inputs = {conn.tgt.port: wrap(conn.data)}
                if target.name not in self._fan_in:
                    target.submit(Envelope(inputs=inputs))
                elif self.durable:  # an IIP waits for the other inports like any message
                    try:
                        await self.enqueue(target, inputs)
                    except ActorError as exc:
                        log.error("IIP for %s.%s not accepted: %s", target.name, conn.tgt.port, exc)
                else:
                    await self.deliver(target.name, conn.tgt.port, inputs[conn.tgt.port])

    def _write_host_file(self, port: int) -> None:
        state_dir: Path = self.config.workspace.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        info = {"url": f"ws://{self.config.workspace.websocket.host}:{port}/", "pid": os.getpid(), "started": time.time()}
        write_atomic(state_dir / "host.json", orjson.dumps(info))  # (clients and tests poll it)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stopping:
                    log.warning("second signal: stopping now")
                    scope.cancel()
                    return
                self.stopping = True
                if self.cluster is not None:
                    self.cluster.leaving = True  # (it takes no new process while it drains)
                log.info("shutting down (%s): draining in-flight messages", signal.Signals(signum).name)
                self._nursery_for_drain.start_soon(self._shutdown, scope)

    async def _shutdown(self, scope: trio.CancelScope) -> None:
        """Drain (bounded by shutdown_grace), stop the tree in reverse start order, then end."""
        grace = self.config.supervision.shutdown_grace
        with trio.move_on_after(grace) as drain:
            # Polled, not event-driven: shutdown is rare and cells stay simpler.
            while any(c.current is not None or c.pending() for c in self.cells.values()):
                await trio.sleep(0.02)
        if drain.cancelled_caught:
            log.warning("messages still in flight after %gs; stopping anyway", grace)
        if self.root is not None:
            await self.root.stop_children()
        if self.cluster is not None:
            await self.cluster.leave()  # (the others take this host's processes over now)
        log.info("stopped")
        scope.cancel()

