"""Reading and writing WebSocket messages through trio-websocket, faster than its public API allows."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, TextMessage
from wsproto.frame_protocol import CloseReason, Frame, FrameDecoder, MessageDecoder, Opcode, ParseFailed
from wsproto.utilities import LocalProtocolError

from ._channel import send_all_now, write_now

__all__ = ["MESSAGE_QUEUE", "deliver", "eager_reader", "get_messages", "read_whole_frames_at_once", "send_messages",
           "send_now"]

# Messages trio-websocket may read ahead of the consumer (``message_queue_size``; its default
# is 1): what get_messages can take at once. Each is at most the connection's
# ``max_message_size``, so this also bounds what one connection can park in memory while
# its reading is held back (the Python client's; the host's are delivered, see deliver).
MESSAGE_QUEUE = 8


async def send_messages(ws: trio_websocket.WebSocketConnection, frames: list[str | bytes],
                        head: bytes | memoryview = b"") -> None:
    """Send each of ``frames`` as one WebSocket message, all in one write (after ``head``:
    what ``send_now`` left unsent).

    trio-websocket writes every message on its own, so each reply cost a system call
    on the host and a wake-up of the client; with 32 calls in flight that was a third of
    the host's time. It has no call for several messages, so this does what its own
    ``_send`` does for one (wsproto encodes; the bytes go out under the connection's
    stream lock; a broken stream aborts the connection) for a list. It uses attributes
    that trio-websocket 0.11 and 0.12 share; without them it sends one by one, and
    test_api checks that the joined path is the one taken. Over plain TCP, while no one
    else writes, the bytes go straight to the socket (see ``send_all_now``).

    Raises:
        trio_websocket.ConnectionClosed: as ``send_message`` does.
    """
    wsp = getattr(ws, "_wsproto", None)
    lock = getattr(ws, "_stream_lock", None)
    stream = getattr(ws, "_stream", None)
    if wsp is None or lock is None or stream is None or not hasattr(ws, "_abort_web_socket"):
        assert not head, "send_now never leaves bytes where these are missing"
        for frame in frames:
            await ws.send_message(frame)
        return
    if ws._close_reason:
        raise trio_websocket.ConnectionClosed(ws._close_reason)
    data = b"".join([head, *(_encode(wsp, f) for f in frames)])
    try:
        await send_all_now(stream.socket if isinstance(stream, trio.SocketStream) else None,  # (not over TLS)
                           stream, lock, data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await ws._abort_web_socket()
        raise trio_websocket.ConnectionClosed(ws._close_reason) from None


def _encode(wsp: Any, frame: str | bytes) -> bytes:
    """One WebSocket message's bytes on the wire: text for a str, binary for bytes.

    A server's message, with no extension negotiated (trio-websocket accepts none) and no
    fragmented message under way (it sends none), is one unmasked frame: its header is
    written here. wsproto builds the same bytes through four layers of calls and three
    copies of the payload, a few microseconds of every answer; anything else goes to it.
    """
    conn = getattr(wsp, "connection", None)
    proto = getattr(conn, "_proto", None)
    if getattr(wsp, "client", True) or getattr(proto, "extensions", True) \
            or getattr(proto, "_outbound_opcode", 0) is not None or getattr(conn, "state", None) is not ConnectionState.OPEN:
        return wsp.send(TextMessage(data=frame) if isinstance(frame, str) else BytesMessage(data=frame))
    if isinstance(frame, str):
        data, first = frame.encode(), 0x81  # FIN, text
    else:
        data, first = bytes(frame), 0x82  # FIN, binary
    n = len(data)
    if n < 126:
        return bytes((first, n)) + data
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + data
    return struct.pack("!BBQ", first, 127, n) + data


def send_now(ws: trio_websocket.WebSocketConnection, frame: str | bytes) -> memoryview | None:
    """Send ``frame`` as one WebSocket message at once, without yielding, over a plain
    socket that no one else is writing to. Returns what the socket did not take (empty
    when it took it all), which must go out next, before anything else (``send_messages``'s
    ``head``); or None when it could not try: send the frame as usual, which also meets
    whatever error a broken or closing connection has.
    """
    wsp = getattr(ws, "_wsproto", None)
    lock = getattr(ws, "_stream_lock", None)
    stream = getattr(ws, "_stream", None)
    if wsp is None or lock is None or not isinstance(stream, trio.SocketStream) or lock.locked() \
            or getattr(ws, "_close_reason", True) is not None:
        return None
    try:
        data = _encode(wsp, frame)
        return memoryview(data)[write_now(stream.socket, data):]
    except (LocalProtocolError, OSError):  # (nothing was written)
        return None


async def get_messages(ws: trio_websocket.WebSocketConnection) -> list[str | bytes]:
    """The next message, and those already waiting behind it, in order.

    ``get_message`` yields to the scheduler for every message, even one already waiting;
    this takes what trio-websocket's queue holds (its message_queue_size: MESSAGE_QUEUE
    for our connections) without a yield each. With eager_reader, that is every message
    of the network read that brought the first, up to that bound. It uses the queue that
    trio-websocket 0.11 and 0.12 share; without it, one message at a time.

    Raises:
        trio_websocket.ConnectionClosed: as ``get_message`` does (only when nothing is left).
    """
    frames = [await ws.get_message()]
    queue = getattr(ws, "_recv_channel", None)
    if isinstance(queue, trio.MemoryReceiveChannel):
        while True:
            try:
                frames.append(queue.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
    return frames


class _ReaderQueue:
    """trio-websocket's message queue as its reader task sees it, with ``send`` replaced
    (see eager_reader and deliver); everything else is the channel's own."""

    def __init__(self, channel: trio.MemorySendChannel, send: Callable[[str | bytes], Awaitable[None]]):
        self._channel = channel
        self.send = send

    # (trio-websocket 0.11 and 0.12 enter the channel before it can be replaced, so these
    # go unused there; a reader that entered later would need them: dunders bypass __getattr__.)
    async def __aenter__(self) -> _ReaderQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.aclose()

    def __getattr__(self, name: str):  # aclose, close, statistics, …: the channel's own
        return getattr(self._channel, name)


