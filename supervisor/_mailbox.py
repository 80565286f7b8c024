"""Durable mailboxes: one Redis stream per process, read through a consumer group.

Life of a message (``actor.send``, or an output routed along the graph):
XADD to ``{ns}:{process}:inbox`` (the send is answered only after Redis took
it) → the cell's feeder reads it (XREADGROUP) → the worker processes it → one
script commits the state changes, the downstream XADDs and XACK+XDEL. Every write
the feeder and the cell make as the process's owner is fenced (see
``ActorCell.guarded``, ``core.placement.FENCED``): it runs only while this host holds the
process's lease; a read that finds the lease gone has its entries swept again by the
owner (``ActorCell.read_inbox``), so a host that lost it keeps nothing from the inbox. A send
that finds the cell idle reads for the feeder in the same script as its add, and
its worker starts on it while Redis adds it (``claim``, ``ActorCell.start_now``).

A worker that dies mid-message leaves the entry pending in the group; when
the cell starts again its feeder reads its pending entries first and puts
the one the worker held back at the end of the stream with one more attempt
recorded (field ``a``), so the delivery count survives any number of host
crashes; entries that were only read ahead are handed out again as they are. A script
that raises is retried the same way. After ``max_deliveries`` attempts the
entry moves to ``{ns}:deadletter`` with the error. Only the owning host reads a
process's inbox (single activation), so a wake-up event (local, or a ``wake`` message
from the host that added, see _cluster) replaces blocking reads, which would stall
the pipelined Redis connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson
import trio

from .core.keys import Keys
from .core.messages import Envelope
from .core.protocol import json_default
from ._redis import Redis, RedisError, RedisUnavailable, Reply

log = logging.getLogger("supervisor.mailbox")

__all__ = ["list_deadletters", "replay_deadletter", "GROUP", "inbox_key", "deadletter_key", "ensure_group", "feed",
           "enqueue_cmd", "enqueue_if_room_cmd", "entry_body", "done_cmds", "retry_or_deadletter_cmds", "DurableInbox",
           "Feeding", "find_entry"]

GROUP = "cells"
CONSUMER = "host"


class Feeding(Protocol):
    """What the feeder reads of the cell it feeds (an ``ActorCell``): named here, so that
    this module needs nothing of the cell's."""

    name: str
    deadletters: str             # the dead-letter stream's key
    durable_inbox: DurableInbox
    process: Any                 # its ProcessSpec (max_deliveries)
    host: Any                    # redis, config.supervision

    def guarded(self, cmds: list[tuple]) -> Reply: ...

    def read_inbox(self, read: tuple) -> Reply: ...


class DurableInbox:
    """One process's durable inbox as its feeder sees it: every piece of the feeder's state
    (see ``feed``), which only this module reads and writes; the cell, the host and the
    server tell it what happened through its methods.

    - ``unread``: someone added to the stream since the feeder's last read (``mark_unread``,
      ``poke``); while set, no send may start a message ahead of the feeder (``claim``).
    - ``idle``/``wake``: the feeder waits, everything read; ``poke`` and ``claim_read`` wake it.
    - ``claimed``: the reply of a send that read for the idle feeder, and the body of the
      message that send started at once, if it did (``claim``, ``claim_read``).
    - ``in_hand``: stream ids this run was handed and has not finished (``finished``).
    - ``resweep``: a commit lost to an outage asks the feeder for another sweep (``lost``).
    - ``charged``: stream ids a run died holding: they cost an attempt (``charge``).
    - ``suspect``: this host took the inbox over from a run it knows nothing of (its own
      last life, or a host that died holding the lease): the next sweep counts an attempt
      for every pending entry, as any of them may be the one a worker died holding.
    """

    __slots__ = ("key", "batch", "wake", "unread", "idle", "claimed", "in_hand", "resweep", "charged",
                 "finished", "charge", "suspect")

    def __init__(self, key: str, batch: int):
        self.key = key
        self.batch = batch
        self.wake: trio.Event | None = None
        self.unread = False
        self.idle = False
        self.claimed: tuple[Reply, bytes | None] | None = None
        self.in_hand: set[bytes] = set()
        self.resweep = False
        self.charged: set[bytes] = set()
        self.suspect = True
        # Bound to the sets themselves (which are cleared, never replaced): called once per
        # durable message, they cost what the set's own method does.
        self.finished: Callable[[bytes], None] = self.in_hand.discard
        """The run is done with this entry (committed, requeued or dead-lettered)."""
        self.charge: Callable[[bytes], None] = self.charged.add
        """A run ended holding this entry: handed out again, it costs an attempt."""

    def mark_unread(self) -> None:
        """Something was added (or is being added) behind the feeder's back: no send may start
        ahead of it until the feeder has read; ``poke`` once it is in."""
        self.unread = True

    def poke(self) -> None:
        """Tell the feeder that its inbox has new entries."""
        self.unread = True
        if self.wake is not None:
            self.wake.set()

    def sweep_again(self) -> None:
        """Entries may be pending that this run was never handed (a host that had lost the
        lease read them: see ActorCell.read_inbox): the feeder sweeps again, no attempt counted."""
        self.resweep = True
        self.poke()

    def lost(self, stream_id: bytes) -> None:
        """An entry whose outcome Redis could not record: still pending in the stream, the
        feeder's next sweep hands it out again, no attempt counted."""
        self.in_hand.discard(stream_id)
        self.resweep = True
        self.poke()

    def claim(self) -> int:
        """Whether a send may read for the feeder (the batch size to read, else 0): only when
        the feeder waits with everything read, so the entries it gets are next in line."""
        if not self.idle or self.unread or self.claimed is not None:
            return 0
        self.idle = False
        return self.batch

    def claim_read(self, reply: Reply, started: bytes | None) -> None:
        """Hand the feeder the reply of a send that ``claim``ed (``started``: the body of the
        message the send started at once, if it did)."""
        self.claimed = (reply, started)
        assert self.wake is not None
        self.wake.set()


