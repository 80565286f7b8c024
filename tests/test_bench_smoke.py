"""`python -m bench --quick` runs end to end and reports a number for every figure (no timing assertions)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent

# Figures that need nothing beyond what `make test` installs (bubblewrap, the Python runtime).
REQUIRED = {
    "baseline.pipe_rtt.p50", "baseline.floor.latency.p50", "baseline.floor.latency.p99",
    "baseline.floor.throughput32", "baseline.per_call.p50",
    "ours.latency.p50", "ours.latency.p99", "ours.throughput32", "ours.batch64",
    "ours.cold_start.python.p50", "ours.warm_acquire_load.p50", "ours.idle_rss.python",
    "ours.discovery100", "ours.discovery1000", "ours.state_get.p50", "ours.restart.p50",
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
    assert data["machine"]["nproc"] >= 1
    md = (out / "latest.md").read_text()
    assert "| figure | ours | baseline | ratio | target |" in md
    assert md in proc.stdout
