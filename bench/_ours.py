"""Figures through a real host process (``python -m supervisor run``) on a temporary workspace."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import trio
import trio_websocket

from supervisor._scan import discover
from supervisor.client import RpcError, open_client

from ._baselines import RAY_FIGURES, RayUnavailable, open_floor, open_ray
from ._load import batch_throughput, latency, take_turns, throughput
from ._stats import Figures, median, pct
from ._workers import DOUBLE_JS_SOURCE, DOUBLE_SOURCE, worker_python_pid

__all__ = ["against_floor", "against_ray", "discovery", "host_figures"]

STATE_SOURCE = '''\
import time
from reflow import actor

@actor(name="StateProbe", inports=["n"], outports=["deltas"])
async def probe(context):
    st = context.get_state()
    out = []
    for _ in range(context.get_input("n")):
        t0 = time.perf_counter()
        st.get("k")
        out.append(time.perf_counter() - t0)
    return {"deltas": out}
'''

VICTIM_SOURCE = DOUBLE_SOURCE.replace('name="Double"', 'name="Victim"')

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace(root: Path, kind: str) -> Path:
    """A workspace whose ``network:`` runs Double, StateProbe, Victim and the graph A → B
    (both the Double component), with ``kind`` (memory | redis) mailboxes."""
    for name, src in {"double.actor.py": DOUBLE_SOURCE, "state.actor.py": STATE_SOURCE,
                      "victim.actor.py": VICTIM_SOURCE}.items():
        (root / name).write_text(src)
    cfg = root / "reflow.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        workspace:
          root: .
          script_patterns: ["**/*.actor.py"]
          hot_reload: false
          sandbox:
            backend: bubblewrap
            pool: {{preload_count: 1, max_size: 20}}
          websocket: {{host: 127.0.0.1, port: {_free_port()}}}
          # max_pending: the throughput runs enqueue far faster than one worker processes;
          # the default (10,000) would answer -32004 instead of measuring.
          mailbox: {{kind: {kind}, max_pending: 1000000}}
        supervision:
          max_restarts: 1000
          max_seconds: 1
          # the default backoff (10ms min), but a child counts as healthy again after 250ms instead of
          # 2 × max (10 s): each measured crash is then a *first* crash, not the n-th of a doubling series.
          backoff: {{min: 10ms, max: 5s, jitter: 0.2, reset: 250ms}}
        network:
          processes:
            Double: {{component: Double}}
            StateProbe: {{component: StateProbe}}
            Victim: {{component: Victim}}
            A: {{component: Double}}
            B: {{component: Double}}
          connections:
            - {{src: {{process: A, port: value}}, tgt: {{process: B, port: value}}}}
        """))
    return cfg


@asynccontextmanager
async def _open_host(kind: str) -> AsyncIterator[str]:
    """A host process on a fresh workspace with ``kind`` mailboxes; yields its URL once
    Double, A and B answer a call."""
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmp:
        cfg = _workspace(Path(tmp), kind)
        proc, url, logf = await _start_host(cfg)
        try:
            async with open_client(url) as c:
                with trio.fail_after(60):  # the first call waits for the cell to load its script
                    for actor in ("Double", "A", "B"):
                        await _call_ok(c, actor, 1)
            yield url
        except BaseException:
            logf.flush()
            tail = (Path(tmp) / "host.log").read_text(errors="replace").splitlines()[-40:]
            print(f"host ({kind} mailboxes) log, last lines:", *tail, sep="\n  ", file=sys.stderr)
            raise
        finally:
            _stop_host(proc)
            logf.close()


async def _start_host(cfg: Path) -> tuple[subprocess.Popen, str, object]:
    info = cfg.parent / ".reflow" / "host.json"
    logf = open(cfg.parent / "host.log", "ab")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(cfg)], cwd=cfg.parent,
                            stdout=logf, stderr=subprocess.STDOUT, env=env)
    with trio.fail_after(60):
        while not info.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"host exited {proc.returncode}:\n{(cfg.parent / 'host.log').read_text()}")
            await trio.sleep(0.02)  # the host writes host.json once it serves
    return proc, orjson.loads(info.read_bytes())["url"], logf


