"""Newline-delimited frames over a trio byte stream (host side of a sandbox channel).

Frames are single-line JSON (orjson never emits a raw newline), so splitting on
``b"\\n"`` is exact and costs one ``bytes.find`` per frame; no length prefix is
needed and a frame can be read with a plain ``readline`` on the worker side,
which keeps the in-sandbox runtime free of framing code.
"""

from __future__ import annotations

import trio

__all__ = ["ChannelClosed", "FrameTooLarge", "LineChannel"]


class ChannelClosed(Exception):
    """The peer closed the channel (EOF) or it broke under us."""


class FrameTooLarge(Exception):
    """The peer sent a frame longer than the channel's limit."""

    def __init__(self, limit: int):
        super().__init__(f"frame exceeds the {limit}-byte limit")
        self.limit = limit


class LineChannel:
    """Frames in both directions over one trio stream.

    ``receive()`` returns one frame without its newline; it raises
    :class:`ChannelClosed` at EOF and :class:`FrameTooLarge` when a frame
    grows past ``max_frame``. ``send()`` takes one or more encoded frames and
    writes them in a single ``send_all`` (coalescing writes is measurably
    faster on a pipe than one write per frame).
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame: int = 64 * 1024 * 1024):
        self._stream = stream
        self._buf = bytearray()
        self._scan = 0
        self._max = max_frame
        self._send_lock = trio.Lock()
        self.bytes_received = 0

    async def receive(self) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._scan)
            if i >= 0:
                frame = bytes(self._buf[:i])
                del self._buf[: i + 1]
                self._scan = 0
                return frame
            self._scan = len(self._buf)
            if self._scan > self._max:
                raise FrameTooLarge(self._max)
            try:
                data = await self._stream.receive_some(1 << 18)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed(str(exc) or "channel broken") from exc
            if not data:
                raise ChannelClosed("end of stream")
            self.bytes_received += len(data)
            self._buf += data

    async def send(self, *frames: bytes) -> None:
        data = b"\n".join(frames) + b"\n"
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed(str(exc) or "channel broken") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()
