"""The FBP Network Protocol's pure core (CONTRACT §7): messages, the graph and its edits.

Nothing here does I/O. ``parse_message`` checks one client frame; ``Graph.apply``
takes one ``graph:*`` command and returns what to answer (the spec echoes every
edit with the same command) and what the running network must do about it, as
data (``Action``); the trio shell (:mod:`supervisor._fbp`) carries the actions
out. ``Graph.to_json`` / ``Graph.from_json`` are noflo's graph JSON
(``processes`` / ``connections`` / ``inports`` / ``outports``), the shape
``network:`` in reflow.yaml reads.

Every error is a ``GraphError`` whose message is the sentence the client gets
(``graph:error``'s ``message``); the graph is unchanged after one.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import orjson

__all__ = ["Action", "Graph", "GraphError", "ProtocolError", "data_event_id", "parse_message"]

MAX_NAME = 200  # a node/port/graph id longer than this is refused (ids end up in Redis keys)


class ProtocolError(Exception):
    """A frame that is not an FBP protocol message; the message says what is wrong."""


class GraphError(Exception):
    """A graph edit that cannot be made; the message is ``graph:error``'s."""


@attrs.frozen
class Message:
    protocol: str
    command: str
    payload: dict
    secret: str | None
    request_id: str | None


def parse_message(data: str | bytes) -> Message:
    """One client frame → a Message.

    Raises:
        ProtocolError: not JSON, not an object, or protocol/command/payload of the wrong type.
    """
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message is a JSON object with protocol, command and payload")
    protocol, command = msg.get("protocol"), msg.get("command")
    if not isinstance(protocol, str) or not isinstance(command, str):
        raise ProtocolError("protocol and command must be strings")
    payload = msg.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ProtocolError(f"{protocol}:{command}: payload must be an object")
    # 0.7 clients put the secret in the payload; 0.8+ at the top.
    secret = msg.get("secret", payload.get("secret"))
    rid = msg.get("requestId")
    return Message(protocol, command, payload, secret if isinstance(secret, str) else None,
                   rid if isinstance(rid, str) else None)


def data_event_id(src: dict | None, tgt: dict) -> str:
    """noflo's name for an edge in network events: ``A() OUT -> IN B()``; ``DATA -> IN B()`` for an IIP."""
    head = "DATA" if src is None else f"{src['node']}() {src['port'].upper()}"
    return f"{head} -> {tgt['port'].upper()} {tgt['node']}()"


# -- actions the running network takes -------------------------------------------------------


@attrs.frozen
class Action:
    """What the running network must do for an edit. ``kind`` is one of
    ``start_node`` (node, component, config), ``stop_node`` (node),
    ``drain_node`` (node: wait until it has nothing queued or in hand),
    ``add_route`` / ``remove_route`` (src, src_port, tgt, tgt_port),
    ``send_iip`` (tgt, tgt_port, data), ``stop_all`` (nothing)."""

    kind: str
    node: str = ""
    component: str = ""
    config: dict = attrs.field(factory=dict)
    port: str = ""
    tgt: str = ""
    tgt_port: str = ""
    data: Any = None


def _route(kind: str, edge: dict) -> Action:
    return Action(kind, node=edge["src"]["node"], port=edge["src"]["port"],
                  tgt=edge["tgt"]["node"], tgt_port=edge["tgt"]["port"])


# -- the graph ---------------------------------------------------------------------------------


def _name(payload: dict, key: str, what: str) -> str:
    v = payload.get(key)
    if not isinstance(v, str) or not v:
        raise GraphError(f"{what} must be a non-empty string ({key!r})")
    if len(v) > MAX_NAME:
        raise GraphError(f"{what} {v[:40]!r}… is longer than {MAX_NAME} characters")
    if any(c in v for c in "\x00\n\r") or any(c in v for c in ":{}") and key in ("id", "to") and what.startswith("node"):
        raise GraphError(f"{what} {v!r} may not contain ':', '{{', '}}' or control characters")
    return v


