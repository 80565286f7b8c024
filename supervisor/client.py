"""A trio client for the host's WebSocket API (used by the CLI's ``call`` and ``status``).

``async with open_client(url, token=...) as c: await c.call("Calc", {"a": 1})``.
Each call is a pending slot keyed by its id; the connection's reader resolves
it. A lost connection fails every pending call with :class:`ConnectionLost`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
import trio
import trio_websocket

__all__ = ["Client", "ConnectionLost", "RpcError", "open_client"]


class RpcError(Exception):
    """The host answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{message} ({code})")
        self.code, self.message, self.data = code, message, data


class ConnectionLost(Exception):
    """The connection to the host broke while calls were pending."""


class Client:
    def __init__(self, ws: trio_websocket.WebSocketConnection):
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list]] = {}
        self._notifications: dict[str, trio.MemorySendChannel] = {}
        self._lost: str | None = None

    async def _reader(self) -> None:
        try:
            while True:
                msg = orjson.loads(await self._ws.get_message())
                for item in msg if isinstance(msg, list) else [msg]:
                    if "method" in item:
                        params = item.get("params") or {}
                        ch = self._notifications.get(params.get("subscription") or item["method"])
                        if ch is not None:
                            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                                ch.send_nowait(item)
                        continue
                    slot = self._pending.pop(item.get("id"), None)
                    if slot is not None:
                        slot[1].append(item)
                        slot[0].set()
        except trio_websocket.ConnectionClosed as exc:
            self._lost = f"connection closed: {exc.reason}"
        finally:
            self._lost = self._lost or "connection closed"
            for event, _ in self._pending.values():
                event.set()

    async def request(self, method: str, params: Any = None) -> Any:
        if self._lost:
            raise ConnectionLost(self._lost)
        rid = next(self._ids)
        event, box = trio.Event(), []
        self._pending[rid] = (event, box)
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        try:
            await self._ws.send_message(orjson.dumps(msg).decode())
            await event.wait()
        except trio.Cancelled:
            with contextlib.suppress(Exception), trio.CancelScope(shield=True):
                await self._ws.send_message(orjson.dumps(
                    {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": rid}}).decode())
            raise
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionLost(f"connection closed: {exc.reason}") from exc
        finally:
            self._pending.pop(rid, None)
        if not box:
            raise ConnectionLost(self._lost or "connection closed")
        reply = box[0]
        if "error" in reply:
            e = reply["error"]
            raise RpcError(e.get("code"), e.get("message"), e.get("data"))
        return reply.get("result")

    def on_notification(self, key: str, size: int = 1000) -> trio.MemoryReceiveChannel:
        """Channel of notifications for a subscription id or a method name (e.g. ``output``)."""
        send, recv = trio.open_memory_channel[dict](size)
        self._notifications[key] = send
        return recv

    async def call(self, actor: str, inputs: dict, timeout: float | None = None) -> dict:
        params: dict = {"actor": actor, "inputs": inputs}
        if timeout is not None:
            params["timeout"] = timeout
        return await self.request("actor.call", params)

    async def send(self, actor: str, port: str, value: Any) -> str:
        return (await self.request("actor.send", {"actor": actor, "port": port, "value": value}))["message_id"]

    async def status(self) -> dict:
        return await self.request("supervisor.status")

    async def subscribe(self, actor: str, port: str | None = None) -> AsyncIterator[dict]:
        params = {"actor": actor} if port is None else {"actor": actor, "port": port}
        sid = (await self.request("actor.subscribe", params))["subscription"]
        recv = self.on_notification(sid)
        async for item in recv:
            yield item["params"]


@contextlib.asynccontextmanager
async def open_client(url: str, *, token: str | None = None,
                      max_message_size: int = 64 * 2**20) -> AsyncIterator[Client]:
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    async with trio_websocket.open_websocket_url(url, extra_headers=headers, max_message_size=max_message_size,
                                                 connect_timeout=10, disconnect_timeout=2) as ws:
        client = Client(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
