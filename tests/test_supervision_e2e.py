"""Supervision with real crashing scripts in a real host process."""

from __future__ import annotations

import signal

import pytest
import trio

from conftest import actors, children_of, cmdline, find_actor, open_client, wait_for, wait_printed
from supervisor.client import ConnectionLost, RpcError

CRASHER = '''
import os, time
from reflow import actor

@actor(name="Crasher", inports=["how"], outports=["ok"], timeout=3, memory="256MB")
def crash(context):
    how = context.get_input("how")
    if how == "raise":
        raise ValueError("boom")
    if how == "exit":
        os._exit(7)
    if how == "segv":
        import ctypes
        ctypes.string_at(0)
    if how == "bomb":
        hog = []
        while True:
            hog.append(bytearray(50 * 2**20))
    if how == "loop":
        while True:
            pass
    return {"ok": True}
'''

STEADY = '''
from reflow import actor

@actor(name="Steady", inports=["x"], outports=["y"])
def steady(context):
    return {"y": context.get_input("x")}
'''


async def test_crash_kinds_fail_the_call_and_restart_the_worker(make_host):
    host = await make_host({"crasher.actor.py": CRASHER, "steady.actor.py": STEADY},
                           "supervision: {max_restarts: 10, max_seconds: 60}\n")
    async with open_client(host.url) as c:
        with pytest.raises(RpcError) as err:
            await c.call("Crasher", {"how": "raise"})
        assert err.value.code == -32002 and err.value.data["type"] == "ValueError"
        assert err.value.data["traceback"][-1].startswith('File "crasher.actor.py", line 9')
        assert find_actor(await c.status(), "Crasher")["restarts"] == 0  # a raise is the message's failure only

        expected = {"exit": ("exit_code", 7), "segv": ("signal", signal.SIGSEGV)}
        for restarts, (how, (key, value)) in enumerate(expected.items(), start=1):
            with pytest.raises(RpcError) as err:
                await c.call("Crasher", {"how": how})
            assert err.value.code == -32002 and err.value.data[key] == value
            assert (await c.call("Crasher", {"how": "ok"}))["outputs"]["ok"]["value"] is True
            assert find_actor(await c.status(), "Crasher")["restarts"] == restarts

        with pytest.raises(RpcError) as err:
            await c.call("Crasher", {"how": "bomb"})
        assert err.value.code == -32005 and err.value.data == {"limit": "memory"}
        assert (await c.call("Crasher", {"how": "ok"}))["outputs"]["ok"]["value"] is True
        assert find_actor(await c.status(), "Crasher")["restarts"] == 3

        with pytest.raises(RpcError) as err:
            await c.call("Crasher", {"how": "loop"})
        assert err.value.code == -32003
        assert (await c.call("Crasher", {"how": "ok"}))["outputs"]["ok"]["value"] is True
        node = find_actor(await c.status(), "Crasher")
        assert node["restarts"] == 4 and node["last_error"]["type"] == "ActorTimedOut"
        assert (await c.call("Steady", {"x": 5}))["outputs"]["y"]["value"] == 5
        assert find_actor(await c.status(), "Steady")["restarts"] == 0


async def test_exceeded_intensity_escalates_and_status_shows_it(make_host):
    host = await make_host({"crasher.actor.py": CRASHER, "steady.actor.py": STEADY},
                           "supervision: {max_restarts: 1, max_seconds: 30, backoff: {min: 1ms, max: 10ms}}\n")
    async with open_client(host.url) as c:
        crashes = 0
        while (await c.status())["state"] != "failed":
            with pytest.raises(RpcError) as err:
                await c.call("Crasher", {"how": "exit"}, timeout=10)
            assert err.value.code == -32002
            crashes += 1
            assert crashes < 10
        # network gave up twice (1 restart allowed each time), so the root gave up too.
        status = await c.status()
        network = status["children"][0]
        assert network["state"] == "failed" and status["last_error"]["type"] == "SupervisorGaveUp"
        assert "more than 1 restarts" in status["last_error"]["message"]
        with pytest.raises(RpcError) as err:
            await c.call("Steady", {"x": 1}, timeout=5)
        assert err.value.code == -32002 and "not running" in err.value.message


