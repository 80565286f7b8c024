"""The WebSocket API with a raw client: spec answers to bad frames, cancel, auth, send/subscribe, the graph."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import trio
import trio_websocket

from conftest import open_client, wait_for, wait_printed, write_workspace
from supervisor.client import ConnectionLost, RpcError

DOUBLE = '''
import time
from reflow import actor

@actor(name="Double", inports=["x", "sleep"], outports=["y"])
def double(context):
    if context.get_input("sleep", 0):
        print("sleeping")  # the test waits for this line: the message is in the worker
        time.sleep(context.get_input("sleep"))
    return {"y": context.get_input("x") * 2}
'''

SUM = '''
from reflow import actor

@actor(name="Sum", inports=["a", "b"], outports=["total"], await_all_inports=True)
def total(context):
    n = context.get_state().increment("seen")
    return {"total": context.get_input("a") + context.get_input("b") + 0 * n}
'''


def fan_in(iip: str) -> str:
    """A network: Double d1 and d2 into Sum's a and b, plus one more connection (an IIP)."""
    return f"""\
network:
  processes:
    d1: {{component: Double}}
    d2: {{component: Double}}
    sum: {{component: Sum}}
  connections:
    - {{src: {{process: d1, port: y}}, tgt: {{process: sum, port: a}}}}
    - {{src: {{process: d2, port: y}}, tgt: {{process: sum, port: b}}}}
    - {iip}
"""


async def raw(ws, frame):
    await ws.send_message(frame)
    return orjson.loads(await ws.get_message())


async def test_bad_frames_get_spec_answers_and_never_hurt_other_calls(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    async with trio_websocket.open_websocket_url(host.url) as ws, open_client(host.url) as other:
        async with trio.open_nursery() as n:
            results = []

            async def slow_other():
                results.append(await other.call("Double", {"x": 4, "sleep": 0.5}))
            n.start_soon(slow_other)
            assert (await raw(ws, "{nope"))["error"]["code"] == -32700
            assert (await raw(ws, "[]"))["error"]["code"] == -32600
            assert [r["error"]["code"] for r in await raw(ws, "[1, 2]")] == [-32600, -32600]
            r = await raw(ws, '{"jsonrpc": "2.0", "id": "a", "method": "no.such"}')
            assert r == {"jsonrpc": "2.0", "id": "a", "error": {"code": -32601, "message": "method not found: no.such"}}
            r = await raw(ws, '{"jsonrpc": "2.0", "id": 3, "method": "actor.call", "params": {"actor": "Double"}}')
            assert r["id"] == 3 and r["error"]["code"] == -32602 and "inputs" in r["error"]["message"]
            batch = await raw(ws, '[{"jsonrpc": "2.0", "id": 1, "method": "actor.call", "params": '
                                  '{"actor": "Double", "inputs": {"x": 1}}}, {"jsonrpc": "2.0", "method": "x"}, '
                                  '{"jsonrpc": "2.0", "id": 2, "method": "actors.list"}]')
            assert sorted(r["id"] for r in batch) == [1, 2]
            # a notification-only frame gets no answer: the next answer is for the next request
            await ws.send_message('{"jsonrpc": "2.0", "method": "actors.list"}')
            assert (await raw(ws, '{"jsonrpc": "2.0", "id": 9, "method": "actors.list"}'))["id"] == 9
        assert results[0]["outputs"]["y"]["value"] == 8


async def test_a_batch_mixing_sends_and_calls_answers_every_request_in_one_frame(make_host):
    """Memory-mailbox sends are answered without a task of their own; in a batch they
    share the frame with the calls that wait, errors included, and the sent message runs."""
    host = await make_host({"double.actor.py": DOUBLE})
    async with trio_websocket.open_websocket_url(host.url) as ws, open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "Double", "port": "y"})
        notes = c.on_notification(sub["subscription"])
        batch = await raw(ws, orjson.dumps([
            {"jsonrpc": "2.0", "id": 1, "method": "actor.send", "params": {"actor": "Double", "port": "x", "value": 3}},
            {"jsonrpc": "2.0", "id": 2, "method": "actor.send", "params": {"actor": "Nope", "port": "x", "value": 3}},
            {"jsonrpc": "2.0", "id": 3, "method": "actor.send", "params": {"actor": "Double", "port": "x"}},
            {"jsonrpc": "2.0", "method": "actor.send", "params": {"actor": "Double", "port": "x", "value": 4}},
            {"jsonrpc": "2.0", "id": 4, "method": "actor.call", "params": {"actor": "Double", "inputs": {"x": 5}}},
        ]).decode())
        by_id = {r["id"]: r for r in batch}
        assert sorted(by_id) == [1, 2, 3, 4]
        assert isinstance(by_id[1]["result"]["message_id"], str)
        assert by_id[2]["error"]["code"] == -32001
        assert by_id[3]["error"]["code"] == -32602 and "value" in by_id[3]["error"]["message"]
        assert by_id[4]["result"]["outputs"]["y"]["value"] == 10
        seen = set()
        with trio.fail_after(10):
            while len(seen) < 3:  # the notification runs too; the call publishes its output
                seen.add((await notes.receive())["params"]["message"]["value"])
        assert seen == {6, 8, 10}


