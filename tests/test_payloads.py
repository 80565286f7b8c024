"""Large payloads: raw attachments on the sandbox channel instead of base64 in JSON.

The framing is property-tested between the host's LineChannel and the worker's own
Channel (reflow_worker.py) over a real socketpair; the rest runs through a real host:
bytes in and out of a bubblewrap worker, a buffer-protocol return value, bytes routed
through a durable (Redis) mailbox to a second actor, and a worker that lies about its
attachments.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from pathlib import Path

import orjson
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import find_actor, open_client, wait_for
from supervisor._channel import BadFrame, LineChannel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "supervisor" / "runtime" / "python"))
import reflow_worker  # noqa: E402  (the in-sandbox worker's channel, run here on a socketpair)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
blobs = st.binary(max_size=2048) | st.sampled_from([b"", b"\n", b"@1 {}\n", os.urandom(300_000)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=json_values, attachments=st.lists(blobs, max_size=4), trailing=json_values)
def test_frames_with_attachments_round_trip_both_ways(header, attachments, trailing):
    host_sock, worker_sock = socket.socketpair()
    worker = reflow_worker.Channel(worker_sock.fileno())

    async def main() -> None:
        chan = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(host_sock)), max_frame=1 << 22)
        refs = [{"type": "bytes", "$att": k} for k in range(len(attachments))]
        sent = {"params": header, "refs": refs}
        # host → worker: the frame, then a plain frame right behind it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chan.send_with, orjson.dumps(sent), attachments)
            nursery.start_soon(chan.send, orjson.dumps(trailing))
            got = await trio.to_thread.run_sync(worker.receive_new)
            after = await trio.to_thread.run_sync(worker.receive_new)
        atts = got.pop("_atts", [])
        assert got == sent and [bytes(a) for a in atts] == attachments and after == trailing
        assert all(a.readonly for a in atts)
        # worker → host, with memoryviews and bytearrays as the buffers
        bufs = [memoryview(a) if i % 2 else bytearray(a) for i, a in enumerate(attachments)]

        def write() -> None:
            worker.send(sent, bufs)
            worker.send(trailing)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, write)
            assert orjson.loads(await chan.receive()) == sent and chan.attachments == attachments
            assert orjson.loads(await chan.receive()) == trailing and chan.attachments == []
        await chan.aclose()

    try:
        trio.run(main)
    finally:
        worker_sock.close()


async def test_reading_frames_already_waiting_still_lets_other_tasks_run(monkeypatch):
    """The host reads what waits on a worker's socket without a trip through the scheduler,
    but never more than a few reads in a row: a worker that never stops writing must not
    keep the host's other tasks (or a timeout) from running."""
    from supervisor import _channel

    monkeypatch.setattr(_channel, "_READ_SIZE", 4096)  # 50 reads for what is waiting below
    host_sock, worker_sock = socket.socketpair()
    frame = b'{"method":"log","params":{"text":"' + b"x" * 960 + b'"}}\n'
    frames = 200
    worker_sock.sendall(frame * frames)  # all of it already waiting before the first read
    chan = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(host_sock)))
    ran = 0

    async def other_task():
        nonlocal ran
        while True:
            ran += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.sleep(0)
        ran = 0
        for _ in range(frames):
            assert await chan.receive() == frame[:-1]
        assert ran >= 5, "the other task never ran while 200 waiting frames were read"
        nursery.cancel_scope.cancel()
    worker_sock.close()
    await chan.aclose()


@pytest.mark.parametrize("garbage", [b"@x {}\n", b"@-1 {}\n", b"@ {}\n"])
async def test_a_malformed_attachment_header_is_a_bad_frame(garbage):
    a, b = trio.testing.memory_stream_pair()
    chan = LineChannel(b)
    await a.send_all(garbage)
    with pytest.raises(BadFrame):
        await chan.receive()


