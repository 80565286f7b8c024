"""The WebSocket JSON-RPC 2.0 API (CONTRACT §4), a thin trio shell.

Each connection owns a reader (this handler's task) and a writer task draining a
bounded queue (a client that stops reading is disconnected instead of growing
host memory). A request that never waits is answered where its frame is read.
A call waiting for its message with no timeout is answered from the message's
completion callback; every other waiting request gets a task in its own cancel
scope. Either way it is in ``in_flight`` from the moment it is read, so that
``$/cancelRequest`` and disconnects cancel exactly what they should. Frames are
decoded and validated by the pure :mod:`supervisor.core.protocol`; the answers a request
gets when it gets no result (an error, cancelled, a frame too large) are built by the
pure :mod:`supervisor.core.jsonrpc`, which the client (``_peer``) shares.
"""

from __future__ import annotations

import base64
import functools
import hmac
import itertools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio
import trio_websocket

from .core import jsonrpc as rpc
from .core import protocol as proto
from .core.messages import Envelope
from ._mailbox import list_deadletters, replay_deadletter
from ._cluster import LOCAL
from .core.errors import ActorMoved, ActorTimedOut, InvalidParams, Overloaded
from ._fbp import FbpHost, serve_fbp
from ._http import query_token_ok, serve_front
from ._watch import WatchedHost, Watchers
from ._wsio import MESSAGE_QUEUE, deliver, get_messages, send_messages, send_now

__all__ = ["serve_api"]

log = logging.getLogger("supervisor.rpc")
SEND_QUEUE = 1024
# Bytes a connection may have waiting to be sent before it is cut off as not reading: the
# host's memory for stalled clients is bounded by max_connections × this. (One frame larger
# than this still goes out when nothing else waits.)
SEND_BUFFER = 1 << 20
# The writer joins queued frames into one write up to about this many bytes.
WRITE_COALESCE = 1 << 16
_MESSAGE_METHODS = frozenset({"actor.call", "actor.send", "process"})
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a Redis stream entry id, as dead letters have
_sub_ids = itertools.count(1)


class Backend(WatchedHost, FbpHost, Protocol):
    """What the API asks of the host it serves (``Host`` implements it), besides what the
    dashboard's watchers, /metrics and the FBP runtime beside it ask: named here, so that
    the server needs nothing of the host's module."""

    api: Any                     # set to the Api once it serves (the host's status reads it)
    stopping: bool
    cluster: Any                 # _cluster.Cluster: this host's id and its view of the others
    forwarder: Any               # _cluster.Forwarder: requests for processes other hosts own

    def wake(self, process: str) -> None: ...  # its inbox has new entries (here or on its owner)

    def cell(self, name: Any) -> Any: ...  # the ActorCell named, or UnknownActor

    def list_actors(self) -> list[dict]: ...

    def enqueue_durable(self, cell: Any, inputs: dict) -> Callable[[], Awaitable[str]]: ...

    def enqueue_memory(self, cell: Any, inputs: dict) -> str: ...

    async def restart_actor(self, name: str) -> None: ...


