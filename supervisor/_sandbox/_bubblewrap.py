"""The bubblewrap backend: one set of Linux namespaces per worker.

The sandbox sees only: the interpreter and the shared libraries it links
(read-only, at neutral standard paths: ``/usr/local`` for Python, ``/usr/bin``
for Node), the in-sandbox SDK at ``/reflow``, a private size-capped ``/tmp``,
its own ``/proc`` and ``/dev/{null,zero,urandom}``. No network, no host
environment, no workspace: the script's source arrives over the channel.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from ._base import SandboxBackend, SandboxUnavailable, Worker, WorkerSpec, ulimit_commands
from ._cgroup import Cgroups
from ._spawn import PACKAGES_AT, limits_arg, spawn_worker

__all__ = ["BubblewrapBackend", "runtime_dir"]

_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def runtime_dir() -> Path:
    """The in-sandbox runtimes shipped with this package (``runtime/python``, ``runtime/js``)."""
    return Path(__file__).resolve().parent.parent / "runtime"


def _shared_libs(binaries: list[str]) -> set[str]:
    """Absolute paths of every shared library the binaries load (by ldd)."""
    libs: set[str] = set()
    for chunk in range(0, len(binaries), 200):
        try:
            out = subprocess.run(["ldd", *binaries[chunk:chunk + 200]], capture_output=True,
                                 text=True, check=False).stdout
        except OSError:
            continue
        libs.update(m.group(1) for m in _LDD_LINE.finditer(out))
    return libs


@functools.cache
def python_binds() -> tuple[tuple[str, str], ...]:
    """(host path, sandbox path) pairs that make a working CPython at /usr/local."""
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    stdlib = sysconfig.get_path("stdlib")
    if not os.path.isfile(os.path.join(stdlib, "os.py")):
        raise SandboxUnavailable(f"cannot find the Python standard library (looked in {stdlib})")
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    dynload = glob.glob(os.path.join(stdlib, "lib-dynload", "*.so"))
    binds = [(exe, "/usr/local/bin/python3"), (stdlib, f"/usr/local/lib/{ver}")]
    binds += [(os.path.realpath(lib), _neutral_lib_path(lib)) for lib in sorted(_shared_libs([exe, *dynload]))]
    return tuple(binds)


@functools.cache
def node_binds() -> tuple[tuple[str, str], ...] | None:
    node = shutil.which("node")
    if node is None:
        return None
    exe = os.path.realpath(node)
    binds = [(exe, "/usr/bin/node")]
    binds += [(os.path.realpath(lib), _neutral_lib_path(lib)) for lib in sorted(_shared_libs([exe]))]
    return tuple(binds)


def _neutral_lib_path(lib: str) -> str:
    """Standard library paths stay; anything else (a pyenv's libpython) moves to /usr/lib."""
    if lib.startswith(("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")):
        return lib
    return "/usr/lib/x86_64-linux-gnu/" + os.path.basename(lib) if os.path.isdir(
        "/usr/lib/x86_64-linux-gnu") else "/usr/lib/" + os.path.basename(lib)


# Denied with EPERM inside every sandbox: what could reach the kernel's attack surface or
# other processes (ptrace, namespaces, mounts, keyrings, bpf, perf, module and kexec loading, …).
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "open_by_handle_at",
    "swapon", "swapoff", "reboot", "syslog", "acct", "settimeofday", "clock_settime", "mknod", "mknodat",
)


# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME.
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)


@functools.cache
def seccomp_program() -> bytes | None:
    """The compiled BPF filter for ``bwrap --seccomp`` (built with libseccomp), or None without it."""
    try:
        import errno

        import pyseccomp as seccomp
    except (ImportError, OSError):
        return None
    filt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            pass  # a syscall this kernel/arch does not have
    # clone() can make namespaces too: deny it when any CLONE_NEW* flag is set (threads and
    # fork stay allowed). clone3 passes its flags in memory a filter cannot read, so it gets
    # ENOSYS, on which glibc and libuv fall back to clone().
    for flag in CLONE_NEW_FLAGS:
        try:
            filt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        except (RuntimeError, ValueError, OSError):
            pass
    try:
        filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    except (RuntimeError, ValueError, OSError):
        pass
    fd = os.memfd_create("reflow-seccomp")
    try:
        with open(fd, "w+b", closefd=False) as f:
            filt.export_bpf(f)
            f.seek(0)
            return f.read()
    finally:
        os.close(fd)


