"""Routing between processes in a Redis Cluster: a transactional outbox, relayed exactly once.

On one Redis a commit adds the messages it routes straight to their targets' inboxes,
inside its fenced script. In a Redis Cluster each process's keys are in a slot of their
own (core.keys) and one script may not touch two slots, so a commit instead appends one
entry to its sender's outbox, ``{ns}:{S}:outbox`` (in the commit's slot, so it commits or
not with the state and the acknowledgement): every delivery the message routes, as JSON.

The sender's owner relays (``Relay``): it reads the outbox from its head, in order,
delivers each target's share with ``DELIVER`` — a script in the *target's* slot that
applies an entry only if its outbox id is newer than the last one it applied from that
sender (``{ns}:{R}:relayed``, one field per sender) — and then deletes what it delivered,
fenced by the sender's lease. A relay that dies between delivering and deleting, or a
paused host and the new owner relaying at once, deliver some entries twice; DELIVER
drops the repeats. So a routed message reaches its target once, and a target's
messages from one sender arrive in the order they were committed.

Why a high-water mark and not a set of delivered ids: outbox ids only grow (XADD ``*``)
and every relay reads them in order without skipping one, so one field per sender is
exact — a set of ids would need expiry and grow with the traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
import trio

from .core.keys import Keys
from .core.protocol import json_default
from ._redis import Fenced, RedisError, RedisUnavailable, Reply

log = logging.getLogger("supervisor.outbox")

__all__ = ["DELIVER", "Relay", "RelayHost", "deliver_cmd", "outbox_cmd", "parse_outbox"]

BATCH = 256          # outbox entries per relay pass
SWEEP_PERIOD = 2.0   # every owned outbox is looked at this often, whatever woke it (a safety net)

# KEYS[1] the target's inbox, KEYS[2] its relayed hash, KEYS[3..] its fan-in port lists;
# ARGV[1] the sender; then per outbox entry, oldest first: its id, its number of deliveries,
# and per delivery a kind ('i': an inbox entry body; 'f': a value for the fan-in list
# KEYS[k]), k, and the value. Applies only the entries newer than the sender's mark, moves
# the mark, returns how many deliveries it applied. (Stream ids compare as two integers;
# a millisecond time fits a Lua number exactly.)
DELIVER = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local top = redis.call('HGET', KEYS[2], ARGV[1])
local tms, tseq = -1, -1
if top then tms, tseq = parse(top) end
local i, applied, moved = 2, 0, false
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local ms, seq = parse(ARGV[i])
  if ms > tms or (ms == tms and seq > tseq) then
    for j = 0, n - 1 do
      local at = i + 2 + 3 * j
      if ARGV[at] == 'i' then
        redis.call('XADD', KEYS[1], '*', 'm', ARGV[at + 2], 'a', 0)
      else
        redis.call('RPUSH', KEYS[tonumber(ARGV[at + 1])], ARGV[at + 2])
      end
      applied = applied + 1
    end
    tms, tseq, top, moved = ms, seq, ARGV[i], true
  end
  i = i + 2 + 3 * n
end
if moved then redis.call('HSET', KEYS[2], ARGV[1], top) end
return applied
"""


def outbox_cmd(outbox: str, deliveries: list[dict]) -> tuple:
    """The one outbox entry of a commit: ``deliveries`` are ``{"t": target, "b": inbox body}``
    (a message for the target's inbox: ``{"id", "inputs"}``) or ``{"t": target, "p": port,
    "v": value}`` (a value for an ``await_all_inports`` port's list)."""
    return ("XADD", outbox, "*", "d", orjson.dumps(deliveries, default=json_default))


def parse_outbox(entries: Any) -> tuple[list[bytes], dict[str, list[tuple[str, list[dict]]]]]:
    """XRANGE's reply on an outbox: every entry's id, and per target its share, oldest first
    (``[(outbox id, [delivery, …]), …]``). An entry that is not one of ours (the reply is
    untrusted) is logged and delivers nothing; its id is still returned, so it is deleted."""
    ids: list[bytes] = []
    by_target: dict[str, list[tuple[str, list[dict]]]] = {}
    for entry in entries if isinstance(entries, list) else ():
        try:
            sid, raw = entry
            fields = {raw[i]: raw[i + 1] for i in range(0, len(raw), 2)}
            deliveries = orjson.loads(fields[b"d"])
            sid_text = sid.decode()
            shares: dict[str, list[dict]] = {}
            for d in deliveries:
                t = d["t"]
                if not isinstance(t, str) or not (isinstance(d.get("b"), dict) or isinstance(d.get("p"), str)):
                    raise ValueError(d)
                shares.setdefault(t, []).append(d)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, orjson.JSONDecodeError) as exc:
            log.error("an outbox entry that is not a routed message was skipped: %r", exc)
            if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], bytes):
                ids.append(entry[0])
            continue
        ids.append(sid)
        for t, ds in shares.items():
            by_target.setdefault(t, []).append((sid_text, ds))
    return ids, by_target