async def test_sigterm_drains_and_leaves_no_process_behind(make_host):
    slow = STEADY.replace('return {"y"', 'print("sleeping"); import time; time.sleep(0.5); return {"y"')
    host = await make_host({"steady.actor.py": slow})
    async with open_client(host.url) as c:
        assert (await c.call("Steady", {"x": 1}))["outputs"]["y"]["value"] == 1
        descendants = children_of(host.proc.pid)
        assert any("redis-server" in cmdline(p) for p in descendants)
        assert any("bwrap" in cmdline(p) for p in descendants)
        results = []

        async def call(i):
            results.append((await c.call("Steady", {"x": i}))["outputs"]["y"]["value"])

        async with trio.open_nursery() as n:
            n.start_soon(call, 2)
            await wait_printed(host, "sleeping", times=2)  # the call is in the worker
            host.signal(signal.SIGTERM)
    assert results == [2]
    assert await host.wait(30) == 0
    for pid in descendants:
        assert not cmdline(pid), f"left behind: {pid} {cmdline(pid)}"


def _restarts(status: dict) -> dict[str, int]:
    return {n["name"]: n["restarts"] for n in actors(status)}


@pytest.mark.parametrize("strategy,expected", [
    ("one_for_all", {"a": 1, "b": 1, "c": 1, "solo": 0}),
    ("rest_for_one", {"a": 0, "b": 1, "c": 1, "solo": 0}),
])
async def test_group_strategies_restart_exactly_the_predicted_children(make_host, strategy, expected):
    config = f"""\
network:
  processes:
    a: {{component: Crasher}}
    b: {{component: Crasher}}
    c: {{component: Crasher}}
    solo: {{component: Steady}}
supervision:
  max_restarts: 5
  max_seconds: 60
  groups:
    trio: {{members: [a, b, c], strategy: {strategy}, max_restarts: 5, max_seconds: 60}}
"""
    host = await make_host({"crasher.actor.py": CRASHER, "steady.actor.py": STEADY}, config)
    async with open_client(host.url) as c:
        pids = {n: find_actor(await c.status(), n)["pid"] for n in ("a", "b", "c", "solo")}
        with pytest.raises(RpcError):
            await c.call("b", {"how": "exit"})
        for name in ("a", "b", "c"):
            assert (await c.call(name, {"how": "ok"}, timeout=10))["outputs"]["ok"]["value"] is True
        status = await c.status()
        assert _restarts(status) == expected
        for name, n in expected.items():
            assert (find_actor(status, name)["pid"] != pids[name]) == bool(n)
        group = status["children"][0]["children"][-1]
        assert group["name"] == "trio" and group["strategy"] == strategy


async def test_second_signal_stops_at_once(make_host):
    slow = STEADY.replace('return {"y"', 'print("sleeping"); import time; time.sleep(60); return {"y"')
    host = await make_host({"steady.actor.py": slow}, "supervision: {shutdown_grace: 60s}\n")
    async with open_client(host.url) as c:
        descendants = children_of(host.proc.pid)
        async with trio.open_nursery() as n:
            async def call():
                with pytest.raises((RpcError, ConnectionLost)):
                    await c.call("Steady", {"x": 1})
            n.start_soon(call)
            await wait_printed(host, "sleeping")  # the call is in the worker
            host.signal(signal.SIGTERM)
            await wait_for(lambda: "draining in-flight messages" in host.output())
            assert host.proc.poll() is None
            host.signal(signal.SIGINT)
            assert await host.wait(5) == 0
            assert "second signal: stopping now" in host.output()  # not the drain ending on its own
            n.cancel_scope.cancel()
    for pid in descendants:
        assert not cmdline(pid), f"left behind: {pid} {cmdline(pid)}"


async def test_a_group_that_gives_up_is_restarted_by_its_parent_while_others_serve(make_host):
    config = """\
network:
  processes:
    a: {component: Crasher}
    solo: {component: Steady}
supervision:
  max_restarts: 5
  max_seconds: 60
  groups:
    g: {members: [a], max_restarts: 0, max_seconds: 60}
"""
    host = await make_host({"crasher.actor.py": CRASHER, "steady.actor.py": STEADY}, config)
    async with open_client(host.url) as c:
        solo_pid = find_actor(await c.status(), "solo")["pid"]
        with pytest.raises(RpcError):
            await c.call("a", {"how": "exit"})
        status = await wait_for(c.status)
        assert (await c.call("a", {"how": "ok"}, timeout=10))["outputs"]["ok"]["value"] is True
        status = await c.status()
        network = status["children"][0]
        group = next(n for n in network["children"] if n["name"] == "g")
        assert group["restarts"] == 1 and group["last_error"]["type"] == "SupervisorGaveUp"
        assert find_actor(status, "solo")["pid"] == solo_pid and find_actor(status, "solo")["restarts"] == 0
        assert (await c.call("solo", {"x": 3}))["outputs"]["y"]["value"] == 3


