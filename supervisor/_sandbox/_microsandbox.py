"""The microsandbox backend: one microVM (libkrun, via the microsandbox SDK) per worker.

Each worker is a VM booted from the runtime's OCI image (``python:3.11``,
``node:20``) or from a local rootfs directory, with: whole vCPUs (a
fractional ``cpu`` rounds up), the configured memory as guest RAM, no
network (a deny-all policy), the in-sandbox runtime bind-mounted read-only at
``/reflow``, a size-capped tmpfs at ``/tmp``, a RAM-backed root overlay (so
nothing a script writes outlives its VM) and the SDK's ``restricted``
security profile (no_new_privs, no mount capability).

The channel. A VM has no inherited file descriptor, so the worker runtime is
started with the SDK's streaming exec (``Sandbox.exec_stream`` with
``Stdin.pipe()``) and speaks the usual NDJSON frames on its stdin/stdout
(argv ends in ``stdio`` instead of an fd number). The SDK relays those bytes
through the guest agent; here they become a trio byte stream under the same
:class:`~supervisor._channel.LineChannel` the other backends use.

asyncio. The SDK is asyncio-only; :class:`_AsyncioThread` is the one place it
meets trio (see its docstring for why a loop thread and not trio-asyncio).

Nothing here can be exercised end to end on a machine whose KVM cannot boot
a guest: :meth:`MicrosandboxBackend.probe` finds that out (bounded, cached)
and :func:`~supervisor._sandbox.select_backend` falls back to bubblewrap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import microsandbox as ms  # ImportError here makes select_backend fall back
import orjson
import trio

from .._files import write_atomic
from .._channel import ChannelClosed, LineChannel
from ._base import ExitInfo, SandboxBackend, SandboxUnavailable, Worker, WorkerSpec, WorkerStartError
from ._bubblewrap import _shared_libs, runtime_dir
from ._spawn import PACKAGES_AT, READY_TIMEOUT, limits_arg

__all__ = ["DEFAULT_IMAGES", "MicroVMWorker", "MicrosandboxBackend", "exec_command", "memory_mib",
           "sandbox_options", "vcpus"]

log = logging.getLogger("supervisor.sandbox")

MiB = 2**20
#: Guest RAM floor: below this the guest kernel and agent do not come up.
MIN_MEMORY_MIB = 128
DEFAULT_IMAGES: Mapping[str, str] = {"python": "python:3.11", "javascript": "node:20"}
GUEST_RUNTIME = "/reflow"
GUEST_PATH = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin"
#: Creating a VM includes pulling its image the first time (minutes for python:3.11).
CREATE_TIMEOUT = 600.0
#: The probe's test boot; a failing boot on this kind of host takes ~8 s.
PROBE_BOOT_TIMEOUT = 12.0
#: The probe's image check (local cache, else does the registry resolve it).
PROBE_IMAGE_TIMEOUT = 4.0
#: Reading the failed VM's log and destroying it, on top of the test boot.
PROBE_SLACK = 8.0
#: A test boot that timed out is tried again after this long (a definitive answer is kept
#: until what it depends on changes; a slow boot may have been a loaded machine).
TIMEOUT_VERDICT_TTL = 24 * 3600.0
#: Killing and removing one VM.
TEARDOWN_TIMEOUT = 10.0
KVM_DEVICE = "/dev/kvm"

_RUNTIME_DIRS = {"python": "python", "javascript": "js"}
_names = itertools.count(1)


# ---------------------------------------------------------------------------
# Pure translation: WorkerSpec -> SDK arguments
# ---------------------------------------------------------------------------

def memory_mib(nbytes: int) -> int:
    """Guest RAM in MiB for a memory limit in bytes: rounded up, at least MIN_MEMORY_MIB."""
    return max(MIN_MEMORY_MIB, -(-int(nbytes) // MiB))


def vcpus(cpu: float) -> int:
    """Whole vCPUs for a CPU share: a VM cannot have half a CPU, so round up (at least 1)."""
    if not math.isfinite(cpu) or cpu <= 1:
        return 1
    return math.ceil(cpu)


def _mib_ceil(nbytes: int) -> int:
    return max(1, -(-int(nbytes) // MiB))


def sandbox_options(spec: WorkerSpec, image: str, rootfs: Path | None = None) -> dict[str, Any]:
    """Keyword arguments for ``microsandbox.Sandbox.create`` for one worker.

    ``rootfs`` (a host directory the guest sees as ``/``) replaces ``image``.
    The SDK shares a bind rootfs *live* and writable with the guest, so use a
    directory made for this, never one shared with anything else.

    Raises:
        SandboxUnavailable: ``spec.runtime`` is not one this backend runs.
    """
    if spec.runtime not in _RUNTIME_DIRS:
        raise SandboxUnavailable(f"unknown runtime {spec.runtime!r}")
    mem = memory_mib(spec.memory)
    tmp = _mib_ceil(spec.tmp_size)
    if rootfs is not None:
        source: Any = ms.Image.bind(str(rootfs))
    else:
        # A RAM-backed upper layer: pristine every boot, no per-VM disk file to clean up.
        # The SDK counts its size against guest RAM, so keep it small: scripts write to /tmp.
        source = ms.Image.oci(image, root_disk=ms.RootDisk.tmpfs(size_mib=min(tmp, mem // 4)))
    return {
        "image": source,
        "memory": mem,
        "cpus": vcpus(spec.cpu),
        "network": ms.Network.none(),
        "security": ms.SecurityProfile.RESTRICTED,
        "hostname": "sandbox",
        "workdir": "/tmp",
        "volumes": {
            GUEST_RUNTIME: ms.Volume.bind(str(runtime_dir() / _RUNTIME_DIRS[spec.runtime]), readonly=True,
                                          noexec=True, nosuid=True, nodev=True),
            "/tmp": ms.Volume.tmpfs(size_mib=tmp, nosuid=True, nodev=True),
            **({PACKAGES_AT: ms.Volume.bind(spec.packages, readonly=True, nosuid=True, nodev=True)}
               if spec.packages else {}),
        },
        "labels": {"app": "reflow-supervisor", "runtime": spec.runtime},
        "pull_policy": ms.PullPolicy.IF_MISSING,
        "ephemeral": True,
        "detached": False,
    }


def exec_command(spec: WorkerSpec) -> tuple[str, list[str], dict[str, Any]]:
    """``(cmd, args, kwargs)`` for ``Sandbox.exec_stream`` starting the worker runtime.

    The runtime's last argv is ``stdio``: it talks on its stdin/stdout.
    Raises SandboxUnavailable for an unknown runtime.
    """
    rlimits = [ms.Rlimit.nofile(spec.max_open_files), ms.Rlimit.fsize(spec.file_size),
               ms.Rlimit.nproc(spec.max_processes)]
    if spec.cpu_seconds:
        secs = max(1, int(spec.cpu_seconds))
        rlimits.append(ms.Rlimit(ms.RlimitResource.CPU, secs, secs + 1))
    kwargs = {
        "cwd": "/tmp",
        "env": {"HOME": "/tmp", "PATH": GUEST_PATH, "LANG": "C.UTF-8"},
        "stdin": ms.Stdin.pipe(),
        "rlimits": rlimits,
    }
    if spec.runtime == "python":
        return "python3", ["-I", "-S", "-B", f"{GUEST_RUNTIME}/reflow_worker.py", limits_arg(spec), "stdio"], kwargs
    if spec.runtime == "javascript":
        heap = max(16, spec.memory // MiB // 2)
        return "node", [f"--max-old-space-size={heap}", f"{GUEST_RUNTIME}/reflow_worker.js", limits_arg(spec),
                        "stdio"], kwargs
    raise SandboxUnavailable(f"unknown runtime {spec.runtime!r}")


# ---------------------------------------------------------------------------
# The asyncio <-> trio bridge
# ---------------------------------------------------------------------------

class _AsyncioThread:
    """One asyncio event loop in a daemon thread; every SDK call runs on it.

    Why a loop thread and not trio-asyncio: the SDK is a pyo3 extension whose
    awaitables are bound to the asyncio loop running when they are *created*
    and are completed from tokio threads through ``call_soon_threadsafe`` --
    a stock asyncio loop is what it is built and tested against. Keeping the
    loop off trio's thread also means a slow SDK call (an image pull, a boot)
    never stalls trio, and the synchronous :meth:`MicrosandboxBackend.probe`
    (``select_backend`` is sync) can use the same loop. The cost is one
    thread hop per call, small next to the guest-agent relay every frame
    crosses anyway.

    SDK functions must be *called* on the loop thread, so callers pass an
    async function and its arguments, never a coroutine made elsewhere.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="microsandbox-asyncio", daemon=True).start()
                self._loop = loop
            return self._loop

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> concurrent.futures.Future:
        async def invoke() -> Any:
            return await fn(*args)

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop())

    def post(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop without waiting; failures are logged."""
        def done(fut: concurrent.futures.Future) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.debug("microsandbox background call failed: %r", fut.exception())

        self.submit(fn, *args).add_done_callback(done)

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float) -> Any:
        """Blocking call from any thread but the loop's. Raises TimeoutError after ``timeout``."""
        fut = self.submit(fn, *args)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout:g}s") from None

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Await ``fn(*args)`` from trio. Cancelling the trio task cancels the asyncio task."""
        fut = self.submit(fn, *args)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            fut.cancel()
            raise
        return fut.result()


_ASYNCIO = _AsyncioThread()


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------

class _ExecStream(trio.abc.Stream):
    """The worker's stdin (writes) and stdout (reads) as a trio byte stream."""

    def __init__(self, worker: MicroVMWorker):
        self._w = worker
        self._rest = b""
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the channel was closed")
        if self._w.exit_info is not None:
            raise trio.BrokenResourceError(f"the worker {self._w.exit_info.describe()}")
        try:
            await _ASYNCIO.call(self._w._write, bytes(data))
        except Exception as exc:  # the SDK's errors, or the relay's I/O errors: the worker is gone
            raise trio.BrokenResourceError(f"writing to the worker failed: {_short(exc)}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the channel was closed")
        if not self._rest:
            try:
                self._rest = await self._w._out_recv.receive()
            except trio.EndOfChannel:
                return b""
            self._w._backlog -= len(self._rest)
        n = len(self._rest) if max_bytes is None else max_bytes
        chunk, self._rest = self._rest[:n], self._rest[n:]
        return chunk

    async def aclose(self) -> None:
        # EOF on the worker's stdin: the runtime exits on EOF, as with a closed socket.
        if not self._closed:
            self._closed = True
            if self._w.exit_info is None:
                _ASYNCIO.post(self._w._close_stdin)
        await trio.lowlevel.checkpoint()


