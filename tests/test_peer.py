"""The JSON-RPC peer: unit tests against a hand-written wire, real WebSockets, and a
stateful test of two real peers on a real byte stream, with calls, cancels and
disconnects overlapping in virtual time."""

from __future__ import annotations

import itertools
import math
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from conftest import wait_for
from supervisor.core.errors import UnknownActor
from supervisor._peer import (ConnectionLost, FrameTooLarge, Peer, RpcError, StreamTransport, WebSocketTransport,
                              open_peer)


class Raw:
    """The other end of the wire, written and read by hand."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.wire = StreamTransport(stream)

    async def send(self, msg: Any) -> None:
        await self.wire.send(msg if isinstance(msg, (bytes, str)) else orjson.dumps(msg))

    async def recv(self) -> Any:
        with trio.fail_after(5):
            return orjson.loads(await self.wire.receive())


@asynccontextmanager
async def peer_and_raw(handler=None, on_notification=None, **options):
    s1, s2 = trio.testing.memory_stream_pair()
    async with open_peer(StreamTransport(s1, **options), handler, on_notification) as peer:
        yield peer, Raw(s2)


@asynccontextmanager
async def two_peers(a_handler=None, b_handler=None, a_notes=None, b_notes=None):
    s1, s2 = trio.testing.memory_stream_pair()
    async with open_peer(StreamTransport(s1), a_handler, a_notes) as a, \
            open_peer(StreamTransport(s2), b_handler, b_notes) as b:
        yield a, b


async def echo(method: str, params: Any) -> Any:
    return {"method": method, "params": params}


def request(rid: Any, method: str, params: Any = None) -> dict:
    msg = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def cancel(rid: Any) -> dict:
    return {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": rid}}


# -- calls and answers ---------------------------------------------------------------------------

async def test_call_and_reply_both_ways_and_concurrently():
    async with two_peers(echo, echo) as (a, b):
        assert await a.call("m", {"x": 1}) == {"method": "m", "params": {"x": 1}}
        assert await b.call("n", [1, 2]) == {"method": "n", "params": [1, 2]}
        assert await a.call("none") == {"method": "none", "params": None}
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await (a if i % 2 else b).call("m", {"i": i})

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        assert all(results[i]["params"] == {"i": i} for i in range(50))
        assert a.pending == b.pending == a.serving == b.serving == ()


async def test_an_error_reply_carries_code_message_and_data():
    async def handler(method, params):
        if method == "rpc":
            raise RpcError(-32001, "unknown actor 'x'", {"actor": "x"})
        raise UnknownActor("y")  # the package's own errors keep their code too

    async with two_peers(b_handler=handler) as (a, b):
        with pytest.raises(RpcError) as err:
            await a.call("rpc")
        assert (err.value.code, err.value.message, err.value.data) == (-32001, "unknown actor 'x'", {"actor": "x"})
        assert str(err.value) == "unknown actor 'x' (-32001)"
        with pytest.raises(RpcError) as err:
            await a.call("actor")
        assert (err.value.code, err.value.data) == (-32001, {"actor": "y"})
        with pytest.raises(RpcError) as err:
            await b.call("anything")  # a has no handler
        assert (err.value.code, err.value.message) == (-32601, "method not found: anything")


async def test_a_handler_exception_is_minus_32603_without_its_traceback(caplog):
    async def handler(method, params):
        raise ValueError("secret /home/alice/token")

    async with peer_and_raw(handler) as (peer, raw):
        await raw.send(request(1, "m"))
        reply = await raw.recv()
    assert reply == {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "internal error: ValueError"}}
    assert "secret" in caplog.text  # logged here, with its traceback, for whoever runs this side


async def test_params_that_are_not_json_raise_before_anything_is_sent():
    async with two_peers(echo, echo) as (a, b):
        with pytest.raises(TypeError):
            await a.call("m", 5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="NaN"):
            await a.call("m", {"x": float("nan")})
        with pytest.raises(ValueError):
            await a.notify("m", {"x": object()})
        assert a.pending == () and b.serving == ()
        assert (await a.call("m"))["method"] == "m"


async def test_a_result_that_is_not_json_is_minus_32603_for_that_request_alone():
    async def handler(method, params):
        return float("nan") if method == "nan" else 1

    async with peer_and_raw(handler) as (peer, raw):
        await raw.send([request(1, "nan"), request(2, "ok")])
        replies = {r["id"]: r for r in await raw.recv()}
    assert replies[1]["error"]["code"] == -32603 and "NaN" in replies[1]["error"]["message"]
    assert replies[2]["result"] == 1


# -- notifications --------------------------------------------------------------------------------

async def test_notifications_arrive_in_order_both_ways_and_are_never_answered():
    got_a: list = []
    got_b: list = []
    async with two_peers(echo, echo, lambda m, p: got_a.append((m, p)), lambda m, p: got_b.append((m, p))) as (a, b):
        for i in range(5):
            await a.notify("tick", {"i": i})
        await b.notify("tock")
        # One ordered wire: an answer to a later call means the notifications were delivered.
        await a.call("sync")
        await b.call("sync")
        assert got_b == [("tick", {"i": i}) for i in range(5)]
        assert got_a == [("tock", None)]
    async with peer_and_raw(echo, lambda m, p: None) as (peer, raw):
        await raw.send({"jsonrpc": "2.0", "method": "note", "params": [1]})
        await raw.send(request(2, "m"))
        assert (await raw.recv())["id"] == 2  # the notification got nothing


# -- cancellation ----------------------------------------------------------------------------------

async def test_cancel_request_cancels_that_handler_and_it_is_still_answered_minus_32800():
    cancelled: list = []

    async def handler(method, params):
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(params["n"])
            raise

    async with peer_and_raw(handler) as (peer, raw):
        await raw.send(request(1, "slow", {"n": "int"}))
        await raw.send(request("1", "slow", {"n": "str"}))  # the same number as a string: another request
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(peer.serving, key=str) == [1, "1"]
        # Neither True nor 1.0 is the id 1 (as they would be for a Python dict), nor is an unknown id.
        for rid in (True, 1.0, 99, [1]):
            await raw.send(cancel(rid))
        await raw.send(cancel("1"))
        assert await raw.recv() == {"jsonrpc": "2.0", "id": "1",
                                    "error": {"code": -32800, "message": "request cancelled"}}
        await raw.send(cancel(1))
        assert (await raw.recv())["id"] == 1
        assert cancelled == ["str", "int"] and peer.serving == ()
        # A cancel later in the same batch finds its request: the batch is answered -32800.
        await raw.send([request(3, "slow", {"n": 3}), cancel(3)])
        assert await raw.recv() == [{"jsonrpc": "2.0", "id": 3, "error": {"code": -32800,
                                                                          "message": "request cancelled"}}]


async def test_a_cancelled_call_sends_cancel_request_after_its_request_and_ignores_the_late_answer(autojump_clock):
    async with peer_and_raw() as (peer, raw):
        async with trio.open_nursery() as nursery:
            async def caller() -> None:
                with trio.move_on_after(1):
                    await peer.call("slow", {"x": 1})

            nursery.start_soon(caller)
            req = await raw.recv()
            assert req == request(req["id"], "slow", {"x": 1})
            assert await raw.recv() == cancel(req["id"])
        assert peer.pending == ()
        # The other side answers -32800 as the contract says; nobody waits for it now.
        await raw.send({"jsonrpc": "2.0", "id": req["id"], "error": {"code": -32800, "message": "request cancelled"}})
        async with trio.open_nursery() as nursery:
            got = []

            async def call() -> None:
                got.append(await peer.call("next"))
            nursery.start_soon(call)
            nxt = await raw.recv()
            await raw.send({"jsonrpc": "2.0", "id": nxt["id"], "result": "ok"})
        assert got == ["ok"]


async def test_cancelling_a_call_cancels_the_handler_on_the_other_peer(autojump_clock):
    ended = []

    async def hang(method, params):
        try:
            await trio.sleep_forever()
        finally:
            ended.append(params)

    async with two_peers(b_handler=hang) as (a, b):
        with trio.move_on_after(2) as scope:
            await a.call("hang", [1])
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert ended == [[1]] and a.pending == () and b.serving == ()
        with pytest.raises(RpcError):
            await b.call("x")  # both still work
        assert a.pending == b.pending == ()


# -- losing the connection ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["the other side closes", "we close", "the transport breaks"])
async def test_a_lost_connection_fails_every_pending_call_once_and_leaves_nothing(how):
    ended = []

    async def hang(method, params):
        try:
            await trio.sleep_forever()
        finally:
            ended.append(params["i"])

    s1, s2 = trio.testing.memory_stream_pair()
    a, b = Peer(StreamTransport(s1)), Peer(StreamTransport(s2), hang)
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)

        async def call(i: int) -> None:
            with pytest.raises(ConnectionLost) as err:
                await a.call("hang", {"i": i})
            errors.append(str(err.value))

        for i in range(5):
            nursery.start_soon(call, i)
        await trio.testing.wait_all_tasks_blocked()
        assert len(a.pending) == 5 and len(b.serving) == 5
        if how == "the other side closes":
            await b.aclose()
        elif how == "we close":
            await a.aclose()
        else:
            await s1.aclose()
        with trio.fail_after(5):
            await a.wait_closed()
            await b.wait_closed()
    assert len(errors) == 5 and len(set(errors)) == 1 and errors[0] == a.closed_reason
    assert {"the other side closes": "(EOF)", "we close": "closed by this side",
            "the transport breaks": "cannot receive"}[how] in errors[0]
    assert sorted(ended) == list(range(5))  # the handlers were cancelled: nothing works for nobody
    assert a.pending == b.pending == a.serving == b.serving == ()
    with pytest.raises(ConnectionLost) as err:
        await a.call("again")
    assert str(err.value) == errors[0]
    with pytest.raises(ConnectionLost):
        await a.notify("again")


async def test_responses_nobody_waits_for_are_ignored():
    async with peer_and_raw(echo) as (peer, raw):
        for junk in ({"jsonrpc": "2.0", "id": 999, "result": 1},
                     {"jsonrpc": "2.0", "id": "1", "result": 1},
                     {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}},
                     {"jsonrpc": "2.0", "id": 5, "error": {"code": 1, "message": "x"}}):
            await raw.send(junk)
        got = []
        async with trio.open_nursery() as nursery:
            async def call() -> None:
                got.append(await peer.call("m"))
            nursery.start_soon(call)
            req = await raw.recv()  # the request: none of the junk was answered
            assert req["method"] == "m"
            await raw.send({"jsonrpc": "2.0", "id": str(req["id"]), "result": "a str id is another id"})
            await raw.send({"jsonrpc": "2.0", "id": req["id"], "result": "right"})
            await raw.send({"jsonrpc": "2.0", "id": req["id"], "result": "a second answer"})
        assert got == ["right"]
        await raw.send(request(3, "m"))
        assert (await raw.recv())["id"] == 3  # still serving


async def test_a_malformed_response_fails_its_call():
    async with peer_and_raw() as (peer, raw):
        async with trio.open_nursery() as nursery:
            async def call() -> None:
                with pytest.raises(RpcError, match="malformed response") as err:
                    await peer.call("m")
                assert err.value.code == -32600
            nursery.start_soon(call)
            req = await raw.recv()
            await raw.send({"jsonrpc": "2.0", "id": req["id"], "error": "not an object"})
        assert peer.pending == ()


# -- batches and bad frames -----------------------------------------------------------------------

async def test_a_batch_from_the_other_side_is_answered_with_one_array():
    notes: list = []

    async def handler(method, params):
        if method == "fail":
            raise RpcError(1, "no")
        return params

    async with peer_and_raw(handler, lambda m, p: notes.append(m)) as (peer, raw):
        await raw.send([request(1, "echo", [1]), {"jsonrpc": "2.0", "method": "note"}, request(2, "fail"), 1])
        replies = await raw.recv()
        assert isinstance(replies, list) and len(replies) == 3
        by_id = {r["id"]: r for r in replies}
        assert by_id[1]["result"] == [1]
        assert by_id[2]["error"] == {"code": 1, "message": "no"}
        assert by_id[None]["error"]["code"] == -32600
        assert notes == ["note"]
        # Notifications only: no answer at all (the spec forbids an empty array).
        await raw.send([{"jsonrpc": "2.0", "method": "a"}, {"jsonrpc": "2.0", "method": "b"}])
        await raw.send(request(4, "echo"))
        assert (await raw.recv())["id"] == 4
        # Bad frames get single error objects with id null.
        await raw.send(b"{nope")
        r = await raw.recv()
        assert r["id"] is None and r["error"]["code"] == -32700
        await raw.send(b"[]")
        r = await raw.recv()
        assert r["id"] is None and r["error"]["code"] == -32600
        # A batch of answers resolves several of our calls, in whatever order.
        got: dict[int, Any] = {}
        async with trio.open_nursery() as nursery:
            async def call(i: int) -> None:
                got[i] = await peer.call("m", {"i": i})
            nursery.start_soon(call, 0)
            nursery.start_soon(call, 1)
            reqs = [await raw.recv(), await raw.recv()]
            await raw.send([{"jsonrpc": "2.0", "id": q["id"], "result": q["params"]["i"]} for q in reversed(reqs)])
        assert got == {0: 0, 1: 1} and peer.pending == ()


async def test_an_oversized_line_is_answered_then_the_connection_closes():
    async with peer_and_raw(echo, max_frame_size=100) as (peer, raw):
        async with trio.open_nursery() as nursery:
            async def pending_call() -> None:
                with pytest.raises(ConnectionLost, match="max_frame_size"):
                    await peer.call("m")
            nursery.start_soon(pending_call)
            await raw.recv()  # its request
            await raw.stream.send_all(b'{"jsonrpc": "2.0", "id": 1, "method": "' + b"x" * 10_000)  # no newline
            reply = await raw.recv()
        assert reply["id"] is None and reply["error"]["code"] == -32600
        assert "max_frame_size (100 bytes)" in reply["error"]["message"] and reply["error"]["data"]["max"] == 100
        with trio.fail_after(5):
            await peer.wait_closed()
        with pytest.raises(ConnectionLost, match="EOF"):
            await raw.wire.receive()  # the peer closed the connection
        assert peer.pending == peer.serving == ()


async def test_the_stream_transport_frames_lines_and_bounds_its_buffer():
    s1, s2 = trio.testing.memory_stream_pair()
    t = StreamTransport(s2, max_frame_size=10, read_size=4)
    await s1.send_all(b'{"a":1}\n\n  \n[1,2]\n{"b"')
    assert await t.receive() == b'{"a":1}'
    assert await t.receive() == b"[1,2]"  # blank lines are skipped
    await s1.send_all(b":2}\n")
    assert await t.receive() == b'{"b":2}'
    await s1.send_all(b"y" * 1000)
    with pytest.raises(FrameTooLarge, match="exceeds max_frame_size"):
        await t.receive()
    assert len(t._buf) <= 10 + 4 + 1  # read no further than the limit
    with pytest.raises(ValueError, match="newline"):
        await t.send(b"a\nb")

    s3, s4 = trio.testing.memory_stream_pair()
    t = StreamTransport(s4)
    await s3.send_all(b'{"half')
    await s3.aclose()
    with pytest.raises(ConnectionLost, match="mid-frame"):
        await t.receive()
    await t.aclose()
    with pytest.raises(ConnectionLost, match="cannot send"):
        await t.send(b"{}")


# -- WebSocket ------------------------------------------------------------------------------------

@asynccontextmanager
async def over_websocket(handler, on_notification=None, client_handler=None):
    """A client peer and a served peer (``handler``) over a real WebSocket: (client, [served])."""
    served: list[Peer] = []

    async def serve(req: trio_websocket.WebSocketRequest) -> None:
        ws = await req.accept()
        async with open_peer(WebSocketTransport(ws), handler, on_notification) as p:
            served.append(p)
            await p.wait_closed()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, serve, "127.0.0.1", 0, None)
        async with trio_websocket.open_websocket("127.0.0.1", server.port, "/", use_ssl=False) as ws, \
                open_peer(WebSocketTransport(ws), client_handler) as client:
            yield client, served
        nursery.cancel_scope.cancel()


async def test_peers_over_a_real_websocket_call_both_ways_and_see_the_close():
    async def handler(method, params):
        if method == "hang":
            await trio.sleep_forever()
        return await echo(method, params)

    async with over_websocket(handler, client_handler=echo) as (client, served):
        assert await client.call("m", {"x": 1}) == {"method": "m", "params": {"x": 1}}
        assert await served[0].call("back", [2]) == {"method": "back", "params": [2]}
        async with trio.open_nursery() as calls:
            async def hang() -> None:
                with pytest.raises(ConnectionLost, match="connection closed"):
                    await client.call("hang")
            calls.start_soon(hang)
            await trio.testing.wait_all_tasks_blocked()
            assert len(served[0].serving) == 1
            await served[0].aclose()
        assert client.pending == () and served[0].serving == ()


async def test_many_callers_over_a_real_websocket_are_each_answered_and_keep_their_order():
    """Many callers at once over a WebSocket, with notifications and cancelled calls among
    them: each call gets its own answer, each caller's frames arrive in the order it sent
    them (a notification, then the call after it), and each cancelled call's handler on
    the other side is cancelled."""
    arrived: list[tuple[str, Any]] = []

    async def handler(method, params):
        arrived.append((method, params["k"]))
        if method == "hang":
            await trio.sleep_forever()
        await trio.sleep(0)
        return params

    async with over_websocket(handler, lambda m, p: arrived.append((m, p["k"]))) as (client, served):
        got: dict[int, Any] = {}

        async def caller(t: int) -> None:
            for i in range(20):
                k = t * 100 + i
                await client.notify("note", {"k": k})
                if i % 7 == 3:
                    with trio.move_on_after(0.01):
                        await client.call("hang", {"k": k})
                    continue
                got[k] = await client.call("m", {"k": k})

        with trio.fail_after(20):
            async with trio.open_nursery() as callers:
                for t in range(20):
                    callers.start_soon(caller, t)
            assert await client.call("m", {"k": "last"}) == {"k": "last"}  # behind every frame before
        assert got == {k: {"k": k} for k in got} and len(got) == 20 * 17
        at = {frame: i for i, frame in enumerate(arrived)}
        assert all(at[("note", k)] < at[("m", k)] for k in got)
        assert len([f for f in arrived if f[0] == "note"]) == 20 * 20
        await wait_for(lambda: not served[0].serving)  # each cancel reached the other side


def test_client_reexports_the_one_definition_of_its_errors():
    from supervisor import _peer, client

    assert client.RpcError is _peer.RpcError and client.ConnectionLost is _peer.ConnectionLost
    assert {"RpcError", "ConnectionLost"} <= set(client.__all__)


# -- two real peers, many overlapping operations --------------------------------------------------

MODES = ("value", "error", "raise", "sleep", "hang")
DELAYS = (0.5, 1.0, 2.0, 2.5)   # equal to a timeout sometimes: the answer and the cancel cross
TIMEOUTS = (None, 1.0, 2.0)
GAPS = (0.0, 0.0, 0.25, 1.0)
QUIET = 5.0                     # longer than any delay or timeout


class Conn:
    """One connection generation: two peers on one memory stream pair."""

    def __init__(self, g: int):
        self.g = g
        self.live = True
        self.lost_at = math.inf
        self.sent: dict[str, list[int]] = {"a": [], "b": []}  # notifications sent by a side
        self.got: dict[str, list[int]] = {"a": [], "b": []}   # notifications received by a side
        self.peers: dict[str, Peer] = {}
        self.streams: tuple = ()


class CallRecord:
    def __init__(self, n: int, side: str, g: int, mode: str, delay: float, timeout: float | None, t0: float):
        self.n, self.side, self.g, self.mode, self.delay, self.timeout, self.t0 = n, side, g, mode, delay, timeout, t0
        self.params = {"n": n, "mode": mode, "delay": delay}
        self.outcomes: list[tuple[str, Any, float]] = []


class Program:
    """Runs the operations the state machine wrote, in one trio.run with an autojump clock,
    and checks every call against what its timing says it must have got."""

    def __init__(self, ops: list[tuple], read_size: int):
        self.ops = ops
        self.read_size = read_size
        self.conns: list[Conn] = []
        self.calls: list[CallRecord] = []
        self.handled: dict[int, str] = {}  # call n -> "done" | "cancelled", once its handler ended
        self.started: set[int] = set()
        self.keys = itertools.count()

    def run(self) -> None:
        budget = sum(op[1] for op in self.ops) + QUIET * (1 + sum(op[0] == "quiet" for op in self.ops)) + 60
        trio.run(self.main, budget, clock=trio.testing.MockClock(autojump_threshold=0))
        self.check(final=True)

    async def main(self, budget: float) -> None:
        with trio.fail_after(budget):  # nothing hangs: a stuck task would jump the clock here
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await self.connect()
                for op in self.ops:
                    await trio.sleep(op[1])
                    await getattr(self, "do_" + op[0])(*op[2:])
                if self.conn.live:
                    await self.do_disconnect("a")
                # Leaving the nursery waits for every call: each must resolve now.

    async def connect(self) -> None:
        conn = Conn(len(self.conns))
        s1, s2 = trio.testing.memory_stream_pair()
        conn.streams = (s1, s2)
        for side, stream in (("a", s1), ("b", s2)):
            got = conn.got[side]
            conn.peers[side] = Peer(StreamTransport(stream, read_size=self.read_size), self.handler,
                                    lambda m, p, got=got: got.append(p["k"]))
            await self.nursery.start(conn.peers[side].run)
        self.conns.append(conn)
        self.conn = conn

    async def handler(self, method: str, params: Any) -> Any:
        n = params["n"]
        self.started.add(n)
        try:
            if params["mode"] == "error":
                raise RpcError(1000 + n, f"error {n}", {"n": n})
            if params["mode"] == "raise":
                raise ValueError(f"bug {n}")
            if params["mode"] == "sleep":
                await trio.sleep(params["delay"])
            elif params["mode"] == "hang":
                await trio.sleep_forever()
            return {"echo": params}
        except trio.Cancelled:
            self.handled[n] = "cancelled"
            raise
        finally:
            self.handled.setdefault(n, "done")

    async def do_call(self, side: str, mode: str, delay: float, timeout: float | None) -> None:
        rec = CallRecord(len(self.calls), side, self.conn.g, mode, delay, timeout, trio.current_time())
        self.calls.append(rec)
        self.nursery.start_soon(self.one_call, rec, self.conn)

    async def one_call(self, rec: CallRecord, conn: Conn) -> None:
        try:
            with trio.move_on_after(math.inf if rec.timeout is None else rec.timeout) as scope:
                result = await conn.peers[rec.side].call("op", rec.params)
                rec.outcomes.append(("result", result, trio.current_time()))
            if scope.cancelled_caught:
                rec.outcomes.append(("timeout", None, trio.current_time()))
        except RpcError as exc:
            rec.outcomes.append(("rpc", (exc.code, exc.message, exc.data), trio.current_time()))
        except ConnectionLost as exc:
            rec.outcomes.append(("lost", conn.live, trio.current_time()))
            assert str(exc)

    async def do_notify(self, side: str) -> None:
        conn, k = self.conn, next(self.keys)
        try:
            await conn.peers[side].notify("note", {"k": k})
        except ConnectionLost:
            assert not conn.live
        else:
            conn.sent[side].append(k)

    async def do_disconnect(self, how: str) -> None:
        conn = self.conn
        conn.live, conn.lost_at = False, trio.current_time()
        if how == "eof":
            await conn.streams[0].aclose()  # the transport breaks under a
        else:
            await conn.peers[how].aclose()

    async def do_reconnect(self) -> None:
        await self.connect()

    async def do_quiet(self) -> None:
        await trio.sleep(QUIET)
        self.check(final=False)

    # -- checks ----------------------------------------------------------------------------------

    def check(self, final: bool) -> None:
        for rec in self.calls:
            assert len(rec.outcomes) <= 1, f"call {rec.n} resolved twice: {rec.outcomes}"
            if final or rec.outcomes:
                assert len(rec.outcomes) == 1, f"call {rec.n} never resolved"
                self.check_outcome(rec)
        unresolved = [r for r in self.calls if not r.outcomes]
        for r in unresolved:  # quiet: only what may wait forever still waits
            assert r.mode == "hang" and r.timeout is None and self.conns[r.g].live, vars(r)
        for conn in self.conns:
            for side, other in (("a", "b"), ("b", "a")):
                peer = conn.peers[side]
                waiting = [r for r in unresolved if r.g == conn.g and r.side == side]
                assert len(peer.pending) == len(waiting), (peer.pending, waiting)
                assert len(conn.peers[other].serving) == len(waiting)
                received, sent = conn.got[other], conn.sent[side]
                assert received == sent[:len(received)], "a notification was lost, duplicated or reordered"
                if conn.live:
                    assert received == sent
                else:
                    assert peer.closed_reason is not None
        # Every handler that started has ended, except the ones still owed an answer.
        assert self.started - set(self.handled) == {r.n for r in unresolved}

    def check_outcome(self, rec: CallRecord) -> None:
        kind, value, t1 = rec.outcomes[0]
        done_at = {"sleep": rec.t0 + rec.delay, "hang": math.inf}.get(rec.mode, rec.t0)
        deadline = math.inf if rec.timeout is None else rec.t0 + rec.timeout
        lost_at = self.conns[rec.g].lost_at
        what = f"call {rec.n} {rec.mode} delay={rec.delay} timeout={rec.timeout} t0={rec.t0} lost_at={lost_at}: " \
               f"{rec.outcomes}"
        if kind in ("result", "rpc"):  # answered: it must have been done by the deadline and the loss
            assert done_at <= deadline and done_at <= lost_at and t1 == pytest.approx(done_at), what
            expected = {"value": ("result", {"echo": rec.params}), "sleep": ("result", {"echo": rec.params}),
                        "error": ("rpc", (1000 + rec.n, f"error {rec.n}", {"n": rec.n})),
                        "raise": ("rpc", (-32603, "internal error: ValueError", None))}[rec.mode]
            assert (kind, value) == expected, what  # its own answer, never another call's
        elif kind == "timeout":
            assert deadline <= done_at and deadline <= lost_at and t1 == pytest.approx(deadline), what
            if rec.n in self.started and deadline < lost_at:  # the cancel reached the handler
                assert self.handled.get(rec.n) == "cancelled" or done_at == deadline, what
        else:
            assert value is False, f"ConnectionLost on a live connection: {what}"
            # at the loss, or at once for a call made on a connection already lost
            assert lost_at <= done_at and lost_at <= deadline and t1 == pytest.approx(max(lost_at, rec.t0)), what


class PeerPairMachine(RuleBasedStateMachine):
    """Writes a program of overlapping operations on two peers; teardown runs and checks it.

    Running the whole program in one trio.run (with an autojump clock) is what
    lets calls, answers, cancels and disconnects really overlap, while every
    example stays deterministic in virtual time and shrinks to a short program.
    """

    @initialize(read_size=st.sampled_from([3, 64, 65536]))
    def start(self, read_size: int) -> None:
        self.read_size = read_size
        self.ops: list[tuple] = []
        self.connected = True

    @rule(gap=st.sampled_from(GAPS), side=st.sampled_from("ab"), mode=st.sampled_from(MODES),
          delay=st.sampled_from(DELAYS), timeout=st.sampled_from(TIMEOUTS))
    def call(self, gap, side, mode, delay, timeout) -> None:
        self.ops.append(("call", gap, side, mode, delay, timeout))

    @rule(gap=st.sampled_from(GAPS), side=st.sampled_from("ab"))
    def notify(self, gap, side) -> None:
        self.ops.append(("notify", gap, side))

    @precondition(lambda self: self.connected)
    @rule(gap=st.sampled_from(GAPS), how=st.sampled_from(["a", "b", "eof"]))
    def disconnect(self, gap, how) -> None:
        self.ops.append(("disconnect", gap, how))
        self.connected = False

    @precondition(lambda self: not self.connected)
    @rule(gap=st.sampled_from(GAPS))
    def reconnect(self, gap) -> None:
        self.ops.append(("reconnect", gap))
        self.connected = True

    @rule()
    def quiet(self) -> None:
        self.ops.append(("quiet", 0.0))

    def teardown(self) -> None:
        if getattr(self, "ops", None):
            Program(self.ops, self.read_size).run()


TestPeerPair = PeerPairMachine.TestCase
TestPeerPair.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
