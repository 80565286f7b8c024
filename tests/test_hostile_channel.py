"""Hostile bytes on a sandbox's channel, through a real host: each probe ends only that
sandbox, with the right error, and a bystander actor keeps answering meanwhile.

The scripts write straight to the channel fd (the worker's last argv), so the host sees
exactly the bytes a compromised worker could send.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import pytest
import trio

from conftest import open_client
from supervisor.core.frames import MAX_OUTPUTS, MAX_STATE_CALLS, json_values
from supervisor._channel import MAX_ATTACHMENTS, FrameTooLarge, LineChannel, SendTimedOut
from supervisor.core.config import parse_config
from supervisor.client import RpcError

MAX_OUTPUT = 4 * 2**20

FLOOD = r'''
import json, os, random, sys, threading, time
from reflow import actor

FD = int(sys.argv[-1])

def put(data):
    view = memoryview(data)
    while view:
        view = view[os.write(FD, view):]

def frame(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()

def drain():  # reads what the host answers, so that the host's writes never wait
    while os.read(FD, 1 << 16):
        pass

OUTPUT = frame({"jsonrpc": "2.0", "method": "output",
                "params": {"port": "y", "message": {"type": "null", "value": None}}})
STATE = frame({"jsonrpc": "2.0", "id": "s1", "method": "state", "params": {"op": "get", "args": ["k"]}})
LOG = frame({"jsonrpc": "2.0", "method": "log", "params": {"stream": "stdout", "text": "hello"}})

@actor(name="Flood", inports=["how", "n"], outports=["y"])
def flood(context):
    how, n = context.get_input("how"), context.get_input("n") or 0
    if how == "header":          # an attachment header with n entries
        chunk = b"0," * 2**20
        put(b"@")
        for _ in range(n // 2**20):
            put(chunk)
        put(b"0 {}\n")
    elif how == "line":          # one line of n bytes
        put(b"x" * n + b"\n")
    elif how == "attached":      # a header whose attachments add up to n bytes
        put(b"@%d {}\n" % n + b"\0" * n)
    elif how == "inflate":       # an output of n bytes of JSON that parses to n/3 dicts
        put(b'{"jsonrpc":"2.0","method":"output","params":{"port":"y","message":{"type":"array","value":['
            + b"{}," * (n // 3) + b'{}]}}}\n')
    elif how == "commas":        # legitimate: a long string full of commas
        return {"y": "a," * n}
    elif how == "outputs":
        put(OUTPUT * n)
    elif how == "states":
        threading.Thread(target=drain, daemon=True).start()
        put(STATE * n)
        time.sleep(60)
    elif how == "logs":
        put(LOG * n)
    elif how == "wrong_id":
        put(frame({"jsonrpc": "2.0", "id": 10**9, "result": {}}))
    elif how == "string_id":
        put(frame({"jsonrpc": "2.0", "id": "s1", "result": {"outputs": {}}}))
    elif how == "method":
        put(frame({"jsonrpc": "2.0", "method": "spawn", "params": {}}))
    elif how == "junk":
        put(bytes(random.Random(n).randrange(256) for _ in range(4096)) + b"\n")
    elif how == "partial":
        put(b'{"jsonrpc":"2.0","id":')
        time.sleep(3600)
    elif how == "deaf":          # answers, then never reads the channel again
        os.readv = lambda *args: time.sleep(3600)
    elif how == "spin":
        while True:
            pass
    elif how == "fuzz":          # n: the seed; one frame in 10 is hostile
        return {"y": fuzz(n, 0.1)}
    elif how == "fuzz_rare":     # one in 300
        return {"y": fuzz(n, 1 / 300)}
    return {"y": 1}

def fuzz(seed, bad):
    """Random frames, valid ones (log lines, outputs) and a fraction ``bad`` of hostile ones
    (garbage, partial, oversized, over-inflating, bad headers, stray replies); returns how many."""
    rng = random.Random(seed)
    frames = []
    for _ in range(rng.randrange(50, 400)):
        r = rng.random()
        if r > bad:
            if r < 0.5:
                frames.append(LOG)
                continue
            size = rng.choice([1, 10, 1000, 30000])
            frames.append(frame({"jsonrpc": "2.0", "method": "output", "params": {
                "port": "y", "message": {"type": "string", "value": "z" * size}}}))
            continue
        r = rng.random()
        if r < 0.2:
            frames.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n")
        elif r < 0.4:
            frames.append(b"@" + b"7," * rng.randrange(1, 2**21) + b"1 {}\n")
        elif r < 0.6:
            frames.append(b"[" + b"[]," * rng.randrange(10, 2**20) + b"[]]\n")
        elif r < 0.7:
            frames.append(b'{"jsonrpc":"2.0","method":"out')  # partial: the next frame makes it junk
        elif r < 0.8:
            frames.append(b"y" * rng.randrange(2**22, 2**23))
        else:
            frames.append(frame({"jsonrpc": "2.0", "id": rng.randrange(10**6), "result": {}}))
    put(b"".join(frames))
    return len(frames)
'''

ECHO = '''
from reflow import actor

@actor(name="Echo", inports=["x"], outports=["y"])
def echo(context):
    return {"y": context.get_input("x")}
'''

CONFIG = f"""\
supervision:
  max_restarts: 1000
  max_seconds: 1
  backoff: {{min: 1ms, max: 20ms}}
  timeout: 2s
