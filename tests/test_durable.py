"""Durable mailboxes on the embedded Redis: poison messages, redelivery, nothing lost to a host SIGKILL."""

from __future__ import annotations

import orjson
import pytest
import redis as redis_py
import trio
import trio_websocket

from conftest import open_client, run_cli, wait_for
from supervisor.client import RpcError

COUNTER = '''
import time
from reflow import actor

@actor(name="Counter", inports=["n", "sleep"], outports=["total"])
def count(context):
    state = context.get_state()
    total = state.increment("total", context.get_input("n"))
    time.sleep(context.get_input("sleep", 0.05))
    if context.get_input("n") < 0:
        raise ValueError("negative")
    return {"total": total}
'''


async def test_poison_message_lands_in_dead_letters_and_leaves_no_trace(make_host):
    host = await make_host({"counter.actor.py": COUNTER}, "supervision: {actors: {Counter: {max_deliveries: 3}}}\n")
    async with open_client(host.url) as c:
        await c.send("Counter", "n", -5)
        r = host.redis()
        await wait_for(lambda: r.xlen("reflow:deadletter") == 1)
        (_, fields), = r.xrange("reflow:deadletter")
        assert fields[b"process"] == b"Counter" and fields[b"attempts"] == b"3"
        assert b"negative" in fields[b"error"]
        assert r.get("reflow:Counter:state:total") is None  # three failures, no trace
        await c.send("Counter", "n", 2)
        await wait_for(lambda: r.get("reflow:Counter:state:total") == b"2")
        assert r.xlen("reflow:Counter:inbox") == 0
        (dead,) = (await c.request("deadletters.list"))["deadletters"]
        assert dead["process"] == "Counter" and dead["inputs"] == {"n": {"type": "integer", "value": -5}}
        assert dead["error"]["type"] == "ValueError" and dead["attempts"] == 3
        assert (await c.request("deadletters.list", {"count": 1}))["deadletters"] == [dead]  # CONTRACT §4's name
        for bad in ("nope", 5, "1-2-3"):  # refused as the client's mistake, not an internal error
            with pytest.raises(RpcError) as err:
                await c.request("deadletters.replay", {"id": bad})
            assert err.value.code == -32602, err.value
    rc, out, err = await run_cli("deadletters", "--url", host.url)
    assert rc == 0 and dead["id"] in out and "ValueError: negative" in out
    rc, out, err = await run_cli("deadletters", "--replay", dead["id"], "--url", host.url)
    assert rc == 0 and "into Counter" in out
    await wait_for(lambda: r.xlen("reflow:deadletter") == 1 and r.xrange("reflow:deadletter")[0][0].decode()
                   != dead["id"])  # replayed, failed three more times, dead again


async def test_accepted_messages_survive_a_host_sigkill_exactly_once(make_host):
    host = await make_host({"counter.actor.py": COUNTER})
    n = 60  # 50 ms each: seconds of work, so the kill lands mid-stream
    async with open_client(host.url) as c:
        for _ in range(n):
            await c.request("actor.send", {"actor": "Counter", "port": "n", "value": 1})
        await wait_for(lambda: host.redis().get("reflow:Counter:state:total") is not None)
    before = int(host.redis().get("reflow:Counter:state:total"))
    host.proc.kill()  # some processed, some pending, maybe one in the worker
    assert before < n, "the kill must land with work still pending"
    await host.wait()
    await host.start()
    r = host.redis()
    await wait_for(lambda: r.get("reflow:Counter:state:total") == str(n).encode(), timeout=30)
    # Each commit deletes its message from the inbox: once it is empty, nothing is left to
    # deliver again, so a total still at n means each message counted exactly once.
    await wait_for(lambda: r.xlen("reflow:Counter:inbox") == 0, timeout=30)
    assert r.get("reflow:Counter:state:total") == str(n).encode()
    assert r.xlen("reflow:deadletter") == 0