async def test_cancel_request_answers_minus_32800(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    async with trio_websocket.open_websocket_url(host.url) as ws:
        await ws.send_message('{"jsonrpc": "2.0", "id": 7, "method": "actor.call", "params": '
                              '{"actor": "Double", "inputs": {"x": 1, "sleep": 5}}}')
        await ws.send_message('{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 7}}')
        with trio.fail_after(3):
            r = orjson.loads(await ws.get_message())
        assert r["id"] == 7 and r["error"]["code"] == -32800


async def test_a_cancel_request_naming_no_request_id_cancels_nothing_and_keeps_the_connection(make_host):
    """Only ids a request can have name one: true and 7.0 are not 7, and an id that could not
    be a request's ([7], {}) names nothing (it used to end the client's connection)."""
    host = await make_host({"double.actor.py": DOUBLE})
    async with trio_websocket.open_websocket_url(host.url) as ws:
        await ws.send_message('{"jsonrpc": "2.0", "id": 7, "method": "actor.call", "params": '
                              '{"actor": "Double", "inputs": {"x": 1, "sleep": 0.5}}}')
        for rid in ("true", "7.0", "[7]", "{}", '"7"'):
            await ws.send_message('{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": %s}}' % rid)
        await ws.send_message('{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {}}')
        with trio.fail_after(10):
            r = orjson.loads(await ws.get_message())
        assert r["id"] == 7 and r["result"]["outputs"]["y"]["value"] == 2, r


async def test_a_cancelled_call_is_answered_once_and_a_bad_timeout_sends_nothing(make_host):
    """A call waits for its message with no task of its own: cancelling it answers -32800
    at once and its late outcome is dropped, not sent as a second answer. A call whose
    timeout is invalid is refused before its message reaches the mailbox."""
    host = await make_host({"double.actor.py": DOUBLE})
    async with open_client(host.url) as c, trio_websocket.open_websocket_url(host.url) as ws:
        sub = await c.request("actor.subscribe", {"actor": "Double", "port": "y"})
        outputs = c.on_notification(sub["subscription"])
        bad = await raw(ws, '{"jsonrpc": "2.0", "id": 1, "method": "actor.call", "params": '
                            '{"actor": "Double", "inputs": {"x": 100}, "timeout": "soon"}}')
        assert bad["error"]["code"] == -32602 and "timeout" in bad["error"]["message"]
        await ws.send_message('{"jsonrpc": "2.0", "id": 7, "method": "actor.call", "params": '
                              '{"actor": "Double", "inputs": {"x": 1, "sleep": 0.3}}}')
        await ws.send_message('{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 7}}')
        await ws.send_message('{"jsonrpc": "2.0", "id": 8, "method": "actor.call", "params": '
                              '{"actor": "Double", "inputs": {"x": 2}}}')
        with trio.fail_after(10):
            first, second = orjson.loads(await ws.get_message()), orjson.loads(await ws.get_message())
            seen = [(await outputs.receive())["params"]["message"]["value"] for _ in range(2)]
        assert first["id"] == 7 and first["error"]["code"] == -32800
        assert second["id"] == 8 and second["result"]["outputs"]["y"]["value"] == 4
        assert seen == [2, 4]  # the cancelled message still ran; the refused one never did
        assert (await c.call("Double", {"x": 3}))["outputs"]["y"]["value"] == 6
        # Nothing else came on this connection: the next frame answers the next request.
        with trio.fail_after(10):
            assert (await raw(ws, '{"jsonrpc": "2.0", "id": 9, "method": "actors.list"}'))["id"] == 9


async def test_send_and_subscribe(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    async with open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "Double", "port": "y"})
        notes = c.on_notification(sub["subscription"])
        mid = await c.send("Double", "x", 21)
        with trio.fail_after(10):
            note = (await notes.receive())["params"]
        assert note == {"subscription": sub["subscription"], "actor": "Double", "port": "y",
                        "message": {"type": "integer", "value": 42}, "message_id": mid}
        assert await c.request("actor.unsubscribe", sub) == {}
        with pytest.raises(RpcError) as err:
            await c.request("actor.unsubscribe", sub)
        assert err.value.code == -32602


