"""The sandbox interface: start a warm worker for a runtime, talk to it, stop it.

A :class:`Worker` is one sandboxed interpreter (Python or Node) running the
in-sandbox runtime from ``supervisor/runtime``. It is started *warm*: the
interpreter and the SDK are loaded and it has said ``ready`` on its channel.
A cell then sends it one script (``load``) and it serves that one actor until
it dies; a worker is never handed to a second actor.
"""

from __future__ import annotations

import abc
import logging
import signal as _signal
from typing import Any

import attrs
import trio

from .._channel import LineChannel

_log = logging.getLogger("supervisor.sandbox")

__all__ = ["ExitInfo", "SandboxBackend", "SandboxUnavailable", "Worker", "WorkerSpec"]


class SandboxUnavailable(Exception):
    """This backend cannot run on this machine; the message says what to install."""


@attrs.frozen
class WorkerSpec:
    """What a worker is allowed: the runtime and its limits (bytes, seconds)."""

    runtime: str  # "python" | "javascript"
    memory: int = 512 * 10**6
    cpu: float = 0.5
    cpu_seconds: float | None = None
    max_processes: int = 64
    max_open_files: int = 256
    file_size: int = 64 * 2**20
    tmp_size: int = 64 * 2**20
    max_output: int = 16 * 2**20
    packages: str | None = None  # host directory of the runtime's installed ``packages:``, bound read-only
    shm_size: int = 0  # bytes of each shared-memory ring (0: none; see _shm.py)
    shm_threshold: int = 64 * 2**10


def ulimit_commands(spec: WorkerSpec) -> str:
    """``sh`` builtins that set the rlimits of a runtime that cannot set its own (Node
    has no setrlimit): no core dumps, CPU seconds (soft → SIGXCPU, hard one second
    later), open files and file size (dash counts 512-byte blocks). Address space is
    left alone for Node: V8 reserves far more than it uses, so the heap is capped
    with ``--max-old-space-size`` and the memory cgroup instead."""
    cmds = ["ulimit -c 0", f"ulimit -n {spec.max_open_files}", f"ulimit -f {max(1, spec.file_size // 512)}"]
    if spec.cpu_seconds:
        soft = max(1, int(spec.cpu_seconds))
        cmds += [f"ulimit -H -t {soft + 1}", f"ulimit -S -t {soft}"]
    return "; ".join(cmds)


@attrs.frozen
class ExitInfo:
    """How a worker ended. ``limit`` names the resource limit that ended it, if known."""

    code: int | None = None
    signal: int | None = None
    limit: str | None = None

    @classmethod
    def from_returncode(cls, rc: int | None, *, via_shell_status: bool = False) -> ExitInfo:
        if rc is None:
            return cls()
        if rc < 0:
            return cls(signal=-rc)
        if via_shell_status and rc > 128:
            # bwrap reports a child killed by signal N as exit status 128 + N.
            return cls(signal=rc - 128)
        return cls(code=rc)

    def describe(self) -> str:
        if self.limit:
            return f"exceeded its {self.limit} limit"
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"was killed by {name}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "stopped"

    def to_data(self) -> dict:
        data: dict = {}
        if self.code is not None:
            data["exit_code"] = self.code
        if self.signal is not None:
            data["signal"] = self.signal
        if self.limit is not None:
            data["limit"] = self.limit
        return data


class Worker(abc.ABC):
    """One sandboxed interpreter and its channel.

    ``aclose()`` kills and reaps it; it is idempotent and completes even when
    cancelled (an unreaped sandbox would outlive the supervision tree).
    """

    tier: str  # "microvm" | "namespaces" | "none"
    channel: LineChannel
    runtime: str
    exit_info: ExitInfo | None = None
    shm: Any = None  # the host's side of its shared-memory regions (_shm.Regions), if any

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The host pid of the sandbox's outermost process (None if not a host process)."""

    @abc.abstractmethod
    async def wait(self) -> ExitInfo:
        """Wait until the worker has exited; return how."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the worker now (SIGKILL or the backend's equivalent); does not wait."""

    async def aclose(self) -> None:
        self.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            info = await self.wait()
            _log.debug("sandbox cleaned up", extra={"runtime": self.runtime, "pid": self.pid,
                                                    "exit": info.describe()})
            try:
                await self.channel.aclose()
            except Exception:
                pass


class SandboxBackend(abc.ABC):
    """Starts workers. ``start`` returns only when the worker said ``ready``."""

    name: str
    tier: str

    @abc.abstractmethod
    async def start(self, spec: WorkerSpec) -> Worker:
        """Start one warm worker.

        Raises:
            SandboxUnavailable: the backend cannot run here.
            WorkerStartError: the worker died or did not say ready in time.
        """

    def limits_not_enforced(self) -> tuple[str, ...]:
        """Limits from the config this backend cannot enforce here (said once at startup)."""
        return ()

    async def aclose(self) -> None:
        pass


class WorkerStartError(Exception):
    """A worker died or stayed silent before saying ready."""