async def test_embedded_redis_killed_mid_run_is_restarted_and_the_tree_rides_it_out(make_host):
    import os
    import signal

    from conftest import children_of, cmdline

    host = await make_host({"counter.actor.py": COUNTER})
    async with open_client(host.url) as c:
        await c.send("Counter", "n", 1)
        await wait_for(lambda: host.redis().get("reflow:Counter:state:total") == b"1")
        (redis_pid,) = [p for p in children_of(host.proc.pid) if "redis-server" in cmdline(p)]
        os.kill(redis_pid, signal.SIGKILL)
        await wait_for(lambda: any("redis-server" in cmdline(p) and p != redis_pid
                                   for p in children_of(host.proc.pid)), timeout=15)

        async def accepted():
            try:
                await c.send("Counter", "n", 10)
                return True
            except Exception:
                return False
        await wait_for(accepted, timeout=15)
        # Redis write()s its AOF before it answers: the first increment, acknowledged, outlives its SIGKILL
        await wait_for(lambda: host.redis().get("reflow:Counter:state:total") == b"11", timeout=15)
        status = await c.status()
        assert status["state"] == "running" and status["children"][0]["state"] == "running"


KILLER = '''
import os
from reflow import actor

@actor(name="Killer", inports=["x"], outports=["y"])
def kill(context):
    if context.get_input("x") == "die":
        os._exit(1)
    return {"y": context.get_input("x")}
'''

BYSTANDER = '''
from reflow import actor

@actor(name="Bystander", inports=["x"], outports=["y"])
def echo(context):
    return {"y": context.get_input("x")}
'''


async def test_a_message_that_kills_its_worker_is_dead_lettered_without_taking_siblings_down(make_host):
    # Default supervision (3 restarts in 5 s) and max_deliveries 5: five crashes in a row would
    # escalate; redeliveries of a worker-killing message are spaced so that they do not.
    host = await make_host({"killer.actor.py": KILLER, "bystander.actor.py": BYSTANDER})
    r = host.redis()
    async with open_client(host.url) as c:
        await c.send("Killer", "x", "die")
        await wait_for(lambda: r.xlen("reflow:deadletter") == 1, timeout=30)
        status = await c.status()
        assert status["restarts"] == 0 and status["children"][0]["restarts"] == 0, status
        killer = next(n for n in status["children"][0]["children"] if n["name"] == "Killer")
        assert killer["restarts"] == 5 and killer["state"] == "running"
        (dead,) = (await c.request("deadletters.list"))["deadletters"]
        assert dead["attempts"] == 5 and dead["error"]["type"] == "WorkerDied"
        assert (await c.call("Killer", {"x": 1}))["outputs"]["y"]["value"] == 1
        assert (await c.call("Bystander", {"x": 2}))["outputs"]["y"]["value"] == 2


async def test_an_external_redis_that_goes_away_and_comes_back_loses_nothing_accepted(make_host, tmp_path):
    import subprocess

    from conftest import redis_server_argv
    from supervisor.client import RpcError

    port, argv = redis_server_argv(tmp_path / "external-redis", "--appendonly", "yes", "--appendfsync", "always")

    def start_redis() -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def total() -> int:
        try:
            return int(redis_py.Redis(port=port).get("reflow:Counter:state:total") or 0)
        except redis_py.ConnectionError:
            return -1

    server = start_redis()
    try:
        await wait_for(lambda: total() >= 0)
        host = await make_host({"counter.actor.py": COUNTER}, env={"REFLOW_REDIS_URL": f"redis://127.0.0.1:{port}"})
        accepted = attempted = 0
        refusals: list[str] = []
        async with open_client(host.url) as c:

            async def sender() -> None:
                nonlocal accepted, attempted
                while True:
                    attempted += 1
                    try:
                        await c.send("Counter", "n", 1)
                        accepted += 1
                    except RpcError as exc:
                        refusals.append(f"{exc.code} {exc.message}")
                    await trio.sleep(0.01)  # a steady trickle, before, during and after the outage

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await wait_for(lambda: accepted >= 20)
                server.kill()  # SIGKILL, with messages waiting in its streams
                server.wait()
                status = await c.status()  # needs no Redis: still answered
                await wait_for(lambda: refusals, timeout=10)
                assert status["state"] == "running"
                await wait_for(_redis_down(c), timeout=10)
                lost_at = accepted
                server = start_redis()  # same port, same data
                await wait_for(lambda: accepted >= lost_at + 20, timeout=30)
                nursery.cancel_scope.cancel()
            assert all(r.startswith("-32004 ") and "Redis is unavailable" in r for r in refusals), refusals
            await wait_for(lambda: total() >= accepted, timeout=60)
            # Every accepted message counted; a refused send whose reply was lost with Redis,
            # or the send cut off when the sender stopped, may have landed too.
            assert accepted <= total() <= attempted
            assert (await c.status())["redis"]["connected"] is True
        assert redis_py.Redis(port=port).xlen("reflow:deadletter") == 0
    finally:
        server.kill()
        server.wait()


