"""JavaScript actors through a real host: the seed's forms, state, errors with file:line, limits, hostile basics."""

from __future__ import annotations

import pytest
import trio

from conftest import EXAMPLES, children_of, cmdline, find_actor, open_client, wait_for
from supervisor.client import RpcError


def seed_stream_aggregator() -> str:
    """The seed's StreamAggregator, character for character: the example below its one-line header
    (test_discovery checks it against the seed's block when shared/ is beside the checkout)."""
    return (EXAMPLES / "stream_aggregator.actor.js").read_text().split("\n", 1)[1]


PRODUCER = '''
from reflow import actor

@actor(name="Producer", inports=["n"], outports=["value"])
def produce(context):
    return {"value": context.get_input("n") * 10}
'''

EXPORTS_FORM = '''\
// module.exports form, with state used with and without await, streamed outputs and a log line
const { actor, Message } = require('reflow');

module.exports = actor({name: 'Counter', inports: ['x'], outports: ['count', 'seen', 'bytes']}, async function (ctx) {
  const state = ctx.getState();
  const n = state.increment('n');
  await state.set('last', ctx.getInput('x'));
  const last = await state.get('last');
  ctx.sendOutput('seen', last);
  console.log('counted', n);
  await new Promise((resolve) => setTimeout(resolve, 1));
  return {count: n, bytes: Message.bytes(Buffer.from([0, 255, n]))};
});
'''

FAILING = '''\
// fails on purpose
const { actor, Message, ActorError } = require('reflow');

@actor({name: "Failing", inports: ["how"], outports: ["out"]})
function failing(context) {
  const how = context.getInput("how");
  if (how === "throw") {
    throw new TypeError("bad input");
  }
  if (how === "code") throw new ActorError("custom", 42);
  if (how === "undefined") return undefinedFunction();
  if (how === "memory") { const keep = []; for (;;) keep.push(new Array(1e6).fill(1.5)); }
  if (how === "spin") for (;;) {}
  if (how === "hang") return new Promise(() => {});
  context.getState().set("touched", true);
  return {out: "fine"};
}
'''

BROKEN = '''\
const { actor } = require('reflow');

@actor({name: "Broken", inports: ["x"], outports: ["y"]})
function broken(context) {
  return {y: (1 +};
}
'''

HOSTILE = r'''
const { actor } = require('reflow');

function attempt(fn) {
  try { return 'ALLOWED: ' + String(fn()).slice(0, 80); } catch (e) { return 'denied: ' + (e.code || e.name); }
}

@actor({name: "HostileJs", inports: ["what", "arg"], outports: ["out"]})
async function hostile(context) {
  const what = context.getInput("what");
  const arg = context.getInput("arg");
  const fs = require('fs');
  if (what === "read") return {out: attempt(() => fs.readFileSync(arg, 'utf8'))};
  if (what === "write") return {out: attempt(() => fs.writeFileSync(arg, 'x'))};
  if (what === "env") return {out: Object.keys(process.env).sort()};
  if (what === "fill_tmp") return {out: attempt(() => fs.writeFileSync('/tmp/big', Buffer.alloc(200 * 2 ** 20)))};
  if (what === "symlink") { fs.symlinkSync(arg, '/tmp/link'); return {out: attempt(() => fs.readFileSync('/tmp/link', 'utf8'))}; }
  if (what === "kill_host") {
    // No /proc in the sandbox: a pid exists where signal 0 reaches it (Node's own threads
    // answer by their thread ids too, so only pid 1, bwrap's init, is not us).
    const visible = [];
    for (let pid = 1; pid < 4096; pid++) {
      if (attempt(() => process.kill(pid, 0)).startsWith('ALLOWED')) visible.push(pid);
    }
    const killed = attempt(() => process.kill(1, 'SIGKILL')).startsWith('ALLOWED') ? [1] : [];
    return {out: {killed, visible}};
  }
  if (what === "fork_bomb") {
    const cp = require('child_process');
    let n = 0;
    for (; n < 1000; n++) {
      const r = attempt(() => cp.spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)']).pid);
      if (!r.startsWith('ALLOWED: ') || r === 'ALLOWED: undefined') break;
    }
    return {out: `stopped after ${n}`};
  }
  if (what === "stream") { for (;;) context.sendOutput("out", "x".repeat(65536)); }
  if (what === "state_escape") {
    const s = context.getState();
    s.set('mine', 1);
    return {out: {keys: s.keys('*'), other: s.get('../Other:secret'), glob: s.keys('*:*')}};
  }
  if (what === "spawn") return {out: attempt(() => require('child_process').execFileSync(arg).toString())};
  if (what === "tcp") {
    const net = require('net');
    const res = await new Promise((resolve) => {
      const s = net.connect(arg, '127.0.0.1');
      s.on('connect', () => { s.destroy(); resolve('ALLOWED: connected'); });
      s.on('error', (e) => resolve('denied: ' + e.code));
    });
    return {out: res};
  }
  if (what === "dns") {
    const dns = require('dns');
    return {out: await new Promise((resolve) => dns.lookup('pypi.org', (e, a) => resolve(e ? 'denied: ' + e.code : 'ALLOWED: ' + a)))};
  }
  return {out: null};
}
'''


