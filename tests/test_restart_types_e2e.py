"""OTP restart types, normal exits, actor.restart and restart causes, through a real host.

A normal exit is a worker that ends by itself with status 0: the SDK's ``context.stop()``,
``sys.exit(0)`` / ``process.exit(0)`` during a message (after answering it), or a bare
``os._exit(0)``. permanent children are restarted after any exit, transient ones only after
an abnormal one, temporary ones never (they leave the tree).
"""

from __future__ import annotations

import pytest

from conftest import find_actor, open_client, run_cli, wait_for
from supervisor.client import RpcError

STOPPER = '''
import os, sys
from reflow import actor

@actor(name="Stopper", inports=["how"], outports=["ok"], timeout=5)
def stopper(context):
    how = context.get_input("how")
    if how == "stop":
        context.get_state().set("stopped", True)
        context.stop()
        return {"ok": "bye"}
    if how == "stop-why":
        context.stop("work done")
        return {"ok": "bye"}
    if how == "exit0":
        context.send_output("ok", "before exit")
        sys.exit(0)
    if how == "exit3":
        sys.exit(3)
    if how == "osexit0":
        os._exit(0)
    if how == "crash":
        os._exit(7)
    return {"ok": how}
'''

JSTOP = '''
@actor({name: "JStop", inports: ["how"], outports: ["ok"]})
async function jstop(context) {
  const how = context.getInput("how");
  if (how === "stop") { context.stop(); return { ok: "bye" }; }
  if (how === "exit0") { process.exit(0); }
  if (how === "exit5") { process.exit(5); }
  return { ok: how };
}
'''

NETWORK = """\
network:
  processes:
    t: {component: Stopper}
    p: {component: Stopper}
    x: {component: Stopper}
    y: {component: Stopper}
    jt: {component: JStop}
supervision:
  max_restarts: 20
  max_seconds: 60
  backoff: {min: 1ms, max: 10ms}
  actors:
    t: {restart: transient}
    x: {restart: temporary}
    y: {restart: temporary}
    jt: {restart: transient}
"""


async def _state(c, name: str) -> str | None:
    node = find_actor(await c.status(), name)
    return node and node["state"]


async def _ok(c, name: str) -> None:
    assert (await c.call(name, {"how": "ping"}, timeout=20))["outputs"]["ok"]["value"] == "ping"


@pytest.fixture
async def host(make_host):
    return await make_host({"stopper.actor.py": STOPPER, "jstop.actor.js": JSTOP}, NETWORK)


async def test_transient_stops_after_a_normal_exit_and_restarts_after_a_crash(host):
    async with open_client(host.url) as c:
        # context.stop(): the message is answered and committed, then the actor stops for good.
        assert (await c.call("t", {"how": "stop"}))["outputs"]["ok"]["value"] == "bye"
        node = await wait_for(lambda: _stopped(c, "t", "context.stop()"), timeout=10)
        assert node["restarts"] == 0 and node["restart"] == "transient" and node["pid"] is None
        assert node["last_exit"]["reason"] == "normal" and node["last_exit"]["message"] == "context.stop()"
        assert node["last_error"] is None
        with pytest.raises(RpcError) as err:
            await c.call("t", {"how": "ping"}, timeout=10)
        assert err.value.code == -32002
        assert "exited normally (context.stop())" in err.value.message and "transient" in err.value.message

        # actor.restart brings it back; a crash (abnormal) is restarted by the supervisor.
        assert await c.request("actor.restart", {"actor": "t"}) == {}
        await _ok(c, "t")
        node = find_actor(await c.status(), "t")
        assert node["restarts"] == 1 and node["last_restart_cause"] == "actor.restart"
        with pytest.raises(RpcError) as err:
            await c.call("t", {"how": "crash"})
        assert err.value.data["exit_code"] == 7
        await _ok(c, "t")
        node = find_actor(await c.status(), "t")
        assert node["restarts"] == 2 and node["last_restart_cause"] == "failed"
        assert node["last_exit"]["reason"] == "error"
        _, out, _ = await run_cli("status", "--url", host.url)
        line = next(ln for ln in out.splitlines() if ln.strip().startswith("t "))
        assert "restarts=2" in line and "last_exit=error" in line and "restarted because: failed" in line, line

        # sys.exit(0) mid-message: a normal stop with what was sent so far.
        out = await c.call("t", {"how": "exit0"})
        assert out["outputs"] == {} and [e["message"]["value"] for e in out["emitted"]] == ["before exit"]
        node = await wait_for(lambda: _stopped(c, "t", "sys.exit(0)"), timeout=10)
        assert node["restarts"] == 2

        # sys.exit(3) is a crash, not a normal exit: restarted.
        assert await c.request("actor.restart", {"actor": "t"}) == {}
        with pytest.raises(RpcError) as err:
            await c.call("t", {"how": "exit3"})
        assert err.value.data["exit_code"] == 3
        await _ok(c, "t")
        assert find_actor(await c.status(), "t")["restarts"] == 4

        # A bare os._exit(0): normal too, the message in hand fails saying so.
        with pytest.raises(RpcError) as err:
            await c.call("t", {"how": "osexit0"})
        assert err.value.code == -32002 and "exited normally" in err.value.message
        node = await wait_for(lambda: _stopped(c, "t", "its worker exited with code 0"), timeout=10)
        assert node["restarts"] == 4


