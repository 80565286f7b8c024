"""Spawning a sandbox as a host child process, tied to the host's lifetime.

Why not ``trio.run_process``: it forks from a worker thread, and Linux fires a
child's parent-death signal when that *thread* exits (trio parks idle threads
for ~10 s), so ``bwrap --die-with-parent`` started that way is SIGKILLed about
ten seconds later. We fork from the trio thread itself (``subprocess.Popen``
uses vfork here), so the death signal is tied to the host's main thread,
which lives exactly as long as the host. Exit is awaited through a pidfd.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from collections.abc import Sequence

import orjson
import trio

from .._channel import ChannelClosed, LineChannel
from ._base import ExitInfo, Worker, WorkerSpec, WorkerStartError

__all__ = ["HostProcessWorker", "descendants", "spawn_worker"]

log = logging.getLogger("supervisor.sandbox")

READY_TIMEOUT = 15.0


class HostProcessWorker(Worker):
    def __init__(self, proc: subprocess.Popen, channel: LineChannel, *, tier: str,
                 runtime: str, shell_status: bool, spec: WorkerSpec):
        self._proc = proc
        self.channel = channel
        self.tier = tier
        self.runtime = runtime
        self.spec = spec
        self.exit_info: ExitInfo | None = None
        self.limit_hint: str | None = None  # set by whoever killed it for a limit
        self.ready_info: dict = {}
        self._shell_status = shell_status
        self._pidfd = os.pidfd_open(proc.pid)
        self._exited = trio.Event()
        self._waiting = False
        self.on_exit: list = []  # callables run once the process is reaped (e.g. remove its cgroups)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def inner_pids(self) -> list[int]:
        """Host pids of every process inside the sandbox (for tests and cleanup)."""
        return descendants(self._proc.pid)

    async def wait(self) -> ExitInfo:
        if self.exit_info is not None:
            return self.exit_info
        if self._waiting:
            await self._exited.wait()
            assert self.exit_info is not None
            return self.exit_info
        self._waiting = True
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
            rc = self._proc.wait()
            info = ExitInfo.from_returncode(rc, via_shell_status=self._shell_status)
            if self.limit_hint is not None:
                info = ExitInfo(code=info.code, signal=info.signal, limit=self.limit_hint)
            elif info.signal == signal.SIGXCPU:
                info = ExitInfo(code=info.code, signal=info.signal, limit="cpu")
            elif info.signal == signal.SIGABRT and self.runtime == "javascript":
                # V8 aborts the process when its heap (--max-old-space-size) is full.
                info = ExitInfo(code=info.code, signal=info.signal, limit="memory")
            self.exit_info = info
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            for fn in self.on_exit:
                fn()
            self._exited.set()
            return info
        finally:
            self._waiting = False

    def kill(self, *, limit: str | None = None) -> None:
        if limit is not None and self.limit_hint is None:
            self.limit_hint = limit
        if self.exit_info is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """Host pids of every descendant of ``pid`` (from /proc; empty once it is gone)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


async def spawn_worker(argv: Sequence[str], spec: WorkerSpec, *, tier: str,
                       shell_status: bool, pass_fd_arg: bool = True,
                       env: dict[str, str] | None = None, extra_fds: tuple[int, ...] = ()) -> HostProcessWorker:
    """Start ``argv`` with one end of a socketpair inherited; wait for ``ready``.

    The child's fd number is appended to argv. Raises WorkerStartError when the
    worker dies or stays silent for READY_TIMEOUT seconds.
    """
    host_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = child_sock.fileno()
        args = [*argv, str(fd)] if pass_fd_arg else list(argv)
        debug = log.isEnabledFor(logging.DEBUG)
        proc = subprocess.Popen(  # noqa: S603 - argv is built by us, never by a script
            args, pass_fds=(fd, *extra_fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=None if debug else subprocess.DEVNULL, env=env if env is not None else {},
            start_new_session=True, cwd="/",  # the sandbox's init sees this; keep host paths out
        )
    finally:
        child_sock.close()
        for extra in extra_fds:
            os.close(extra)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(host_sock))
    worker = HostProcessWorker(proc, LineChannel(stream), tier=tier, runtime=spec.runtime,
                               shell_status=shell_status, spec=spec)
    try:
        with trio.fail_after(READY_TIMEOUT):
            frame = await worker.channel.receive()
        msg = orjson.loads(frame)
        if msg.get("method") != "ready":
            raise WorkerStartError(f"worker sent {msg.get('method')!r} before ready")
        worker.ready_info = msg.get("params") or {}
    except (ChannelClosed, trio.TooSlowError, ValueError, WorkerStartError) as exc:
        await worker.aclose()
        info = worker.exit_info
        why = info.describe() if info else "did not start"
        if isinstance(exc, trio.TooSlowError):
            why = f"said nothing for {READY_TIMEOUT:.0f}s"
        raise WorkerStartError(f"{spec.runtime} worker {why} before it was ready") from exc
    except BaseException:
        await worker.aclose()
        raise
    log.debug("sandbox created", extra={"tier": tier, "runtime": spec.runtime, "pid": proc.pid})
    return worker


PACKAGES_AT = "/packages"  # where sandboxes see the runtime's installed packages


def limits_arg(spec: WorkerSpec, packages_at: str | None = PACKAGES_AT, shm: dict | None = None) -> str:
    """The limits the in-sandbox runtime applies to itself before loading user code, where
    it finds the runtime's packages (``packages_at`` as the sandbox sees them), and its
    shared-memory regions (inherited fds, see _shm.py) when it has them."""
    limits = {
        "memory": spec.memory, "cpu_seconds": spec.cpu_seconds, "nproc": spec.max_processes,
        "nofile": spec.max_open_files, "fsize": spec.file_size,
        "packages": packages_at if spec.packages else None,
    }
    if shm is not None:
        limits["shm"] = shm
    return orjson.dumps(limits).decode()