async def test_graph_routes_iips_and_waits_for_all_inports(make_host):
    config = fan_in("{data: 5, tgt: {process: d2, port: x}}")
    host = await make_host({"double.actor.py": DOUBLE, "sum.actor.py": SUM}, config)
    async with open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "sum"})
        notes = c.on_notification(sub["subscription"])
        await c.send("d1", "x", 1)
        with trio.fail_after(10):
            note = (await notes.receive())["params"]
        assert note["port"] == "total" and note["message"]["value"] == 2 + 10


async def test_token_required_when_set(make_host):
    host = await make_host({"double.actor.py": DOUBLE}, env={"REFLOW_TOKEN": "s3cret"})
    with pytest.raises(trio_websocket.HandshakeError):
        async with open_client(host.url):
            pass
    async with open_client(host.url, token="s3cret") as c:
        assert (await c.call("Double", {"x": 2}))["outputs"]["y"]["value"] == 4


def test_non_loopback_without_token_refuses_to_start(tmp_path):
    cfg = write_workspace(tmp_path, {"double.actor.py": DOUBLE})
    cfg.write_text(cfg.read_text().replace("host: 127.0.0.1", "host: 0.0.0.0"))
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "token" in r.stderr and "Traceback" not in r.stderr


def test_unknown_network_component_is_a_startup_error(tmp_path):
    cfg = write_workspace(tmp_path, {"double.actor.py": DOUBLE},
                          "network:\n  processes: {p: {component: Nope}}\n")
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "network.processes.p.component: unknown component 'Nope'" in r.stderr


async def test_closing_a_client_completes_the_close_handshake(make_host):
    """Leaving ``open_client`` closes with a normal close handshake at once, not after the
    2 s disconnect timeout (a CLI ``status`` used to take 2 s longer than its answer)."""
    host = await make_host({"double.actor.py": DOUBLE})
    with trio.fail_after(1):  # well inside trio-websocket's 2 s disconnect timeout
        async with open_client(host.url) as c:
            assert (await c.status())["state"] == "running"
            ws = c._ws
    assert ws.closed is not None and ws.closed.code == 1000, ws.closed


async def test_leaving_a_client_whose_host_never_answers_the_close_takes_at_most_the_disconnect_timeout():
    """A stuck host (a stand-in: a TCP server that completes the WebSocket handshake,
    then never reads again) must not hang the client's exit: at most the 2 s timeout."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    async def stuck_host(stream):
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some())
            if any(isinstance(ev, Request) for ev in ws.events()):
                await stream.send_all(ws.send(AcceptConnection()))
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, stuck_host, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(5):
            async with open_client(f"ws://127.0.0.1:{port}", reconnect=False):
                pass
        nursery.cancel_scope.cancel()


async def test_client_reconnects_and_its_subscription_delivers_again(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    async with open_client(host.url) as c:
        got = []

        async def follow():
            async for note in c.subscribe("Double", "y"):
                got.append(note["message"]["value"])

        async with trio.open_nursery() as n:
            n.start_soon(follow)
            await wait_for(lambda: c._subs)
            await c.send("Double", "x", 1)
            await wait_for(lambda: got == [2])

            async def in_flight():
                with pytest.raises(ConnectionLost):
                    await c.call("Double", {"x": 1, "sleep": 30})
            n.start_soon(in_flight)
            await wait_printed(host, "sleeping")  # the call is in the worker
            host.proc.kill()
            await host.wait()
            await host.start()
            await wait_for(lambda: c.connections == 2, timeout=20)
            await wait_for(lambda: all(s.server_id for s in c._subs.values()) and c._ws is not None)
            assert (await c.status())["state"] == "running"
            await wait_for(lambda: c._notifications and all(s.server_id in c._notifications for s in c._subs.values()))
            await c.send("Double", "x", 5)
            await wait_for(lambda: got == [2, 10])
            n.cancel_scope.cancel()


def test_a_result_that_is_not_json_becomes_an_internal_error_for_that_request_only():
    from supervisor.core import protocol as proto
    from supervisor.core.jsonrpc import encodable  # (what the server's Connection.reply falls back on)

    bad = proto.Response(1, {"x": float("nan")})
    good = proto.Response(2, 4)
    fixed = encodable([bad, good])
    assert isinstance(fixed[0], proto.ErrorResponse) and fixed[0].error.code == -32603
    assert "NaN" in fixed[0].error.message
    assert fixed[1] is good


RISKY = '''
from reflow import actor, Message

@actor(name="Risky", inports=["x"], outports=["y", "error"])
def risky(context):
    x = context.get_input("x")
    if x == "raise":
        raise ValueError("cannot take that")
    if x == "return":
        return Message.error("refused", 7)
    return {"y": x}
'''

RISKY_JS = '''\
module.exports = actor({name: 'RiskyJs', inports: ['x'], outports: ['y', 'error']}, (ctx) => {
  if (ctx.getInput('x') === 'raise') throw new RangeError('out of range');
  if (ctx.getInput('x') === 'return') return Message.error('refused', 8);
  return {y: ctx.getInput('x')};
});
'''

LOGGER = '''
from reflow import actor

@actor(name="ErrorLog", inports=["error"], outports=["seen"])
def log_errors(context):
    return {"seen": context.get_payload()["error"].unwrap()}
'''


async def test_errors_go_out_of_the_error_port_besides_the_callers_error(make_host):
    config = """\