SPLIT = '''
from reflow import actor

@actor(name="Split", inports=["x"], outports=["a", "b"])
def split(context):
    return {"a": context.get_input("x"), "b": context.get_input("x")}
'''
TICK = '''
from reflow import actor

@actor(name="Tick", inports=["x"], outports=[])
def tick(context):
    return {}
'''
STUCK = '''
import time
from reflow import actor

@actor(name="Stuck", inports=["x"], outports=[])
def stuck(context):
    time.sleep(60)
'''


async def _small_memory_mailboxes(make_host, scripts: dict, config: str):
    """A host with memory mailboxes of room 2 (so that routing soon waits for room)."""
    host = await make_host(scripts, config, start=False)
    host.config.write_text(host.config.read_text().replace(
        "  root: .\n", "  root: .\n  mailbox: {kind: memory, max_pending: 2}\n"))
    await host.start()
    return host


async def test_a_restart_while_routing_to_a_full_mailbox_delivers_nothing_twice(make_host):
    """Split routes each message to Tick, then to Stuck, whose worker never finishes and
    whose mailbox fills. A message's routing then blocks after Tick got its copy; killing
    Split's worker there cancels it, and the run's exit finishes the routing: Tick's copy
    must not be delivered a second time."""
    host = await _small_memory_mailboxes(make_host, {"split.actor.py": SPLIT, "tick.actor.py": TICK,
                                                     "stuck.actor.py": STUCK}, """\
network:
  processes:
    split: {component: Split}
    tick: {component: Tick}
    stuck: {component: Stuck}
  connections:
    - {src: {process: split, port: a}, tgt: {process: tick, port: x}}
    - {src: {process: split, port: b}, tgt: {process: stuck, port: x}}
""")
    async with open_client(host.url) as c:
        sent = 0
        with trio.fail_after(60):
            while True:  # each call returns once both copies are routed, until Stuck is full
                sent += 1
                try:
                    await c.call("split", {"x": sent}, timeout=1)
                except RpcError as exc:
                    assert exc.code == -32003, exc  # timed out: its routing is blocked
                    break
            assert sent > 3
            await c.request("actor.restart", {"actor": "split"})
            await wait_for(lambda: _restarted(c, "split"), timeout=30)
            await c.call("tick", {"x": "last"})  # behind anything already in Tick's mailbox
        assert find_actor(await c.status(), "tick")["processed"] == sent + 1


async def _restarted(c, name: str) -> bool:
    node = find_actor(await c.status(), name)
    return node["restarts"] >= 1 and node["state"] == "running"


JOIN = '''
import time
from reflow import actor

@actor(name="Join", inports=["a", "b"], outports=["out"], await_all_inports=True, timeout=2)
def join(context):
    a, b = context.get_input("a"), context.get_input("b")
    if a == 1:
        time.sleep(60)  # held until its 2 s timeout, while the mailbox fills behind it
    return {"out": [a, b]}
'''


async def test_a_restart_while_routing_to_a_full_fan_in_mailbox_loses_no_set(make_host):
    """Split sends each value to both inports of Join (await_all_inports, memory mailboxes).
    Join holds the first set, its mailbox fills, and Split's routing of the fourth set waits
    for room; restarting Split there cancels that wait. The set must still reach Join, once,
    and the sets after it must still pair a with b."""
    host = await _small_memory_mailboxes(make_host, {"split.actor.py": SPLIT, "join.actor.py": JOIN}, """\
network:
  processes:
    split: {component: Split}
    join: {component: Join}
  connections:
    - {src: {process: split, port: a}, tgt: {process: join, port: a}}
    - {src: {process: split, port: b}, tgt: {process: join, port: b}}
""")
    async with open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "join", "port": "out"})
        outputs = c.on_notification(sub["subscription"])
        with trio.fail_after(60):
            for x in (1, 2, 3):  # 1 held in Join's worker, 2 and 3 fill its mailbox
                await c.call("split", {"x": x})
            try:
                await c.call("split", {"x": 4}, timeout=1)
            except RpcError as exc:
                assert exc.code == -32003, exc  # timed out: its routing waits for room
            else:
                raise AssertionError("the routing of the fourth set did not wait")
            await c.request("actor.restart", {"actor": "split"})
            await wait_for(lambda: _restarted(c, "split"), timeout=30)
            await c.call("split", {"x": 5})
            seen = [(await outputs.receive())["params"]["message"]["value"] for _ in range(4)]
    assert seen == [[x, x] for x in (2, 3, 4, 5)], seen
