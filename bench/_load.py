"""Load shapes shared by every WebSocket target: sequential latency, N-in-flight throughput, batch frames."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import trio
import trio_websocket

__all__ = ["batch_throughput", "latency", "take_turns", "throughput"]

Call = Callable[[int], Awaitable[object]]
T = TypeVar("T")


async def take_turns(sides: dict[str, Callable[[int], Awaitable[T]]], rounds: int) -> dict[str, list[T]]:
    """Each side's ``turn(r)`` for r in range(rounds), the sides alternating which goes
    first, so that a baseline and ours meet the same minutes of the machine's noise."""
    out: dict[str, list[T]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(await sides[name](r))
    return out


async def latency(call: Call, n: int, warmup: int) -> list[float]:
    """Seconds per call, one call in flight at a time (after ``warmup`` unrecorded calls)."""
    for i in range(warmup):
        await call(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t0)
    return out


async def throughput(call: Call, total: int, inflight: int) -> tuple[float, list[float]]:
    """Calls per second with ``inflight`` concurrent callers sharing ``total`` calls, and
    each call's latency in seconds (as seen with that many in flight)."""
    counter = itertools.count()
    took: list[float] = []

    async def worker() -> None:
        while (i := next(counter)) < total:
            t = time.perf_counter()
            await call(i)
            took.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(inflight):
            n.start_soon(worker)
    return total / (time.perf_counter() - t0), took


async def batch_throughput(url: str, make_request: Callable[[int], dict], batches: int, size: int,
                           outstanding: int = 4) -> float:
    """Messages per second sending ``batches`` JSON-RPC batch frames of ``size`` requests,
    at most ``outstanding`` frames unanswered. Raises RuntimeError if any reply is an error."""
    total = batches * size
    window = trio.Semaphore(outstanding)
    done = trio.Event()
    errors: list[dict] = []

    async with trio_websocket.open_websocket_url(url, max_message_size=64 * 2**20) as ws:
        async def reader() -> None:
            got = 0
            while got < total:
                msg = orjson.loads(await ws.get_message())
                items = msg if isinstance(msg, list) else [msg]
                before, got = got, got + len(items)
                errors.extend(it["error"] for it in items if "error" in it)
                for _ in range(got // size - before // size):
                    window.release()
            done.set()

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            rid = 0
            for _ in range(batches):
                await window.acquire()
                frame = []
                for _ in range(size):
                    rid += 1
                    frame.append(make_request(rid))
                await ws.send_message(orjson.dumps(frame).decode())
            await done.wait()
        elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} batch items failed, e.g. {errors[0]}")
    return total / elapsed
