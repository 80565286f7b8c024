"""Reading and writing WebSocket messages through trio-websocket, faster than its public API allows."""

from __future__ import annotations

import trio
import trio_websocket
from wsproto.events import BytesMessage, TextMessage

from ._channel import send_all_now

__all__ = ["get_messages", "send_messages"]


async def send_messages(ws: trio_websocket.WebSocketConnection, frames: list[str | bytes]) -> None:
    """Send each of ``frames`` as one WebSocket message, all in one write.

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
        for frame in frames:
            await ws.send_message(frame)
        return
    if ws._close_reason:
        raise trio_websocket.ConnectionClosed(ws._close_reason)
    data = b"".join([wsp.send(TextMessage(data=f) if isinstance(f, str) else BytesMessage(data=f))
                     for f in frames])
    try:
        await send_all_now(stream.socket if isinstance(stream, trio.SocketStream) else None,  # (not over TLS)
                           stream, lock, data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await ws._abort_web_socket()
        raise trio_websocket.ConnectionClosed(ws._close_reason) from None


async def get_messages(ws: trio_websocket.WebSocketConnection) -> list[str | bytes]:
    """The next message, and those already waiting behind it, in order.

    ``get_message`` yields to the scheduler for every message, even one already waiting.
    A client pipelining calls sends dozens per read, so this takes what trio-websocket's
    (bounded) queue already holds without a yield each; its reader task still yields
    once per message it queues (at 32 calls in flight, the host's connection task woke
    for a third fewer of them). It uses the queue that trio-websocket 0.11 and 0.12
    share; without it, one message at a time.

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