async def _stopped(c, name: str, how: str) -> dict | None:
    node = find_actor(await c.status(), name)
    return node if node and node["state"] == "stopped" and (node["last_exit"] or {}).get("message") == how else None


async def test_permanent_restarts_after_a_normal_exit(host):
    async with open_client(host.url) as c:
        await c.call("p", {"how": "stop-why"})
        await _ok(c, "p")
        node = find_actor(await c.status(), "p")
        assert node["restarts"] == 1 and node["state"] == "running"
        assert node["last_exit"]["reason"] == "normal" and node["last_exit"]["message"] == "work done"
        assert node["last_restart_cause"] == "exited normally"


async def test_temporary_is_never_restarted_and_restart_says_why(host):
    async with open_client(host.url) as c:
        # actor.restart of a running temporary actor restarts it (it is not removed).
        pid = find_actor(await c.status(), "y")["pid"]
        assert await c.request("actor.restart", {"actor": "y"}) == {}
        # Answered once the new incarnation runs: what is sent from now on reaches it, and the
        # old one (its worker killed) can no longer take a call and fail it with the kill.
        node = find_actor(await c.status(), "y")
        assert node["state"] == "running" and node["pid"] not in (None, pid), node
        assert node["restarts"] == 1 and node["last_restart_cause"] == "actor.restart"
        await _ok(c, "y")
        assert find_actor(await c.status(), "y")["pid"] == node["pid"]

        with pytest.raises(RpcError):
            await c.call("x", {"how": "crash"})
        await c.call("y", {"how": "stop"})
        for name in ("x", "y"):
            await wait_for(lambda: _gone(c, name), timeout=10)
            with pytest.raises(RpcError) as err:
                await c.call(name, {"how": "ping"}, timeout=10)
            assert err.value.code == -32002 and "temporary" in err.value.message
            with pytest.raises(RpcError) as err:
                await c.request("actor.restart", {"actor": name})
            assert err.value.code == -32001 and "temporary" in err.value.message
            assert err.value.data == {"actor": name}
        await _ok(c, "p")  # the others were not touched
        assert find_actor(await c.status(), "p")["restarts"] == 0


async def _gone(c, name: str) -> bool:
    return find_actor(await c.status(), name) is None


async def test_javascript_process_exit_0_and_stop_are_normal_other_codes_crash(host):
    async with open_client(host.url) as c:
        assert (await c.call("jt", {"how": "exit0"}))["outputs"] == {}
        node = await wait_for(lambda: _stopped(c, "jt", "process.exit(0)"), timeout=10)
        assert node["restarts"] == 0
        assert await c.request("actor.restart", {"actor": "jt"}) == {}
        with pytest.raises(RpcError) as err:
            await c.call("jt", {"how": "exit5"})
        assert err.value.data["exit_code"] == 5, (err.value.message, err.value.data)
        assert (await c.call("jt", {"how": "ping"}, timeout=20))["outputs"]["ok"]["value"] == "ping"
        assert (await c.call("jt", {"how": "stop"}))["outputs"]["ok"]["value"] == "bye"
        node = await wait_for(lambda: _stopped(c, "jt", "context.stop()"), timeout=10)
        assert node["restarts"] == 2


