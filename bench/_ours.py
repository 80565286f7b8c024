"""Figures through a real host process (``python -m supervisor run``) on a temporary workspace."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import orjson
import trio

from supervisor._discovery import discover
from supervisor.client import RpcError, open_client

from ._load import batch_throughput, latency, throughput
from ._stats import Figures, median, pct
from ._workers import DOUBLE_SOURCE, worker_python_pid

__all__ = ["discovery", "host_figures"]

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


def _workspace(root: Path) -> Path:
    for name, src in {"double.actor.py": DOUBLE_SOURCE, "state.actor.py": STATE_SOURCE,
                      "victim.actor.py": VICTIM_SOURCE}.items():
        (root / name).write_text(src)
    cfg = root / "reflow.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        workspace:
          root: .
          script_patterns: ["**/*.actor.py"]
          sandbox:
            backend: bubblewrap
            pool: {{preload_count: 1, max_size: 20}}
          websocket: {{host: 127.0.0.1, port: {_free_port()}}}
        supervision:
          max_restarts: 1000
          max_seconds: 1
          # the default backoff (10ms min), but a child counts as healthy again after 250ms instead of
          # 2 × max (10 s): each measured crash is then a *first* crash, not the n-th of a doubling series.
          backoff: {{min: 10ms, max: 5s, jitter: 0.2, reset: 250ms}}
        """))
    return cfg


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


async def host_figures(fig: Figures, *, n: int, warmup: int, total: int, batches: int, state_n: int,
                       restarts: int) -> None:
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmp:
        cfg = _workspace(Path(tmp))
        proc, url, logf = await _start_host(cfg)
        try:
            async with open_client(url) as c:
                async def call(i: int) -> None:
                    await _call_ok(c, "Double", i)

                with trio.fail_after(60):  # the first call waits for the cell to load its script
                    await _call_ok(c, "Double", 1)
                fig.latency("ours.latency", await latency(call, n, warmup),
                            "actor.call, memory mailbox, 1 in flight")
                fig.add("ours.throughput32", await throughput(call, total, 32), "calls/s",
                        note="actor.call, memory mailbox, 32 in flight")
                fig.add("ours.batch64", await batch_throughput(
                    url, lambda rid: {"jsonrpc": "2.0", "id": rid, "method": "actor.call",
                                      "params": {"actor": "Double", "inputs": {"value": rid}}},
                    batches, 64, outstanding=2), "msgs/s",
                    note="batch frames of 64 actor.call, 2 frames outstanding (the host caps 128 in flight)")

                r = await c.call("StateProbe", {"n": 10})  # warm
                r = await c.call("StateProbe", {"n": state_n})
                d = r["outputs"]["deltas"]
                deltas = [x * 1e3 for x in (d["value"] if isinstance(d, dict) else d)]
                deltas = [x["value"] if isinstance(x, dict) else x for x in deltas]
                fig.add("ours.state_get.p50", pct(deltas, 50), "ms", deltas, "state.get timed inside the script")
                fig.add("ours.state_get.p99", pct(deltas, 99), "ms", [], "")

                await _restart(fig, c, restarts)
        finally:
            _stop_host(proc)
            logf.close()


async def _restart(fig: Figures, c, count: int) -> None:
    """SIGKILL the Victim's python; time until a call succeeds again."""
    with trio.fail_after(60):
        await _call_ok(c, "Victim", 1)
    samples = []
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
                    await _call_ok(c, "Victim", k)
                    break
                except RpcError:
                    continue
            samples.append(time.perf_counter() - t0)
    ms = [x * 1e3 for x in samples]
    fig.add("ours.restart.p50", pct(ms, 50), "ms", ms,
            "SIGKILL the worker's python → next call succeeds; default backoff, each a first crash")


def discovery(fig: Figures, reps: int) -> None:
    for count in (100, 1000):
        with tempfile.TemporaryDirectory(prefix="reflow-disc-") as tmp:
            root = Path(tmp)
            for i in range(count):
                d = root / f"g{i % 10}"
                d.mkdir(exist_ok=True)
                (d / f"a{i}.actor.py").write_text(DOUBLE_SOURCE.replace('"Double"', f'"Double{i}"'))
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                found = discover(root, ["**/*.actor.py"])
                samples.append((time.perf_counter() - t0) * 1e3)
            assert len(found.components) == count, (len(found.components), found.problems[:3])
        fig.add(f"ours.discovery{count}", median(samples), "ms", samples, f"discover() of {count} generated files")
