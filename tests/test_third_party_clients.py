"""CONTRACT §4 through WebSocket clients that are not ours: the `websockets` library (which
offers permessage-deflate and pings on its own) and Node's built-in WebSocket (undici).
Each walks the same script of frames against a real host and checks the shapes and
error codes a client written against CONTRACT.md relies on."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import trio
from websockets import exceptions as websockets_exceptions
from websockets.sync import client as websockets_sync

ACTORS = {
    "double.actor.py": '''
import time
from reflow import actor

@actor(name="Double", inports=["x", "sleep"], outports=["y"])
async def double(context):
    time.sleep(context.get_input("sleep", 0))
    await context.send_output("y", -1)
    return {"y": context.get_input("x") * 2}
''',
    "boom.actor.py": '''
from reflow import actor

@actor(name="Boom", inports=["x"], outports=["y"])
def boom(context):
    raise ValueError("no good")
''',
    "echo.actor.js": '''
const { actor } = require('reflow');
module.exports = actor({name: 'Echo', inports: ['v'], outports: ['v']},
  async function (context) { return {v: context.getInput('v')}; });
''',
}


def _check_list(reply: dict) -> None:
    actors = {a["name"]: a for a in reply["result"]["actors"]}
    assert {"Double", "Boom", "Echo"} <= set(actors)
    for a in actors.values():
        assert {"name", "component", "runtime", "inports", "outports", "description", "version", "file",
                "status"} <= set(a)
    assert actors["Echo"]["runtime"] == "javascript" and actors["Double"]["inports"] == ["x", "sleep"]


def _check_call(reply: dict) -> None:
    result = reply["result"]
    assert set(result) == {"message_id", "outputs", "emitted"}
    assert result["outputs"] == {"y": {"type": "integer", "value": 42}}
    assert result["emitted"] == [{"port": "y", "message": {"type": "integer", "value": -1}}]


def _check_failed(reply: dict) -> None:
    err = reply["error"]
    assert err["code"] == -32002
    assert err["data"]["type"] == "ValueError" and err["data"]["message"] == "no good"
    assert any("boom.actor.py" in line for line in err["data"]["traceback"])
    assert not any("/work" in line or "site-packages" in line for line in err["data"]["traceback"])


def _check_status(reply: dict) -> None:
    tree = reply["result"]
    assert {"name", "kind", "strategy", "state", "restarts", "last_error", "children"} <= set(tree)


# (frame to send, how to check its reply); None: a notification, nothing comes back.
SCRIPT = [
    ('{"jsonrpc":"2.0","id":1,"method":"actors.list"}', _check_list),
    ('{"jsonrpc":"2.0","id":2,"method":"actor.call","params":{"actor":"Double","inputs":{"x":21}}}', _check_call),
    ('{"jsonrpc":"2.0","id":3,"method":"actor.call","params":{"actor":"Echo","inputs":{"v":{"type":"string","value":"é"}}}}',
     lambda r: r["result"]["outputs"] == {"v": {"type": "string", "value": "é"}} or pytest.fail(str(r))),
    ('{"jsonrpc":"2.0","id":4,"method":"actor.call","params":{"actor":"Boom","inputs":{"x":1}}}', _check_failed),
    ('{"jsonrpc":"2.0","id":5,"method":"actor.call","params":{"actor":"Nobody","inputs":{}}}',
     lambda r: r["error"]["code"] == -32001 or pytest.fail(str(r))),
    ('{"jsonrpc":"2.0","id":6,"method":"actor.call","params":{"actor":"Double"}}',
     lambda r: r["error"]["code"] == -32602 or pytest.fail(str(r))),
    ('{"jsonrpc":"2.0","id":7,"method":"no.such"}', lambda r: r["error"]["code"] == -32601 or pytest.fail(str(r))),
    ("{nope", lambda r: (r["id"] is None and r["error"]["code"] == -32700) or pytest.fail(str(r))),
    ('{"jsonrpc":"2.0","method":7,"id":8}', lambda r: r["error"]["code"] == -32600 or pytest.fail(str(r))),
    ('[{"jsonrpc":"2.0","id":9,"method":"actors.list"},{"jsonrpc":"2.0","method":"actors.list"},1]',
     lambda r: (isinstance(r, list) and sorted(str(x.get("id")) for x in r) == ["9", "None"]) or pytest.fail(str(r))),
    ('{"jsonrpc":"2.0","id":10,"method":"supervisor.status"}', _check_status),
    ('{"jsonrpc":"2.0","id":11,"method":"process","params":{"actor_id":"Double","payload":{"x":5},'
     '"config":{},"state":{},"timestamp":0}}',
     lambda r: r["result"] == {"outputs": {"y": 10}} or pytest.fail(str(r))),
]


def _walk_websockets(url: str) -> list[str]:
    """The script through the `websockets` library's sync client (compression offered)."""
    seen = []
    with websockets_sync.connect(url, max_size=2**24) as ws:  # (offers permessage-deflate)
        assert ws.protocol.extensions == []  # trio-websocket declines it; the handshake still succeeds
        for frame, check in SCRIPT:
            ws.send(frame)
            while True:
                reply = json.loads(ws.recv(timeout=30))
                if isinstance(reply, dict) and "method" in reply:  # process's intermediate "output"
                    continue
                break
            check(reply)
            seen.append(frame)
        # subscribe, send, see the output notification, unsubscribe
        ws.send('{"jsonrpc":"2.0","id":"s","method":"actor.subscribe","params":{"actor":"Double","port":"y"}}')
        sub = json.loads(ws.recv(timeout=30))["result"]["subscription"]
        ws.send('{"jsonrpc":"2.0","id":"t","method":"actor.send","params":{"actor":"Double","port":"x","value":3}}')
        got_reply = got_out = False
        while not (got_reply and got_out):
            msg = json.loads(ws.recv(timeout=30))
            if msg.get("id") == "t":
                assert isinstance(msg["result"]["message_id"], str)
                got_reply = True
            elif msg.get("method") == "actor.output" and msg["params"]["message"]["value"] == 6:
                assert {"subscription", "actor", "port", "message", "message_id"} <= set(msg["params"])
                assert msg["params"]["subscription"] == sub and msg["params"]["actor"] == "Double"
                got_out = True
        ws.send(json.dumps({"jsonrpc": "2.0", "id": "u", "method": "actor.unsubscribe",
                            "params": {"subscription": sub}}))
        while (msg := json.loads(ws.recv(timeout=30))).get("id") != "u":
            pass
        assert msg["result"] == {}
        # a slow call, cancelled: answered -32800, and the connection still works
        ws.send('{"jsonrpc":"2.0","id":"c","method":"actor.call","params":{"actor":"Double","inputs":{"x":1,"sleep":5}}}')
        ws.send('{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":"c"}}')
        msg = json.loads(ws.recv(timeout=10))
        assert msg["id"] == "c" and msg["error"]["code"] == -32800
        ws.send('{"jsonrpc":"2.0","id":"d","method":"actor.call","params":{"actor":"Double","inputs":{"x":2}}}')
        while (msg := json.loads(ws.recv(timeout=30))).get("id") != "d":
            pass
        assert msg["result"]["outputs"]["y"]["value"] == 4
        seen.append("subscribe/send/unsubscribe/cancel")
    return seen


