"""Warm worker pools, one per runtime.

``preload_count`` workers per runtime are kept started and ready (interpreter
and SDK loaded, handshake done), so taking one costs a list pop instead of a
sandbox start. ``max_size`` caps the live sandboxes of a runtime (warm plus
serving); ``idle_timeout`` retires warm workers beyond ``preload_count``.
A worker leaves the pool for exactly one actor and is never taken back.

The host is ready before its pools are full (filling them takes seconds and
nothing waits for it): ``status()`` says each runtime's ``state`` —
``warming`` until ``preload_count`` workers are warm, then ``warm``;
``failing`` while its last start failed — and the pool logs at info when a
runtime that was not warm when the host got ready becomes warm.
"""

from __future__ import annotations

import logging
import time

import trio

from ._sandbox._base import SandboxBackend, Worker, WorkerSpec, WorkerStartError

__all__ = ["WorkerPool"]

log = logging.getLogger("supervisor.pool")

# Seconds a refill waits after an acquire before starting the replacement (see ``_refill``).
REFILL_DELAY = 0.005


class _RuntimePool:
    def __init__(self, runtime: str, spec: WorkerSpec, preload: int, max_size: int):
        self.runtime = runtime
        self.spec = spec
        self.preload = preload
        self.warm: list[tuple[Worker, float]] = []
        self.limiter = trio.Semaphore(max_size)
        self.max_size = max_size
        self.wanted = trio.Event()
        self.started = 0
        self.failed_starts = 0
        self.last_error: str | None = None
        self.created = time.monotonic()
        self.announce = False   # log when warm (set by ``readiness`` for a runtime not warm yet)

    @property
    def state(self) -> str:
        if self.failed_starts:
            return "failing"
        return "warm" if len(self.warm) >= self.preload else "warming"

    @property
    def live(self) -> int:
        return self.max_size - self.limiter.value


class WorkerPool:
    def __init__(self, backend: SandboxBackend, specs: dict[str, WorkerSpec], *,
                 preload: int, max_size: int, idle_timeout: float):
        self.backend = backend
        self._pools = {rt: _RuntimePool(rt, spec, preload, max_size) for rt, spec in specs.items()}
        self.idle_timeout = idle_timeout
        self._max_size = max_size
        self._closed = False

    def add_runtime(self, runtime: str, spec: WorkerSpec) -> None:
        """Serve ``runtime`` too (a script of a new language appeared); no workers are preloaded."""
        if runtime not in self._pools:
            self._pools[runtime] = _RuntimePool(runtime, spec, 0, self._max_size)

    def status(self) -> dict:
        return {rt: {"state": p.state, "warm": len(p.warm), "preload": p.preload, "live": p.live,
                     "max_size": p.max_size, "started": p.started, "failed_starts": p.failed_starts,
                     "last_error": p.last_error}
                for rt, p in self._pools.items()}

    def readiness(self) -> str:
        """How warm each runtime is, for the host's ready line: ``python 3/5 warm (warming), …``.

        From then on, each runtime that was not warm logs at info once it is.
        """
        for p in self._pools.values():
            p.announce = p.state != "warm"
        return ", ".join(f"{rt} {len(p.warm)}/{p.preload} warm" + ("" if p.state == "warm" else f" ({p.state})")
                         for rt, p in self._pools.items()) or "no runtimes"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep each runtime's warm set filled until cancelled; close every warm worker on exit."""
        try:
            async with trio.open_nursery() as nursery:
                for p in self._pools.values():
                    p.created = time.monotonic()
                    nursery.start_soon(self._refill, p)
                task_status.started()
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                for p in self._pools.values():
                    while p.warm:
                        w, _ = p.warm.pop()
                        await w.aclose()
                        p.limiter.release()

    async def _refill(self, p: _RuntimePool) -> None:
        while True:
            if p.wanted.is_set():
                # Woken by an acquire: let the taker's first requests (its ``load``) run before
                # this start's synchronous spawn work and the new sandbox's boot take the CPU.
                await trio.sleep(REFILL_DELAY)
            while len(p.warm) < p.preload and p.limiter.value > 0 and p.failed_starts < 3:
                p.limiter.acquire_nowait()
                try:
                    w = await self._start(p)
                except WorkerStartError:
                    p.limiter.release()
                    await trio.sleep(min(5.0, 0.1 * 2 ** p.failed_starts))
                    continue
                p.warm.append((w, time.monotonic()))
                if p.announce and len(p.warm) >= p.preload:
                    p.announce = False
                    log.info("pool %s warm", p.runtime, extra={"warm": len(p.warm),
                                                               "seconds": round(time.monotonic() - p.created, 2)})
            p.wanted = trio.Event()
            with trio.move_on_after(max(1.0, self.idle_timeout / 4)):
                await p.wanted.wait()
            self._retire_idle(p)
            if p.failed_starts >= 3:
                p.failed_starts = 2  # retry one start per period

    def _retire_idle(self, p: _RuntimePool) -> None:
        now = time.monotonic()
        while len(p.warm) > p.preload and now - p.warm[0][1] > self.idle_timeout:
            w, _ = p.warm.pop(0)
            w.kill()
            p.limiter.release()

    async def _start(self, p: _RuntimePool) -> Worker:
        try:
            w = await self.backend.start(p.spec)
        except WorkerStartError as exc:
            p.failed_starts += 1
            p.last_error = str(exc)
            log.error("could not start a %s worker: %s", p.runtime, exc)
            raise
        p.failed_starts = 0
        p.started += 1
        return w

    async def acquire(self, runtime: str) -> Worker:
        """A warm worker for ``runtime`` (started now if none is warm).

        Waits while ``max_size`` sandboxes of that runtime are live.
        Raises WorkerStartError, SandboxUnavailable.
        """
        p = self._pools[runtime]
        while p.warm:
            w, _ = p.warm.pop()
            p.wanted.set()
            if w.exit_info is None:
                return w
            p.limiter.release()
        await p.limiter.acquire()
        p.wanted.set()
        try:
            return await self._start(p)
        except BaseException:
            p.limiter.release()
            raise

    def release(self, worker: Worker) -> None:
        """A worker taken with ``acquire`` is gone (closed by its cell)."""
        p = self._pools.get(worker.runtime)
        if p is not None:
            p.limiter.release()
            p.wanted.set()
