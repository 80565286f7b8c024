"""The FBP Network Protocol (flowbased fbp-protocol 0.7–0.9; CONTRACT §7), the trio shell.

A WebSocket client of the API's port that asks for the subprotocol ``noflo``
gets this (``_server.Api.handle`` hands it over); every other client gets the
JSON-RPC API. One ``FbpRuntime`` per host holds the graph (one at a time, the
host's network); each connection reads messages in order and answers them.
The pure parts (message shape, the graph and its edits, noflo graph JSON) are
in :mod:`supervisor.core.fbp_graph`; here the edits' actions are carried out on the
running host: a node is a supervised ``ActorCell`` (started, or drained and
stopped, as hot reload does), an edge is an entry of the router's table
(``Host.routes``), an IIP or a ``runtime:packet`` is a message in a mailbox.

The graph's network is *started* from ``network:start`` to ``network:stop``
(a network from reflow.yaml is started with the host); while started, edits
change it at once. It is *running* while one of its processes has a message in
hand or waiting (``network:getstatus`` waits up to ``SETTLE`` seconds for a
network about to go idle, so that a finished run reads as finished).

Every message sent is one the fbp-protocol JSON schemas accept, with no extra
keys (tests/test_fbp.py checks them strictly). The protocol's ``secret`` is the
host's token; a wrong one is answered with the protocol's ``error`` and nothing
else happens. The secret is never echoed.
"""

from __future__ import annotations

import base64
import collections
import datetime
import hmac
import math
import logging
import time
import uuid
from typing import Any, Protocol

import orjson
import trio
import trio_websocket

from .core import policy as policy
from .core import protocol as proto
from ._cell import ActorCell, CellHost
from ._child import CellChild, runtime_unavailable
from .core.errors import ActorError, HostError
from ._files import write_atomic
from .core.fbp_graph import Action, Graph, GraphError, ProtocolError, data_event_id, parse_message

__all__ = ["FbpApi", "FbpHost", "serve_fbp"]

log = logging.getLogger("supervisor.fbp")

PROTOCOL_VERSION = "0.8"
CAPABILITIES = ["protocol:runtime", "protocol:graph", "protocol:component", "protocol:network",
                "network:data", "network:status", "network:control", "component:getsource"]
SEND_QUEUE = 4096   # network:* events waiting for a slow client past this are dropped …
SEND_LIMIT = 65536  # … and past this many messages of any kind, it is disconnected (it does not read)
SETTLE = 0.5        # seconds getstatus waits for a network that is about to go idle
_LANGUAGES = {"python": "python", "javascript": "javascript"}


class FbpHost(CellHost, Protocol):
    """What the FBP runtime asks of the host (``Host`` implements it): besides what a cell
    it starts asks (``CellHost``), the host's processes, routes and the steps of starting
    and removing one. Named here, so that this module needs nothing of the host's.
    (The host also gets an ``fbp`` attribute, the runtime, set here on first use.)"""

    cells: dict[str, ActorCell]
    routes: dict[tuple[str, str], list[tuple[str, str]]]
    _fan_in: dict[str, dict[str, collections.deque]]
    discovery: Any               # _discovery.Discovery | None
    root: Any                    # the supervision tree (_tree.Supervisor), once it runs
    url: str | None

    async def _ensure_packages(self, runtime: str) -> None: ...

    def _process_spec(self, name: str, comp: Any, net_config: dict | None) -> Any: ...

    def _worker_specs(self, specs_needed: list) -> dict[str, Any]: ...

    async def _remove_cell(self, cell: ActorCell) -> None: ...

    def new_cell(self, spec: Any) -> ActorCell: ...  # registered, holding its lease's ownership

    async def enqueue(self, cell: ActorCell, inputs: dict) -> str: ...

    async def deliver(self, process: str, port: str, message: dict) -> None: ...


