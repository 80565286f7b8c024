"""ActorCell: one process of the graph, its mailbox, and the one worker serving it.

A cell owns, inside its ``run`` task: the sandboxed worker it took from the
pool, a watcher on that worker's exit, and the loop that feeds the worker one
message at a time. It *returns* only when asked to stop; any failure of the
worker leaves ``run`` as an exception for its supervisor to judge. The
mailbox belongs to the cell object, not the task, so messages queued while
the cell restarts wait for the next worker instead of being lost.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import orjson
import trio

from ._channel import BadFrame, ChannelClosed, FrameTooLarge, SendTimedOut
from ._cluster import Ownership
from .core import frames
from .core.errors import (ActorError, ActorFailed, ActorMoved, ActorStopped, ActorTimedOut, InvalidParams, Overloaded,
                          ResourceLimitExceeded, single_error)
from .core.messages import Envelope, ProcessSpec
from ._mailbox import DurableInbox, feed, find_entry, retry_or_deadletter_cmds
from ._metrics import ActorStats
from .core.keys import Keys
from .core.placement import fenced_cmd
from .core.protocol import Blob, json_default
from ._redis import Fenced, RedisError, RedisUnavailable, Reply
from ._sandbox._base import ExitInfo, Worker
from ._state import StateTxn

if TYPE_CHECKING:
    from .core.config import Config
    from .core.discovery import ComponentSpec
    from .core.messages import Commit
    from ._pool import WorkerPool

__all__ = ["ActorCell", "CellHost", "WorkerDied"]

log = logging.getLogger("supervisor.actor")


class WorkerDied(Exception):
    """The cell's sandbox died under it; ``exit`` says how."""

    def __init__(self, actor: str, exit: ExitInfo):
        super().__init__(f"actor {actor!r} {exit.describe()}")
        self.actor = actor
        self.exit = exit


class ProtocolViolation(Exception):
    """The sandbox sent something that is not the channel protocol (a hostile or broken
    script writing to the channel): the worker is killed and its message fails."""

    def __init__(self, actor: str, why: str):
        super().__init__(f"actor {actor!r} broke the sandbox channel protocol: {why}")
        self.actor = actor


LOAD_TIMEOUT = float(os.environ.get("REFLOW_LOAD_TIMEOUT", "10"))  # seconds for a script's top-level code

# What one message may make its sandbox send the host (outputs, state calls, log lines,
# JSON values per byte of ``max_output``): the frame codec's limits, core.frames.


class ScriptLoadFailed(Exception):
    """The script did not load in its sandbox (syntax error, import error, …)."""

    def __init__(self, actor: str, error: dict):
        data = error.get("data") or {}
        where = next(iter(reversed(data.get("traceback") or [])), "")
        super().__init__(f"actor {actor!r} failed to load: {error.get('message')}" + (f" ({where})" if where else ""))
        self.error = error


# Send-ahead window (see ActorCell._serve): 8 ahead, topped up after every reply, meant one
# small write (and one worker wake-up) per message once the window filled; 64, topped up
# once half of it is answered, carries ~32 per write, which is what lets one actor and a
# two-actor graph keep up (make bench's graph and batch runs). The byte cap keeps large
# payloads from piling up in the channel and in the worker's read buffer.
SEND_AHEAD = 64
SEND_REFILL = SEND_AHEAD // 2
SEND_AHEAD_BYTES = 1 << 20
SETTLE_AT_EXIT = 5.0  # seconds a stopping run waits for Redis to answer its commits


async def _gone(worker: Worker) -> ExitInfo:
    """How a worker whose channel closed ended. It is normally exiting already (give it a
    second, so that its own exit status is what we report); one that closed the channel
    and lives on is of no use and is killed."""
    with trio.move_on_after(1.0):
        return await worker.wait()
    worker.kill()
    return await worker.wait()


