"""Chaos: N messages through a two-actor durable graph while workers, and once the host
itself, are SIGKILLed. Each message adds 1 to a counter: at the end it is exactly N and
nothing is dead-lettered. The short run is part of `make test`; `make soak` runs the long one.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import trio

from conftest import actors, open_client, wait_for

RELAY = '''
import time
from reflow import actor

@actor(name="Relay", inports=["n"], outports=["n"])
def relay(context):
    time.sleep(0.002)
    return {"n": context.get_input("n")}
'''

ADDER = '''
import time
from reflow import actor

@actor(name="Adder", inports=["n"], outports=["total"])
def add(context):
    total = context.get_state().increment("total", context.get_input("n"))
    time.sleep(0.003)  # the kill often lands between the state write and the commit
    return {"total": total}
'''

# Kills are the point here, so the restart intensity and the delivery budget are set
# high: this proves nothing is lost or doubled, not how a poison message is handled.
CONFIG = """\
network:
  processes:
    Relay: {component: Relay}
    Adder: {component: Adder}
  connections:
    - {src: {process: Relay, port: n}, tgt: {process: Adder, port: n}}
supervision:
  max_restarts: 10000
  max_seconds: 1
  backoff: {max: 100ms}
  actors:
    Relay: {max_deliveries: 1000}
    Adder: {max_deliveries: 1000}
"""


def _pids(status: dict) -> list[int]:
    return [n["pid"] for n in actors(status) if n.get("pid")]


async def _send(url: str, values: range) -> None:
    async with open_client(url) as c:
        limit = trio.Semaphore(16)

        async def one(i: int) -> None:
            async with limit:
                await c.send("Relay", "n", 1)

        async with trio.open_nursery() as nursery:
            for i in values:
                nursery.start_soon(one, i)


async def _kill_workers(url: str, rng: random.Random, kills: list[int]) -> None:
    """SIGKILL a random live worker every 20–150 ms until cancelled."""
    async with open_client(url) as c:
        while True:
            await trio.sleep(rng.uniform(0.02, 0.15))
            pids = _pids(await c.status())
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass


async def _chaos(make_host, n: int, seed: int, timeout: float) -> None:
    rng = random.Random(seed)
    host = await make_host({"relay.actor.py": RELAY, "adder.actor.py": ADDER}, CONFIG)
    r = host.redis()

    def total() -> int:
        return int(r.get("reflow:Adder:state:total") or 0)

    kills: list[int] = []
    half = n // 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_kill_workers, host.url, rng, kills)
        await _send(host.url, range(half))
        await wait_for(lambda: total() >= half // 3, timeout=timeout)  # mid-stream
        nursery.cancel_scope.cancel()
    assert total() < n, "the host kill must land mid-stream"
    r.close()  # the embedded Redis dies with the host
    host.proc.kill()  # the host itself, with work in its mailboxes and its workers
    await host.wait()
    await host.start()
    r = host.redis()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_kill_workers, host.url, rng, kills)
        await _send(host.url, range(half, n))
        await wait_for(lambda: total() >= n, timeout=timeout)
        nursery.cancel_scope.cancel()
    # Quiet: both inboxes drained, nothing pending, and the count did not overshoot.
    await wait_for(lambda: r.xlen("reflow:Relay:inbox") == 0 and r.xlen("reflow:Adder:inbox") == 0, timeout=30)
    assert total() == n, f"counter {total()} != {n} after {len(kills)} worker kills"
    assert r.xlen("reflow:deadletter") == 0, r.xrange("reflow:deadletter")
    assert len(kills) >= 3, "the chaos never happened"
    async with open_client(host.url) as c:
        status = await c.status()
    assert status["state"] == "running"


async def test_chaos_short(make_host):
    await _chaos(make_host, n=200, seed=1, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", [2, 3, 4])
async def test_chaos_soak(make_host, seed):
    await _chaos(make_host, n=3000, seed=seed, timeout=600)
