"""A JSON-RPC 2.0 peer over any framed transport: the trio shell around :mod:`.core.protocol`.

Either side may call the other. ``async with open_peer(transport, handler) as
peer: await peer.call("m", {...})``. The peer owns its transport and a nursery
holding one reader, one writer and one task per request it is answering:

* Outgoing calls wait in a pending table keyed by id. A caller that is
  cancelled (``trio.fail_after`` …) leaves the table and the other side is
  told with ``$/cancelRequest``. A lost connection fails every pending call
  with one :class:`ConnectionLost` saying why; nothing pending survives it.
* Incoming requests run ``handler(method, params)`` each in its own cancel
  scope; ``$/cancelRequest`` cancels that scope and the request is still
  answered, with -32800. Notifications go to ``on_notification`` and are
  never answered; batches are answered with one array.
* Every frame goes out through the writer task, in order: a caller cancelled
  mid-send can never leave half a frame on the wire, and a ``$/cancelRequest``
  is always written after the request it cancels.

Transports are two methods and a close (:class:`Transport`); adapters for a
trio-websocket connection and for any ``trio.abc.Stream`` (newline-delimited
JSON, bounded line buffer) are here.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio
import trio_websocket

from .core import jsonrpc as rpc
# (defined in the pure core, both ends' one definition; this is where the client finds them)
from .core.jsonrpc import CANCEL_METHOD as CANCEL_METHOD, FrameTooLarge as FrameTooLarge, RpcError as RpcError
from .core.protocol import (INVALID_REQUEST, OVERLOADED, ErrorResponse, Invalid, Notification, Request, Response, attach,
                            decode_frame, encode, error_response, invalid_to_reply, reply_frame)
from ._wsio import eager_reader, get_messages, send_messages

__all__ = ["CANCEL_METHOD", "ConnectionLost", "FrameTooLarge", "Peer", "RpcError", "StreamTransport",
           "Transport", "WebSocketTransport", "open_peer"]

log = logging.getLogger("supervisor.peer")

Handler = Callable[[str, Any], Awaitable[Any]]
NotificationHandler = Callable[[str, Any], None]


# -- errors ----------------------------------------------------------------------------------------

class ConnectionLost(Exception):
    """The connection broke while the call was pending (or could not be made).

    Its message says why (EOF, a transport error, a frame too large, a close).
    Transports raise it too, from ``send`` and ``receive``, when their
    connection ends: it is the one end-of-connection signal the peer knows.
    """


# -- transports ------------------------------------------------------------------------------------

class Transport(Protocol):
    """Frames in, frames out. ``send`` is never called concurrently with itself,
    nor ``receive`` with itself (the peer has one writer and one reader).

    ``send`` and ``receive`` raise :class:`ConnectionLost` once the connection
    is gone (``receive`` at EOF too); ``receive`` may raise
    :class:`FrameTooLarge`. ``aclose`` is idempotent and does not raise for a
    connection that is already broken.
    """

    async def send(self, frame: bytes) -> None: ...

    async def receive(self) -> bytes | str: ...

    async def aclose(self) -> None: ...


class WebSocketTransport:
    """One JSON-RPC frame per WebSocket text message (CONTRACT §4).

    The size limit is trio-websocket's ``max_message_size``, set when the
    connection is opened (past it, trio-websocket closes with 1009).
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection, *, binary: bool = False):
        self.ws = ws
        self.binary = binary  # binary frames (attachment frames among them) instead of text
        self._read: collections.deque[bytes | str] = collections.deque()  # read together, not yet returned
        eager_reader(ws)  # (replies that arrive together are read together: see _wsio)

    async def send(self, frame: bytes) -> None:
        # Our encoder writes UTF-8, so this decode cannot fail; a text frame is what the host reads.
        text = frame if self.binary else frame.decode() if isinstance(frame, (bytes, bytearray)) else frame
        try:
            await send_messages(self.ws, [text])
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionLost(f"connection closed: {exc.reason}") from exc

    async def receive(self) -> bytes | str:
        if self._read:
            return self._read.popleft()
        try:
            first, *rest = await get_messages(self.ws)
            self._read.extend(rest)
            return first
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionLost(f"connection closed: {exc.reason}") from exc

    async def aclose(self) -> None:
        await self.ws.aclose()


