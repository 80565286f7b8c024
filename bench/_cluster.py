"""Figures of several hosts on one Redis (CONTRACT §6): a call forwarded through a host that
does not own the actor against a call to its owner, and failover after a SIGKILL of the owner.

Every host is a real ``python -m supervisor run`` on a workspace of its own (its own
``.reflow/host.json``), with durable mailboxes on one ``redis-server`` the bench starts (the
bundled binary, on a free TCP port), told apart by ``REFLOW_HOST_ID``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import redis as redis_py
import trio

from supervisor.core.placement import rendezvous
from supervisor._redis import embedded_redis_binary
from supervisor.client import RpcError, open_client

from ._load import latency, take_turns
from ._ours import ROOT, _call_ok, _find, _free_port, _latency_turn, _stop_host
from ._stats import Figures, pct
from ._workers import DOUBLE_SOURCE

__all__ = ["failover", "forwarding"]

ACTOR = "Double"


class _Host:
    """One host of the cluster; ``start`` again after a kill runs it again on the same
    workspace, port and host id (as a restarted machine would)."""

    def __init__(self, root: Path, host_id: str, redis_url: str, ttl: float):
        self.id = host_id
        self.root = root
        root.mkdir()
        (root / "double.actor.py").write_text(DOUBLE_SOURCE)
        self.cfg = root / "reflow.yaml"
        self.cfg.write_text(textwrap.dedent(f"""\
            workspace:
              root: .
              script_patterns: ["**/*.actor.py"]
              hot_reload: false
              sandbox:
                backend: bubblewrap
                pool: {{preload_count: 1, max_size: 4}}
              websocket: {{host: 127.0.0.1, port: {_free_port()}}}
              mailbox: {{kind: redis}}
            network:
              processes:
                {ACTOR}: {{component: Double}}
            cluster:
              lease_ttl: {ttl:g}s
            """))
        self.env = {**os.environ, "REFLOW_REDIS_URL": redis_url, "REFLOW_HOST_ID": host_id,
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._logf = None

    async def start(self) -> None:
        info = self.root / ".reflow" / "host.json"
        info.unlink(missing_ok=True)  # (a killed host leaves its own behind)
        self._logf = open(self.root / "host.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(self.cfg)], cwd=self.root,
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=self.env)
        with trio.fail_after(60):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"host {self.id} exited {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    self.url = orjson.loads(info.read_bytes())["url"]
                    return
                except (OSError, ValueError):
                    await trio.sleep(0.02)  # the host writes host.json once it serves

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._close_log()

    def stop(self) -> None:
        if self.proc is not None:
            _stop_host(self.proc)
        self._close_log()

    def _close_log(self) -> None:
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n  ".join((self.root / "host.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _pings(r: redis_py.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis_py.ConnectionError:
        return False


@asynccontextmanager
async def _open_cluster(count: int, ttl: float) -> AsyncIterator[list[_Host]]:
    """``count`` hosts h0… on one fresh redis-server, each started and serving."""
    with tempfile.TemporaryDirectory(prefix="reflow-bench-cluster-") as tmp:
        port = _free_port()
        data = Path(tmp) / "redis"
        data.mkdir()
        # like the embedded one: append-only, fsync every second
        redis = subprocess.Popen([embedded_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        r = redis_py.Redis(port=port)
        hosts = [_Host(Path(tmp) / f"h{i}", f"h{i}", f"redis://127.0.0.1:{port}/0", ttl) for i in range(count)]
        try:
            with trio.fail_after(10):
                while not _pings(r):
                    await trio.sleep(0.02)  # redis-server is starting
            for h in hosts:
                await h.start()
            yield hosts
        except BaseException:
            for h in hosts:
                print(f"host {h.id} log, last lines:\n  {h.log_tail()}", file=sys.stderr)
            raise
        finally:
            for h in hosts:
                h.stop()
            r.close()
            redis.kill()
            redis.wait()


async def _view(url: str) -> tuple[tuple[str, ...], str | None, str | None]:
    """(the live hosts' ids, who owns the actor, the actor's state) as the host at ``url`` sees it."""
    async with open_client(url) as c:
        st = await c.status()
    node = _find(st, ACTOR) or {}
    return tuple(sorted(h["id"] for h in st.get("hosts", []))), node.get("host"), node.get("state")


async def _settled(hosts: list[_Host]) -> str:
    """Wait until every host sees every other, and all agree the actor is owned by the host
    placement gives it (so no handoff is still to come); returns that host's id."""
    ids = tuple(sorted(h.id for h in hosts))
    want = rendezvous(ACTOR, ids)
    with trio.fail_after(30):
        while True:
            views = {h.id: await _view(h.url) for h in hosts}
            if all(v[0] == ids and v[1] == want and (v[2] == "remote") == (hid != want) for hid, v in views.items()):
                return want
            await trio.sleep(0.05)  # polling the hosts' status, the thing measured