def _redis_down(c):
    async def check() -> bool:
        return (await c.status())["redis"]["connected"] is False
    return check


SLOW = '''
import time
from reflow import actor

@actor(name="Slow", inports=["x"], outports=[])
def slow(context):
    time.sleep(2)
'''


async def test_a_full_durable_mailbox_refuses_with_minus_32004_naming_max_pending(make_host):
    host = await make_host({"slow.actor.py": SLOW}, start=False)
    host.config.write_text(host.config.read_text().replace("  root: .\n", "  root: .\n  mailbox: {max_pending: 3}\n"))
    await host.start()
    async with open_client(host.url) as c:
        for _ in range(3):  # one in the worker for 2 s, two waiting: all three still in the inbox
            await c.send("Slow", "x", 1)
        try:
            await c.send("Slow", "x", 1)
        except RpcError as exc:
            assert exc.code == -32004 and "max_pending 3" in str(exc), exc
        else:
            raise AssertionError("a fourth message was accepted past max_pending 3")
        assert host.redis().xlen("reflow:Slow:inbox") == 3


TALLY = '''
import os
from reflow import actor

@actor(name="Tally", inports=["n"], outports=["seen"])
def tally(context):
    n = context.get_input("n")
    if n == "die":
        os._exit(9)
    return {"seen": context.get_state().increment("seen")}
'''


async def test_pipelined_commits_keep_each_message_seeing_the_ones_before(make_host):
    """Commits travel while the next messages are handled (the cell pipelines them), yet
    each message's state read follows the earlier commits on the wire: 300 sends in batch
    frames count 1…300, published in that order, with nothing counted twice."""
    host = await make_host({"tally.actor.py": TALLY})
    async with open_client(host.url) as c, trio_websocket.open_websocket_url(host.url) as ws:
        sub = await c.request("actor.subscribe", {"actor": "Tally", "port": "seen"})
        outputs = c.on_notification(sub["subscription"])
        rid = 0
        for _ in range(6):
            frame = []
            for _ in range(50):
                rid += 1
                frame.append({"jsonrpc": "2.0", "id": rid, "method": "actor.send",
                              "params": {"actor": "Tally", "port": "n", "value": rid}})
            await ws.send_message(orjson.dumps(frame).decode())
            with trio.fail_after(30):  # (one frame at a time: within max_in_flight, all accepted)
                assert not [r for r in orjson.loads(await ws.get_message()) if "error" in r]
        with trio.fail_after(60):
            seen = [(await outputs.receive())["params"]["message"]["value"] for _ in range(300)]
        assert seen == list(range(1, 301))
        assert host.redis().get("reflow:Tally:state:seen") == b"300"


async def test_calls_queued_behind_a_crash_on_a_durable_host_are_all_answered(make_host):
    """On a durable host calls wait in the cell's merged inbox, a window of them already
    taken from the mailbox; when the worker dies under the first, the rest run on the next
    worker, none is lost or answered twice."""
    host = await make_host({"tally.actor.py": TALLY})
    async with trio_websocket.open_websocket_url(host.url) as ws:
        frame = [{"jsonrpc": "2.0", "id": 0, "method": "actor.call", "params": {"actor": "Tally", "inputs": {"n": "die"}}}]
        frame += [{"jsonrpc": "2.0", "id": i, "method": "actor.call", "params": {"actor": "Tally", "inputs": {"n": i}}}
                  for i in range(1, 101)]
        await ws.send_message(orjson.dumps(frame).decode())
        with trio.fail_after(30):
            replies = orjson.loads(await ws.get_message())
    by_id = {r["id"]: r for r in replies}
    assert sorted(by_id) == list(range(101))
    assert by_id[0]["error"]["code"] == -32002
    assert sorted(by_id[i]["result"]["outputs"]["seen"]["value"] for i in range(1, 101)) == list(range(1, 101))