class StreamTransport:
    """Newline-delimited JSON over any ``trio.abc.Stream`` (pipes, sockets, memory streams).

    Compact JSON never holds a raw newline, so a newline ends a frame; blank
    lines are skipped. The line buffer holds at most ``max_frame_size`` plus
    one read: a longer line raises :class:`FrameTooLarge` instead of growing.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame_size: int = 64 * 2**20, read_size: int = 65536):
        if max_frame_size < 1 or read_size < 1:
            raise ValueError("max_frame_size and read_size must be positive")
        self.stream = stream
        self.max_frame_size = max_frame_size
        self._read_size = read_size
        self._buf = bytearray()
        self._start = 0    # where the next frame begins in _buf
        self._scanned = 0  # _buf[:_scanned] holds no newline after _start

    async def send(self, frame: bytes) -> None:
        data = frame.encode() if isinstance(frame, str) else bytes(frame)
        if b"\n" in data:
            raise ValueError("a newline-delimited frame cannot contain a raw newline")
        try:
            await self.stream.send_all(data + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"cannot send: {_reason(exc)}") from exc

    async def receive(self) -> bytes:
        buf = self._buf
        while True:
            end = buf.find(b"\n", max(self._start, self._scanned))
            if end >= 0:
                if end - self._start > self.max_frame_size:
                    raise FrameTooLarge(end - self._start, self.max_frame_size)
                line = bytes(buf[self._start:end])
                self._start = self._scanned = end + 1
                if line.strip():
                    return line
                continue
            self._scanned = len(buf)
            if len(buf) - self._start > self.max_frame_size:
                raise FrameTooLarge(len(buf) - self._start, self.max_frame_size)
            # Compact once per read, not once per line: many small lines stay linear.
            del buf[:self._start]
            self._scanned -= self._start
            self._start = 0
            try:
                chunk = await self.stream.receive_some(self._read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"cannot receive: {_reason(exc)}") from exc
            if not chunk:
                if bytes(buf).strip():
                    raise ConnectionLost(f"the other side closed the connection mid-frame ({len(buf)} bytes unread)")
                raise ConnectionLost("the other side closed the connection (EOF)")
            buf += chunk

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it was broken already: closed is what we wanted


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or (str(cause) if cause else "") or type(exc).__name__
    return text


# -- the peer --------------------------------------------------------------------------------------

class _Call:
    """One outgoing call: resolved once, by the reader or by the connection's end."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Response | ErrorResponse | Invalid | str | None = None  # str: why the connection was lost


