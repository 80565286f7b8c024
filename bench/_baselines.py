"""Baselines: a plain pipe round trip, the bare floor, per-call sandboxed execution, Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import trio

from supervisor._sandbox._base import WorkerSpec
from supervisor._sandbox._bubblewrap import BubblewrapBackend
from supervisor.client import open_client

from ._load import latency, throughput
from ._stats import Figures
from ._workers import DOUBLE_SOURCE, load_and_process

__all__ = ["floor", "per_call", "pipe_round_trip", "ray_actors"]

ECHO = "import sys\nr, w = sys.stdin.buffer, sys.stdout.buffer\nfor line in r:\n    w.write(line); w.flush()\n"


def pipe_round_trip(fig: Figures, n: int, warmup: int) -> None:
    """A long-lived child echoing lines; one line in flight. Raw fds: no buffering layer on our side."""
    p = subprocess.Popen([sys.executable, "-I", "-S", "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    wfd, rfd = p.stdin.fileno(), p.stdout.fileno()
    line = b'{"id":1,"value":21}\n'
    samples = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            os.write(wfd, line)
            got = b""
            while not got.endswith(b"\n"):
                got += os.read(rfd, 4096)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    finally:
        p.kill()
        p.wait()
    fig.latency("baseline.pipe_rtt", samples, "plain pipe round trip to a long-lived child echoing lines")


async def floor(fig: Figures, n: int, warmup: int, total: int) -> None:
    """The bare trio-websocket relay (bench/_floor_server.py) in its own process."""
    server = Path(__file__).with_name("_floor_server.py")
    proc = subprocess.Popen([sys.executable, str(server)], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        async with open_client(f"ws://127.0.0.1:{port}/") as c:
            async def call(i: int) -> object:
                r = await c.request("double", {"value": i})
                assert r["value"] == 2 * i, r
                return r

            fig.latency("baseline.floor.latency", await latency(call, n, warmup),
                        "bare trio-websocket server → pipe → long-lived child, 1 in flight")
            fig.add("baseline.floor.throughput32", await throughput(call, total, 32), "calls/s", note="32 in flight")
    finally:
        proc.kill()
        proc.wait()


async def per_call(fig: Figures, n: int) -> None:
    """A fresh bubblewrap-sandboxed interpreter per message: start, load, process, close."""
    backend = BubblewrapBackend()
    spec = WorkerSpec(runtime="python")
    samples = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        w = await backend.start(spec)
        try:
            out = await load_and_process(w, DOUBLE_SOURCE, i)
        finally:
            await w.aclose()
        assert out == 2 * i, out
        if i:  # the first start pays for ldd and page cache
            samples.append(time.perf_counter() - t0)
    fig.latency("baseline.per_call", samples, "fresh bwrap sandbox per message (start+load+process+close)")


RAY_BENCH = r"""
import json, sys, time
import ray
n, total = int(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
@ray.remote
class Double:
    def double(self, x):
        return 2 * x
a = Double.remote()
for i in range(50):
    ray.get(a.double.remote(i))
lat = []
for i in range(n):
    t0 = time.perf_counter(); ray.get(a.double.remote(i)); lat.append(time.perf_counter() - t0)
t0 = time.perf_counter(); ray.get([a.double.remote(i) for i in range(total)]); batched = total / (time.perf_counter() - t0)
print(json.dumps({"lat": lat, "batched": batched}))
ray.shutdown()
"""


def ray_actors(fig: Figures, n: int, total: int) -> None:
    """Ray actor calls in a separate interpreter, only if ``import ray`` works here (never installed by us)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        for name in ("ray.latency.p50", "ray.latency.p99", "ray.throughput_seq", "ray.throughput_batched"):
            fig.skip(name, "not installed")
        return
    out = subprocess.run([sys.executable, "-c", RAY_BENCH, str(n), str(total)], capture_output=True, timeout=300)
    if out.returncode != 0:
        fig.skip("ray.latency.p50", f"ray failed: {out.stderr.decode()[-300:]}")
        return
    data = orjson.loads(out.stdout.splitlines()[-1])
    fig.latency("ray.latency", data["lat"], "ray.init(num_cpus=2), ray.get per call")
    fig.add("ray.throughput_seq", len(data["lat"]) / sum(data["lat"]), "calls/s")
    fig.add("ray.throughput_batched", data["batched"], "calls/s", note="ray.get of a list")
