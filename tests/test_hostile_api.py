"""Valid JSON that no part of the host can carry is the client's fault, and no client ends the host.

Integers beyond signed 64 bits and nesting past MAX_DEPTH are refused with -32602 naming the
limit, before they reach a mailbox (they used to crash the cell: orjson refuses to write
them; three of them made the root give up). Scripts meet the same limits as script errors.
"""

from __future__ import annotations

import json

import orjson
import pytest
import trio_websocket

from _rawws import RawWs, pipeline_until_stalled, port_of
from conftest import wait_for
from supervisor.core.protocol import INT_MAX, INT_MIN, MAX_DEPTH

ECHO = '''
from reflow import actor

@actor(name="Echo", inports=["x"], outports=["y"])
def echo(context):
    return {"y": context.get_input("x")}
'''


def deep(n: int) -> object:
    """A value of ``n`` nested arrays."""
    v: object = 0
    for _ in range(n):
        v = [v]
    return v


# (limit, value): each is valid JSON. A request nests its inputs' values 3 levels down.
HOSTILE = [("integer", 2**64), ("integer", INT_MAX + 1), ("integer", INT_MIN - 1), ("integer", -(10**40)),
           ("integer", [1, {"a": 10**30}]), ("depth", deep(MAX_DEPTH - 1)), ("depth", deep(600))]


def rpc(rid, method, params=None) -> dict:
    if params is None:
        return {"jsonrpc": "2.0", "id": rid, "method": method}
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


def text(obj) -> str:
    return json.dumps(obj)  # (the stdlib writes any integer and ~1000 levels exactly)


async def ask(ws, obj):
    await ws.send_message(text(obj))
    return orjson.loads(await ws.get_message())


def restarts(node: dict) -> int:
    return node.get("restarts", 0) + sum(restarts(c) for c in node.get("children", []))


async def status(ws) -> dict:
    return (await ask(ws, rpc("st", "supervisor.status", None)))["result"]


def assert_refused(reply: dict, limit: str, rid) -> None:
    assert reply["id"] == rid, reply
    err = reply["error"]
    assert err["code"] == -32602, reply
    assert err["data"]["limit"] == limit, reply
    if limit == "depth":
        assert err["data"]["max"] == MAX_DEPTH and str(MAX_DEPTH) in err["message"]
    else:
        assert (err["data"]["min"], err["data"]["max"]) == (INT_MIN, INT_MAX) and "64-bit" in err["message"]


@pytest.mark.parametrize("mailbox", ["redis", "memory"])
async def test_hostile_values_are_refused_with_minus_32602_and_no_actor_fails(make_host, mailbox):
    host = await make_host({"echo.actor.py": ECHO}, "", start=False)
    host.config.write_text(host.config.read_text().replace("  root: .\n", f"  root: .\n  mailbox: {{kind: {mailbox}}}\n"))
    await host.start()
    async with trio_websocket.open_websocket_url(host.url) as ws:
        for i, (limit, value) in enumerate(HOSTILE):
            assert_refused(await ask(ws, rpc(i, "actor.call", {"actor": "Echo", "inputs": {"x": value}})), limit, i)
            assert_refused(await ask(ws, rpc(i, "actor.send", {"actor": "Echo", "port": "x", "value": value})), limit, i)
            typed = {"type": "integer" if limit == "integer" and isinstance(value, int) else "any", "value": value}
            assert_refused(await ask(ws, rpc(i, "actor.call", {"actor": "Echo", "inputs": {"x": typed}})), limit, i)
            assert_refused(await ask(ws, rpc(i, "process", {"actor_id": "Echo", "payload": {"x": value}})), limit, i)
            assert_refused(await ask(ws, rpc(i, "process", {"actor_id": "Echo", "payload": {"x": 1},
                                                         "config": {"c": value}})), limit, i)
            # In a batch, the hostile entry alone is refused; the others are served.
            batch = await ask(ws, [rpc("good", "actor.call", {"actor": "Echo", "inputs": {"x": 7}}),
                                   rpc("bad", "actor.call", {"actor": "Echo", "inputs": {"x": value}}),
                                   {"jsonrpc": "2.0", "method": "actor.send",
                                    "params": {"actor": "Echo", "port": "x", "value": value}}])
            by_id = {r["id"]: r for r in batch}
            assert set(by_id) == {"good", "bad"}  # (the notification is refused without an answer)
            assert by_id["good"]["result"]["outputs"]["y"] == {"type": "integer", "value": 7}
            assert_refused(by_id["bad"], limit, "bad")
        # The actor never saw any of it: it serves on, never restarted, and the tree is running.
        r = await ask(ws, rpc("after", "actor.call", {"actor": "Echo", "inputs": {"x": 41}}))
        assert r["result"]["outputs"]["y"]["value"] == 41
        tree = await status(ws)
        assert tree["state"] == "running" and restarts(tree) == 0, tree


