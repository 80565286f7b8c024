"""Hostile scripts against a real host: each is contained with the right error; the others keep serving."""

from __future__ import annotations

import pytest

from conftest import open_client
from supervisor.client import RpcError

HOSTILE = r'''
import ctypes, os, signal, socket, sys
from reflow import actor

def attempt(fn):
    try:
        return "ALLOWED: " + repr(fn())[:80]
    except BaseException as e:
        return "denied: " + type(e).__name__

@actor(name="Hostile", inports=["what", "arg"], outports=["out"])
def hostile(context):
    what = context.get_input("what")
    arg = context.get_input("arg")
    state = context.get_state()
    if what == "read":
        return {"out": attempt(lambda: open(arg).read())}
    if what == "write":
        return {"out": attempt(lambda: open(arg, "w").write("x"))}
    if what == "listdir":
        return {"out": attempt(lambda: os.listdir(arg))}
    if what == "tcp":
        return {"out": attempt(lambda: socket.create_connection(("127.0.0.1", arg), timeout=1))}
    if what == "dns":
        return {"out": attempt(lambda: socket.getaddrinfo("pypi.org", 443))}
    if what == "env":
        return {"out": sorted(os.environ)}
    if what == "kill_host":
        # No /proc in the sandbox: a pid exists where signal 0 reaches it.
        visible = [pid for pid in range(1, 4096) if attempt(lambda: os.kill(pid, 0)).startswith("ALLOWED")]
        allowed = [pid for pid in range(1, 64) if pid != os.getpid()
                   and attempt(lambda: os.kill(pid, signal.SIGKILL)).startswith("ALLOWED")]
        return {"out": {"visible": visible, "killed": allowed}}
    if what == "symlink":
        os.symlink(arg, "/tmp/link")
        return {"out": attempt(lambda: open("/tmp/link").read())}
    if what == "fill_tmp":
        return {"out": attempt(lambda: open("/tmp/big", "wb").write(b"x" * (200 * 2**20)))}
    if what == "fork_bomb":
        n = 0
        try:
            while n < 10000:
                if os.fork() == 0:
                    import time
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            return {"out": f"stopped after {n}: {type(e).__name__}"}
        return {"out": f"ALLOWED {n} forks"}
    if what == "spin":
        while True:
            pass
    if what == "output":
        return {"out": "x" * arg}
    if what == "state_escape":
        state.set("mine", 1)
        return {"out": {"keys": state.keys("*"), "other": state.get("../Other:state:secret"),
                        "glob": state.keys("*:*")}}
    return {"out": None}
'''

OTHER = '''
from reflow import actor

@actor(name="Other", inports=["x"], outports=["y"])
def other(context):
    context.get_state().set("secret", "hunter2")
    return {"y": context.get_input("x")}
'''


@pytest.fixture
async def hostile(make_host):
    host = await make_host({"hostile.actor.py": HOSTILE, "other.actor.py": OTHER},
                           "supervision: {max_restarts: 20, max_seconds: 60}\n")
    async with open_client(host.url) as c:
        await c.call("Other", {"x": 1})
        yield host, c
        assert (await c.call("Other", {"x": 2}))["outputs"]["y"]["value"] == 2, "a bystander stopped serving"


async def out(c, what, arg=None, **kw):
    return (await c.call("Hostile", {"what": what, "arg": arg}, **kw))["outputs"]["out"]["value"]


