"""A trio client for the host's WebSocket API (the CLI's ``call`` and ``status`` use it).

``async with open_client(url, token=...) as c: await c.call("Calc", {"a": 1})``.

Each connection is a :class:`~supervisor._peer.Peer` over the WebSocket: a
call is a pending slot keyed by its id, resolved by the connection's reader,
and a cancelled call tells the host with ``$/cancelRequest``. When the
connection is lost every pending call fails with :class:`ConnectionLost` —
never hangs, and is never silently sent again unless the caller marked it
``idempotent=True``. With ``reconnect=True`` (the default) the client
reconnects with exponential backoff and jitter and re-subscribes every live
subscription, which keeps delivering.

With ``binary=True`` bytes never pay for base64: the client speaks binary
frames, sends ``bytes``-like values (or ``{"type": "bytes", "value": b"…"}``)
as raw attachments and gets bytes messages back the same way; every bytes
message it returns then holds a Python ``bytes`` value.
"""

from __future__ import annotations

import base64
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import trio
import trio_websocket

# One definition of each error, in _peer; this is their public home.
from ._peer import ConnectionLost as ConnectionLost, Peer, RpcError as RpcError, WebSocketTransport, open_peer
from .core.protocol import Blob
from ._wsio import MESSAGE_QUEUE

__all__ = ["Client", "ConnectionLost", "RpcError", "open_client"]

_DISCONNECT_TIMEOUT = 2.0  # seconds to wait for the host's close frame


class _Sub:
    def __init__(self, params: dict, send: trio.MemorySendChannel):
        self.params = params
        self.send = send
        self.server_id: str | None = None


class Client:
    def __init__(self, url: str, *, token: str | None, max_message_size: int, reconnect: bool,
                 backoff: tuple[float, float] = (0.05, 5.0), binary: bool = False):
        self.url = url
        self.binary = binary
        self._headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
        self._max = max_message_size
        self._reconnect = reconnect
        self._backoff = backoff
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._peer: Peer | None = None
        self._connected = trio.Event()
        self._notifications: dict[str, trio.MemorySendChannel] = {}
        self._subs: dict[int, _Sub] = {}
        self._lost: str | None = "not connected yet"
        self._closing = False
        self.connections = 0

    async def aclose(self) -> None:
        """Close the connection with the WebSocket close handshake and stop reconnecting.

        It must run before the connection's task is cancelled: trio-websocket reads the
        peer's close frame in a task of that connection, so an ``aclose`` from an
        already-cancelled connection waits out the whole disconnect timeout (2 s).
        """
        self._closing = True
        ws = self._ws
        if ws is not None:
            # trio-websocket bounds its own close only in open_websocket's exit; a bare
            # aclose waits for the peer's close frame forever (a dead or stuck host).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _DISCONNECT_TIMEOUT):
                await ws.aclose()

    async def wait_lost(self) -> None:
        """Return once the current connection is lost (for good, with ``reconnect=False``)."""
        peer = self._peer
        if peer is not None and not self._lost:
            await peer.wait_lost()

    # -- the connection loop ------------------------------------------------------------
    async def _run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        first = True
        while True:
            try:
                async with trio_websocket.open_websocket_url(
                        self.url, extra_headers=self._headers, max_message_size=self._max,
                        message_queue_size=MESSAGE_QUEUE,
                        connect_timeout=10, disconnect_timeout=_DISCONNECT_TIMEOUT) as ws:
                    failures = 0
                    async with open_peer(WebSocketTransport(ws, binary=self.binary), on_notification=self._notify,
                                         attachments=self.binary) as peer:
                        self._ws, self._peer, self._lost = ws, peer, None
                        self.connections += 1
                        self._connected.set()
                        if first:
                            first = False
                            task_status.started()
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._resubscribe)
                            await peer.wait_lost()  # the peer failed its pending calls
                            # At once, not after the close: idempotent retries wait for
                            # the next connection instead of spinning on this one.
                            self._lost, self._connected = peer.closed_reason, trio.Event()
                            nursery.cancel_scope.cancel()
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
                if first:
                    raise
                self._lost = f"cannot connect to {self.url}: {exc.__cause__ or exc}"
            finally:
                self._ws = self._peer = None
                if self._connected.is_set():  # (an unset one may have waiters: keep it)
                    self._connected = trio.Event()
                self._lost = self._lost or "connection closed"
            if not self._reconnect or self._closing:
                return
            failures += 1
            lo, hi = self._backoff
            await trio.sleep(min(hi, lo * 2 ** (failures - 1)) * random.uniform(0.8, 1.2))

    def _notify(self, method: str, params: Any) -> None:
        """Called by the peer's reader, in order: route by subscription id, else by method."""
        item: dict = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            item["params"] = _as_bytes(params) if self.binary else params
        sub = params.get("subscription") if isinstance(params, dict) else None
        ch = self._notifications.get(sub if sub and isinstance(sub, (str, int)) else method)
        if ch is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                ch.send_nowait(item)

    async def _resubscribe(self) -> None:
        for sub in list(self._subs.values()):
            if sub.server_id is not None:
                self._notifications.pop(sub.server_id, None)
            with contextlib.suppress(RpcError, ConnectionLost):
                sub.server_id = (await self.request("actor.subscribe", sub.params))["subscription"]
                self._notifications[sub.server_id] = sub.send

    # -- calls ----------------------------------------------------------------------------
    async def request(self, method: str, params: Any = None, *, idempotent: bool = False) -> Any:
        """One JSON-RPC call. Raises RpcError, or ConnectionLost if the connection broke first.

        ``idempotent=True`` waits for a reconnection and sends the call again instead.
        """
        while True:
            try:
                return await self._request_once(method, params)
            except ConnectionLost:
                if not (idempotent and self._reconnect):
                    raise
                await self._connected.wait()

    async def _request_once(self, method: str, params: Any) -> Any:
        peer = self._peer
        if peer is None or self._lost:
            raise ConnectionLost(self._lost or "not connected")
        # Cancelled (a timeout around us): the peer sends $/cancelRequest and drops the slot.
        if self.binary:
            return _as_bytes(await peer.call(method, params))
        return await peer.call(method, params)

    def on_notification(self, key: str, size: int = 1000) -> trio.MemoryReceiveChannel:
        """Channel of notifications for a subscription id or a method name (e.g. ``output``)."""
        send, recv = trio.open_memory_channel[dict](size)
        self._notifications[key] = send
        return recv

    def forget_notifications(self, key: str) -> None:
        """Stop routing ``key``'s notifications (see ``on_notification``); its channel ends."""
        send = self._notifications.pop(key, None)
        if send is not None:
            send.close()

    async def call(self, actor: str, inputs: dict, timeout: float | None = None, *, idempotent: bool = False) -> dict:
        if self.binary and isinstance(inputs, dict):
            inputs = {port: _raw(v) for port, v in inputs.items()}
        params: dict = {"actor": actor, "inputs": inputs}
        if timeout is not None:
            params["timeout"] = timeout
        return await self.request("actor.call", params, idempotent=idempotent)

    async def send(self, actor: str, port: str, value: Any) -> str:
        if self.binary:
            value = _raw(value)
        return (await self.request("actor.send", {"actor": actor, "port": port, "value": value}))["message_id"]

    async def status(self) -> dict:
        return await self.request("supervisor.status", idempotent=True)

    async def subscribe(self, actor: str, port: str | None = None, size: int = 1000) -> AsyncIterator[dict]:
        """``actor.output`` notifications (their params), across reconnections, until you stop iterating."""
        params = {"actor": actor} if port is None else {"actor": actor, "port": port}
        send, recv = trio.open_memory_channel[dict](size)
        sub = _Sub(params, send)
        sub.server_id = (await self.request("actor.subscribe", params))["subscription"]
        key = id(sub)
        self._subs[key] = sub
        self._notifications[sub.server_id] = send
        try:
            async for item in recv:
                yield item["params"]
        finally:
            self._subs.pop(key, None)
            if sub.server_id is not None:
                self._notifications.pop(sub.server_id, None)