async def test_the_supported_range_is_exact_end_to_end(make_host):
    """Signed 64-bit integers and values nested to the limit go through a Python actor exactly."""
    host = await make_host({"echo.actor.py": ECHO})
    async with trio_websocket.open_websocket_url(host.url) as ws:
        for v in (INT_MAX, INT_MIN, 2**53 + 1, -(2**62) - 3, [INT_MAX, {"k": INT_MIN}]):
            r = await ask(ws, rpc(1, "actor.call", {"actor": "Echo", "inputs": {"x": v}}))
            assert r["result"]["outputs"]["y"]["value"] == v, r
        v = deep(120)  # (the most a script may send back; a request may carry a few more levels)
        r = await ask(ws, rpc(2, "actor.call", {"actor": "Echo", "inputs": {"x": v}}))
        assert r["result"]["outputs"]["y"]["value"] == v
        r = await ask(ws, rpc(3, "actor.call", {"actor": "Echo", "inputs": {"x": deep(MAX_DEPTH - 3)}}))
        assert r["error"]["code"] == -32002 and "nested deeper than 120" in r["error"]["message"]  # accepted, not echoed


async def test_a_client_that_stalls_under_backpressure_and_vanishes_never_ends_the_host(make_host):
    """Pipelining requests without reading until the host stops reading, then a TCP close:
    the host used to exit ("Nursery is closed to new arrivals") 5 of 5 times."""
    host = await make_host({"echo.actor.py": ECHO})
    port = port_of(host.url)
    frame = text([rpc(i, "actors.list", None) for i in range(50)])
    for _ in range(5):
        ws = await RawWs.connect(port)
        assert await pipeline_until_stalled(ws, frame) > 0
        ws.abort()
        async with trio_websocket.open_websocket_url(host.url) as check:
            assert (await ask(check, rpc(1, "actors.list", None)))["result"]["actors"][0]["name"] == "Echo"
            # the vanished client leaves nothing behind: only this connection, with no work
            await wait_for(lambda: _only_me(check), timeout=20)
        assert host.proc.poll() is None
    assert "internal error" not in host.output()


async def _only_me(ws) -> bool:
    api = (await status(ws))["api"]  # (the status request itself is in flight)
    return api["connections"] == 1 and api["in_flight"] == 1 and api["subscribers"] == 0


PY_SCRIPTS = '''
from reflow import actor, Message

@actor(name="PyBig", inports=["how"], outports=["y"])
def big(context):
    how = context.get_input("how")
    if how == "return":
        return {"y": 2**64}
    if how == "message":
        return {"y": Message.integer(2**70)}
    if how == "nested":
        return {"y": {"a": [1, -2**64]}}
    if how == "state":
        context.get_state().set("k", 2**64)
    if how == "deep":
        v = 0
        for _ in range(200):
            v = [v]
        return {"y": v}
    if how == "ok":
        context.get_state().set("k", 2**63 - 1)
        return {"y": context.get_state().get("k")}
    return {"y": 0}
'''

JS_SCRIPT = '''
// @actor({name: "JsBig", inports: ["how"], outports: ["y"]})
module.exports = actor({name: "JsBig", inports: ["how"], outports: ["y"]}, async function (context) {
  const how = context.getInput("how");
  if (how === "return") return {y: 2 ** 64};
  if (how === "message") return {y: Message.integer(2 ** 70)};
  if (how === "nested") return {y: {a: [1, -(2 ** 64)]}};
  if (how === "state") context.getState().set("k", 2 ** 64);
  if (how === "deep") { let v = 0; for (let i = 0; i < 200; i++) v = [v]; return {y: v}; }
  if (how === "ok") { context.getState().set("k", Number.MAX_SAFE_INTEGER); return {y: context.getState().get("k")}; }
  return {y: 0};
});
'''