async def test_files_network_env_and_host_processes_are_out_of_reach(hostile):
    host, c = hostile
    (host.config.parent / "secret.txt").write_text("s3cret")
    environ = await out(c, "read", "/proc/1/environ")  # the sandbox's own init: nothing of the host
    assert environ.startswith("denied") or "/" not in environ.replace("PWD=/\\x00", "").removeprefix("ALLOWED: ")
    for path in ("/etc/shadow", "/etc/passwd", str(host.config.parent / "secret.txt"),
                 "/root/.bashrc", str(host.state_dir / "redis.sock")):
        assert (await out(c, "read", path)).startswith("denied"), path
    for path in ("/usr/local/evil", "/reflow/evil", "/etc/evil"):
        assert (await out(c, "write", path)).startswith("denied"), path
    assert (await out(c, "listdir", "/home")).startswith("denied")
    port = int(host.url.rsplit(":", 1)[1].strip("/"))
    assert (await out(c, "tcp", port)).startswith("denied")
    assert (await out(c, "dns")).startswith("denied")
    assert set(await out(c, "env")) <= {"HOME", "PATH", "LANG", "PWD"}
    seen = await out(c, "kill_host")
    # Only the sandbox's own pid namespace is visible; its init (pid 1) ignores SIGKILL from inside.
    assert set(seen["killed"]) <= {1} and max(seen["visible"]) < 10
    assert (await out(c, "symlink", str(host.config.parent / "secret.txt"))).startswith("denied")


async def test_tmp_is_capped_and_a_fork_bomb_is_bounded(hostile):
    host, c = hostile
    assert (await out(c, "fill_tmp")).startswith("denied: OSError")
    result = await out(c, "fork_bomb", timeout=60)
    assert result.startswith("stopped after"), result


async def test_state_cannot_reach_other_actors_keys(hostile):
    host, c = hostile
    res = await out(c, "state_escape")
    assert res["keys"] == ["mine"] and res["other"] is None and res["glob"] == []


async def test_huge_output_and_cpu_spin_end_only_that_sandbox(make_host):
    host = await make_host({"hostile.actor.py": HOSTILE, "other.actor.py": OTHER})
    cfg = host.config.read_text().replace("    backend: bubblewrap\n",
                                          "    backend: bubblewrap\n    max_output: 1MB\n    cpu_seconds: 1\n")
    await host.stop()
    host.config.write_text(cfg)
    await host.start()
    async with open_client(host.url) as c:
        with pytest.raises(RpcError) as err:
            await out(c, "output", 4 * 2**20)
        assert err.value.code == -32005 and err.value.data == {"limit": "output"}
        with pytest.raises(RpcError) as err:
            await out(c, "spin", timeout=30)
        assert err.value.code == -32005 and err.value.data == {"limit": "cpu"}
        assert await out(c, "none") is None
        assert (await c.call("Other", {"x": 3}))["outputs"]["y"]["value"] == 3


SYSCALLS = r'''
import ctypes, os
from reflow import actor

@actor(name="Sys", inports=["x"], outports=["out"])
def sys_calls(context):
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, call in {
        "unshare": lambda: libc.unshare(0x10000000),            # CLONE_NEWUSER
        "mount": lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
        "ptrace": lambda: libc.ptrace(16, 1, None, None),       # PTRACE_ATTACH to pid 1
        "keyctl": lambda: libc.syscall(250, 0, 0, 0, 0),
        "bpf": lambda: libc.syscall(321, 0, 0, 0),
        "clone_newuser": lambda: libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0),  # CLONE_NEWUSER | SIGCHLD
        "clone_newnet": lambda: libc.syscall(56, 0x40000000 | 17, 0, 0, 0, 0),
    }.items():
        rc = call()
        if rc == 0:  # we are a child made by a clone that should have been denied
            os._exit(0)
        out[name] = (rc, ctypes.get_errno())
    out["clone3"] = (libc.syscall(435, 0, 0), ctypes.get_errno())
    pid = os.fork()  # plain fork and threads still work
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitpid(pid, 0)[1] >> 8
    return {"out": out}
'''


