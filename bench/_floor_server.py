"""The bare floor: a trio-websocket server relaying each JSON-RPC text frame over a pipe.

Run as ``python bench/_floor_server.py``; prints its port on stdout and serves
until killed. Each connection gets one long-lived child Python process that
reads a request per line, doubles ``params.value`` and writes the reply. No
validation, no routing, no state: this is the least any such host must do.
Replies come back in order (the child is sequential), so the relay needs no
id bookkeeping.
"""

from __future__ import annotations

import subprocess
import sys

import trio
import trio_websocket

CHILD = r"""
import json, sys
rd, wr = sys.stdin.buffer, sys.stdout.buffer
for line in rd:
    m = json.loads(line)
    wr.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": {"value": m["params"]["value"] * 2}}).encode() + b"\n")
    wr.flush()
"""


async def _relay(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    proc = await trio.lowlevel.open_process([sys.executable, "-I", "-S", "-c", CHILD],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    async def to_child() -> None:
        while True:
            msg = await ws.get_message()
            await proc.stdin.send_all((msg if isinstance(msg, bytes) else msg.encode()) + b"\n")

    async def from_child() -> None:
        buf = b""
        while True:
            data = await proc.stdout.receive_some(1 << 16)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                await ws.send_message(line.decode())

    try:
        async with trio.open_nursery() as n:
            n.start_soon(to_child)
            n.start_soon(from_child)
    except* trio_websocket.ConnectionClosed:
        pass
    finally:
        proc.kill()
        await proc.wait()


async def main() -> None:
    async with trio.open_nursery() as n:
        server = await n.start(trio_websocket.serve_websocket, _relay, "127.0.0.1", 0, None)
        print(server.port, flush=True)


if __name__ == "__main__":
    trio.run(main)