_BUFFERS = (bytes, bytearray, memoryview)


def _raw(value: Any) -> Any:
    """A value to send in binary mode: bytes (bare or typed) ride as an attachment."""
    if isinstance(value, _BUFFERS):
        return {"type": "bytes", "value": Blob(value)}
    if isinstance(value, dict) and value.get("type") == "bytes" and isinstance(value.get("value"), _BUFFERS):
        return {"type": "bytes", "value": Blob(value["value"])}
    return value


def _as_bytes(obj: Any) -> Any:
    """Every bytes message in a result or notification holding Python ``bytes``."""
    if type(obj) is dict:
        if obj.get("type") == "bytes" and len(obj) == 2:
            v = obj.get("value")
            if isinstance(v, Blob):
                return {"type": "bytes", "value": bytes(v.data)}
            if isinstance(v, str):
                return {"type": "bytes", "value": base64.b64decode(v)}
        return {k: _as_bytes(v) for k, v in obj.items()}
    if type(obj) is list:
        return [_as_bytes(v) for v in obj]
    return obj


@contextlib.asynccontextmanager
async def open_client(url: str, *, token: str | None = None, max_message_size: int = 64 * 2**20,
                      reconnect: bool = True, binary: bool = False) -> AsyncIterator[Client]:
    """Connect to ``url`` and keep connected (unless ``reconnect=False``).

    The first connection must succeed: it raises OSError, or HandshakeError
    (``ConnectionRejected`` with the HTTP status, e.g. 401 without a token).
    """
    client = Client(url, token=token, max_message_size=max_message_size, reconnect=reconnect, binary=binary)
    failed: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client._run)
        except (OSError, trio_websocket.HandshakeError) as exc:
            failed = exc  # raised below, outside the nursery, so callers see it unwrapped
        else:
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
