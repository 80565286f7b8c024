"""Several hosts on one Redis, the trio part: this host's membership, its leases, and the
calls it forwards to the hosts that own other processes (CONTRACT §6; the design and the
Lua are in ``core.placement``).

One ``Cluster`` per host, owned by the host's nursery. Every ``lease_ttl / 3`` (and at once
when another host says something changed) it *ticks*: renews this host's record and every
lease it holds in one script, reads who is alive and who holds what, acquires the free
leases placement gives this host, and hands over (drain, stop, release) those placement now
gives a host that joined. A lease this host finds taken, or cannot renew in time, is lost at
once: its cell's run is cancelled, and every write that run still makes is refused by Redis
(its token is stale).

A host alone — the embedded Redis, or the only host on a shared one — runs exactly this;
it just always wins.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from .core.keys import Keys
from .core.placement import (CLUSTER_VERSION, HostRecord, Token, acquire_cmd, decode_host, place, release_cmd,
                             renew_cmd, renew_lost)
from ._redis import Redis, RedisError, RedisUnavailable

__all__ = ["Cluster", "Ownership", "ClusterRefused", "StartedOnce", "labels_of", "Forwarder", "LOCAL"]

log = logging.getLogger("supervisor.cluster")


class ClusterRefused(Exception):
    """This host cannot join the cluster safely; the message is the one sentence to show."""


class StartedOnce:
    """A task_status that may be told ``started`` more than once (the first one counts)."""

    def __init__(self, task_status: Any):
        self._status: Any = task_status

    def started(self, value: object = None) -> None:
        if self._status is not None:
            self._status.started(value)
            self._status = None


class Ownership:
    """This host's hold on one process's lease, as the process's cell sees it.

    ``token`` is set while this host holds the lease; ``holder`` is the last holder seen,
    this host or another. ``run_scope`` is the cancel scope of the cell's current run, which
    ``lose`` cancels; ``stopped`` is set once that run has ended (a handoff releases the
    lease only then).
    """

    def __init__(self, process: str, labels: tuple[str, ...] = ()):
        self.process = process
        self.labels = labels
        self.token: Token | None = None
        self.holder: Token | None = None
        self.handed_over = False   # the last holder released the lease (a handoff, not a death)
        self.lost_reason: str | None = None
        self.handing_off: str | None = None  # the host it is being handed to
        self.run_scope: trio.CancelScope | None = None
        self.stopped = trio.Event()
        self.stopped.set()
        self._held = trio.Event()
        self.acquisitions = 0      # how many times this host took the lease (a run tells a new one)

    @property
    def held(self) -> bool:
        return self.token is not None

    @property
    def token_value(self) -> str | None:
        return self.token.value if self.token is not None else None

    def acquire(self, token: Token, handed_over: bool) -> None:
        self.token = self.holder = token
        self.handed_over = handed_over
        self.lost_reason = self.handing_off = None
        self.acquisitions += 1
        self._held.set()

    def lose(self, why: str) -> None:
        """The lease is gone (or going): stop serving at once."""
        if self.token is None:
            return
        log.warning("process %s: %s", self.process, why)
        self.token = None
        self.lost_reason = why
        self._held = trio.Event()
        if self.run_scope is not None:
            self.run_scope.cancel()

    async def wait_held(self) -> None:
        while self.token is None:
            await self._held.wait()


class Cluster:
    def __init__(self, config: Any, redis: Redis, *, idle: Callable[[str], bool],
                 wake: Callable[[str], None], resweep: Callable[[str], None] = lambda name: None,
                 alone: bool = False, keys: Keys | None = None):
        c = config.cluster
        self.keys = keys or Keys(config.workspace.redis.namespace, redis.clustered)
        self.id = c.host_id or f"{socket.gethostname()}-{os.getpid()}"
        self.labels = tuple(c.labels)
        self.ttl = float(c.lease_ttl)
        self.ttl_ms = max(1, int(self.ttl * 1000))
        self.period = self.ttl / 3
        self.advertise = c.advertise
        self.url = ""
        self.redis = redis
        # The embedded Redis, which this host has just started: no other host can use it, so
        # what host records and leases it holds are a dead predecessor's (see join).
        self.alone = alone
        self.grace = float(config.supervision.shutdown_grace)
        self._idle = idle          # whether a process's cell has nothing in hand (a handoff waits for it)
        self._wake = wake          # poke a process's inbox: another host added to it
        self._resweep = resweep    # sweep a process's inbox again: a fenced host read from it
        self.owned: dict[str, Ownership] = {}
        self.hosts: dict[str, HostRecord] = {}
        self.started = time.time()
        self.leaving = False
        self._kick = trio.Event()
        self._renewed = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._channel = self.keys.channel()
        # Told of what changed in the cluster (supervisor.watch's host_joined, host_left,
        # process_moved events), and of the number of live hosts after each change.
        self.on_event: Callable[[dict], None] | None = None
        self.on_hosts: Callable[[int], None] | None = None
        self._changed = trio.Event()  # set after each tick (what forwarding waits on)

    # -- what the host asks ----------------------------------------------------------------
    def ownership(self, process: str, labels: tuple[str, ...] = ()) -> Ownership:
        own = self.owned.get(process)
        if own is None:
            own = self.owned[process] = Ownership(process, labels)
            self._kick.set()
        return own

    def forget(self, process: str) -> None:
        """A process removed from the network: let its lease go once its run ended."""
        own = self.owned.pop(process, None)
        if own is not None and own.token is not None and self._nursery is not None:
            token = own.token
            own.lose("removed from the network")
            self._nursery.start_soon(self._release_after, own, token)

    def record(self) -> HostRecord:
        return HostRecord(id=self.id, url=self.url, labels=self.labels, version=CLUSTER_VERSION, pid=os.getpid(),
                          started=self.started, last_seen=time.time(), runs=tuple(sorted(self.owned)))

    def holder_record(self, process: str) -> HostRecord | None:
        """The record of the other host that holds ``process``'s lease, or None (this host
        holds it, or no one does)."""
        own = self.owned.get(process)
        if own is None or own.token is not None or own.holder is None or own.holder.host == self.id:
            return None
        return self.hosts.get(own.holder.host)

    def status(self) -> list[dict]:
        by_host: dict[str, list[str]] = {h: [] for h in self.hosts}
        for p, own in sorted(self.owned.items()):
            if own.holder is not None and own.holder.host in by_host:
                by_host[own.holder.host].append(p)
        return [{"id": h, "url": r.url, "labels": list(r.labels), "last_seen": r.last_seen,
                 "processes": by_host[h], "self": h == self.id} for h, r in sorted(self.hosts.items())]

    def kick(self) -> None:
        """Tick now (a forwarder found no owner, or a stale one)."""
        self._kick.set()

    async def changed(self, timeout: float) -> None:
        """Wait for the next tick's view (or ``timeout``)."""
        with trio.move_on_after(timeout):
            await self._changed.wait()

    def publish_wake(self, process: str) -> tuple:
        return ("PUBLISH", self._channel, f"wake {process}")

    # -- joining and leaving --------------------------------------------------------------
    async def join(self) -> None:
        """Register this host, or refuse (ClusterRefused) when it cannot join safely."""
        try:
            info = await self.redis.execute("INFO", "server")
        except RedisError:
            info = b""  # (INFO renamed or refused: the commands below tell)
        version = _redis_version(info)
        if version is not None and version < (5, 0):
            raise ClusterRefused(f"Redis at {self.redis.describe()} is version {'.'.join(map(str, version))}; "
                                 "reflow-supervisor needs Redis 5.0 or later (streams and scripts)")
        if self.alone:
            await self._clear_predecessors()
        deadline = trio.current_time() + self.ttl * 1.5 + 0.5
        seen: bytes | None = None
        while True:
            rec = self.record()
            if await self.redis.execute("SET", self.keys.host(self.id), rec.encode(), "NX", "PX", self.ttl_ms):
                break
            raw = await self.redis.execute("GET", self.keys.host(self.id))
            other = decode_host(raw) if raw is not None else None
            renewed = raw is not None and seen is not None and raw != seen  # (someone keeps it alive)
            if renewed or trio.current_time() > deadline:
                where = f" ({other.url or 'no url yet'}, pid {other.pid})" if other is not None else ""
                raise ClusterRefused(f"cluster.host_id {self.id!r} is already used by a live host{where}; "
                                     "give each host its own host_id")
            seen = raw
            await trio.sleep(self.period / 2)  # (a restart of the same host: its old record expires)
        await self.redis.execute("SADD", self.keys.hosts(), self.id)
        await self._read_hosts()
        for h, r in self.hosts.items():
            if r.version != CLUSTER_VERSION:
                await self.redis.execute("DEL", self.keys.host(self.id))
                raise ClusterRefused(f"host {h!r} on this Redis speaks cluster version {r.version}, this host "
                                     f"{CLUSTER_VERSION}: run one version of reflow-supervisor per namespace")
        self._renewed = trio.current_time()
        await self.redis.execute("PUBLISH", self._channel, "placement")
        log.info("joined the cluster as %s (%d hosts)", self.id, len(self.hosts))

    async def _clear_predecessors(self) -> None:
        """Drop the records and leases a host that used this (embedded) Redis before left
        behind when it died, so that its processes start now, not a lease TTL later. Their
        fences stay: a lease taken now still gets a new one, and tells a handoff from a death."""
        ids = await self.redis.execute("SMEMBERS", self.keys.hosts())
        cmds: list[tuple] = [("DEL", self.keys.hosts())]
        cmds += [("DEL", self.keys.host(i.decode(errors="replace"))) for i in ids if isinstance(i, bytes)]
        cursor = b"0"
        while True:
            cursor, keys = await self.redis.execute("SCAN", cursor, "MATCH", self.keys.lease("*"), "COUNT", 1000)
            cmds += [("DEL", k) for k in keys]
            if cursor in (b"0", 0):
                break
        await self.redis.pipeline(cmds)

    async def leave(self) -> None:
        """Release every lease this host holds and its record (the host's runs have ended)."""
        self.leaving = True
        cmds = []
        for own in self.owned.values():
            if own.token is not None:
                cmds.append(release_cmd(self.keys, own.process, own.token))
                own.token = None
        cmds += [("DEL", self.keys.host(self.id)), ("SREM", self.keys.hosts(), self.id),
                 ("PUBLISH", self._channel, "placement")]
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
            try:
                await self.redis.pipeline(cmds)
            except (RedisUnavailable, RedisError) as exc:
                log.warning("could not hand over this host's leases (they expire within %gs): %s", self.ttl, exc)

    # -- the task ---------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.redis.listen, self._channel, self._on_message)
            task_status.started()
            while True:
                with trio.move_on_after(self.period):
                    await self._kick.wait()
                self._kick = trio.Event()
                try:
                    await self.tick()
                except (RedisUnavailable, RedisError) as exc:
                    log.warning("cluster tick failed: %s", exc)
                    if trio.current_time() - self._renewed > self.ttl * 0.9:
                        for own in self.owned.values():
                            own.lose(f"its lease could not be renewed for {self.ttl:g}s (Redis unreachable)")

    def _on_message(self, data: bytes | None) -> None:
        if data is None or data == b"placement":
            self._kick.set()
        elif data.startswith((b"wake ", b"resweep ")):
            verb, _, raw = data.partition(b" ")
            name = raw.decode(errors="replace")
            own = self.owned.get(name)
            if own is not None and own.token is not None:
                (self._wake if verb == b"wake" else self._resweep)(name)

    async def tick(self) -> None:
        """Renew, look, acquire, hand over (see the module's docstring)."""
        sent = trio.current_time()
        seen = {p: (o.holder.host if o.holder is not None else None) for p, o in self.owned.items()}
        held = [(p, o.token.value) for p, o in self.owned.items() if o.token is not None]
        names = list(self.owned)
        renew = renew_cmd(self.keys, self.record(), self.ttl_ms, held)
        replies = await self.redis.pipeline([
            *renew, ("MGET", *(self.keys.lease(p) for p in names)) if names else ("PING",)])
        leases = replies[-1]
        lost = renew_lost(replies[:-1], len(held))
        self._renewed = sent
        for i in lost:
            own = self.owned.get(held[i][0])
            if own is not None and own.token is not None and own.token.value == held[i][1]:
                own.lose("its lease was taken over by another host")
        if isinstance(leases, Exception):
            raise leases
        await self._read_hosts()
        holders = [Token.parse(v) for v in leases] if isinstance(leases, list) else [None] * len(names)
        want = []
        for name, holder in zip(names, holders):
            own = self.owned.get(name)
            if own is None:
                continue
            if own.token is None:
                own.holder = holder
            desired = place(name, self.hosts, own.labels)
            if own.token is not None:
                if (desired is not None and desired != self.id and own.handing_off is None
                        and not self.leaving and self._nursery is not None):
                    own.handing_off = desired
                    self._nursery.start_soon(self._hand_over, own, desired)
            elif holder is None and desired == self.id and not self.leaving:
                want.append(name)
        if want:
            replies = await self.redis.pipeline([acquire_cmd(self.keys, p, self.id, self.ttl_ms) for p in want])
            if any(isinstance(reply, list) for reply in replies):  # (the others forward here from now)
                self.redis.submit("PUBLISH", self._channel, "placement")
            for name, reply in zip(want, replies):
                own = self.owned.get(name)
                if own is None:
                    continue
                if isinstance(reply, list) and len(reply) == 2:
                    own.acquire(Token(int(reply[0]), self.id), handed_over=reply[1] == 1)
                    log.info("process %s: owned by this host (fence %d)", name, own.token.fence)
                else:
                    own.holder = Token.parse(reply)
        for own in self.owned.values():
            if own.token is not None:
                own.holder = own.token
            was = seen.get(own.process)
            now = own.holder.host if own.holder is not None else None
            if was != now and self.on_event is not None:
                self.on_event({"event": "process_moved", "actor": own.process, "host": now, "from": was,
                               "fence": own.holder.fence if own.holder is not None else None})
        self._changed.set()
        self._changed = trio.Event()

    async def _read_hosts(self) -> None:
        ids = await self.redis.execute("SMEMBERS", self.keys.hosts())
        ids = sorted(i.decode(errors="replace") for i in ids if isinstance(i, bytes)) if isinstance(ids, list) else []
        raws = await self.redis.execute("MGET", *(self.keys.host(i) for i in ids)) if ids else []
        hosts: dict[str, HostRecord] = {}
        gone = []
        for i, raw in zip(ids, raws):
            rec = decode_host(raw) if raw is not None else None
            if rec is None or rec.id != i:
                gone.append(i)
            else:
                hosts[i] = rec
        if gone:  # (their records expired: they died without leaving)
            await self.redis.execute("SREM", self.keys.hosts(), *gone)
        before, self.hosts = set(self.hosts), hosts
        if set(hosts) != before:
            if self.on_event is not None:
                for h in sorted(set(hosts) - before):
                    self.on_event({"event": "host_joined", "host": h, "url": hosts[h].url})
                for h in sorted(before - set(hosts)):
                    self.on_event({"event": "host_left", "host": h})
            if self.on_hosts is not None:
                self.on_hosts(len(hosts))

    async def _hand_over(self, own: Ownership, to: str) -> None:
        """Placement gives ``own``'s process to host ``to``: let the message in hand finish
        (bounded by shutdown_grace), stop the run, then release the lease."""
        token = own.token
        with trio.move_on_after(self.grace):
            while not self._idle(own.process) and own.token is token:
                await trio.sleep(0.01)  # (polled: a handoff is rare, and cells stay simpler)
        if own.token is not token or token is None:
            return
        own.lose(f"handed over to host {to}")
        await self._release_after(own, token)

    async def _release_after(self, own: Ownership, token: Token) -> None:
        await own.stopped.wait()
        try:
            await self.redis.execute(*release_cmd(self.keys, own.process, token))
        except (RedisUnavailable, RedisError) as exc:
            log.warning("process %s: lease not released (it expires within %gs): %s", own.process, self.ttl, exc)


