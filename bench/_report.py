"""The markdown table, the JSON files and the PNG."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
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
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "supervisor"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError):
        head, dirty = "unknown", []
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "commit": head or "unknown",
            "uncommitted": dirty,
            "kernel": platform.release(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# (label, ours figure, baseline figure, ratio kind, target text).
# ratio kinds: "x" ours/baseline (lower is better for latency, higher for throughput), "speedup" and
# "smaller" baseline/ours.
ROWS = [
    ("call latency p50, 1 in flight (actor.call, memory mailbox)", "ours.latency.p50", "baseline.floor.latency.p50",
     "x", "≤ 1.3 × floor; ≥ 1.7 × faster than Ray"),
    ("call latency p99, 1 in flight (actor.call, memory mailbox)", "ours.latency.p99", "baseline.floor.latency.p99",
     "x", "≤ 1.5 ms, below Ray's p99"),
    ("vs Ray: call latency p50 (in turns with Ray)", "ours.latency_vs_ray.p50", "ray.latency.p50", "speedup",
     "≥ 1.7 × faster"),
    ("vs Ray: call latency p99 (in turns with Ray)", "ours.latency_vs_ray.p99", "ray.latency.p99", "speedup",
     "below Ray's p99"),
    ("actor.call p50 on a durable-mailbox host (the call stays in memory)", "ours.latency_on_durable_host.p50",
     "baseline.floor.latency.p50", "x", "–"),
    ("durable path p50: actor.send → Redis stream → worker → output at a subscriber",
     "ours.send_latency.durable.p50", "baseline.floor.latency.p50", "x", "≤ 0.8 ms"),
    ("durable path p99 (same)", "ours.send_latency.durable.p99", None, None, "–"),
    ("same path, memory mailbox: actor.send → output at a subscriber, p50", "ours.send_latency.memory.p50",
     "baseline.floor.latency.p50", "x", "–"),
    ("call latency p50, 32 in flight (actor.call, memory mailbox)", "ours.latency32.p50",
     "baseline.floor.latency32.p50", "x", "–"),
    ("call latency p99, 32 in flight (actor.call, memory mailbox)", "ours.latency32.p99",
     "baseline.floor.latency32.p99", "x", "–"),
    ("throughput, one actor, 32 in flight (actor.call)", "ours.throughput32", "baseline.floor.throughput32", "x",
     "≥ 0.9 × floor"),
    ("actor.call in batch frames of 64 (memory mailbox)", "ours.batch64", "baseline.floor.throughput32", "x", "–"),
    ("vs Ray batched: actor.call in batch frames of 64", "ours.batch64", "ray.throughput_batched", "x", "–"),
    ("actor.send ingestion, single frames, 32 in flight, memory (accepted)", "ours.send.memory.single32.accepted",
     "ray.throughput_seq", "x", "–"),
    ("actor.send ingestion, single frames, 32 in flight, durable (accepted)", "ours.send.durable.single32.accepted",
     "ray.throughput_seq", "x", "–"),
    ("actor.send ingestion, batch frames of 64, memory (accepted)", "ours.send.memory.batch64.accepted",
     "ray.throughput_batched", "x", "–"),
    ("actor.send ingestion, batch frames of 64, durable (accepted = in the Redis stream)",
     "ours.send.durable.batch64.accepted", "ray.throughput_batched", "x", "≥ 10,000/s, ≥ 3 × Ray batched"),
    ("actor.send batch frames of 64 → processed by one actor, memory (end to end)",
     "ours.send.memory.batch64.processed", "ray.throughput_batched", "x", "–"),
    ("actor.send batch frames of 64 → processed by one actor, durable (end to end)",
     "ours.send.durable.batch64.processed", "ray.throughput_batched", "x", "≥ 10,000/s, ≥ 3 × Ray batched"),
    ("two-actor graph A → B, memory mailboxes (end to end)", "ours.graph.memory", "ray.throughput_batched", "x",
     "≥ 20,000 messages/s"),
    ("two-actor graph A → B, durable mailboxes (end to end)", "ours.graph.durable", "ray.throughput_batched", "x",
     "≥ 10,000/s, ≥ 3 × Ray batched"),
    ("cluster: actor.call through a host that does not own the actor (forwarded), p50",
     "ours.cluster.call_forwarded.p50", "ours.cluster.call_local.p50", "x", "≤ 2 × the local p50"),
    ("cluster: forwarded call p99 (same)", "ours.cluster.call_forwarded.p99", "ours.cluster.call_local.p99", "x",
     "–"),
    ("cluster: failover p50, SIGKILL the owner → first call answered by the new owner",
     "ours.cluster.failover.p50", "ours.cluster.lease_ttl", "x", "≤ lease_ttl + 0.5 s"),
    ("cluster: failover max (same kills)", "ours.cluster.failover.max", "ours.cluster.lease_ttl", "x",
     "≤ lease_ttl + 0.5 s"),
    ("cold start to ready, Python", "ours.cold_start.python.p50", None, None, "≤ 25 ms"),
    ("cold start to ready, Node", "ours.cold_start.node.p50", None, None, "≤ 80 ms"),
    ("warm acquire + load", "ours.warm_acquire_load.p50", None, None, "≤ 2 ms"),
    ("restart, crash → next message (p50)", "ours.restart.p50", None, None, "≤ 20 ms"),
    ("discovery, 100 actors (50 Python + 50 JS)", "ours.discovery100", None, None, "≤ 50 ms"),
    ("discovery, 1,000 actors (500 Python + 500 JS)", "ours.discovery1000", None, None, "≤ 400 ms"),
    ("state op from a script, p50", "ours.state_get.p50", None, None, "≤ 0.25 ms"),
    ("idle worker RSS, Python (sum inside the sandbox)", "ours.idle_rss.python", None, None, "≤ 15 MB"),
    ("idle worker RSS, Node (sum inside the sandbox)", "ours.idle_rss.node", None, None, "≤ 45 MB"),
    ("vs Ray: idle Python worker RSS vs a Ray actor's RSS", "ours.idle_rss.python", "ray.actor_rss", "smaller", "–"),
    ("per-call execution (fresh sandbox per message): latency, 1 in flight", "ours.latency.p50",
     "baseline.per_call.p50", "speedup", "ours ≥ 50 × faster per message"),
    ("per-call execution: throughput, actor.call 32 in flight vs per-call 2 in flight (one per core)",
     "ours.throughput32", "baseline.per_call.throughput2", "x", "ours ≥ 50 × faster per message"),
    ("bytes round trip host → Python worker → host, 64 KiB, shared memory vs base64 JSON",
     "ours.payload.64k.shm.p50", "baseline.payload.64k.b64.p50", "speedup", "–"),
    ("same, 1 MiB", "ours.payload.1m.shm.p50", "baseline.payload.1m.b64.p50", "speedup", "≥ 5 × the base64 path"),
    ("same, 10 MiB", "ours.payload.10m.shm.p50", "baseline.payload.10m.b64.p50", "speedup", "≤ 20 ms"),
    ("10 MiB effective throughput, shared memory (payload / round trip)", "ours.payload.10m.shm.mbps",
     "baseline.payload.10m.b64.mbps", "x", "≥ 1 GB/s"),
    ("10 MiB round trip as raw channel attachments (the fallback)", "ours.payload.10m.att.p50",
     "baseline.payload.10m.b64.p50", "speedup", "–"),
    ("1 MiB round trip as raw channel attachments", "ours.payload.1m.att.p50",
     "baseline.payload.1m.b64.p50", "speedup", "–"),
    ("plain pipe round trip p50 (reference)", None, "baseline.pipe_rtt.p50", None, "≈ 20 µs when written"),
    ("bare floor p50 (reference)", None, "baseline.floor.latency.p50", None, "≈ 0.34 ms when written"),
    ("Ray sequential calls (reference)", None, "ray.throughput_seq", None, "≈ 1.1 K/s when written"),
]

NOTES = """\
How it is measured:
- Two host processes (`python -m supervisor run`), one with `mailbox: {kind: memory}`, one with the default \
`kind: redis` (embedded Redis, appendonly, the default appendfsync everysec; a run with `always` \
measured about half the durable throughput and twice the durable latency); each runs a `network:` of Double, StateProbe, Victim and \
A → B (both the Double component, connection A.value → B.value), on bubblewrap. `max_pending` is raised so \
that fast ingestion is measured rather than answered with -32004.
- The bare floor and our memory host run side by side for the call latency (1 in flight) and the 32-in-flight \
throughput, in alternating turns (10 each in a full run; each goes first in every other), so that both meet the same minutes of the \
machine's noise. Ray's call latency is measured the same way, in turns with a second memory host of ours \
(without the floor running); Ray's processes are stopped (SIGSTOP) between its turns, so that its daemons do not \
run during ours. Its other figures follow.
- `actor.call` never touches the Redis stream (on a durable host it meets the stream's messages in one \
in-memory channel). The durable path is `actor.send`: one Lua check-and-XADD (answered once Redis has it) → the \
cell's feeder (XREADGROUP) → worker → one script of state, downstream XADDs and XACK+XDEL fenced by the lease → \
`actor.output` notification. With one message in flight the actor is idle at each send, so the add's script \
also reads the entry for the cell's feeder and the worker starts on it while Redis answers (it commits once the \
add is confirmed). Its latency is timed from the send to the output at a subscriber on the same connection.
- actor.send throughput: one WebSocket connection; "accepted" stops at the last reply (every message in the \
mailbox), "end to end" when the last actor (Double, or B for the graph) has processed every message, seen by \
polling its `processed` count in `supervisor.status` every 5 ms on a second connection. {subscribed}\
Ratios against Ray batched compare with `ray.get` of a list of calls.
- Cluster: hosts on one `redis-server` of their own (durable mailboxes, told apart by `REFLOW_HOST_ID`), a \
`network:` of Double alone. Forwarded call: two hosts (`lease_ttl` 3 s, the default); once both agree who owns \
Double, `actor.call` through the owner ("local", the baseline column) and through the other host, which forwards it \
over the hosts' WebSocket API, in alternating turns. Failover: three hosts, `lease_ttl` 1 s (the baseline \
column); a client calls Double one call after another through the host that is neither the owner nor its \
successor; SIGKILL the owner; the figure is the time from the kill to the first call sent after the killed \
process was reaped that is answered. The killed host is started again (same id) and takes Double back by \
handoff before the next kill; each kill waits at most 15 s.
- Idle RSS sums VmRSS of the processes in the sandbox's pid namespace (bwrap's pid 1 and the interpreter); \
the JSON note has the PSS and the outer bwrap. Ray's figure is the RSS of the actor's worker process alone.
- State op and restart are measured on the durable (default) host. Restart: default backoff (10ms min, 5s \
max, jitter 0.2) but `backoff.reset: 250ms`, and the bench waits past it between crashes, so every sample is \
a first crash rather than the n-th of a doubling series.
"""


def _fmt(fig: Figures, name: str | None) -> str:
    if name is None:
        return "–"
    f = fig.figures.get(name)
    if f is None:
        return "skipped (below)" if name in fig.skipped else "not measured"
    v, unit = f["value"], f["unit"]
    if unit == "ms" and v < 0.1:
        return f"{v * 1e3:.1f} µs"
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"


def table(fig: Figures, info: dict) -> str:
    lines = [f"Measured {info['date']} on {info['nproc']} × {info['cpu']} (Linux {info['kernel']}, "
             f"Python {info['python']}; code at {info.get('commit', '?')}"
             + (f" with uncommitted changes to {', '.join(info['uncommitted'])}" if info.get("uncommitted") else "")
             + "). Core placement affects pipe round trips (and so every relayed "
             "figure): compare ratios from the same run, not absolute numbers across runs.", "",
             "| figure | ours | baseline | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for label, ours, base, kind, target in ROWS:
        ratio = "–"
        o, b = (fig.value(ours) if ours else None), (fig.value(base) if base else None)
        if kind and o and b:
            ratio = {"x": f"{o / b:.2f} ×", "speedup": f"{b / o:.1f} × faster", "smaller": f"{b / o:.1f} × smaller"}[kind]
        lines.append(f"| {label} | {_fmt(fig, ours)} | {_fmt(fig, base)} | {ratio} | {target} |")
    sub = [f"{k}: {fig.value(f'ours.graph.{k}.subscribed'):,.0f}/s" for k in ("memory", "durable")
           if fig.value(f"ours.graph.{k}.subscribed")]
    subscribed = ("With a subscriber on B instead (a notification frame per message on the sending "
                  f"connection) the graph does {', '.join(sub)}. ") if sub else ""
    lines += ["", NOTES.replace("{subscribed}", subscribed).rstrip("\n")]
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
    f, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for name, label in [("ours.latency.p50", "ours (actor.call)"),
                        ("ours.send_latency.durable.p50", "ours (actor.send → output, durable)"),
                        ("baseline.floor.latency.p50", "bare floor"),
                        ("baseline.pipe_rtt.p50", "plain pipe"), ("ray.latency.p50", "Ray")]:
        s = sorted(fig.figures.get(name, {}).get("samples") or [])
        if s:
            a.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
    a.set_xscale("log")
    a.set_xlabel("latency (ms), 1 in flight")
    a.set_ylabel("fraction of calls")
    a.set_title("call latency CDF")
    a.legend(loc="lower right", fontsize="small")
    bars = [(lbl, fig.value(n)) for lbl, n in [("call, 32 in flight", "ours.throughput32"),
                                                ("call, batch 64", "ours.batch64"),
                                                ("send e2e, memory", "ours.send.memory.batch64.processed"),
                                                ("send e2e, durable", "ours.send.durable.batch64.processed"),
                                                ("graph, memory", "ours.graph.memory"),
                                                ("graph, durable", "ours.graph.durable"),
                                                ("floor, 32 in flight", "baseline.floor.throughput32"),
                                                ("Ray sequential", "ray.throughput_seq"),
                                                ("Ray batched", "ray.throughput_batched")]]
    bars = [(lbl, v) for lbl, v in bars if v]
    b.bar([lbl for lbl, _ in bars], [v for _, v in bars])
    b.set_ylabel("messages/s")
    b.set_title("throughput")
    b.tick_params(axis="x", labelrotation=35)
    for t in b.get_xticklabels():
        t.set_ha("right")
    f.suptitle(f"{info['date']} · {info['nproc']} × {info['cpu']}")
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)
    return True
