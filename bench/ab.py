"""``python -m bench.ab A_PYTHON B_PYTHON [--rounds N]``: two versions of the host, A/B, fresh hosts.

Each interpreter is a venv with its own checkout installed (``pip install -e``), so
``A_PYTHON -m supervisor run`` runs that checkout's host. Every round starts a fresh
host of each side (an A/A run of one host pair differed by up to 8 % here, from where
its worker landed), the sides alternating which goes first, and measures on each:

- the ``actor.call`` latency at one call in flight (memory mailboxes), p50 and p99;
- durable throughput: ``actor.send`` batch frames of 64 processed by one actor, end to end.

Prints each round and the per-round B/A medians: a ratio under 1 means B is faster
(latency) and over 1 means B is faster (throughput). No assertions: a measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import trio

from supervisor.client import open_client

from ._load import latency
from ._ours import _call_ok, _stop_host, _workspace, send_load
from ._stats import pct


async def _start(python: str, cfg: Path) -> tuple[subprocess.Popen, str, object]:
    info = cfg.parent / ".reflow" / "host.json"
    logf = open(cfg.parent / "host.log", "ab")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each side imports its own checkout
    proc = subprocess.Popen([python, "-m", "supervisor", "run", "-c", str(cfg)], cwd=cfg.parent,
                            stdout=logf, stderr=subprocess.STDOUT, env=env)
    with trio.fail_after(60):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{python}: host exited {proc.returncode}:\n"
                                   f"{(cfg.parent / 'host.log').read_text()[-3000:]}")
            try:
                return proc, orjson.loads(info.read_bytes())["url"], logf
            except (OSError, ValueError):
                await trio.sleep(0.02)  # the host writes host.json once it serves


async def _round(python: str, n: int, batches: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind in ("memory", "redis"):
        with tempfile.TemporaryDirectory(prefix="reflow-ab-") as tmp:
            proc, url, logf = await _start(python, _workspace(Path(tmp), kind))
            try:
                async with open_client(url) as c:
                    with trio.fail_after(60):
                        await _call_ok(c, "Double", 1)
                    if kind == "memory":
                        lat = await latency(lambda i: _call_ok(c, "Double", i), n, n // 5)
                        out["call_p50_ms"] = pct(lat, 50) * 1e3
                        out["call_p99_ms"] = pct(lat, 99) * 1e3
                        continue
                _, processed = await send_load(url, "Double", "Double", batches, 64, 2)
                out["durable_msgs_s"] = processed
            finally:
                _stop_host(proc)
                logf.close()
    return out


async def main_async(a: str, b: str, rounds: int, n: int, batches: int) -> None:
    res: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(rounds):
        for side in (("A", "B") if r % 2 == 0 else ("B", "A")):
            res[side].append(await _round(a if side == "A" else b, n, batches))
        print(f"round {r + 1}: A {res['A'][-1]}  B {res['B'][-1]}", file=sys.stderr, flush=True)
    for key in res["A"][0]:
        ratios = [rb[key] / ra[key] for ra, rb in zip(res["A"], res["B"])]
        print(f"{key}: A median {statistics.median(x[key] for x in res['A']):.4g}, "
              f"B median {statistics.median(x[key] for x in res['B']):.4g}, "
              f"per-round B/A median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    ap.add_argument("a", help="side A's python (a venv with its checkout installed)")
    ap.add_argument("b", help="side B's python")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=1500, help="latency samples per round")
    ap.add_argument("--batches", type=int, default=100, help="durable batch frames of 64 per round")
    args = ap.parse_args(argv)
    trio.run(main_async, args.a, args.b, args.rounds, args.n, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