def _redis_version(info: Any) -> tuple[int, ...] | None:
    if not isinstance(info, bytes):
        return None
    for line in info.splitlines():
        if line.startswith(b"redis_version:"):
            try:
                return tuple(int(x) for x in line.split(b":", 1)[1].strip().split(b".")[:2])
            except ValueError:
                return None
    return None


def labels_of(actors: Mapping[str, Any], process: str) -> tuple[str, ...]:
    ov = actors.get(process)
    return tuple(ov.placement.labels) if ov is not None else ()


LOCAL = object()
"""``Forwarder.request``'s answer when this host holds the process by now: serve it here."""


class Forwarder:
    """Requests for a process another host owns, sent on to that host over its own API.

    Why the hosts' WebSocket API and not Redis: the API already correlates requests,
    cancels them ($/cancelRequest when the caller gives up), streams notifications and
    bounds frames, and a call through it is one more hop on a connection kept open, where
    a request/reply over Redis would be two stream round trips plus a reader blocking on
    each host. ``make bench`` measures what the hop costs against a local call.

    A forwarded request carries ``"$forwarded": true``; a host that receives one for a
    process it does not hold answers ActorMoved instead of forwarding again, and the
    sender asks again wherever the lease is then (nothing started, so that is safe). A
    request in flight when its owner dies is answered with a HostLost error, never retried:
    whether its effects were committed cannot be told from here.
    """

    def __init__(self, cluster: Cluster, token: str | None):
        self.cluster = cluster
        self.token = token
        self._clients: dict[str, Any] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._streams = 0  # forwarded requests whose notifications are passed on (_streamed)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _client(self, url: str) -> Any:
        client = self._clients.get(url)
        if client is not None:
            return client
        lock = self._locks.setdefault(url, trio.Lock())
        async with lock:
            if url not in self._clients:
                assert self._nursery is not None
                self._clients[url] = await self._nursery.start(self._hold, url)
            return self._clients[url]

    async def _hold(self, url: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .client import open_client  # (the client side of the API: lazily, as only hosts forward)

        try:
            async with open_client(url, token=self.token, reconnect=False) as client:
                task_status.started(client)
                await client.wait_lost()
        finally:
            self._clients.pop(url, None)

    async def owner(self, process: str) -> HostRecord | object:
        """The record of the host that holds ``process``, or LOCAL; waits (about two lease
        TTLs at most) while no host holds it, as during a failover."""
        deadline = trio.current_time() + 2 * self.cluster.ttl + 1
        while True:
            own = self.cluster.owned.get(process)
            if own is not None and own.held:
                return LOCAL
            rec = self.cluster.holder_record(process)
            if rec is not None and rec.url:
                return rec
            if trio.current_time() > deadline:
                from .core.errors import ActorStopped

                raise ActorStopped(f"actor {process!r} has no live host that may run it right now; retry later",
                                   {"type": "Unplaced", "actor": process})
            self.cluster.kick()
            await self.cluster.changed(self.cluster.period)

    async def request(self, process: str, method: str, params: dict,
                      on_note: Callable[[dict], None] | None = None) -> Any:
        """``method`` at the owner; ``on_note`` is given the params of the notifications the
        owner sends for this request while it runs (``process``'s ``output``), in order."""
        from .core.errors import ActorFailed, RemoteError
        from ._peer import ConnectionLost, RpcError

        while True:
            rec = await self.owner(process)
            if rec is LOCAL:
                return LOCAL
            assert isinstance(rec, HostRecord)
            try:
                client = await self._client(rec.url)
                if on_note is None:
                    return await client.request(method, {**params, "$forwarded": True})
                return await self._streamed(client, method, params, on_note)
            except RpcError as exc:
                if isinstance(exc.data, dict) and exc.data.get("type") == "ActorMoved":
                    self.cluster.kick()
                    await self.cluster.changed(self.cluster.period)
                    continue  # (it had not started: ask the new owner)
                raise RemoteError(exc.code, exc.message, exc.data) from None
            except (ConnectionLost, OSError) as exc:
                self.cluster.kick()  # (its host may be dead: look again before the next request)
                raise ActorFailed(f"host {rec.id!r}, which owns actor {process!r}, went away while serving this "
                                  f"request ({exc}); it may or may not have been applied",
                                  {"type": "HostLost", "host": rec.id}) from None
            except Exception as exc:  # a handshake refused: a host of another token, say
                self.cluster.kick()
                raise ActorFailed(f"cannot reach host {rec.id!r} at {rec.url}, which owns actor {process!r}: {exc}",
                                  {"type": "HostUnreachable", "host": rec.id}) from None

    async def _streamed(self, client: Any, method: str, params: dict, on_note: Callable[[dict], None]) -> Any:
        """A request whose notifications the owner tags with a stream id of ours (it sends
        them as ``subscription``, which the client routes by), passed on as they come; those
        sent before the answer are all passed on before it returns (one connection: in order)."""
        self._streams += 1
        sid = f"$stream-{self._streams}"
        notes = client.on_notification(sid)

        def pass_on(item: dict) -> None:
            note = dict(item.get("params") or {})
            note.pop("subscription", None)
            on_note(note)

        async def passing() -> None:
            async for item in notes:  # (until forgotten: the rest of what came, then the end)
                pass_on(item)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(passing)
            try:
                return await client.request(method, {**params, "$forwarded": True, "$stream": sid})
            finally:
                client.forget_notifications(sid)

    async def relay(self, process: str, port: str | None, deliver: Callable[[dict], None]) -> None:
        """Pass on ``process``'s outputs (``actor.output`` params) from whichever host owns it,
        following it as it moves, until cancelled; returns once this host holds the process
        (the caller then subscribes to the cell here)."""
        while True:
            rec = await self.owner(process)
            if rec is LOCAL:
                return
            assert isinstance(rec, HostRecord)
            try:
                client = await self._client(rec.url)
                async for note in client.subscribe(process, port):
                    deliver(note)
            except Exception as exc:  # (the owner went away: follow the lease)
                log.info("subscription to %s through %s ended: %s; following it", process, rec.id, exc)
            await self.cluster.changed(self.cluster.period)
