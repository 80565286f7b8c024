"""The microsandbox (microVM) backend: config translation, the probe, and the worker's plumbing.

Where KVM cannot boot a guest (this machine: kvm-pvm, KVM_EXIT_INTERNAL_ERROR)
the real end-to-end test skips with the probe's reason. Everything between the
SDK and the trio side -- the asyncio bridge, the exec-stream channel, ready,
load/process, kill/wait, teardown, the output backlog cap -- is exercised with
a fake SDK whose ``exec_stream`` runs the real worker runtime as a local
process on real stdin/stdout pipes, the way the guest agent runs it in a VM.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import microsandbox as real_ms
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_for, worker_rpc
from supervisor._sandbox import _microsandbox as msb
from supervisor._sandbox._base import SandboxUnavailable, WorkerSpec, WorkerStartError
from supervisor._sandbox._bubblewrap import runtime_dir
from supervisor._sandbox._microsandbox import (
    MIN_MEMORY_MIB,
    MicrosandboxBackend,
    boot_failure_reason,
    exec_command,
    failure_detail,
    image_problems_reason,
    memory_mib,
    sandbox_options,
    vcpus,
)

MiB = 2**20


# ---------------------------------------------------------------------------
# Translation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("nbytes", "mib"), [
    (512 * 10**6, 489),          # the config's "512MB" is decimal: 488.3 MiB rounds up
    (512 * MiB, 512),
    (512 * MiB + 1, 513),
    (1, MIN_MEMORY_MIB),
    (16 * MiB, MIN_MEMORY_MIB),  # a guest kernel needs a floor
    (4 * 2**30, 4096),
])
def test_memory_rounds_up_to_whole_mib_with_a_floor(nbytes, mib):
    assert memory_mib(nbytes) == mib


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=2**40))
def test_memory_never_below_the_limit_and_never_a_mib_too_many(nbytes):
    m = memory_mib(nbytes)
    assert m * MiB >= nbytes
    assert m == MIN_MEMORY_MIB or (m - 1) * MiB < nbytes


@pytest.mark.parametrize(("cpu", "n"), [(0.1, 1), (0.5, 1), (1.0, 1), (1.01, 2), (1.5, 2), (2.0, 2), (3.2, 4),
                                        (0.0, 1), (-1.0, 1), (math.nan, 1)])
def test_cpu_share_becomes_whole_vcpus(cpu, n):
    assert vcpus(cpu) == n


def test_python_sandbox_options():
    spec = WorkerSpec(runtime="python", memory=300 * MiB, cpu=0.5, tmp_size=10 * 10**6)
    opts = sandbox_options(spec, "python:3.11")
    assert opts["memory"] == 300 and opts["cpus"] == 1
    assert opts["network"] == real_ms.Network.none()
    assert opts["network"].policy.default_egress == real_ms.Action.DENY
    assert opts["network"].policy.default_ingress == real_ms.Action.DENY
    assert opts["security"] == real_ms.SecurityProfile.RESTRICTED
    assert opts["image"]._reference == "python:3.11"
    assert opts["image"]._type == real_ms.ImageSourceKind.OCI
    assert opts["image"]._root_disk.kind == real_ms.RootDiskKind.TMPFS  # nothing persists past the VM
    sdk = opts["volumes"]["/reflow"]
    assert sdk == real_ms.Volume.bind(str(runtime_dir() / "python"), readonly=True, noexec=True, nosuid=True,
                                      nodev=True)
    assert sdk._to_dict()["readonly"] is True  # the SDK's own serializer accepts it, read-only
    tmp = opts["volumes"]["/tmp"]._to_dict()
    assert tmp["tmpfs"] is True and tmp["size_mib"] == 10  # 10 MB -> 9.5 MiB -> 10
    assert opts["ephemeral"] is True and opts["detached"] is False
    assert "env" not in opts  # no host environment reaches the guest
    assert opts["hostname"] == "sandbox" and opts["workdir"] == "/tmp"


def test_javascript_sandbox_options_mount_the_js_runtime():
    opts = sandbox_options(WorkerSpec(runtime="javascript", cpu=2.5), "node:20")
    assert opts["cpus"] == 3
    assert opts["image"]._reference == "node:20"
    assert opts["volumes"]["/reflow"].bind == str(runtime_dir() / "js")
    assert "/packages" not in opts["volumes"]


def test_installed_packages_are_mounted_read_only(tmp_path):
    opts = sandbox_options(WorkerSpec(runtime="javascript", packages=str(tmp_path)), "node:20")
    vol = opts["volumes"]["/packages"]
    assert vol.bind == str(tmp_path) and vol._to_dict()["readonly"] is True


def test_local_rootfs_replaces_the_image(tmp_path):
    opts = sandbox_options(WorkerSpec(runtime="python"), "python:3.11", rootfs=tmp_path)
    assert opts["image"] == real_ms.Image.bind(str(tmp_path))


def test_unknown_runtime_is_unavailable():
    with pytest.raises(SandboxUnavailable, match="ruby"):
        sandbox_options(WorkerSpec(runtime="ruby"), "ruby:3")
    with pytest.raises(SandboxUnavailable, match="ruby"):
        exec_command(WorkerSpec(runtime="ruby"))


def test_exec_command_runs_the_runtime_on_stdio_with_limits():
    spec = WorkerSpec(runtime="python", memory=100 * MiB, cpu_seconds=2.5, max_open_files=99,
                      max_processes=7, file_size=5 * MiB)
    cmd, args, kw = exec_command(spec)
    assert cmd == "python3"
    assert args[:4] == ["-I", "-S", "-B", "/reflow/reflow_worker.py"]
    assert args[-1] == "stdio"
    assert json.loads(args[-2]) == {"memory": 100 * MiB, "cpu_seconds": 2.5, "nproc": 7, "nofile": 99,
                                    "fsize": 5 * MiB, "packages": None}
    assert kw["stdin"] == real_ms.Stdin.pipe()
    assert kw["cwd"] == "/tmp"
    assert set(kw["env"]) == {"HOME", "PATH", "LANG"}
    limits = {r.resource: (r.soft, r.hard) for r in kw["rlimits"]}
    assert limits == {real_ms.RlimitResource.NOFILE: (99, 99), real_ms.RlimitResource.FSIZE: (5 * MiB, 5 * MiB),
                      real_ms.RlimitResource.NPROC: (7, 7), real_ms.RlimitResource.CPU: (2, 3)}
    for r in kw["rlimits"]:
        r._to_dict()  # valid for the SDK


def test_exec_command_without_cpu_seconds_sets_no_cpu_rlimit():
    _, args, kw = exec_command(WorkerSpec(runtime="javascript", memory=256 * MiB))
    assert args[0] == "--max-old-space-size=128" and args[1] == "/reflow/reflow_worker.js" and args[-1] == "stdio"
    assert real_ms.RlimitResource.CPU not in {r.resource for r in kw["rlimits"]}


# ---------------------------------------------------------------------------
# Probe: reasons, caching, time bound
# ---------------------------------------------------------------------------

SYSTEM_LOG = [  # what this machine's failed boot logs (SandboxHandle.logs(sources=[SYSTEM]))
    "INFO microsandbox_runtime::runner::vm: entering VM sandbox=reflow-probe-2",
    "ERROR msb_krun_vmm::linux::vstate: Received KVM_EXIT_INTERNAL_ERROR signal",
    "INFO msb_krun_vmm: Vmm is stopping.",
    "--- sandbox stopped ---",
]


def test_boot_failure_reason_leads_with_the_kvm_exit():
    detail = failure_detail(SYSTEM_LOG)
    assert detail == "Received KVM_EXIT_INTERNAL_ERROR signal"
    reason = boot_failure_reason("sandbox process exited before agent relay became available", detail,
                                 kvm_module="kvm-pvm")
    assert reason == "a test microVM did not boot on this host's kvm-pvm: the VMM stopped with KVM_EXIT_INTERNAL_ERROR"
    assert boot_failure_reason("boom", None) == "a test microVM did not boot: boom"
    assert boot_failure_reason("boom", "no memory") == "a test microVM did not boot: the VMM reported: no memory"
    assert failure_detail(["INFO fine"]) is None


def test_image_problems_in_one_clause():
    err = "image error: registry error: error sending request for url (https://r/v2/x)"
    assert image_problems_reason([("python:3.11", "unreachable", err), ("node:20", "unreachable", err)]) == (
        "no OCI registry reachable for python:3.11, node:20, which are not in the local image cache "
        "(error sending request for url (https://r/v2/x))")
    assert image_problems_reason([("python:3.11", "silent", "")]).startswith(
        "no OCI registry answered for python:3.11 within")
    assert image_problems_reason([]) is None


@pytest.fixture
def fresh_probe_cache(monkeypatch):
    monkeypatch.setattr(msb, "_probe_cache", {})
    monkeypatch.setattr(msb, "_probe_locks", {})


def test_probe_is_cached_per_configuration_and_shared_by_concurrent_callers(monkeypatch, fresh_probe_cache):
    calls = []
    gate = threading.Event()

    def slow_probe(self):
        calls.append(self.images["python"])
        gate.wait(5)
        return f"no {self.images['python']}"

    monkeypatch.setattr(MicrosandboxBackend, "_probe_uncached", slow_probe)
    results = []
    threads = [threading.Thread(target=lambda: results.append(MicrosandboxBackend(probe_cache=None).probe()))
               for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert results == ["no python:3.11"] * 4
    assert calls == ["python:3.11"]
    started = time.monotonic()
    assert MicrosandboxBackend(probe_cache=None).probe() == "no python:3.11"
    assert time.monotonic() - started < 0.01
    assert MicrosandboxBackend({"python": "python:3.12"}, probe_cache=None).probe() == "no python:3.12"
    assert calls == ["python:3.11", "python:3.12"]
    assert MicrosandboxBackend(probe_cache=None).status()["probe"] == "no python:3.11"


def test_probe_is_bounded_when_the_boot_hangs(monkeypatch, fresh_probe_cache, tmp_path):
    async def hang(self):
        await asyncio.sleep(3600)

    monkeypatch.setattr(MicrosandboxBackend, "_boot_test", hang)
    monkeypatch.setattr(msb, "PROBE_SLACK", 0.3)
    monkeypatch.setattr(msb, "KVM_DEVICE", str(tmp_path))  # exists and is rw for us
    monkeypatch.setattr(msb.ms, "is_runtime_installed", lambda: True)
    cache = tmp_path / "probe.json"
    backend = MicrosandboxBackend({}, probe_timeout=0.2, probe_cache=cache)
    started = time.monotonic()
    reason = backend.probe()
    assert time.monotonic() - started < 2
    assert reason == "a test microVM did not boot within 0.5s"
    # A timeout is remembered too (or every start would pay for it), but only for a while.
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["reason"] == reason and entry["expires"] - entry["at"] == msb.TIMEOUT_VERDICT_TTL
    assert "until" in backend.probe_note() and "timed out" in backend.probe_note()
    monkeypatch.setattr(msb, "_probe_cache", {})
    monkeypatch.setattr(msb.time, "time", lambda: entry["expires"] + 1)
    started = time.monotonic()
    MicrosandboxBackend({}, probe_timeout=0.2, probe_cache=cache).probe()
    assert time.monotonic() - started >= 0.4  # expired: tried again


def test_probe_boot_result_is_remembered_until_kernel_kvm_or_sdk_changes(monkeypatch, fresh_probe_cache, tmp_path):
    boots = []

    async def boot(self):
        boots.append(1)
        return "a test microVM did not boot: nope", True

    images = []

    async def image_check(self, ref):
        images.append(ref)

    monkeypatch.setattr(MicrosandboxBackend, "_boot_test", boot)
    monkeypatch.setattr(MicrosandboxBackend, "_check_image", image_check)
    monkeypatch.setattr(msb, "KVM_DEVICE", str(tmp_path))
    monkeypatch.setattr(msb.ms, "is_runtime_installed", lambda: True)
    cache = tmp_path / "probe.json"
    assert MicrosandboxBackend({}, probe_cache=cache).probe() == "a test microVM did not boot: nope"
    assert len(boots) == 1 and cache.exists()
    for change in (None, ("platform.release", lambda: "6.99.0-other"), ("_kvm_identity", lambda: "/dev/kvm=10:99,x"),
                   ("ms.version", lambda: "0.0.1")):
        monkeypatch.setattr(msb, "_probe_cache", {})  # a new process
        before, checked = len(boots), len(images)
        if change is not None:
            monkeypatch.setattr(msb if "." not in change[0] else getattr(msb, change[0].split(".")[0]),
                                change[0].split(".")[-1], change[1])
        b = MicrosandboxBackend({"python": "python:3.11"}, probe_cache=cache)
        assert b.probe() == "a test microVM did not boot: nope"
        assert len(boots) == before + (change is not None), change
        if change is None:  # remembered: no boot, and no image check (no VM boots here anyway)
            assert b.probe_note().startswith(f"remembered in {cache}") and len(images) == checked
    assert len(json.loads(cache.read_text())) == 4


def test_probe_without_kvm_says_so_without_booting(monkeypatch, fresh_probe_cache, tmp_path):
    async def boot(self):
        raise AssertionError("must not boot")

    monkeypatch.setattr(MicrosandboxBackend, "_boot_test", boot)
    monkeypatch.setattr(msb, "KVM_DEVICE", str(tmp_path / "kvm"))
    assert MicrosandboxBackend(probe_cache=None).probe() == (
        f"there is no {tmp_path / 'kvm'}: KVM is not available on this machine")


def test_backend_says_what_it_cannot_enforce_and_that_there_is_no_shm(tmp_path):
    b = MicrosandboxBackend(probe_cache=None)
    assert b.tier == "microvm" and b.shm is False
    assert b.status()["shm"] is False
    assert any("vCPU" in x for x in b.limits_not_enforced())
    assert len(MicrosandboxBackend(rootfs={"python": tmp_path}, probe_cache=None).limits_not_enforced()) == 2


# ---------------------------------------------------------------------------
# The worker, over a fake SDK that runs the real runtime locally
# ---------------------------------------------------------------------------

class _Event:
    def __init__(self, event_type, *, data=None, code=None, pid=None):
        self.event_type, self.data, self.code, self.pid = event_type, data, code, pid


class _Sink:
    def __init__(self, writer):
        self._w = writer

    async def write(self, data: bytes) -> None:
        self._w.write(data)
        await self._w.drain()

    async def close(self) -> None:
        self._w.close()


class _Handle:
    """ExecHandle: events from a local process, like the guest agent relays them."""

    def __init__(self, vm, proc):
        self.vm, self.proc = vm, proc
        self._events: asyncio.Queue = asyncio.Queue()
        self._sink = _Sink(proc.stdin)
        asyncio.get_running_loop().create_task(self._run())

    def take_stdin(self):
        sink, self._sink = self._sink, None
        return sink

    async def _run(self):
        E = real_ms.ExecEventType
        await self._events.put(_Event(E.STARTED, pid=self.proc.pid))

        async def pipe(reader, kind):
            while chunk := await reader.read(1 << 16):
                await self._events.put(_Event(kind, data=chunk))

        await asyncio.gather(pipe(self.proc.stdout, E.STDOUT), pipe(self.proc.stderr, E.STDERR))
        code = await self.proc.wait()
        if not self.vm.killed:  # a killed VM's stream just ends
            await self._events.put(_Event(E.EXITED, code=code))
        await self._events.put(None)

    async def recv(self):
        return await self._events.get()


class _VM:
    def __init__(self, sdk, name, options):
        self.sdk, self.name, self.options = sdk, name, options
        self.killed = False
        self.procs = []
        self.exec_calls = []

    async def exec_stream(self, cmd, args, **kw):
        self.exec_calls.append((cmd, args, kw))
        assert cmd == "python3" and kw["stdin"] == real_ms.Stdin.pipe()
        host_dir = self.options["volumes"]["/reflow"].bind
        argv = [os.path.realpath(sys.executable)] + [a.replace("/reflow", host_dir, 1) if a.startswith("/reflow/")
                                                     else a for a in args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=kw["env"], start_new_session=True)
        self.procs.append(proc)
        return _Handle(self, proc)

    async def kill(self, timeout=None):
        self.killed = True
        self.sdk.log.append(("kill", self.name))
        for p in self.procs:
            if p.returncode is None:
                p.kill()


class FakeSDK(types.SimpleNamespace):
    """The real ``microsandbox`` module with ``Sandbox`` replaced by local processes."""

    def __init__(self, *, create_error=None, create_hangs=False):
        super().__init__(**{k: getattr(real_ms, k) for k in dir(real_ms) if not k.startswith("__")})
        self.vms: dict[str, _VM] = {}
        self.log: list[tuple[str, str]] = []
        sdk = self

        class Sandbox:
            @staticmethod
            async def create(name, **options):
                sdk.log.append(("create", name))
                if create_hangs:
                    await asyncio.sleep(3600)
                if create_error is not None:
                    raise create_error
                vm = sdk.vms[name] = _VM(sdk, name, options)
                return vm

            @staticmethod
            async def get(name):
                if name not in sdk.vms:
                    raise real_ms.SandboxNotFoundError(f"sandbox not found: {name}")
                return sdk.vms[name]

            @staticmethod
            async def remove(name):
                sdk.log.append(("remove", name))
                if sdk.vms.pop(name, None) is None:
                    raise real_ms.SandboxNotFoundError(f"sandbox not found: {name}")

        self.Sandbox = Sandbox


@pytest.fixture
def fake_sdk(monkeypatch):
    def install(**kw) -> FakeSDK:
        sdk = FakeSDK(**kw)
        monkeypatch.setattr(msb, "ms", sdk)
        return sdk
    return install


DOUBLE = '''
from reflow import actor

@actor(name="Double", inports=["x"], outports=["y"])
def double(context):
    print("doubling")
    return {"y": context.get_input("x") * 2}
'''


async def test_worker_boots_loads_a_script_and_processes_a_message(fake_sdk):
    sdk = fake_sdk()
    spec = WorkerSpec(runtime="python")
    with trio.fail_after(10):
        worker = await MicrosandboxBackend(probe_cache=None).start(spec)
    try:
        assert worker.tier == "microvm" and worker.shm is False and worker.pid is None
        assert worker.ready_info["runtime"] == "python"
        (vm,) = sdk.vms.values()
        assert vm.options == sandbox_options(spec, "python:3.11")
        assert vm.exec_calls == [exec_command(spec)]
        with trio.fail_after(10):
            assert (await worker_rpc(worker, 1, "load", {"source": DOUBLE, "filename": "double.py"}))["result"] == {}
            notes: list = []
            reply = await worker_rpc(worker, 2, "process", {"actor_id": "d", "payload": {"x": {"type": "integer",
                                                                                           "value": 21}}}, notes)
        assert reply == {"jsonrpc": "2.0", "id": 2, "result": {"outputs": {"y": {"type": "integer", "value": 42}}}}
        assert "".join(n["params"]["text"] for n in notes if n["method"] == "log") == "doubling\n"
        assert worker.exit_info is None
    finally:
        with trio.fail_after(10):
            await worker.aclose()
    assert worker.exit_info.signal == signal.SIGKILL
    assert ("kill", vm.name) in sdk.log and ("remove", vm.name) in sdk.log and not sdk.vms


async def test_worker_that_exits_reports_its_code_and_its_vm_is_removed(fake_sdk):
    sdk = fake_sdk()
    worker = await MicrosandboxBackend(probe_cache=None).start(WorkerSpec(runtime="python"))
    (name,) = sdk.vms
    await worker.channel.send(orjson.dumps({"jsonrpc": "2.0", "method": "shutdown"}))
    with trio.fail_after(10):
        info = await worker.wait()
    assert info.code == 0 and info.signal is None and info.limit is None
    assert ("kill", name) in sdk.log and ("remove", name) in sdk.log and not sdk.vms
    with pytest.raises(Exception):  # the channel reports the end of the stream
        await worker.channel.receive()
    await worker.aclose()


async def test_kill_with_a_limit_is_reported_by_wait(fake_sdk):
    fake_sdk()
    worker = await MicrosandboxBackend(probe_cache=None).start(WorkerSpec(runtime="python"))
    worker.kill(limit="time")
    worker.kill()  # idempotent
    with trio.fail_after(10):
        info = await worker.wait()
    assert info.limit == "time" and info.signal == signal.SIGKILL


async def test_unread_output_is_capped_by_killing_the_worker(fake_sdk):
    fake_sdk()
    spec = WorkerSpec(runtime="python", max_output=64 * 1024)
    worker = await MicrosandboxBackend(probe_cache=None).start(spec)
    noisy = 'def process(context):\n    for _ in range(2000):\n        print("x" * 1000)\n'
    assert (await worker_rpc(worker, 1, "load", {"source": noisy, "filename": "noisy.py"}))["result"] == {}
    await worker.channel.send(orjson.dumps({"jsonrpc": "2.0", "id": 2, "method": "process",
                                            "params": {"actor_id": "n", "payload": {}}}))
    with trio.fail_after(10):
        info = await worker.wait()  # nobody reads: the backlog must not grow without bound
    assert info.limit == "output" and info.signal == signal.SIGKILL


async def test_create_failure_is_a_start_error_and_leaves_nothing(fake_sdk):
    sdk = fake_sdk(create_error=real_ms.MicrosandboxError("failed to start: sandbox process exited"))
    with pytest.raises(WorkerStartError, match="did not start: failed to start: sandbox process exited"):
        await MicrosandboxBackend(probe_cache=None).start(WorkerSpec(runtime="python"))
    assert not sdk.vms and any(op == "remove" for op, _ in sdk.log)


async def test_cancelled_start_tears_the_vm_down(fake_sdk):
    sdk = fake_sdk(create_hangs=True)
    returned = []

    async def start():
        returned.append(await MicrosandboxBackend(probe_cache=None).start(WorkerSpec(runtime="python")))

    with trio.fail_after(30):  # (a start that ignored the cancel would hang here)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await wait_for(lambda: any(op == "create" for op, _ in sdk.log))  # cancelled mid-create
            nursery.cancel_scope.cancel()
    assert returned == []
    (name,) = [n for op, n in sdk.log if op == "create"]
    assert ("remove", name) in sdk.log and not sdk.vms


async def test_a_runtime_that_never_says_ready_is_a_start_error(fake_sdk, monkeypatch):
    fake_sdk()
    monkeypatch.setattr(msb, "exec_command", lambda spec: ("python3", ["-c", "import sys; sys.exit(5)"],
                                                           exec_command(spec)[2]))
    with pytest.raises(WorkerStartError, match="exited with code 5 before it was ready"):
        await MicrosandboxBackend(probe_cache=None).start(WorkerSpec(runtime="python"))


# ---------------------------------------------------------------------------
# The real thing
# ---------------------------------------------------------------------------

def test_real_microvm_worker_end_to_end():
    # Synchronous on purpose: pytest-trio drops the message of a skip raised in an async test,
    # and the probe's reason is the point of skipping.
    backend = MicrosandboxBackend(probe_cache=None)
    reason = backend.probe()
    if reason is not None:
        pytest.skip(f"microsandbox cannot boot a microVM here: {reason}")

    async def main():
        with trio.fail_after(120):
            worker = await backend.start(WorkerSpec(runtime="python", memory=256 * MiB))
        try:
            assert worker.tier == "microvm"
            with trio.fail_after(30):
                assert (await worker_rpc(worker, 1, "load", {"source": DOUBLE, "filename": "double.py"}))["result"] == {}
                reply = await worker_rpc(worker, 2, "process", {"actor_id": "d", "payload": {
                    "x": {"type": "integer", "value": 4}}})
            assert reply["result"] == {"outputs": {"y": {"type": "integer", "value": 8}}}
        finally:
            await worker.aclose()
            await backend.aclose()

    trio.run(main)


def test_sdk_module_is_the_real_one_outside_the_fake():
    assert msb.ms is real_ms
    assert Path(runtime_dir() / "python" / "reflow_worker.py").is_file()
