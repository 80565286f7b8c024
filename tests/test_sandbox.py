"""The bubblewrap sandbox with a real worker: lifetime, view of the host, limits."""

from __future__ import annotations

import os
import time

import orjson
import pytest
import trio

from conftest import worker_rpc
from supervisor._sandbox._base import WorkerSpec
from supervisor._sandbox._bubblewrap import BubblewrapBackend

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")


async def test_worker_outlives_trio_thread_cache_idle_timeout():
    """bwrap --die-with-parent must not fire when a trio worker thread retires (~10 s idle)."""
    worker = await BubblewrapBackend().start(WorkerSpec(runtime="python"))
    try:
        # Make trio start (and later retire) a worker thread, as any to_thread user would.
        await trio.to_thread.run_sync(time.sleep, 0)
        await trio.sleep(12)
        assert worker.exit_info is None
        assert (await worker_rpc(worker, 1, "ping"))["result"] == {}
    finally:
        await worker.aclose()


SCRIPT = '''
import os, sys
from reflow import actor

@actor(name="Probe", inports=["what", "n"], outports=["out"])
def probe(context):
    what = context.get_input("what")
    if what == "view":
        return {"out": {"root": sorted(os.listdir("/")), "env": dict(os.environ), "uid": os.getuid(),
                        "hostname": os.uname().nodename, "cwd": os.getcwd(),
                        "exe": sys.executable, "proc": os.path.exists("/proc")}}
    if what == "alloc":
        blob = bytearray(context.get_input("n"))
        return {"out": len(blob)}
    if what == "write_usr":
        open("/usr/local/evil", "w").write("x")
    return {"out": None}
'''


async def test_sandbox_sees_neutral_paths_only_and_limits_memory():
    worker = await BubblewrapBackend().start(WorkerSpec(runtime="python"))
    try:
        assert (await worker_rpc(worker, 1, "load", {"source": SCRIPT, "filename": "probe.py",
                                              "limits": {"memory": 256 * 2**20}}))["result"] == {}
        view = (await worker_rpc(worker, 2, "process", {"payload": {"what": {"type": "string", "value": "view"}}}))
        out = view["result"]["outputs"]["out"]["value"]
        assert set(out["root"]) <= {"usr", "lib", "lib64", "tmp", "dev", "reflow"} and not out["proc"]
        assert set(out["env"]) <= {"HOME", "PATH", "LANG", "PWD"}
        assert out["hostname"] == "sandbox" and out["exe"] == "/usr/local/bin/python3"
        assert out["uid"] != 0  # and, on a root host, not root outside (test_hostile_sandbox.py)
        assert "/root" not in orjson.dumps(out).decode() and "/work" not in orjson.dumps(out).decode()
        err = await worker_rpc(worker, 3, "process", {"payload": {"what": {"type": "string", "value": "write_usr"}}})
        assert err["error"]["code"] == -32002 and err["error"]["data"]["type"] in ("OSError", "PermissionError")
        assert err["error"]["data"]["traceback"][-1].startswith('File "probe.py", line')
        ok = await worker_rpc(worker, 4, "process", {"payload": {"what": {"type": "string", "value": "alloc"},
                                                          "n": {"type": "integer", "value": 10**6}}})
        assert ok["result"]["outputs"]["out"]["value"] == 10**6
        bomb = await worker_rpc(worker, 5, "process", {"payload": {"what": {"type": "string", "value": "alloc"},
                                                            "n": {"type": "integer", "value": 2**30}}})
        assert bomb["error"]["code"] == -32005 and bomb["error"]["data"] == {"limit": "memory"}
        with trio.fail_after(5):
            info = await worker.wait()
        assert info.code is not None
    finally:
        await worker.aclose()
