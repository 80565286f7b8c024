"""Plain HTTP beside the WebSocket API on one port: the dashboard and ``GET /metrics``.

trio-websocket's server answers every request that is not a WebSocket upgrade with
an error, so a thin front sits before it: each accepted connection's request head is
read here (at most ``MAX_HEAD`` bytes within ``HEAD_TIMEOUT`` seconds) and parsed with
h11. A WebSocket upgrade goes to trio-websocket on the very same ``SocketStream``,
with the bytes read here fed to its wsproto connection before its reader task starts
(it processes what wsproto holds before it reads the network), so everything
downstream — ``max_message_size``, the token check, the fast paths of ``_wsio`` that
write to the socket itself — sees the connection it always did. Any other request is
answered here (``GET /``, the dashboard's files, ``/metrics``, ``/auth``) and the
connection closed: one request per connection, no keep-alive to hold anything open.

A client that sends no head in time, or too large a one, is cut off (408 / 431) without
holding anything up: the head is read in the connection's own task, and at most
``MAX_OPENING`` connections may be reading theirs at once (more are closed at once).
"""

from __future__ import annotations

import hmac
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import h11
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection

if TYPE_CHECKING:
    from ._metrics import MetricsHost
    from ._watch import Watchers

__all__ = ["serve_front", "serve_http_and_websocket", "query_token_ok", "HttpApp", "STATIC"]

log = logging.getLogger("supervisor.http")

MAX_HEAD = 16 * 1024  # bytes of request line + headers
HEAD_TIMEOUT = 10.0  # seconds to send them (trio-websocket's own connect_timeout is the same)
MAX_OPENING = 256  # connections reading their request head at once

_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8", "svg": "image/svg+xml", "png": "image/png"}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files (package data), by URL path, read once."""
    out: dict[str, tuple[bytes, str]] = {}
    root = resources.files("supervisor") / "_dashboard"
    for entry in root.iterdir():
        ext = entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and ext in _TYPES:
            out["/" + entry.name] = (entry.read_bytes(), _TYPES[ext])
    if "/index.html" in out:
        out["/"] = out["/index.html"]
    return out


STATIC = _load_static()


def query_token_ok(path: str, token: str) -> bool:
    """Whether the request target carries ``?token=TOKEN`` (what a browser's WebSocket can
    send: it cannot set an Authorization header)."""
    query = urllib.parse.urlsplit(path).query
    given = urllib.parse.parse_qs(query).get("token", [""])[0]
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def bearer_ok(headers: list[tuple[bytes, bytes]], token: str | None) -> bool:
    if token is None:
        return True
    auth = next((v for k, v in headers if k == b"authorization"), b"")
    return hmac.compare_digest(auth, b"Bearer " + token.encode())


class HttpApp:
    """What the plain HTTP requests get. ``metrics`` renders the Prometheus text."""

    def __init__(self, token: str | None, metrics: Callable[[], Awaitable[bytes]]):
        self.token = token
        self.metrics = metrics

    async def respond(self, req: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        method = req.method.upper()
        path = urllib.parse.urlsplit(req.target.decode("latin-1")).path
        if method not in (b"GET", b"HEAD"):
            return 405, [("allow", "GET, HEAD")], b"method not allowed: this port serves GET and WebSocket\n"
        if path == "/metrics":
            if not bearer_ok(req.headers, self.token):
                return 401, [("www-authenticate", "Bearer")], b"unauthorized: send Authorization: Bearer <token>\n"
            return 200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], await self.metrics()
        if path == "/auth":  # the page asks whether it needs a token, and whether this one is right
            if bearer_ok(req.headers, self.token):
                return 204, [], b""
            return 401, [], b"unauthorized\n"
        found = STATIC.get(path)
        if found is None:
            return 404, [("content-type", "text/plain")], b"not found: this port serves /, /metrics and WebSocket\n"
        body, ctype = found
        # The page's scripts may only come from here, and nothing may frame it.
        return 200, [("content-type", ctype), ("cache-control", "no-cache"),
                     ("content-security-policy", "default-src 'self'; connect-src 'self' ws: wss:; "
                                                 "img-src 'self' data:; frame-ancestors 'none'"),
                     ("x-content-type-options", "nosniff")], body


async def serve_front(handler: Callable[[trio_websocket.WebSocketRequest], Awaitable[None]], host: MetricsHost,
                      watchers: Watchers, *, task_status: Any = trio.TASK_STATUS_IGNORED, **ws_options: Any) -> None:
    """The API's port as the host serves it: WebSocket to ``handler``, the dashboard and
    /metrics (see serve_http_and_websocket), and ``watchers``' task beside them."""
    from ._metrics import HostMetrics

    cfg = host.config.workspace.websocket
    app = HttpApp(cfg.token, HostMetrics(host).render)
    async with trio.open_nursery() as nursery:
        await nursery.start(watchers.serve)
        await serve_http_and_websocket(handler, app, cfg.host, cfg.port, task_status=task_status, **ws_options)