class MicroVMWorker(Worker):
    """One worker runtime in its own microVM.

    ``pid`` is None (the guest pid is in ``ready_info``); ``kill()`` kills the
    VM, after which its exec stream ends and ``wait()`` returns. Host memory
    is bounded: stdout the host has not read yet is capped at
    ``spec.max_output`` bytes, beyond which the worker is killed with
    ``limit="output"``.
    """

    tier = "microvm"
    shm = False  # no memory shared with the host or other workers across a VM boundary

    def __init__(self, spec: WorkerSpec, name: str):
        self.spec = spec
        self.runtime = spec.runtime
        self.name = name
        self.exit_info: ExitInfo | None = None
        self.limit_hint: str | None = None
        self.ready_info: dict = {}
        self.guest_pid: int | None = None
        self.failure: str | None = None  # why the exec stream ended abnormally, if it did
        self.stderr_tail = bytearray()
        self._token = trio.lowlevel.current_trio_token()
        self._out_send, self._out_recv = trio.open_memory_channel(math.inf)
        self._backlog = 0
        self._exited = trio.Event()
        self._killed = False
        # asyncio side (touched only on the loop thread)
        self._sandbox: Any = None
        self._handle: Any = None
        self._sink: Any = None
        self._pump_task: asyncio.Task | None = None
        self._pumping = False
        self._teardown_task: asyncio.Task | None = None
        self.channel = LineChannel(_ExecStream(self))

    @property
    def pid(self) -> int | None:
        return None

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit_info is not None
        return self.exit_info

    def kill(self, *, limit: str | None = None) -> None:
        if limit is not None and self.limit_hint is None:
            self.limit_hint = limit
        if self.exit_info is None and not self._killed:
            self._killed = True
            _ASYNCIO.post(self._teardown)

    # -- trio side: events from the pump ---------------------------------
    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _on_stdout(self, data: bytes) -> None:
        if self.exit_info is not None:
            return
        self._backlog += len(data)
        self._out_send.send_nowait(data)
        if self._backlog > self.spec.max_output:
            self.kill(limit="output")

    def _on_stderr(self, data: bytes) -> None:
        self.stderr_tail += data
        del self.stderr_tail[:-4096]
        log.debug("microVM worker stderr", extra={"sandbox": self.name, "text": data[:512].decode(errors="replace")})

    def _on_started(self, pid: int | None) -> None:
        self.guest_pid = pid

    def _on_exit(self, code: int | None, failure: str | None) -> None:
        if code is not None:
            info = ExitInfo.from_returncode(code, via_shell_status=True)
        elif self._killed:
            info = ExitInfo(signal=signal.SIGKILL)
        else:
            info = ExitInfo()
        if self.limit_hint is not None:
            info = ExitInfo(code=info.code, signal=info.signal, limit=self.limit_hint)
        elif info.signal == signal.SIGXCPU:
            info = ExitInfo(code=info.code, signal=info.signal, limit="cpu")
        self.exit_info = info
        self.failure = failure
        self._out_send.close()
        self._exited.set()
        log.debug("sandbox cleaned up", extra={"tier": self.tier, "sandbox": self.name, **info.to_data()})

    # -- asyncio side ------------------------------------------------------
    async def _boot(self, options: dict, cmd: str, args: list[str], exec_kwargs: dict) -> None:
        """Create the VM and start the runtime in it; on any failure (or cancellation) destroy it."""
        try:
            sandbox = await ms.Sandbox.create(self.name, **options)
            if self._teardown_task is not None:
                # Torn down while the VM was still booting (the start was cancelled): the
                # teardown could not see this VM, so destroy it here.
                await _destroy_sandbox(self.name, sandbox)
                raise WorkerStartError("the worker was stopped while its microVM booted")
            self._sandbox = sandbox
            self._handle = await sandbox.exec_stream(cmd, args, **exec_kwargs)
            self._sink = self._handle.take_stdin()
            if self._sink is None:
                raise WorkerStartError("the SDK gave no stdin pipe for the worker")
        except BaseException:
            await self._teardown()
            raise
        self._pumping = True
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def _write(self, data: bytes) -> None:
        await self._sink.write(data)

    async def _close_stdin(self) -> None:
        if self._sink is not None:
            await self._sink.close()

    async def _pump(self) -> None:
        # The only reader of the exec handle: the SDK serialises recv/wait/kill on one lock per
        # handle, so nothing else may call those while a recv is pending (it would deadlock).
        code: int | None = None
        failure: str | None = None
        try:
            while True:
                ev = await self._handle.recv()
                if ev is None:
                    break
                kind = str(ev.event_type)
                if kind == "stdout":
                    if ev.data:
                        self._deliver(self._on_stdout, _as_bytes(ev.data))
                elif kind == "stderr":
                    if ev.data:
                        self._deliver(self._on_stderr, _as_bytes(ev.data))
                elif kind == "started":
                    self._deliver(self._on_started, ev.pid)
                elif kind == "exited":
                    code = ev.code
                    break
                elif kind == "failed":
                    failure = _as_bytes(ev.data or b"").decode(errors="replace") or "the worker could not be started"
                    break
        except asyncio.CancelledError:
            failure = failure or "the exec stream did not end after the VM was killed"
        except Exception as exc:  # the relay broke: the worker is as good as dead
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            self._pumping = False
            try:
                await self._teardown()
            finally:
                self._deliver(self._on_exit, code, failure)

    async def _teardown(self) -> None:
        """Kill and remove the VM (once; later callers wait for the first)."""
        if self._teardown_task is None:
            self._teardown_task = asyncio.get_running_loop().create_task(self._destroy())
        await asyncio.shield(self._teardown_task)

    async def _destroy(self) -> None:
        await _destroy_sandbox(self.name, self._sandbox)
        # Killing the VM ends the exec stream; if the SDK ever failed to say so, the worker
        # would never be reaped. Give it a moment, then stop the pump's pending recv.
        asyncio.get_running_loop().call_later(5.0, self._unstick_pump)

    def _unstick_pump(self) -> None:
        if self._pumping and self._pump_task is not None:
            self._pump_task.cancel()