async def forwarding(fig: Figures, *, n: int, warmup: int, rounds: int) -> None:
    """``actor.call`` p50/p99 through the owner and through the other host, in ``rounds``
    alternating turns, on two hosts with durable mailboxes."""
    async with _open_cluster(2, ttl=3.0) as hosts:
        owner_id = await _settled(hosts)
        owner = next(h for h in hosts if h.id == owner_id)
        other = next(h for h in hosts if h.id != owner_id)
        async with open_client(owner.url) as local, open_client(other.url) as fwd:
            with trio.fail_after(60):  # the first call waits for the cell to load its script
                await _call_ok(local, ACTOR, 1)
                await _call_ok(fwd, ACTOR, 1)

            def turn(c):
                return functools.partial(_latency_turn, functools.partial(
                    latency, lambda i: _call_ok(c, ACTOR, i)), n // rounds, warmup)

            lat = await take_turns({"local": turn(local), "forwarded": turn(fwd)}, rounds)
        if await _settled(hosts) != owner_id:
            raise RuntimeError(f"actor {ACTOR} moved off host {owner_id} during the forwarding turns")
    what = f"2 hosts on one redis-server, durable mailboxes, 1 in flight, {rounds} turns alternating"
    fig.latency("ours.cluster.call_local", sum(lat["local"], []), f"actor.call through the owning host; {what}")
    fig.latency("ours.cluster.call_forwarded", sum(lat["forwarded"], []),
                f"actor.call through the other host, forwarded to the owner over the hosts' WebSocket API; {what}")


async def failover(fig: Figures, *, kills: int, ttl: float = 1.0, limit: float = 15.0) -> None:
    """SIGKILL the actor's owner among three hosts while a client calls steadily through a
    surviving host; time from the kill to the first call answered by the new owner (a call
    sent after the killed host was reaped). The killed host is started again between kills."""
    samples: list[float] = []
    missed = 0
    async with _open_cluster(3, ttl) as hosts:
        for _ in range(kills):
            victim_id = await _settled(hosts)
            victim = next(h for h in hosts if h.id == victim_id)
            successor = rendezvous(ACTOR, [h.id for h in hosts if h is not victim])
            # through the third host: the call is forwarded, and has to find the new owner
            via = next(h for h in hosts if h.id not in (victim_id, successor))
            async with open_client(via.url) as c:
                took = await _kill_while_calling(c, victim, limit)
            if took is None:
                missed += 1
            else:
                samples.append(took)
                _, now, _ = await _view(via.url)
                if now == victim_id:
                    raise RuntimeError(f"a call succeeded after {victim_id} was killed, yet it still owns {ACTOR}")
            await victim.start()
    if not samples:
        raise RuntimeError(f"no call was answered within {limit:g}s of any of {kills} kills of the owner")
    ms = [x * 1e3 for x in samples]
    note = (f"3 hosts, cluster.lease_ttl {ttl:g}s, durable mailboxes; SIGKILL the owner of {ACTOR} while a client "
            f"calls it steadily through the third host → first call answered by the new owner; {len(ms)} kills, "
            "the killed host started again in between"
            + (f"; {missed} kill(s) not served again within {limit:g}s, left out" if missed else ""))
    fig.add("ours.cluster.failover.p50", pct(ms, 50), "ms", ms, note)
    fig.add("ours.cluster.failover.max", max(ms), "ms", [], note)
    fig.add("ours.cluster.lease_ttl", ttl * 1e3, "ms", [], "cluster.lease_ttl of the failover run")


async def _kill_while_calling(c, victim: _Host, limit: float) -> float | None:
    """Seconds from SIGKILL of ``victim`` to the first call (sent after it was reaped)
    answered, or None past ``limit``; calls go one after another all along."""
    flowing = trio.Event()
    served = trio.Event()
    t_kill = dead_at = 0.0
    answered = 0
    took: float | None = None

    async def caller() -> None:
        nonlocal answered, took
        i = 0
        while True:
            i += 1
            sent = time.perf_counter()
            ok = False
            with trio.move_on_after(3):
                try:
                    await _call_ok(c, ACTOR, i)
                    ok = True
                except RpcError:  # the owner is gone (HostLost, HostUnreachable, Unplaced): call again
                    pass
            if ok:
                answered += 1
                if answered >= 20:
                    flowing.set()
                if dead_at and sent >= dead_at:
                    took = time.perf_counter() - t_kill
                    served.set()
                    return
            else:
                await trio.sleep(0.01)  # (a retry interval, not to spin on a refused connection)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        with trio.fail_after(30):
            await flowing.wait()
        t_kill = time.perf_counter()
        victim.kill()
        dead_at = time.perf_counter()
        with trio.move_on_after(limit):
            await served.wait()
        nursery.cancel_scope.cancel()
    return took
