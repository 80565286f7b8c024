"""A WebSocket client over a bare trio socket, for tests that abuse the host: every byte it
writes and how it leaves (a TCP close with no WebSocket close, half a frame) are the test's."""

from __future__ import annotations

import os
import struct

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage


class RawWs:
    def __init__(self, sock: trio.socket.SocketType, conn: WSConnection):
        self.sock, self.conn = sock, conn
        self.messages: list[str | bytes] = []

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawWs:
        sock = trio.socket.socket()
        await sock.connect((host, port))
        self = cls(sock, WSConnection(ConnectionType.CLIENT))
        await self.write(self.conn.send(Request(host=f"{host}:{port}", target="/")))
        while True:
            data = await sock.recv(65536)
            if not data:
                raise ConnectionError("the host closed the connection during the handshake")
            self.conn.receive_data(data)
            for ev in self.conn.events():
                if isinstance(ev, AcceptConnection):
                    return self
                raise ConnectionError(f"the host refused the connection: {ev!r}")

    @staticmethod
    def frame(message: str | bytes) -> bytes:
        """``message`` as the bytes of one masked client WebSocket frame (not sent). Made by
        hand rather than by wsproto, which refuses to send once the host began to close:
        an abusive client does not care."""
        data, first = (message.encode(), 0x81) if isinstance(message, str) else (bytes(message), 0x82)
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        key = os.urandom(4)
        masked = (int.from_bytes(data, "little") ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
        return head + key + masked

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view):]

    async def send(self, message: str | bytes) -> None:
        await self.write(self.frame(message))

    async def recv(self) -> str | bytes:
        while not self.messages:
            data = await self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.conn.receive_data(data)
            self.messages.extend(ev.data for ev in self.conn.events() if isinstance(ev, (TextMessage, BytesMessage)))
        return self.messages.pop(0)

    def abort(self) -> None:
        """Leave with a bare TCP close: no WebSocket close frame, whatever is unread."""
        self.sock.close()


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


async def pipeline_until_stalled(ws: RawWs, frame: str, *, stall: float = 0.5, most: int = 100_000) -> int:
    """Send ``frame`` without reading until the host stops taking bytes for ``stall``
    seconds (its backpressure holds); returns how many were sent."""
    data = ws.frame(frame)
    for i in range(most):
        with trio.move_on_after(stall) as scope:
            await ws.write(data)
        if scope.cancelled_caught:
            return i
    return most