def inbox_key(namespace: str, process: str) -> str:
    """On one Redis (a cluster's layout: core.keys.Keys)."""
    return Keys(namespace).inbox(process)


def deadletter_key(namespace: str) -> str:
    """On one Redis, where every process's dead letters go (a cluster's layout: core.keys.Keys)."""
    return Keys(namespace).deadletters("")


def entry_body(message_id: str, inputs: dict) -> bytes:
    return orjson.dumps({"id": message_id, "inputs": inputs}, default=json_default)


def enqueue_cmd(key: str, message_id: str, inputs: dict, attempts: int = 0) -> tuple:
    return ("XADD", key, "*", "m", entry_body(message_id, inputs), "a", attempts)


# KEYS[1] the inbox; ARGV[1] max_pending, ARGV[2] the body, ARGV[3] attempts. Returns -1
# when it added the entry, else the inbox's length: the check and the add are one command,
# so a send costs one round trip, and sends queued in order are added in order.
# With ARGV[4] = 1 it then also reads, for the cell's idle feeder, what the group has not
# delivered yet (at most ARGV[7] entries; usually just this one), into the group's pending
# list as the feeder's own XREADGROUP would, and returns those entries: the feeder needs no
# round trip of its own (see claim), and the send may start at once (ActorCell.start_now).
# The read is a pcall: Redis does not undo a script's writes when it fails, so once the entry
# is added the script must report it added (-1, and the feeder reads for itself), whatever
# the read meets (NOGROUP after the stream was deleted under us, say). The read is fenced
# like the feeder's own (KEYS[2] the lease, ARGV[8] the reader's token).
ENQUEUE_IF_ROOM = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return n end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[2], 'a', ARGV[3])
if ARGV[4] == '1' and redis.call('GET', KEYS[2]) == ARGV[8] then
  local r = redis.pcall('XREADGROUP', 'GROUP', ARGV[5], ARGV[6], 'COUNT', ARGV[7], 'STREAMS', KEYS[1], '>')
  if type(r) == 'table' and r.err == nil then return r[1][2] end
end
return -1
"""


def enqueue_if_room_cmd(key: str, limit: int, body: bytes, claim: int = 0, lease: str = "", token: str = "") -> tuple:
    """``enqueue_cmd`` (of ``body``, see ``entry_body``) unless the inbox already holds ``limit``
    entries; with ``claim`` (a batch size), also read for the feeder while ``lease`` holds
    ``token`` (see ENQUEUE_IF_ROOM)."""
    return ("EVAL", ENQUEUE_IF_ROOM, 2, key, lease or key, limit, body, 0, int(claim > 0), GROUP, CONSUMER, claim,
            token)


def done_cmds(key: str, stream_id: bytes) -> list[tuple]:
    return [("XACK", key, GROUP, stream_id), ("XDEL", key, stream_id)]


def retry_or_deadletter_cmds(deadletters: str, process: str, key: str, stream_id: bytes, body: bytes,
                             attempts: int, error: dict, max_deliveries: int, not_before: float | None = None,
                             ) -> tuple[list[tuple], bool]:
    """Commands that retry an entry of ``process``'s inbox ``key`` (at the end of its stream,
    not before ``not_before``) or dead-letter it to the stream ``deadletters``; and which."""
    cmds = done_cmds(key, stream_id)
    if attempts >= max_deliveries:
        cmds.insert(0, ("XADD", deadletters, "*",
                        "process", process, "m", body, "attempts", attempts,
                        "error", orjson.dumps(error), "at", repr(time.time())))
        return cmds, True
    held = ("t", repr(not_before)) if not_before is not None else ()
    cmds.insert(0, ("XADD", key, "*", "m", body, "a", attempts, *held))
    return cmds, False


def crash_spacing(max_seconds: float, max_restarts: int) -> float:
    """How long a message that killed its worker waits before it is tried again.

    Each such redelivery costs a restart. Spaced by max_seconds / max_restarts (and a
    margin), one poison message reaches ``max_deliveries`` and the dead-letter stream
    without ever pushing its supervisor past its restart intensity, so a bad input
    cannot take the actor's siblings down with it."""
    return 1.1 * max_seconds / max(1, max_restarts)