def _stop_host(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _find(tree: object, name: str) -> dict | None:
    if isinstance(tree, dict):
        if tree.get("name") == name and tree.get("kind") == "actor":
            return tree
        tree = list(tree.values())
    if isinstance(tree, list):
        for t in tree:
            if (hit := _find(t, name)) is not None:
                return hit
    return None


async def _call_ok(c, actor: str, value: int) -> None:
    r = await c.call(actor, {"value": value})
    got = r["outputs"]["value"]
    assert (got["value"] if isinstance(got, dict) else got) == 2 * value, r


def _plain(m: object) -> object:
    return m["value"] if isinstance(m, dict) else m


async def _subscribe(ws, actor: str, port: str) -> None:
    await ws.send_message(orjson.dumps({"jsonrpc": "2.0", "id": "sub", "method": "actor.subscribe",
                                        "params": {"actor": actor, "port": port}}).decode())
    while True:
        msg = orjson.loads(await ws.get_message())
        if isinstance(msg, dict) and msg.get("id") == "sub":
            if "error" in msg:
                raise RuntimeError(f"actor.subscribe failed: {msg['error']}")
            return


async def send_to_output_latency(url: str, actor: str, observe: str, n: int, warmup: int, factor: int) -> list[float]:
    """Seconds from an ``actor.send`` to ``actor`` until the output of ``observe`` arrives at a
    subscriber on the same connection (and the send's reply too); one message in flight."""
    out = []
    async with trio_websocket.open_websocket_url(url) as ws:
        await _subscribe(ws, observe, "value")
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await ws.send_message(orjson.dumps({"jsonrpc": "2.0", "id": i, "method": "actor.send",
                                                "params": {"actor": actor, "port": "value", "value": i}}).decode())
            replied = seen = False
            with trio.fail_after(30):
                while not (replied and seen):
                    msg = orjson.loads(await ws.get_message())
                    if msg.get("method") == "actor.output":
                        got = _plain(msg["params"]["message"])
                        assert got == factor * i, (got, factor * i)
                        seen = True
                    elif msg.get("id") == i:
                        if "error" in msg:
                            raise RuntimeError(f"actor.send failed: {msg['error']}")
                        replied = True
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return out


async def _processed(c, actor: str) -> int:
    node = _find(await c.status(), actor)
    assert node is not None, actor
    return node["processed"]


async def send_load(url: str, actor: str, observe: str, frames: int, size: int, outstanding: int, *,
                    subscribe: bool = False) -> tuple[float, float]:
    """``frames`` × ``size`` ``actor.send`` to ``actor`` on one connection, at most ``outstanding``
    frames unanswered (``size`` > 1: JSON-RPC batch frames; 1: single requests).

    Returns (accepted/s: until the last reply, i.e. every message is in the mailbox;
    processed/s: until ``observe`` has processed every message). Completion is seen by polling
    ``observe``'s ``processed`` count in ``supervisor.status`` every 5 ms on a second connection,
    or, with ``subscribe``, by an ``actor.output`` subscription on the sending connection (which
    costs the host a notification frame per message). Raises RuntimeError on any error reply.
    """
    total = frames * size
    window = trio.Semaphore(outstanding)
    t_accepted = t_done = 0.0
    async with open_client(url) as c, \
            trio_websocket.open_websocket_url(url, max_message_size=64 * 2**20) as ws:
        base = await _processed(c, observe)
        if subscribe:
            await _subscribe(ws, observe, "value")

        async def reader() -> None:
            nonlocal t_accepted, t_done
            replies = outputs = 0
            while replies < total or (subscribe and outputs < total):
                msg = orjson.loads(await ws.get_message())
                if isinstance(msg, dict) and msg.get("method") == "actor.output":
                    outputs += 1
                    if outputs == total:
                        t_done = time.perf_counter()
                    continue
                items = msg if isinstance(msg, list) else [msg]
                failed = [it["error"] for it in items if "error" in it]
                if failed:
                    raise RuntimeError(f"{len(failed)} actor.send failed, e.g. {failed[0]}")
                replies += len(items)
                window.release()
                if replies == total:
                    t_accepted = time.perf_counter()

        rid = 0
        t0 = time.perf_counter()
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for _ in range(frames):
                    await window.acquire()
                    frame = []
                    for _ in range(size):
                        rid += 1
                        frame.append({"jsonrpc": "2.0", "id": rid, "method": "actor.send",
                                      "params": {"actor": actor, "port": "value", "value": rid}})
                    await ws.send_message(orjson.dumps(frame if size > 1 else frame[0]).decode())
            if not subscribe:
                while await _processed(c, observe) < base + total:
                    await trio.sleep(0.005)
                t_done = time.perf_counter()
    return total / (t_accepted - t0), total / (t_done - t0)


async def against_floor(fig: Figures, *, n: int, warmup: int, total: int, rounds: int) -> None:
    """Call latency at 1 in flight and throughput at 32, ours (actor.call, memory mailbox)
    and the bare floor's, in ``rounds`` alternating turns each (see take_turns): run one
    after the other, the ratio swung with whatever else the machine was doing."""
    async with open_floor() as floor_call, _open_host("memory") as url, open_client(url) as c:
        async def ours_call(i: int) -> None:
            await _call_ok(c, "Double", i)

        calls = {"baseline.floor": floor_call, "ours": ours_call}
        lat = await take_turns({name: functools.partial(_latency_turn, functools.partial(latency, call),
                                                        n // rounds, warmup)
                                for name, call in calls.items()}, rounds)
        thr = await take_turns({name: functools.partial(_throughput_turn, call, total // rounds)
                                for name, call in calls.items()}, rounds)
    what = {"baseline.floor": "bare trio-websocket server → pipe → long-lived child",
            "ours": "actor.call, memory mailbox"}
    for name in calls:
        fig.latency(f"{name}.latency", sum(lat[name], []), f"{what[name]}, 1 in flight ({rounds} turns, interleaved)")
        fig.add(f"{name}.throughput32", rounds * (total // rounds) / sum(spent for spent, _ in thr[name]), "calls/s",
                note=f"{what[name]}, 32 in flight ({rounds} turns, interleaved)")
        fig.latency(f"{name}.latency32", sum((took for _, took in thr[name]), []),
                    f"{what[name]}, each call's latency with 32 in flight")


async def _latency_turn(measure: Callable[[int, int], Awaitable[list[float]]], k: int, warmup: int,
                        turn: int) -> list[float]:
    """``measure(k, warmup)``: seconds per call, ``k`` calls; the first turn warms up in full."""
    return await measure(k, warmup if turn == 0 else warmup // 10)


async def _throughput_turn(call: Callable[[int], Awaitable[object]], k: int, turn: int) -> tuple[float, list[float]]:
    """(seconds taken, each call's latency) for ``k`` calls at 32 in flight."""
    rate, took = await throughput(call, k, 32)
    return k / rate, took


async def against_ray(fig: Figures, *, n: int, warmup: int, total: int, rounds: int, run: bool) -> None:
    """Ray's figures (see open_ray), its call latency in ``rounds`` turns alternating with
    ours (actor.call, memory mailbox) in the same minutes; every Ray figure is either
    measured or skipped with the reason."""
    names = (*RAY_FIGURES, "ours.latency_vs_ray.p50", "ours.latency_vs_ray.p99")
    if not run:
        for name in names:
            fig.skip(name, "not run in --quick (the smoke run does not need Ray)")
        return
    failed: list[RayUnavailable] = []
    try:
        async with open_ray(total) as ray, _open_host("memory") as url, open_client(url) as c:
            async def ours_call(i: int) -> None:
                await _call_ok(c, "Double", i)

            lat = await take_turns({"ours": functools.partial(_latency_turn, functools.partial(latency, ours_call),
                                                              n // rounds, warmup),
                                    "ray": functools.partial(_latency_turn, ray.latency, n // rounds, warmup)},
                                   rounds)
            data = await ray.finish()
    except* RayUnavailable as group:  # (from inside the client's nursery it comes grouped)
        failed += [e for e in _leaves(group) if isinstance(e, RayUnavailable)]
    if failed:
        for name in names:
            fig.skip(name, failed[0].reason)
        return
    v = data["version"]
    fig.latency("ours.latency_vs_ray", sum(lat["ours"], []),
                f"actor.call, memory mailbox, 1 in flight, in {rounds} turns alternating with Ray's")
    fig.latency("ray.latency", sum(lat["ray"], []), f"Ray {v}, ray.init(num_cpus=2), ray.get(actor.double.remote(i)) "
                f"per call, in {rounds} turns alternating with ours")
    fig.add("ray.throughput_seq", data["seq"], "calls/s", [data["seq"]], "one ray.get per call, sequential")
    fig.add("ray.throughput_batched", data["batched"], "calls/s", [data["batched"]],
            f"ray.get of a list of {total} calls")
    mb = data["actor_rss"] / 2**20
    fig.add("ray.actor_rss", mb, "MB", [mb],
            f"RSS of the actor's worker process; Ray's {data['others']} other processes (raylet, GCS, idle "
            f"workers…) hold {data['others_rss'] / 2**20:,.0f} MB more")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


async def host_figures(fig: Figures, *, kind: str, n: int, warmup: int, total: int, batches: int, state_n: int,
                       restarts: int, sends: int) -> None:
    """Every figure measured through a host with ``kind`` (memory | redis) mailboxes.

    ``actor.call`` always takes the in-memory path (on a durable host through the same
    in-memory channel as the stream's messages); ``actor.send`` and the graph's A → B hop go through
    the Redis stream when ``kind`` is redis.
    """
    tag = "memory" if kind == "memory" else "durable"
    async with _open_host(kind) as url, open_client(url) as c:
        async def call(i: int) -> None:
            await _call_ok(c, "Double", i)

        if kind == "memory":  # (its latency and 32 in flight: against_floor)
            fig.add("ours.batch64", await batch_throughput(
                url, lambda rid: {"jsonrpc": "2.0", "id": rid, "method": "actor.call",
                                  "params": {"actor": "Double", "inputs": {"value": rid}}},
                batches, 64, outstanding=2), "msgs/s",
                note="batch frames of 64 actor.call, 2 frames outstanding (the host caps 128 in flight)")
        else:
            fig.latency("ours.latency_on_durable_host", await latency(call, n, warmup),
                        "actor.call on a host with durable mailboxes (the call itself stays in memory), 1 in flight")

        fig.latency(f"ours.send_latency.{tag}", await send_to_output_latency(url, "Double", "Double", n, warmup, 2),
                    f"actor.send → actor.output seen by a subscriber, {tag} mailbox, 1 in flight")
        for label, frames, size, outstanding, what in [
                ("single32", sends * 64, 1, 32, "single actor.send frames, 32 in flight"),
                ("batch64", sends, 64, 2, "batch frames of 64 actor.send, 2 frames outstanding")]:
            accepted, processed = await send_load(url, "Double", "Double", frames, size, outstanding)
            fig.add(f"ours.send.{tag}.{label}.accepted", accepted, "msgs/s", [accepted],
                    f"{what}, {tag} mailbox: until the last reply (every message accepted"
                    f"{' into the Redis stream' if tag == 'durable' else ''})")
            fig.add(f"ours.send.{tag}.{label}.processed", processed, "msgs/s", [processed],
                    f"{what}, {tag} mailbox: until Double's processed count (supervisor.status) reached them all")
        graph = "A → B (network: connection A.value → B.value), {tag} mailboxes, batch frames of 64 actor.send to A"
        accepted, processed = await send_load(url, "A", "B", sends, 64, 2)
        fig.add(f"ours.graph.{tag}", processed, "msgs/s", [processed],
                graph.format(tag=tag) + ": until B's processed count (supervisor.status) reached them all")
        fig.add(f"ours.graph.{tag}.accepted", accepted, "msgs/s", [accepted], "the same run, until the last reply")
        _, processed = await send_load(url, "A", "B", sends, 64, 2, subscribe=True)
        fig.add(f"ours.graph.{tag}.subscribed", processed, "msgs/s", [processed],
                graph.format(tag=tag) + ": until a subscriber on B (same connection) saw every output")

        if kind != "memory":
            r = await c.call("StateProbe", {"n": 10})  # warm
            r = await c.call("StateProbe", {"n": state_n})
            deltas = [_plain(x) * 1e3 for x in _plain(r["outputs"]["deltas"])]
            fig.add("ours.state_get.p50", pct(deltas, 50), "ms", deltas, "state.get timed inside the script")
            fig.add("ours.state_get.p99", pct(deltas, 99), "ms", [], "")
            await _restart(fig, c, restarts)


async def _restart(fig: Figures, c, count: int) -> None:
    """SIGKILL the Victim's python; time until a call succeeds again."""
    with trio.fail_after(60):
        await _call_ok(c, "Victim", 1)
    samples = []
    lost = 0
    for k in range(count):
        with trio.fail_after(30):
            while True:  # wait until the restarted cell has a worker (and the pool refilled)
                node = _find(await c.status(), "Victim")
                if node and node.get("pid"):
                    break
                await trio.sleep(0.02)
            # past the backoff reset window (250ms) and with the warm pool refilled: a crash at steady state
            await trio.sleep(0.35)
            py = worker_python_pid(node["pid"])
            t0 = time.perf_counter()
            os.kill(py, signal.SIGKILL)
            while True:
                try:
                    # A call the host loses would hang the bench: the host answers -32003 after 2 s
                    # instead, which counts (and shows in the note) rather than stalls.
                    r = await c.call("Victim", {"value": k}, timeout=2)
                    assert _plain(r["outputs"]["value"]) == 2 * k, r
                    break
                except RpcError as exc:
                    if exc.code == -32003:
                        lost += 1
                    continue
            samples.append(time.perf_counter() - t0)
    ms = [x * 1e3 for x in samples]
    fig.add("ours.restart.p50", pct(ms, 50), "ms", ms,
            "SIGKILL the worker's python → next call succeeds; default backoff, each a first crash"
            + (f"; {lost} call(s) sent around a crash got no answer and timed out after 2 s "
               "(-32003): a lost message" if lost else ""))


def discovery(fig: Figures, reps: int) -> None:
    """``discover()`` of generated workspaces: half Python (``@actor``), half JavaScript
    (``module.exports = actor({...}, fn)``), ten directories."""
    for count in (100, 1000):
        with tempfile.TemporaryDirectory(prefix="reflow-disc-") as tmp:
            root = Path(tmp)
            for i in range(count):
                d = root / f"g{i % 10}"
                d.mkdir(exist_ok=True)
                if i % 2:
                    (d / f"a{i}.actor.js").write_text(DOUBLE_JS_SOURCE.replace("'Double'", f"'Double{i}'"))
                else:
                    (d / f"a{i}.actor.py").write_text(DOUBLE_SOURCE.replace('"Double"', f'"Double{i}"'))
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                found = discover(root, ["**/*.actor.py", "**/*.actor.js"])
                samples.append((time.perf_counter() - t0) * 1e3)
            assert len(found.components) == count, (len(found.components), found.problems[:3])
            runtimes = sorted(c.runtime for c in found.components)
            assert runtimes.count("javascript") == count // 2, runtimes
        fig.add(f"ours.discovery{count}", median(samples), "ms", samples,
                f"discover() of {count} generated files, {count // 2} Python + {count // 2} JavaScript")
