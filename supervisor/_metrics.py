"""Per-actor counters the host keeps anyway, and ``GET /metrics`` rendered from them.

A message costs its cell one ``ActorStats.observe`` (two integer additions and a bucket
found by bisection, no lock, no label lookup): prometheus_client is used only at scrape
time, by a custom collector that reads these counters and the tree's own (restarts,
pool sizes), so the hot path never touches it. Durable mailbox depths and the
dead-letter count are read from Redis when scraped.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ._redis import RedisError, RedisUnavailable

if TYPE_CHECKING:
    from prometheus_client.core import Metric

# (prometheus_client is imported where it is used: every command that loads a cell loads
# this module, and only the host's API scrapes.)

__all__ = ["ActorStats", "BUCKETS", "HostMetrics", "MetricsHost", "quantile", "walk_status"]


class MetricsHost(Protocol):
    """What the metrics read of the host (``Host`` implements it): named here, so that this
    module needs nothing of the host's."""

    config: Any
    keys: Any                    # core.keys.Keys: where the dead letters are
    cells: dict[str, Any]        # name -> ActorCell (its stats, mailbox, inbox key)
    durable: bool
    redis: Any
    root: Any                    # the supervision tree (_tree.Supervisor), once it runs
    pool: Any                    # the WorkerPool, once it runs

# Upper bounds (seconds) of the duration histogram: a plain call takes well under a
# millisecond, a script that sleeps or computes, anything up to its timeout.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)


class ActorStats:
    """One cell's message counts and duration histogram, and its last failure."""

    __slots__ = ("ok", "failed", "counts", "sum", "ports", "last_failure")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.ports: dict[str, int] = {}  # messages sent out of each output port
        self.last_failure: dict | None = None

    def observe(self, seconds: float, error: Any) -> None:
        """A message handled in ``seconds``: ``error`` is its ActorError (or True for a
        failure with none), None when it succeeded."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        if error is None:
            self.ok += 1
            return
        self.failed += 1
        if error is not True:
            self.last_failure = {"type": type(error).__name__, "message": getattr(error, "message", str(error)),
                                 "data": _scrubbed(getattr(error, "data", None)), "at": time.time()}

    def routed(self, routed: list) -> None:
        ports = self.ports
        for port, _ in routed:
            ports[port] = ports.get(port, 0) + 1


def _scrubbed(data: Any) -> Any:
    """An error's data as the page shows it: the traceback's last lines, no payloads."""
    if not isinstance(data, dict):
        return None
    out = {k: v for k, v in data.items() if k in ("type", "message", "code", "limit", "timeout", "exit_code",
                                                  "signal", "line")}
    tb = data.get("traceback")
    if isinstance(tb, list):
        out["traceback"] = [str(x)[:300] for x in tb[-12:]]
    return out


def quantile(q: float, counts: list[int]) -> float | None:
    """The ``q`` quantile of a histogram of BUCKETS (counts per bucket, not cumulative),
    interpolated linearly within its bucket as Prometheus' histogram_quantile does; None
    when empty."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lo = BUCKETS[i - 1] if i else 0.0
            hi = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return BUCKETS[-1]


def walk_status(node: dict) -> Iterator[dict]:
    """Every node of a ``supervisor.status`` tree, parents first."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(reversed(n.get("children") or []))


async def mailbox_depths(host: MetricsHost) -> tuple[dict[str, int], int | None]:
    """Messages waiting per actor (a memory mailbox's queue, or a durable inbox's length in
    Redis), and the dead-letter count (None without Redis or when it does not answer)."""
    depths = {name: cell.pending() + len(cell.ahead) + len(cell._retry) for name, cell in host.cells.items()}
    redis = host.redis
    if redis is None:
        return depths, None
    keys = host.keys
    try:
        dead_replies = [redis.submit("XLEN", k) for k in keys.deadletter_streams(host.cells)]
        replies = {name: redis.submit("XLEN", cell.inbox) for name, cell in host.cells.items()} if host.durable else {}
        for name, reply in replies.items():
            depths[name] = int(await reply())
        return depths, sum([int(await r()) for r in dead_replies])
    except (RedisUnavailable, RedisError):
        return depths, None


class _HostCollector:
    def __init__(self, host: MetricsHost):
        self.host = host
        self.depths: dict[str, int] = {}
        self.deadletters: int | None = None

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        host = self.host
        messages = CounterMetricFamily("reflow_messages", "Messages handled, by actor and outcome.",
                                       labels=["actor", "outcome"])
        durations = HistogramMetricFamily("reflow_message_duration_seconds",
                                          "Time from a message reaching its worker to its reply.", labels=["actor"])
        for name, cell in host.cells.items():
            s = cell.stats
            messages.add_metric([name, "ok"], s.ok)
            messages.add_metric([name, "failed"], s.failed)
            acc, buckets = 0, []
            for bound, n in zip((*map(_le, BUCKETS), "+Inf"), s.counts):
                acc += n
                buckets.append((bound, acc))
            durations.add_metric([name], buckets, s.sum)
        yield messages
        yield durations
        restarts = CounterMetricFamily("reflow_restarts", "Restarts of each actor by its supervisor.",
                                       labels=["actor"])
        up = GaugeMetricFamily("reflow_actor_up", "1 while the actor is running.", labels=["actor", "state"])
        if host.root is not None:
            for node in walk_status(host.root.status()):
                if node.get("kind") == "actor":
                    restarts.add_metric([node["name"]], node.get("restarts") or 0)
                    up.add_metric([node["name"], str(node.get("state"))], 1 if node.get("state") == "running" else 0)
        yield restarts
        yield up
        depth = GaugeMetricFamily("reflow_mailbox_depth", "Messages waiting for each actor.", labels=["actor"])
        for name, n in self.depths.items():
            depth.add_metric([name], n)
        yield depth
        workers = GaugeMetricFamily("reflow_workers", "Sandboxed workers by runtime and state.",
                                    labels=["runtime", "state"])
        for rt, p in (host.pool.status() if host.pool else {}).items():
            workers.add_metric([rt, "warm"], p["warm"])
            workers.add_metric([rt, "busy"], max(0, p["live"] - p["warm"]))
            workers.add_metric([rt, "max"], p["max_size"])
        yield workers
        dead = GaugeMetricFamily("reflow_deadletters", "Messages in the dead-letter stream.")
        if self.deadletters is not None:
            dead.add_metric([], self.deadletters)
        yield dead


def _le(bound: float) -> str:
    return repr(float(bound))


class HostMetrics:
    """The host's Prometheus registry: its own collector plus the process, platform and GC ones."""

    def __init__(self, host: MetricsHost):
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _HostCollector(host)
        self.host = host
        self.registry.register(self._collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    async def render(self) -> bytes:
        """The text exposition, with mailbox depths and dead letters read just now."""
        from prometheus_client import generate_latest

        self._collector.depths, self._collector.deadletters = await mailbox_depths(self.host)
        return generate_latest(self.registry)
