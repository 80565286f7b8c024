"""``supervisor.watch``: the tree's state changes, live stats and the host's log, pushed.

A watcher's answer holds a ``snapshot`` (the status tree, the graph, the hosts, the
latest stats and the log's tail); then a ``supervisor.event`` notification per change: ``started``, ``exited`` (with its ``cause``), ``restarting``, ``restarted``,
``stopped``, ``failed`` (will not be restarted), ``gave_up`` (a supervisor), plus
``stats`` (per actor, once a second while anyone watches) and ``log`` (new records).

The tree tells :class:`Watchers` of each change synchronously (``Supervisor.notify``);
each watcher only appends to its own bounded list, and its pump task sends the list
out at most every ``COALESCE`` seconds, and only while the client keeps up (its
connection's queue of unsent bytes below ``WATCH_BACKLOG``). A watcher that falls
further behind than ``MAX_PENDING`` events loses them and gets a fresh snapshot
(``"resync": true``) instead: a slow watcher costs the host a bounded list, never a wait.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import time
from typing import Any, Protocol

import trio

from ._metrics import BUCKETS, MetricsHost, mailbox_depths, quantile

__all__ = ["Watchers", "cause_details", "LogRing"]

log = logging.getLogger("supervisor.watch")

COALESCE = 0.05  # seconds a pump lets a burst of events gather (a restart is three of them)
STATS_EVERY = 1.0  # seconds between stats events
STATS_WINDOW = 10  # ticks the latency quantiles are taken over
MAX_PENDING = 512  # events a watcher may fall behind by before it is resynced instead
WATCH_BACKLOG = 256 * 1024  # unsent bytes on a connection past which its watcher holds back
LOG_RING = 500  # log records the host keeps for the page
_ids = itertools.count(1)


def cause_details(exc: BaseException) -> dict:
    """What ended a child, beyond its message: a dead worker's exit code, signal or the
    limit it broke; a script's traceback (its last lines, as the sandbox reported them:
    neutral paths, no host ones). Empty when there is nothing more to say."""
    out: dict = {}
    exit = getattr(exc, "exit", None)
    if exit is not None and hasattr(exit, "to_data"):
        out.update(exit.to_data())
    if type(exc).__name__ == "ActorTimedOut":
        out.setdefault("limit", "time")
    seen = exc
    while seen is not None:  # a load failure arrives wrapped (PermanentFailure from ScriptLoadFailed)
        error = getattr(seen, "error", None)
        data = (error.get("data") if isinstance(error, dict) else None) or getattr(seen, "data", None)
        if isinstance(data, dict):
            tb = data.get("traceback")
            if isinstance(tb, list) and tb:
                out["traceback"] = [str(line)[:300] for line in tb[-12:]]
            if isinstance(data.get("limit"), str):
                out.setdefault("limit", data["limit"])
            break
        seen = seen.__cause__
    return out


class LogRing(logging.Handler):
    """The host's last LOG_RING log records, as the page shows them; new ones also go to
    the watchers."""

    def __init__(self, watchers: Watchers):
        super().__init__()
        self.records: collections.deque[dict] = collections.deque(maxlen=LOG_RING)
        self.watchers = watchers

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rec = {"at": record.created, "level": record.levelname.lower(),
                   "logger": record.name.removeprefix("supervisor."), "message": record.getMessage()[:2000]}
            fields = {k: str(v)[:300] for k, v in record.__dict__.items() if k not in _STD}
            if fields:
                rec["fields"] = fields
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            self.records.append(rec)
            self.watchers.put_log(rec)
        except Exception:  # a log record must never break what logged it
            self.handleError(record)


class WatchedHost(MetricsHost, Protocol):
    """What a watcher reads of the host (``Host`` implements it), besides what the metrics
    read: named here, so that this module needs nothing of the host's."""

    routes: dict[tuple[str, str], list[tuple[str, str]]]
    url: str | None

    def status(self) -> dict: ...


class WatchingClient(Protocol):
    """The API connection a watch is pushed to (``_server.Connection`` implements it)."""

    subscriptions: dict[str, tuple[Any, int]]  # sid -> (what holds the subscriber, its key)
    _nursery: trio.Nursery | None  # where the pump runs: it ends with the connection
    _queued: int                   # bytes of answers not yet sent (the client is behind)
    _writer_done: trio.Event
    _progress: trio.Event          # set (and replaced) each time the writer sent frames

    def notify(self, method: str, params: dict) -> None: ...


