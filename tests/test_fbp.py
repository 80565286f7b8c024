"""The FBP Network Protocol (CONTRACT §7) against a real host: fbp-protocol's own
``fbp-test``, every message the host sends checked strictly against the
protocol's JSON schemas, live edits under load, and the saved graph file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

FBP = Path(__file__).resolve().parent / "fbp"
NODE_MODULES = FBP / "node_modules"
SCHEMAS = NODE_MODULES / "fbp-protocol" / "schema" / "json"
SECRET = "fbp-test-secret"

needs_npm = pytest.mark.skipif(not (NODE_MODULES / ".bin" / "fbp-test").exists() or shutil.which("node") is None,
                               reason="tests/fbp/node_modules is missing: run `npm ci --prefix tests/fbp` "
                                      "(make test does)")


async def _run(cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process(cmd, cwd=cwd, env={**os.environ, **env}, capture_stdout=True,
                                      capture_stderr=True, check=False)


def _warm(host, n: int) -> None:
    host.config.write_text(host.config.read_text().replace("preload_count: 1,", f"preload_count: {n},"))


@needs_npm
async def test_fbp_test_passes_against_the_host(make_host, tmp_path):
    """fbp-protocol's own conformance suite (fbp-test 0.9.8), as Flowhub's makers run it."""
    host = await make_host({}, "", env={"REFLOW_TOKEN": SECRET}, start=False)
    _warm(host, 3)  # network:start starts two sandboxes: warm ones, for mocha's 2 s per test
    await host.start()
    port = int(host.url.rsplit(":", 1)[1].strip("/"))
    project = tmp_path / "fbp-project"
    project.mkdir()
    (project / "fbp-config.json").write_text(json.dumps(
        {"name": "reflow", "command": None, "host": "127.0.0.1", "port": port, "collection": "core",
         "version": "0.8"}))
    # (fbp-test hands extra arguments to mocha: a loaded machine gets 15 s a test, not 2)
    done = await _run([str(NODE_MODULES / ".bin" / "fbp-test"), "--timeout", "15000"], cwd=FBP, timeout=90,
                      env={"PROJECT_HOME": str(project), "FBP_PROTOCOL_SECRET": SECRET})
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, f"fbp-test failed:\n{out}\n--- host log ---\n{host.output()[-4000:]}"
    assert "passing" in out and "failing" not in out, out


# -- a strict client ------------------------------------------------------------------------------


def _strip_ids(x):
    # draft-04 ``id``s in these files are relative names ('output/error'), not base URIs:
    # kept, they would make every '#/shared/...' reference resolve against the wrong document.
    if isinstance(x, dict):
        return {k: _strip_ids(v) for k, v in x.items() if not (k == "id" and isinstance(v, str))}
    if isinstance(x, list):
        return [_strip_ids(v) for v in x]
    return x


@pytest.fixture(scope="module")
def schemas():
    if not SCHEMAS.is_dir():
        pytest.skip("tests/fbp/node_modules is missing: run `npm ci --prefix tests/fbp` (make test does)")
    import jsonschema

    root = {p.stem: _strip_ids(json.loads(p.read_text())) for p in SCHEMAS.glob("*.json")}
    validators: dict = {}

    def validate(msg: dict) -> None:
        proto, cmd = msg.get("protocol"), msg.get("command")
        assert proto in root and cmd in root[proto]["output"], f"no schema for {proto}:{cmd}: {msg}"
        v = validators.get((proto, cmd))
        if v is None:
            v = validators[(proto, cmd)] = jsonschema.Draft4Validator(
                {**root, "$ref": f"#/{proto}/output/{cmd}"}, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(msg)]
        assert not errors, f"{proto}:{cmd} does not validate: {errors}\n{msg}"
    return validate


class FbpClient:
    """An FBP protocol client that checks every message it receives against the schemas."""

    def __init__(self, ws, validate, secret: str | None = SECRET):
        self.ws, self.validate, self.secret = ws, validate, secret
        self.seen: list[dict] = []   # every message received, in order

    async def send(self, protocol: str, command: str, payload: dict | None = None, **extra) -> None:
        msg = {"protocol": protocol, "command": command, "payload": payload or {}, **extra}
        if self.secret is not None and "secret" not in extra:
            msg["secret"] = self.secret
        await self.ws.send_message(json.dumps(msg))

    async def recv(self, timeout: float = 15) -> dict:
        with trio.fail_after(timeout):
            text = await self.ws.get_message()
        msg = orjson.loads(text)
        self.validate(msg)
        assert SECRET not in text, f"the secret was echoed: {text}"
        self.seen.append(msg)
        return msg

    async def expect(self, protocol: str, command: str, match=None, timeout: float = 15) -> dict:
        """The next message of protocol:command (that ``match(payload)`` accepts); others are kept in seen."""
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv(timeout)
                if msg["protocol"] == protocol and msg["command"] == command and (
                        match is None or match(msg["payload"])):
                    return msg["payload"]
                if msg["command"] == "error" and command != "error":
                    raise AssertionError(f"unexpected error while waiting for {protocol}:{command}: {msg}")

    async def saw(self, protocol: str, command: str, match=None, timeout: float = 15) -> dict:
        """Like ``expect``, but a message already received counts too (events race answers)."""
        for msg in self.seen:
            if msg["protocol"] == protocol and msg["command"] == command and (match is None or match(msg["payload"])):
                return msg["payload"]
        return await self.expect(protocol, command, match, timeout)

    async def ask(self, protocol: str, command: str, payload: dict, answer: str | None = None) -> dict:
        await self.send(protocol, command, payload)
        return await self.expect(protocol, answer or command)


SCRIPTS = {
    "upper.actor.py": '''
        from reflow import actor

        @actor(name="Upper", inports=["text"], outports=["out"], description="Upper-cases text")
        async def upper(context):
            text = context.get_input("text")
            print("upper got", text)
            return {"out": text.upper()}
        ''',
    "boom.actor.py": '''
        from reflow import actor

        def fail(x):
            raise ValueError(f"boom on {x}")

        @actor(name="Boom", inports=["in"], outports=["out"])
        async def boom(context):
            fail(context.get_input("in"))
        ''',
}


async def test_every_message_validates_strictly(make_host, schemas):
    """A session through every command the host implements; each message it sends must
    validate against fbp-protocol's schemas (no extra keys), never carry the secret."""
    host = await make_host(SCRIPTS, "", env={"REFLOW_TOKEN": SECRET})
    async with trio_websocket.open_websocket_url(host.url, subprotocols=["noflo"]) as ws:
        assert ws.subprotocol == "noflo"
        c = FbpClient(ws, schemas)
        rt = await c.ask("runtime", "getruntime", {}, "runtime")
        for cap in ("protocol:runtime", "protocol:graph", "protocol:component", "protocol:network",
                    "network:data", "component:getsource"):
            assert cap in rt["capabilities"]
        assert rt["type"] == "reflow" and rt["allCapabilities"] == rt["capabilities"]

        # components: the package's core ones and the workspace's, then componentsready
        await c.send("component", "list", {})
        ready = await c.expect("component", "componentsready")
        comps = {m["payload"]["name"]: m["payload"] for m in c.seen if m["command"] == "component"}
        assert ready == len(comps)
        assert {"core/Repeat", "core/Drop", "core/Output", "Upper", "Boom"} <= set(comps)
        assert comps["Upper"]["inPorts"] == [{"id": "text", "type": "all"}]
        assert {"id": "out", "type": "all"} in comps["Upper"]["outPorts"]
        assert comps["Upper"]["description"] == "Upper-cases text" and comps["Upper"]["subgraph"] is False
        src = await c.ask("component", "getsource", {"name": "core/Repeat"}, "source")
        assert src["language"] == "python" and src["library"] == "core" and "@actor" in src["code"]
        src = await c.ask("component", "getsource", {"name": "Upper"}, "source")
        assert "text.upper()" in src["code"]
        err = await c.ask("component", "source", {"name": "Upper", "language": "python", "code": "x"}, "error")
        assert "read-only" in err["message"]

        # a graph, edited, then run
        g = {"graph": "g1"}
        assert await c.ask("graph", "clear", {"id": "g1", "name": "G", "main": True, "baseDir": "/x"}) == {
            "id": "g1", "name": "G", "main": True}
        await c.ask("graph", "addnode", {"id": "up", "component": "Upper", "metadata": {"x": 1}, **g})
        await c.ask("graph", "addnode", {"id": "rep", "component": "core/Repeat", **g})
        await c.ask("graph", "addnode", {"id": "boom", "component": "Boom", **g})
        await c.ask("graph", "addnode", {"id": "out", "component": "core/Output", **g})
        bad = await c.ask("graph", "addnode", {"id": "x", "component": "NoSuch", **g}, "error")
        assert "NoSuch" in bad["message"]
        edge = {"src": {"node": "up", "port": "out"}, "tgt": {"node": "rep", "port": "in"}}
        assert await c.ask("graph", "addedge", {**edge, "metadata": {"route": 1}, **g}) == {
            **edge, "metadata": {"route": 1}, **g}
        await c.ask("graph", "addedge", {"src": {"node": "rep", "port": "out"},
                                         "tgt": {"node": "out", "port": "in"}, **g})
        changed = await c.ask("graph", "changeedge", {**edge, "metadata": {"route": 2}, **g})
        assert changed["metadata"] == {"route": 2}
        assert (await c.ask("graph", "changenode", {"id": "up", "metadata": {"y": 2, "x": None}, **g}))[
            "metadata"] == {"y": 2}
        await c.ask("graph", "addinport", {"public": "input", "node": "up", "port": "text", **g})
        await c.ask("graph", "addinport", {"public": "kaboom", "node": "boom", "port": "in", **g})
        await c.ask("graph", "addoutport", {"public": "result", "node": "rep", "port": "out", **g})
        assert await c.ask("graph", "renameoutport", {"from": "result", "to": "output", **g}) == {
            "from": "result", "to": "output", **g}
        await c.ask("graph", "addinitial", {"src": {"data": "iip"}, "tgt": {"node": "up", "port": "text"}, **g})

        await c.send("network", "start", g)
        started = await c.expect("network", "started")
        assert started["started"] is True
        iip = await c.expect("network", "data", lambda p: "src" not in p)
        assert iip == {"id": "DATA -> TEXT up()", "graph": "g1", "tgt": {"node": "up", "port": "text"},
                       "data": "iip"}
        data = await c.expect("network", "data", lambda p: p.get("src", {}).get("node") == "up")
        assert data["id"] == "up() OUT -> IN rep()" and data["data"] == "IIP"
        await c.expect("runtime", "packet", lambda p: p["payload"] == "IIP")
        out = await c.saw("network", "output", lambda p: "upper got iip" in p["message"])
        assert out["message"].startswith("up: ")

        # packets in and out through the exported ports
        sent = await c.ask("runtime", "packet", {"port": "input", "event": "data", "payload": "hey", **g},
                           "packetsent")
        assert sent == {"port": "input", "event": "data", "payload": "hey", **g}
        assert (await c.expect("runtime", "packet", lambda p: p["payload"] == "HEY")) == {
            "graph": "g1", "port": "output", "event": "data", "payload": "HEY"}

        # only the selected edges are watched after network:edges
        sel = {"edges": [{"src": {"node": "rep", "port": "out"}, "tgt": {"node": "out", "port": "in"}}], **g}
        assert await c.ask("network", "edges", sel) == sel
        await c.send("runtime", "packet", {"port": "input", "event": "data", "payload": "two", **g})
        await c.expect("network", "data", lambda p: p.get("src", {}).get("node") == "rep" and p["data"] == "TWO")
        assert not [m for m in c.seen if m["command"] == "data" and m["payload"].get("data") == "TWO"
                    and m["payload"]["src"]["node"] == "up"]

        # a failing script: processerror with its traceback (the host's paths never show)
        await c.send("runtime", "packet", {"port": "kaboom", "event": "data", "payload": 7, **g})
        perr = await c.expect("network", "processerror")
        assert perr["id"] == "boom" and "ValueError: boom on 7" in perr["error"] and "fail" in perr["error"]
        assert str(host.config.parent) not in perr["error"]

        status = await c.ask("network", "getstatus", g, "status")
        assert status == {"graph": "g1", "running": False, "started": True}

        # errors: unknown graph, no graph, a wrong secret (answered, nothing done, not echoed)
        assert (await c.ask("graph", "addnode", {"id": "z", "component": "core/Drop", "graph": "nope"},
                            "error")) == {"message": "Requested graph not found"}
        assert (await c.ask("graph", "removenode", {"id": "z"}, "error")) == {"message": "No graph specified"}
        c.secret = "wrong-secret"
        await c.send("graph", "removenode", {"id": "up", **g})
        denied = await c.expect("graph", "error")
        assert "secret" in denied["message"] and "wrong-secret" not in json.dumps(c.seen[-1])
        await c.send("runtime", "getruntime", {})
        assert "secret" in (await c.expect("runtime", "error"))["message"]
        c.secret = SECRET

        # removals echo what they remove; a removed node's edges and ports go with it
        await c.ask("graph", "removeinitial", {"tgt": {"node": "up", "port": "text"}, **g})
        await c.ask("graph", "renameinport", {"from": "input", "to": "in2", **g})
        await c.ask("graph", "renamenode", {"from": "out", "to": "printer", **g})
        await c.send("graph", "removenode", {"id": "rep", **g})
        await c.expect("graph", "removenode")
        cmds = [m["command"] for m in c.seen[-6:]]
        assert "removeedge" in cmds and "removeoutport" in cmds
        await c.ask("graph", "removeinport", {"public": "in2", **g})
        await c.ask("graph", "removeoutport", {"public": "nope", **g}, "error")
        assert (await c.ask("network", "stop", g, "stopped"))["started"] is False
        assert await c.ask("network", "getstatus", g, "status") == {"graph": "g1", "running": False,
                                                                    "started": False}
        unknown = await c.ask("network", "persist", g, "error")
        assert "persist" in unknown["message"]
        # the JSON-RPC API on the same port is untouched
    async with trio_websocket.open_websocket_url(host.url, extra_headers=[
            (b"authorization", f"Bearer {SECRET}".encode())]) as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "actors.list"}))
        reply = orjson.loads(await ws.get_message())
        assert {a["name"] for a in reply["result"]["actors"]} >= {"Upper", "Boom"}