def eager_reader(ws: trio_websocket.WebSocketConnection) -> None:
    """Let ``ws``'s reader task queue every message of one network read before anything
    else runs, so that get_messages takes them together: the queue's ``send`` puts a
    message in at once while there is room, and waits as before when it is full. The
    reader still yields once per network read (≤ its receive buffer).

    Why: a memory channel's ``send`` yields once per message, and each yield let the
    consumer take that one message alone (on the host, before ``deliver``: hand it to its
    actor, which wrote it to its worker: at 32 calls in flight, one write and one worker
    wake-up per call); taking them together cuts the host's and the workers' CPU per call
    and raises calls/s (the Python client does this too). It replaces a private attribute
    that trio-websocket 0.11 and 0.12 share; without it, nothing changes.
    """
    channel = getattr(ws, "_send_channel", None)
    if isinstance(channel, trio.MemorySendChannel):
        async def send(msg: str | bytes) -> None:
            try:
                channel.send_nowait(msg)
            except trio.WouldBlock:
                await channel.send(msg)

        ws._send_channel = _ReaderQueue(channel, send)


def deliver(ws: trio_websocket.WebSocketConnection,
            take: Callable[[str | bytes], Awaitable[None]]) -> list[str | bytes] | None:
    """From now on, ``ws``'s reader task hands each message it reads to ``await take(msg)``
    instead of queueing it for ``get_message``. Returns the messages it had queued before
    (handle them first: nothing is delivered until the caller next yields), or None when
    trio-websocket lacks the attributes (0.11 and 0.12 share them): read as before. Once
    the reader stops, ``get_message`` raises ConnectionClosed as ever.

    Why: a queued message waits for a trip through the scheduler to the task that reads
    it, a sizeable part of each call's round trip at one call in flight (the woken task
    runs with cold caches). ``take`` runs in the reader: it must not
    raise, and while it waits, nothing more is read from the network (backpressure, with
    one message in hand rather than a queue of them).
    """
    channel = getattr(ws, "_send_channel", None)
    queue = getattr(ws, "_recv_channel", None)
    if not isinstance(channel, trio.MemorySendChannel) or not isinstance(queue, trio.MemoryReceiveChannel):
        return None
    waiting = []
    while True:  # (this also takes the message of a reader blocked on a full queue)
        try:
            waiting.append(queue.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    ws._send_channel = _ReaderQueue(channel, take)
    read_whole_frames_at_once(getattr(ws, "_wsproto", None))
    return waiting


class _WholeFrames(FrameDecoder):
    """wsproto's server-side frame decoder, with the frame nearly every request comes in
    (a client's whole masked text or binary frame, already in the buffer, read while no
    other frame is under way) decoded in one step; everything else, wsproto's own way.
    wsproto takes its header apart field by field, unmasks in four strided passes and
    copies the payload three times, which made its parse of each request a visible part
    of the host's CPU time at one call in flight. Its checks still stand:
    a frame with a reserved bit, a lengths field longer than needed or another opcode
    goes to wsproto, which raises on it as ever (test_api compares the two on hypothesis'
    frame streams)."""

    def process_buffer(self) -> Frame | None:
        buf = self.buffer
        data = buf.buffer
        if self.header is None and not buf.bytes_used and len(data) >= 6 and data[0] in (0x81, 0x82) \
                and data[1] & 0x80:  # FIN, no reserved bit, text or binary; masked
            n, at, minimal = data[1] & 0x7F, 2, True
            if n == 126:
                at, n = 4, int.from_bytes(data[2:4], "big")
                minimal = n > 125
            elif n == 127:  # (read short while the field is not all here: then so is the frame)
                at, n = 10, int.from_bytes(data[2:10], "big")
                minimal = 0xFFFF < n < 1 << 63
            end = at + 4 + n
            if minimal and len(data) >= end:
                opcode = Opcode.TEXT if data[0] == 0x81 else Opcode.BINARY
                payload = b""
                if n:
                    key = bytes(data[at:at + 4]) * ((n + 3) // 4)
                    payload = (int.from_bytes(data[at + 4:end], "little")
                               ^ int.from_bytes(key[:n], "little")).to_bytes(n, "little")
                del data[:end]
                return Frame(opcode, payload, True, True)
        return super().process_buffer()


class _WholeMessages(MessageDecoder):
    """wsproto's message decoder, with a whole text message, not fragmented, decoded in
    one step (wsproto looks up and makes an incremental UTF-8 decoder for every one)."""

    def process_frame(self, frame: Frame) -> Frame:
        if self.opcode is None and frame.opcode is Opcode.TEXT and frame.frame_finished \
                and frame.message_finished:
            try:
                return Frame(Opcode.TEXT, frame.payload.decode(), True, True)
            except UnicodeDecodeError as exc:
                raise ParseFailed(str(exc), CloseReason.INVALID_FRAME_PAYLOAD_DATA) from None
        return super().process_frame(frame)


def read_whole_frames_at_once(wsp: Any) -> None:
    """Give an open server-side wsproto connection (trio-websocket's ``_wsproto``) the
    decoders above, where it has wsproto's own and no extension (trio-websocket negotiates
    none); otherwise leave it as it is."""
    proto = getattr(getattr(wsp, "connection", None), "_proto", None)
    frames, messages = getattr(proto, "_frame_decoder", None), getattr(proto, "_message_decoder", None)
    if type(frames) is FrameDecoder and type(messages) is MessageDecoder and not frames.client \
            and not frames.extensions:
        frames.__class__ = _WholeFrames
        messages.__class__ = _WholeMessages