async def test_the_seeds_stream_aggregator_runs_unmodified_fed_by_python_through_the_graph(make_host):
    config = """\
network:
  processes:
    producer: {component: Producer}
    agg: {component: StreamAggregator}
  connections:
    - {src: {process: producer, port: value}, tgt: {process: agg, port: stream}}
"""
    host = await make_host({"producer.actor.py": PRODUCER, "agg.actor.js": seed_stream_aggregator()}, config)
    async with open_client(host.url) as c:
        listed = {a["name"]: a for a in (await c.request("actors.list"))["actors"]}
        assert listed["agg"]["runtime"] == "javascript" and listed["agg"]["status"] == "running"
        assert listed["agg"]["inports"] == ["stream", "window"]
        sub = await c.request("actor.subscribe", {"actor": "agg", "port": "stats"})
        notes = c.on_notification(sub["subscription"])
        for n in (1, 2, 3):
            await c.send("producer", "n", n)
        seen = []
        with trio.fail_after(20):
            while len(seen) < 3:
                seen.append((await notes.receive())["params"]["message"])
    assert seen == [{"type": "object", "value": {"count": n, "average": 5 * (n + 1)}} for n in (1, 2, 3)]
    async with open_client(host.url) as c:  # the seed's window port, given directly: it drops one
        res = await c.call("agg", {"stream": 70, "window": 2})
    assert res["outputs"] == {"aggregated": {"type": "float", "value": 40.0},
                              "stats": {"type": "object", "value": {"count": 3, "average": 40}}}


async def test_exports_form_state_with_and_without_await_streamed_outputs_bytes_and_logs(make_host):
    host = await make_host({"counter.actor.js": EXPORTS_FORM})
    async with open_client(host.url) as c:
        first = await c.call("Counter", {"x": "a"})
        second = await c.call("Counter", {"x": {"k": [1, 2]}})
    assert first["outputs"]["count"] == {"type": "integer", "value": 1}
    assert second["outputs"]["count"] == {"type": "integer", "value": 2}
    assert second["emitted"] == [{"port": "seen", "message": {"type": "object", "value": {"k": [1, 2]}}}]
    assert second["outputs"]["bytes"] == {"type": "bytes", "value": "AP8C"}  # 00 ff 02
    await wait_for(lambda: "counted 2" in host.log.read_text())


async def test_errors_name_the_file_and_line_and_leave_no_trace(make_host):
    host = await make_host({"failing.actor.js": FAILING, "broken.actor.js": BROKEN},
                           "supervision: {max_restarts: 20, max_seconds: 60}\n")
    async with open_client(host.url) as c:
        with pytest.raises(RpcError) as err:
            await c.call("Failing", {"how": "throw"})
        assert err.value.code == -32002 and err.value.data["type"] == "TypeError"
        assert err.value.data["message"] == "bad input"
        # Line 8 of the file as written: the @actor line did not move anything.
        assert err.value.data["traceback"][-1] == \
            'File "failing.actor.js", line 8, in failing: throw new TypeError("bad input");'
        with pytest.raises(RpcError) as err:
            await c.call("Failing", {"how": "code"})
        assert err.value.data["type"] == "ActorError" and err.value.data["code"] == 42
        with pytest.raises(RpcError) as err:
            await c.call("Failing", {"how": "undefined"})
        assert err.value.data["type"] == "ReferenceError" and "line 11" in err.value.data["traceback"][-1]
        assert (await c.call("Failing", {"how": "ok"}))["outputs"]["out"]["value"] == "fine"

        status = await c.status()
        broken = find_actor(status, "Broken")
        assert broken["last_error"] is not None
        assert "broken.actor.js" in broken["last_error"]["message"]
        assert "line 5" in broken["last_error"]["message"], broken["last_error"]


async def test_memory_spin_and_hang_end_only_that_sandbox(make_host):
    host = await make_host({"failing.actor.js": FAILING, "producer.actor.py": PRODUCER}, """\
supervision:
  max_restarts: 20
  max_seconds: 60
  actors:
    Failing: {timeout: 8s}
""", start=False)
    host.config.write_text(host.config.read_text().replace(
        "    backend: bubblewrap\n",
        "    backend: bubblewrap\n    cpu_seconds: 2\n    javascript: {memory: 256MB}\n"))
    await host.start()
    async with open_client(host.url) as c:
        with pytest.raises(RpcError) as err:
            await c.call("Failing", {"how": "memory"})
        assert err.value.code == -32005 and err.value.data == {"limit": "memory"}
        with pytest.raises(RpcError) as err:
            await c.call("Failing", {"how": "spin"})
        assert err.value.code == -32005 and err.value.data == {"limit": "cpu"}
        with pytest.raises(RpcError) as err:
            await c.call("Failing", {"how": "hang"})
        assert err.value.code == -32003
        assert (await c.call("Failing", {"how": "ok"}))["outputs"]["out"]["value"] == "fine"
        assert (await c.call("Producer", {"n": 1}))["outputs"]["value"]["value"] == 10


