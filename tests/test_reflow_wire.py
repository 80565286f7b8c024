"""The `process` method field by field against what Reflow's Rust side sends and parses.

tests/fixtures/reflow_rust_wire.json holds the exact request Reflow's WebSocketScriptActor
sends and the shapes its serde types read back (each noted with its upstream file and
struct). This sends that request through a real host with a real WebSocket client (the
`websockets` library) and checks every frame as serde would: field names, types, no null
where Rust has no Option.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from websockets.sync import client as websockets_sync

WIRE = json.loads((Path(__file__).parent / "fixtures" / "reflow_rust_wire.json").read_text())

PROBE = '''
from reflow import actor, Message

@actor(name="WireProbe", inports=%r, outports=%r)
def probe(context):
    seen = {}
    for port, msg in context.get_payload().items():
        v = msg.unwrap()
        if isinstance(v, (bytes, bytearray, memoryview)):
            seen[port] = ["bytes", list(bytes(v))]
        else:
            seen[port] = [type(v).__name__, v]
    outs = {"integer": 7, "float": 2.5, "whole_float": 3.0, "string": "x", "boolean": False,
            "bytes": b"\\x00\\x01\\xff", "error": Message.error("bad thing", 3), "object": {"k": [1]},
            "array": ["a", 1], "none": None}
    for port, value in outs.items():
        context.send_output(port, value)
    return {"seen": seen, **outs}
''' % (sorted(WIRE["request"]["params"]["payload"]), ["seen", *sorted(k for k in WIRE["outputs"] if k != "_what")])

TWIN = '''
from reflow import actor

@actor(name="Twin", inports=["x"], outports=["who", "back"])
def twin(context):
    return {"who": context.actor_id(), "back": context.get_input("x")}
'''

JS_PROBE = '''
@actor({name: "JsProbe", inports: ["bytes", "wide"], outports: ["kinds", "bytes", "wide"]})
async function jsProbe(context) {
  const kinds = {};
  for (const [port, msg] of context.getPayload()) {
    const v = msg.unwrap();
    kinds[port] = Buffer.isBuffer(v) || v instanceof Uint8Array ? "bytes" : Array.isArray(v) ? "array" : typeof v;
  }
  return {kinds, bytes: context.getInput("bytes"), wide: context.getInput("wide")};
}
'''

NETWORK = """\
network:
  processes:
    WireProbe: {component: WireProbe}
    JsProbe: {component: JsProbe}
    p1: {component: Twin}
    p2: {component: Twin}