CRASHER = '''
import os
from reflow import actor

@actor(name="Crasher", inports=["how"], outports=["ok"])
def crash(context):
    if context.get_input("how") == "exit":
        os._exit(7)
    return {"ok": True}
'''


async def test_restarts_caused_by_a_sibling_or_the_supervisor_are_counted_with_their_cause(make_host):
    host = await make_host({"crasher.actor.py": CRASHER}, """\
network:
  processes:
    a: {component: Crasher}
    b: {component: Crasher}
    solo: {component: Crasher}
supervision:
  max_restarts: 5
  max_seconds: 60
  backoff: {min: 1ms, max: 10ms}
  groups:
    g: {members: [a, b], strategy: one_for_all, max_restarts: 1, max_seconds: 60}
""")
    async with open_client(host.url) as c:
        pids = {n: find_actor(await c.status(), n)["pid"] for n in ("a", "b")}
        with pytest.raises(RpcError):
            await c.call("a", {"how": "exit"})
        for n in ("a", "b"):
            assert (await c.call(n, {"how": "ok"}, timeout=20))["outputs"]["ok"]["value"] is True
        status = await c.status()
        a, b = find_actor(status, "a"), find_actor(status, "b")
        assert (a["restarts"], b["restarts"]) == (1, 1) and b["pid"] != pids["b"]
        assert a["last_restart_cause"] == "failed"
        assert b["last_restart_cause"] == "sibling 'a' failed (one_for_all)"

        pids = {n: find_actor(status, n)["pid"] for n in ("a", "b")}
        with pytest.raises(RpcError):  # the second failure in g's window: g gives up, network restarts it
            await c.call("a", {"how": "exit"})
        for n in ("a", "b"):
            assert (await c.call(n, {"how": "ok"}, timeout=20))["outputs"]["ok"]["value"] is True
        status = await c.status()
        group = next(n for n in status["children"][0]["children"] if n["name"] == "g")
        assert group["restarts"] == 1 and group["last_restart_cause"] == "failed"
        for n in ("a", "b"):
            node = find_actor(status, n)
            assert node["pid"] != pids[n] and node["restarts"] == 2
            assert node["last_restart_cause"].startswith("supervisor 'g' restarted (more than 1 restarts")
        assert find_actor(status, "solo")["restarts"] == 0


async def test_restart_after_the_root_gave_up_starts_the_tree_again(make_host):
    host = await make_host({"crasher.actor.py": CRASHER}, """\
network:
  processes:
    a: {component: Crasher}
    solo: {component: Crasher}
supervision: {max_restarts: 0, max_seconds: 60}
""")
    async with open_client(host.url) as c:
        with pytest.raises(RpcError):
            await c.call("a", {"how": "exit"})
        await wait_for(lambda: _root_state(c, "failed"), timeout=10)
        with pytest.raises(RpcError) as err:
            await c.call("solo", {"how": "ok"}, timeout=10)
        assert "not running" in err.value.message
        assert await c.request("actor.restart", {"actor": "solo"}) == {}
        status = await c.status()
        assert status["state"] == "running" and status["children"][0]["state"] == "running"
        assert (await c.call("solo", {"how": "ok"}, timeout=20))["outputs"]["ok"]["value"] is True
        assert (await c.call("a", {"how": "ok"}, timeout=20))["outputs"]["ok"]["value"] is True
        solo = find_actor(await c.status(), "solo")
        assert solo["restarts"] == 1 and solo["last_restart_cause"].startswith("supervisor 'network' restarted")


async def _root_state(c, state: str) -> bool:
    return (await c.status())["state"] == state
