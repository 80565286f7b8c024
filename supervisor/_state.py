"""Actor state on Redis, with per-message transactions.

Each state key of process P lives at ``{namespace}:{P}:state:{key}`` as a JSON
string. While one message is handled, writes go to a :class:`StateTxn`
overlay (reads see the message's own writes); when the message succeeds the
overlay becomes one fenced script together with whatever else that message
commits, and when it fails the overlay is dropped: a failed message leaves no
trace. A process is handled by one cell at a time, so the overlay cannot race
another writer of the same keys.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import orjson

from .core.keys import Keys
from .core.errors import InvalidParams
from ._redis import Redis

__all__ = ["StateTxn", "state_prefix", "escape_glob"]

_DELETED = object()
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def escape_glob(text: str) -> str:
    return text.translate(_GLOB_SPECIAL)


def state_prefix(namespace: str, process: str) -> str:
    """On one Redis (a cluster's layout: core.keys.Keys)."""
    return Keys(namespace).state_prefix(process)


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidParams(f"a state key must be a non-empty string, got {key!r}")
    return key


def _number(value: Any, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise InvalidParams(f"{what} must be a number, got {value!r}")
    return value


class StateTxn:
    """The state view of one message: reads through, writes buffered until ``commands()``."""

    def __init__(self, redis: Redis, prefix: str, default_ttl: float | None = None):
        self.redis = redis
        self.prefix = prefix
        self.default_ttl = default_ttl
        self._overlay: dict[str, Any] = {}       # key -> JSON bytes | _DELETED
        self._expire: dict[str, float | None] = {}  # key -> seconds (None = persist)

    async def _read(self, *args: Any) -> Any:
        # Submitted, not executed: it then reaches Redis behind every commit queued before
        # it, even one still waiting for the connection, so a message sees the commits of
        # all earlier ones (the cell pipelines them: see ActorCell._serve).
        return await self.redis.submit(*args)()

    @property
    def dirty(self) -> bool:
        return bool(self._overlay or self._expire)

    async def _load(self, key: str) -> Any:
        v = self._overlay.get(key)
        if v is _DELETED:
            return None
        if v is None:
            v = await self._read("GET", self.prefix + key)
            if v is None:
                return None
        return orjson.loads(v)

    async def _exists(self, key: str) -> bool:
        v = self._overlay.get(key)
        if v is not None:
            return v is not _DELETED
        return bool(await self._read("EXISTS", self.prefix + key))

    def _store(self, key: str, value: Any) -> None:
        try:
            self._overlay[key] = orjson.dumps(value)
        except TypeError as exc:
            raise InvalidParams(f"state value for {key!r} is not JSON: {exc}") from exc

    async def call(self, op: str, args: list[Any]) -> Any:
        """Run one ActorState operation (``get``, ``set``, …) as the script asked it."""
        handler = getattr(self, "op_" + op, None) if isinstance(op, str) else None
        if handler is None:
            raise InvalidParams(f"unknown state operation {op!r}")
        try:
            return await handler(*args)
        except TypeError as exc:
            raise InvalidParams(f"state.{op}: {exc}") from exc

    async def op_get(self, key, default=None):
        v = await self._load(_key(key))
        return default if v is None else v

    async def op_set(self, key, value):
        self._store(_key(key), value)

    async def op_delete(self, key):
        key = _key(key)
        existed = await self._exists(key)
        self._overlay[key] = _DELETED
        self._expire.pop(key, None)
        return existed

    async def op_exists(self, key):
        return await self._exists(_key(key))

    async def op_increment(self, key, by=1):
        key = _key(key)
        cur = await self._load(key)
        new = _number(0 if cur is None else cur, f"state {key!r}") + _number(by, "the increment")
        self._store(key, new)
        return new

    async def op_decrement(self, key, by=1):
        return await self.op_increment(key, -_number(by, "the decrement"))

    async def _list(self, key: str) -> list:
        cur = await self._load(key)
        if cur is None:
            return []
        if not isinstance(cur, list):
            raise InvalidParams(f"state {key!r} is not a list")
        return cur

    async def op_push(self, key, value):
        key = _key(key)
        lst = await self._list(key)
        lst.append(value)
        self._store(key, lst)
        return len(lst)

    async def op_extend(self, key, values):
        key = _key(key)
        if not isinstance(values, list):
            raise InvalidParams("state.extend needs a list")
        lst = await self._list(key)
        lst.extend(values)
        self._store(key, lst)
        return len(lst)

    async def op_pop(self, key):
        key = _key(key)
        lst = await self._list(key)
        if not lst:
            return None
        value = lst.pop()
        self._store(key, lst)
        return value

    async def op_expire(self, key, seconds):
        key = _key(key)
        seconds = _number(seconds, "expire seconds")
        if not await self._exists(key):
            return False
        self._expire[key] = max(0.001, float(seconds))
        return True

    async def op_ttl(self, key):
        """Seconds until ``key`` expires; -1 when it never does; None when it does not exist."""
        key = _key(key)
        if not await self._exists(key):
            return None
        if key in self._expire:
            return self._expire[key]
        if key in self._overlay and self.default_ttl is not None:
            return self.default_ttl
        ms = await self._read("PTTL", self.prefix + key)
        if key in self._overlay and ms == -2:
            return -1
        return -1 if ms < 0 else ms / 1000

    async def op_keys(self, pattern="*"):
        if not isinstance(pattern, str):
            raise InvalidParams("state.keys needs a glob pattern string")
        # The prefix is escaped and the user's pattern only ever follows it, so no
        # pattern can match a key outside this process's prefix; the fnmatch below
        # re-checks on our side anyway.
        found: set[str] = set()
        cursor = b"0"
        n = len(self.prefix)
        while True:
            cursor, batch = await self._read("SCAN", cursor, "MATCH", escape_glob(self.prefix) + pattern,
                                             "COUNT", 1000)
            for k in batch:
                k = k.decode()
                if k.startswith(self.prefix):
                    found.add(k[n:])
            if cursor in (b"0", 0):
                break
        for key, v in self._overlay.items():
            if v is _DELETED:
                found.discard(key)
            elif fnmatch.fnmatchcase(key, pattern):
                found.add(key)
        return sorted(found)

    def commands(self) -> list[tuple]:
        """The Redis commands that commit this message's state changes (for its fenced commit)."""
        cmds: list[tuple] = []
        for key, v in self._overlay.items():
            full = self.prefix + key
            if v is _DELETED:
                cmds.append(("DEL", full))
                continue
            ttl = self._expire.get(key, self.default_ttl)
            if ttl is not None:
                cmds.append(("SET", full, v, "PX", max(1, int(ttl * 1000))))
            else:
                cmds.append(("SET", full, v))
        for key, ttl in self._expire.items():
            if key not in self._overlay and ttl is not None:
                cmds.append(("PEXPIRE", self.prefix + key, max(1, int(ttl * 1000))))
        return cmds
