"""Supervisor.restart_child (actor.restart) of a running child, on the real tree.

The child here stands in for an actor cell at the one point that matters: ``interrupt()``
kills its worker, but the run only notices a while later (as a cell notices its sandbox's
death once it is reaped), and until then it still takes messages, which then fail with the
kill. restart_child must answer only once that run is over and the next one serves, so that
a message sent after the answer is served, not failed.
"""

from __future__ import annotations

import math

import pytest
import trio

from supervisor._tree import Supervisor
from supervisor.core import policy

REAP_DELAY = 1.0  # (virtual) seconds between the kill and the run seeing its worker dead


class KilledChild:
    kind = "actor"
    restart_type = policy.RestartType.TEMPORARY  # (actor.restart restarts it all the same)

    def __init__(self, name: str):
        self.name = name
        self.runs = 0
        self.started = [trio.Event() for _ in range(8)]  # started[n]: run n + 1 serves
        self.ended = [trio.Event() for _ in range(8)]
        self._send, self._recv = trio.open_memory_channel[tuple[str, trio.MemorySendChannel]](math.inf)
        self.killed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        me = self.runs
        self.killed = killed = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                async def reap() -> None:
                    await killed.wait()
                    await trio.sleep(REAP_DELAY)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(reap)
                task_status.started()
                self.started[me - 1].set()
                async for msg, reply in self._recv:
                    # A message the dying run takes fails with the kill, as in ActorCell._run.
                    reply.send_nowait((me, "killed by SIGKILL" if killed.is_set() else msg))
        finally:
            self.ended[me - 1].set()
        raise RuntimeError(f"{self.name} was killed by SIGKILL")

    def interrupt(self) -> bool:
        self.killed.set()
        return True

    async def call(self, msg: str) -> tuple[int, str]:
        send, recv = trio.open_memory_channel[tuple[int, str]](1)
        self._send.send_nowait((msg, send))
        return await recv.receive()

    def status(self) -> dict:
        return {"name": self.name}

    def on_stopped(self, error: BaseException | None) -> None:
        pass


@pytest.fixture
def child() -> KilledChild:
    return KilledChild("y")


async def test_restart_answers_once_the_new_incarnation_serves(child, autojump_clock):
    sup = Supervisor("s", policy.Policy(), [child])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert await child.call("ping") == (1, "ping")
        with trio.fail_after(REAP_DELAY * 10):
            await sup.restart_child("y")
        assert child.ended[0].is_set() and child.started[1].is_set()
        # Sent after the answer: served by the new incarnation, never failed by the old one.
        assert await child.call("ping") == (2, "ping")
        node = sup.status()["children"][0]
        assert (node["state"], node["restarts"], node["last_restart_cause"]) == ("running", 1, "actor.restart")
        nursery.cancel_scope.cancel()


async def test_a_cancelled_restart_still_restarts(child, autojump_clock):
    sup = Supervisor("s", policy.Policy(), [child])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with trio.move_on_after(REAP_DELAY / 2) as scope:  # (the client went away)
            await sup.restart_child("y")
        assert scope.cancelled_caught
        with trio.fail_after(REAP_DELAY * 10):
            await child.started[1].wait()
        assert await child.call("ping") == (2, "ping")
        assert sup.status()["children"][0]["restarts"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["stop_children", "remove_child"])
async def test_a_stop_that_overtakes_the_kill_ends_the_wait(child, how, autojump_clock):
    sup = Supervisor("s", policy.Policy(), [child])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        done = trio.Event()

        async def restart() -> None:
            await sup.restart_child("y")
            done.set()

        nursery.start_soon(restart)
        await child.killed.wait()  # the kill is sent; its run sees it REAP_DELAY later
        assert not done.is_set() and not child.ended[0].is_set()
        if how == "stop_children":
            await sup.stop_children()
        else:
            await sup.remove_child("y")
        with trio.fail_after(REAP_DELAY * 10):
            await done.wait()
        assert child.runs == 1  # stopped on purpose: nothing started it again
        nursery.cancel_scope.cancel()
