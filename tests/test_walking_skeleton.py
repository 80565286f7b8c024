"""End to end: a real host process, real bubblewrap, real Redis, a real WebSocket client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

from conftest import EXAMPLES, ROOT, SEEDS, children_of, cmdline, open_client, seed_block, wait_for, wait_printed
from supervisor.client import RpcError

CALC = (EXAMPLES / "calculator.py").read_text()
DATA_PROCESSOR = (EXAMPLES / "data_processor.actor.py").read_text()
TEST_ACTOR = (EXAMPLES / "test_actor.py").read_text()

SLOW = '''
import time
from reflow import actor

@actor(name="Slow", inports=["seconds"], outports=["done"])
def slow(context):
    if context.get_input("seconds"):
        print("sleeping")  # the test waits for this line: the message is in the script
    time.sleep(context.get_input("seconds"))
    return {"done": True}
'''

SNOOP = '''
import os, socket
from reflow import actor

@actor(name="Snoop", inports=["path", "sock", "port"], outports=["report"])
async def snoop(context):
    report = {}
    try:
        open(context.get_input("path")).read()
        report["file"] = "read"
    except OSError as e:
        report["file"] = type(e).__name__
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(context.get_input("sock"))
        report["redis_socket"] = "connected"
    except OSError as e:
        report["redis_socket"] = type(e).__name__
    try:
        socket.create_connection(("127.0.0.1", context.get_input("port")), timeout=2)
        report["tcp"] = "connected"
    except OSError as e:
        report["tcp"] = type(e).__name__
    report["env"] = sorted(os.environ)
    report["root"] = sorted(os.listdir("/"))
    return {"report": report}
'''


async def test_call_calculator_over_websocket(make_host):
    host = await make_host({"calc.actor.py": CALC})
    async with open_client(host.url) as c:
        listed = await c.request("actors.list")
        (calc,) = listed["actors"]
        assert calc["name"] == "Calculator" and calc["runtime"] == "python"
        assert calc["inports"] == ["a", "b", "op", "value"] and calc["status"] == "running"
        res = await c.call("Calculator", {"a": 6, "b": 7, "op": "mul"})
        assert res["outputs"]["result"] == {"type": "integer", "value": 42}
        assert res["emitted"] == [{"port": "result", "message": {"type": "integer", "value": 42}}]
        res = await c.call("Calculator", {"a": {"type": "float", "value": 1.5}, "b": 2})
        assert res["outputs"]["result"] == {"type": "float", "value": 3.5}
        with pytest.raises(RpcError) as err:
            await c.call("Nope", {"a": 1})
        assert err.value.code == -32001


async def test_seed_examples_run_unmodified_and_process_streams(make_host):
    host = await make_host({"dp.actor.py": DATA_PROCESSOR}, "", str(EXAMPLES / "test_actor.py"))
    async with open_client(host.url) as c:
        res = await c.call("DataProcessor", {"data": [1, 2, 3], "config": {"scale": 10}})
        assert res["outputs"]["processed"] == {"type": "array", "value": [10, 20, 30]}
        assert res["outputs"]["metrics"] == {"type": "object", "value": {"count": 1}}
        streamed = c.on_notification("output")
        res = await c.request("process", {"actor_id": "test_actor", "payload": {"value": 21}, "config": {},
                                          "state": {}, "timestamp": 1})
        assert res == {"outputs": {"status": "processing", "result": 42}}
        notes = [streamed.receive_nowait()["params"] for _ in range(2)]
        assert [(n["port"], n["data"], n["actor_id"]) for n in notes] == [
            ("status", "processing", "test_actor"), ("result", 42, "test_actor")]


async def test_sigkill_worker_fails_that_call_and_next_call_succeeds(make_host):
    host = await make_host({"slow.actor.py": SLOW})
    async with open_client(host.url) as c:
        assert (await c.call("Slow", {"seconds": 0}))["outputs"]["done"]["value"] is True
        status = await c.status()
        cell = status["children"][0]["children"][0]
        sandbox_pid = cell["pid"]
        assert cell["tier"] == "namespaces"

        async def killer():
            def python_inside():
                return [p for p in children_of(sandbox_pid) if cmdline(p).startswith("/usr/local/bin/python3")]
            (pid,) = await wait_for(python_inside)
            await wait_printed(host, "sleeping")  # the call reached the script's time.sleep
            os.kill(pid, signal.SIGKILL)

        async with trio.open_nursery() as n:
            n.start_soon(killer)
            with pytest.raises(RpcError) as err:
                await c.call("Slow", {"seconds": 20})
        assert err.value.code == -32002
        assert err.value.data["signal"] == signal.SIGKILL
        res = await c.call("Slow", {"seconds": 0}, timeout=20)
        assert res["outputs"]["done"]["value"] is True
        status = await c.status()
        assert status["children"][0]["children"][0]["restarts"] == 1


async def test_state_survives_host_restart(make_host):
    host = await make_host({"dp.actor.py": DATA_PROCESSOR})
    async with open_client(host.url) as c:
        for expected in (1, 2):
            res = await c.call("DataProcessor", {"data": [1]})
            assert res["outputs"]["metrics"]["value"] == {"count": expected}
    assert await host.stop() == 0
    await host.start()
    async with open_client(host.url) as c:
        res = await c.call("DataProcessor", {"data": [1]})
        assert res["outputs"]["metrics"]["value"] == {"count": 3}
    assert (host.state_dir / "appendonly.aof").exists() or (host.state_dir / "appendonlydir").exists()


async def test_script_cannot_read_workspace_or_reach_redis_or_api(make_host):
    host = await make_host({"snoop.actor.py": SNOOP})
    secret = host.config.parent / "secret.txt"
    secret.write_text("s3cret")
    port = int(host.url.rsplit(":", 1)[1].strip("/"))
    async with open_client(host.url) as c:
        res = await c.call("Snoop", {"path": str(secret), "sock": str(host.state_dir / "redis.sock"), "port": port})
    report = res["outputs"]["report"]["value"]
    assert report["file"] in ("FileNotFoundError", "PermissionError")
    assert report["redis_socket"] in ("FileNotFoundError", "ConnectionRefusedError", "PermissionError")
    assert report["tcp"] in ("ConnectionRefusedError", "OSError", "TimeoutError")
    assert not set(report["env"]) - {"HOME", "PATH", "LANG", "PWD"}
    assert set(report["root"]) <= {"usr", "lib", "lib64", "tmp", "dev", "proc", "reflow"}


def _cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, cwd=cwd)


def test_check_config_seed_file_and_bad_key(tmp_path):
    seed = SEEDS / "004_907eda7e1530af8d.txt"
    text = seed.read_text() if seed.exists() else None
    if text is not None:
        block = seed_block(text, "yaml")
        (tmp_path / "seed.yaml").write_text(block)
        r = _cli("check-config", "-c", str(tmp_path / "seed.yaml"))
        assert r.returncode == 0, r.stderr
    (tmp_path / "bad.yaml").write_text("workspace:\n  sandbox:\n    memory_limt: 1GB\n")
    r = _cli("check-config", "-c", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2
    assert "workspace.sandbox.memory_limt" in r.stderr and "bad.yaml:3" in r.stderr
    assert "Traceback" not in r.stderr
    assert _cli("check-config", "-c", str(ROOT / "reflow.yaml")).returncode == 0


def test_discover_lists_broken_scripts_with_line(tmp_path):
    (tmp_path / "good.actor.py").write_text(CALC)
    (tmp_path / "broken.actor.py").write_text("from reflow import actor\n\n@actor(name='X'\ndef f(:\n")
    (tmp_path / "reflow.yaml").write_text("workspace: {root: .}\n")
    r = _cli("discover", "-c", str(tmp_path / "reflow.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Calculator" in r.stdout
    assert "broken.actor.py:" in r.stdout


async def test_external_redis_url_holds_the_state(make_host, tmp_path):
    import redis as redis_py

    from conftest import free_port
    from supervisor._redis import embedded_redis_binary

    port = free_port()
    server = subprocess.Popen([embedded_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        client = redis_py.Redis(port=port)
        await wait_for(lambda: _pings(client))
        host = await make_host({"dp.actor.py": DATA_PROCESSOR},
                               env={"REFLOW_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        async with open_client(host.url) as c:
            await c.call("DataProcessor", {"data": [1]})
        assert client.get("reflow:DataProcessor:state:process_count") == b"1"
        assert not (host.state_dir / "redis.sock").exists()
    finally:
        server.kill()
        server.wait()


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


async def test_an_actor_whose_runtime_cannot_run_is_listed_unavailable_and_the_rest_serve(make_host, tmp_path):
    import shutil

    js = "// JS\nmodule.exports = actor({name: 'Js', inports: ['x'], outports: ['y']}, async function (c) {});\n"
    bin_dir = tmp_path / "bin"  # a PATH with bubblewrap and ldd but no node
    bin_dir.mkdir()
    for tool in ("bwrap", "ldd", "sh"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    host = await make_host({"calc.actor.py": CALC, "js.actor.js": js}, env={"PATH": str(bin_dir)})
    async with open_client(host.url) as c:
        actors = {a["name"]: a for a in (await c.request("actors.list"))["actors"]}
        assert actors["Js"]["status"] == "unavailable" and "Node.js" in actors["Js"]["reason"]
        assert (await c.call("Calculator", {"a": 1, "b": 2}))["outputs"]["result"]["value"] == 3