def _as_bytes(data: Any) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


async def _destroy_sandbox(name: str, sandbox: Any = None, timeout: float = TEARDOWN_TIMEOUT) -> None:
    """Kill the VM named ``name`` and forget it; never raises; each step bounded by ``timeout``."""
    try:
        if sandbox is None:
            sandbox = await asyncio.wait_for(ms.Sandbox.get(name), timeout)
        await asyncio.wait_for(sandbox.kill(), timeout)
    except Exception:  # not found, already stopped, timed out: nothing left to kill
        pass
    try:
        await asyncio.wait_for(ms.Sandbox.remove(name), timeout)
    except Exception:
        pass  # an ephemeral sandbox removes itself when it stops


# ---------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------

_probe_cache: dict[tuple, str | None] = {}
_probe_notes: dict[tuple, str] = {}   # how each verdict was reached, for the start-up log
_probe_locks: dict[tuple, threading.Lock] = {}
_probe_guard = threading.Lock()
_ERROR_LINE = re.compile(r"\bERROR\s+(?:[\w:]+:\s+)?(?P<msg>.+)")
_KVM_EXIT = re.compile(r"KVM_EXIT_\w+")


def failure_detail(log_lines: list[str]) -> str | None:
    """The VMM's last error from a sandbox's system log (the text after ``ERROR target:``)."""
    for line in reversed(log_lines):
        m = _ERROR_LINE.search(line)
        if m:
            return m.group("msg").strip()
    return None