ECHO = '''
import array
from reflow import actor, Message

@actor(name="Echo", inports=["data", "doubles"], outports=["data", "kind", "error"])
def echo(context):
    if context.has_input("doubles"):  # any buffer-protocol object is sent as bytes
        return {"data": array.array("d", context.get_input("doubles"))}
    d = context.get_input("data")
    context.send_output("kind", f"{type(d).__name__} readonly={d.readonly}")
    return {"data": Message.bytes(d)}
'''

SIZE = '''
from reflow import actor

@actor(name="Size", inports=["data"], outports=["size"])
def size(context):
    d = context.get_input("data")
    total = context.get_state().increment("bytes", len(d))
    return {"size": total}
'''

LIAR = '''
import os, sys
from reflow import actor

@actor(name="Liar", inports=["x"], outports=["y"])
def liar(context):
    fd = int(sys.argv[-1])
    os.write(fd, b'@3 {"jsonrpc":"2.0","method":"output","params":{"port":"y","message":{"type":"bytes","$att":7}}}\\nabc')
    return {"y": 1}
'''


async def test_bytes_cross_a_real_worker_as_attachments_and_reach_clients_as_base64(make_host):
    host = await make_host({"echo.actor.py": ECHO})
    data = os.urandom(3 << 20) + b"\n@"
    async with open_client(host.url) as c:
        res = await c.call("Echo", {"data": {"type": "bytes", "value": base64.b64encode(data).decode()}})
        assert [e["message"]["value"] for e in res["emitted"] if e["port"] == "kind"] == ["memoryview readonly=True"]
        assert base64.b64decode(res["outputs"]["data"]["value"]) == data
        res = await c.call("Echo", {"doubles": [1.5, -2.0]})
        raw = base64.b64decode(res["outputs"]["data"]["value"])
        import array
        assert array.array("d", raw).tolist() == [1.5, -2.0]


async def test_bytes_routed_through_a_durable_mailbox_arrive_whole(make_host):
    config = """\
network:
  processes: {Echo: {component: Echo}, Size: {component: Size}}
  connections: [{src: {process: Echo, port: data}, tgt: {process: Size, port: data}}]
"""
    host = await make_host({"echo.actor.py": ECHO, "size.actor.py": SIZE}, config)
    async with open_client(host.url) as c:
        for n in (1, 70_000):
            await c.send("Echo", "data", {"type": "bytes", "value": base64.b64encode(b"x" * n).decode()})
    r = host.redis()
    await wait_for(lambda: r.get("reflow:Size:state:bytes") == b"70001", timeout=30)
    assert r.xlen("reflow:deadletter") == 0


async def test_a_worker_naming_an_attachment_it_did_not_send_is_killed_and_others_carry_on(make_host):
    host = await make_host({"liar.actor.py": LIAR, "echo.actor.py": ECHO})
    async with open_client(host.url) as c:
        with pytest.raises(Exception) as err:
            await c.call("Liar", {"x": 1})
        assert err.value.code == -32002 and "attachment" in err.value.message
        res = await c.call("Echo", {"data": {"type": "bytes", "value": "AAE="}})
        assert res["outputs"]["data"]["value"] == "AAE="


# -- the client API: binary frames -----------------------------------------------------------------

@given(body=json_values, attachments=st.lists(st.binary(max_size=300), max_size=5))
def test_attachment_frames_split_back_into_their_parts(body, attachments):
    from supervisor.core.protocol import Blob, attach, bind_attachments, split_attachments

    refs = {"refs": [{"type": "bytes", "$att": k} for k in range(len(attachments))], "body": body}
    frame = attach(orjson.dumps(refs), attachments)
    if attachments:
        raw, atts = split_attachments(frame)
        bound = bind_attachments(orjson.loads(raw), atts, lambda v: Blob(bytes(v)))
        assert [m["value"] for m in bound["refs"]] == [Blob(a) for a in attachments] and bound["body"] == body
    else:
        assert frame == orjson.dumps(refs)  # nothing to attach: plain JSON