"""


def rss(pid: int) -> int:
    """Resident bytes of a process (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def flood(make_host):
    host = await make_host({"flood.actor.py": FLOOD, "echo.actor.py": ECHO}, CONFIG, start=False)
    host.config.write_text(host.config.read_text().replace(
        "    backend: bubblewrap\n", f"    backend: bubblewrap\n    max_output: {MAX_OUTPUT}\n"))
    await host.start()
    async with open_client(host.url) as c, open_client(host.url) as by:
        await c.call("Flood", {"how": "ok"})
        yield host, c, by


class Bystander:
    """Calls Echo in a loop on its own connection; ``worst`` is its slowest answer."""

    def __init__(self, client):
        self.client, self.worst, self.calls = client, 0.0, 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        while True:
            t0 = time.perf_counter()
            try:
                assert (await self.client.call("Echo", {"x": self.calls}))["outputs"]["y"]["value"] == self.calls
            finally:  # (a call still waiting when the probe ends counts too: that is the stall)
                self.worst = max(self.worst, time.perf_counter() - t0)
            self.calls += 1
            await trio.sleep(0.005)


async def probe(c, by, how, n=0):
    """Send ``how`` to Flood while the bystander calls Echo; the error Flood answered
    (None if it answered), and the bystander's slowest answer meanwhile."""
    bystander = Bystander(by)
    error = None
    async with trio.open_nursery() as nursery:
        await nursery.start(bystander.run)
        try:
            await c.call("Flood", {"how": how, "n": n}, timeout=30)
        except RpcError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    # The next message is served, by a fresh worker if that one was ended.
    assert (await c.call("Flood", {"how": "ok"}, timeout=10))["outputs"]["y"]["value"] == 1, how
    return error, bystander.worst


OUTPUT_LIMIT = [
    ("header", 20_000_000),            # @0,0,0,… 20 M entries: judged from its first bytes
    ("line", MAX_OUTPUT + 1),          # one line past the limit
    ("attached", MAX_OUTPUT + 1),      # attachments past the limit, never read
    ("inflate", MAX_OUTPUT - 200),     # within the byte limit, but it would parse to ~1.4 M dicts
    ("outputs", MAX_OUTPUTS + 1),
    ("states", MAX_STATE_CALLS + 1),
]


async def test_oversized_and_overcounted_frames_end_only_that_sandbox_with_the_output_limit(flood):
    host, c, by = flood
    base = rss(host.proc.pid)
    for how, n in OUTPUT_LIMIT:
        error, worst = await probe(c, by, how, n)
        assert error is not None and error.code == -32005 and error.data == {"limit": "output"}, (how, error)
        assert worst < 1.5, f"{how}: the bystander waited {worst:.2f}s"
    # Nothing of it stays: the host did not parse (nor keep) what it refused.
    assert rss(host.proc.pid) - base < 60 * 2**20, (rss(host.proc.pid) - base) / 2**20
    # Within the limits, the same kinds of traffic are served.
    for how, n in (("outputs", 100), ("logs", 5000), ("commas", MAX_OUTPUT // 3)):
        error, _ = await probe(c, by, how, n)
        assert error is None, (how, error)
    status = await c.status()
    assert status["state"] == "running" and status["children"][0]["state"] == "running", status


async def test_frames_that_are_not_the_protocol_are_violations_and_a_stall_times_out(flood):
    host, c, by = flood
    for how in ("wrong_id", "string_id", "method", "junk"):
        error, worst = await probe(c, by, how, 7)
        assert error is not None and error.code == -32002 and error.data["type"] == "ProtocolViolation", (how, error)
        assert worst < 1.5, f"{how}: the bystander waited {worst:.2f}s"
    for how in ("partial", "spin"):  # (the message timeout is 2s here)
        t0 = time.perf_counter()
        error, worst = await probe(c, by, how)
        assert error is not None and error.code == -32003, (how, error)
        assert time.perf_counter() - t0 < 6, how  # answered at the timeout; the next message right after
        assert worst < 1.5, f"{how}: the bystander waited {worst:.2f}s"


async def test_a_worker_that_stops_reading_is_replaced_and_its_messages_served(flood):
    host, c, by = flood
    await c.call("Flood", {"how": "deaf"})
    answers = []

    async def call(big):  # enough of them that the host's writes fill the channel
        try:
            answers.append((await c.call("Flood", {"how": "ok", "n": big}, timeout=20))["outputs"]["y"]["value"])
        except RpcError as exc:
            answers.append(exc.code)

    async with trio.open_nursery() as nursery:
        for i in range(24):
            nursery.start_soon(call, "p" * (256 * 1024 + i))
    assert answers == [1] * 24  # sent to a worker that did not read them: served by the next one
    assert (await by.call("Echo", {"x": 1}))["outputs"]["y"]["value"] == 1


def test_the_shipped_defaults_bound_a_message_and_a_workers_cpu(tmp_path):
    cfg = parse_config("", base_dir=tmp_path)
    assert math.isfinite(cfg.supervision.timeout) and 0 < cfg.supervision.timeout <= 60
    assert cfg.workspace.sandbox.cpu_seconds is not None and math.isfinite(cfg.workspace.sandbox.cpu_seconds)


async def fuzz(host, c, by, frames: int, how: str = "fuzz") -> int:
    """Fuzzing messages until ``frames`` hostile frames were written; returns how many
    messages were answered (the others ended their sandbox)."""
    bystander = Bystander(by)
    answered = sent = seed = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(bystander.run)
        while sent < frames:
            seed += 1
            try:
                sent += (await c.call("Flood", {"how": how, "n": seed}, timeout=30))["outputs"]["y"]["value"]
                answered += 1
            except RpcError as exc:
                assert exc.code in (-32002, -32005), exc
                sent += 50  # (at least; the worker was ended while writing the rest)
        nursery.cancel_scope.cancel()
    assert bystander.worst < 2.0, f"the bystander waited {bystander.worst:.2f}s"
    assert bystander.calls > 0
    return answered


async def test_a_fuzzing_worker_short(flood):
    host, c, by = flood
    await fuzz(host, c, by, 1_000)
    assert (await by.call("Echo", {"x": 1}))["outputs"]["y"]["value"] == 1


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_a_fuzzing_worker_soak(flood):
    host, c, by = flood
    await fuzz(host, c, by, 5_000, "fuzz_rare")  # warm up: the host's memory after a first round
    base = rss(host.proc.pid)
    answered = await fuzz(host, c, by, 100_000, "fuzz_rare")
    assert answered > 0
    grown = rss(host.proc.pid) - base
    assert grown < 100 * 2**20, f"the host grew by {grown / 2**20:.0f} MiB"
    assert (await by.call("Echo", {"x": 1}))["outputs"]["y"]["value"] == 1


@pytest.mark.parametrize("data", [
    b"@" + b"0," * 2**21 + b"0 {}\n",                         # a header far past MAX_ATTACHMENTS lengths
    b"@" + b"0," * MAX_ATTACHMENTS + b"0 {}\n",               # one length too many
    b"@%d {}\n" % (2**20 + 1) + b"\0" * (2**20 + 1),          # attachments past max_frame, never read whole
    b"x" * (2**20 + 1) + b"\n",                               # a line past max_frame
    b"{}\n" + b"@1000 {}\n" + b"\0" * 1000 + b"y" * (2**20 + 1) + b"\n",  # after an attachment
])
async def test_the_channel_refuses_a_frame_past_its_limit_from_its_first_bytes(data):
    a, b = socket.socketpair()
    def write() -> None:
        try:
            b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader stopped and closed its end first: what this test expects of it

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    chan = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(a)), max_frame=2**20)
    with pytest.raises(FrameTooLarge):
        while True:
            await chan.receive()
    assert chan.bytes_received <= 2**20 + 2**19  # at most a read past the limit
    a.close()
    b.close()


async def test_a_frame_within_limits_and_attachments_still_round_trip():
    a, b = socket.socketpair()
    b.sendall(b"@3,0 {}\nabc" + b'{"a":1}\n')
    chan = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(a)), max_frame=2**20)
    assert await chan.receive() == b"{}" and chan.attachments == [b"abc", b""]
    assert await chan.receive() == b'{"a":1}' and chan.attachments == []
    a.close()
    b.close()


def test_json_values_bounds_what_a_parse_makes():
    assert json_values(b"[{},{},{}]") == 7 and json_values(b'{"a":[1,2]}') == 4
    assert json_values(b'["a,b,[{c"]') == 6 and json_values(b'["a,b,[{c"]', exact=True) == 2
    assert json_values(rb'["\\",",",","]', exact=True) == 4  # escapes: a string ends at its own quote


async def test_a_send_to_a_peer_that_never_reads_gives_up_after_send_timeout():
    a, b = socket.socketpair()
    chan = LineChannel(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    chan.send_timeout = 0.2
    t0 = time.perf_counter()
    with pytest.raises(SendTimedOut):
        for _ in range(1000):
            await chan.send(b"z" * 2**16)
    assert time.perf_counter() - t0 < 2
    a.close()
    b.close()
