"""The ``process`` backend: a plain child process, NO isolation.

Runs only when named in the config (``workspace.sandbox.backend: process``),
and the host says so loudly at startup. Useful where namespaces are not
available and the scripts are trusted, and as a measurement baseline.
"""

from __future__ import annotations

import os
import shutil
import sys

from ._base import SandboxBackend, SandboxUnavailable, Worker, WorkerSpec, ulimit_commands
from ._bubblewrap import refresh_bytecode, runtime_dir
from ._spawn import limits_arg, spawn_worker

__all__ = ["ProcessBackend"]


class ProcessBackend(SandboxBackend):
    name = "process"
    tier = "none"

    def argv(self, spec: WorkerSpec) -> list[str]:
        rt = runtime_dir()
        if spec.runtime == "python":
            refresh_bytecode(rt / "python")
            exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
            return [exe, "-I", "-S", "-B", str(rt / "python" / "reflow_worker.py"),
                    limits_arg(spec, spec.packages)]
        if spec.runtime == "javascript":
            node = shutil.which("node")
            if node is None:
                raise SandboxUnavailable("Node.js is not installed: JavaScript actors cannot run")
            heap = "--max-old-space-size=" + str(max(16, spec.memory // 2**20 // 2))
            return ["/bin/sh", "-c", ulimit_commands(spec) + '; exec "$@"', "sh",
                    os.path.realpath(node), heap, str(rt / "js" / "reflow_worker.js"),
                    limits_arg(spec, spec.packages)]
        raise SandboxUnavailable(f"unknown runtime {spec.runtime!r}")

    def limits_not_enforced(self) -> tuple[str, ...]:
        return ("isolation (filesystem, network, environment, processes)",)

    async def start(self, spec: WorkerSpec) -> Worker:
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
        return await spawn_worker(self.argv(spec), spec, tier=self.tier, shell_status=False, env=env)