def _port(payload: dict, key: str) -> dict:
    ref = payload.get(key)
    if not isinstance(ref, dict):
        raise GraphError(f"{key} must be an object with node and port")
    out = {"node": _name(ref, "node", f"{key}.node"), "port": _name(ref, "port", f"{key}.port")}
    if "index" in ref and ref["index"] is not None:
        if isinstance(ref["index"], bool) or not isinstance(ref["index"], (int, float, str)):
            raise GraphError(f"{key}.index must be a number or a string")
        out["index"] = ref["index"]
    return out


def _metadata(payload: dict) -> dict:
    md = payload.get("metadata", {})
    if md is None:
        return {}
    if not isinstance(md, dict):
        raise GraphError("metadata must be an object")
    return md


def _merge(old: dict, new: dict) -> dict:
    """noflo's metadata merge: keys set, a null value removes its key."""
    out = dict(old)
    for k, v in new.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _same(a: dict, b: dict) -> bool:
    return a["node"] == b["node"] and a["port"] == b["port"] and a.get("index") == b.get("index")


@attrs.define
class Graph:
    """One FBP graph: nodes, edges, initial packets (IIPs), exported ports and groups.

    A node is ``{component, metadata, config}``; ``config`` is reflow.yaml's
    ``processes.NAME.config`` (what the process's ``context.get_config()`` returns),
    kept and written back as it is. Ports are ``{node, port[, index]}``, as the
    protocol writes them; the JSON file writes ``{process, port}``, as noflo does."""

    id: str = "main"
    name: str = ""
    library: str | None = None
    main: bool = True
    icon: str | None = None
    nodes: dict[str, dict] = attrs.field(factory=dict)     # id -> {component, metadata, config}
    edges: list[dict] = attrs.field(factory=list)          # {src, tgt, metadata}
    iips: list[dict] = attrs.field(factory=list)           # {data, tgt, metadata}
    inports: dict[str, dict] = attrs.field(factory=dict)   # public -> {node, port, metadata}
    outports: dict[str, dict] = attrs.field(factory=dict)
    groups: list[dict] = attrs.field(factory=list)         # {name, nodes, metadata}: an editor's, not run
    properties: dict = attrs.field(factory=dict)

    # -- noflo graph JSON ------------------------------------------------------------------
    @classmethod
    def from_json(cls, doc: Any, *, graph_id: str = "main") -> Graph:
        """A noflo graph JSON document (or reflow.yaml's ``network:`` mapping) → a Graph.

        Raises:
            GraphError: not the shape (the message names the key).
        """
        if not isinstance(doc, dict):
            raise GraphError("a graph is a JSON object with processes and connections")
        props = doc.get("properties") if isinstance(doc.get("properties"), dict) else {}
        g = cls(id=str(props.get("id") or graph_id), name=str(props.get("name") or ""),
                library=props.get("library") if isinstance(props.get("library"), str) else None,
                main=bool(props.get("main", True)),
                icon=props.get("icon") if isinstance(props.get("icon"), str) else None,
                properties={k: v for k, v in props.items() if k not in ("id", "name", "library", "main", "icon")})
        procs = doc.get("processes") or {}
        if not isinstance(procs, dict):
            raise GraphError("processes must be an object of name -> {component}")
        for name, p in procs.items():
            if not isinstance(p, dict) or not isinstance(p.get("component"), str):
                raise GraphError(f"processes.{name}.component must be a string")
            g.nodes[str(name)] = {"component": p["component"], "metadata": dict(p.get("metadata") or {}),
                                  "config": dict(p.get("config") or {})}
        for i, c in enumerate(doc.get("connections") or ()):
            if not isinstance(c, dict) or "tgt" not in c:
                raise GraphError(f"connections[{i}] needs a tgt")
            tgt = _json_ref(c["tgt"], f"connections[{i}].tgt")
            md = dict(c.get("metadata") or {})
            if c.get("src") is not None:
                g.edges.append({"src": _json_ref(c["src"], f"connections[{i}].src"), "tgt": tgt, "metadata": md})
            else:
                g.iips.append({"data": c.get("data"), "tgt": tgt, "metadata": md})
        for kind in ("inports", "outports"):
            ports = doc.get(kind) or {}
            if not isinstance(ports, dict):
                raise GraphError(f"{kind} must be an object of public name -> {{process, port}}")
            for public, ref in ports.items():
                r = _json_ref(ref, f"{kind}.{public}")
                getattr(g, kind)[str(public)] = {**r, "metadata": dict((ref or {}).get("metadata") or {})}
        groups = doc.get("groups") or []
        if not isinstance(groups, list):
            raise GraphError("groups must be a list of {name, nodes}")
        for i, grp in enumerate(groups):
            if not isinstance(grp, dict) or not isinstance(grp.get("name"), str) \
                    or not isinstance(grp.get("nodes", []), list):
                raise GraphError(f"groups[{i}] must be an object with name and nodes")
            g.groups.append({"name": grp["name"], "nodes": [str(n) for n in grp.get("nodes", [])],
                             "metadata": dict(grp.get("metadata") or {})})
        return g

    def to_json(self) -> dict:
        """This graph as noflo graph JSON; ``from_json(to_json())`` is the same graph."""
        props: dict[str, Any] = {**self.properties, "id": self.id, "name": self.name, "main": self.main}
        if self.library is not None:
            props["library"] = self.library
        if self.icon is not None:
            props["icon"] = self.icon
        procs = {}
        for nid, n in self.nodes.items():
            p: dict[str, Any] = {"component": n["component"], "metadata": n["metadata"]}
            if n.get("config"):
                p["config"] = n["config"]
            procs[nid] = p
        conns: list[dict] = []
        for e in self.edges:
            conns.append({"src": _to_json_ref(e["src"]), "tgt": _to_json_ref(e["tgt"]),
                          **({"metadata": e["metadata"]} if e["metadata"] else {})})
        for iip in self.iips:
            conns.append({"data": iip["data"], "tgt": _to_json_ref(iip["tgt"]),
                          **({"metadata": iip["metadata"]} if iip["metadata"] else {})})
        out: dict[str, Any] = {"properties": props, "processes": procs, "connections": conns}
        if self.groups:
            out["groups"] = [{"name": grp["name"], "nodes": list(grp["nodes"]),
                              **({"metadata": grp["metadata"]} if grp["metadata"] else {})} for grp in self.groups]
        for kind in ("inports", "outports"):
            out[kind] = {pub: {"process": r["node"], "port": r["port"],
                               **({"metadata": r["metadata"]} if r.get("metadata") else {})}
                         for pub, r in getattr(self, kind).items()}
        return out

    # -- what the running network is -------------------------------------------------------
    def start_actions(self) -> list[Action]:
        """Everything a network:start does: every node, every edge, then every IIP."""
        acts = [Action("start_node", node=n, component=v["component"], config=v.get("config") or {})
                for n, v in self.nodes.items()]
        acts += [_route("add_route", e) for e in self.edges]
        acts += [Action("send_iip", tgt=i["tgt"]["node"], tgt_port=i["tgt"]["port"], data=i["data"])
                 for i in self.iips]
        return acts

    def stop_actions(self) -> list[Action]:
        """A network:stop: every node stops (finishing the message in hand), upstream ones
        first, so that no output is sent to a node already stopped; then the edges go. What
        is still queued stays in the durable mailboxes for the next start."""
        return [Action("stop_node", node=n) for n in self.upstream_first()] + \
            [_route("remove_route", e) for e in self.edges]

    def upstream_first(self) -> list[str]:
        """The nodes, each after every node with an edge into it (a cycle is cut where it
        is met, in node order)."""
        into: dict[str, set[str]] = {n: set() for n in self.nodes}
        for e in self.edges:
            if e["tgt"]["node"] in into and e["src"]["node"] != e["tgt"]["node"]:
                into[e["tgt"]["node"]].add(e["src"]["node"])
        order: list[str] = []
        done: set[str] = set()
        while len(order) < len(into):
            ready = [n for n in into if n not in done and into[n] <= done]
            if not ready:  # a cycle: take the first node left
                ready = [next(n for n in into if n not in done)]
            for n in ready:
                order.append(n)
                done.add(n)
        return order

    # -- edits ---------------------------------------------------------------------------------
    def apply(self, command: str, payload: dict, known: Any = lambda c: True
              ) -> tuple[list[tuple[str, dict]], list[Action]]:
        """One ``graph:`` edit (not ``clear``). Returns the messages to send back
        (command, payload) and the network's actions. ``known(component)`` → bool.

        Raises:
            GraphError: the edit cannot be made (unknown node, duplicate id, …); nothing changed.
        """
        fn = getattr(self, f"_cmd_{command}", None)
        if fn is None:
            raise GraphError(f"unknown graph command {command!r}")
        return fn(payload, known)

    def _echo(self, command: str, payload: dict) -> tuple[str, dict]:
        return (command, {**payload, "graph": self.id})

    def _cmd_addnode(self, p: dict, known: Any):
        nid = _name(p, "id", "node id")
        comp = _name(p, "component", "component")
        if nid in self.nodes:
            raise GraphError(f"node {nid!r} already exists")
        if not known(comp):
            raise GraphError(f"component {comp!r} not available")
        md = _metadata(p)
        self.nodes[nid] = {"component": comp, "metadata": md, "config": {}}
        return [self._echo("addnode", {"id": nid, "component": comp, "metadata": md})], \
            [Action("start_node", node=nid, component=comp)]

    def _node(self, p: dict, key: str = "id") -> str:
        nid = _name(p, key, "node id")
        if nid not in self.nodes:
            raise GraphError(f"node {nid!r} not found")
        return nid

    def _cmd_removenode(self, p: dict, known: Any):
        nid = self._node(p)
        replies = []
        # Lossless: nothing new reaches the node, it finishes what it has (its outputs still
        # routed), then its outgoing edges go and it stops.
        incoming = [e for e in self.edges if e["tgt"]["node"] == nid]
        outgoing = [e for e in self.edges if e["src"]["node"] == nid and e not in incoming]
        acts = [_route("remove_route", e) for e in incoming] + [Action("drain_node", node=nid)]
        acts += [_route("remove_route", e) for e in outgoing]
        for e in incoming + outgoing:
            self.edges.remove(e)
            replies.append(self._echo("removeedge", {"src": e["src"], "tgt": e["tgt"]}))
        for i in [i for i in self.iips if i["tgt"]["node"] == nid]:
            self.iips.remove(i)
            replies.append(self._echo("removeinitial", {"src": {"data": i["data"]}, "tgt": i["tgt"]}))
        for kind, cmd in (("inports", "removeinport"), ("outports", "removeoutport")):
            ports = getattr(self, kind)
            for pub in [k for k, r in ports.items() if r["node"] == nid]:
                del ports[pub]
                replies.append(self._echo(cmd, {"public": pub}))
        for grp in self.groups:
            if nid in grp["nodes"]:
                grp["nodes"].remove(nid)
        del self.nodes[nid]
        replies.append(self._echo("removenode", {"id": nid}))
        acts.append(Action("stop_node", node=nid))
        return replies, acts

    def _cmd_renamenode(self, p: dict, known: Any):
        old = self._node(p, "from")
        new = _name(p, "to", "node id")
        if new == old:
            return [self._echo("renamenode", {"from": old, "to": new})], []
        if new in self.nodes:
            raise GraphError(f"node {new!r} already exists")
        node = self.nodes.pop(old)
        self.nodes[new] = node
        incoming = [_route("remove_route", e) for e in self.edges if e["tgt"]["node"] == old]
        outgoing = [_route("remove_route", e) for e in self.edges
                    if e["src"]["node"] == old and e["tgt"]["node"] != old]
        for e in self.edges:
            for end in ("src", "tgt"):
                if e[end]["node"] == old:
                    e[end] = {**e[end], "node": new}
        for i in self.iips:
            if i["tgt"]["node"] == old:
                i["tgt"] = {**i["tgt"], "node": new}
        for ports in (self.inports, self.outports):
            for r in ports.values():
                if r["node"] == old:
                    r["node"] = new
        for grp in self.groups:
            grp["nodes"] = [new if n == old else n for n in grp["nodes"]]
        # A process's name is its mailbox and state: renamed, it starts as a new process
        # beside the old one, which finishes what it has before it stops (nothing is lost).
        acts = [Action("start_node", node=new, component=node["component"], config=node.get("config") or {})]
        acts += [_route("add_route", e) for e in self.edges if new in (e["src"]["node"], e["tgt"]["node"])]
        acts += incoming + [Action("drain_node", node=old)] + outgoing + [Action("stop_node", node=old)]
        return [self._echo("renamenode", {"from": old, "to": new})], acts

    def _cmd_changenode(self, p: dict, known: Any):
        nid = self._node(p)
        node = self.nodes[nid]
        node["metadata"] = _merge(node["metadata"], _metadata(p))
        return [self._echo("changenode", {"id": nid, "metadata": node["metadata"]})], []

    def _edge_ends(self, p: dict) -> tuple[dict, dict]:
        src, tgt = _port(p, "src"), _port(p, "tgt")
        for end, ref in (("src", src), ("tgt", tgt)):
            if ref["node"] not in self.nodes:
                raise GraphError(f"{end} node {ref['node']!r} not found")
        return src, tgt

    def _find_edge(self, src: dict, tgt: dict) -> dict:
        for e in self.edges:
            if _same(e["src"], src) and _same(e["tgt"], tgt):
                return e
        raise GraphError(f"edge {data_event_id(src, tgt)} not found")

    def _cmd_addedge(self, p: dict, known: Any):
        src, tgt = self._edge_ends(p)
        if any(_same(e["src"], src) and _same(e["tgt"], tgt) for e in self.edges):
            raise GraphError(f"edge {data_event_id(src, tgt)} already exists")
        edge = {"src": src, "tgt": tgt, "metadata": _metadata(p)}
        self.edges.append(edge)
        return [self._echo("addedge", {"src": src, "tgt": tgt, "metadata": edge["metadata"]})], \
            [_route("add_route", edge)]

    def _cmd_removeedge(self, p: dict, known: Any):
        src, tgt = _port(p, "src"), _port(p, "tgt")
        edge = self._find_edge(src, tgt)
        self.edges.remove(edge)
        return [self._echo("removeedge", {"src": edge["src"], "tgt": edge["tgt"]})], [_route("remove_route", edge)]

    def _cmd_changeedge(self, p: dict, known: Any):
        edge = self._find_edge(_port(p, "src"), _port(p, "tgt"))
        edge["metadata"] = _merge(edge["metadata"], _metadata(p))
        return [self._echo("changeedge", {"src": edge["src"], "tgt": edge["tgt"],
                                          "metadata": edge["metadata"]})], []

    def _cmd_addinitial(self, p: dict, known: Any):
        src = p.get("src")
        if not isinstance(src, dict) or "data" not in src:
            raise GraphError("src must be an object with data")
        tgt = _port(p, "tgt")
        if tgt["node"] not in self.nodes:
            raise GraphError(f"tgt node {tgt['node']!r} not found")
        iip = {"data": src["data"], "tgt": tgt, "metadata": _metadata(p)}
        self.iips.append(iip)
        return [self._echo("addinitial", {"src": {"data": iip["data"]}, "tgt": tgt, "metadata": iip["metadata"]})], \
            [Action("send_iip", tgt=tgt["node"], tgt_port=tgt["port"], data=iip["data"])]

    def _cmd_removeinitial(self, p: dict, known: Any):
        tgt = _port(p, "tgt")
        for iip in self.iips:
            if _same(iip["tgt"], tgt):
                self.iips.remove(iip)
                return [self._echo("removeinitial", {"src": {"data": iip["data"]}, "tgt": iip["tgt"]})], []
        raise GraphError(f"no initial packet for {tgt['node']}.{tgt['port']}")

    def _exported(self, kind: str, p: dict, known: Any, cmd: str):
        pub = _name(p, "public", "public port")
        nid = self._node(p, "node")
        port = _name(p, "port", "port")
        md = _metadata(p)
        getattr(self, kind)[pub] = {"node": nid, "port": port, "metadata": md}
        return [self._echo(cmd, {"public": pub, "node": nid, "port": port, **({"metadata": md} if md else {})})], []

    def _unexport(self, kind: str, p: dict, cmd: str):
        pub = _name(p, "public", "public port")
        if pub not in getattr(self, kind):
            raise GraphError(f"{kind[:-1]} {pub!r} not found")
        del getattr(self, kind)[pub]
        return [self._echo(cmd, {"public": pub})], []

    def _rename_export(self, kind: str, p: dict, cmd: str):
        old, new = _name(p, "from", "public port"), _name(p, "to", "public port")
        ports = getattr(self, kind)
        if old not in ports:
            raise GraphError(f"{kind[:-1]} {old!r} not found")
        if new != old and new in ports:
            raise GraphError(f"{kind[:-1]} {new!r} already exists")
        ports[new] = ports.pop(old)
        return [self._echo(cmd, {"from": old, "to": new})], []

    def _cmd_addinport(self, p, known):
        return self._exported("inports", p, known, "addinport")

    def _cmd_addoutport(self, p, known):
        return self._exported("outports", p, known, "addoutport")

    def _cmd_removeinport(self, p, known):
        return self._unexport("inports", p, "removeinport")

    def _cmd_removeoutport(self, p, known):
        return self._unexport("outports", p, "removeoutport")

    def _cmd_renameinport(self, p, known):
        return self._rename_export("inports", p, "renameinport")

    def _cmd_renameoutport(self, p, known):
        return self._rename_export("outports", p, "renameoutport")

    # groups: an editor's grouping of nodes; the running network does not change
    def _group(self, name: str) -> dict:
        for grp in self.groups:
            if grp["name"] == name:
                return grp
        raise GraphError(f"group {name!r} not found")

    def _cmd_addgroup(self, p, known):
        name = _name(p, "name", "group name")
        nodes = p.get("nodes")
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise GraphError("nodes must be a list of node ids")
        if any(grp["name"] == name for grp in self.groups):
            raise GraphError(f"group {name!r} already exists")
        missing = [n for n in nodes if n not in self.nodes]
        if missing:
            raise GraphError(f"node {missing[0]!r} not found")
        md = _metadata(p)
        self.groups.append({"name": name, "nodes": list(nodes), "metadata": md})
        return [self._echo("addgroup", {"name": name, "nodes": list(nodes), **({"metadata": md} if md else {})})], []

    def _cmd_removegroup(self, p, known):
        grp = self._group(_name(p, "name", "group name"))
        self.groups.remove(grp)
        return [self._echo("removegroup", {"name": grp["name"]})], []

    def _cmd_renamegroup(self, p, known):
        grp = self._group(_name(p, "from", "group name"))
        new = _name(p, "to", "group name")
        if new != grp["name"] and any(g["name"] == new for g in self.groups):
            raise GraphError(f"group {new!r} already exists")
        old, grp["name"] = grp["name"], new
        return [self._echo("renamegroup", {"from": old, "to": new})], []

    def _cmd_changegroup(self, p, known):
        grp = self._group(_name(p, "name", "group name"))
        grp["metadata"] = _merge(grp["metadata"], _metadata(p))
        return [self._echo("changegroup", {"name": grp["name"], "metadata": grp["metadata"]})], []

    def copy(self) -> Graph:
        return copy.deepcopy(self)


def _json_ref(ref: Any, where: str) -> dict:
    if not isinstance(ref, dict) or not isinstance(ref.get("process"), str) or not isinstance(ref.get("port"), str):
        raise GraphError(f"{where} must be an object with process and port")
    out = {"node": ref["process"], "port": ref["port"]}
    if ref.get("index") is not None:
        out["index"] = ref["index"]
    return out


def _to_json_ref(ref: dict) -> dict:
    out = {"process": ref["node"], "port": ref["port"]}
    if "index" in ref:
        out["index"] = ref["index"]
    return out