def boot_failure_reason(sdk_error: str, detail: str | None, *, kvm_module: str | None = None) -> str:
    """One sentence on why the test VM did not boot, leading with the key cause."""
    m = _KVM_EXIT.search(detail or "")
    if m:
        cause = f"the VMM stopped with {m.group(0)}"
    elif detail:
        cause = f"the VMM reported: {detail}"
    else:
        cause = sdk_error
    host = f" on this host's {kvm_module}" if kvm_module else ""
    return f"a test microVM did not boot{host}: {cause}"


def image_problems_reason(problems: list[tuple[str, str, str]]) -> str | None:
    """One clause for images that are neither cached nor pullable: ``(ref, kind, detail)`` each.

    ``kind`` is ``unreachable`` (the registry could not be reached; ``detail``
    is the first such error) or ``silent`` (no answer in time).
    """
    parts = []
    unreachable = [(ref, d) for ref, kind, d in problems if kind == "unreachable"]
    silent = [ref for ref, kind, _ in problems if kind == "silent"]
    if unreachable:
        refs = ", ".join(ref for ref, _ in unreachable)
        detail = re.sub(r"^(?:\w+ error: )+", "", unreachable[0][1])
        parts.append(f"no OCI registry reachable for {refs}, which are not in the local image cache ({detail})"
                     if len(unreachable) > 1 else
                     f"no OCI registry reachable for {refs}, which is not in the local image cache ({detail})")
    if silent:
        parts.append(f"no OCI registry answered for {', '.join(silent)} within {PROBE_IMAGE_TIMEOUT:g}s")
    return "; ".join(parts) or None