async def test_the_python_client_in_binary_mode_sends_and_gets_raw_bytes(make_host):
    host = await make_host({"echo.actor.py": ECHO})
    data = os.urandom(2 << 20)
    async with open_client(host.url, binary=True) as c:
        res = await c.call("Echo", {"data": data})
        assert res["outputs"]["data"] == {"type": "bytes", "value": data}
        res = await c.call("Echo", {"data": {"type": "bytes", "value": "AAE="}})  # base64 in, bytes out
        assert res["outputs"]["data"]["value"] == b"\x00\x01"
    async with open_client(host.url) as c:  # a text client on the same host: base64, as ever
        res = await c.call("Echo", {"data": {"type": "bytes", "value": "AAE="}})
        assert res["outputs"]["data"]["value"] == "AAE="


async def test_a_raw_websocket_client_gets_attachment_frames_back_and_a_parse_error_for_bad_ones(make_host):
    import trio_websocket

    host = await make_host({"echo.actor.py": ECHO})
    async with trio_websocket.open_websocket_url(host.url, max_message_size=2**24) as ws:
        call = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "actor.call",
                             "params": {"actor": "Echo", "inputs": {"data": {"type": "bytes", "$att": 0}}}})
        await ws.send_message(b"@5 " + call + b"\nhello")
        reply = await ws.get_message()
        assert isinstance(reply, bytes) and reply.startswith(b"@5 ") and reply.endswith(b"\nhello")
        for bad in (b"@9 {}\nhello", b"@x {}\n", b'@1 {"jsonrpc":"2.0","id":2,"method":"actors.list","params":'
                                                  b'{"x":{"type":"bytes","$att":3}}}\nA'):
            await ws.send_message(bad)
            err = orjson.loads(await ws.get_message())
            assert err["error"]["code"] == -32700 and err["id"] is None, err
        await ws.send_message(orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "actors.list"}))
        assert orjson.loads(await ws.get_message())["id"] == 3  # still served


# -- shared memory ----------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40), lag=st.integers(0, 3))
def test_host_ring_to_worker_view_round_trips_across_wrap_around(sizes, lag):
    """The host produces into a small ``in`` ring, the worker's own code reads the slots,
    the host releases them a few messages late: every payload arrives whole, wrap-around
    included, and a full ring says so (None) instead of overwriting a live slot."""
    from supervisor._shm import Regions

    regions = Regions(16 * 1024)
    worker = reflow_worker._Shm({"in": os.dup(regions.child_in), "out": os.dup(regions.child_out),
                                 "size": regions.size, "threshold": 0})
    try:
        live: list[tuple[list[int], bytes]] = []
        for i, n in enumerate(sizes):
            data = bytes([i % 251]) * n
            ref = regions.inbound.put(data)
            while ref is None and live:  # full: the oldest message finishes
                regions.inbound.release(live.pop(0)[0][3])
                ref = regions.inbound.put(data)
            if ref is None:
                assert n + 16 > regions.size - 64 - 64, "an empty ring refused a payload that fits"
                continue
            live.append((ref, data))
            for r, d in live:  # everything still live is intact
                assert bytes(worker.view(r)) == d
            while len(live) > lag:
                regions.inbound.release(live.pop(0)[0][3])
    finally:
        regions.close()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40))
def test_worker_ring_to_host_take_round_trips_and_rejects_torn_or_stale_slots(sizes):
    from supervisor._shm import Regions, ShmError

    regions = Regions(16 * 1024)
    worker = reflow_worker._Shm({"in": os.dup(regions.child_in), "out": os.dup(regions.child_out),
                                 "size": regions.size, "threshold": 0})
    try:
        taken: list[list[int]] = []
        for i, n in enumerate(sizes):
            data = os.urandom(n)
            ref = worker.put(data)
            if ref is None:
                assert n + 16 > regions.size - 64 - 64
                continue
            assert regions.outbound.take(ref) == data
            taken.append(ref)
        for old in taken[:-1]:  # a reference to a slot since reused no longer matches its header
            try:
                got = regions.outbound.view(old)
            except ShmError:
                continue
            assert len(got) == old[1]
        if taken:  # a torn slot (the header never written) is refused, not read
            ref = taken[-1]
            regions.maps[1][ref[0] - 16:ref[0] - 8] = b"\0" * 8
            with pytest.raises(ShmError):
                regions.outbound.take(ref)
        for bad in ([0, 1, 1, 1], [regions.size - 8, 64, 1, 1], "x", [1, 2, 3]):
            with pytest.raises(ShmError):
                regions.outbound.view(bad)
    finally:
        regions.close()


