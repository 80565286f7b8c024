"""Large payloads: a bytes message host → sandboxed Python worker → host, as raw channel
attachments (what the host does) beside the same payload as base64 inside the JSON frame
(the baseline: what every byte cost before), in the same run, on the same worker."""

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
_ids = itertools.count(1)


async def _round_trip(w: Worker, data: bytes, raw: bool) -> float:
    rid = next(_ids)
    if raw:
        value, atts = {"type": "bytes", "$att": 0}, [data]
    else:
        value, atts = {"type": "bytes", "value": base64.b64encode(data).decode("ascii")}, []
    t0 = time.perf_counter()
    await w.channel.send_with(orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "process", "params": {
        "actor_id": "Echo", "payload": {"data": value}, "config": {}, "timestamp": 0, "message_id": "m"}}), atts)
    while True:
        msg = orjson.loads(await w.channel.receive())
        if msg.get("id") == rid:
            break
    out = msg["result"]["outputs"]["data"]
    got = w.channel.attachments[out["$att"]] if "$att" in out else base64.b64decode(out["value"])
    dt = time.perf_counter() - t0
    if len(got) != len(data):
        raise RuntimeError(f"echo returned {len(got)} bytes for {len(data)}")
    return dt


async def payload_round_trips(fig: Figures, reps: int) -> None:
    w = await BubblewrapBackend().start(WorkerSpec(runtime="python"))
    try:
        await load(w, ECHO_SOURCE, "echo.actor.py")
        for label, size in SIZES:
            data = os.urandom(size)
            n = max(2, reps // 4) if size >= 10 << 20 else reps
            for raw, name in ((True, f"ours.payload.{label}.att"), (False, f"baseline.payload.{label}.b64")):
                await _round_trip(w, data, raw)  # warm
                ms = [await _round_trip(w, data, raw) * 1e3 for _ in range(n)]
                p50 = pct(ms, 50)
                fig.add(f"{name}.p50", p50, "ms", ms, f"{size} bytes, echo actor, round trip")
                fig.add(f"{name}.mbps", size / 1e6 / (p50 / 1e3), "MB/s", [], "payload bytes / round-trip p50")
    finally:
        await w.aclose()