def deliver_cmd(keys: Keys, sender: str, target: str, share: Sequence[tuple[str, list[dict]]]) -> tuple:
    """One DELIVER of ``target``'s ``share`` of ``sender``'s outbox (see ``parse_outbox``)."""
    lists: dict[str, int] = {}
    argv: list[Any] = [sender]
    for sid, deliveries in share:
        argv += [sid, len(deliveries)]
        for d in deliveries:
            if "b" in d:
                argv += ["i", 0, orjson.dumps(d["b"])]
            else:
                k = lists.setdefault(keys.fanin(target, d["p"]), 3 + len(lists))
                argv += ["f", k, orjson.dumps(d.get("v"))]
    return ("EVAL", DELIVER, 2 + len(lists), keys.inbox(target), keys.relayed(target), *lists, *argv)


class Relaying(Protocol):
    """The sender's cell, as the relay sees it (an ``ActorCell``)."""

    name: str
    ownership: Any               # .held

    def guarded(self, cmds: list[tuple]) -> Reply: ...


class RelayHost(Protocol):
    """What the relay asks of the host (``Host`` implements it)."""

    redis: Any
    keys: Keys
    cells: dict[str, Any]

    def wake(self, process: str) -> None: ...

    async def assemble_fan_in(self, process: str) -> None: ...


class Relay:
    """Relays the outboxes of the processes this host owns (one task per busy outbox, so
    each outbox is read by one pass at a time, in order)."""

    def __init__(self, host: RelayHost):
        self.host = host
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._nursery: trio.Nursery | None = None

    def mark(self, process: str) -> None:
        """``process``'s outbox may have entries (a commit put one there, or the lease moved here)."""
        if process in self._running:
            self._again.add(process)
        elif self._nursery is not None:
            self._running.add(process)
            self._nursery.start_soon(self._drain, process)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(SWEEP_PERIOD)
                for name, cell in list(self.host.cells.items()):
                    if cell.ownership.held:
                        self.mark(name)

    async def _drain(self, process: str) -> None:
        failures = 0
        try:
            while True:
                self._again.discard(process)
                try:
                    more = await self._pass(process)
                except Fenced:
                    return  # (the new owner relays from where this host stopped)
                except (RedisUnavailable, RedisError) as exc:
                    if failures == 0:
                        log.error("cannot relay the outbox of %s: %s; retrying", process, exc)
                    failures += 1
                    await trio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
                    continue
                failures = 0
                if not more and process not in self._again:
                    return
        finally:
            self._running.discard(process)

    async def _pass(self, process: str) -> bool:
        """Deliver the oldest outbox entries; whether there may be more."""
        host = self.host
        cell = host.cells.get(process)
        if cell is None or not cell.ownership.held:
            return False
        keys = host.keys
        outbox = keys.outbox(process)
        entries = await host.redis.execute("XRANGE", outbox, "-", "+", "COUNT", BATCH)
        ids, by_target = parse_outbox(entries)
        if not ids:
            return False
        for target in by_target:
            if (tc := host.cells.get(target)) is not None:
                tc.durable_inbox.mark_unread()  # (added behind its feeder's back: no send starts ahead)
        replies = await host.redis.pipeline([deliver_cmd(keys, process, t, share) for t, share in by_target.items()])
        for (target, share), reply in zip(by_target.items(), replies):
            if isinstance(reply, Exception):
                continue
            if any("p" in d for _, ds in share for d in ds):
                await host.assemble_fan_in(target)  # (which wakes it if that made a message)
            else:
                host.wake(target)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        await cell.guarded([("XDEL", outbox, *ids)])()
        return len(entries) >= BATCH