def _kvm_module() -> str | None:
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "kvm-pvm"
    for name in ("kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name.replace("_", "-")
    return None


def _kvm_identity() -> str:
    """Which KVM this is: the device's major:minor and the module behind it."""
    try:
        rdev = os.stat(KVM_DEVICE).st_rdev
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
    except OSError:
        dev = "absent"
    return f"{KVM_DEVICE}={dev},{_kvm_module()}"


def _default_probe_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reflow-supervisor" / "microvm-probe.json"


_DEFAULT = object()


# A VMM that died of an interrupt sent from outside ("... exited (signal: 2 (SIGINT)) ...").
_INTERRUPTED = re.compile(r"signal: (?:1|2|15)\b")

class MicrosandboxBackend(SandboxBackend):
    """Starts each worker in its own microVM.

    Args:
        images: OCI image per runtime (default :data:`DEFAULT_IMAGES`).
        rootfs: a local rootfs directory per runtime, used instead of its image
            (see :func:`sandbox_options` for the caveat).
        probe_timeout: bound on the probe's test boot, in seconds.
        probe_cache: JSON file (default ``$XDG_CACHE_HOME/reflow-supervisor/microvm-probe.json``)
            remembering the test boot's outcome, keyed by what can change it
            (kernel release, the KVM device and module, the microsandbox
            version), so only the first host start pays for it; a timed-out
            boot is tried again after TIMEOUT_VERDICT_TTL. None disables it.
            Image availability is checked afresh whenever the boot succeeds.
    """

    name = "microsandbox"
    tier = "microvm"
    shm = False

    def __init__(self, images: Mapping[str, str] | None = None, rootfs: Mapping[str, Path] | None = None, *,
                 probe_timeout: float = PROBE_BOOT_TIMEOUT, probe_cache: Any = _DEFAULT):
        self.images = dict(DEFAULT_IMAGES if images is None else images)
        self.rootfs = {k: Path(v) for k, v in (rootfs or {}).items()}
        self.probe_timeout = probe_timeout
        self.probe_cache: Path | None = _default_probe_cache() if probe_cache is _DEFAULT else probe_cache
        self._note: tuple[bool, str] | None = None  # (remembered?, where) of the probe in progress
        self._workers: set[MicroVMWorker] = set()

    # -- probe ----------------------------------------------------------------
    def _probe_key(self) -> tuple:
        return (tuple(sorted(self.images.items())), tuple(sorted((k, str(v)) for k, v in self.rootfs.items())),
                KVM_DEVICE)

    def probe(self) -> str | None:
        """None if a microVM boots here and every runtime's image or rootfs is there; else why not.

        The answer is cached per configuration for the life of the process
        (concurrent callers share one probe). The first call tries a real
        boot of a minimal VM (unless ``probe_cache`` remembers this machine
        boot's outcome) and is bounded by ``probe_timeout + PROBE_SLACK``
        seconds (20 s by default); it blocks the calling thread, so from trio
        call it through ``trio.to_thread.run_sync``.
        """
        key = self._probe_key()
        with _probe_guard:
            if key in _probe_cache:
                return _probe_cache[key]
            lock = _probe_locks.setdefault(key, threading.Lock())
        with lock:
            with _probe_guard:
                if key in _probe_cache:
                    return _probe_cache[key]
            started = time.monotonic()
            self._note = None
            reason = self._probe_uncached()
            seconds = time.monotonic() - started
            log.debug("microVM probe", extra={"reason": reason, "seconds": round(seconds, 2)})
            with _probe_guard:
                _probe_cache[key] = reason
                remembered, where = self._note or (False, "")
                _probe_notes[key] = where if remembered else f"probed in {seconds:.1f}s" + (f"; {where}" if where else "")
            return reason

    def probe_note(self) -> str:
        """How the last ``probe`` answer was reached (probed now, or remembered in which file), for logs."""
        with _probe_guard:
            return _probe_notes.get(self._probe_key(), "not probed")

    def _probe_uncached(self) -> str | None:
        if not os.path.exists(KVM_DEVICE):
            return f"there is no {KVM_DEVICE}: KVM is not available on this machine"
        if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
            return f"{KVM_DEVICE} is not readable and writable by this user"
        try:
            if not ms.is_runtime_installed():
                return "the microsandbox runtime (msb and libkrunfw) is not installed"
        except Exception as exc:
            return f"the microsandbox runtime is unusable: {_short(exc)}"
        remembered = self._cached_boot_result()
        if remembered is not None and remembered[0] is not None:
            # No VM boots here: the images do not matter, and checking them can cost a registry timeout.
            until = (f"the kernel, {KVM_DEVICE} or microsandbox changes" if remembered[1] is None else
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(remembered[1])) + " (the boot timed out)")
            self._note = (True, f"remembered in {self.probe_cache} until {until}; delete it to probe again")
            return remembered[0]
        bound = self.probe_timeout + PROBE_SLACK
        if remembered is None:  # (seconds of silence at a first start would look like a hang)
            log.info("probing whether a microVM boots here (at most %gs, once: the verdict is remembered%s)",
                     bound, f" in {self.probe_cache}" if self.probe_cache else "")
        try:
            (boot_reason, definitive), image_reasons = _ASYNCIO.run(
                self._probe_async, remembered is None, timeout=bound)
        except TimeoutError:
            boot_reason, definitive, image_reasons = f"a test microVM did not boot within {bound:g}s", False, []
        if remembered is not None:
            boot_reason = remembered[0]
        elif definitive is not None and self._store_boot_result(boot_reason, definitive):
            until = ("the kernel, KVM device or microsandbox changes" if definitive
                     else f"{TIMEOUT_VERDICT_TTL / 3600:g}h from now (the boot timed out)")
            self._note = (False, f"remembered in {self.probe_cache} until {until}")
        reasons = [r for r in (boot_reason, *image_reasons) if r]
        return "; also ".join(reasons) if reasons else None

    async def _probe_async(self, boot: bool) -> tuple[tuple[str | None, bool | None], list[str]]:
        images = [self._check_image(ref) for rt, ref in self.images.items() if rt not in self.rootfs]
        boot_result, *image_results = await asyncio.gather(
            self._boot_test() if boot else _skipped_boot(), *images)
        reasons = [f"the {rt} rootfs {path} is not a directory"
                   for rt, path in self.rootfs.items() if not path.is_dir()]
        images_reason = image_problems_reason([r for r in image_results if r])
        return boot_result, reasons + ([images_reason] if images_reason else [])

    async def _boot_test(self) -> tuple[str | None, bool | None]:
        """Boot a minimal VM (the host's /bin/sh as its rootfs), run one command, destroy it.

        Returns (reason or None, definitive): a timeout is not definitive and is
        remembered for a while only; a VMM stopped by SIGINT/SIGTERM/SIGHUP from
        outside is ``None``: not remembered at all.
        """
        name = f"reflow-probe-{os.getpid()}-{secrets.token_hex(3)}"
        with tempfile.TemporaryDirectory(prefix="reflow-probe-rootfs-") as tmp:
            _minimal_rootfs(Path(tmp))
            sandbox = None
            try:
                sandbox = await asyncio.wait_for(ms.Sandbox.create(
                    name, image=ms.Image.bind(tmp), memory=256, cpus=1, network=ms.Network.none(),
                    replace=True), self.probe_timeout)
                out = await asyncio.wait_for(sandbox.exec("/bin/sh", ["-c", "echo reflow-ok"]), 5)
                if "reflow-ok" not in out.stdout_text:
                    return f"a test microVM booted but a command in it failed (exit code {out.exit_code})", True
                return None, True
            except asyncio.TimeoutError:
                return f"a test microVM did not boot within {self.probe_timeout:g}s", False
            except Exception as exc:
                detail = await _system_log_error(name)
                log.debug("microVM probe boot failed", extra={"error": str(exc), "vmm": detail})
                reason = boot_failure_reason(_short(exc), detail, kvm_module=_kvm_module())
                if not detail and _INTERRUPTED.search(str(exc)):
                    # Its VMM was stopped from outside (a Ctrl-C reaches the whole process group):
                    # that says nothing about this machine, so it is not remembered.
                    return reason, None
                return reason, True
            finally:
                await _destroy_sandbox(name, sandbox, timeout=2)

    async def _check_image(self, ref: str) -> tuple[str, str, str] | None:
        """None if ``ref`` is cached or a registry resolves it; else ``(ref, kind, detail)``."""
        try:
            await asyncio.wait_for(ms.Image.get(ref), PROBE_IMAGE_TIMEOUT)
            return None
        except Exception:  # ImageNotFoundError, or the cache could not be read: ask a registry
            pass
        # Not cached: does a registry resolve it? Stop once it has (a full pull is for start()).
        name = f"reflow-probe-img-{os.getpid()}-{secrets.token_hex(3)}"
        session = ms.Sandbox.create_with_progress(name, image=ref, memory=MIN_MEMORY_MIB,
                                                  network=ms.Network.none(), ephemeral=True)

        async def resolved() -> bool:
            async for ev in session.progress:
                if str(ev.event_type) not in ("startup", "resolving"):
                    return True
            return False

        try:
            if not await asyncio.wait_for(resolved(), PROBE_IMAGE_TIMEOUT):
                await asyncio.wait_for(session.result(), PROBE_IMAGE_TIMEOUT)
            return None
        except asyncio.TimeoutError:
            return ref, "silent", ""
        except Exception as exc:
            return ref, "unreachable", _short(exc, 160)
        finally:
            try:
                session.cancel()
            except Exception:
                pass
            await _destroy_sandbox(name, timeout=2)

    def _cache_key(self) -> str:
        # What can change the outcome; not the boot id: a reboot changes none of it.
        raw = "|".join([ms.version(), platform.release(), _kvm_identity()])
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def _cached_boot_result(self) -> tuple[str | None, float | None] | None:
        """``(reason, expires)`` remembered for this kernel, KVM and SDK, or None when it must be tried."""
        if self.probe_cache is None:
            return None
        try:
            entry = json.loads(self.probe_cache.read_text()).get(self._cache_key())
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(entry, dict) or "reason" not in entry:
            return None
        expires = entry.get("expires")
        if not isinstance(expires, (int, float)):
            expires = None
        elif time.time() >= expires:
            return None
        return entry["reason"], expires

    def _store_boot_result(self, reason: str | None, definitive: bool = True) -> bool:
        """Remember the test boot's outcome; True if it was written."""
        if self.probe_cache is None:
            return False
        try:
            self.probe_cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(self.probe_cache.read_text())
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            now = time.time()
            data[self._cache_key()] = {"reason": reason, "at": now,
                                       **({} if definitive else {"expires": now + TIMEOUT_VERDICT_TTL})}
            write_atomic(self.probe_cache, json.dumps(data).encode())
        except OSError:
            return False
        return True

    # -- the backend interface ---------------------------------------------------
    def limits_not_enforced(self) -> tuple[str, ...]:
        out = ["cpu share below one vCPU (a microVM gets whole vCPUs; the share rounds up)"]
        if self.rootfs:
            out.append("a private root filesystem (a bind rootfs is shared live with every worker using it)")
        return tuple(out)

    def status(self) -> dict:
        """What this backend offers; ``shm`` is False: a microVM shares no memory with the host."""
        with _probe_guard:
            probed = _probe_cache.get(self._probe_key(), "not probed")
        return {"name": self.name, "tier": self.tier, "shm": False, "images": dict(self.images),
                "rootfs": {k: str(v) for k, v in self.rootfs.items()}, "live_workers": len(self._workers),
                "probe": probed}

    async def start(self, spec: WorkerSpec) -> Worker:
        """Boot one VM, start the runtime in it, return once it said ``ready``.

        Raises:
            SandboxUnavailable: unknown runtime, or its runtime files are not shipped.
            WorkerStartError: the VM did not boot (or pull) within CREATE_TIMEOUT,
                the runtime did not start, or it did not say ready in READY_TIMEOUT.
        """
        if spec.runtime not in _RUNTIME_DIRS:
            raise SandboxUnavailable(f"unknown runtime {spec.runtime!r}")
        if not (runtime_dir() / _RUNTIME_DIRS[spec.runtime]).is_dir():
            raise SandboxUnavailable(f"the {spec.runtime} worker runtime is not shipped with this package")
        options = sandbox_options(spec, self.images.get(spec.runtime, DEFAULT_IMAGES.get(spec.runtime, "")),
                                  self.rootfs.get(spec.runtime))
        cmd, args, exec_kwargs = exec_command(spec)
        name = f"reflow-{spec.runtime[:2]}-{os.getpid()}-{next(_names)}-{secrets.token_hex(3)}"
        worker = MicroVMWorker(spec, name)
        try:
            with trio.fail_after(CREATE_TIMEOUT):
                await _ASYNCIO.call(worker._boot, options, cmd, args, exec_kwargs)
        except BaseException as exc:
            # _boot destroys the VM itself when it fails or is cancelled; this catches a boot
            # that completed just as we were cancelled.
            with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT):
                await _ASYNCIO.call(worker._teardown)
            if isinstance(exc, trio.TooSlowError):
                raise WorkerStartError(f"{spec.runtime} microVM did not boot within {CREATE_TIMEOUT:.0f}s") from exc
            if isinstance(exc, (ms.MicrosandboxError, WorkerStartError)):
                raise WorkerStartError(f"{spec.runtime} microVM did not start: {_short(exc)}") from exc
            raise
        self._workers.add(worker)
        try:
            with trio.fail_after(READY_TIMEOUT):
                frame = await worker.channel.receive()
            msg = orjson.loads(frame)
            if msg.get("method") != "ready":
                raise WorkerStartError(f"worker sent {msg.get('method')!r} before ready")
            worker.ready_info = msg.get("params") or {}
        except (ChannelClosed, trio.TooSlowError, ValueError, WorkerStartError) as exc:
            await worker.aclose()
            self._workers.discard(worker)
            info = worker.exit_info
            why = info.describe() if info else "did not start"
            if isinstance(exc, trio.TooSlowError):
                why = f"said nothing for {READY_TIMEOUT:.0f}s"
            elif worker.failure:
                why = f"{why} ({worker.failure})"
            if worker.stderr_tail:
                why += ": " + worker.stderr_tail.decode(errors="replace").strip().splitlines()[-1][:300]
            raise WorkerStartError(f"{spec.runtime} worker {why} before it was ready") from exc
        except BaseException:
            await worker.aclose()
            self._workers.discard(worker)
            raise
        log.debug("sandbox created", extra={"tier": self.tier, "runtime": spec.runtime, "sandbox": name,
                                            "guest_pid": worker.ready_info.get("pid")})
        return worker

    async def aclose(self) -> None:
        """Kill every VM this backend started that is still running."""
        workers = list(self._workers)
        for w in workers:
            w.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT):
            for w in workers:
                await w.wait()
        self._workers.clear()


async def _skipped_boot() -> tuple[None, bool]:
    return None, True


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"


async def _system_log_error(name: str) -> str | None:
    """The VMM's last ERROR line for sandbox ``name`` (its system log), if it can be read."""
    try:
        handle = await asyncio.wait_for(ms.Sandbox.get(name), 3)
        entries = await asyncio.wait_for(handle.logs(sources=[ms.LogReadSource.SYSTEM]), 3)
        return failure_detail([e.text() for e in entries])
    except (Exception, asyncio.TimeoutError):
        return None


def _minimal_rootfs(root: Path) -> None:
    """A rootfs with just the host's /bin/sh and the libraries it loads (the SDK adds its agent)."""
    for d in ("bin", "dev", "etc", "proc", "run", "sys", "tmp", "var"):
        (root / d).mkdir(exist_ok=True)
    sh = os.path.realpath("/bin/sh")
    shutil.copy2(sh, root / "bin" / "sh")
    for lib in _shared_libs([sh]):
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)