async def test_seccomp_denies_namespace_mount_ptrace_keyring_and_bpf_syscalls(make_host):
    host = await make_host({"sys.actor.py": SYSCALLS})
    async with open_client(host.url) as c:
        res = (await c.call("Sys", {"x": 1}))["outputs"]["out"]["value"]
    assert res.pop("fork") == 7 and res.pop("clone3") == [-1, 38], res  # clone3 → ENOSYS: libc falls back
    assert all(rc == -1 and err == 1 for rc, err in res.values()), res  # -1 / EPERM each


HANGS_AT_LOAD = {
    "a_hang.actor.py": "from reflow import actor\nwhile True:\n    pass\n\n"
                       "@actor(name='HangPy', inports=['x'], outports=['y'])\ndef f(c):\n    return {}\n",
    "b_hang.actor.js": "for (;;) {}\nmodule.exports = actor({name: 'HangJs', inports: ['x'], outports: ['y']}, "
                       "(c) => ({}));\n",
    "c_ok.actor.py": OTHER,
}


async def test_top_level_code_that_never_returns_does_not_hold_up_the_host(make_host):
    host = await make_host(HANGS_AT_LOAD, env={"REFLOW_LOAD_TIMEOUT": "2"})
    async with open_client(host.url) as c:
        assert (await c.call("Other", {"x": 5}))["outputs"]["y"]["value"] == 5
        actors = {a["name"]: a for a in (await c.request("actors.list"))["actors"]}
        for name in ("HangPy", "HangJs"):
            assert actors[name]["status"] == "failed", actors[name]
        with pytest.raises(RpcError) as err:
            await c.call("HangPy", {"x": 1})
        assert err.value.code == -32002
    assert "did not finish loading within 2s" in host.output()


CHANNEL_ABUSE_PY = r'''
import os, sys
from reflow import actor

@actor(name="AbusePy", inports=["how"], outports=["y"])
def abuse(context):
    fd = int(sys.argv[-1])
    how = context.get_input("how")
    if how == "junk":
        os.write(fd, b"garbage, not json\n")
    elif how == "array":
        os.write(fd, b"[1, 2, 3]\n")
    elif how == "untyped":
        os.write(fd, b'{"jsonrpc":"2.0","method":"output","params":{"id":1,"port":"y","message":42}}\n')
    elif how == "no_newline":
        os.write(fd, b"x" * (3 * 2**20))
    return {"y": 1}
'''

CHANNEL_ABUSE_JS = r'''
const fs = require('fs');
module.exports = actor({name: 'AbuseJs', inports: ['how'], outports: ['y']}, (ctx) => {
  const fd = Number(process.argv[process.argv.length - 1]);
  if (ctx.getInput('how') === 'junk') fs.writeSync(fd, 'garbage\n');
  if (ctx.getInput('how') === 'stringify') JSON.stringify = () => 'nope';
  return {y: 1};
});
'''


async def test_a_script_writing_garbage_on_its_channel_fails_only_its_message(make_host):
    host = await make_host({"abuse.actor.py": CHANNEL_ABUSE_PY, "abuse.actor.js": CHANNEL_ABUSE_JS,
                            "other.actor.py": OTHER}, "supervision: {max_restarts: 20, max_seconds: 60}\n")
    async with open_client(host.url) as c:
        for actor, hows in (("AbusePy", ("junk", "array", "untyped", "no_newline")), ("AbuseJs", ("junk", "stringify"))):
            for how in hows:
                with pytest.raises(RpcError) as err:
                    await c.call(actor, {"how": how})
                assert err.value.code == -32002, (actor, how, err.value)
                # The next message is served by a fresh worker, not the abused one's message again.
                assert (await c.call(actor, {"how": "ok"}))["outputs"]["y"]["value"] == 1, (actor, how)
        assert (await c.call("Other", {"x": 1}))["outputs"]["y"]["value"] == 1
        status = await c.status()
    network = status["children"][0]
    assert status["restarts"] == 0 and network["state"] == "running", status
    assert {n["name"]: n["restarts"] for n in network["children"]} == {"AbusePy": 4, "AbuseJs": 2, "Other": 0}
