"""Newline-delimited frames over a trio byte stream (host side of a sandbox channel).

Frames are single-line JSON (orjson never emits a raw newline), so splitting on
``b"\\n"`` is exact and costs one ``bytes.find`` per frame; no length prefix is
needed and a frame can be read with a plain ``readline`` on the worker side,
which keeps the in-sandbox runtime free of framing code.

A frame may carry raw attachments (``bytes`` payloads that should not pay for
base64 and a JSON string parse): its line is ``@LEN,LEN,… JSON`` and the
attachments follow the newline back to back. JSON never starts with ``@``, so
plain frames are untouched; the JSON refers to attachment ``k`` as
``{"type": "bytes", "$att": k}``. Why not msgpack headers: orjson writes and
reads a ``process`` request's header faster than msgpack does; the workers
have only their runtime's standard library, where JSON is built in and msgpack
is not; and raw buffers after a text line cost what they cost in any binary
framing (one ``writev``, one slice).
"""

from __future__ import annotations

import math
import os
from typing import Any

import trio

__all__ = ["BadFrame", "ChannelClosed", "FrameTooLarge", "LineChannel", "SendTimedOut", "SocketReader",
           "send_all_now", "write_now"]

# Reads that found data waiting in a row without a checkpoint: a worker that never stops
# writing must not hold up the host's other tasks, nor the cancel scope timing it out.
_READS_PER_CHECKPOINT = 4
_READ_SIZE = 1 << 18
# Attachments one frame may carry: a frame has one per bytes message in it (a reply's
# output ports, one output, a request's input ports). Bounding the count bounds the
# header's length, so a header is judged from its first bytes, never parsed whole.
MAX_ATTACHMENTS = 1024
_HEADER_MAX = 1 + MAX_ATTACHMENTS * 21  # "@" and up to MAX_ATTACHMENTS "LEN," (a length < 10**20)