def _cancelled(exc: BaseException | None) -> bool:
    """True when ``exc`` is trio's Cancelled, alone or in groups of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _normal(exit: ExitInfo) -> bool:
    """Whether a worker that ended by itself exited normally: status 0, no signal, no limit.
    The SDK exits so for ``context.stop()``, ``sys.exit(0)`` and ``process.exit(0)`` (after
    answering the message); a script ending its process with status 0 any other way is a
    normal exit too (as OTP's ``normal``). Every other end is a crash."""
    return exit.code == 0 and exit.signal is None and not exit.limit


def _death_error(name: str, exit: ExitInfo) -> ActorError:
    if _normal(exit):
        return ActorStopped(f"actor {name!r} exited normally (exit code 0) before answering this message",
                            {"type": "WorkerExited", "exit_code": 0})
    if exit.limit:
        return ResourceLimitExceeded(exit.limit, f"actor {name!r} exceeded its {exit.limit} limit")
    return ActorFailed(f"actor {name!r} {exit.describe()}", {"type": "WorkerDied", **exit.to_data(),
                                                             "message": exit.describe()})


class CellHost(Protocol):
    """What a cell asks of the host it runs in (``Host`` implements it): named here, so that
    the cell needs nothing of the host's module."""

    config: Config
    redis: Any                   # the pipelined client (_redis.Redis) once the host runs
    keys: Keys                   # where everything lives in that Redis (its layout: core.keys)
    pool: WorkerPool | None      # set before any cell runs
    durable: bool                # mailboxes are Redis streams (else memory)
    stopping: bool

    async def commit(self, cell: ActorCell, txn: Any, routed: list, env: Envelope, *, ack: bool = True) -> None: ...

    def start_commit(self, cell: ActorCell, txn: Any, routed: list, env: Envelope, *, ack: bool = True) -> Commit: ...

    def publish(self, cell: ActorCell, routed: list, message_id: str) -> None: ...

    def relay_outbox(self, process: str) -> None: ...


class ActorCell:
    def __init__(self, process: ProcessSpec, host: CellHost):
        self.process = process
        self.name = process.name
        self.host = host
        cfg = host.config
        self._send, self._recv = trio.open_memory_channel[Envelope](cfg.workspace.mailbox.max_pending)
        self.tier: str | None = None
        self.worker: Worker | None = None
        self.current: Envelope | None = None
        self.processed = 0
        self.stats = ActorStats()  # what /metrics and the dashboard read (see _metrics)
        self._rid = itertools.count(1)
        self.default_ttl = cfg.workspace.redis.ttl
        self.max_output = cfg.workspace.sandbox.max_output
        self.max_values = frames.max_values_for(self.max_output)
        self.default_timeout = cfg.supervision.timeout
        self.shm_threshold = cfg.workspace.sandbox.shm_threshold
        self.subscribers: dict[int, Callable[[str, str, dict, str], None]] = {}
        # Told of each message the script failed (its error: message, data.traceback): the
        # FBP protocol's network:processerror (supervisor/_fbp.py).
        self.on_failure: Callable[[dict], None] | None = None
        self.stopped_reason: str | None = None
        self.stop_requested: str | None = None  # the script asked to stop (context.stop(), sys.exit(0))
        self.exit_detail: str | None = None     # how the last run ended normally, if it did
        self._retry: collections.deque[Envelope] = collections.deque()
        # Sent to the worker behind ``current``, with their request ids, not yet started.
        self.ahead: collections.deque[tuple[Envelope, int]] = collections.deque()
        # The feeder's state (see _mailbox.feed), told what happens through its methods.
        self.durable_inbox = DurableInbox("", cfg.workspace.mailbox.batch)
        self.rekey(host.keys)
        self.ownership = Ownership(self.name)
        self._owned_since = 0  # the ownership's acquisitions when the last run started
        self._merged: tuple[trio.MemorySendChannel[Envelope], trio.MemoryReceiveChannel[Envelope]] | None = None
        self.runs = 0
        # Handled messages whose commit is on its way to Redis, oldest first (see _serve).
        self._committing: collections.deque[tuple[Commit, Envelope, list, dict]] = collections.deque()

    @property
    def component(self) -> ComponentSpec:
        return self.process.component

    def rekey(self, keys: Keys) -> None:
        """Name this process's keys in ``keys``'s layout (the host learns once connected whether
        it talks to a Redis Cluster; cells built before run on whichever it is)."""
        self.keys = keys
        self.prefix = keys.state_prefix(self.name)
        self.inbox = self.durable_inbox.key = keys.inbox(self.name)
        self.deadletters = keys.deadletters(self.name)
        # Who may write as this process: every commit and inbox read is fenced by its lease.
        self.lease = keys.lease(self.name)

    # -- the outside ------------------------------------------------------
    def submit(self, env: Envelope) -> None:
        """Queue a message.

        Raises:
            Overloaded: the mailbox is full.
            ActorStopped: the cell is stopped and its supervisor will not restart it.
        """
        if self.stopped_reason is not None:
            raise ActorStopped(self.stopped_reason, {"actor": self.name})
        try:
            self._send.send_nowait(env)
        except trio.WouldBlock:
            raise Overloaded(f"actor {self.name!r} has {self.host.config.workspace.mailbox.max_pending} "
                             "messages waiting; retry later", {"actor": self.name}) from None

    async def put(self, env: Envelope) -> None:
        """Queue a routed message, waiting for room (cancelled, it was not queued)."""
        try:  # without a trip through the scheduler when there is room (the usual case)
            self._send.send_nowait(env)
        except trio.WouldBlock:
            await self._send.send(env)

    def start_now(self, message_id: str, body: bytes, claim: Reply) -> bool:
        """Start a durable message at once, while Redis adds it, if this run waits with
        nothing in line (its feeder is idle too: the caller claimed, see DurableInbox.claim).

        Its add also reads it for the feeder (into the group's pending list), so once
        confirmed (``_confirm``) it is a durable message like any other; the worker meanwhile
        runs it, which takes the add's round trip off its latency. If the add fails, what
        the run did leaves no trace: it is neither committed nor published (its sender is
        told the add failed, as always)."""
        if self._merged is None:
            return False
        send, recv = self._merged
        if not recv.statistics().tasks_waiting_receive:
            return False  # (_serve waits for its next message only when all is done)
        send.send_nowait(Envelope(inputs=orjson.loads(body)["inputs"], message_id=message_id, body=body,
                                  claim=claim))
        return True

    async def _confirm(self, env: Envelope) -> bool:
        """Whether a message started before Redis confirmed its add (``start_now``) was added;
        if so it takes its stream id."""
        assert env.claim is not None and env.body is not None
        try:
            entries = await env.claim()  # (cancelled here, it keeps its claim for the run's exit)
        except (RedisUnavailable, RedisError):
            entries = None
        env.claim = None
        env.stream_id = find_entry(entries, env.body) if isinstance(entries, list) else None
        return env.stream_id is not None

    def pending(self) -> int:
        return self._send.statistics().current_buffer_used

    def guarded(self, cmds: list[tuple]) -> Reply:
        """Submit writes made as this process's owner, in one script that runs them only
        while this host holds the process's lease (``core.placement.FENCED``): the one way
        every commit, acknowledgement, requeue and dead letter reaches Redis (reads:
        ``read_inbox``).
        Its reply is the last command's; raises Fenced (a RedisError) once the lease is gone."""
        return self.host.redis.submit(*fenced_cmd(self.lease, self.ownership.token_value or "", cmds))

    def read_inbox(self, read: tuple) -> Reply:
        """An inbox read (XREADGROUP) as this process's owner, with the lease read in the same
        MULTI/EXEC: atomic and native, where a read inside the fenced script costs Redis
        twice as much (Lua converts the entries to its tables and back). Not conditional,
        so a read that finds another holder may have taken entries into the group's pending
        list that the owner was not handed: this host then stops serving and asks the owner
        to sweep again (``resweep``, see _cluster), and the entries go to no worker here.
        Its reply is the read's; raises Fenced when the lease is not this host's."""
        token = self.ownership.token_value

        def checked(replies: list) -> Any:
            held, entries = replies
            if token is not None and held == token.encode():
                return entries
            self.ownership.lose("an inbox read found the lease held by another host")
            if entries:
                self.host.redis.submit("PUBLISH", self.keys.channel(),
                                       f"resweep {self.name}")
            raise Fenced(f"FENCED {self.lease} is held by {held!r}, not {token!r}")

        return self.host.redis.submit_transaction([("GET", self.lease), read], then=checked)

    def idle(self) -> bool:
        """Nothing in hand, nothing committing, nothing queued (a handoff waits for this)."""
        return self.current is None and not self._committing and not self.ahead and self.pending() == 0

    def moved(self, why: str) -> None:
        """The lease moved away mid-life: refuse every queued memory message (calls that had
        not started; durable ones wait in the inbox for the new owner), with an error that
        says a retry is safe (the API's forwarding retries it at the new owner)."""
        self._fail_waiting(ActorMoved(self.name, why))

    def fail_queued(self, error: ActorError) -> None:
        """Refuse new messages and answer every queued one with ``error`` (the cell will not run again)."""
        self.stopped_reason = error.message
        self._fail_waiting(error)

    def _fail_waiting(self, error: ActorError) -> None:
        while self._retry:
            self._retry.popleft().fail(error)
        while True:
            try:
                self._recv.receive_nowait().fail(error)
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    # -- the task ---------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> str | None:
        """Take a worker, load the script, serve messages until cancelled.

        Returns (a normal exit, see :func:`_normal`) when the script stopped itself: after
        answering and committing the message that asked (``context.stop()``,
        ``sys.exit(0)``), or when its worker exited with status 0 unasked (the message in
        hand, if any, fails). Returns how, e.g. ``"context.stop()"``. Messages sent ahead
        to the worker and not started wait for the next run.

        Raises:
            WorkerDied: the sandbox died (crash, kill, resource limit).
            ActorTimedOut: a message ran past its timeout; the worker was killed.
            ScriptLoadFailed: the script does not load.
        """
        self.stopped_reason = None
        self.stop_requested = self.exit_detail = None
        self.runs += 1
        if self.ownership.acquisitions != self._owned_since:  # the first run under a new lease
            self._owned_since = self.ownership.acquisitions
            self.durable_inbox.suspect = not self.ownership.handed_over
        try:
            return await self._run(task_status)
        except WorkerDied as exc:
            if not _normal(exc.exit):
                raise
            self.exit_detail = "its worker exited with code 0"
            return self.exit_detail

    async def _run(self, task_status: Any) -> str | None:
        worker = await self.host.pool.acquire(self.component.runtime)
        self.worker, self.tier = worker, worker.tier
        failure: BaseException | None = None
        merged: trio.MemoryReceiveChannel[Envelope] | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, worker, nursery.cancel_scope)
                    await self._load(worker)
                    log.debug("script loaded into worker", extra={"actor": self.name, "pid": worker.pid})
                    inbox: trio.MemoryReceiveChannel[Envelope] = self._recv
                    if self.host.durable:
                        # Calls (memory) and durable messages meet in one channel, with room
                        # for a send-ahead window of them (see _serve).
                        merged_send, merged = trio.open_memory_channel[Envelope](SEND_AHEAD)
                        inbox = merged
                        self._merged = merged_send, merged
                        nursery.start_soon(self._forward, merged_send)
                        nursery.start_soon(feed, self, merged_send)
                        if self.keys.clustered:  # (what a last owner routed and did not relay yet)
                            self.host.relay_outbox(self.name)
                    task_status.started()
                    await self._serve(worker, inbox)
                    nursery.cancel_scope.cancel()  # (returned: the script stopped; see _serve)
            except BaseExceptionGroup as group:
                # The watcher never raises, so a group here holds the serving loop's one
                # failure: give the supervisor that error, not a wrapper around it.
                error = single_error(group)
                if error is None:
                    raise
                raise error from None
        except BaseException as exc:
            failure = exc
            raise
        finally:
            died_by_itself = worker.exit_info is not None
            self._merged = None
            with trio.CancelScope(shield=True):
                await worker.aclose()
                self.host.pool.release(worker)
                self.worker = None
                await self._settle_at_exit()
                self._give_back([pre for pre, _ in self.ahead], front=True)  # sent to this worker
                self.ahead.clear()
                waiting = []  # taken from the mailbox into the merged inbox, not yet served
                while merged is not None:
                    try:
                        waiting.append(merged.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                self._give_back(waiting, front=False)
                env, self.current = self.current, None
                if env is not None and env.claim is not None:
                    with trio.move_on_after(SETTLE_AT_EXIT):
                        await self._confirm(env)
                if env is not None:
                    if env.durable:
                        # Still pending in its stream (if added: see start_now): the next run's
                        # feeder hands it out again, counting an attempt unless it was only
                        # stopped by its supervisor.
                        if env.stream_id is not None and not _cancelled(failure):
                            self.durable_inbox.charge(env.stream_id)
                    elif died_by_itself:
                        env.fail(_death_error(self.name, worker.exit_info))
                    elif self.host.stopping:
                        env.fail(ActorStopped(f"actor {self.name!r} was stopped"))
                    elif _cancelled(failure):
                        # Stopped by its supervisor (e.g. a sibling's one_for_all restart):
                        # the message did nothing wrong, so the next incarnation gets it.
                        self._retry.appendleft(env)
                    else:  # it failed with this message in hand: never run it again unasked
                        env.fail(ActorFailed(f"actor {self.name!r} failed: {failure}",
                                             {"type": type(failure).__name__, "message": str(failure)}))
        if self.stop_requested is not None:
            self.exit_detail = self.stop_requested
            return self.exit_detail
        if worker.exit_info is not None:
            raise WorkerDied(self.name, worker.exit_info)
        return None

    def _give_back(self, envs: list[Envelope], *, front: bool) -> None:
        """Messages a run took but never started (they did nothing wrong): those from memory
        go back in line, in order (``front``: ahead of what is there), or are refused if the
        host is stopping; durable ones are still pending in their stream, for the next run."""
        envs = [env for env in envs if not env.durable]
        if self.host.stopping:
            for env in envs:
                env.fail(ActorStopped(f"actor {self.name!r} was stopped"))
        elif front:
            self._retry.extendleft(reversed(envs))
        else:
            self._retry.extend(envs)

    async def _watch(self, worker: Worker, scope: trio.CancelScope) -> None:
        await worker.wait()
        scope.cancel()

    async def _request(self, worker: Worker, method: str, params: dict) -> int:
        rid = next(self._rid)
        try:
            await worker.channel.send(orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
        except SendTimedOut as exc:  # (a worker that stops reading while it loads, too)
            await self._kill(worker, str(exc), "time")
        return rid

    async def trial_load(self) -> str | None:
        """Load this cell's script into a throwaway worker: None if it loads, else why not.
        Hot reload uses it so that code which does not load never replaces code that runs."""
        worker = await self.host.pool.acquire(self.component.runtime)
        try:
            await self._load(worker)
        except (ScriptLoadFailed, WorkerDied, ProtocolViolation) as exc:
            return str(exc)
        finally:
            with trio.CancelScope(shield=True):
                await worker.aclose()
                self.host.pool.release(worker)
        return None

    async def _load(self, worker: Worker) -> None:
        c = self.component
        worker.channel.max_frame = self.max_output  # (the channel reads no frame longer, see _reply)
        # A worker that stops reading would hold a send (and this cell) for good.
        worker.channel.send_timeout = self._timeout() or LOAD_TIMEOUT
        rid = await self._request(worker, "load", {
            "source": c.source, "filename": c.file.name, "entry": c.entry, "actor_id": self.name,
            "config": self.process.config, "limits": self._limits()})
        with trio.move_on_after(LOAD_TIMEOUT) as scope:
            reply = await self._reply(worker, rid, None, None)
        if scope.cancelled_caught:
            # Top-level code that never returns would hold up every actor started after
            # this one (a supervisor starts its children in order, as OTP does).
            worker.kill(limit="time")
            raise ScriptLoadFailed(self.name, {"message": f"the script did not finish loading within "
                                                          f"{LOAD_TIMEOUT:g}s (top-level code that never returns?)"})
        if "error" in reply:
            raise ScriptLoadFailed(self.name, reply["error"])

    def _limits(self) -> dict:
        sb = self.host.config.workspace.sandbox
        rt = sb.python if self.component.runtime == "python" else sb.javascript
        memory = self.process.memory or self.component.memory or rt.memory
        return {"memory": memory, "cpu_seconds": sb.cpu_seconds, "nproc": sb.max_processes}

    async def _forward(self, merged: trio.MemorySendChannel[Envelope]) -> None:
        async for env in self._recv:
            try:
                await merged.send(env)
            except BaseException:
                self._retry.append(env)  # taken from the mailbox but never handled
                raise

    async def _serve(self, worker: Worker, inbox: trio.MemoryReceiveChannel[Envelope]) -> None:
        """Serve messages in order, with up to SEND_AHEAD more already sent to the worker.

        The worker handles them strictly in order and starts the next only after
        answering the current one, so this overlaps its work (and the channel's round
        trip) with ours on the reply, without changing what any message sees (see below
        for its state reads).
        Messages that are waiting when the window has room go out in one write: under
        load, one system call (and one wake-up of the worker) carries several.

        Commits are pipelined the same way: a handled message's commit script is queued for
        Redis and the next reply handled while it travels; each is finished (answered,
        published, routed) in order once Redis has answered, and all of them before this
        waits for new messages or handles a failure. A state call's reads go out behind
        the commits on the same connection, so it still sees every earlier message
        committed.
        """
        ahead = self.ahead
        while True:
            if not ahead:
                await self._settle(everything=True)
                env = await self._next(inbox)
                if env is None:
                    return
                await self._send_ahead(worker, inbox, env)
                if not ahead:  # (it could not be sent: see _unsendable)
                    continue
            elif len(ahead) <= SEND_REFILL:
                await self._send_ahead(worker, inbox, self._next_nowait(inbox))
            cur, rid = ahead.popleft()
            self.current = cur
            began = time.perf_counter()
            try:
                await self._handle(worker, cur, rid)
            except Exception:
                self.stats.observe(time.perf_counter() - began, cur.error or True)
                raise
            self.stats.observe(time.perf_counter() - began, cur.error)
            self.current = None
            if self.stop_requested is not None:  # its worker runs nothing more: end this run
                await self._settle(everything=True)
                return
            await self._settle(everything=len(self._committing) >= SEND_AHEAD)
            if worker.exit_info is not None:  # a limit ended the worker: the rest wait for the next one
                raise WorkerDied(self.name, worker.exit_info)

    async def _next(self, inbox: trio.MemoryReceiveChannel[Envelope]) -> Envelope | None:
        if self._retry:
            return self._retry.popleft()
        try:
            return await inbox.receive()
        except trio.EndOfChannel:
            return None

    def _next_nowait(self, inbox: trio.MemoryReceiveChannel[Envelope]) -> Envelope | None:
        if self._retry:
            return self._retry.popleft()
        try:
            return inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None

    async def _send_ahead(self, worker: Worker, inbox: trio.MemoryReceiveChannel[Envelope],
                          env: Envelope | None) -> None:
        """Hand the worker ``env`` and what else is waiting, in one write, until ``ahead``
        holds SEND_AHEAD messages or the write passes SEND_AHEAD_BYTES; each joins ``ahead``.
        If the worker is already gone, they never reached it: they wait for the next worker
        (memory) or stay pending (durable)."""
        envs: list[Envelope] = []
        frames = []
        size = 0
        while env is not None:
            rid = next(self._rid)
            payload, attachments = self._payload(worker, env)
            try:
                frame = orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "process", "params": {
                    "actor_id": self.name, "payload": payload, "message_id": env.message_id,
                    "config": self.process.config if env.config is None else env.config,
                    "timestamp": int(time.time() * 1000)}}, default=json_default)
            except orjson.JSONEncodeError as exc:
                # The API refuses what orjson cannot write (see _protocol.MAX_DEPTH); what
                # slips past it (another script's output, say) fails its own message only.
                why = str(exc)
                await self._fail_alone(env, InvalidParams(
                    f"the message cannot be sent to actor {self.name!r}: {why}",
                    {"limit": "depth" if "ecursion" in why else "integer", "message": why}))
                env = self._next_nowait(inbox)
                continue
            size += len(frame) + sum(memoryview(a).nbytes for a in attachments)
            frames.append((frame, attachments))
            envs.append(env)
            self.ahead.append((env, rid))
            if len(self.ahead) >= SEND_AHEAD or size > SEND_AHEAD_BYTES:
                break
            env = self._next_nowait(inbox)
        if not envs:
            return
        try:
            await worker.channel.send_frames(frames)
        except (ChannelClosed, SendTimedOut) as exc:
            for _ in envs:
                self.ahead.pop()
            self._give_back(envs, front=True)
            if isinstance(exc, SendTimedOut):  # it stopped reading: of no use, and it holds this cell
                await self._kill(worker, str(exc), "time")
            raise WorkerDied(self.name, await _gone(worker)) from None

    async def _fail_alone(self, env: Envelope, error: ActorError) -> None:
        """``env`` cannot be written on (orjson refuses an integer beyond 64 bits or nesting
        past 254 levels, in its inputs or its outputs): it fails alone, never the actor;
        durable, it goes the way of a message the script failed on (dead letters in the end)."""
        log.warning("%s", error.message, extra={"actor": self.name, "message_id": env.message_id})
        if env.stream_id is not None:
            await self._retry_later(env, {"type": type(error).__name__, "message": error.message})
        env.fail(error)

    def _payload(self, worker: Worker, env: Envelope) -> tuple[dict, list]:
        """``env``'s inputs for the channel: large bytes in shared memory when there is room,
        other bytes as attachments (where the worker takes them)."""
        env.shm_end = 0  # (a message sent again goes to a new worker: nothing of the old ring)
        if getattr(worker, "ready_info", {}).get("attachments") is not True:
            return env.inputs, []
        payload, attachments = {}, []
        shm = getattr(worker, "shm", None)
        for port, msg in env.inputs.items():
            if msg.get("type") == "bytes" and isinstance(msg.get("value"), Blob):
                data = msg["value"].data
                ref = None
                if shm is not None and memoryview(data).nbytes >= self.shm_threshold:
                    ref = shm.inbound.put(data)  # None when the ring is full: attach instead
                if ref is not None:
                    env.shm_end = ref[3]
                    msg = {"type": "bytes", "$shm": ref}
                else:
                    attachments.append(data)
                    msg = {"type": "bytes", "$att": len(attachments) - 1}
            payload[port] = msg
        return payload, attachments

    async def _handle(self, worker: Worker, env: Envelope, rid: int) -> None:
        # (The worker already has the message: confirming it overlaps with its run.)
        added = env.claim is None or await self._confirm(env)
        txn = StateTxn(self.host.redis, self.prefix, self.default_ttl)
        timeout = self._timeout()
        if not timeout:  # (no cancel scope to open and close per message)
            reply = await self._reply(worker, rid, env, txn)
        else:
            with trio.move_on_after(timeout) as scope:
                reply = await self._reply(worker, rid, env, txn)
            if scope.cancelled_caught:
                env.fail(ActorTimedOut(f"actor {self.name!r} took longer than {timeout:g}s", {"timeout": timeout}))
                self._charge(env)
                worker.kill(limit="time")
                await worker.wait()
                raise ActorTimedOut(f"actor {self.name!r} timed out after {timeout:g}s; its worker was killed")
        if "error" in reply:
            await self._settle(everything=True)  # (so that what a failure sends comes after)
            err = reply["error"]
            if err.get("code") == ResourceLimitExceeded.code:
                limit = (err.get("data") or {}).get("limit", "memory")
                env.fail(ResourceLimitExceeded(limit, f"actor {self.name!r} exceeded its {limit} limit"))
                self._charge(env)
                worker.kill(limit=limit)
                await worker.wait()
                return
            if not added:  # (see start_now)
                return
            error = ActorFailed(f"actor {self.name!r} failed: {err.get('message')}", err.get("data"))
            if self.on_failure is not None:
                self.on_failure(err)
            final = True  # no further attempt will be made: the error port hears of it
            if env.stream_id is not None:
                final = False
                if env.outage:  # Redis went away under the script: not the message's fault
                    self._lost_to_outage(env)
                else:
                    final = await self._retry_later(env, err.get("data") or {"message": err.get("message")})
            if final and "error" in self.component.outports:
                await self._emit_error(env, err)
            env.fail(error)
            return
        if not added:
            return
        stop = (reply.get("result") or {}).get("stop")
        if stop is not None:  # the script stopped itself normally with this answer
            self.stop_requested = str(stop)[:200]
        outputs = (reply.get("result") or {}).get("outputs") or {}
        routed = env.emitted + [(p, m) for p, m in outputs.items() if (p, m) not in env.emitted]
        try:
            commit = self.host.start_commit(self, txn, routed, env)
        except (TypeError, ValueError) as exc:  # (orjson cannot write what the script made)
            await self._settle(everything=True)
            await self._fail_alone(env, ActorFailed(f"actor {self.name!r} failed: its output or state cannot "
                                                    f"be stored: {exc}", {"type": "NotStorable", "message": str(exc)}))
            return
        self._committing.append((commit, env, routed, outputs))

    def _timeout(self) -> float | None:
        """Seconds a message may take: the process's, its script's, or the default."""
        return self.process.timeout or self.component.timeout or self.default_timeout

    async def _settle_at_exit(self) -> None:
        """A run ends: finish the commits on their way (they are queued in Redis; only the
        answers and the routing are left). If Redis does not answer in time, a durable
        message stays pending in its stream (the next run hands it out, or finds it
        acknowledged); a call is told its outcome is unknown."""
        with trio.move_on_after(SETTLE_AT_EXIT):
            await self._settle(everything=True)
        while self._committing:
            _, env, _, _ = self._committing.popleft()
            env.fail(ActorFailed(f"actor {self.name!r}: the commit of this message was not confirmed "
                                 f"within {SETTLE_AT_EXIT:g}s", {"type": "CommitUnconfirmed"}))

    async def _settle(self, *, everything: bool) -> None:
        """Finish the commits on their way, oldest first: those Redis has answered, or
        with ``everything``, all of them."""
        committing = self._committing
        while committing and (everything or committing[0][0].ready):
            commit, env, routed, outputs = committing[0]
            try:
                # (A cancel here leaves it first in line, for the run's exit to finish.)
                if commit.finish is not None:
                    await commit.finish()
            except ActorError as exc:
                committing.popleft()
                if env.stream_id is not None:
                    if isinstance(exc.__cause__, RedisUnavailable):
                        self._lost_to_outage(env)
                    else:  # Redis refused the commit (e.g. out of memory): that costs an attempt
                        await self._retry_later(env, {"type": "CommitFailed", "message": exc.message})
                env.fail(exc)
                continue
            committing.popleft()
            if env.stream_id is not None:
                self.durable_inbox.finished(env.stream_id)
            self.processed += 1
            if routed:
                self.stats.routed(routed)
            env.resolve(outputs)
            self.host.publish(self, routed, env.message_id)

    async def _emit_error(self, env: Envelope, err: dict) -> None:
        """Send a failed message's error out of the actor's ``error`` port (CONTRACT: error ports)."""
        data = err.get("data") if isinstance(err.get("data"), dict) else {}
        message = {"type": "error", "value": {"message": str(data.get("message") or err.get("message")),
                                              "code": data.get("code")}}
        routed = [("error", message)]
        try:
            await self.host.commit(self, StateTxn(self.host.redis, self.prefix, self.default_ttl), routed, env,
                                   ack=False)
        except ActorError as exc:
            log.error("could not send to the error port: %s", exc, extra={"actor": self.name})
            return
        self.host.publish(self, routed, env.message_id)

    def _charge(self, env: Envelope) -> None:
        """``env`` ended its worker (time or resource limit): it has been answered, and if
        durable it costs an attempt when the next run hands it out again."""
        self.current = None
        if env.stream_id is not None:
            self.durable_inbox.charge(env.stream_id)

    def _lost_to_outage(self, env: Envelope) -> None:
        """A durable message whose outcome Redis could not record: still pending in its
        stream, it is handed out again by the feeder's next sweep, no attempt counted."""
        assert env.stream_id is not None
        self.durable_inbox.lost(env.stream_id)

    async def _retry_later(self, env: Envelope, error: dict) -> bool:
        """A durable message the script failed on: to the back of the inbox, or dead letters
        (then True: it will not be tried again)."""
        assert env.stream_id is not None and env.body is not None
        cmds, dead = retry_or_deadletter_cmds(self.deadletters, self.name, self.inbox, env.stream_id, env.body,
                                              env.attempts + 1, error, self.process.max_deliveries)
        try:
            await self.guarded(cmds)()
        except (RedisUnavailable, RedisError) as exc:
            if isinstance(exc, Fenced):
                self.ownership.lose("a requeue was refused: another host holds the lease")
            log.error("could not requeue a failed message: %s", exc, extra={"actor": self.name})
            self._lost_to_outage(env)
            return False
        self.durable_inbox.finished(env.stream_id)
        if dead:
            log.error("message moved to the dead-letter stream after %d attempts", env.attempts + 1,
                      extra={"actor": self.name, "message_id": env.message_id})
        else:
            self.durable_inbox.poke()
        return dead

    async def _reply(self, worker: Worker, rid: int, env: Envelope | None, txn: StateTxn | None) -> dict:
        """Read frames until the reply to ``rid``, serving state calls and outputs meanwhile.

        What the worker sends for one request is bounded before it is parsed: each frame by
        the channel (``max_output`` bytes, attachments included), all of them together by
        ``max_output`` bytes and ``max_values`` JSON values, and by the outputs and state
        calls one request may make (core.frames.RequestReader judges each frame against
        them, and its shape against the protocol); past any of them the worker is
        killed with the output limit (WorkerDied; its message answers -32005). A frame that
        is not the protocol (not JSON, not an object, a reply to another request, a method
        the host never serves) is a ProtocolViolation. Either way only this worker ends.
        """
        channel = worker.channel
        start = channel.bytes_received
        shm = getattr(worker, "shm", None)
        reader = frames.RequestReader(rid, self.max_output, self.max_values, outputs=env is not None,
                                      take_shm=None if shm is None else lambda ref: shm.outbound.take(ref))
        while True:
            try:
                frame = await channel.receive()
            except ChannelClosed:
                raise WorkerDied(self.name, await _gone(worker)) from None
            except FrameTooLarge:
                await self._kill(worker, f"a frame longer than {channel.max_frame} bytes")
            except BadFrame as exc:
                self._violation(worker, env, str(exc))
            event = reader.feed(frame, channel.attachments, channel.bytes_received - start)
            kind = type(event)
            if kind is frames.Reply:
                if env is not None and env.shm_end:  # the worker is done with its inputs
                    shm.inbound.release(env.shm_end)  # type: ignore[union-attr]
                return event.message
            if kind is frames.Output:
                env.emitted.append((event.port, event.message))
                if env.on_output is not None:
                    env.on_output(event.port, event.message)
            elif kind is frames.StateCall:
                if txn is not None and not await self._state_call(worker, event.id, txn, event.params) \
                        and env is not None:
                    env.outage = True
            elif kind is frames.Log:
                log.info("script output (its further lines for this request are dropped)" if event.last
                         else "script output", extra={"actor": self.name, "stream": event.stream, "text": event.text})
            elif kind is frames.OverLimit:
                await self._kill(worker, event.reason)
            elif kind is frames.Violation:
                self._violation(worker, env, event.reason)

    async def _kill(self, worker: Worker, why: str, limit: str = "output") -> NoReturn:
        """The worker broke ``limit`` (it sent more than its output allows, or stopped reading
        its channel: "time"): kill it with that limit, so that its message answers -32005
        ``{"limit": …}`` (see run), and raise WorkerDied."""
        log.warning("sandbox killed: %s", why, extra={"actor": self.name})
        worker.kill(limit=limit)
        raise WorkerDied(self.name, await worker.wait()) from None

    def _violation(self, worker: Worker, env: Envelope | None, why: str) -> NoReturn:
        error = ProtocolViolation(self.name, why)
        worker.kill()
        if env is not None and env.stream_id is None:
            env.fail(ActorFailed(str(error), {"type": "ProtocolViolation", "message": str(error)}))
            self.current = None  # failed here: never handed to the next incarnation
        raise error

    async def _state_call(self, worker: Worker, sid: Any, txn: StateTxn, params: dict) -> bool:
        """Serve one state call; False if Redis could not be reached for it."""
        reachable = True
        try:
            args = params.get("args") or []
            if not isinstance(args, list):
                raise InvalidParams("state args must be a list")
            result = await txn.call(params.get("op"), args)
            reply = {"jsonrpc": "2.0", "id": sid, "result": result}
        except ActorError as exc:
            reply = {"jsonrpc": "2.0", "id": sid, "error": exc.to_error()}
        except (RedisUnavailable, RedisError) as exc:
            # The script sees the state call fail (and its message fails); the worker lives on.
            reachable = not isinstance(exc, RedisUnavailable)
            reply = {"jsonrpc": "2.0", "id": sid, "error": {"code": ActorFailed.code,
                                                            "message": f"state unavailable: {exc}"}}
        try:
            await worker.channel.send(orjson.dumps(reply))
        except SendTimedOut as exc:  # it stopped reading its replies (a pipelined flood)
            await self._kill(worker, str(exc), "time")
        return reachable