"""

_SCALARS = {"string": str, "i32": int, "u64": int}


def _serde(value, shape, where: str, wire: dict = WIRE) -> None:
    """Check ``value`` against a fixture shape as serde_json would deserialize it."""
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: not an object: {value!r}"
        for field, sub in shape.items():
            _serde(value.get(field), sub, f"{where}.{field}", wire)
        return
    if shape.startswith("option<"):
        if value is not None:
            _serde(value, shape[len("option<"):-1], where, wire)
        return
    if shape == "value":
        assert value is not None or where.endswith(".data"), f"{where}: missing"
        return
    if shape in wire and isinstance(wire[shape], dict):
        _serde(value, wire[shape], where, wire)
        return
    kind = _SCALARS[shape]
    assert type(value) is kind, f"{where}: {shape} expected, got {value!r}"  # (bool is no i32)
    if shape == "u64":
        assert 0 <= value < 2**64, f"{where}: not a u64: {value}"
    if shape == "i32":
        assert -(2**31) <= value < 2**31, f"{where}: not an i32: {value}"


def _exchange(url: str, frames: list[str]) -> list[list[dict]]:
    """Send each frame; collect what comes back up to its response (notifications first)."""
    out = []
    with websockets_sync.connect(url) as ws:
        for frame in frames:
            rid = json.loads(frame)["id"]
            ws.send(frame)
            got = []
            while True:
                text = ws.recv(timeout=30)
                assert isinstance(text, str), "Rust's client reads text frames only"
                msg = json.loads(text)
                got.append(msg)
                if msg.get("id") == rid:
                    break
            out.append(got)
    return out


def _request(actor_id: str, payload: dict, rid: str) -> str:
    req = json.loads(json.dumps(WIRE["request"]))
    req["id"] = rid
    req["params"]["actor_id"] = req["params"]["state"]["actor_id"] = actor_id
    req["params"]["payload"] = payload
    return json.dumps(req)


@pytest.fixture
async def host(make_host):
    return await make_host({"probe.actor.py": PROBE, "twin.actor.py": TWIN, "probe.actor.js": JS_PROBE}, NETWORK)


async def test_the_rust_request_is_answered_in_the_shapes_rust_parses(host):
    before = int(time.time() * 1000)
    (frames,) = await trio.to_thread.run_sync(_exchange, host.url, [json.dumps(WIRE["request"])])
    after = int(time.time() * 1000)
    *notes, reply = frames

    # The response: an RpcResponse whose result has outputs and no "error" key.
    _serde(reply, WIRE["response"], "response")
    assert reply["id"] == WIRE["request"]["id"] and "error" not in reply
    result = reply["result"]
    assert set(result) == {"outputs"}
    outputs = result["outputs"]
    for port, want in WIRE["outputs"].items():
        if port == "_what":
            continue
        assert outputs[port] == want["json"] and type(outputs[port]) is type(want["json"]), (port, outputs[port])

    # What the script saw of each Rust Message.
    seen = outputs["seen"]
    for port, (kind, value) in WIRE["script_sees"].items():
        assert seen[port] == [kind, value], port
    assert type(seen["whole_float"][1]) is float

    # The intermediate outputs: RpcNotification "output" with a ScriptOutput in params.
    assert [n["params"]["port"] for n in notes] == [p for p in WIRE["outputs"] if p not in ("_what",)]
    for note in notes:
        _serde(note, WIRE["notification"], "notification")
        assert note["method"] == "output" and "id" not in note  # (else the untagged enum reads a Response)
        _serde(note["params"], WIRE["script_output"], "output.params")
        params = note["params"]
        assert params["actor_id"] == "WireProbe"
        want = WIRE["outputs"][params["port"]]["json"]
        assert params["data"] == want and type(params["data"]) is type(want)
        # the time of the output, not the request's timestamp echoed
        assert before <= params["timestamp"] <= after


async def test_errors_and_several_processes_of_one_component(host):
    frames = [
        _request("Twin", {"x": 1}, "ambiguous"),
        _request("p2", {"x": [3, 4]}, "by-process"),
        _request("Twin:p1", {"x": "s"}, "component-colon-process"),
        _request("Nobody", {"x": 1}, "unknown"),
    ]
    ambiguous, by_process, colon, unknown = await trio.to_thread.run_sync(_exchange, host.url, frames)
    for (reply,) in (ambiguous, unknown):
        _serde(reply, WIRE["response"], "response")
        _serde(reply["error"], WIRE["rpc_error"], "error")
        assert "result" not in reply
    err = ambiguous[0]["error"]
    assert err["code"] == -32602 and "2 processes (p1, p2)" in err["message"]
    assert err["data"] == {"actor": "Twin", "processes": ["p1", "p2"]}
    assert unknown[0]["error"]["code"] == -32001
    assert by_process[-1]["result"] == {"outputs": {"who": "p2", "back": [3, 4]}}
    assert colon[-1]["result"] == {"outputs": {"who": "p1", "back": "s"}}


async def test_bytes_both_ways_in_javascript(host):
    (frames,) = await trio.to_thread.run_sync(
        _exchange, host.url, [_request("JsProbe", {"bytes": [0, 1, 255], "wide": [1, 300]}, "js")])
    _serde(frames[-1], WIRE["response"], "response")
    assert frames[-1]["result"] == {"outputs": {"kinds": {"bytes": "bytes", "wide": "array"},
                                                "bytes": [0, 1, 255], "wide": [1, 300]}}