SNOOP_SHM = '''
import fcntl, os, stat
from reflow import actor

@actor(name="Peek", inports=["x"], outports=["mine", "size"])
def peek(context):
    # No /proc: what a worker holds is what its descriptors are. Shared memory is the only
    # kind of regular file a worker has open (its in ring read-only, its out ring read-write).
    mine = []
    for fd in range(3, 1024):
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                mine.append("rw" if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR else "ro")
        except OSError:
            pass
    return {"mine": sorted(mine), "size": len(context.get_input("x"))}
'''

CRASH_MID_WRITE = '''
import fcntl, mmap, os, signal, stat
from reflow import actor

@actor(name="Torn", inports=["data", "crash"], outports=["data"])
def torn(context):
    if context.has_input("crash"):  # scribble over our whole out ring, then die mid-"write"
        for fd in range(3, 1024):  # the out ring: the one read-write regular file
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR:
                    m = mmap.mmap(fd, os.fstat(fd).st_size)
                    m[:] = os.urandom(len(m))
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGKILL)
    return {"data": context.get_input("data")}
'''


async def test_large_bytes_go_through_shared_memory_and_each_worker_sees_only_its_own(make_host):
    host = await make_host({"echo.actor.py": ECHO, "peek.actor.py": SNOOP_SHM})
    data = os.urandom(5 << 20)
    async with open_client(host.url, binary=True) as c:
        for _ in range(3):  # several, so the ring wraps
            res = await c.call("Echo", {"data": data})
            assert res["outputs"]["data"]["value"] == data
        peek = (await c.call("Peek", {"x": b"y" * (200 << 10)}))["outputs"]
        echo = find_actor(await c.status(), "Echo")
    assert echo["bytes"] == "shared-memory"
    assert peek["size"]["value"] == 200 << 10
    # its own two regions (the Echo worker's are in another pid namespace), nothing else
    assert peek["mine"]["value"] == ["ro", "rw"], peek["mine"]


async def test_a_worker_killed_mid_write_leaves_nothing_corrupt_and_the_next_message_whole(make_host):
    host = await make_host({"torn.actor.py": CRASH_MID_WRITE})
    data = os.urandom(1 << 20)
    async with open_client(host.url, binary=True) as c:
        assert (await c.call("Torn", {"data": data}))["outputs"]["data"]["value"] == data
        with pytest.raises(Exception) as err:
            await c.call("Torn", {"crash": 1})
        assert err.value.code == -32002
        for _ in range(2):  # a fresh worker, a fresh region: intact
            assert (await c.call("Torn", {"data": data}, timeout=30))["outputs"]["data"]["value"] == data


ECHO_JS = '''
const { actor, Message } = require('reflow');

module.exports = actor({name: 'EchoJs', inports: ['data'], outports: ['data', 'kind']}, (context) => {
  const d = context.getInput('data');
  context.sendOutput('kind', Buffer.isBuffer(d) ? 'buffer' : typeof d);
  return {data: Message.bytes(d)};
});
'''


async def test_node_workers_take_and_give_bytes_as_attachments(make_host):
    from supervisor._child import runtime_unavailable

    if (why := runtime_unavailable("javascript")) is not None:
        pytest.skip(why)
    host = await make_host({"echo.actor.js": ECHO_JS})
    data = os.urandom(3 << 20) + b"\n@"
    async with open_client(host.url, binary=True) as c:
        res = await c.call("EchoJs", {"data": data})
        assert find_actor(await c.status(), "EchoJs")["bytes"] == "attachments"
    assert res["outputs"]["data"]["value"] == data
    assert [e["message"]["value"] for e in res["emitted"]] == ["buffer"]


