"""The API's limits against a real host, through raw and third-party-style WebSocket clients:
a 10,000-frame fuzz, max_frame_size, max_connections, ping, and clients that stop reading."""

from __future__ import annotations

import random
import socket

import orjson
import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events as ev

from conftest import open_client, wait_for
from supervisor.core import protocol as proto

DOUBLE = '''
from reflow import actor

@actor(name="Double", inports=["x"], outports=["y"])
def double(context):
    return {"y": context.get_input("x") * 2}
'''

CHATTY = '''
from reflow import actor

@actor(name="Chatty", inports=["n"], outports=["out"])
def chatty(context):
    for i in range(context.get_input("n")):
        context.send_output("out", "x" * 4000)
    return {}
'''


async def host_with(make_host, scripts, **ws):
    host = await make_host(scripts, start=False)
    extra = ", ".join(f"{k}: {v}" for k, v in ws.items())
    host.config.write_text(host.config.read_text().replace("websocket: {host: 127.0.0.1,",
                                                           f"websocket: {{{extra}, host: 127.0.0.1,"))
    await host.start()
    return host


# -- the fuzz ---------------------------------------------------------------------------------------

def fuzz_frames(n: int, seed: int = 20261123) -> list[bytes]:
    """Malformed and odd frames of every kind the spec distinguishes (deterministic)."""
    rnd = random.Random(seed)
    ids = [1, -7, 0, "a", "", None, 1.5, True, [], {}, 2**62]
    methods = ["actors.list", "nope", "", 7, None, "$/cancelRequest", "actor.call", "rpc.x"]
    params = [None, {}, [], 3, "s", {"actor": "Double", "inputs": {"x": 2}}, {"actor": 5}, {"id": 1}]

    def message() -> object:
        kind = rnd.random()
        m: dict = {}
        if rnd.random() < 0.9:
            m["jsonrpc"] = "2.0" if rnd.random() < 0.8 else rnd.choice(["1.0", 2, None])
        if rnd.random() < 0.8:
            m["method"] = rnd.choice(methods)
        if kind < 0.6:
            m["id"] = rnd.choice(ids)
        if rnd.random() < 0.6:
            m["params"] = rnd.choice(params)
        if rnd.random() < 0.05:
            m["result"] = 1
        return m if rnd.random() < 0.93 else rnd.choice([1, "x", None, True, [1]])

    frames = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.10:
            frames.append(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 40))))
        elif r < 0.18:
            good = orjson.dumps(message())
            frames.append(good[: rnd.randint(0, max(0, len(good) - 1))])
        elif r < 0.22:
            frames.append(rnd.choice([b"[]", b"[[]]", b"[1,2]", b"{}", b"null", b"NaN", b'{"a":1,"a":2}',
                                      b"[" * 300 + b"]" * 300, b'{"jsonrpc":"2.0","method":"x","id":1e400}']))
        elif r < 0.45:
            frames.append(orjson.dumps([message() for _ in range(rnd.randint(1, 6))]))
        elif r < 0.47:
            frames.append(b'{"jsonrpc":"2.0","method":"nope","id":%d}' % (2**70 + rnd.randint(0, 9)))
        else:
            frames.append(orjson.dumps(message()))
    return frames


def expected_reply(frame: bytes) -> bool:
    """Whether the spec wants a reply frame at all (the oracle is the pure protocol module)."""
    decoded = proto.decode_frame(frame)
    if decoded.is_batch and not decoded.items:
        return True  # an empty batch gets one error
    # Requests and invalid messages are answered; notifications never; a stray response is
    # a peer's answer to nothing we asked, and is dropped.
    return any(isinstance(item, (proto.Request, proto.Invalid)) for item in decoded.items)


def valid_reply(obj: object) -> bool:
    if isinstance(obj, list):
        return bool(obj) and all(valid_reply(x) for x in obj)
    return (isinstance(obj, dict) and obj.get("jsonrpc") == "2.0" and "id" in obj
            and (("result" in obj) != ("error" in obj)))