network:
  processes:
    risky: {component: Risky}
    riskyjs: {component: RiskyJs}
    log: {component: ErrorLog}
  connections:
    - {src: {process: risky, port: error}, tgt: {process: log, port: error}}
    - {src: {process: riskyjs, port: error}, tgt: {process: log, port: error}}
"""
    host = await make_host({"risky.actor.py": RISKY, "risky.actor.js": RISKY_JS, "log.actor.py": LOGGER}, config)
    async with open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "log"})
        notes = c.on_notification(sub["subscription"])
        expected = []
        for actor, how, code, text in (("risky", "raise", None, "cannot take that"), ("risky", "return", 7, "refused"),
                                       ("riskyjs", "raise", None, "out of range"), ("riskyjs", "return", 8, "refused")):
            with pytest.raises(RpcError) as err:
                await c.call(actor, {"x": how})
            assert err.value.code == -32002 and text in err.value.message
            expected.append({"message": text, "code": code})
        assert (await c.call("risky", {"x": 1}))["outputs"] == {"y": {"type": "integer", "value": 1}}
        seen = []
        with trio.fail_after(15):
            while len(seen) < len(expected):
                seen.append((await notes.receive())["params"]["message"]["value"])
    assert sorted(seen, key=str) == sorted(expected, key=str)


async def test_durable_fan_in_keeps_a_waiting_value_across_a_host_sigkill(make_host):
    import signal

    config = fan_in("{data: 100, tgt: {process: sum, port: b}}")
    host = await make_host({"double.actor.py": DOUBLE, "sum.actor.py": SUM}, config)
    r = host.redis()
    async with open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "sum"})
        notes = c.on_notification(sub["subscription"])
        await c.send("d1", "x", 1)  # meets the IIP: 2 + 100
        with trio.fail_after(10):
            assert (await notes.receive())["params"]["message"]["value"] == 102
        await c.send("d1", "x", 2)  # a = 4 waits for a b, in Redis
        await wait_for(lambda: r.llen("reflow:sum:fanin:a") == 1)
    host.signal(signal.SIGKILL)
    await host.wait()
    await host.start()
    # The restart sent the IIP again: it completes the a that survived the kill, and Sum took it.
    await wait_for(lambda: (r.llen("reflow:sum:fanin:a"), r.llen("reflow:sum:fanin:b"),
                            r.xlen("reflow:sum:inbox")) == (0, 0, 0))
    async with open_client(host.url) as c:
        sub = await c.request("actor.subscribe", {"actor": "sum"})
        notes = c.on_notification(sub["subscription"])
        await c.send("d2", "x", 5)
        await c.send("d1", "x", 3)
        with trio.fail_after(10):
            assert (await notes.receive())["params"]["message"]["value"] == 6 + 10
    assert r.llen("reflow:sum:fanin:a") == 0 and r.llen("reflow:sum:fanin:b") == 0


COUNTER_PY = '''
from reflow import actor

@actor(name="CountPy", inports=["x"], outports=["n"])
def count(context):
    state = context.get_state()
    n = state.get("n", 0) + 1          # a read-modify-write: only correct if messages never overlap
    state.set("n", n)
    return {"n": n}
'''

COUNTER_JS = '''\
module.exports = actor({name: 'CountJs', inports: ['x'], outports: ['n']}, async (ctx) => {
  const state = ctx.getState();
  const n = (await state.get('n', 0)) + 1;
  state.set('n', n);
  return {n};
});
'''


async def test_many_calls_in_flight_see_each_others_state_in_order(make_host):
    # The cell sends the next message to the worker before the current one is answered;
    # each must still see the state the previous one committed.
    host = await make_host({"count.actor.py": COUNTER_PY, "count.actor.js": COUNTER_JS})
    async with open_client(host.url) as c:
        for actor in ("CountPy", "CountJs"):
            seen: list[int] = []

            async def some() -> None:  # 4 × 50 sequential: 4 calls in flight at all times
                for _ in range(50):
                    seen.append((await c.call(actor, {"x": 1}))["outputs"]["n"]["value"])

            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    for _ in range(4):
                        n.start_soon(some)
            assert sorted(seen) == list(range(1, 201)), actor


async def _ws_pair(server_stream, client_stream, nursery, **server_kw):
    """A trio-websocket server and client connection over two ends of a stream."""
    ends = {}

    async def serve():
        ends["server"] = await (await trio_websocket.wrap_server_stream(nursery, server_stream, **server_kw)).accept()

    async def connect():
        ends["client"] = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/")
    async with trio.open_nursery() as handshake:
        handshake.start_soon(serve)
        handshake.start_soon(connect)
    return ends["server"], ends["client"]


async def test_queued_replies_leave_in_one_write_as_separate_messages():
    """The host's writer joins what is queued (send_messages): one write to the socket,
    still one WebSocket message per frame, in order, text and binary alike. Over a real
    trio-websocket connection pair; the stream counts the writes."""
    from trio.testing import memory_stream_pair

    from supervisor._wsio import send_messages

    server_stream, client_stream = memory_stream_pair()
    writes = []
    real_send_all = server_stream.send_all

    async def counted(data):
        writes.append(len(data))
        await real_send_all(data)
    server_stream.send_all = counted
    async with trio.open_nursery() as n:
        server, client = await _ws_pair(server_stream, client_stream, n)
        writes.clear()
        frames = ['{"id":1}', b"@3 {}\nabc", "é" * 10]
        await send_messages(server, frames)
        assert len(writes) == 1
        assert [await client.get_message() for _ in frames] == frames
        await client.aclose()
        with pytest.raises(trio_websocket.ConnectionClosed):
            await send_messages(server, ["late"])
        n.cancel_scope.cancel()
    # Over a socket the bytes go straight out while they fit; 3 MB do not, and the rest
    # follows in order while the client reads.
    a, b = trio.socket.socketpair()
    async with trio.open_nursery() as n:
        server, client = await _ws_pair(trio.SocketStream(a), trio.SocketStream(b), n)
        frames = ["x" * 1_000_000, b"\0" * 1_000_000, "é" * 500_000, "last"]
        n.start_soon(send_messages, server, frames)
        assert [await client.get_message() for _ in frames] == frames
        n.cancel_scope.cancel()


async def test_waiting_messages_are_read_together_in_order():
    """get_messages returns the next message and those trio-websocket has already queued
    behind it (no task switch each), in order; what was sent before a close is still read,
    then ConnectionClosed. Over a real trio-websocket pair."""
    from trio.testing import memory_stream_pair, wait_all_tasks_blocked

    from supervisor._wsio import get_messages, send_messages

    server_stream, client_stream = memory_stream_pair()
    async with trio.open_nursery() as n:
        server, client = await _ws_pair(server_stream, client_stream, n, message_queue_size=8)
        await send_messages(client, ["a", b"b", "c"])
        await wait_all_tasks_blocked()
        assert await get_messages(server) == ["a", b"b", "c"]
        sent = [str(i) for i in range(50)]
        await send_messages(client, sent)
        got, sizes = [], []
        while len(got) < len(sent):
            await wait_all_tasks_blocked()
            batch = await get_messages(server)
            got += batch
            sizes.append(len(batch))
        assert got == sent
        assert max(sizes) > 1
        await send_messages(client, ["last"])
        await client.aclose()
        assert await get_messages(server) == ["last"]
        with pytest.raises(trio_websocket.ConnectionClosed):
            await get_messages(server)
        n.cancel_scope.cancel()


async def test_messages_of_one_read_are_queued_without_a_task_switch_each():
    """eager_reader: trio-websocket's reader queues every message of one network read
    before anything else runs, so the first get_messages after a burst takes them all
    (its own send yields per message: the connection task then woke for each). The
    queue's bound and its close still hold. Over a real trio-websocket pair."""
    from trio.testing import memory_stream_pair, wait_all_tasks_blocked

    from supervisor._wsio import eager_reader, get_messages, send_messages

    server_stream, client_stream = memory_stream_pair()
    async with trio.open_nursery() as n:
        server, client = await _ws_pair(server_stream, client_stream, n, message_queue_size=32)
        eager_reader(server)
        burst = [f"m{i}" for i in range(20)]
        await send_messages(client, burst)  # one write, one read on the other side
        assert await get_messages(server) == burst
        # Past the queue's bound the reader waits, and nothing is lost or reordered.
        many = [f"n{i}" for i in range(100)]
        await send_messages(client, many)
        await wait_all_tasks_blocked()
        got = []
        while len(got) < len(many):
            batch = await get_messages(server)
            assert len(batch) <= 32 + 2  # the queue, the one taken first, one waiting sender's
            got += batch
        assert got == many
        await client.aclose()
        with pytest.raises(trio_websocket.ConnectionClosed):
            await get_messages(server)
        n.cancel_scope.cancel()


