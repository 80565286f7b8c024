"""The markdown table, the JSON files and the PNG."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import orjson

from ._stats import Figures

__all__ = ["machine", "table", "write"]


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# (label, ours figure, baseline figure, ratio kind, target text).
# ratio kinds: "x" ours/baseline (lower is better for latency, higher for throughput), "speedup" baseline/ours.
ROWS = [
    ("call latency p50, 1 in flight (memory mailbox)", "ours.latency.p50", "baseline.floor.latency.p50", "x",
     "≤ 1.3 × floor; ≥ 1.7 × faster than Ray"),
    ("call latency p99, 1 in flight", "ours.latency.p99", "baseline.floor.latency.p99", "x",
     "≤ 1.5 ms, below Ray's p99"),
    ("vs Ray: call latency p50", "ours.latency.p50", "ray.latency.p50", "speedup", "≥ 1.7 × faster"),
    ("vs Ray: call latency p99", "ours.latency.p99", "ray.latency.p99", "speedup", "below Ray's p99"),
    ("throughput, one actor, 32 in flight", "ours.throughput32", "baseline.floor.throughput32", "x",
     "≥ 0.9 × floor"),
    ("ingestion, batch frames of 64 (memory mailbox)", "ours.batch64", "baseline.floor.throughput32", "x",
     "durable: ≥ 10,000/s, ≥ 3 × Ray batched"),
    ("vs Ray batched", "ours.batch64", "ray.throughput_batched", "x", "≥ 3 ×"),
    ("cold start to ready, Python", "ours.cold_start.python.p50", None, None, "≤ 25 ms"),
    ("cold start to ready, Node", "ours.cold_start.node.p50", None, None, "≤ 80 ms"),
    ("warm acquire + load", "ours.warm_acquire_load.p50", None, None, "≤ 2 ms"),
    ("restart, crash → next message (p50)", "ours.restart.p50", None, None, "≤ 20 ms"),
    ("discovery, 100 actors", "ours.discovery100", None, None, "≤ 50 ms"),
    ("discovery, 1,000 actors", "ours.discovery1000", None, None, "≤ 400 ms"),
    ("state op from a script, p50", "ours.state_get.p50", None, None, "≤ 0.25 ms"),
    ("idle worker RSS, Python", "ours.idle_rss.python", None, None, "≤ 15 MB"),
    ("per-call execution (fresh sandbox per message)", "ours.latency.p50", "baseline.per_call.p50", "speedup",
     "ours ≥ 50 × faster per message"),
    ("plain pipe round trip p50 (reference)", None, "baseline.pipe_rtt.p50", None, "≈ 20 µs when written"),
    ("bare floor p50 (reference)", None, "baseline.floor.latency.p50", None, "≈ 0.34 ms when written"),
]


def _fmt(fig: Figures, name: str | None) -> str:
    if name is None:
        return "–"
    f = fig.figures.get(name)
    if f is None:
        return fig.skipped.get(name, "not measured")
    v, unit = f["value"], f["unit"]
    if unit == "ms" and v < 0.1:
        return f"{v * 1e3:.1f} µs"
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"


def table(fig: Figures, info: dict) -> str:
    lines = [f"Measured {info['date']} on {info['nproc']} × {info['cpu']} (Linux {info['kernel']}, "
             f"Python {info['python']}). Core placement affects pipe round trips (and so every relayed "
             "figure): compare ratios from the same run, not absolute numbers across runs.", "",
             "| figure | ours | baseline | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for label, ours, base, kind, target in ROWS:
        ratio = "–"
        o, b = (fig.value(ours) if ours else None), (fig.value(base) if base else None)
        if kind and o and b:
            ratio = f"{o / b:.2f} ×" if kind == "x" else f"{b / o:.1f} × faster"
        lines.append(f"| {label} | {_fmt(fig, ours)} | {_fmt(fig, base)} | {ratio} | {target} |")
    lines += ["", "Restart: the host runs with the default backoff (10ms min, 5s max, jitter 0.2) but "
              "`backoff.reset: 250ms`, and the bench waits past it between crashes, so every sample is a "
              "first crash rather than the n-th of a doubling series.",
              "", "Not measured yet: durable mailboxes (none exist yet), a two-actor graph's throughput, "
              "Node worker RSS."]
    notes = [f"- {k}: {v}" for k, v in fig.skipped.items()]
    if notes:
        lines += ["", "Skipped:", *notes]
    return "\n".join(lines) + "\n"


def write(fig: Figures, info: dict, out: Path, md: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps({"machine": info, "figures": fig.figures, "skipped": fig.skipped},
                        option=orjson.OPT_INDENT_2)
    stamp = info["date"].replace(":", "").replace("+0000", "Z")
    paths = [out / f"{stamp}.json", out / "latest.json", out / "latest.md"]
    paths[0].write_bytes(data)
    paths[1].write_bytes(data)
    paths[2].write_text(md)
    return paths


def png(fig: Figures, info: dict, path: Path) -> bool:
    """Latency CDFs and throughput bars; False if matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    f, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label in [("ours.latency.p50", "ours (actor.call)"), ("baseline.floor.latency.p50", "bare floor"),
                        ("baseline.pipe_rtt.p50", "plain pipe"), ("ray.latency.p50", "Ray")]:
        s = sorted(fig.figures.get(name, {}).get("samples") or [])
        if s:
            a.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
    a.set_xscale("log")
    a.set_xlabel("latency (ms), 1 in flight")
    a.set_ylabel("fraction of calls")
    a.set_title("call latency CDF")
    a.legend()
    bars = [(lbl, fig.value(n)) for lbl, n in [("ours, 32 in flight", "ours.throughput32"),
                                                ("ours, batch 64", "ours.batch64"),
                                                ("floor, 32 in flight", "baseline.floor.throughput32"),
                                                ("Ray batched", "ray.throughput_batched")]]
    bars = [(lbl, v) for lbl, v in bars if v]
    b.bar([lbl for lbl, _ in bars], [v for _, v in bars])
    b.set_ylabel("calls/s")
    b.set_title("throughput")
    b.tick_params(axis="x", labelrotation=15)
    f.suptitle(f"{info['date']} · {info['nproc']} × {info['cpu']}")
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)
    return True
