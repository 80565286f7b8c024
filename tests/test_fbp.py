"""The FBP Network Protocol (CONTRACT §7) against a real host: fbp-protocol's own
``fbp-test``, every message the host sends checked strictly against the
protocol's JSON schemas, live edits under load, and the saved graph file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from conftest import wait_for

FBP = Path(__file__).resolve().parent / "fbp"
NODE_MODULES = FBP / "node_modules"
SCHEMAS = NODE_MODULES / "fbp-protocol" / "schema" / "json"
SECRET = "fbp-test-secret"

needs_npm = pytest.mark.skipif(not (NODE_MODULES / ".bin" / "fbp-test").exists() or shutil.which("node") is None,
                               reason="tests/fbp/node_modules is missing: run `npm ci --prefix tests/fbp` "
                                      "(make test does)")


async def _run(cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process(cmd, cwd=cwd, env={**os.environ, **env}, capture_stdout=True,
                                      capture_stderr=True, check=False)


@needs_npm
async def test_fbp_test_passes_against_the_host(make_host, tmp_path):
    """fbp-protocol's own conformance suite (fbp-test 0.9.8), as Flowhub's makers run it."""
    host = await make_host({}, "", env={"REFLOW_TOKEN": SECRET})
    port = int(host.url.rsplit(":", 1)[1].strip("/"))
    project = tmp_path / "fbp-project"
    project.mkdir()
    (project / "fbp-config.json").write_text(json.dumps(
        {"name": "reflow", "command": None, "host": "127.0.0.1", "port": port, "collection": "core",
         "version": "0.8"}))
    done = await _run([str(NODE_MODULES / ".bin" / "fbp-test")], cwd=FBP, timeout=60,
                      env={"PROJECT_HOME": str(project), "FBP_PROTOCOL_SECRET": SECRET})
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, f"fbp-test failed:\n{out}\n--- host log ---\n{host.output()[-4000:]}"
    assert "passing" in out and "failing" not in out, out