_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class _Sub:
    __slots__ = ("sid", "conn", "pending", "log", "stats", "overflowed", "wake")

    def __init__(self, sid: str, conn: WatchingClient):
        self.sid, self.conn = sid, conn
        self.pending: list[dict] = []
        self.log: list[dict] = []
        self.stats: dict | None = None
        self.overflowed = False
        self.wake = trio.Event()

    def put(self, event: dict) -> None:
        if self.overflowed:
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.clear()
            self.overflowed = True  # it gets a fresh snapshot instead
        else:
            self.pending.append(event)
        self.wake.set()


class Watchers:
    """The API's watchers of one host (see the module's docstring). Also what a
    connection's subscription table takes: ``subscribers`` maps a key to a watcher, so
    that ``actor.unsubscribe`` and a connection's end remove it as they do any other."""

    def __init__(self, host: WatchedHost):
        self.host = host
        self.subscribers: dict[int, _Sub] = {}
        self.ring = LogRing(self)
        self.last_stats: dict | None = None
        self._window: collections.deque[tuple[float, dict]] = collections.deque(maxlen=STATS_WINDOW + 1)
        self._attached: set[int] = set()
        self.host_id = f"{socket.gethostname()}-{os.getpid()}"

    # -- what the tree and the log call -------------------------------------
    def tree_event(self, event: str, sup: Any, node: Any) -> None:
        """``Supervisor.notify``: runs inside the supervisor's loop, so it only builds the
        event and hands it to each watcher's list; it never raises."""
        if not self.subscribers:
            return
        try:
            ev: dict = {"event": event, "supervisor": sup.name, "at": time.time()}
            if node is None:
                ev.update(actor=sup.name, state=sup.state, last_error=sup.last_error, restarts=sup.restarts)
            else:
                st = node.child.status()
                state = node.state
                if event == "exited":
                    state = "stopped" if node.state == "stopped" else "exited"
                    ev["cause"] = node.last_error if state == "exited" else None
                elif event == "failed":
                    ev["cause"] = node.last_error
                st.update(state=state, restarts=node.restarts, last_error=node.last_error or st.get("last_error"))
                st.pop("children", None)
                ev.update(actor=node.child.name, state=state, restarts=node.restarts, node=st)
            for sub in list(self.subscribers.values()):
                sub.put(ev)
        except Exception:
            log.exception("could not tell the watchers of %s", event)

    def cluster_event(self, event: dict) -> None:
        """A host joined or left, a process moved (``Cluster.on_event``)."""
        ev = {**event, "at": time.time()}
        for sub in list(self.subscribers.values()):
            sub.put(ev)

    def put_log(self, rec: dict) -> None:
        for sub in list(self.subscribers.values()):
            if len(sub.log) < MAX_PENDING:
                sub.log.append(rec)
                sub.wake.set()

    def attach(self) -> None:
        """Have every supervisor of the tree tell us of its changes (those added later too:
        called again at each stats tick, it sets what is new)."""
        todo = [self.host.root] if self.host.root is not None else []
        while todo:
            sup = todo.pop()
            if id(sup) not in self._attached:
                sup.notify = self.tree_event
                self._attached.add(id(sup))
            todo.extend(c for c in sup.children() if hasattr(c, "notify") and hasattr(c, "children"))

    # -- the method ---------------------------------------------------------
    async def watch(self, conn: WatchingClient, params: Any) -> dict:
        """``supervisor.watch``: ``{"subscription", "snapshot"}`` (the snapshot in the answer, so
        that no change can fall between the two); the changes follow as events."""
        self.attach()
        sid = f"watch{next(_ids)}"
        sub = _Sub(sid, conn)
        key = id(sub)
        self.subscribers[key] = sub
        conn.subscriptions[sid] = (self, key)
        nursery = getattr(conn, "_nursery", None)
        assert nursery is not None, "a connection's requests run inside its nursery"
        nursery.start_soon(self._pump, sub, key)
        return {"subscription": sid, "snapshot": self.snapshot()}

    def snapshot(self, *, resync: bool = False) -> dict:
        host = self.host
        status = host.status()
        hosts = status.get("hosts") or [{"id": self.host_id, "url": host.url, "labels": [],
                                         "last_seen": time.time(), "processes": len(host.cells)}]
        edges = [{"src": src, "sport": sport, "tgt": tgt, "tport": tport}
                 for (src, sport), targets in host.routes.items() for tgt, tport in targets]
        nodes = [{"name": n, "component": c.component.name, "runtime": c.component.runtime,
                  "inports": list(c.component.inports), "outports": list(c.component.outports)}
                 for n, c in host.cells.items()]
        return {"event": "snapshot", "resync": resync, "at": time.time(), "status": status,
                "graph": {"nodes": nodes, "edges": edges}, "hosts": hosts, "stats": self.last_stats,
                "log": list(self.ring.records)[-200:], "durable": host.durable}

    async def _pump(self, sub: _Sub, key: int) -> None:
        conn = sub.conn
        while key in self.subscribers:
            with trio.move_on_after(STATS_EVERY * 2):  # (to notice an unsubscribe)
                await sub.wake.wait()
            sub.wake = trio.Event()
            await trio.sleep(COALESCE)
            while getattr(conn, "_queued", 0) > WATCH_BACKLOG:  # the client is behind: hold back
                if key not in self.subscribers or conn._writer_done.is_set():
                    return
                await conn._progress.wait()
            if key not in self.subscribers:
                return
            if sub.overflowed:
                sub.overflowed, sub.pending, sub.log, sub.stats = False, [], [], None
                conn.notify("supervisor.event", {"subscription": sub.sid, **self.snapshot(resync=True)})
                continue
            events, sub.pending = sub.pending, []
            if sub.log:
                events.append({"event": "log", "records": sub.log})
                sub.log = []
            if sub.stats is not None:
                events.append(sub.stats)
                sub.stats = None
            for ev in events:
                conn.notify("supervisor.event", {"subscription": sub.sid, **ev})

    # -- stats ----------------------------------------------------------------
    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the log ring, and tick stats while anyone watches, until cancelled."""
        logger = logging.getLogger("supervisor")
        logger.addHandler(self.ring)
        try:
            task_status.started()
            while True:
                await trio.sleep(STATS_EVERY)
                if not self.subscribers:
                    self._window.clear()
                    continue
                self.attach()
                ev = await self.stats()
                self.last_stats = ev
                for sub in list(self.subscribers.values()):
                    sub.stats = ev
                    sub.wake.set()
        finally:
            logger.removeHandler(self.ring)

    async def stats(self) -> dict:
        """Per actor, over the last tick: messages/s, out of each port per second, and the
        p50/p99 of their durations over the last STATS_WINDOW ticks; mailbox depths now."""
        host = self.host
        now = time.monotonic()
        cur = {name: (c.stats.ok, c.stats.failed, tuple(c.stats.counts), dict(c.stats.ports))
               for name, c in host.cells.items()}
        self._window.append((now, cur))
        depths, dead = await mailbox_depths(host)
        prev_t, prev = self._window[-2] if len(self._window) > 1 else (now, cur)
        old_t, old = self._window[0]
        dt = max(now - prev_t, 1e-6)
        actors = {}
        empty = (0, 0, (0,) * (len(BUCKETS) + 1), {})
        for name, (ok, failed, counts, ports) in cur.items():
            p_ok, p_failed, _, p_ports = prev.get(name, empty)
            o_counts = old.get(name, empty)[2]
            window = [a - b for a, b in zip(counts, o_counts)]
            actors[name] = {
                "ok": ok, "failed": failed, "rate": round((ok + failed - p_ok - p_failed) / dt, 2),
                "failed_rate": round((failed - p_failed) / dt, 2),
                "p50": quantile(0.5, window), "p99": quantile(0.99, window),
                "depth": depths.get(name, 0),
                "ports": {p: round((n - p_ports.get(p, 0)) / dt, 2) for p, n in ports.items()},
                "last_failure": host.cells[name].stats.last_failure,
            }
        return {"event": "stats", "at": time.time(), "actors": actors, "deadletters": dead,
                "pools": host.pool.status() if host.pool else {}}