async def test_contract_through_the_websockets_library(make_host):
    host = await make_host(ACTORS)
    seen = await trio.to_thread.run_sync(_walk_websockets, host.url)
    assert len(seen) == len(SCRIPT) + 1


NODE_CLIENT = textwrap.dedent(r"""
    const [url, framesJson] = process.argv.slice(2);
    const frames = JSON.parse(framesJson);
    const ws = new WebSocket(url);
    const replies = [];
    let i = 0;
    const next = () => { if (i < frames.length) ws.send(frames[i++]); else { ws.close(); } };
    ws.onopen = next;
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (!Array.isArray(msg) && msg.method) return;  // a notification
      replies.push(msg);
      next();
    };
    ws.onclose = () => { process.stdout.write(JSON.stringify(replies)); process.exit(0); };
    ws.onerror = (e) => { console.error(String(e.message || e)); process.exit(1); };
""")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_contract_through_nodes_built_in_websocket(make_host, tmp_path):
    host = await make_host(ACTORS)
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    frames = [f for f, _ in SCRIPT]
    proc = await trio.run_process(["node", "--experimental-websocket", "--no-warnings", str(script), host.url,
                                   json.dumps(frames)], capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    replies = json.loads(proc.stdout)
    assert len(replies) == len(SCRIPT)
    for (_, check), reply in zip(SCRIPT, replies):
        check(reply)



def _fragments_and_oversize(url: str) -> None:
    with websockets_sync.connect(url, max_size=2**25) as ws:
        ws.send(iter(['{"jsonrpc":"2.0","id":1,', '"method":"actors.list"}']))  # one message, two frames
        _check_list(json.loads(ws.recv(timeout=30)))
    with websockets_sync.connect(url, max_size=2**25) as ws:
        ws.send('{"jsonrpc":"2.0","id":2,"method":"actors.list","params":{"pad":"' + "x" * (11 * 2**20) + '"}}')
        err = json.loads(ws.recv(timeout=30))["error"]
        assert err["code"] == -32600 and err["data"]["limit"] == "max_frame_size" and err["data"]["max"] == 10 * 10**6
        with pytest.raises(websockets_exceptions.ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1009


async def test_fragmented_messages_are_read_whole_and_an_oversized_one_is_answered_then_closed(make_host):
    host = await make_host(ACTORS)  # (max_frame_size: the default 10MB)
    await trio.to_thread.run_sync(_fragments_and_oversize, host.url)