class FbpApi(Protocol):
    """What an FBP connection asks of the API it came in by (``_server.Api`` implements it)."""

    host: FbpHost
    cfg: Any                     # workspace.websocket (max_connections)
    connections: int             # the API's count of open connections, FBP ones included


async def serve_fbp(api: FbpApi, request: trio_websocket.WebSocketRequest) -> None:
    """Serve one FBP protocol client (the request asked for subprotocol ``noflo``)."""
    host = api.host
    if api.connections >= api.cfg.max_connections or host.stopping:
        await request.reject(503, body=b"too many connections\n")
        return
    ws = await request.accept(subprotocol="noflo")
    api.connections += 1
    runtime = _runtime(host)
    conn = FbpConnection(runtime, ws)
    runtime.connections.add(conn)
    try:
        await conn.run()
    finally:
        runtime.connections.discard(conn)
        api.connections -= 1


def _runtime(host: FbpHost) -> FbpRuntime:
    rt = getattr(host, "fbp", None)
    if rt is None:
        rt = host.fbp = FbpRuntime(host)
    return rt


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _plain(message: Any) -> Any:
    """A typed message as the protocol's JSON data (bytes as base64 text)."""
    if not proto.is_typed(message):
        return message
    value = message["value"]
    if message["type"] == "bytes":
        data = value.data if isinstance(value, proto.Blob) else base64.b64decode(value)
        return base64.b64encode(bytes(data)).decode()
    return value