class Peer:
    """One end of a JSON-RPC 2.0 connection; both ends may call, notify and answer.

    Args:
        transport: the connection; the peer owns it and closes it when it stops.
        handler: ``async handler(method, params) -> result`` answers the other
            side's requests; raise :class:`RpcError` (or an ``ActorError``) to
            answer with that error. None answers every request -32601.
        on_notification: ``on_notification(method, params)``, called in the
            reader in arrival order; it must not block (hand the item to a
            channel). An exception from it stops the peer and leaves ``run``.
        send_queue: frames that may wait for the writer before ``call`` and
            ``notify`` wait for room (backpressure).
        max_in_flight: requests answered at once; more are answered -32004.
        close_timeout: how long closing the transport may take.
        attachments: write bytes messages holding a :class:`Blob` as raw attachments
            (an attachment frame, see ``core.protocol.attach``) instead of base64 text.

    A peer serves one connection once: for a new connection make a new peer.
    """

    def __init__(self, transport: Transport, handler: Handler | None = None,
                 on_notification: NotificationHandler | None = None, *, send_queue: int = 64,
                 max_in_flight: int = 1024, close_timeout: float = 2.0, attachments: bool = False):
        self.transport = transport
        self._attachments = attachments
        self._handler = handler
        self._on_notification = on_notification
        self._calls: rpc.Correlator[_Call] = rpc.Correlator()
        self._serving: dict[Any, trio.CancelScope] = {}
        # Unbounded channel, bounded by accounting: callers wait for room (``_queued`` <
        # ``_limit``); frames that must not wait (a cancelRequest from a cancelled caller,
        # the reader's own replies) skip the wait but keep their place in the one FIFO.
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[bytes, bool]](float("inf"))
        self._limit = send_queue
        self._queued = 0
        self._unwaited = 0
        self._room = trio.Event()
        self._writer_done = trio.Event()
        self._max_in_flight = max_in_flight
        self._close_timeout = close_timeout
        self._why: str | None = None
        self._scope: trio.CancelScope | None = None
        self._started = False
        self._lost = trio.Event()
        self._closed = trio.Event()

    def _encode(self, msg: Any) -> bytes:
        if not self._attachments:
            return encode(msg)
        atts: list = []
        return attach(encode(msg, atts), atts)

    # -- introspection ----------------------------------------------------------------------------

    @property
    def pending(self) -> tuple[Any, ...]:
        """Ids of our calls still waiting for an answer."""
        return self._calls.pending

    @property
    def serving(self) -> tuple[Any, ...]:
        """Ids of the other side's requests we are still answering."""
        return tuple(self._serving)

    @property
    def closed_reason(self) -> str | None:
        """Why the connection ended (what ConnectionLost says), or None while it is open."""
        return self._why

    async def wait_lost(self) -> None:
        """Return once the connection is over: every pending call has failed, new
        ones fail at once, ``closed_reason`` says why. The transport may still be closing."""
        await self._lost.wait()

    async def wait_closed(self) -> None:
        """Return once the peer has stopped and closed its transport."""
        await self._closed.wait()

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it is lost or :meth:`aclose` is called.

        Start it with ``await nursery.start(peer.run)`` (or use :func:`open_peer`).
        A lost connection is a normal end, not an exception: pending calls fail
        with ConnectionLost, requests being answered are cancelled, the
        transport is closed. Raises only what ``on_notification`` raised (or a bug).
        """
        if self._started:
            raise RuntimeError("a Peer serves one connection once; make a new Peer")
        self._started = True
        try:
            if self._why is not None:  # closed before it started
                task_status.started()
                return
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader, nursery)
                task_status.started()
        finally:
            self._lose("the peer stopped")
            self._serving.clear()
            self._out_recv.close()
            try:
                # Shielded and bounded: the connection must close even while we are cancelled.
                with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
                    await self.transport.aclose()
            finally:
                self._closed.set()

    async def aclose(self) -> None:
        """Close the connection; returns once the transport is closed. Idempotent.

        Pending calls fail with ConnectionLost; requests being answered are
        cancelled and not answered (there is no one left to answer).
        """
        self._lose("the connection was closed by this side")
        if not self._started:
            self._started = True
            try:
                with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
                    await self.transport.aclose()
            finally:
                self._closed.set()
        await self._closed.wait()

    def _lose(self, why: str, *, stop: bool = True) -> None:
        """The connection is over: remember the first reason, fail every pending call and
        refuse new frames; with ``stop``, also cancel the reader, the writer and the requests."""
        if self._why is None:
            self._why = why
            self._lost.set()
            log.debug("connection lost: %s", why)
        for call in self._calls.drain():
            call.reply = self._why
            call.done.set()
        self._room.set()  # callers waiting for room see the loss
        if stop and self._scope is not None:
            self._scope.cancel()

    # -- outgoing ---------------------------------------------------------------------------------

    async def call(self, method: str, params: dict | list | None = None) -> Any:
        """Call ``method`` on the other side and return its result.

        Cancel it with a cancel scope (``trio.fail_after`` …): the other side
        then gets ``$/cancelRequest`` and the answer, if any, is dropped.

        Raises:
            RpcError: the other side answered with an error (or a malformed response).
            ConnectionLost: the connection ended before the answer came (or before the call).
            TypeError, ValueError: ``params`` cannot be sent as JSON (nothing was sent).
        """
        if self._why is not None:
            self._encode(Request(0, method, params))  # (params that are not JSON raise first, as ever)
            raise ConnectionLost(self._why)
        call = _Call()
        rid = self._calls.issue(call)
        sent = False
        try:
            await self._put(self._encode(Request(rid, method, params)))
            sent = True
            await call.done.wait()
        finally:
            # Still in the table: we are leaving without an answer (cancelled). Tell the
            # other side, after the request in the FIFO, so it stops working for nobody.
            if self._calls.withdraw(rid, call) and sent and self._why is None:
                self._put_nowait(self._encode(Notification(CANCEL_METHOD, {"id": rid})))
        if isinstance(call.reply, str):
            raise ConnectionLost(call.reply)
        return rpc.result_of(call.reply)  # type: ignore[arg-type]  # (resolved: set before done)

    async def notify(self, method: str, params: dict | list | None = None) -> None:
        """Send a notification; returns once it is queued for the writer (it has no answer).

        Raises:
            ConnectionLost: the connection has ended.
            TypeError, ValueError: ``params`` cannot be sent as JSON.
        """
        await self._put(self._encode(Notification(method, params)))

    async def _put(self, data: bytes) -> None:
        """Queue a frame, waiting while ``send_queue`` frames already wait."""
        while self._queued >= self._limit and self._why is None:
            if self._room.is_set():  # one unset event shared by every waiter; the writer sets it
                self._room = trio.Event()
            await self._room.wait()
        if self._why is not None:
            raise ConnectionLost(self._why)
        self._out_send.send_nowait((data, True))
        self._queued += 1

    def _put_nowait(self, data: bytes) -> None:
        """Queue a frame that must not wait (a reply from the reader, a cancel)."""
        if self._why is not None:
            return
        # Past this many unwaited frames the other side sends but does not read: a
        # peer that kept queueing its answers would grow without bound.
        if self._unwaited >= 16 * self._limit + self._max_in_flight:
            self._lose("the other side does not read what we send")
            return
        self._out_send.send_nowait((data, False))
        self._unwaited += 1

    async def _writer(self) -> None:
        try:
            async for data, waited in self._out_recv:
                await self.transport.send(data)
                if waited:
                    self._queued -= 1
                    self._room.set()
                else:
                    self._unwaited -= 1
        except ConnectionLost as exc:
            self._lose(str(exc))
        finally:
            self._writer_done.set()

    # -- incoming ---------------------------------------------------------------------------------

    async def _reader(self, nursery: trio.Nursery) -> None:
        try:
            while True:
                self._dispatch(await self.transport.receive(), nursery)
        except ConnectionLost as exc:
            self._lose(str(exc))
        except FrameTooLarge as exc:
            # Answer it (id null: it was not read), then close: the framing is lost.
            why = f"the other side sent a frame too large: {exc}"
            self._put_nowait(self._encode(exc.reply()))
            self._lose(why, stop=False)  # fail our calls now; nothing more is queued
            self._out_send.close()  # the writer sends what is queued, then ends
            with trio.move_on_after(self._close_timeout):
                await self._writer_done.wait()
            self._lose(why)

    def _dispatch(self, data: bytes | str, nursery: trio.Nursery) -> None:
        frame = decode_frame(data)
        admitted: list[tuple[Request, trio.CancelScope]] = []
        replies: list[Response | ErrorResponse] = []
        for item in frame.items:
            kind = type(item)
            if kind is Response or kind is ErrorResponse:
                self._resolve(item, self._calls.resolve(item))
            elif kind is Request:
                scope = self._admit(item)
                if isinstance(scope, ErrorResponse):
                    replies.append(scope)
                else:
                    admitted.append((item, scope))
            elif kind is Notification:
                if item.method == CANCEL_METHOD:
                    self._cancel_incoming(item.params)
                elif self._on_notification is not None:
                    self._on_notification(item.method, item.params)
            elif item.notification:  # a notification refused for its params: never answered
                log.warning("refused a notification: %s", item.error.message)
            elif (call := self._calls.resolve(item)) is not None:
                # Most likely a malformed response to one of our calls: fail that call and do
                # not answer it. (An Invalid does not say whether it was meant as a request or
                # a response; an invalid request whose id happens to equal one of our pending
                # ids would be taken for a response. Both directions share one wire.)
                self._resolve(item, call)
            else:
                replies.append(invalid_to_reply(item))
        if admitted:
            nursery.start_soon(self._answer, admitted, replies, frame.is_batch)
        elif replies:
            self._reply_nowait(replies, frame.is_batch)

    def _resolve(self, item: Response | ErrorResponse | Invalid, call: _Call | None) -> None:
        if call is None:
            # A late answer to a cancelled call, or an id we never sent: nobody waits for it.
            log.debug("ignored a response with unknown id %r", item.id)
            return
        call.reply = item
        call.done.set()

    def _admit(self, req: Request) -> trio.CancelScope | ErrorResponse:
        """Register the request's cancel scope now, before its task runs, so that a
        ``$/cancelRequest`` later in the same frame (or the next) finds it; or refuse it."""
        if self._handler is None:
            return rpc.method_not_found(req.id, req.method)
        if req.id in self._serving:
            return error_response(req.id, INVALID_REQUEST, f"Invalid Request: id {req.id!r} is already in use "
                                  "by a request in flight")
        if len(self._serving) >= self._max_in_flight:
            return error_response(req.id, OVERLOADED, f"more than {self._max_in_flight} requests in flight; "
                                  "retry later")
        scope = trio.CancelScope()
        self._serving[req.id] = scope
        return scope

    def _cancel_incoming(self, params: Any) -> None:
        scope = self._serving.get(rpc.cancel_target(params))
        if scope is not None:
            scope.cancel()

    async def _answer(self, admitted: list[tuple[Request, trio.CancelScope]],
                      replies: list[Response | ErrorResponse], is_batch: bool) -> None:
        try:
            if len(admitted) == 1:
                replies.append(await self._serve(*admitted[0]))
            else:
                async def one(req: Request, scope: trio.CancelScope) -> None:
                    replies.append(await self._serve(req, scope))

                async with trio.open_nursery() as nursery:
                    for req, scope in admitted:
                        nursery.start_soon(one, req, scope)
        finally:
            for req, scope in admitted:  # also when cancelled before _serve ran
                if self._serving.get(req.id) is scope:
                    del self._serving[req.id]
        data = _reply_data(replies, is_batch)
        if data is not None:
            try:
                await self._put(data)
            except ConnectionLost:
                pass  # nobody is left to answer

    async def _serve(self, req: Request, scope: trio.CancelScope) -> Response | ErrorResponse:
        assert self._handler is not None
        try:
            with scope:
                return Response(req.id, await self._handler(req.method, req.params))
            return rpc.cancelled(req.id)
        except Exception as exc:
            reply = rpc.error_reply(req.id, exc)
            if reply is None:  # a handler's bug must not take the connection down, nor leak its traceback
                log.exception("internal error answering %s", req.method)
                reply = rpc.internal_error(req.id, exc)
            return reply
        finally:
            if self._serving.get(req.id) is scope:
                del self._serving[req.id]

    def _reply_nowait(self, replies: list[Response | ErrorResponse], is_batch: bool) -> None:
        data = _reply_data(replies, is_batch)
        if data is not None:
            self._put_nowait(data)


def _reply_data(replies: list[Response | ErrorResponse], is_batch: bool) -> bytes | None:
    """The answer frame; a result that is not JSON becomes -32603 for that request alone."""
    try:
        return reply_frame(replies, is_batch)
    except (TypeError, ValueError):
        return reply_frame(rpc.encodable(replies), is_batch)


@asynccontextmanager
async def open_peer(transport: Transport, handler: Handler | None = None,
                    on_notification: NotificationHandler | None = None, **options: Any) -> AsyncIterator[Peer]:
    """A running :class:`Peer` on ``transport``, closed (with its transport) when the block ends.

    The block is not cancelled when the connection is lost: calls then raise
    ConnectionLost, and ``await peer.wait_closed()`` returns. Options are
    :class:`Peer`'s keyword arguments. As with any nursery, an exception
    leaves the block inside an ExceptionGroup.
    """
    peer = Peer(transport, handler, on_notification, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        try:
            yield peer
        finally:
            await peer.aclose()