async def serve_api(host: Backend, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on ``workspace.websocket``, and the dashboard and /metrics beside it
    (plain HTTP on the same port, see _http); reports the WebSocketServer through task_status."""
    cfg = host.config.workspace.websocket
    api = Api(host)
    await serve_front(
        # trio-websocket closes (1009) past its limit without a word: give it twice ours, so
        # that a frame just over max_frame_size gets an error reply before the close.
        api.handle, host, api.watchers, max_message_size=2 * cfg.max_frame_size,
        message_queue_size=MESSAGE_QUEUE, connect_timeout=10, disconnect_timeout=5, task_status=task_status)


class Api:
    def __init__(self, host: Backend):
        self.host = host
        self.cfg = host.config.workspace.websocket
        self.connections = 0
        self.watchers = Watchers(host)  # supervisor.watch (see _watch)
        self.live: set[Connection] = set()
        host.api = self
        # Every method has one of three forms, by what it waits for. ``now``: nothing, so it
        # is answered where its frame is read (no task, which is most of what a small request
        # costs). ``start``: a synchronous first step, run when the request is read, that
        # returns what is left to await; a durable actor.send queues its Redis command there
        # and a call its message, so messages keep the order they were sent in (and a
        # ``Later`` with no timeout needs no task at all). ``tasks``: the whole method runs
        # in the request's task.
        self.now: dict[str, Callable[[Connection, Any], Any]] = {}
        self.start: dict[str, Callable[[Connection, Any], _Run]] = {
            "actor.call": self.actor_call_start, "process": self.process_start}
        if host.durable:
            self.start["actor.send"] = self.actor_send_start
        else:
            self.now["actor.send"] = self.actor_send_now
        self.tasks: dict[str, Callable[[Connection, Any], Awaitable[Any]]] = {
            "actors.list": self.actors_list,
            "actor.subscribe": self.actor_subscribe,
            "actor.unsubscribe": self.actor_unsubscribe,
            "actor.restart": self.actor_restart,
            "supervisor.status": self.supervisor_status,
            "deadletters.list": self.deadletters_list,
            "deadletters.replay": self.deadletters_replay,
            "supervisor.watch": self.watchers.watch,
        }
        self.methods = frozenset(self.now) | frozenset(self.start) | frozenset(self.tasks)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        """One client, from its handshake to its close. Never raises but Cancelled: an
        exception here would end trio-websocket's server, and with it every client."""
        try:
            await self._handle(request)
        except* trio_websocket.ConnectionClosed:
            pass  # the client left during the handshake
        except* Exception as group:  # a bug of ours
            log.error("internal error with client %s", _peer_of(request), exc_info=group)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        if "noflo" in request.proposed_subprotocols:  # the FBP Network Protocol (CONTRACT §7)
            # (its secret is checked per message: browsers send no header)
            await serve_fbp(self, request)
            return
        token = self.cfg.token
        if token is not None:
            auth = dict(request.headers).get(b"authorization", b"")
            # (a browser's WebSocket cannot send headers: the dashboard sends ?token=)
            if not hmac.compare_digest(auth, b"Bearer " + token.encode()) and not query_token_ok(request.path, token):
                await request.reject(401, body=b"unauthorized: send Authorization: Bearer <token>\n")
                return
        if self.connections >= self.cfg.max_connections or self.host.stopping:
            await request.reject(503, body=b"too many connections\n")
            return
        ws = await request.accept()
        conn = Connection(self, ws)
        self.connections += 1
        self.live.add(conn)
        try:
            await conn.run()
        finally:
            self.connections -= 1
            self.live.discard(conn)

    def status(self) -> dict:
        """What the API holds for its clients (``supervisor.status``'s ``api``): a client
        that left and still holds any of it is a leak."""
        live = self.live
        return {"connections": len(live), "in_flight": sum(len(c.in_flight) for c in live),
                "subscriptions": sum(len(c.subscriptions) for c in live),
                "subscribers": sum(len(cell.subscribers) for cell in self.host.cells.values()),
                "tasks": sum(len(c._nursery.child_tasks) for c in live if c._nursery is not None)}

    # -- methods ------------------------------------------------------------
    async def actors_list(self, conn: Connection, params: Any) -> Any:
        return {"actors": self.host.list_actors()}

    async def supervisor_status(self, conn: Connection, params: Any) -> Any:
        return self.host.status()

    def _remote(self, cell: Any, params: dict) -> bool:
        """Whether a request for ``cell`` goes to the host that owns it (CONTRACT §6). One that
        another host forwarded here is served here or refused as moved, never sent on."""
        if cell.ownership.held or self.host.forwarder is None:
            return False
        if params.get("$forwarded") is True:
            raise ActorMoved(cell.name, f"this host ({self.host.cluster.id}) does not hold it")
        return True

    def _forward(self, conn: Connection, cell: Any, method: str, params: dict,
                 local: Callable[[Connection, Any], Any], notes: str | None = None) -> _Run:
        """The rest of a request served by the host that owns ``cell``'s process (or here,
        if this host holds it by the time the forwarder looks: ``local``). ``notes``: the
        notification the owner sends for this request meanwhile (``process``'s ``output``),
        passed on to the caller as it comes."""
        def note(params: dict) -> None:
            assert notes is not None
            conn.notify(notes, params)

        async def result() -> Any:
            answer = await self.host.forwarder.request(cell.name, method, params,
                                                       on_note=note if notes is not None else None)
            if answer is not LOCAL:
                return answer
            later = local(conn, params)
            return await later()
        return result

    def actor_call_start(self, conn: Connection, params: Any) -> Later | _Run:
        """actor.call, step one (see ``start``): the message is in the mailbox."""
        p = _object(params, required=("actor", "inputs"))
        cell = self.host.cell(p["actor"])
        if self._remote(cell, p):
            return self._forward(conn, cell, "actor.call", p, self.actor_call_start)
        inputs = p["inputs"]
        if not isinstance(inputs, dict):
            raise InvalidParams("inputs must be an object of port -> value")
        timeout = _timeout(p.get("timeout"))
        env = Envelope(inputs=_wrap_all(inputs))
        cell.submit(env)
        return Later(env, Envelope.result, timeout, cell.name)

    def actor_send_now(self, conn: Connection, params: Any) -> Any:
        """actor.send into a memory mailbox: nothing to wait for, so no task (see ``now``)."""
        cell, inputs = self._send_args(params)
        return {"message_id": self.host.enqueue_memory(cell, inputs)}

    def actor_send_memory_start(self, conn: Connection, params: Any) -> _Run:
        """actor.send into a memory mailbox while other hosts are up (``hosts_changed``): a
        memory mailbox lives on its owner's host, so there the send is forwarded."""
        cell, inputs = self._send_args(params)
        if self._remote(cell, params):
            return self._forward(conn, cell, "actor.send", params, self.actor_send_memory_start)
        return _ready({"message_id": self.host.enqueue_memory(cell, inputs)})

    def hosts_changed(self, hosts: int) -> None:
        """With memory mailboxes, actor.send needs a task only while it may be forwarded."""
        if self.host.durable:
            return
        if hosts > 1:
            self.now.pop("actor.send", None)
            self.start["actor.send"] = self.actor_send_memory_start
        else:
            self.start.pop("actor.send", None)
            self.now["actor.send"] = self.actor_send_now

    def _send_args(self, params: Any) -> tuple[Any, dict]:
        p = _object(params, required=("actor", "port", "value"))
        cell = self.host.cell(p["actor"])
        if not isinstance(p["port"], str):
            raise InvalidParams("port must be a string")
        return cell, {p["port"]: _wrap(p["value"])}

    def actor_send_start(self, conn: Connection, params: Any) -> Callable[[], Awaitable[Any]]:
        """actor.send into a durable mailbox, step one (see ``start``): queued for Redis now."""
        cell, inputs = self._send_args(params)
        accepted = self.host.enqueue_durable(cell, inputs)

        async def result() -> Any:
            return {"message_id": await accepted()}
        return result

    async def actor_subscribe(self, conn: Connection, params: Any) -> Any:
        p = _object(params, required=("actor",))
        cell = self.host.cell(p["actor"])
        port = p.get("port")
        sid = f"sub{next(_sub_ids)}"
        if self._remote(cell, p):
            return self._relay(conn, cell, port, sid)
        _subscribe_here(conn, cell, port, sid)
        return {"subscription": sid}

    async def actor_unsubscribe(self, conn: Connection, params: Any) -> Any:
        p = _object(params, required=("subscription",))
        entry = conn.subscriptions.pop(p["subscription"], None)
        if entry is None:
            raise InvalidParams(f"no subscription {p['subscription']!r} on this connection")
        cell, key = entry
        cell.subscribers.pop(key, None)
        return {}

    def _relay(self, conn: Connection, cell: Any, port: Any, sid: str) -> dict:
        """actor.subscribe for a process another host owns: its outputs come from that host
        (following the process as it moves) until the client unsubscribes or leaves."""
        relays = _Relays()
        scope = trio.CancelScope()
        relays[0] = scope
        conn.subscriptions[sid] = (relays, 0)

        def deliver(note: dict) -> None:
            conn.notify("actor.output", {**note, "subscription": sid})

        async def relay() -> None:
            with scope:
                await self.host.forwarder.relay(cell.name, port if isinstance(port, str) else None, deliver)
                # (this host holds it now: the rest comes from the cell here)
                if conn.subscriptions.get(sid) == (relays, 0):
                    _subscribe_here(conn, cell, port, sid)

        assert conn._nursery is not None, "a connection's requests run inside its nursery"
        conn._nursery.start_soon(relay)
        return {"subscription": sid}

    async def actor_restart(self, conn: Connection, params: Any) -> Any:
        p = _object(params, required=("actor",))
        cell = self.host.cell(p["actor"])
        if self._remote(cell, p):
            answer = await self.host.forwarder.request(cell.name, "actor.restart", p)
            if answer is not LOCAL:
                return answer
        await self.host.restart_actor(p["actor"])
        return {}

    async def deadletters_list(self, conn: Connection, params: Any) -> Any:
        # CONTRACT §4 names it ``count``; ``limit`` was this host's name for it before and still works.
        p = _object({} if params is None else params, required=())
        count = p.get("count", p.get("limit", 100))
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidParams("count must be a positive integer")
        return {"deadletters": await list_deadletters(self.host.redis, self.host.keys, list(self.host.cells), count)}

    async def deadletters_replay(self, conn: Connection, params: Any) -> Any:
        p = _object(params, required=("id",))
        keys = self.host.keys

        def inbox_of(name: str) -> str:
            cell = self.host.cell(name)
            cell.durable_inbox.mark_unread()  # (added behind the feeder's back: no send may start ahead of it)
            return cell.inbox

        if not isinstance(p["id"], str) or not _STREAM_ID.fullmatch(keys.deadletter_ref(p["id"])[1]):
            looks = keys.deadletter_id("PROCESS", "1700000000000-0")
            raise InvalidParams(f"no dead letter {p['id']!r}: ids look like {looks!r} (see deadletters.list)")
        try:
            process = await replay_deadletter(self.host.redis, keys, p["id"], inbox_of)
        except KeyError:
            raise InvalidParams(f"no dead letter {p['id']!r}") from None
        self.host.wake(process)
        return {"process": process}

    def process_start(self, conn: Connection, params: Any) -> Later:
        """Reflow's WebSocketScriptActor call, step one: its ``ScriptActorContext`` in, plain
        JSON values both ways, mapped as Reflow's ``Message`` <-> ``serde_json::Value``
        conversions do (see :func:`_from_reflow`, :func:`_plain`). ``actor_id`` names a
        process, or a component run by one process (Rust sends the component's name).

        Raises:
            InvalidParams: a bad payload; an actor_id naming a component run by several
                processes (which one is meant cannot be told: name the process).
            UnknownActor: no such process or component.
        """
        p = _object(params, required=("actor_id", "payload"))
        cell = self.host.cell(p["actor_id"])
        if self._remote(cell, p):
            return self._forward(conn, cell, "process", p, self.process_start, notes="output")
        payload = p["payload"]
        if not isinstance(payload, dict):
            raise InvalidParams("payload must be an object of port -> value")
        actor_id = p["actor_id"]
        # Forwarded by another host (see _cluster.Forwarder.request): the outputs carry its
        # stream's id, by which that host's client tells them to this request.
        tag = p.get("$stream") if p.get("$forwarded") is True else None
        tagged = {"subscription": tag} if isinstance(tag, str) and 0 < len(tag) <= 64 else {}

        def stream(port: str, message: dict) -> None:
            # ScriptOutput's timestamp is a u64 (ms since the epoch): when the output happened.
            conn.notify("output", {"actor_id": actor_id, "port": port, "data": _plain(message),
                                   "timestamp": int(time.time() * 1000), **tagged})

        config = p.get("config")
        timeout = _timeout(p.get("timeout"))
        env = Envelope(inputs={str(k): _from_reflow(v) for k, v in payload.items()}, on_output=stream,
                       config=config if isinstance(config, dict) and config else None)
        cell.submit(env)
        return Later(env, _process_result, timeout, cell.name)


def _subscribe_here(conn: Connection, cell: Any, port: Any, sid: str) -> None:
    """Subscription ``sid`` to the outputs of ``cell`` (of ``port``, or all), which runs here."""
    def deliver(actor: str, out_port: str, message: dict, message_id: str) -> None:
        if port is None or port == out_port:
            conn.notify("actor.output", {"subscription": sid, "actor": actor, "port": out_port,
                                         "message": message, "message_id": message_id})

    key = id(deliver)
    cell.subscribers[key] = deliver
    conn.subscriptions[sid] = (cell, key)


class _Relays(dict):
    """Stands where a cell's ``subscribers`` would in ``Connection.subscriptions``: popping
    the relay's key (unsubscribe, or the connection's end) cancels the relay."""

    def pop(self, key: Any, default: Any = None) -> Any:
        scope = super().pop(key, default)
        if scope is not None:
            scope.cancel()
        return scope


def _ready(value: Any) -> _Run:
    async def result() -> Any:
        return value
    return result


async def wait_for(env: Envelope) -> dict:
    """``env``'s answer once it is finished (its ``on_done`` sets an event)."""
    if not env.finished:
        event = trio.Event()
        env.on_done = event.set
        await event.wait()
    return env.result()


@attrs.frozen
class Later:
    """The rest of a request that put a message in a mailbox: once the message is done,
    its answer is ``finish(env)``, unless ``timeout`` seconds pass first. Awaited by the
    request's task; a connection answers one without a timeout from ``env.on_done``."""

    env: Envelope
    finish: Callable[[Envelope], Any]
    timeout: float
    actor: str

    async def __call__(self) -> Any:
        with trio.move_on_after(self.timeout):
            await wait_for(self.env)
            return self.finish(self.env)
        raise ActorTimedOut(f"no answer from {self.actor!r} within {self.timeout:g}s", {"timeout": self.timeout})


def _process_result(env: Envelope) -> dict:
    return {"outputs": {k: _plain(v) for k, v in env.result()["outputs"].items()}}


def _plain(message: Any) -> Any:
    """A typed message as the JSON Reflow's ``Message::from(Value)`` reads: the value, except
    bytes → an array of numbers (what Rust's ``Message::Bytes`` becomes as a Value) and
    error → its message text (``Message::Error`` is a string); null → null (``Optional(None)``)."""
    if not proto.is_typed(message):
        return message
    kind, value = message["type"], message["value"]
    if kind == "bytes":
        data = value.data if isinstance(value, proto.Blob) else base64.b64decode(value)
        return list(bytes(data))
    if kind == "error":
        return str(value.get("message", "")) if isinstance(value, dict) else str(value)
    return value


def _from_reflow(value: Any) -> dict:
    """A payload value as Reflow's ``impl From<Message> for Value`` wrote it, as a typed
    message. JSON is taken as it is (an object that looks typed is still an object), except
    a non-empty array of integers 0-255: that is how ``Message::Bytes`` is written, so the
    script gets bytes. (The wire cannot tell it from a ``Message::Array`` of small integers;
    such an array reaches the script as bytes too, and goes back to Rust unchanged.)"""
    if isinstance(value, list):
        if value and all(type(x) is int and 0 <= x <= 255 for x in value):
            return {"type": "bytes", "value": proto.Blob(bytes(value))}
        return {"type": "array", "value": value}
    if isinstance(value, dict):
        return {"type": "object", "value": value}
    return proto.wrap(value)  # null, boolean, integer, float, string


def _object(params: Any, required: tuple[str, ...]) -> dict:
    if not isinstance(params, dict):
        raise InvalidParams("params must be an object")
    missing = [k for k in required if k not in params]
    if missing:
        raise InvalidParams(f"missing param{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    return params


def _wrap(value: Any) -> dict:
    try:
        return proto.wrap(value)
    except (ValueError, TypeError) as exc:
        raise InvalidParams(f"bad message value: {exc}") from exc


def _wrap_all(inputs: dict) -> dict:
    return {str(k): _wrap(v) for k, v in inputs.items()}


def _timeout(value: Any) -> float:
    if value is None:
        return float("inf")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidParams("timeout must be a positive number of seconds")
    return float(value)


class Connection:
    def __init__(self, api: Api, ws: trio_websocket.WebSocketConnection):
        self.api = api
        self.ws = ws
        self.peer = _peer_of(ws)  # (read now: once the client has gone, asking raises)
        self.in_flight: dict[Any, trio.CancelScope | _Waiting] = {}
        self.subscriptions: dict[str, tuple[Any, int]] = {}
        self._send, self._recv = trio.open_memory_channel[tuple[bytes | str | memoryview, int]](SEND_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._close_code: int | None = None
        self._writer_done = trio.Event()
        self._progress = trio.Event()  # set (and replaced) each time the writer sent frames
        self._reading = trio.CancelScope()  # cancelled by a frame too large to read
        self._ended = False
        self._queued = 0  # bytes waiting in the send queue
        # A client that sends binary frames gets bytes messages back in binary attachment
        # frames (raw, no base64); one that sends text gets JSON text only (CONTRACT §4).
        self.binary = False

    def queue(self, data: bytes, *, reply: bool = False, final: bool = False) -> None:
        """Queue a frame; a client that lets SEND_QUEUE frames pile up is cut off. Replies
        cannot get there (reading stops at half, and at most max_in_flight answers are
        pending), nor are they held to SEND_BUFFER (a large result is an answer the client
        asked for); notifications to a client that does not read are. ``final``: a reply
        that ends its request's work (see _reply_final)."""
        frame: str | bytes | memoryview = data if data[:1] == b"@" else data.decode()
        size = len(data)
        if final and not self._queued and not self.in_flight and not self._ended and self._close_code is None:
            # The one answer this client waits for, with nothing ahead of it, is written
            # here rather than by the writer, a trip through the scheduler later (a
            # sizeable part of a round trip at one call in flight). With more requests
            # in flight, answers go through the writer, which joins those that come together.
            rest = send_now(self.ws, frame)
            if rest is not None:
                if not rest:
                    return
                frame, size = rest, len(rest)  # the writer sends the rest first
        try:
            if not reply and self._queued and self._queued + size > SEND_BUFFER:
                raise trio.WouldBlock
            self._send.send_nowait((frame, size))
            self._queued += size
        except trio.WouldBlock:
            log.warning("client %s is not reading; closing it", self.peer)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        except trio.ClosedResourceError:
            pass

    def notify(self, method: str, params: dict) -> None:
        if self._ended:  # (a message's outputs may stream on after its caller left)
            return
        try:
            atts: list | None = [] if self.binary else None
            data = proto.encode(proto.Notification(method, params), atts)
            if atts:
                data = proto.attach(data, atts)
        except (TypeError, ValueError) as exc:
            log.error("dropped a %s notification that is not JSON: %s", method, exc)
            return
        self.queue(data)

    def reply(self, replies: list[Any], is_batch: bool, *, final: bool = False) -> None:
        """Queue the answer to one frame (``final``: see queue). A result that cannot be
        written as JSON (NaN, an integer orjson and the stdlib both refuse…) becomes -32603
        for that request alone; the other replies of a batch still go out."""
        if self._ended:  # (a batch or a message may finish after the client left)
            return
        atts: list | None = [] if self.binary else None
        try:
            data = proto.reply_frame(replies, is_batch, atts)
        except (TypeError, ValueError):
            atts = [] if self.binary else None
            data = proto.reply_frame(rpc.encodable(replies), is_batch, atts)
        if data is not None:
            self.queue(proto.attach(data, atts) if atts else data, reply=True, final=final)

    async def run(self) -> None:
        """Serve this connection until it closes. Whatever the client does, this returns
        normally (a bug of ours in handling one client is logged and ends that client only)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # The nursery closes to new tasks when its last child exits, which can be a
                # while before this task resumes; the reader (trio-websocket's task, see
                # _take) and every callback may run in between. So the connection ends
                # here, in the body, before the nursery can close: from then on nothing
                # starts work for it (see _end).
                try:
                    await self._serve(nursery)
                finally:
                    self._end()
        except* Exception as exc:  # a bug of ours: it must not take the other clients with it
            log.error("internal error serving client %s; closing it", self.peer, exc_info=exc)
        finally:
            self._end()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.ws.aclose()

    async def _serve(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._writer)
        nursery.start_soon(self._keepalive)
        # Requests are handled in trio-websocket's reader task as it reads them
        # (_take); where that cannot be arranged, this task reads them. Either way,
        # this task ends the connection once the reader stops.
        with self._reading:
            if self._dispatch_all(deliver(self.ws, self._take) or []):
                while True:
                    while self._backlogged():
                        await self._progress.wait()
                    try:
                        frames = await get_messages(self.ws)
                    except trio_websocket.ConnectionClosed:
                        break
                    if not self._dispatch_all(frames):
                        break
        if self._close_code is not None:
            with trio.move_on_after(2):
                await self._writer_done.wait()
        nursery.cancel_scope.cancel()

    def _end(self) -> None:
        """The connection is over (idempotent): nothing more is read or started for it, its
        subscriptions stop, what waits for a message's outcome stops waiting, and what is
        answered from now on is dropped (there is no one to send it to)."""
        if self._ended:
            return
        self._ended = True
        self._progress.set()  # (a reader waiting in _take: what it holds is not read)
        for cell, key in self.subscriptions.values():
            cell.subscribers.pop(key, None)
        self.subscriptions.clear()
        for waiting in list(self.in_flight.values()):  # (tasks are cancelled with the nursery)
            if isinstance(waiting, _Waiting):
                waiting.detach()
        self._send.close()

    async def _take(self, frame: str | bytes) -> None:
        """A frame, from trio-websocket's reader task as it reads it (see _wsio.deliver).
        Backpressure: while our answers to this client wait to be sent, the reader waits
        here, so its requests are no longer read (a fast pipeliner slows down; it is not
        cut off). After a frame too large, or once the connection ends, nothing is read."""
        while self._backlogged() and not self._ended:
            await self._progress.wait()
        if self._ended or self._close_code is not None:
            return
        try:
            if self._dispatch_all([frame]):
                return
        except Exception as exc:  # (raised here, it would end trio-websocket's server: every client)
            log.error("internal error reading from client %s; closing it", self.peer, exc_info=exc)
        self._reading.cancel()

    def _backlogged(self) -> bool:
        """Whether our answers to this client pile up waiting to be sent (while they can be)."""
        return not self._writer_done.is_set() and (
            self._send.statistics().current_buffer_used > SEND_QUEUE // 2 or self._queued > SEND_BUFFER // 2)

    def _dispatch_all(self, frames: list[str | bytes]) -> bool:
        """Handle frames read together, in order; False once one was too large (the
        connection closes; what followed it is not read, as ever)."""
        limit = self.api.cfg.max_frame_size
        for frame in frames:
            if self._ended:  # (nothing may start for a connection that is over)
                return False
            if isinstance(frame, bytes):
                self.binary = True
            if len(frame) > limit:
                self._too_large(len(frame), limit)
                return False
            self._dispatch(frame)
        return True

    def _too_large(self, size: int, limit: int) -> None:
        """Answer an oversized frame (unread, so id null) and close with 1009 once it is sent."""
        log.warning("client %s sent a %d-byte frame (max_frame_size %d); closing it", self.peer, size, limit)
        self.reply([rpc.FrameTooLarge(size, limit).reply()], False)
        self._close_code = 1009
        self._send.close()  # the writer sends what is queued, then closes

    async def _writer(self) -> None:
        try:
            async for data, size in self._recv:
                head = b""
                if isinstance(data, memoryview):  # what send_now left of an answer (see queue)
                    head, frames, sent = data, [], size
                else:
                    frames, sent = [data], size
                while sent < WRITE_COALESCE:  # what else is queued goes out in the same write
                    try:
                        data, size = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    frames.append(data)
                    sent += size
                try:
                    await send_messages(self.ws, frames, head)
                except trio_websocket.ConnectionClosed:
                    return
                self._queued -= sent
                self._progress.set()
                self._progress = trio.Event()
            if self._close_code is not None:
                await self.ws.aclose(self._close_code, "frame too large")
        finally:
            self._writer_done.set()
            self._progress.set()

    async def _keepalive(self) -> None:
        interval = self.api.cfg.ping_interval
        if not interval:
            return
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                try:
                    await self.ws.ping()
                except (trio_websocket.ConnectionClosed, ValueError):
                    return
            if scope.cancelled_caught:
                log.warning("client %s did not answer a ping in %gs; closing it", self.peer, interval)
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return

    def _dispatch(self, data: bytes | str) -> None:
        frame = proto.decode_frame(data)
        if not frame.is_batch and len(frame.items) == 1:
            item = frame.items[0]
            if isinstance(item, proto.Request):
                now = self._answer_now(item)
                if now is None:
                    self._begin(item, self._reply_one if item.method == "actor.send" else self._reply_final)
                else:
                    self._reply_one(now)
            elif (reply := self._immediate(item)) is not None:
                self._reply_one(reply)
            return
        # A batch's requests start in the order listed; its one reply frame goes out
        # when the last of them is answered.
        batch = _BatchReply(self)
        for item in frame.items:
            if not isinstance(item, proto.Request):
                batch.add(self._immediate(item))
            elif (now := self._answer_now(item)) is not None:
                batch.add(now)
            else:
                self._begin(item, batch.expect())
        batch.finish()

    def _reply_one(self, reply: Any) -> None:
        self.reply([reply], False)

    def _reply_final(self, reply: Any) -> None:
        """The answer to a request whose work it ends: an ``actor.call``'s, say, but not an
        ``actor.send``'s, whose message runs on and streams outputs after it. Written at
        once, the answer wakes the client while the host still works on that message, and
        the two compete for the cores: writing every answer at once made the durable
        send → output latency worse, not better."""
        self.reply([reply], False, final=True)

    def _answer_now(self, req: proto.Request) -> Any | None:
        """The reply to a request that never waits, computed here; None if it needs a task."""
        fn = self.api.now.get(req.method)
        if fn is None:
            return None
        if (refused := self._refused_when_stopping(req)) is not None:
            return refused
        self._log_request(req)
        return _answered(req, functools.partial(fn, self, req.params))

    def _log_request(self, req: proto.Request) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc request", extra={"id": req.id, "method": req.method, "peer": self.peer})

    def _refused_when_stopping(self, req: proto.Request) -> proto.ErrorResponse | None:
        if self.api.host.stopping and req.method in _MESSAGE_METHODS:
            return proto.error_response(req.id, Overloaded.code, "the host is shutting down; retry later")
        return None

    def _immediate(self, item: Any) -> Any:
        """Handle what needs no task: notifications, invalid entries, stray responses."""
        if isinstance(item, proto.Invalid):
            if item.notification:  # (refused for its params: a notification is never answered)
                log.warning("refused a notification: %s", item.error.message, extra={"code": item.error.code})
                return None
            return proto.invalid_to_reply(item)
        if isinstance(item, proto.Notification):
            if item.method == rpc.CANCEL_METHOD:
                waiting = self.in_flight.get(rpc.cancel_target(item.params))
                if waiting is not None:
                    waiting.cancel()
            elif item.method in self.api.methods:
                self._run_unanswered(item)
        return None

    def _run_unanswered(self, note: proto.Notification) -> None:
        """Execute a notification (JSON-RPC: a request whose answer the client does not
        want): a fire-and-forget ``actor.send`` must not be dropped. It is never answered,
        not even with an error; an error is logged. It counts against ``max_in_flight``
        under a key no client id can name, so it cannot be cancelled."""
        req = proto.Request(_Unanswered(), note.method, note.params)
        reply = self._answer_now(req)
        if reply is None:
            self._begin(req, functools.partial(_log_unanswered, req))
        else:
            _log_unanswered(req, reply)

    def _begin(self, req: proto.Request, answer: Callable[[Any], None]) -> None:
        """Start a request that waits; ``answer`` gets its reply. It is in ``in_flight`` at
        once, so that a ``$/cancelRequest`` in the very next frame finds it. One that waits
        for a message with no timeout is answered from the message's ``on_done`` (no task);
        any other runs in a task of its own, in its own cancel scope."""
        run = self._admit(req)
        if isinstance(run, proto.ErrorResponse):
            answer(run)
            return
        key = req.id  # (decoded: an int, a str or None; 1 and "1" are two keys)
        if isinstance(run, Later) and run.timeout == math.inf:
            self.in_flight[key] = _Waiting(self, key, req, run, answer)
            return
        scope = self.in_flight[key] = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._answer, req, scope, run, answer)

    async def _answer(self, req: proto.Request, scope: trio.CancelScope, run: _Run,
                      answer: Callable[[Any], None]) -> None:
        if self._ended:
            # Started, but first run after the connection ended: trio delivers the nursery's
            # cancel only at a checkpoint, and a method may do its work before its first one
            # (actor.subscribe would add a subscriber no one would ever remove).
            self.forget(req.id, scope)
            return
        answer(await self._call(req, scope, run))

    def _admit(self, req: proto.Request) -> _Run | proto.ErrorResponse:
        """Refuse a request, or run the method's first, synchronous step if it has one
        (``Api.start``: an actor.send or call takes its place in line here, in the order
        the frames list the requests) and return what is left to await."""
        if req.method not in self.api.methods:
            return rpc.method_not_found(req.id, req.method)
        if (refused := self._refused_when_stopping(req)) is not None:
            return refused
        if len(self.in_flight) >= self.api.cfg.max_in_flight:
            return proto.error_response(req.id, Overloaded.code, f"more than {self.api.cfg.max_in_flight} "
                                        "requests in flight on this connection; retry later")
        self._log_request(req)
        start = self.api.start.get(req.method)
        if start is None:
            return functools.partial(self.api.tasks[req.method], self, req.params)
        try:
            return start(self, req.params)
        except Exception as exc:
            return _error_reply(req, exc)

    async def _call(self, req: proto.Request, scope: trio.CancelScope, run: _Run) -> Any:
        try:
            with scope:
                result = await run()
                _log_reply(req)
                return proto.Response(req.id, result)
            return rpc.cancelled(req.id)
        except Exception as exc:
            return _error_reply(req, exc)
        finally:
            self.forget(req.id, scope)

    def forget(self, key: Any, entry: Any) -> None:
        """``entry`` is no longer in flight (unless its id was reused meanwhile)."""
        if self.in_flight.get(key) is entry:
            del self.in_flight[key]


class _Waiting:
    """A request in flight with no task: its message's ``on_done`` answers it. ``cancel``
    answers it at once, as a cancelled task would, and the message's outcome is dropped."""

    __slots__ = ("conn", "key", "req", "later", "answer")

    def __init__(self, conn: Connection, key: Any, req: proto.Request, later: Later,
                 answer: Callable[[Any], None]):
        self.conn, self.key, self.req, self.later, self.answer = conn, key, req, later, answer
        later.env.on_done = self.done

    def done(self) -> None:
        self.conn.forget(self.key, self)
        self.answer(_answered(self.req, functools.partial(self.later.finish, self.later.env)))

    def cancel(self) -> None:
        self.detach()
        self.answer(rpc.cancelled(self.req.id))

    def detach(self) -> None:
        self.later.env.on_done = None
        self.conn.forget(self.key, self)


class _BatchReply:
    """A batch's replies, sent as one frame once the last is known."""

    __slots__ = ("conn", "replies", "waiting")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.replies: list[Any] = []
        self.waiting = 1  # held until ``finish``: every entry has been read by then

    def add(self, reply: Any) -> None:
        if reply is not None:
            self.replies.append(reply)

    def expect(self) -> Callable[[Any], None]:
        """One more reply to wait for; it is given to the returned callable."""
        self.waiting += 1
        return self._answer

    def _answer(self, reply: Any) -> None:
        self.replies.append(reply)
        self.finish()

    def finish(self) -> None:
        self.waiting -= 1
        if not self.waiting:
            self.conn.reply(self.replies, True)


_Run = Callable[[], Awaitable[Any]]  # what a request's task awaits for its result


def _answered(req: proto.Request, produce: Callable[[], Any]) -> Any:
    """``req``'s reply: ``produce()``'s result, or the error it raised."""
    try:
        result = produce()
    except Exception as exc:
        return _error_reply(req, exc)
    _log_reply(req)
    return proto.Response(req.id, result)


def _log_reply(req: proto.Request) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("rpc reply", extra={"id": req.id, "method": req.method})


def _error_reply(req: proto.Request, exc: Exception) -> proto.ErrorResponse:
    reply = rpc.error_reply(req.id, exc)
    if reply is None:  # a bug of ours must not take the connection down
        log.error("internal error in %s", req.method, exc_info=exc)
        reply = rpc.internal_error(req.id, exc)
    return reply


class _Unanswered:
    """The id of an executed notification: unique, equal only to itself, never sent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "(notification)"


def _log_unanswered(req: proto.Request, reply: Any) -> None:
    if isinstance(reply, proto.ErrorResponse):
        log.warning("notification %s failed (it has no id to answer): %s", req.method, reply.error.message,
                    extra={"code": reply.error.code})


def _peer_of(ws: trio_websocket.WebSocketConnection | trio_websocket.WebSocketRequest) -> str:
    """The client's address for the log. trio-websocket's ``remote`` asks the socket
    (getpeername), which raises once the client has gone: never ask it later, in a log
    call on the way out (that ended the whole server)."""
    try:
        return str(ws.remote)
    except OSError:
        return "(a client that left)"