async def test_javascript_cannot_read_files_reach_the_network_or_run_programs(make_host):
    host = await make_host({"hostile.actor.js": HOSTILE}, "supervision: {max_restarts: 20, max_seconds: 60}\n",
                           start=False)
    host.config.write_text(host.config.read_text().replace("    backend: bubblewrap\n",
                                                           "    backend: bubblewrap\n    max_output: 4MB\n"))
    await host.start()
    (host.config.parent / "secret.txt").write_text("s3cret")

    async def out(what, arg=None):
        return (await c.call("HostileJs", {"what": what, "arg": arg}))["outputs"]["out"]["value"]

    async with open_client(host.url) as c:
        for path in ("/etc/shadow", "/etc/passwd", str(host.config.parent / "secret.txt"), "/root/.bashrc"):
            assert (await out("read", path)).startswith("denied"), path
        for path in ("/usr/bin/evil", "/reflow/evil", "/etc/evil"):
            assert (await out("write", path)).startswith("denied"), path
        port = int(host.url.rsplit(":", 1)[1].strip("/"))
        assert (await out("tcp", port)).startswith("denied")
        assert (await out("dns")).startswith("denied")
        assert (await out("spawn", "/bin/sh")).startswith("denied")
        assert set(await out("env")) <= {"HOME", "PATH", "LANG", "PWD"}
        assert (await out("fill_tmp")).startswith("denied")
        assert (await out("symlink", str(host.config.parent / "secret.txt"))).startswith("denied")
        seen = await out("kill_host")
        assert set(seen["killed"]) <= {1} and max(seen["visible"]) < 64
        assert (await out("state_escape")) == {"keys": ["mine"], "other": None, "glob": []}
        assert (await out("fork_bomb")).startswith("stopped after"), "a fork bomb was not bounded"
        with pytest.raises(RpcError) as err:
            await out("stream")
        assert err.value.code == -32005 and err.value.data == {"limit": "output"}
        assert await out("none") is None
        sandboxed = [p for p in children_of(host.proc.pid) if "bwrap" in cmdline(p) or "node" in cmdline(p)]
    await host.stop()
    await wait_for(lambda: not any(cmdline(p) for p in sandboxed), timeout=10)  # nothing left behind


async def test_the_seeds_two_script_example_runs_from_the_command_line(make_host, tmp_path):
    host = await make_host({}, "", str(EXAMPLES / "calculator.py"), str(EXAMPLES / "processor.js"))
    async with open_client(host.url) as c:
        assert (await c.call("Processor", {"input": "abc", "operation": "reverse"}))["outputs"]["output"]["value"] == "cba"
        res = await c.call("Processor", {"input": 1, "operation": "nope"})
        assert res["outputs"]["error"]["type"] == "error"
        assert (await c.call("Calculator", {"a": 2, "b": 3, "op": "mul"}))["outputs"]["result"]["value"] == 6


STATE_OPS = '''\
module.exports = actor({name: 'StateJs', inports: ['x'], outports: ['out']}, async (ctx) => {
  const s = ctx.getState();
  const out = {};
  s.set('obj', {a: [1, 2], b: 'x'});
  out.get = s.get('obj');
  out.missing = s.get('nope', 'dflt');
  out.exists = [s.exists('obj'), await s.exists('nope')];
  out.inc = [s.increment('n'), s.increment('n', 5), s.decrement('n', 2)];
  s.push('list', 1); s.push('list', 'two');
  out.extend = s.extend('list', [3, 4]);
  out.pop = s.pop('list');
  out.list = s.get('list');
  s.set('tmp', 1);
  out.expire = s.expire('tmp', 100);
  const ttl = s.ttl('tmp');
  out.ttlOk = ttl > 0 && ttl <= 100;
  out.keys = s.keys('*').sort();
  out.deleted = [s.delete('tmp'), s.delete('tmp')];
  if (ctx.getInput('x') === 'fail') throw new Error('after writes');
  return {out};
});
'''


async def test_every_state_operation_from_javascript_and_a_failure_leaves_no_trace(make_host):
    host = await make_host({"state.actor.js": STATE_OPS})
    async with open_client(host.url) as c:
        with pytest.raises(RpcError):
            await c.call("StateJs", {"x": "fail"})
        out = (await c.call("StateJs", {"x": 1}))["outputs"]["out"]["value"]
    assert out["get"] == {"a": [1, 2], "b": "x"} and out["missing"] == "dflt"
    assert out["exists"] == [True, False]
    assert out["inc"] == [1, 6, 4]  # the failed message's increments left no trace
    assert out["extend"] == 4 and out["pop"] == 4 and out["list"] == [1, "two", 3]
    assert out["expire"] is True and out["ttlOk"] is True
    assert out["keys"] == ["list", "n", "obj", "tmp"]
    assert out["deleted"] == [True, False]
