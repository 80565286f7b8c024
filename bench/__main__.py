"""``python -m bench [--quick] [--out DIR]``: every figure and its baseline, measured in one run.

Writes ``DIR/latest.md`` (the table, also printed), ``DIR/<timestamp>.json`` and
``DIR/latest.json`` (raw samples), and ``DIR/latest.png`` when matplotlib is
importable (a full run installs it into the running environment when it is
missing; ``--quick`` never installs). Exits 1 if a benchmark fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import trio

from . import _baselines, _cluster, _ours, _payloads, _report, _workers
from ._stats import Figures

# (n latency samples, warmup, total calls at 32 in flight, batch frames, state ops, restarts,
#  cold starts, warm acquires, per-call messages, discovery reps, pipe round trips,
#  actor.send batch frames of 64 per throughput run, payload round trips per size, whether Ray runs,
#  turns each side takes in against_floor, against_ray and the cluster's forwarding, SIGKILLs of a cluster
#  host's owner)
COUNTS = {
    "quick": dict(n=150, warmup=30, total=300, batches=4, state_n=100, restarts=2, cold=3, warm=3, per_call=3,
                  disc=1, pipe=2000, sends=4, payloads=2, ray=False, turns=2, kills=2),
    "full": dict(n=3000, warmup=300, total=10000, batches=100, state_n=2000, restarts=15, cold=20, warm=30,
                 per_call=30, disc=5, pipe=20000, sends=150, payloads=40, ray=True, turns=10, kills=10),
}


async def run(fig: Figures, c: dict, log) -> None:
    steps = [
        ("plain pipe round trip", lambda: _baselines.pipe_round_trip(fig, c["pipe"], c["pipe"] // 10)),
        ("bare floor and ours, interleaved", lambda: _ours.against_floor(
            fig, n=c["n"], warmup=c["warmup"], total=c["total"], rounds=c["turns"])),
        *[(f"ours through a host, {kind} mailboxes", lambda kind=kind: _ours.host_figures(
            fig, kind=kind, n=c["n"], warmup=c["warmup"], total=c["total"], batches=c["batches"],
            state_n=c["state_n"], restarts=c["restarts"], sends=c["sends"])) for kind in ("memory", "redis")],
        ("cluster: a forwarded call and a local one, interleaved", lambda: _cluster.forwarding(
            fig, n=c["n"], warmup=c["warmup"], rounds=c["turns"])),
        ("cluster: failover after SIGKILL of the owner", lambda: _cluster.failover(fig, kills=c["kills"])),
        ("cold start", lambda: _workers.cold_start(fig, c["cold"])),
        ("warm acquire + load", lambda: _workers.warm_acquire_load(fig, c["warm"])),
        ("idle RSS", lambda: _workers.idle_rss(fig)),
        ("large payloads", lambda: _payloads.payload_round_trips(fig, c["payloads"])),
        ("per-call execution", lambda: _baselines.per_call(fig, c["per_call"])),
        ("discovery", lambda: _ours.discovery(fig, c["disc"])),
        ("Ray, and ours in turns with it", lambda: _ours.against_ray(
            fig, n=c["n"], warmup=c["warmup"], total=c["total"], rounds=c["turns"], run=c["ray"])),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        r = step()
        if hasattr(r, "__await__"):
            await r
        log(f"  {name}: {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts, no Ray (a smoke run, ~30 s)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not args.quick:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("matplotlib is missing: installing it for the PNG")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False)
    info = _report.machine()
    fig = Figures()
    log(f"bench ({'quick' if args.quick else 'full'}) on {info['nproc']} × {info['cpu']}")
    trio.run(run, fig, COUNTS["quick" if args.quick else "full"], log)
    md = _report.table(fig, info)
    paths = _report.write(fig, info, args.out, md)
    if _report.png(fig, info, args.out / "latest.png"):
        paths.append(args.out / "latest.png")
    else:
        log("matplotlib not importable: no PNG")
    print(md)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
