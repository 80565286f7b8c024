"""Sandbox-level figures straight on the backend and pool: cold start, warm acquire+load, idle RSS."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import orjson
import trio

from supervisor._child import runtime_unavailable
from supervisor._pool import WorkerPool
from supervisor._sandbox._base import Worker, WorkerSpec
from supervisor._sandbox._bubblewrap import BubblewrapBackend
from supervisor._sandbox._spawn import descendants

from ._stats import Figures, pct

__all__ = ["DOUBLE_JS_SOURCE", "DOUBLE_SOURCE", "cold_start", "idle_rss", "load_and_process", "sandbox_rss",
           "warm_acquire_load"]

DOUBLE_SOURCE = '''\
from reflow import actor

@actor(name="Double", inports=["value"], outports=["value"])
async def double(context):
    return {"value": context.get_input("value") * 2}
'''

# The same actor for the Node runtime, in the ``module.exports = actor(...)`` form.
DOUBLE_JS_SOURCE = '''\
const { actor } = require('reflow');

module.exports = actor({name: 'Double', inports: ['value'], outports: ['value']},
                       (context) => ({value: context.getInput('value') * 2}));
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


async def load(w: Worker, source: str, filename: str = "double.actor.py") -> None:
    await _rpc(w, "load", {"source": source, "filename": filename, "entry": None, "actor_id": "Double",
                           "config": {}, "limits": {}})


async def load_and_process(w: Worker, source: str, value: int, filename: str = "double.actor.py") -> int:
    await load(w, source, filename)
    r = await _rpc(w, "process", {"actor_id": "Double", "payload": {"value": {"type": "integer", "value": value}},
                                  "config": {}, "timestamp": int(time.time() * 1000), "message_id": "m"})
    return r["outputs"]["value"]["value"]


async def cold_start(fig: Figures, n: int) -> None:
    """``backend.start`` → ready, Python (and Node when its runtime exists)."""
    backend = BubblewrapBackend()
    runtimes = [("python", "python")]
    if (why := runtime_unavailable("javascript")) is None:
        runtimes.append(("node", "javascript"))
    else:
        fig.skip("ours.cold_start.node.p50", why)
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
        fig.add(f"ours.cold_start.{label}.p50", pct(ms, 50), "ms", ms, "backend.start (bwrap spawn) → ready frame")


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


def sandbox_rss(w: Worker) -> tuple[float, float, list[dict]]:
    """(RSS MB, PSS MB, per-process rows) summed over the processes *inside* the sandbox's pid
    namespace: bwrap's pid 1 and the interpreter. The outer bwrap (host namespace) is listed
    in the rows but not summed."""
    rows, rss, pss = [], 0, 0
    for p in [w.pid, *descendants(w.pid)]:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if ":" in line)
            p_pss = next(int(line.split()[1]) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                         if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue  # gone meanwhile
        inside = len(status["NSpid"].split()) > 1
        p_rss = int(status["VmRSS"].split()[0])
        rows.append({"name": status["Name"].strip(), "inside": inside, "rss_kb": p_rss, "pss_kb": p_pss})
        if inside:
            rss, pss = rss + p_rss, pss + p_pss
    if not any(r["inside"] for r in rows):
        raise LookupError(f"no process inside the sandbox of pid {w.pid}")
    return rss / 1024, pss / 1024, rows


async def idle_rss(fig: Figures) -> None:
    """RSS of an idle (ready, nothing loaded) and a loaded worker, Python and Node, summed over the
    processes inside the sandbox (``sandbox_rss``)."""
    backend = BubblewrapBackend()
    for label, rt, source, filename in [("python", "python", DOUBLE_SOURCE, "double.actor.py"),
                                        ("node", "javascript", DOUBLE_JS_SOURCE, "double.actor.js")]:
        if rt == "javascript" and (why := runtime_unavailable(rt)) is not None:
            fig.skip("ours.idle_rss.node", why)
            fig.skip("ours.loaded_rss.node", why)
            continue
        w = await backend.start(WorkerSpec(runtime=rt))
        try:
            idle, idle_pss, rows = sandbox_rss(w)
            await load(w, source, filename)
            loaded, loaded_pss, _ = sandbox_rss(w)
        finally:
            await w.aclose()
        procs = " + ".join(f"{r['name']} {r['rss_kb'] / 1024:.1f}" for r in rows if r["inside"])
        outer = sum(r["rss_kb"] for r in rows if not r["inside"]) / 1024
        fig.add(f"ours.idle_rss.{label}", idle, "MB", [idle],
                f"sum of VmRSS inside the sandbox, ready: {procs} MB (PSS {idle_pss:.1f} MB; "
                f"the outer bwrap adds {outer:.1f} MB RSS)")
        fig.add(f"ours.loaded_rss.{label}", loaded, "MB", [loaded],
                f"after loading the trivial actor (PSS {loaded_pss:.1f} MB)")