async def ensure_group(redis: Redis, key: str) -> None:
    try:
        await redis.execute("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM")
    except RedisError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _fields(raw: list) -> dict[bytes, bytes]:
    return {raw[i]: raw[i + 1] for i in range(0, len(raw), 2)}


async def feed(cell: Feeding, send: trio.MemorySendChannel[Envelope]) -> None:
    """Feed one cell's run with its durable messages; rides out Redis outages with backoff.

    Redis going away is not the actor's failure: the feeder waits and retries
    (logging once per outage) instead of crashing the cell, whose supervisor
    would otherwise count every retry against its intensity.

    Every run starts with a sweep of the entries taken and never acknowledged.
    Only an entry a worker died holding (``charged``) costs an attempt and
    goes to the back of the stream, spaced by ``crash_spacing``; the others were
    merely read ahead and are handed out again as they are. When this host took
    the inbox over from a run it knows nothing of (``suspect``: its first run, or a
    lease taken from a host that died) each pending entry costs one; after a handoff
    (the last owner released the lease once its message in hand was done) none does.

    ``in_hand`` holds the stream ids this run has handed to the cell and
    not finished. A later sweep, after an outage made a commit fail, hands back
    only what is pending and not in hand, with no attempt counted: nothing is
    run twice, nothing is left behind.
    """
    inbox = cell.durable_inbox
    inbox.in_hand.clear()
    inbox.resweep = False
    inbox.claimed = None  # (what a run's claim took is pending: the sweep hands it out)
    first = True
    failures = 0
    while True:
        try:
            await _sweep(cell, inbox, send, first)
            first = False
            failures = 0
            await _read_new(cell, inbox, send)
        except (RedisUnavailable, RedisError) as exc:
            if failures == 0:
                log.error("cannot read the inbox of %s: %s; retrying", cell.name, exc)
            failures += 1
            await trio.sleep(min(5.0, 0.05 * 2 ** min(failures, 7)))


def find_entry(entries: list, body: bytes) -> bytes | None:
    """The stream id of the entry with this body among XREADGROUP's entries."""
    for sid, raw in entries:
        if raw is not None and _fields(raw).get(b"m") == body:
            return sid
    return None


def _envelope(sid: bytes, f: dict[bytes, bytes]) -> Envelope:
    body = orjson.loads(f[b"m"])
    return Envelope(inputs=body["inputs"], message_id=body["id"], stream_id=sid,
                    attempts=int(f.get(b"a", b"0")), body=f[b"m"])


async def _sweep(cell: Feeding, inbox: DurableInbox, send: trio.MemorySendChannel[Envelope], first: bool) -> None:
    """The entries taken but never acknowledged (see ``feed``)."""
    redis = cell.host.redis
    key = inbox.key
    batch = inbox.batch
    if inbox.claimed is not None:  # (a resweep: what a claim took counts as in hand before the read)
        await _take_claimed(inbox, send, batch)
    await ensure_group(redis, key)
    inbox.resweep = False
    start = b"0"
    while True:
        reply = await cell.read_inbox(("XREADGROUP", "GROUP", GROUP, CONSUMER, "COUNT", batch, "STREAMS", key, start))()
        entries = reply[0][1] if reply else []
        if not entries:
            if first:
                inbox.charged.clear()  # acknowledged after all (the commit made it)
                inbox.suspect = False
            return
        for sid, raw in entries:
            start = sid
            if raw is None:  # deleted meanwhile
                await cell.guarded(done_cmds(key, sid))()
                continue
            f = _fields(raw)
            if not (first and (inbox.suspect or sid in inbox.charged)):
                if sid not in inbox.in_hand:
                    inbox.in_hand.add(sid)
                    await send.send(_envelope(sid, f))
                continue
            inbox.charged.discard(sid)
            attempts = int(f.get(b"a", b"0")) + 1
            sup = cell.host.config.supervision
            cmds, dead = retry_or_deadletter_cmds(
                cell.deadletters, cell.name, key, sid, f[b"m"], attempts,
                {"type": "WorkerDied", "message": "the worker died while handling this message"},
                cell.process.max_deliveries,
                not_before=time.time() + crash_spacing(sup.max_seconds, sup.max_restarts))
            await cell.guarded(cmds)()


