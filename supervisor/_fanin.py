"""Durable fan-in (``await_all_inports``): per-port buffers in Redis, assembled atomically.

With durable mailboxes a message routed to an ``await_all_inports`` process is
pushed onto that port's list (``{ns}:{process}:fanin:{port}``) in the same
fenced script that commits its sender's message, so it is never only in memory.
``assemble`` then moves one message from every port into the process's inbox
as a single entry — in one Lua script, so a crash can neither lose a buffered
value nor assemble it twice. It is idempotent: the host also runs it at start,
which finishes any assembly a crash interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .core.keys import Keys
from .core.protocol import json_default

__all__ = ["ASSEMBLE", "PUSH_IF_ROOM", "assemble", "fanin_key", "push_cmd", "push_if_room_cmd"]

# KEYS[1] the inbox stream, KEYS[2..] the port lists; ARGV[1] the new message id,
# ARGV[2..] the port names (JSON-quoted). Builds the same body as enqueue_cmd.
ASSEMBLE = """
for i = 2, #KEYS do
  if redis.call('LLEN', KEYS[i]) == 0 then return 0 end
end
local parts = {}
for i = 2, #KEYS do
  parts[#parts + 1] = ARGV[i] .. ':' .. redis.call('LPOP', KEYS[i])
end
redis.call('XADD', KEYS[1], '*', 'm', '{"id":' .. ARGV[1] .. ',"inputs":{' .. table.concat(parts, ',') .. '}}',
           'a', 0)
return 1
"""


# KEYS[1] the inbox stream, KEYS[2..] port lists; ARGV[1] max_pending, ARGV[2..] one value per
# list. Returns -1 when it pushed the values, else the inbox's length (refused, nothing pushed):
# one command, so sends submitted in order are buffered in order.
PUSH_IF_ROOM = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return n end
for i = 2, #KEYS do
  redis.call('RPUSH', KEYS[i], ARGV[i])
end
return -1
"""


def push_if_room_cmd(inbox: str, limit: int, pushes: Sequence[tuple[str, Any]]) -> tuple:
    """``push_cmd`` for each (list key, message), unless ``inbox`` holds ``limit`` entries."""
    return ("EVAL", PUSH_IF_ROOM, 1 + len(pushes), inbox, *(k for k, _ in pushes), limit,
            *(orjson.dumps(m, default=json_default) for _, m in pushes))


def fanin_key(namespace: str, process: str, port: str) -> str:
    """On one Redis (a cluster's layout: core.keys.Keys)."""
    return Keys(namespace).fanin(process, port)


def push_cmd(key: str, message: Any) -> tuple:
    return ("RPUSH", key, orjson.dumps(message, default=json_default))


async def assemble(redis: Any, inbox: str, keys: Sequence[str], ports: Sequence[str],
                   new_id: Callable[[], str]) -> int:
    """Move complete sets of port values (``keys``: one list per port of ``ports``) into
    ``inbox``; returns how many messages it made."""
    made = 0
    while await redis.execute("EVAL", ASSEMBLE, 1 + len(keys), inbox, *keys,
                              orjson.dumps(new_id()), *(orjson.dumps(p) for p in ports)) == 1:
        made += 1
    return made