class Reader:
    """Reads every message of a connection in the background (validated strictly)."""

    def __init__(self, client: FbpClient):
        self.c = client
        self.changed = trio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self.c.recv(timeout=120)
            except trio_websocket.ConnectionClosed:
                return
            self.changed.set()
            self.changed = trio.Event()

    def find(self, protocol: str, command: str, match=None) -> list[dict]:
        return [m["payload"] for m in self.c.seen if m["protocol"] == protocol and m["command"] == command
                and (match is None or match(m["payload"]))]

    async def until(self, predicate, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()

    async def ask(self, protocol: str, command: str, payload: dict, answer: str | None = None) -> dict:
        before = len(self.find(protocol, answer or command))
        await self.c.send(protocol, command, payload)
        await self.until(lambda: len(self.find(protocol, answer or command)) > before
                         or self.find(protocol, "error"))
        assert not self.find(protocol, "error"), self.find(protocol, "error")
        return self.find(protocol, answer or command)[-1]


MAIN_GRAPH = {
    "processes": {"a": {"component": "core/Repeat"}, "b": {"component": "core/Repeat"}},
    "connections": [{"src": {"process": "a", "port": "out"}, "tgt": {"process": "b", "port": "in"}}],
    "inports": {"in": {"process": "a", "port": "in"}},
    "outports": {"out": {"process": "b", "port": "out"}},
}


@pytest.mark.parametrize("mailbox", ["redis", "memory"])
async def test_live_edits_under_load_lose_nothing_and_the_graph_file_reloads(make_host, schemas, mailbox):
    """Side nodes are added and removed while packets flow through the graph reflow.yaml
    names (durable mailboxes, and memory ones): every packet comes out exactly once, a
    removed node first finishes what it was sent, and the saved graph file restarts to
    the same network."""
    host = await make_host({}, "network: {graph: graphs/main.json}\n", start=False)
    text = host.config.read_text()
    host.config.write_text(text.replace("  root: .\n", f"  root: .\n  mailbox: {{kind: {mailbox}}}\n"))
    graph_file = host.config.parent / "graphs" / "main.json"
    graph_file.parent.mkdir()
    graph_file.write_text(json.dumps(MAIN_GRAPH))
    await host.start()
    n = 200  # at least
    async with trio_websocket.open_websocket_url(host.url, subprotocols=["noflo"], message_queue_size=0) as ws:
        c = FbpClient(ws, schemas, secret=None)
        r = Reader(c)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            rt = await r.ask("runtime", "getruntime", {}, "runtime")
            assert rt["graph"] == "main"
            await r.until(lambda: r.find("runtime", "ports"))
            assert r.find("runtime", "ports")[-1] == {"graph": "main", "inPorts": [{"id": "in", "type": "all"}],
                                                      "outPorts": [{"id": "out", "type": "all"}]}
            outputs = lambda: r.find("runtime", "packet")  # noqa: E731

            edited = trio.Event()
            sent = 0

            async def feed() -> None:
                nonlocal sent
                while not edited.is_set() or sent < n:  # packets flow until the edits are done
                    # a window of 50 unacknowledged packets keeps the mailboxes busy
                    await r.until(lambda: len(r.find("runtime", "packetsent")) >= sent - 50)
                    await c.send("runtime", "packet", {"graph": "main", "port": "in", "event": "data",
                                                       "payload": sent})
                    sent += 1
            nursery.start_soon(feed)
            g = {"graph": "main"}
            for cycle in range(3):
                await r.until(lambda: len(outputs()) >= 40 * (cycle + 1), timeout=30)
                await r.ask("graph", "addnode", {"id": "m", "component": "core/Repeat", **g})
                await r.ask("graph", "addnode", {"id": "t", "component": "core/Drop", **g})
                await r.ask("graph", "addedge", {"src": {"node": "m", "port": "out"},
                                                 "tgt": {"node": "t", "port": "in"}, **g})
                await r.ask("graph", "addedge", {"src": {"node": "a", "port": "out"},
                                                 "tgt": {"node": "m", "port": "in"}, **g})
                await r.until(lambda: len(r.find("network", "data", lambda p: p.get("src", {}).get("node") == "m"))
                              >= 10 * (cycle + 1), timeout=30)
                await r.ask("graph", "removenode", {"id": "m", **g})
                await r.ask("graph", "removenode", {"id": "t", **g})
            edited.set()
            await r.until(lambda: len(outputs()) >= sent and len(r.find("runtime", "packetsent")) == sent,
                          timeout=40)
            nursery.cancel_scope.cancel()
    values = sorted(p["payload"] for p in outputs())
    assert values == list(range(sent)), \
        f"lost: {sorted(set(range(sent)) - set(values))[:20]}, duplicated: {len(values) - len(set(values))}"
    # m was drained before it stopped: whatever reached it went on to t
    into_m = sorted(p["data"] for p in r.find("network", "data", lambda p: p.get("tgt", {}).get("node") == "m"))
    out_of_m = sorted(p["data"] for p in r.find("network", "data", lambda p: p.get("src", {}).get("node") == "m"))
    assert into_m == out_of_m and len(into_m) >= 30, \
        f"got, not passed on: {sorted(set(into_m) - set(out_of_m))}; passed on, not got: " \
        f"{sorted(set(out_of_m) - set(into_m))}; {len(into_m)} in, {len(out_of_m)} out"
    saved = json.loads(graph_file.read_text())
    assert set(saved["processes"]) == {"a", "b"} and saved["inports"] == MAIN_GRAPH["inports"]
    assert [(x["src"], x["tgt"]) for x in saved["connections"]] == [
        ({"process": "a", "port": "out"}, {"process": "b", "port": "in"})]

    # restarted on the saved file, the host runs the same network
    assert await host.stop() == 0
    await host.start()
    async with trio_websocket.open_websocket_url(host.url, subprotocols=["noflo"]) as ws:
        c = FbpClient(ws, schemas, secret=None)
        assert (await c.ask("runtime", "getruntime", {}, "runtime"))["graph"] == "main"
        await c.ask("runtime", "packet", {"graph": "main", "port": "in", "event": "data", "payload": "again"},
                    "packetsent")
        assert (await c.saw("runtime", "packet"))["payload"] == "again"
        data = await c.saw("network", "data", lambda p: p["id"] == "a() OUT -> IN b()")
        assert data["data"] == "again"


@needs_npm
async def test_fbp_spec_suite(make_host, tmp_path):
    """Our fbp-spec suites (tests/fbp/specs/*.yaml) run the example components, Python and
    JavaScript, and the core ones through the host, driven by Flowhub's own client library
    (fbp-client validates every message it receives)."""
    from conftest import EXAMPLES

    scripts = {name: (EXAMPLES / name).read_text()
               for name in ("calculator.py", "processor.js", "data_processor.actor.py")}
    host = await make_host(scripts, "", "calculator.py", "processor.js", env={"REFLOW_TOKEN": SECRET}, start=False)
    _warm(host, 3)
    await host.start()
    done = await _run([str(NODE_MODULES / ".bin" / "fbp-spec"), "--address", host.url, "--secret", SECRET,
                       "--command-timeout", "20", str(FBP / "specs")], cwd=FBP, timeout=90, env={})
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, f"fbp-spec failed:\n{out}\n--- host log ---\n{host.output()[-4000:]}"
    assert "✗" not in out and out.count("✓") >= 6, out


async def test_bad_frames_get_the_protocols_error_and_the_connection_lives(make_host, schemas):
    host = await make_host({}, "", start=False)
    host.config.write_text(host.config.read_text().replace("port:", "max_frame_size: 1KB, port:", 1))
    await host.start()
    async with trio_websocket.open_websocket_url(host.url, subprotocols=["noflo"]) as ws:
        c = FbpClient(ws, schemas, secret=None)
        for frame, why in [("{not json", "invalid message: not JSON"), ("[1]", "JSON object"),
                           ('{"protocol": "graph", "command": "addnode", "payload": 5}', "payload"),
                           ("x" * 2000, "exceeds max_frame_size (1000 bytes)"),
                           ('{"protocol": "trace", "command": "start", "payload": {}}', "unknown command")]:
            await ws.send_message(frame)
            assert why in (await c.expect("runtime", "error"))["message"]
        assert (await c.ask("runtime", "getruntime", {}, "runtime"))["type"] == "reflow"


async def test_a_script_added_while_connected_is_announced_as_a_component(make_host, schemas):
    from conftest import open_client
    from test_reload import wait_for_watching

    host = await make_host({}, "")
    async with open_client(host.url) as rpc:
        await wait_for_watching(rpc)
    async with trio_websocket.open_websocket_url(host.url, subprotocols=["noflo"]) as ws:
        c = FbpClient(ws, schemas, secret=None)
        await c.ask("component", "list", {}, "componentsready")
        (host.config.parent / "late.actor.py").write_text(
            "from reflow import actor\n\n@actor(name='Late', inports=['x'], outports=['y'])\n"
            "async def late(context):\n    return {'y': context.get_input('x')}\n")
        comp = await c.expect("component", "component", lambda p: p["name"] == "Late", timeout=20)
        assert comp["inPorts"] == [{"id": "x", "type": "all"}]