class FbpRuntime:
    """The host's one graph and what watches it; shared by every FBP connection."""

    def __init__(self, host: FbpHost):
        self.host = host
        self.connections: set[FbpConnection] = set()
        self.lock = trio.Lock()  # one edit at a time, across connections
        self.id = self._runtime_id()
        self.graph, self.started = self._initial_graph()
        self.started_at = time.monotonic() if self.started else None
        self._edge_edits: dict[tuple[str, str, str, str], tuple[bool, frozenset[str]]] = {}
        for nid in self.graph.nodes:
            self._watch(nid)
        handler = _ScriptOutput(self)
        logging.getLogger("supervisor.actor").addHandler(handler)

    # -- setup -------------------------------------------------------------------------------
    def _runtime_id(self) -> str:
        """A UUID4 kept under .reflow/, so that Flowhub knows this runtime again."""
        path = self.host.config.workspace.state_dir / "fbp-runtime-id"
        try:
            rid = path.read_text().strip()
            uuid.UUID(rid)
            return rid
        except (OSError, ValueError):
            rid = str(uuid.uuid4())
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, rid.encode())
            except OSError:
                pass
            return rid

    def _initial_graph(self) -> tuple[Graph, bool]:
        """The network the host runs (reflow.yaml's, as loaded at start), named and grouped
        as its graph file says; no network: an empty graph, not started."""
        cfg = self.host.config
        if cfg.network is None:
            return Graph(id="main", name="main"), False
        g = Graph.from_json(_network_doc(cfg.network))
        if cfg.graph_file is not None:
            try:
                saved = Graph.from_json(orjson.loads(cfg.graph_file.read_bytes()))
            except (OSError, orjson.JSONDecodeError, GraphError) as exc:
                log.warning("graph file %s: %s; its name and groups are not known", cfg.graph_file, exc)
            else:
                g.id, g.name, g.library, g.main, g.icon = saved.id, saved.name, saved.library, saved.main, saved.icon
                g.properties = saved.properties
                g.groups = [{**grp, "nodes": [n for n in grp["nodes"] if n in g.nodes]} for grp in saved.groups]
        return g, True

    def library(self) -> dict:
        from .components import package_components

        found = self.host.discovery.components if self.host.discovery else ()
        return {**package_components(), **{c.name: c for c in found}}

    def components_changed(self, comps: list) -> None:
        """Hot reload started or changed these components: ``component:component`` for each
        (the protocol has no message for a component gone)."""
        for comp in comps:
            self.broadcast("component", "component", component_payload(comp.name, comp))

    # -- events out ----------------------------------------------------------------------------
    def broadcast(self, protocol: str, command: str, payload: dict) -> None:
        """To every client; only ``network:*`` events may be dropped for a slow one."""
        for conn in list(self.connections):
            if protocol == "network":
                conn.event(protocol, command, payload)
            else:
                conn.answer(protocol, command, payload)

    def _watch(self, nid: str) -> None:
        cell = self.host.cells.get(nid)
        if cell is None:
            return
        cell.subscribers[id(self)] = self._on_output
        cell.on_failure = lambda err, nid=nid: self._on_failure(nid, err)

    def _on_output(self, actor: str, port: str, message: dict, message_id: str) -> None:
        if not self.connections:
            return
        g = self.graph
        data = None
        targets = self.host.routes.get((actor, port), ())
        if self._edge_edits:  # the edges this message's commit really used (see _edge_edited)
            targets = list(targets)
            for (s, sp, t, tp), (added, ids) in self._edge_edits.items():
                if s == actor and sp == port and message_id in ids:
                    if added and (t, tp) in targets:
                        targets.remove((t, tp))
                    elif not added and (t, tp) not in targets:
                        targets.append((t, tp))
        for tgt, tport in targets:
            src, dst = {"node": actor, "port": port}, {"node": tgt, "port": tport}
            if data is None:
                data = _plain(message)
            for conn in list(self.connections):
                if conn.selected(src, dst):
                    conn.event("network", "data", {"id": data_event_id(src, dst), "graph": g.id, "src": src,
                                                   "tgt": dst, "data": data})
        for public, ref in g.outports.items():
            if ref["node"] == actor and ref["port"] == port:
                self.broadcast("runtime", "packet", {"graph": g.id, "port": public, "event": "data",
                                                     "payload": _plain(message)})

    def _on_failure(self, nid: str, err: dict) -> None:
        if not self.connections:
            return
        data = err.get("data") if isinstance(err.get("data"), dict) else {}
        lines = [str(x) for x in (data.get("traceback") or [])]
        text = f"{data.get('type') or 'Error'}: {data.get('message') or err.get('message')}"
        self.broadcast("network", "processerror", {"id": nid, "graph": self.graph.id,
                                                   "error": "\n".join([text, *lines]) if lines else text})

    def network_error(self, message: str) -> None:
        self.broadcast("network", "error", {"message": message, "graph": self.graph.id})

    # -- the running network -------------------------------------------------------------------
    def running(self) -> bool:
        return self.started and any(
            (c := self.host.cells.get(n)) is not None and (c.current is not None or c.pending())
            for n in self.graph.nodes)

    async def carry_out(self, actions: list[Action]) -> None:
        """Make the running network match an edit; a step that fails is a network:error
        (the graph keeps the edit: a network:start retries it)."""
        # Shielded: an edit half made (a cell added to the host but not to its supervisor…)
        # is worse than a disconnect or a shutdown waiting for it (a drain is bounded).
        with trio.CancelScope(shield=True):
            for act in actions:
                try:
                    await getattr(self, f"_do_{act.kind}")(act)
                except (GraphError, ActorError) as exc:
                    log.error("FBP %s %s: %s", act.kind, act.node or act.tgt, exc)
                    self.network_error(str(exc))

    async def _do_start_node(self, act: Action) -> None:
        host = self.host
        if act.node in host.cells:  # (the graph's own are stopped before they start again)
            raise GraphError(f"node {act.node!r}: a process of that name already runs on this host")
        comp = self.library().get(act.component)
        if comp is None:
            raise GraphError(f"node {act.node!r}: component {act.component!r} not available")
        why = runtime_unavailable(comp.runtime)
        if why is not None:
            raise GraphError(f"node {act.node!r} cannot run: {why}")
        try:
            await host._ensure_packages(comp.runtime)
        except HostError as exc:
            raise GraphError(f"node {act.node!r} cannot run: {exc}") from None
        network = host.root.find("network") if host.root else None
        if network is None or host.pool is None:
            raise GraphError("the host's supervision tree is not running")
        spec = host._process_spec(act.node, comp, act.config or None)
        host.pool.add_runtime(comp.runtime, host._worker_specs([spec])[comp.runtime])
        cell = host.new_cell(spec)
        if comp.await_all_inports:
            host._fan_in[act.node] = {p: collections.deque() for p in comp.inports}
        self._watch(act.node)
        log.info("FBP: starting node %s (%s)", act.node, comp.name)
        await network.add_child(CellChild(cell, policy.RestartType(spec.restart)))

    async def _do_stop_node(self, act: Action) -> None:
        cell = self.host.cells.get(act.node)
        if cell is None:
            return
        log.info("FBP: stopping node %s", act.node)
        cell.subscribers.pop(id(self), None)
        await self.host._remove_cell(cell)

    async def _do_drain_node(self, act: Action) -> None:
        """Wait (bounded by shutdown_grace) until the node has nothing in hand or queued,
        its durable inbox included: a node taken out of a live graph loses nothing."""
        host = self.host
        cell = host.cells.get(act.node)
        if cell is None:
            return
        idle = 0
        with trio.move_on_after(host.config.supervision.shutdown_grace) as scope:
            while True:
                # (a commit on its way still publishes and routes what the message sent)
                if cell.current is None and not cell.pending() and not cell._committing:
                    if host.durable:  # an entry leaves the inbox with its message's commit
                        if not await host.redis.execute("XLEN", cell.inbox):
                            break
                    else:  # memory: messages sent ahead to the worker show only as `current`
                        idle += 1
                        if idle >= 3:
                            break
                else:
                    idle = 0
                await trio.sleep(0.02)  # polled: removals are rare
        if scope.cancelled_caught:
            self.network_error(f"node {act.node!r} still had messages after "
                               f"{host.config.supervision.shutdown_grace:g}s; they stay in its mailbox")

    async def _do_add_route(self, act: Action) -> None:
        targets = self.host.routes[(act.node, act.port)]
        if (act.tgt, act.tgt_port) not in targets:
            self._edge_edited(act, added=True)
            targets.append((act.tgt, act.tgt_port))

    async def _do_remove_route(self, act: Action) -> None:
        targets = self.host.routes.get((act.node, act.port))
        if targets and (act.tgt, act.tgt_port) in targets:
            self._edge_edited(act, added=False)
            targets.remove((act.tgt, act.tgt_port))

    def _edge_edited(self, act: Action, *, added: bool) -> None:
        """A message's commit is routed when it starts, its outputs are published once Redis
        has it: the source's messages committing now were routed without the edge just
        added (or with the one just removed). Remembered until they are published, so
        that network:data shows the edges each packet really took."""
        live = {k: v for k, v in self._edge_edits.items() if v[1] & self._committing_ids(k[0])}
        ids = self._committing_ids(act.node)
        if ids:
            live[(act.node, act.port, act.tgt, act.tgt_port)] = (added, ids)
        self._edge_edits = live

    def _committing_ids(self, node: str) -> frozenset[str]:
        cell = self.host.cells.get(node)
        return frozenset(env.message_id for _, env, _, _ in cell._committing) if cell is not None else frozenset()

    async def _do_send_iip(self, act: Action) -> None:
        await self.inject(act.tgt, act.tgt_port, act.data)
        src, dst = None, {"node": act.tgt, "port": act.tgt_port}
        for conn in list(self.connections):
            if conn.selected(src, dst):
                conn.event("network", "data", {"id": data_event_id(None, dst), "graph": self.graph.id,
                                               "tgt": dst, "data": act.data})

    async def inject(self, node: str, port: str, data: Any) -> None:
        """``data`` (plain JSON) into ``node``'s ``port``, as a client's actor.send would.

        Raises:
            GraphError: no such running node; ActorError: the mailbox refused it.
        """
        host = self.host
        cell = host.cells.get(node)
        if cell is None:
            raise GraphError(f"node {node!r} is not running")
        try:
            message = proto.wrap(data)
        except (TypeError, ValueError) as exc:
            raise GraphError(f"bad packet for {node}.{port}: {exc}") from None
        if host.durable or node not in host._fan_in:
            await host.enqueue(cell, {port: message})
        else:
            await host.deliver(node, port, message)

    # -- the graph file ------------------------------------------------------------------------
    def save(self) -> None:
        """Write the graph (noflo graph JSON) atomically: temp file + os.replace. Where:
        the file reflow.yaml's ``network:`` names, else .reflow/graph.json."""
        path = self.host.config.graph_file or (self.host.config.workspace.state_dir / "graph.json")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, orjson.dumps(self.graph.to_json(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            log.error("graph not saved to %s: %s", path, exc)
            self.network_error(f"graph not saved to {path.name}: {exc.strerror or exc}")

    def ports_payload(self) -> dict:
        g = self.graph
        return {"graph": g.id, "inPorts": [{"id": p, "type": "all"} for p in g.inports],
                "outPorts": [{"id": p, "type": "all"} for p in g.outports]}


def component_payload(name: str, comp: Any) -> dict:
    """A ComponentSpec as ``component:component``: its ports (type ``all``: script actors
    declare no port types), every actor's ``error`` outport, ``icon`` from a tag ``icon:NAME``."""
    outports = (*comp.outports, *(() if "error" in comp.outports else ("error",)))
    payload: dict[str, Any] = {
        "name": name, "description": comp.description or "", "subgraph": False,
        "inPorts": [{"id": port, "type": "all"} for port in comp.inports],
        "outPorts": [{"id": port, "type": "all"} for port in outports]}
    icon = next((t[5:] for t in comp.tags if t.startswith("icon:")), None)
    if icon:
        payload["icon"] = icon
    return payload


def _network_doc(net: Any) -> dict:
    """reflow.yaml's inline ``network:`` (a NetworkConfig) as noflo graph JSON."""
    from .core.config import NO_DATA

    def ref(r: Any) -> dict:
        out = {"process": r.process, "port": r.port}
        if r.index is not None:
            out["index"] = r.index
        return out

    conns = []
    for c in net.connections:
        conn: dict[str, Any] = {"tgt": ref(c.tgt)}
        if c.src is not None:
            conn["src"] = ref(c.src)
        elif c.data is not NO_DATA:
            conn["data"] = c.data
        if c.metadata:
            conn["metadata"] = dict(c.metadata)
        conns.append(conn)
    return {"processes": {n: {"component": p.component, "config": dict(p.config), "metadata": dict(p.metadata)}
                          for n, p in net.processes.items()},
            "connections": conns,
            "inports": {k: ref(v) for k, v in net.inports.items()},
            "outports": {k: ref(v) for k, v in net.outports.items()}}


class _ScriptOutput(logging.Handler):
    """What a graph's scripts print (the cell logs each write as "script output") →
    network:output, one message per line (a print arrives in several writes)."""

    MAX_LINE = 4096

    def __init__(self, runtime: FbpRuntime):
        super().__init__(logging.INFO)
        self.runtime = runtime
        self.partial: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        rt = self.runtime
        if not rt.connections or record.msg != "script output":
            return
        actor = getattr(record, "actor", None)
        if actor not in rt.graph.nodes:
            return
        text = self.partial.pop(actor, "") + str(getattr(record, "text", ""))
        *lines, rest = text.split("\n")
        if len(rest) > self.MAX_LINE:
            lines.append(rest)
        elif rest:
            self.partial[actor] = rest
        for line in lines:
            rt.broadcast("network", "output", {"message": f"{actor}: {line}", "type": "message"})


class FbpConnection:
    """One FBP client: messages are handled in order; answers and events go through a
    bounded queue to a writer task (events past it are dropped for this client only)."""

    def __init__(self, runtime: FbpRuntime, ws: trio_websocket.WebSocketConnection):
        self.rt = runtime
        self.ws = ws
        self._send, self._recv = trio.open_memory_channel[str](math.inf)
        self._queued = 0
        self._cut: trio.CancelScope | None = None
        self.edges: set[tuple] | None = None  # network:edges selection; None: every edge
        self._dropped = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._cut = nursery.cancel_scope
            nursery.start_soon(self._writer)
            try:
                while True:
                    try:
                        data = await self.ws.get_message()
                    except trio_websocket.ConnectionClosed:
                        break
                    await self._handle(data)
            finally:
                self._send.close()
                nursery.cancel_scope.deadline = trio.current_time() + 1

    async def _writer(self) -> None:
        async for text in self._recv:
            self._queued -= 1
            try:
                await self.ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                return

    def _put(self, protocol: str, command: str, payload: dict, *, answer: bool) -> None:
        if not answer and self._queued >= SEND_QUEUE:
            # Watching (network:data, output…) a client that does not keep up loses events;
            # what it asked for (answers, runtime:packet from exported ports) it does not.
            self._dropped += 1
            if self._dropped in (1, 100, 10000):
                log.warning("FBP client %s does not keep up: %d events dropped", self.ws.remote, self._dropped)
            return
        if self._queued >= SEND_LIMIT:
            if self._cut is not None and not self._cut.cancel_called:
                log.warning("FBP client %s does not read: %d messages wait for it; disconnecting it",
                            self.ws.remote, self._queued)
                self._cut.cancel()
            return
        text = orjson.dumps({"protocol": protocol, "command": command, "payload": payload}).decode()
        try:
            self._send.send_nowait(text)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self._queued += 1

    def answer(self, protocol: str, command: str, payload: dict) -> None:
        self._put(protocol, command, payload, answer=True)

    def event(self, protocol: str, command: str, payload: dict) -> None:
        self._put(protocol, command, payload, answer=False)

    def selected(self, src: dict | None, tgt: dict) -> bool:
        if self.edges is None or src is None:
            return True
        return (src["node"], src["port"], tgt["node"], tgt["port"]) in self.edges

    # -- dispatch ------------------------------------------------------------------------------
    async def _handle(self, data: str | bytes) -> None:
        limit = self.rt.host.config.workspace.websocket.max_frame_size
        if len(data) > limit:
            self.answer("runtime", "error", {"message": f"message of {len(data)} bytes exceeds max_frame_size "
                                                        f"({limit} bytes); not read"})
            return
        try:
            msg = parse_message(data)
        except ProtocolError as exc:
            self.answer("runtime", "error", {"message": f"invalid message: {exc}"})
            return
        token = self.rt.host.config.workspace.websocket.token
        if token is not None and not hmac.compare_digest((msg.secret or "").encode(), token.encode()):
            self._error(msg.protocol, "Unauthorized: invalid or missing secret")
            return
        fn = getattr(self, f"_{msg.protocol}_{msg.command}", None)
        if fn is None or msg.protocol not in ("runtime", "graph", "network", "component"):
            self._error(msg.protocol, f"unknown command {msg.protocol}:{msg.command}")
            return
        payload = {k: v for k, v in msg.payload.items() if k != "secret"}
        try:
            await fn(payload)
        except (GraphError, ActorError) as exc:
            self._error(msg.protocol, str(exc))
        except Exception as exc:  # a bug of ours must not end the connection
            log.error("FBP %s:%s failed", msg.protocol, msg.command, exc_info=exc)
            self._error(msg.protocol, f"internal error: {type(exc).__name__}")

    def _error(self, protocol: str, message: str) -> None:
        if protocol not in ("runtime", "graph", "network", "component"):
            protocol = "runtime"
        payload = {"message": message}
        if protocol == "network":
            payload["graph"] = self.rt.graph.id
        self.answer(protocol, "error", payload)

    # -- runtime -------------------------------------------------------------------------------
    async def _runtime_getruntime(self, p: dict) -> None:
        rt = self.rt
        self.answer("runtime", "runtime", {
            "type": "reflow", "version": PROTOCOL_VERSION, "capabilities": CAPABILITIES,
            "allCapabilities": CAPABILITIES, "graph": rt.graph.id, "id": rt.id,
            "label": f"reflow-supervisor at {rt.host.url or 'starting'}"})
        if rt.started:
            self.answer("runtime", "ports", rt.ports_payload())

    async def _runtime_packet(self, p: dict) -> None:
        rt = self.rt
        port, event, graph = p.get("port"), p.get("event"), p.get("graph")
        if not isinstance(port, str) or event not in ("connect", "begingroup", "data", "endgroup", "disconnect"):
            raise GraphError("runtime:packet needs port and event (connect, begingroup, data, endgroup, disconnect)")
        self._check_graph(graph)
        ref = rt.graph.inports.get(port)
        if ref is None:
            raise GraphError(f"graph {rt.graph.id!r} has no inport {port!r}")
        if event == "data":
            if not rt.started:
                raise GraphError(f"network {rt.graph.id!r} is not started")
            await rt.inject(ref["node"], ref["port"], p.get("payload"))
        # (connect/disconnect/begingroup/endgroup: script actors take whole messages, not brackets)
        out = {"port": port, "event": event, "graph": rt.graph.id}
        if "payload" in p:
            out["payload"] = p["payload"]
        if isinstance(p.get("type"), str):
            out["type"] = p["type"]
        self.answer("runtime", "packetsent", out)

    # -- component -----------------------------------------------------------------------------
    async def _component_list(self, p: dict) -> None:
        lib = self.rt.library()
        for name, comp in sorted(lib.items()):
            self.answer("component", "component", component_payload(name, comp))
        self.answer("component", "componentsready", len(lib))

    async def _component_getsource(self, p: dict) -> None:
        name = p.get("name")
        if not isinstance(name, str):
            raise GraphError("component:getsource needs a name")
        lib = self.rt.library()
        comp = lib.get(name)
        if comp is None:
            raise GraphError(f"component {name!r} not found")
        library, _, short = name.rpartition("/")
        out = {"name": short, "language": _LANGUAGES.get(comp.runtime, comp.runtime), "code": comp.source}
        if library:
            out["library"] = library
        self.answer("component", "source", out)

    async def _component_source(self, p: dict) -> None:
        raise GraphError("component sources are read-only on this runtime: edit the script file "
                         "(hot reload picks it up)")

    # -- graph ---------------------------------------------------------------------------------
    def _check_graph(self, graph: Any) -> None:
        if graph is None:
            raise GraphError("No graph specified")
        if graph != self.rt.graph.id:
            raise GraphError("Requested graph not found")

    async def _graph_clear(self, p: dict) -> None:
        rt = self.rt
        gid = p.get("id")
        if not isinstance(gid, str) or not gid:
            raise GraphError("graph:clear needs an id")
        async with rt.lock:
            if rt.started:
                await rt.carry_out(rt.graph.stop_actions())
                rt.started = False
                rt.broadcast("network", "stopped", _stopped(rt))
            rt.graph = Graph(id=gid, name=p.get("name") if isinstance(p.get("name"), str) else "",
                             library=p.get("library") if isinstance(p.get("library"), str) else None,
                             main=p.get("main") if isinstance(p.get("main"), bool) else True,
                             icon=p.get("icon") if isinstance(p.get("icon"), str) else None)
            rt.save()
        out: dict[str, Any] = {"id": gid}
        for key, kind in (("name", str), ("library", str), ("main", bool), ("icon", str)):
            if isinstance(p.get(key), kind):
                out[key] = p[key]
        self.answer("graph", "clear", out)

    async def _edit(self, command: str, p: dict) -> None:
        rt = self.rt
        self._check_graph(p.get("graph"))
        async with rt.lock:
            g = rt.graph
            if command in ("addnode", "renamenode"):
                new = p.get("id" if command == "addnode" else "to")
                if isinstance(new, str) and new in rt.host.cells and new not in g.nodes:
                    raise GraphError(f"a process named {new!r} already runs on this host outside the graph")
            replies, actions = g.apply(command, p, known=lambda c: c in rt.library())
            for cmd, payload in replies:
                self.answer("graph", cmd, payload)
            if rt.started:
                await rt.carry_out(actions)
            rt.save()
            if command.endswith(("inport", "outport")) or command == "removenode":
                self.answer("runtime", "ports", rt.ports_payload())

    def __getattr__(self, name: str) -> Any:
        prefix = "_graph_"
        if name.startswith(prefix) and name[len(prefix):] in _EDITS:
            command = name[len(prefix):]

            async def edit(p: dict) -> None:
                await self._edit(command, p)
            return edit
        raise AttributeError(name)

    # -- network -------------------------------------------------------------------------------
    async def _network_start(self, p: dict) -> None:
        rt = self.rt
        self._check_graph(p.get("graph"))
        async with rt.lock:
            if not rt.started:
                rt.started = True
                rt.started_at = time.monotonic()
                actions = rt.graph.start_actions()
                first = [a for a in actions if a.kind != "send_iip"]
                await rt.carry_out(first)
                rt.broadcast("network", "started", {"graph": rt.graph.id, "time": _now(), "started": True,
                                                    "running": True})
                await rt.carry_out([a for a in actions if a.kind == "send_iip"])
                return
        self.answer("network", "started", {"graph": rt.graph.id, "time": _now(), "started": True,
                                           "running": rt.running()})

    async def _network_stop(self, p: dict) -> None:
        rt = self.rt
        self._check_graph(p.get("graph"))
        async with rt.lock:
            if rt.started:
                await rt.carry_out(rt.graph.stop_actions())
                rt.started = False
                rt.broadcast("network", "stopped", _stopped(rt))
                return
        self.answer("network", "stopped", _stopped(rt))

    async def _network_getstatus(self, p: dict) -> None:
        rt = self.rt
        self._check_graph(p.get("graph"))
        with trio.move_on_after(SETTLE):
            while rt.running():
                await trio.sleep(0.02)
        # (no uptime: fbp-test compares the status payload exactly)
        self.answer("network", "status", {"graph": rt.graph.id, "running": rt.running(), "started": rt.started})

    async def _network_edges(self, p: dict) -> None:
        self._check_graph(p.get("graph"))
        edges = p.get("edges")
        if not isinstance(edges, list):
            raise GraphError("network:edges needs edges, a list of {src, tgt}")
        chosen, echoed = set(), []
        for e in edges:
            try:
                s, t = e["src"], e["tgt"]
                chosen.add((str(s["node"]), str(s["port"]), str(t["node"]), str(t["port"])))
                echoed.append({"src": {"node": str(s["node"]), "port": str(s["port"])},
                               "tgt": {"node": str(t["node"]), "port": str(t["port"])}})
            except (KeyError, TypeError):
                raise GraphError("network:edges: each edge is {src: {node, port}, tgt: {node, port}}") from None
        self.edges = chosen
        self.answer("network", "edges", {"graph": self.rt.graph.id, "edges": echoed})


_EDITS = frozenset({"addnode", "removenode", "renamenode", "changenode", "addedge", "removeedge", "changeedge",
                    "addinitial", "removeinitial", "addinport", "removeinport", "renameinport", "addoutport",
                    "removeoutport", "renameoutport", "addgroup", "removegroup", "renamegroup", "changegroup"})


def _stopped(rt: FbpRuntime) -> dict:
    out: dict[str, Any] = {"graph": rt.graph.id, "time": _now(), "started": False, "running": False}
    if rt.started_at is not None:
        out["uptime"] = time.monotonic() - rt.started_at
    return out