async def test_delivered_messages_reach_take_in_order_and_a_waiting_take_stops_reading():
    """deliver: what trio-websocket queued before comes back (with the message of a reader
    blocked on the full queue), in order; each later message goes to ``take`` as it is
    read, in order; while a ``take`` waits, nothing more is read; after the peer closes,
    get_messages raises ConnectionClosed. Over a real trio-websocket pair."""
    from trio.testing import memory_stream_pair, wait_all_tasks_blocked

    from supervisor._wsio import deliver, get_messages, send_messages

    server_stream, client_stream = memory_stream_pair()
    taken, release = [], trio.Event()

    async def take(msg):
        taken.append(msg)
        if msg == "hold":
            await release.wait()

    async with trio.open_nursery() as n:
        server, client = await _ws_pair(server_stream, client_stream, n, message_queue_size=2)
        sent = ["a", b"b", "c", "d"]
        await send_messages(client, sent)
        await wait_all_tasks_blocked()  # two queued, the reader blocked with the third
        waiting = deliver(server, take)
        # (and from now on its wsproto reads whole frames at once: see the test below)
        assert type(server._wsproto.connection._proto._frame_decoder).__name__ == "_WholeFrames"
        await wait_all_tasks_blocked()
        assert waiting == sent[:3] and taken == sent[3:]
        await send_messages(client, ["hold", "x", b"y"])
        await wait_all_tasks_blocked()
        assert taken == ["d", "hold"]
        assert server._recv_channel.statistics().current_buffer_used == 0
        release.set()
        await wait_all_tasks_blocked()
        assert taken == ["d", "hold", "x", b"y"]
        await client.aclose()
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed):
            await get_messages(server)
        n.cancel_scope.cancel()


