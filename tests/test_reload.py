"""Hot reload: real file edits under a running host (edit, break, fix, delete, add), and the pure plan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from conftest import find_actor, open_client
from supervisor._scan import extract
from supervisor.core.discovery import Discovery, ScriptProblem
from supervisor._reload import plan_reload
from supervisor.client import RpcError

COUNTER = '''
from reflow import actor

@actor(name="Counter", inports=["x", "peek"], outports=["y"])
def count(context):
    if context.has_input("peek"):
        return {"y": context.get_state().get("n")}
    n = context.get_state().increment("n")
    return {"y": context.get_input("x") + STEP}

STEP = 1
'''

JS = '''\
// doubles, or whatever it is edited to do
module.exports = actor({name: 'Js', inports: ['x'], outports: ['y']}, (ctx) => ({y: ctx.getInput('x') * 2}));
'''


def write(path: Path, text: str) -> None:
    # Atomic, as editors save: a half-written file is never read.
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def y(c, actor: str, x):
    out = (await c.call(actor, {"x": x}))["outputs"]["y"]["value"]
    c.calls = getattr(c, "calls", {})
    c.calls[actor] = c.calls.get(actor, 0) + 1  # a call that failed left no trace in state
    return out


def calls(c, actor: str) -> int:
    return c.calls.get(actor, 0) - 1  # the first call (before the edit) is counted in "sent + 1"


async def peek(c):
    return (await c.call("Counter", {"peek": True}))["outputs"]["y"]["value"]


async def eventually(fn, expect, timeout: float = 20):
    """Poll ``fn`` (an API call) until it returns ``expect``; reloads are asynchronous by nature."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            try:
                last = await fn()
            except RpcError as exc:
                last = exc
            if last == expect:
                return
            await trio.sleep(0.1)
    raise AssertionError(f"still {last!r}, expected {expect!r}")


async def test_edit_break_fix_delete_and_add_under_a_running_host(make_host):
    host = await make_host({"counter.actor.py": COUNTER, "js.actor.js": JS})
    ws = host.config.parent
    async with open_client(host.url) as c:
        await wait_for_watching(c)
        assert await y(c, "Counter", 10) == 11
        assert await y(c, "Js", 4) == 8

        # Edit while messages are being accepted: every accepted one is processed once.
        sent = 0
        for _ in range(20):
            await c.send("Counter", "x", 0)
            sent += 1
        write(ws / "counter.actor.py", COUNTER.replace("STEP = 1", "STEP = 100"))
        for _ in range(20):
            await c.send("Counter", "x", 0)
            sent += 1
        await eventually(lambda: y(c, "Counter", 0), 100, timeout=30)
        await eventually(lambda: peek(c), sent + 1 + calls(c, "Counter"))

        write(ws / "js.actor.js", JS.replace("* 2", "* 3"))
        await eventually(lambda: y(c, "Js", 4), 12)

        # JavaScript whose metadata reads but whose code does not compile: found by a trial
        # load in a throwaway sandbox, so the running version stays.
        write(ws / "js.actor.js", JS.replace("* 2", "* )"))
        await wait_for_status(c, lambda st: any("js.actor.js:2" in p and "SyntaxError" in p
                                                for p in st["script_problems"]))
        assert await y(c, "Js", 4) == 12
        write(ws / "js.actor.js", JS.replace("* 2", "* 3 + 1"))
        await eventually(lambda: y(c, "Js", 4), 13)
        await wait_for_status(c, lambda st: st["script_problems"] == [])

        # A broken edit keeps the previous code running and says where it broke.
        write(ws / "counter.actor.py", COUNTER.replace("def count(context):", "def count(context:"))
        await wait_for_status(c, lambda st: any("counter.actor.py:5" in p for p in st["script_problems"]))
        assert await y(c, "Counter", 1) == 101
        restarts = find_actor(await c.status(), "Counter")["restarts"]

        # Fixed: the new code runs; a reload is not a failure, so restarts do not count it.
        write(ws / "counter.actor.py", COUNTER.replace("STEP = 1", "STEP = 7"))
        await eventually(lambda: y(c, "Counter", 1), 8)
        status = await c.status()
        assert status["script_problems"] == [] and find_actor(status, "Counter")["restarts"] == restarts

        # Deleted: it stops and is no longer listed; the others serve on.
        (ws / "js.actor.js").unlink()
        await wait_for_status(c, lambda st: not find_actor(st, "Js"))
        with pytest.raises(RpcError):
            await c.call("Js", {"x": 1})
        assert "Js" not in {a["name"] for a in (await c.request("actors.list"))["actors"]}

        # Added: a new file starts.
        write(ws / "added.actor.js", JS.replace("'Js'", "'Added'"))
        await eventually(lambda: y(c, "Added", 5), 10)
        assert await y(c, "Counter", 1) == 8
        assert await peek(c) == sent + 1 + calls(c, "Counter")


async def wait_for_watching(c) -> None:
    await wait_for_status(c, lambda st: st["hot_reload"] == "watching")


async def wait_for_status(c, predicate, timeout: float = 20) -> None:
    status = None
    with trio.move_on_after(timeout):
        while not predicate(status := await c.status()):
            await trio.sleep(0.1)
        return
    raise AssertionError(f"status never matched: {status}")


# -- the pure plan ----------------------------------------------------------------------------------

def comp(tmp_path: Path, name: str, body: str = "return {}", file: str | None = None):
    path = tmp_path / (file or f"{name.lower()}.actor.py")
    src = f"from reflow import actor\n\n@actor(name={name!r}, inports=['x'], outports=['y'])\ndef f(context):\n    {body}\n"
    path.write_text(src)
    return extract(path)


def test_plan_starts_replaces_stops_and_keeps_broken_files_on_old_code(tmp_path):
    a, b, c = comp(tmp_path, "A"), comp(tmp_path, "B"), comp(tmp_path, "C")
    a2 = comp(tmp_path, "A", "return {'y': 2}")
    d = comp(tmp_path, "D")
    found = Discovery((a2, d), (ScriptProblem(b.file, 3, "invalid syntax"),))
    plan = plan_reload([a, b, c], found, exists=lambda p: p != c.file)
    assert plan.replace == (a2,) and plan.start == (d,) and plan.stop == (c,) and plan.kept == (b,)
    assert {x.name for x in plan.components} == {"A", "B", "D"}


def test_plan_ignores_a_touch_and_stops_a_renamed_actor(tmp_path):
    a = comp(tmp_path, "A")
    touched = extract(a.file)
    os.utime(a.file, ns=(1, 1))
    touched = extract(a.file)
    assert plan_reload([a], Discovery((touched,), ())).empty
    renamed = comp(tmp_path, "Z", file=a.file.name)
    plan = plan_reload([a], Discovery((renamed,), ()))
    assert plan.stop == (a,) and plan.start == (renamed,)