RECORD = '''
from reflow import actor

@actor(name="Record", inports=["n"], outports=["got"])
def record(context):
    n = context.get_input("n")
    context.get_state().push("order", n)
    return {"got": n}
'''


def _external_entry(r: redis_py.Redis, key: str, n: int) -> None:
    """An entry added behind the host's back (as only a bug or an operator would): the
    feeder is not told, so it is still unread when the next send arrives."""
    r.xadd(key, {"m": orjson.dumps({"id": f"ext-{n}", "inputs": {"n": {"type": "integer", "value": n}}}), "a": 0})


async def _idle_record(c) -> trio.MemoryReceiveChannel:
    """Subscribe to Record's outputs, and wait until it is up and idle (its first output: 0)."""
    sub = await c.request("actor.subscribe", {"actor": "Record", "port": "got"})
    outputs = c.on_notification(sub["subscription"])
    assert (await c.call("Record", {"n": 0}))["outputs"]["got"]["value"] == 0
    return outputs


async def test_a_send_to_an_idle_actor_that_redis_refuses_leaves_no_trace(make_host):
    """A send that finds its actor idle is started while Redis adds it; if Redis refuses the
    add (here: the inbox is full of entries the host has not read), the sender hears -32004
    and what the run did is neither committed nor published."""
    host = await make_host({"record.actor.py": RECORD}, start=False)
    host.config.write_text(host.config.read_text().replace("  root: .\n", "  root: .\n  mailbox: {max_pending: 2}\n"))
    await host.start()
    r = host.redis()
    async with open_client(host.url) as c:
        outputs = await _idle_record(c)
        _external_entry(r, "reflow:Record:inbox", 100)
        _external_entry(r, "reflow:Record:inbox", 200)
        with pytest.raises(RpcError, match="max_pending 2") as refused:
            await c.send("Record", "n", 1)
        assert refused.value.code == -32004
        with trio.fail_after(10):  # the feeder's slow poll finds the two
            seen = [(await outputs.receive())["params"]["message"]["value"] for _ in range(3)]
        await c.send("Record", "n", 3)
        with trio.fail_after(10):
            seen.append((await outputs.receive())["params"]["message"]["value"])
    assert seen == [0, 100, 200, 3]
    assert orjson.loads(r.get("reflow:Record:state:order")) == [0, 100, 200, 3]


async def test_a_send_to_an_idle_actor_and_entries_not_yet_read_each_run_once(make_host):
    """The add of a send that finds its actor idle also reads, for the feeder, what was not
    read yet: the send itself (started at once) and anything before it, which the feeder
    hands out; none of them runs twice, and a later send comes after all of them."""
    host = await make_host({"record.actor.py": RECORD})
    r = host.redis()
    async with open_client(host.url) as c:
        outputs = await _idle_record(c)
        _external_entry(r, "reflow:Record:inbox", 100)
        await c.send("Record", "n", 1)
        await c.send("Record", "n", 2)
        seen = []
        with trio.fail_after(10):
            while 2 not in seen:
                seen.append((await outputs.receive())["params"]["message"]["value"])
    # 1 overtakes the entry it found unread, unless the feeder's slow poll read that first.
    assert seen in ([0, 1, 100, 2], [0, 100, 1, 2]), seen
    assert orjson.loads(r.get("reflow:Record:state:order")) == seen
    assert r.xlen("reflow:Record:inbox") == 0 and r.xpending("reflow:Record:inbox", "cells")["pending"] == 0


async def test_a_send_after_its_inbox_was_deleted_under_the_host_is_accepted_and_runs_once(make_host):
    """Redis does not undo a script's writes when it fails: the add's read for the feeder
    meeting NOGROUP (the stream deleted under the host, group and all) must not turn an
    added message into an error for its sender. It is accepted, and it runs once."""
    host = await make_host({"record.actor.py": RECORD})
    r = host.redis()
    async with open_client(host.url) as c:
        outputs = await _idle_record(c)
        r.delete("reflow:Record:inbox")
        await c.send("Record", "n", 1)
        await c.send("Record", "n", 2)
        with trio.fail_after(15):  # (the feeder meets NOGROUP too, and sweeps again)
            seen = [(await outputs.receive())["params"]["message"]["value"] for _ in range(3)]
    assert seen == [0, 1, 2]
    assert orjson.loads(r.get("reflow:Record:state:order")) == [0, 1, 2]