@settings(max_examples=300, deadline=None)
@given(value=json_values | st.floats(allow_nan=False, allow_infinity=False), garbage=st.text(max_size=30))
@example(value=None, garbage="NaN")
@example(value=None, garbage=" [1, -Infinity] ")
def test_the_workers_json_codec_matches_the_standard_librarys(value, garbage):
    """The worker skips ``import json`` (it pulls in ``re``: ~8 ms of every cold start) and
    drives the C ``_json`` directly; it must write and read exactly what ``json`` does."""
    import json

    assert reflow_worker._dumps.__qualname__ == "_json_codec.<locals>.dumps"  # not the fallback
    std = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    assert reflow_worker._dumps(value) == std(value)
    assert reflow_worker._loads(std(value).encode()) == json.loads(std(value))
    try:
        expected = json.loads(garbage)
    except ValueError:
        with pytest.raises(ValueError):
            reflow_worker._loads(garbage.encode())
    else:  # (compared as text: "NaN" parses to a nan, which equals nothing)
        assert json.dumps(reflow_worker._loads(garbage.encode())) == json.dumps(expected)


def test_the_workers_json_encoder_recovers_from_a_dump_that_failed_midway():
    """One encoder writes every reply; a dump that fails midway (a value JSON cannot hold,
    a cycle) must not leave its circular-reference markers behind to fail the next one."""
    bad = {"a": [1, {"b": object()}]}
    with pytest.raises(TypeError):
        reflow_worker._dumps(bad)
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError):
        reflow_worker._dumps(cycle)
    bad["a"][1]["b"] = 2  # the same containers, now encodable
    assert reflow_worker._dumps(bad) == '{"a":[1,{"b":2}]}'
    assert reflow_worker._loads(bytearray(b'{"x": [1]}')) == {"x": [1]}  # (how frames are read)


def test_a_wire_message_whose_type_is_not_a_string_is_a_plain_value():
    """The SDK looks types up in a set: a hostile ``type`` that cannot be hashed must still
    read as a plain value, and ``Message`` must still say the type is unknown."""
    import reflow

    odd = {"type": ["integer"], "value": 1}
    assert reflow.Message.from_wire(odd) == reflow.Message("object", odd)
    assert reflow.Message.from_wire({"type": "integer", "value": 1}) == reflow.Message.integer(1)
    with pytest.raises(ValueError, match="unknown message type"):
        reflow.Message({"not": "hashable"}, 1)


async def test_a_payload_larger_than_the_ring_falls_back_to_attachments_and_arrives(make_host):
    host = await make_host({"echo.actor.py": ECHO})
    cfg = host.config.read_text().replace("    backend: bubblewrap\n", "    backend: bubblewrap\n    shm_size: 1MiB\n")
    await host.stop()
    host.config.write_text(cfg)
    await host.start()
    async with open_client(host.url, binary=True) as c:
        for size in (600 << 10, 3 << 20, 600 << 10):  # fits, does not, fits again
            data = os.urandom(size)
            assert (await c.call("Echo", {"data": data}))["outputs"]["data"]["value"] == data
        assert find_actor(await c.status(), "Echo")["bytes"] == "shared-memory"