async def test_ten_thousand_malformed_frames_get_the_specs_answers_and_hurt_nobody(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    frames = fuzz_frames(10_000)
    want = sum(expected_reply(f) for f in frames)
    got: list = []
    sentinel = b'{"jsonrpc":"2.0","id":"end","method":"no.such.method"}'

    async def fuzz(chunk: list[bytes]) -> None:
        async with trio_websocket.open_websocket_url(host.url, max_message_size=2**24) as ws:
            ended = trio.Event()

            async def reader() -> None:
                while True:
                    raw = await ws.get_message()
                    obj = orjson.loads(raw)
                    if isinstance(obj, dict) and obj.get("id") == "end":
                        ended.set()
                    else:
                        got.append(obj)

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                for f in chunk:
                    await ws.send_message(f)  # bytes → a binary frame; the host reads it the same
                await ws.send_message(sentinel)
                await ended.wait()
                with trio.move_on_after(60):
                    # Replies to real calls run in tasks and may trail the sentinel: keep
                    # reading until every fuzzer's replies are in.
                    while len(got) < want:
                        await trio.sleep(0.05)
                n.cancel_scope.cancel()

    calls = 0

    async def bystander() -> None:
        nonlocal calls
        async with open_client(host.url) as c:
            while True:
                assert (await c.call("Double", {"x": calls}))["outputs"]["y"]["value"] == 2 * calls
                calls += 1
                await trio.sleep(0.01)

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(bystander)
            async with trio.open_nursery() as fuzzers:
                for k in range(4):
                    fuzzers.start_soon(fuzz, frames[k::4])
            n.cancel_scope.cancel()
    assert host.proc.poll() is None, "the host died"
    assert calls > 0
    assert len(got) == want
    assert all(valid_reply(r) for r in got), [r for r in got if not valid_reply(r)][:3]
    parse_errors = [r for r in got if isinstance(r, dict) and r.get("error", {}).get("code") == -32700]
    assert parse_errors and all(r["id"] is None for r in parse_errors)


# -- max_frame_size, max_connections, ping ----------------------------------------------------------

async def test_an_oversized_frame_gets_an_error_then_1009_and_others_carry_on(make_host):
    host = await host_with(make_host, {"double.actor.py": DOUBLE}, max_frame_size="100KB")
    async with open_client(host.url) as bystander:
        async with trio_websocket.open_websocket_url(host.url, max_message_size=2**24) as ws:
            await ws.send_message(orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "actors.list",
                                                "params": {"pad": "x" * 150_000}}).decode())
            reply = orjson.loads(await ws.get_message())
            assert reply["id"] is None and reply["error"]["code"] == -32600
            assert reply["error"]["data"] == {"limit": "max_frame_size", "max": 100_000,
                                              "size": reply["error"]["data"]["size"]}
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009
        async with trio_websocket.open_websocket_url(host.url, max_message_size=2**24) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.send_message("y" * 300_000)  # far over: closed at once, maybe mid-send
                await ws.get_message()
            assert closed.value.reason.code == 1009
        assert (await bystander.call("Double", {"x": 4}))["outputs"]["y"]["value"] == 8


async def test_max_connections_refuses_the_one_too_many_and_frees_its_place(make_host):
    host = await host_with(make_host, {"double.actor.py": DOUBLE}, max_connections=3)
    async with open_client(host.url) as a, open_client(host.url) as b, open_client(host.url) as c:
        with pytest.raises(trio_websocket.HandshakeError):
            async with trio_websocket.open_websocket_url(host.url):
                pass
        assert (await a.call("Double", {"x": 1}))["outputs"]["y"]["value"] == 2
        await b.status()
        await c.status()
    async with open_client(host.url) as d:  # the places are free again
        assert (await d.call("Double", {"x": 2}))["outputs"]["y"]["value"] == 4


