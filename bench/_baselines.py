"""Baselines: a plain pipe round trip, the bare floor, per-call sandboxed execution, Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import orjson
import trio

from supervisor._sandbox._base import WorkerSpec
from supervisor._sandbox._bubblewrap import BubblewrapBackend
from supervisor.client import open_client

from ._load import Call, throughput
from ._stats import Figures
from ._workers import DOUBLE_SOURCE, load_and_process

__all__ = ["RAY_FIGURES", "RayActor", "RayUnavailable", "open_floor", "open_ray", "per_call", "pipe_round_trip"]

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


@asynccontextmanager
async def open_floor() -> AsyncIterator[Call]:
    """The bare trio-websocket relay (bench/_floor_server.py) in its own process, and a
    ``call(i)`` that doubles ``i`` through it (through the same client as our figures)."""
    server = Path(__file__).with_name("_floor_server.py")
    proc = subprocess.Popen([sys.executable, str(server)], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        async with open_client(f"ws://127.0.0.1:{port}/") as c:
            async def call(i: int) -> object:
                r = await c.request("double", {"value": i})
                assert r["value"] == 2 * i, r
                return r

            yield call
    finally:
        proc.kill()
        proc.wait()


async def per_call(fig: Figures, n: int) -> None:
    """A fresh bubblewrap-sandboxed interpreter per message: start, load, process, close."""
    backend = BubblewrapBackend()
    spec = WorkerSpec(runtime="python")

    async def one(i: int) -> None:
        w = await backend.start(spec)
        try:
            out = await load_and_process(w, DOUBLE_SOURCE, i)
        finally:
            await w.aclose()
        assert out == 2 * i, out

    samples = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        await one(i)
        if i:  # the first start pays for ldd and page cache
            samples.append(time.perf_counter() - t0)
    fig.latency("baseline.per_call", samples, "fresh bwrap sandbox per message (start+load+process+close)")
    # Its best throughput here: one message per core at a time (more only queue for the CPUs).
    rate, _ = await throughput(one, n, 2)
    fig.add("baseline.per_call.throughput2", rate, "msgs/s", note="fresh bwrap sandbox per message, 2 in flight")


RAY_BENCH = r"""
import json, os, sys, time
import ray

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0

def descendants(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k); todo.append(k)
    return out

total = int(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
@ray.remote
class Double:
    def double(self, x):
        return 2 * x
    def pid(self):
        return os.getpid()
a = Double.remote()
for i in range(300):
    assert ray.get(a.double.remote(i)) == 2 * i
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:  # "lat K W": W unrecorded calls, then K timed ones; anything else: the rest
    cmd = line.split()
    if not cmd or cmd[0] != "lat":
        break
    for i in range(int(cmd[2])):
        ray.get(a.double.remote(i))
    lat = []
    for i in range(int(cmd[1])):
        t0 = time.perf_counter(); ray.get(a.double.remote(i)); lat.append(time.perf_counter() - t0)
    print(json.dumps(lat), flush=True)
t0 = time.perf_counter()
for i in range(total):
    ray.get(a.double.remote(i))
seq = total / (time.perf_counter() - t0)
t0 = time.perf_counter(); got = ray.get([a.double.remote(i) for i in range(total)]); batched = total / (time.perf_counter() - t0)
assert got[-1] == 2 * (total - 1)
actor_pid = ray.get(a.pid.remote())
actor_rss = rss(actor_pid)
procs = [p for p in descendants(os.getpid()) if p != actor_pid]
system_rss = 0
for p in procs:
    try:
        system_rss += rss(p)
    except OSError:
        pass
print(json.dumps({"seq": seq, "batched": batched, "version": ray.__version__,
                  "actor_rss": actor_rss, "others_rss": system_rss, "others": len(procs)}))
ray.shutdown()
"""

RAY_FIGURES = ("ray.latency.p50", "ray.latency.p99", "ray.throughput_seq", "ray.throughput_batched", "ray.actor_rss")


class RayUnavailable(Exception):
    """Ray cannot run here; ``reason`` says why (the report shows it in place of its figures)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RayActor:
    """A Ray actor doubling numbers, in its own interpreter running RAY_BENCH.

    Between its turns Ray is stopped (SIGSTOP to every process of its session: driver,
    raylet, GCS, agents, workers), so that its daemons, which take ~10 % of a core while
    idle here, do not run during ours; each turn continues it first and warms it up."""

    def __init__(self, proc: subprocess.Popen, stderr: IO[bytes]):
        self._proc = proc
        self._stderr = stderr  # a file, not a pipe: Ray's logging must never fill a pipe and stall it

    async def _line(self, timeout: float) -> bytes:
        assert self._proc.stdout is not None
        with trio.move_on_after(timeout):
            line = await trio.to_thread.run_sync(self._proc.stdout.readline, abandon_on_cancel=True)
            if line:
                return line
            raise RayUnavailable(f"Ray failed here (exit {self._proc.wait()}): {self._stderr_tail()}")
        raise RayUnavailable(f"Ray did not answer within {timeout:g} s")

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return " ".join(self._stderr.read().decode(errors="replace").strip().splitlines()[-3:])[-300:]

    def _say(self, line: str) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    async def _answer(self, timeout: float) -> Any:
        """The next JSON line on Ray's stdout; Ray prints lines of its own there too."""
        while True:
            line = await self._line(timeout)
            try:
                return orjson.loads(line)
            except orjson.JSONDecodeError:
                continue

    def pause(self) -> None:
        _signal_session(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_session(self._proc.pid, signal.SIGCONT)

    async def latency(self, k: int, warmup: int) -> list[float]:
        """Seconds per ``ray.get(actor.double.remote(i))``, ``k`` of them, one at a time,
        after ``warmup`` unrecorded ones; Ray runs only for the turn."""
        self.resume()
        try:
            self._say(f"lat {k} {warmup}")
            return await self._answer(120)
        finally:
            self.pause()

    async def finish(self) -> dict:
        """The sequential and batched rates and the RSS figures; Ray then shuts down."""
        self.resume()
        self._say("done")
        return await self._answer(600)


@asynccontextmanager
async def open_ray(total: int) -> AsyncIterator[RayActor]:
    """Ray in a separate interpreter (``ray.init(num_cpus=2)``), if ``import ray`` works here:
    ``make bench`` installs it into the bench environment; nothing else does. ``total``:
    calls for the sequential and batched rates.

    Raises:
        RayUnavailable: Ray is not installed, failed or did not answer in time.
    """
    probe = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise RayUnavailable("Ray is not installed in this environment (`make bench` installs ray>=2.9; "
                             f"import failed: {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else '?'})")
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-c", RAY_BENCH, str(total)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            ray = RayActor(proc, stderr)
            await ray._answer(600)  # {"ready": true}
            ray.pause()
            yield ray
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            # Ray's daemons (raylet, GCS, agents) outlive a driver that was killed instead of
            # calling ray.shutdown(), and would load the machine for every later figure.
            _signal_session(proc.pid, signal.SIGKILL)


def _signal_session(sid: int, sig: int) -> None:
    """Send ``sig`` to every process of session ``sid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # (field 6 of stat: the session id)
                os.kill(int(entry), sig)
        except (OSError, ValueError, IndexError):
            continue