async def test_scripts_that_make_integers_out_of_range_or_nest_too_deep_fail_clearly(make_host):
    host = await make_host({"big.actor.py": PY_SCRIPTS, "big.actor.js": JS_SCRIPT})
    async with trio_websocket.open_websocket_url(host.url) as ws:
        for actor, error in (("PyBig", "ValueError"), ("JsBig", "RangeError")):
            for how, says in (("return", "out of range"), ("message", "out of range"), ("nested", "out of range"),
                              ("state", "out of range"), ("deep", "nested deeper than 120")):
                r = await ask(ws, rpc(how, "actor.call", {"actor": actor, "inputs": {"how": how}}))
                err = r.get("error")
                assert err and err["code"] == -32002, (actor, how, r)
                assert err["data"]["type"] == error and says in err["message"], (actor, how, err)
                if says == "out of range":
                    assert "signed 64-bit" in err["message"]
            r = await ask(ws, rpc("ok", "actor.call", {"actor": actor, "inputs": {"how": "ok"}}))
            assert r["result"]["outputs"]["y"] == {"type": "integer", "value": 2**63 - 1 if actor == "PyBig" else 2**53 - 1}
        r = await ask(ws, rpc("t", "actor.call", {"actor": "PyBig", "inputs": {"how": "state"}}))
        line = next(n for n, t in enumerate(PY_SCRIPTS.splitlines(), 1) if 'set("k", 2**64)' in t)
        assert r["error"]["data"]["traceback"][-1].startswith(f'File "big.actor.py", line {line}'), r
        assert restarts(await status(ws)) == 0


def test_host_json_is_replaced_whole_never_seen_empty(tmp_path):
    """A reader polling host.json (clients, tests, `status`) never sees it empty or partial:
    in-place writes were caught empty once ("JSONDecodeError: zero-length")."""
    import threading

    from supervisor._files import write_atomic

    path = tmp_path / "host.json"
    write_atomic(path, orjson.dumps({"n": -1}))
    bad: list[bytes] = []
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            try:
                seen.add(orjson.loads(data)["n"])
            except orjson.JSONDecodeError:
                bad.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(400):
            write_atomic(path, orjson.dumps({"n": n, "pad": "x" * (n % 4096)}))
    finally:
        stop.set()
        reader.join()
    assert not bad, bad[:3]
    assert len(seen) >= 3, seen  # the reader really read during the rewrites
    assert orjson.loads(path.read_bytes())["n"] == 399
    assert [p.name for p in tmp_path.iterdir()] == ["host.json"]  # no temporary file left


DEEP_SENDER = '''
import sys
from reflow import actor, Message

@actor(name="Deep", inports=["n"], outports=["y"])
def deep(context):
    sys.modules["__main__"]._check_frame = lambda obj, data: None  # a hostile script skips the SDK's check
    v = 0
    for _ in range(context.get_input("n")):
        v = [v]
    return {"y": Message("any", v)}
'''

NETWORK = """\
network:
  processes:
    deep: {component: Deep}
    echo: {component: Echo}
  connections:
    - {src: {process: deep, port: y}, tgt: {process: echo, port: x}}
supervision: {actors: {echo: {max_deliveries: 2}}}
"""


@pytest.mark.parametrize("mailbox", ["redis", "memory"])
async def test_a_value_orjson_cannot_write_fails_its_message_alone_never_an_actor(make_host, mailbox):
    """What slips past the API (a hostile script's output) and orjson cannot write fails
    that message only: on a durable host its commit (the script's failure, -32002); in
    memory, routed on, the next actor's message (-32602). No actor is restarted."""
    host = await make_host({"echo.actor.py": ECHO, "deep.actor.py": DEEP_SENDER}, NETWORK, start=False)
    host.config.write_text(host.config.read_text().replace("  root: .\n", f"  root: .\n  mailbox: {{kind: {mailbox}}}\n"))
    await host.start()
    async with trio_websocket.open_websocket_url(host.url) as ws:
        for _ in range(4):  # (more than the root's restart intensity)
            r = await ask(ws, rpc(1, "actor.call", {"actor": "deep", "inputs": {"n": 300}}))
            if mailbox == "redis":
                assert r["error"]["code"] == -32002 and "cannot be stored" in r["error"]["message"], r
            else:
                assert "result" in r, r  # (the host writes it to the client, past orjson's limit)
        if mailbox == "memory":
            await wait_for(lambda: "cannot be sent to actor 'echo'" in host.output(), timeout=20)
        r = await ask(ws, rpc(3, "actor.call", {"actor": "echo", "inputs": {"x": 5}}))
        assert r["result"]["outputs"]["y"]["value"] == 5
        tree = await status(ws)
        assert tree["state"] == "running" and restarts(tree) == 0, tree
