"""Large payloads: a bytes message host → sandboxed Python worker → host through the
shared-memory rings and as raw channel attachments (what the host does, by size) beside
the same payload as base64 inside the JSON frame (the baseline: what every byte cost
before), in the same run, on the same worker. The echo actor returns its input view, so
the worker copies it once into its ``out`` ring; the host copies it out once."""

from __future__ import annotations

import base64
import itertools
import os
import time

import orjson

from supervisor._sandbox._base import Worker, WorkerSpec
from supervisor._sandbox._bubblewrap import BubblewrapBackend

from ._stats import Figures, pct
from ._workers import load

__all__ = ["SIZES", "payload_round_trips"]

ECHO_SOURCE = '''\
from reflow import actor

@actor(name="Echo", inports=["data"], outports=["data"])
def echo(context):
    return {"data": context.get_input("data")}
'''

SIZES = (("64k", 64 << 10), ("1m", 1 << 20), ("10m", 10 << 20))
RING = 16 << 20  # the default workspace.sandbox.shm_size
_ids = itertools.count(1)


async def _round_trip(w: Worker, data: bytes, path: str) -> float:
    rid = next(_ids)
    t0 = time.perf_counter()
    ref = None
    if path == "shm":
        ref = w.shm.inbound.put(data)
        if ref is None:
            raise RuntimeError(f"{len(data)} bytes do not fit the shared-memory ring")
        value, atts = {"type": "bytes", "$shm": ref}, []
    elif path == "att":
        value, atts = {"type": "bytes", "$att": 0}, [data]
    else:
        value, atts = {"type": "bytes", "value": base64.b64encode(data).decode("ascii")}, []
    await w.channel.send_with(orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "process", "params": {
        "actor_id": "Echo", "payload": {"data": value}, "config": {}, "timestamp": 0, "message_id": "m"}}), atts)
    while True:
        msg = orjson.loads(await w.channel.receive())
        if msg.get("id") == rid:
            break
    out = msg["result"]["outputs"]["data"]
    if ref is not None:
        w.shm.inbound.release(ref[3])
    if "$shm" in out:
        got = w.shm.outbound.take(out["$shm"])
    elif "$att" in out:
        got = w.channel.attachments[out["$att"]]
    else:
        got = base64.b64decode(out["value"])
    dt = time.perf_counter() - t0
    if len(got) != len(data):
        raise RuntimeError(f"echo returned {len(got)} bytes for {len(data)}")
    return dt


async def payload_round_trips(fig: Figures, reps: int) -> None:
    """Three paths on one worker with shared memory (what a Python worker gets by default):
    the ring (payloads from 64 KiB), raw attachments (below it, or when the ring is full)
    and base64 inside the JSON (the baseline)."""
    w = await BubblewrapBackend().start(WorkerSpec(runtime="python", shm_size=RING, shm_threshold=64 << 10))
    try:
        await load(w, ECHO_SOURCE, "echo.actor.py")
        for label, size in SIZES:
            data = os.urandom(size)
            n = max(2, reps // 4) if size >= 10 << 20 else reps
            for path, name in (("shm", f"ours.payload.{label}.shm"), ("att", f"ours.payload.{label}.att"),
                               ("b64", f"baseline.payload.{label}.b64")):
                # Warm: on the shared-memory path, wrap the rings twice first — a fresh ring's
                # pages fault in on first touch (a one-off per worker, not the steady state).
                for _ in range(-(-2 * RING // size) if path == "shm" else 1):
                    await _round_trip(w, data, path)
                ms = [await _round_trip(w, data, path) * 1e3 for _ in range(n)]
                p50 = pct(ms, 50)
                fig.add(f"{name}.p50", p50, "ms", ms, f"{size} bytes, echo actor, round trip")
                fig.add(f"{name}.mbps", size / 1e6 / (p50 / 1e3), "MB/s", [], "payload bytes / round-trip p50")
    finally:
        await w.aclose()