async def serve_http_and_websocket(
        handler: Callable[[trio_websocket.WebSocketRequest], Awaitable[None]], app: HttpApp,
        host: str, port: int, *, message_queue_size: int, max_message_size: int,
        connect_timeout: float, disconnect_timeout: float,
        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve WebSocket (to ``handler``, as ``trio_websocket.serve_websocket`` would) and plain
    HTTP (``app``) on ``host:port`` until cancelled; reports the ``WebSocketServer`` (for its
    ``port``) through task_status."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = trio_websocket.WebSocketServer(
        handler, listeners, message_queue_size=message_queue_size, max_message_size=max_message_size,
        connect_timeout=connect_timeout, disconnect_timeout=disconnect_timeout)
    front = _Front(server, app, connect_timeout, disconnect_timeout, message_queue_size, max_message_size, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, front.handle, listeners)
        task_status.started(server)
        await trio.sleep_forever()


class _Front:
    def __init__(self, server: trio_websocket.WebSocketServer, app: HttpApp, connect_timeout: float,
                 disconnect_timeout: float, message_queue_size: int, max_message_size: int,
                 handler: Callable[[trio_websocket.WebSocketRequest], Awaitable[None]]):
        self.server, self.app, self.handler = server, app, handler
        self.connect_timeout, self.disconnect_timeout = connect_timeout, disconnect_timeout
        self.message_queue_size, self.max_message_size = message_queue_size, max_message_size
        self.opening = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted connection: read its head, then WebSocket or one HTTP answer. Never
        raises (a broken client is that client's problem)."""
        if self.opening >= MAX_OPENING:
            await trio.aclose_forcefully(stream)
            return
        self.opening += 1
        try:
            head = await self._read_head(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            head = None
        finally:
            self.opening -= 1
        if head is None:
            await trio.aclose_forcefully(stream)
            return
        raw, conn, event = head
        if isinstance(event, h11.Request) and _is_upgrade(event):
            await self._websocket(stream, raw)
            return
        try:
            await self._http(stream, conn, event)
            await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.LocalProtocolError):
            pass
        except Exception:  # a bug of ours must not end the listener
            log.exception("internal error answering an HTTP request")
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_head(self, stream: trio.SocketStream) -> tuple[bytes, h11.Connection, Any] | None:
        """(the bytes read, h11's connection, its first event: a Request, or an int status to
        refuse with), or None when the client went away."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        raw = bytearray()
        with trio.move_on_after(HEAD_TIMEOUT):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    return bytes(raw), conn, exc.error_status_hint
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_HEAD)
                    if not data:
                        return None
                    raw += data
                    conn.receive_data(data)
                    continue
                return bytes(raw), conn, event
        return bytes(raw), conn, 408

    async def _http(self, stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
        if not isinstance(event, h11.Request):
            # A refusal: h11's status hint (400, 431…) or 408 for a head too slow. (h11 will
            # not answer a request it could not read: these few bytes are written here.)
            reason = h11_reason(event)
            with trio.move_on_after(self.disconnect_timeout):
                await stream.send_all(f"HTTP/1.1 {event} {reason}\r\ncontent-type: text/plain\r\n"
                                      f"content-length: {len(reason) + 1}\r\nconnection: close\r\n\r\n"
                                      f"{reason}\n".encode())
            return
        status, headers, body = await self.app.respond(event)
        head_only = event.method.upper() == b"HEAD"
        headers = [*headers, ("content-length", str(len(body))), ("connection", "close")]
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=h11_reason(status).encode()))
        if body and not head_only:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.disconnect_timeout):
            await stream.send_all(out)

    async def _websocket(self, stream: trio.SocketStream, raw: bytes) -> None:
        """trio-websocket's ``WebSocketServer._handle_connection``, with ``raw`` (the head
        read here, and whatever came with it) already in its wsproto connection."""
        async with trio.open_nursery() as nursery:
            connection = trio_websocket.WebSocketConnection(
                stream, WSConnection(ConnectionType.SERVER), message_queue_size=self.message_queue_size,
                max_message_size=self.max_message_size)
            connection._wsproto.receive_data(raw)
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self.connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await self.handler(request)
            finally:
                with trio.move_on_after(self.disconnect_timeout):
                    await connection.aclose()


async def _linger(stream: trio.SocketStream) -> None:
    """End our side, then read what the client still sends (at most 1 MiB, for a second)
    before closing: a socket closed with unread input is reset, and the reset can reach
    the client before our answer does (a 431 for a head too large, say)."""
    with trio.move_on_after(1):
        await stream.send_eof()
        left = 1 << 20
        while left > 0:
            data = await stream.receive_some(65536)
            if not data:
                return
            left -= len(data)


def _is_upgrade(req: h11.Request) -> bool:
    return any(k == b"upgrade" and v.lower() == b"websocket" for k, v in req.headers)


def h11_reason(status: int) -> str:
    return {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 414: "URI Too Long",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            505: "HTTP Version Not Supported"}.get(status, "Error")