ORDER = '''
import time
from reflow import actor

@actor(name="Order", inports=["x"], outports=["n"])
def order(context):
    x = context.get_input("x")
    time.sleep(x.get("sleep", 0))
    st = context.get_state()
    seen = st.get("seen") or []
    seen.append(x["seq"])
    st.set("seen", seen)
    return {"n": len(x["pad"])}
'''


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_backlog_of_large_messages_runs_once_each_in_order(make_host, kind):
    """40 messages of 100 KB wait while the worker is busy, more than one ~1 MiB send-ahead
    write holds: the cell stops each write at the cap and takes the rest in later writes;
    every one runs once, in the order it was accepted."""
    host = await make_host({"order.actor.py": ORDER}, start=False)
    host.config.write_text(host.config.read_text().replace("  root: .\n", f"  root: .\n  mailbox: {{kind: {kind}}}\n"))
    await host.start()
    pad = "p" * 100_000
    async with open_client(host.url) as c:
        await c.call("Order", {"x": {"seq": -2, "pad": ""}})  # loaded and warm
        await c.send("Order", "x", {"seq": -1, "pad": "", "sleep": 0.5})  # the backlog builds behind it
        for seq in range(40):
            await c.send("Order", "x", {"seq": seq, "pad": pad})
    r = host.redis()
    await wait_for(lambda: len(orjson.loads(r.get("reflow:Order:state:seen") or b"[]")) >= 42, timeout=30)
    assert orjson.loads(r.get("reflow:Order:state:seen")) == [-2, -1, *range(40)]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_sends_pipelined_in_batch_frames_run_in_the_order_they_were_sent(make_host, kind):
    """Three batch frames of 40 actor.send each, written back to back without waiting for
    an answer: the actor sees the 120 messages (within max_in_flight) in the order the frames list them."""
    host = await make_host({"order.actor.py": ORDER}, start=False)
    host.config.write_text(host.config.read_text().replace("  root: .\n", f"  root: .\n  mailbox: {{kind: {kind}}}\n"))
    await host.start()
    async with open_client(host.url) as c:
        await c.call("Order", {"x": {"seq": -1, "pad": ""}})  # loaded and warm
    await _send_batches(host, [[("Order", "x", {"seq": 40 * frame + i, "pad": ""}) for i in range(40)]
                               for frame in range(3)])
    assert await _state_list(host, "Order", "seen", 121) == [-1, *range(120)]


async def _send_batches(host, frames: list[list[tuple[str, str, object]]]) -> None:
    """Write each frame, a batch of actor.send (actor, port, value), back to back without
    waiting for an answer; then check every one was accepted."""
    import trio_websocket

    rid = 0
    async with trio_websocket.open_websocket_url(host.url) as ws:
        for frame in frames:
            batch = []
            for actor, port, value in frame:
                rid += 1
                batch.append({"jsonrpc": "2.0", "id": rid, "method": "actor.send",
                              "params": {"actor": actor, "port": port, "value": value}})
            await ws.send_message(orjson.dumps(batch).decode())
        replies = []
        with trio.fail_after(20):
            while len(replies) < rid:
                replies += orjson.loads(await ws.get_message())
    assert all("result" in r for r in replies), [r for r in replies if "result" not in r][:3]


async def _state_list(host, actor: str, key: str, n: int) -> list:
    """The list an actor keeps in state ``key``, once it holds ``n`` items."""
    r = host.redis()
    await wait_for(lambda: len(orjson.loads(r.get(f"reflow:{actor}:state:{key}") or b"[]")) >= n, timeout=30)
    return orjson.loads(r.get(f"reflow:{actor}:state:{key}"))


PAIRS = '''
from reflow import actor

@actor(name="Pairs", inports=["a", "b"], outports=[], await_all_inports=True)
def pairs(context):
    st = context.get_state()
    seen = st.get("seen") or []
    seen.append([context.get_input("a"), context.get_input("b")])
    st.set("seen", seen)
'''


async def test_sends_to_a_durable_fan_in_are_paired_in_the_order_they_were_sent(make_host):
    """A batch frame of 40 sends to port a, then one of 40 to port b (await_all_inports, durable):
    the i-th a meets the i-th b, and the pairs run in that order."""
    host = await make_host({"pairs.actor.py": PAIRS})
    await _send_batches(host, [[("Pairs", port, i) for i in range(40)] for port in ("a", "b")])
    assert await _state_list(host, "Pairs", "seen", 40) == [[i, i] for i in range(40)]