class BubblewrapBackend(SandboxBackend):
    name = "bubblewrap"
    tier = "namespaces"

    def __init__(self) -> None:
        self._bwrap = shutil.which("bwrap")
        self._cgroups: Cgroups | None = None

    def check(self) -> None:
        """Raise SandboxUnavailable when bwrap is missing or cannot create namespaces here."""
        if self._bwrap is None:
            raise SandboxUnavailable(
                "bubblewrap is not installed: install it (apt-get install bubblewrap) "
                "or set workspace.sandbox.backend")
        probe = subprocess.run([self._bwrap, "--unshare-all", "--ro-bind", "/", "/", "/bin/true"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            raise SandboxUnavailable(f"bubblewrap cannot create namespaces here: {probe.stderr.strip()}")
        self._cgroups = Cgroups.probe()

    def limits_not_enforced(self) -> tuple[str, ...]:
        if self._cgroups is None:
            self._cgroups = Cgroups.probe()
        missing = self._cgroups.missing()
        if seccomp_program() is None:
            missing += ("seccomp filter (pyseccomp / libseccomp not available)",)
        if "process count (pids.max)" in missing:
            # RLIMIT_NPROC does not bind uid 0, which is what the sandbox maps to.
            missing += ("(so a fork bomb is bounded only by the host's pid limit)",)
        return missing

    async def aclose(self) -> None:
        if self._cgroups is not None:
            self._cgroups.close()

    def argv(self, spec: WorkerSpec) -> list[str]:
        assert self._bwrap is not None
        args = [
            self._bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox", "--clearenv",
            "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/local/bin:/usr/bin",
            "--setenv", "LANG", "C.UTF-8",
            "--proc", "/proc",
            "--dev-bind", "/dev/null", "/dev/null",
            "--dev-bind", "/dev/zero", "/dev/zero",
            "--dev-bind", "/dev/urandom", "/dev/urandom",
            "--size", str(spec.tmp_size), "--tmpfs", "/tmp",
        ]
        rt = runtime_dir()
        if spec.packages:
            args += ["--ro-bind", spec.packages, PACKAGES_AT]
        if spec.runtime == "python":
            for src, dst in python_binds():
                args += ["--ro-bind", src, dst]
            args += ["--ro-bind", str(rt / "python"), "/reflow", "--remount-ro", "/", "--chdir", "/tmp",
                     "/usr/local/bin/python3", "-I", "-S", "-B", "/reflow/reflow_worker.py",
                     limits_arg(spec)]
        elif spec.runtime == "javascript":
            binds = node_binds()
            if binds is None:
                raise SandboxUnavailable("Node.js is not installed: JavaScript actors cannot run")
            for src, dst in binds:
                args += ["--ro-bind", src, dst]
            args += ["--ro-bind", str(rt / "js"), "/reflow", "--remount-ro", "/", "--chdir", "/tmp",
                     "/usr/bin/node", "--max-old-space-size=" + str(max(16, spec.memory // 2**20 // 2)),
                     "/reflow/reflow_worker.js", limits_arg(spec)]
        else:
            raise SandboxUnavailable(f"unknown runtime {spec.runtime!r}")
        return args

    async def start(self, spec: WorkerSpec) -> Worker:
        argv = self.argv(spec)
        if self._cgroups is None:
            self._cgroups = Cgroups.probe()
        groups: list = []
        prefix = [ulimit_commands(spec)] if spec.runtime == "javascript" else []
        if self._cgroups.available:
            groups, joins = self._cgroups.create(pids=spec.max_processes, memory=spec.memory, cpu=spec.cpu)
            if groups:
                prefix.insert(0, joins)
        if prefix:
            argv = ["/bin/sh", "-c", "; ".join(prefix) + '; exec "$@"', "sh", *argv]
        extra: tuple[int, ...] = ()
        program = seccomp_program()
        if program is not None:
            fd = os.memfd_create("reflow-seccomp", 0)  # inheritable only through pass_fds
            os.write(fd, program)
            os.lseek(fd, 0, os.SEEK_SET)
            extra = (fd,)
            i = argv.index(self._bwrap) + 1
            argv = [*argv[:i], "--seccomp", str(fd), *argv[i:]]
        try:
            worker = await spawn_worker(argv, spec, tier=self.tier, shell_status=True, extra_fds=extra)
        except BaseException:
            Cgroups.remove(groups)
            raise
        worker.on_exit.append(lambda: Cgroups.remove(groups))
        return worker
