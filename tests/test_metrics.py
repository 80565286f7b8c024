"""Plain HTTP on the API's port (/metrics, the page, hostile requests) and supervisor.watch, on real hosts."""

from __future__ import annotations

import os
import signal

import h11
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from conftest import open_client, wait_for
from supervisor.client import RpcError

DOUBLE = """\
from reflow import actor

@actor(name="Double", inports=["x"], outports=["y"])
async def double(context):
    x = context.get_input("x")
    if x == "fail":
        raise RuntimeError("asked to fail")
    return {"y": x * 2}
"""


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


async def http(url: str, target: str, headers: list[tuple[str, str]] | None = None, *, raw: bytes | None = None,
               method: str = "GET") -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request over a fresh TCP connection (h11 on our side too)."""
    stream = await trio.open_tcp_stream("127.0.0.1", _port(url))
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        if raw is None:
            raw = conn.send(h11.Request(method=method, target=target, headers=[("host", "x"), *(headers or [])]))
            raw += conn.send(h11.EndOfMessage())
        else:
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))  # (to read the answer)
            conn.send(h11.EndOfMessage())
        await stream.send_all(raw)
        status, hdrs, body = 0, {}, b""
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, hdrs = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, hdrs, body


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def sample(fams: dict, family: str, name: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


async def test_metrics_parse_and_move_with_traffic(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    status, hdrs, body = await http(host.url, "/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    before = families(body)
    for name in ("reflow_messages", "reflow_message_duration_seconds", "reflow_restarts", "reflow_mailbox_depth",
                 "reflow_workers", "reflow_deadletters", "process_cpu_seconds"):
        assert name in before, name
    assert before["reflow_message_duration_seconds"].type == "histogram"
    ok0 = sample(before, "reflow_messages", "reflow_messages_total", actor="Double", outcome="ok")
    async with open_client(host.url) as c:
        for i in range(5):
            assert (await c.call("Double", {"x": i}))["outputs"]["y"]["value"] == 2 * i
        with pytest.raises(RpcError) as err:
            await c.call("Double", {"x": "fail"})
        assert err.value.code == -32002, err.value
        st = await c.status()
        pid = st["children"][0]["children"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: _restarts(c), timeout=10)
    after = families((await http(host.url, "/metrics"))[2])
    assert sample(after, "reflow_messages", "reflow_messages_total", actor="Double", outcome="ok") == ok0 + 5
    assert sample(after, "reflow_messages", "reflow_messages_total", actor="Double", outcome="failed") == 1
    count = sample(after, "reflow_message_duration_seconds", "reflow_message_duration_seconds_count", actor="Double")
    assert count == 6
    assert sample(after, "reflow_message_duration_seconds", "reflow_message_duration_seconds_bucket", actor="Double",
                  le="+Inf") == 6
    assert sample(after, "reflow_restarts", "reflow_restarts_total", actor="Double") == 1
    assert sample(after, "reflow_mailbox_depth", "reflow_mailbox_depth", actor="Double") == 0
    assert sample(after, "reflow_workers", "reflow_workers", runtime="python", state="max") == 20
    assert sample(after, "reflow_deadletters", "reflow_deadletters") == 0


async def _restarts(c) -> bool:
    st = await c.status()
    node = st["children"][0]["children"][0]
    return node["restarts"] == 1 and node["state"] == "running"


async def test_watch_pushes_exit_with_its_cause_then_restart(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    async with open_client(host.url) as c:
        r = await c.request("supervisor.watch")
        events = c.on_notification(r["subscription"])
        snap = r["snapshot"]
        node = snap["status"]["children"][0]["children"][0]
        assert node["name"] == "Double" and node["state"] == "running"
        assert [n["name"] for n in snap["graph"]["nodes"]] == ["Double"] and len(snap["hosts"]) == 1
        os.kill(node["pid"], signal.SIGKILL)
        seen: list[dict] = []
        with trio.fail_after(5):
            async for note in events:
                ev = note["params"]
                assert ev["subscription"] == r["subscription"]
                if ev["event"] in ("exited", "restarting", "restarted"):
                    seen.append(ev)
                if ev["event"] == "restarted":
                    break
        exited = seen[0]
        assert exited["event"] == "exited" and exited["actor"] == "Double"
        assert exited["cause"]["type"] == "WorkerDied" and exited["cause"]["signal"] == signal.SIGKILL
        assert seen[-1]["node"]["pid"] not in (None, node["pid"]) and seen[-1]["restarts"] == 1
        # stats and the log arrive by push too
        with trio.fail_after(5):
            kinds = set()
            async for note in events:
                kinds.add(note["params"]["event"])
                if {"stats", "log"} <= kinds:
                    break
        assert await c.request("actor.unsubscribe", {"subscription": r["subscription"]}) == {}


async def test_token_guards_metrics_and_the_websocket_but_not_the_page(make_host):
    host = await make_host({"double.actor.py": DOUBLE}, env={"REFLOW_TOKEN": "s3cret"})
    assert (await http(host.url, "/metrics"))[0] == 401
    assert (await http(host.url, "/metrics", [("authorization", "Bearer wrong")]))[0] == 401
    status, _, body = await http(host.url, "/metrics", [("authorization", "Bearer s3cret")])
    assert status == 200 and b"reflow_messages_total" in body
    status, hdrs, page = await http(host.url, "/")
    assert status == 200 and b"dashboard.js" in page and "frame-ancestors 'none'" in hdrs["content-security-policy"]
    assert (await http(host.url, "/auth"))[0] == 401
    assert (await http(host.url, "/auth", [("authorization", "Bearer s3cret")]))[0] == 204
    async with open_client(host.url + "?token=s3cret") as c:  # what the page's WebSocket sends
        assert (await c.call("Double", {"x": 2}))["outputs"]["y"]["value"] == 4
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with open_client(host.url + "?token=nope", reconnect=False) as c:
            await c.status()
    assert refused.value.status_code == 401


async def test_hostile_http_gets_a_refusal_and_holds_nothing_up(make_host):
    host = await make_host({"double.actor.py": DOUBLE})
    port = _port(host.url)
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    await slow.send_all(b"GET /metrics HT")  # and never the rest
    async with open_client(host.url) as c:
        assert (await c.call("Double", {"x": 1}))["outputs"]["y"]["value"] == 2
    assert (await http(host.url, "/metrics"))[0] == 200
    assert (await http(host.url, "/", raw=b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40000 + b"\r\n\r\n"))[0] == 431
    assert (await http(host.url, "/", raw=b"\x16\x03\x01 not http at all\r\n\r\n"))[0] == 400
    assert (await http(host.url, "/", method="POST"))[0] == 405
    assert (await http(host.url, "/nope"))[0] == 404
    assert (await http(host.url, "/../../etc/passwd"))[0] == 404
    await slow.aclose()
    async with open_client(host.url) as c:
        assert (await c.status())["state"] == "running"


# -- the pure parts -------------------------------------------------------------------------------

def test_quantiles_interpolate_within_buckets_as_prometheus_does():
    from supervisor._metrics import BUCKETS, ActorStats, quantile

    s = ActorStats()
    assert quantile(0.5, s.counts) is None
    for _ in range(90):
        s.observe(0.0003, None)  # (0.00025, 0.0005]
    for _ in range(10):
        s.observe(0.2, RuntimeError("x"))  # (0.1, 0.25]
    assert (s.ok, s.failed) == (90, 10) and s.last_failure["type"] == "RuntimeError"
    assert 0.00025 < quantile(0.5, s.counts) <= 0.0005
    assert 0.1 < quantile(0.99, s.counts) <= 0.25
    s.observe(1e6, None)  # beyond every bound: the +Inf bucket
    assert s.counts[len(BUCKETS)] == 1


def test_a_cause_of_death_names_signal_limit_and_traceback():
    from supervisor._cell import ScriptLoadFailed, WorkerDied
    from supervisor._sandbox._base import ExitInfo
    from supervisor._tree import PermanentFailure, error_info

    killed = error_info(WorkerDied("a", ExitInfo(signal=9)))
    assert killed["type"] == "WorkerDied" and killed["signal"] == 9
    assert error_info(WorkerDied("a", ExitInfo(code=1, limit="memory")))["limit"] == "memory"
    load = ScriptLoadFailed("a", {"message": "boom", "data": {"traceback": ['File "a.py", line 1, in <module>']}})
    try:
        raise PermanentFailure(str(load)) from load
    except PermanentFailure as exc:
        info = error_info(exc)
    assert info["traceback"] == ['File "a.py", line 1, in <module>']


def test_a_watcher_that_falls_behind_is_resynced_not_queued_without_bound():
    from supervisor._watch import MAX_PENDING, _Sub

    sub = _Sub("w", conn=None)
    for i in range(MAX_PENDING + 100):
        sub.put({"event": "started", "i": i})
    assert sub.overflowed and sub.pending == []  # it gets a fresh snapshot instead