def raw_websocket(url: str) -> tuple[socket.socket, wsproto.WSConnection]:
    """A WebSocket that completes the handshake and then never reads, answers pings or
    sends a frame unless told to: the dead peer and the stalled reader of the tests."""
    hostport = url.split("//", 1)[1].strip("/")
    host, port = hostport.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock.sendall(conn.send(ev.Request(host=hostport, target="/")))
    conn.receive_data(sock.recv(65536))
    assert any(isinstance(e, ev.AcceptConnection) for e in conn.events())
    return sock, conn


async def test_a_peer_that_stops_answering_pings_is_closed(make_host):
    host = await host_with(make_host, {"double.actor.py": DOUBLE}, ping_interval=0.5)
    sock, _ = raw_websocket(host.url)
    sock.setblocking(False)

    async def closed_by_host() -> bool:
        data = b""
        with trio.move_on_after(10):
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    await trio.sleep(0.05)
                    continue
                if not chunk:
                    return True
                data += chunk
        return False

    assert await closed_by_host(), "the host kept a silent peer"
    sock.close()
    async with open_client(host.url) as c:
        assert (await c.call("Double", {"x": 3}))["outputs"]["y"]["value"] == 6


async def test_two_hundred_clients_that_stop_reading_are_cut_off_and_stall_no_one(make_host):
    host = await host_with(make_host, {"chatty.actor.py": CHATTY, "double.actor.py": DOUBLE}, max_connections=250)
    stalled = []
    for i in range(200):
        s, ws = raw_websocket(host.url)
        frame = orjson.dumps({"jsonrpc": "2.0", "id": i, "method": "actor.subscribe", "params": {"actor": "Chatty"}})
        s.sendall(ws.send(ev.TextMessage(data=frame.decode())))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.append(s)

    def rss_mb() -> float:
        with open(f"/proc/{host.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    before = rss_mb()
    async with open_client(host.url) as c:
        for round_ in range(8):
            with trio.fail_after(30):  # 200 outputs of 4 KB, fanned out to 200 stalled clients
                await c.call("Chatty", {"n": 200})
            with trio.fail_after(5):
                assert (await c.call("Double", {"x": round_}))["outputs"]["y"]["value"] == 2 * round_
        await wait_for(lambda: host.output().count("is not reading; closing it") >= 150, timeout=30)
    # Each connection holds at most SEND_QUEUE frames before it is cut off, then nothing.
    assert rss_mb() - before < 300, (before, rss_mb())
    for s in stalled:
        s.close()


# -- max_in_flight -----------------------------------------------------------------------------------

SLOW = '''
import time
from reflow import actor

@actor(name="Slow", inports=["x"], outports=["y"])
def slow(context):
    time.sleep(context.get_input("x"))
    return {"y": 1}
'''


async def test_max_in_flight_counts_waiting_calls_and_frees_them_when_answered(make_host):
    """Calls wait for their messages without a task each; they still count against
    max_in_flight, and each frees its place once answered (or cancelled)."""
    host = await host_with(make_host, {"slow.actor.py": SLOW}, max_in_flight=2)
    async with trio_websocket.open_websocket_url(host.url) as ws:
        def call(rid, x):
            return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "actor.call",
                                 "params": {"actor": "Slow", "inputs": {"x": x}}}).decode()
        for rid in (1, 2, 3):
            await ws.send_message(call(rid, 0.2))
        with trio.fail_after(10):
            refused = orjson.loads(await ws.get_message())
            assert refused["id"] == 3 and refused["error"]["code"] == -32004
            assert "in flight" in refused["error"]["message"]
            got = {orjson.loads(await ws.get_message())["id"] for _ in range(2)}
            assert got == {1, 2}
            await ws.send_message(call(4, 5))
            await ws.send_message('{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 4}}')
            assert orjson.loads(await ws.get_message())["error"]["code"] == -32800
            for rid in (5, 6):  # the answered and the cancelled calls left room for two more
                await ws.send_message(orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "actors.list"}).decode())
            assert {orjson.loads(await ws.get_message())["id"] for _ in range(2)} == {5, 6}