def write_now(sock: trio.socket.SocketType, data: bytes) -> int:
    """Write what ``sock`` takes of ``data`` without waiting (and without a trip through
    trio's scheduler, which its own ``send`` always makes); returns how many bytes.

    Raises:
        OSError: the socket is closed or broken.
    """
    fd = sock.fileno()
    if fd < 0:
        raise OSError("socket closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


async def send_all_now(sock: trio.socket.SocketType | None, stream: trio.abc.SendStream, lock: trio.Lock,
                       data: bytes) -> None:
    """``stream.send_all(data)`` under ``lock``, but straight to ``sock`` (the stream's
    socket, or None) first while nobody holds the lock: no trip through the scheduler
    when the socket takes it all, and what it does not take follows in order.

    Raises:
        OSError, trio.BrokenResourceError, trio.ClosedResourceError: as ``send_all``.
    """
    if sock is not None and not lock.locked():
        n = write_now(sock, data)
        if n == len(data):
            return
        data = memoryview(data)[n:]
    async with lock:
        await stream.send_all(data)


class SocketReader:
    """Reads a trio socket into one buffer kept for its life: at once when data is waiting
    (trio's ``recv`` yields to the scheduler even then), else once the socket is readable.
    At most _READS_PER_CHECKPOINT reads in a row skip the scheduler, so that a peer that
    never stops writing cannot hold up the other tasks (nor a cancel scope timing it out).
    """

    def __init__(self, sock: trio.socket.SocketType, size: int | None = None):
        self._sock = sock
        self._buf = memoryview(bytearray(size or _READ_SIZE))
        self.size = len(self._buf)
        self._quick = 0

    async def read(self) -> memoryview:
        """What arrived (valid until the next read); empty at end of stream.

        Raises:
            OSError: the socket is closed or broken.
        """
        if self._quick >= _READS_PER_CHECKPOINT:  # (before reading: a cancel here loses nothing)
            self._quick = 0
            await trio.lowlevel.checkpoint()
        try:
            while True:
                fd = self._sock.fileno()
                if fd < 0:
                    raise OSError("socket closed")
                try:
                    n = os.readv(fd, [self._buf])
                    break
                except BlockingIOError:
                    self._quick = 0
                    await trio.lowlevel.wait_readable(self._sock)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OSError(str(exc) or "socket closed") from exc
        self._quick += 1
        return self._buf[:n]


class ChannelClosed(Exception):
    """The peer closed the channel (EOF) or it broke under us."""


class BadFrame(Exception):
    """The peer sent something that is not a frame of this channel."""


class FrameTooLarge(Exception):
    """The peer sent a frame longer than the channel's limit."""

    def __init__(self, limit: int):
        super().__init__(f"frame exceeds the {limit}-byte limit")
        self.limit = limit


class SendTimedOut(Exception):
    """The peer did not take a frame within ``send_timeout`` seconds (it stopped reading)."""


class LineChannel:
    """Frames in both directions over one trio stream.

    ``receive()`` returns one frame without its newline; it raises
    :class:`ChannelClosed` at EOF, :class:`FrameTooLarge` as soon as a frame is
    known to pass ``max_frame`` bytes (its line, or its line and attachments: judged
    while reading, before the frame is parsed or its attachments allocated; an
    attachment header from its first bytes: at most MAX_ATTACHMENTS lengths), and
    :class:`BadFrame` for a header that is not ``@LEN,LEN,… JSON``. ``max_frame``
    may be changed between frames (a cell sets its sandbox's output limit).
    A send that finds the peer not reading waits at most ``send_timeout`` seconds
    for it (then :class:`SendTimedOut`); a send the socket takes at once never
    opens a cancel scope. ``send()`` takes one or more encoded frames and
    writes them in a single ``send_all`` (coalescing writes is measurably
    faster on a pipe than one write per frame).
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame: int = 16 * 2**20):
        self._stream = stream
        # Over a socket (bubblewrap's socketpair) the channel reads and writes the fd itself
        # when that cannot block: trio's own calls always yield to the scheduler, even with
        # data waiting, and a call's round trip took three such trips more than it needed.
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._reader = SocketReader(self._sock) if self._sock is not None else None
        self._buf = bytearray()
        self._scan = 0
        self.max_frame = max_frame
        self.send_timeout = math.inf
        self._send_lock = trio.Lock()
        self.bytes_received = 0
        self.attachments: list[bytes] = []  # those of the frame ``receive`` returned last

    async def receive(self) -> bytes:
        """One frame's JSON; a frame's attachments are then in ``attachments``."""
        while True:
            i = self._buf.find(b"\n", self._scan)
            if i >= 0:
                if i > self.max_frame:  # (a fill for attachments may have read far ahead)
                    raise FrameTooLarge(self.max_frame)
                if self._buf[:1] == b"@":
                    return await self._with_attachments(i)
                frame = bytes(self._buf[:i])
                del self._buf[: i + 1]
                self._scan = 0
                self.attachments = []
                return frame
            self._scan = len(self._buf)
            if self._scan > self.max_frame:
                raise FrameTooLarge(self.max_frame)
            if self._scan > _HEADER_MAX and self._buf[:1] == b"@" and self._buf.find(b" ", 0, _HEADER_MAX) < 0:
                raise FrameTooLarge(self.max_frame)  # a header longer than any it may have
            await self._fill()

    async def _fill(self, want: int = 0) -> None:
        """Read more into the buffer: at least some, as much as ``want`` if it is there."""
        if self._reader is not None and want <= self._reader.size:
            try:
                data = await self._reader.read()
            except OSError as exc:
                raise ChannelClosed(str(exc) or "channel broken") from exc
            if not data:
                raise ChannelClosed("end of stream")
            self.bytes_received += len(data)
            self._buf += data
            return
        try:
            data = await self._stream.receive_some(max(want, _READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelClosed(str(exc) or "channel broken") from exc
        if not data:
            raise ChannelClosed("end of stream")
        self.bytes_received += len(data)
        self._buf += data

    async def _with_attachments(self, i: int) -> bytes:
        sp = self._buf.find(b" ", 0, min(i, _HEADER_MAX))
        if sp < 0 and i >= _HEADER_MAX:
            raise FrameTooLarge(self.max_frame)
        head = bytes(self._buf[1:sp]) if sp > 1 else b""
        if head.count(b",") >= MAX_ATTACHMENTS:
            raise FrameTooLarge(self.max_frame)
        try:
            sizes = [int(x) for x in head.split(b",")] if head else []
        except ValueError:
            sizes = [-1]
        if not sizes or min(sizes) < 0:
            raise BadFrame("an attachment header that is not @LEN,LEN,… JSON")
        need = i + 1 + sum(sizes)
        if need > self.max_frame:
            raise FrameTooLarge(self.max_frame)
        while len(self._buf) < need:
            await self._fill(min(need - len(self._buf), 1 << 24))
        view = memoryview(self._buf)
        frame = bytes(view[sp + 1:i])
        atts, at = [], i + 1
        for n in sizes:
            atts.append(bytes(view[at:at + n]))
            at += n
        view.release()
        del self._buf[:need]
        self._scan = 0
        self.attachments = atts
        return frame

    async def send(self, *frames: bytes) -> None:
        data = b"\n".join(frames) + b"\n"
        await self._send_all(data)

    async def send_frames(self, frames: list[tuple[bytes, list]]) -> None:
        """Several frames, each with its attachments (maybe none), in order, in one write
        when they are small."""
        parts: list = []
        small = True
        for frame, attachments in frames:
            if attachments:
                sizes = [memoryview(a).nbytes for a in attachments]
                parts.append(b"@%s %s\n" % (b",".join(b"%d" % n for n in sizes), frame))
                parts.extend(attachments)
                small = small and sum(sizes) < 1 << 16
            else:
                parts.append(frame + b"\n")
        if small:
            await self._send_all(b"".join(parts))
        else:  # large attachments: no joined copy
            await self._send_all(*parts)

    async def send_with(self, frame: bytes, attachments: list) -> None:
        """One frame and its raw attachments (buffer-protocol objects), in one write."""
        if not attachments:
            return await self.send(frame)
        sizes = [memoryview(a).nbytes for a in attachments]
        head = b"@%s %s\n" % (b",".join(b"%d" % n for n in sizes), frame)
        if sum(sizes) < 1 << 16:
            await self._send_all(b"".join([head, *attachments]))
        else:  # large: no joined copy, one send per buffer
            await self._send_all(head, *attachments)

    async def _send_all(self, *parts: Any) -> None:
        try:
            if len(parts) == 1 and type(parts[0]) is bytes and self._sock is not None \
                    and not self._send_lock.locked():
                data = parts[0]
                n = write_now(self._sock, data)  # (as send_all_now: no trip through the scheduler)
                if n == len(data):
                    return
                parts = (memoryview(data)[n:],)
            if self.send_timeout == math.inf:
                await self._send_in_turn(parts)
            else:  # the socket is full (or someone is writing): the peer may have stopped reading
                with trio.fail_after(self.send_timeout):
                    await self._send_in_turn(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelClosed(str(exc) or "channel broken") from exc
        except trio.TooSlowError:
            raise SendTimedOut(f"the peer did not take a frame within {self.send_timeout:g}s") from None

    async def _send_in_turn(self, parts: tuple) -> None:
        async with self._send_lock:
            for data in parts:
                await self._stream.send_all(data)

    async def aclose(self) -> None:
        await self._stream.aclose()