async def _read_new(cell: Feeding, inbox: DurableInbox, send: trio.MemorySendChannel[Envelope]) -> None:
    """New entries, until a commit lost to an outage asks for another sweep.

    The feeder reads again only when someone added to the inbox since its last read
    (``poke``: ``unread``), or its last read filled a batch, or a slow poll says so
    as a safety net; a send that finds it waiting reads for it in the same command as its
    add (``claim``)."""
    key = inbox.key
    batch = inbox.batch
    inbox.unread = True
    while not inbox.resweep:
        if inbox.claimed is not None:
            await _take_claimed(inbox, send, batch)
            continue
        if inbox.unread:
            inbox.unread = False
            # (Submitted, so it reaches Redis behind every add submitted before it, even
            # one still waiting for a connection: it cannot miss one and go idle.)
            reply = await cell.read_inbox(("XREADGROUP", "GROUP", GROUP, CONSUMER, "COUNT", batch, "STREAMS", key, ">"))()
            await _hand_out(inbox, send, reply[0][1] if reply else [], batch)
            continue
        inbox.wake = trio.Event()
        inbox.idle = True
        try:
            with trio.move_on_after(1.0) as poll:
                await inbox.wake.wait()
        finally:
            inbox.idle = False
        if poll.cancelled_caught:
            inbox.unread = True


async def _take_claimed(inbox: DurableInbox, send: trio.MemorySendChannel[Envelope], batch: int) -> None:
    """Hand out what a send read for the feeder (see ``claim``), except the message that
    send already started (see ``ActorCell.start_now``): that one only joins ``in_hand``,
    as though handed out."""
    assert inbox.claimed is not None
    reply, started = inbox.claimed
    try:
        entries = await reply()
    except RedisError:
        entries = None  # not added: its sender hears why (RedisUnavailable: see feed)
    finally:
        inbox.claimed = None
    if isinstance(entries, list):
        await _hand_out(inbox, send, entries, batch, started)
    else:  # (added but not read for us, or not added: a read of our own settles it)
        inbox.unread = True


async def _hand_out(inbox: DurableInbox, send: trio.MemorySendChannel[Envelope], entries: list, batch: int,
                    started: bytes | None = None) -> None:
    if len(entries) >= batch:
        inbox.unread = True  # there may be more
    skip = find_entry(entries, started) if started is not None else None
    if skip is not None:
        inbox.in_hand.add(skip)  # (first: the loop may sleep, and the started one may finish meanwhile)
    for sid, raw in entries:
        if sid == skip:
            continue
        f = _fields(raw)
        hold = float(f.get(b"t", b"0")) - time.time()
        if hold > 0:  # it killed a worker: see crash_spacing (later entries wait behind it)
            await trio.sleep(hold)
        inbox.in_hand.add(sid)
        await send.send(_envelope(sid, f))


def _decode(v: bytes) -> Any:
    return orjson.loads(v) if v[:1] in (b"{", b"[") else v.decode()


async def list_deadletters(redis: Redis, keys: Keys, processes: Sequence[str], count: int = 100) -> list[dict]:
    """The oldest ``count`` dead letters, decoded: of every process, from one stream on one
    Redis; from each of ``processes``' own in a cluster (see core.keys)."""
    replies = await redis.pipeline([("XRANGE", k, "-", "+", "COUNT", count) for k in keys.deadletter_streams(processes)])
    out = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        for sid, raw in reply:
            f = _fields(raw)
            body = orjson.loads(f[b"m"])
            process = f[b"process"].decode()
            out.append({"id": keys.deadletter_id(process, sid.decode()), "process": process,
                        "message_id": body.get("id"), "inputs": body.get("inputs"), "attempts": int(f[b"attempts"]),
                        "error": _decode(f[b"error"]), "at": float(f[b"at"])})
    out.sort(key=lambda d: d["at"])
    return out[:count]


async def replay_deadletter(redis: Redis, keys: Keys, entry_id: str, inbox_of: Any) -> str:
    """Put a dead letter back in its process's inbox (attempts reset); returns the process name.

    Raises KeyError when there is no such entry.
    """
    process, sid = keys.deadletter_ref(entry_id)
    if keys.clustered and not process:
        raise KeyError(entry_id)
    key = keys.deadletters(process or "")
    found = await redis.execute("XRANGE", key, sid, sid)
    if not found:
        raise KeyError(entry_id)
    f = _fields(found[0][1])
    named = f[b"process"].decode()
    if process is not None and named != process:
        raise KeyError(entry_id)
    await redis.transaction([("XADD", inbox_of(named), "*", "m", f[b"m"], "a", 0), ("XDEL", key, sid)])
    return named
