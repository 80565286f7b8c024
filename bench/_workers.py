"""Sandbox-level figures straight on the backend and pool: cold start, warm acquire+load, idle RSS."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import orjson
import trio

from supervisor._pool import WorkerPool
from supervisor._sandbox._base import Worker, WorkerSpec
from supervisor._sandbox._bubblewrap import BubblewrapBackend, runtime_dir
from supervisor._sandbox._spawn import descendants

from ._stats import Figures, pct

__all__ = ["DOUBLE_SOURCE", "cold_start", "idle_rss", "load_and_process", "warm_acquire_load"]

DOUBLE_SOURCE = '''\
from reflow import actor

@actor(name="Double", inports=["value"], outports=["value"])
async def double(context):
    return {"value": context.get_input("value") * 2}
'''

_ids = itertools.count(1)


async def _rpc(w: Worker, method: str, params: dict) -> dict:
    """One request on a worker's channel; raises RuntimeError on an error reply."""
    rid = next(_ids)
    await w.channel.send(orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
    while True:
        msg = orjson.loads(await w.channel.receive())
        if msg.get("id") == rid and "method" not in msg:
            if "error" in msg:
                raise RuntimeError(f"{method} failed: {msg['error']}")
            return msg.get("result") or {}


async def load(w: Worker, source: str) -> None:
    await _rpc(w, "load", {"source": source, "filename": "double.actor.py", "entry": None, "actor_id": "Double",
                           "config": {}, "limits": {}})


async def load_and_process(w: Worker, source: str, value: int) -> int:
    await load(w, source)
    r = await _rpc(w, "process", {"actor_id": "Double", "payload": {"value": {"type": "integer", "value": value}},
                                  "config": {}, "timestamp": int(time.time() * 1000), "message_id": "m"})
    return r["outputs"]["value"]["value"]


async def cold_start(fig: Figures, n: int) -> None:
    """``backend.start`` → ready, Python (and Node when its runtime exists)."""
    backend = BubblewrapBackend()
    runtimes = [("python", "python")]
    if (runtime_dir() / "js" / "reflow_worker.js").exists():
        runtimes.append(("node", "javascript"))
    else:
        fig.skip("ours.cold_start.node.p50", "no JS runtime yet (supervisor/runtime/js/reflow_worker.js missing)")
    for label, rt in runtimes:
        samples = []
        for i in range(n + 1):
            t0 = time.perf_counter()
            w = await backend.start(WorkerSpec(runtime=rt))
            dt = time.perf_counter() - t0
            await w.aclose()
            if i:
                samples.append(dt)
        ms = [x * 1e3 for x in samples]
        fig.add(f"ours.cold_start.{label}.p50", pct(ms, 50), "ms", ms, "bwrap start → ready frame")


async def warm_acquire_load(fig: Figures, n: int) -> None:
    """``WorkerPool.acquire`` on a warm pool plus the ``load`` request of the trivial actor."""
    pool = WorkerPool(BubblewrapBackend(), {"python": WorkerSpec(runtime="python")}, preload=1, max_size=4,
                      idle_timeout=300)
    samples = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        for _ in range(n):
            with trio.fail_after(10):
                while pool.status()["python"]["warm"] < 1:
                    await trio.sleep(0.005)  # the refill runs in the pool's own task; not part of the figure
            t0 = time.perf_counter()
            w = await pool.acquire("python")
            await load(w, DOUBLE_SOURCE)
            samples.append(time.perf_counter() - t0)
            await w.aclose()
            pool.release(w)
        nursery.cancel_scope.cancel()
    ms = [x * 1e3 for x in samples]
    from ._stats import pct
    fig.add("ours.warm_acquire_load.p50", pct(ms, 50), "ms", ms, "pool.acquire (warm) + load of the trivial actor")


def worker_python_pid(bwrap_pid: int) -> int:
    """The python process inside a bwrap sandbox (host pid). Raises LookupError if there is none."""
    for p in descendants(bwrap_pid):
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # bwrap forks itself (outer, then pid 1 of the namespace) with the same argv: match the interpreter.
        if b"python" in argv[0] and any(b"reflow_worker" in a for a in argv):
            return p
    raise LookupError(f"no reflow_worker under pid {bwrap_pid}")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for {pid}")


async def idle_rss(fig: Figures) -> None:
    """VmRSS of the idle (ready, nothing loaded) and loaded python inside bwrap."""
    w = await BubblewrapBackend().start(WorkerSpec(runtime="python"))
    try:
        py = worker_python_pid(w.pid)
        idle = rss_kb(py) / 1024
        await load(w, DOUBLE_SOURCE)
        loaded = rss_kb(py) / 1024
    finally:
        await w.aclose()
    fig.add("ours.idle_rss.python", idle, "MB", [idle], "VmRSS of python inside bwrap, ready")
    fig.add("ours.loaded_rss.python", loaded, "MB", [loaded], "after loading the trivial actor")
