"""`python -m bench --quick` runs end to end and reports a number for every figure (no timing assertions)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson

from bench._report import ROWS

ROOT = Path(__file__).resolve().parent.parent

# Figures that need nothing beyond what `make test` installs (bubblewrap, the Python runtime).
REQUIRED = {
    "baseline.pipe_rtt.p50", "baseline.floor.latency.p50", "baseline.floor.latency.p99",
    "baseline.floor.throughput32", "baseline.floor.latency32.p50", "baseline.per_call.p50",
    "baseline.per_call.throughput2",
    "ours.latency.p50", "ours.latency.p99", "ours.throughput32", "ours.latency32.p50", "ours.latency32.p99",
    "ours.batch64",
    "ours.cold_start.python.p50", "ours.warm_acquire_load.p50", "ours.idle_rss.python",
    "ours.discovery100", "ours.discovery1000", "ours.state_get.p50", "ours.restart.p50",
    "ours.latency_on_durable_host.p50", "ours.send_latency.memory.p50", "ours.send_latency.durable.p50",
    "ours.send.memory.single32.accepted", "ours.send.durable.single32.accepted",
    "ours.send.memory.batch64.accepted", "ours.send.durable.batch64.accepted",
    "ours.send.memory.batch64.processed", "ours.send.durable.batch64.processed",
    "ours.graph.memory", "ours.graph.durable",
    "ours.cluster.call_local.p50", "ours.cluster.call_forwarded.p50", "ours.cluster.call_forwarded.p99",
    "ours.cluster.failover.p50", "ours.cluster.failover.max", "ours.cluster.lease_ttl",
    *(f"{who}.payload.{size}.{path}.{stat}" for who, path in (("ours", "shm"), ("ours", "att"), ("baseline", "b64"))
      for size in ("64k", "1m", "10m") for stat in ("p50", "mbps")),
}


def test_quick_bench_reports_every_figure(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=85)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = orjson.loads((out / "latest.json").read_bytes())
    figures = data["figures"]
    assert REQUIRED <= figures.keys(), REQUIRED - figures.keys()
    for name, f in figures.items():
        assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] > 0, (name, f)
    for name, reason in data["skipped"].items():
        assert name not in figures and reason, name
    # Nothing in the table is silently blank: each figure it names (Node's and Ray's included,
    # which the smoke run may skip) was measured or skipped with a reason.
    named = {n for row in ROWS for n in row[1:3] if n}
    assert named <= figures.keys() | data["skipped"].keys(), named - figures.keys() - data["skipped"].keys()
    assert data["machine"]["nproc"] >= 1
    md = (out / "latest.md").read_text()
    assert "| figure | ours | baseline | ratio | target |" in md
    assert md in proc.stdout