def _wsproto_pair():
    """A wsproto client and server connection, handshake done (no extension)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/")))
    next(server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    return client, server


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_the_server_frames_written_by_hand_are_those_wsproto_writes(size):
    """_wsio._encode writes a server's unmasked frame header itself; the bytes must be
    wsproto's own at each length boundary, for text and binary, and a peer must read them."""
    from wsproto.events import BytesMessage, TextMessage

    from supervisor._wsio import _encode

    client, server = _wsproto_pair()
    for message, event in (("x" * size, TextMessage), ("é" * (size // 2), TextMessage),  # (2 bytes each)
                           (os.urandom(size), BytesMessage)):
        ours = _encode(server, message)
        assert ours == bytes(server.send(event(data=message)))
        client.receive_data(ours)
        (got,) = client.events()
        assert got.data == message and got.message_finished
    assert _encode(client, "x") != _encode(client, "x")  # a client's frames go through wsproto: masked
    assert _encode(client, "x")[1] & 0x80


def _client_frame(first: int, payload: bytes, *, masked: bool = True, length: str = "short") -> bytes:
    """One client frame made by hand: ``first`` is its FIN/RSV/opcode byte; ``length``
    "short" is the minimal length field, "two" and "eight" force the longer ones."""
    n = len(payload)
    mask = 0x80 if masked else 0
    if length == "eight" or (length == "short" and n > 0xFFFF):
        head = bytes((first, mask | 127)) + n.to_bytes(8, "big")
    elif length == "two" or (length == "short" and n > 125):
        head = bytes((first, mask | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask | n))
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


_frames = st.one_of(
    st.builds(lambda t: _client_frame(0x81, t.encode()), st.text(max_size=300)),
    st.builds(lambda b: _client_frame(0x82, b), st.binary(max_size=300)),
    st.builds(lambda n: _client_frame(0x82, bytes(n)), st.sampled_from([125, 126, 65535, 65536])),
    st.builds(lambda b: _client_frame(0x89, b), st.binary(max_size=20)),  # ping
    st.builds(lambda a, b: _client_frame(0x01, a.encode()) + _client_frame(0x80, b.encode()),  # fragmented
              st.text(max_size=20), st.text(max_size=20)),
    # what wsproto refuses: a reserved bit, no mask, a longer length field than needed,
    # text that is not UTF-8, an unknown opcode, a continuation with nothing to continue
    st.builds(lambda b: _client_frame(0xC1, b), st.binary(max_size=20)),
    st.builds(lambda b: _client_frame(0x82, b, masked=False), st.binary(max_size=20)),
    st.builds(lambda b, k: _client_frame(0x81, b, length=k), st.binary(max_size=20), st.sampled_from(["two", "eight"])),
    st.builds(lambda: _client_frame(0x81, b"ok\xff\xfe")),
    st.builds(lambda b: _client_frame(0x83, b), st.binary(max_size=20)),
    st.builds(lambda b: _client_frame(0x80, b), st.binary(max_size=20)),
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(_frames, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_whole_frames_read_at_once_give_what_wsproto_gives(frames, cuts):
    """deliver() gives the host's wsproto a decoder that reads a client's whole text or
    binary frame in one step: on any stream of frames, split across reads anywhere, the
    events (and the close a bad frame earns) must be wsproto's own."""
    from supervisor._wsio import read_whole_frames_at_once

    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    outcomes = []
    for fast in (False, True):
        _, server = _wsproto_pair()
        if fast:
            read_whole_frames_at_once(server)
            assert type(server.connection._proto._frame_decoder).__name__ == "_WholeFrames"
        events, text, data = [], "", b""
        for a, b in zip(points, points[1:]):
            server.receive_data(stream[a:b])
            for e in server.events():
                if hasattr(e, "message_finished"):  # (wsproto may hand a message over in parts)
                    if isinstance(e.data, str):
                        text += e.data
                    else:
                        data += e.data
                    if e.message_finished:
                        events.append((type(e).__name__, text or data))
                        text, data = "", b""
                else:
                    events.append((type(e).__name__, repr(e)))
            if events and events[-1][0] == "CloseConnection":
                break
        outcomes.append(events)
    assert outcomes[0] == outcomes[1]


async def test_send_now_writes_at_once_and_leaves_what_the_socket_did_not_take():
    """send_now writes one message without yielding; it does not try while another writer
    holds the stream or after a close; what a full socket did not take goes out first,
    as send_messages' head, and the peer reads every message whole and in order."""
    from supervisor._wsio import send_messages, send_now

    a, b = trio.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # (so that the big one cannot fit)
    async with trio.open_nursery() as n:
        server, client = await _ws_pair(trio.SocketStream(a), trio.SocketStream(b), n)
        rest = send_now(server, '{"id":1}')
        assert rest is not None and len(rest) == 0
        assert await client.get_message() == '{"id":1}'
        async with server._stream_lock:
            assert send_now(server, "busy") is None
        big = "x" * 900_000
        rest = send_now(server, big)
        assert rest is not None and 0 < len(rest) < len(big)
        n.start_soon(send_messages, server, [b"\x01after"], rest)
        assert await client.get_message() == big
        assert await client.get_message() == b"\x01after"
        await client.aclose()  # (returns once the server has answered the close)
        assert send_now(server, "late") is None
        n.cancel_scope.cancel()
