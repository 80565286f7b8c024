"""The bubblewrap backend: one set of Linux namespaces per worker.

The sandbox sees only: the interpreter and the shared libraries it links
(read-only, at neutral standard paths: ``/usr/local`` for Python, ``/usr/bin``
for Node), the in-sandbox SDK at ``/reflow``, a private size-capped ``/tmp``,
its own ``/proc`` and ``/dev/{null,zero,urandom}``. No network, no host
environment, no workspace: the script's source arrives over the channel.

Cold start is on the hot path (restarts, pool refills), so the mount table is
kept short: the libraries a runtime links are bound as one read-only directory
per sandbox directory (``_staged``) rather than one mount per file — the same
files at the same paths, ~8 ms less per spawn for Python's ~50 libraries.
"""

from __future__ import annotations

import compileall
import functools
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import defaultdict
from pathlib import Path

from .._shm import Regions
from ._base import SandboxBackend, SandboxUnavailable, Worker, WorkerSpec, ulimit_commands
from ._cgroup import Cgroups
from ._spawn import PACKAGES_AT, limits_arg, spawn_worker

__all__ = ["BubblewrapBackend", "runtime_dir"]

_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")

log = logging.getLogger("supervisor.sandbox")


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
    return tuple(_staged(binds))


@functools.cache
def node_binds() -> tuple[tuple[str, str], ...] | None:
    node = shutil.which("node")
    if node is None:
        return None
    exe = os.path.realpath(node)
    binds = [(exe, "/usr/bin/node")]
    binds += [(os.path.realpath(lib), _neutral_lib_path(lib)) for lib in sorted(_shared_libs([exe]))]
    return tuple(_staged(binds))


def _neutral_lib_path(lib: str) -> str:
    """Standard library paths stay; anything else (a pyenv's libpython) moves to /usr/lib."""
    if lib.startswith(("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")):
        return lib
    return "/usr/lib/x86_64-linux-gnu/" + os.path.basename(lib) if os.path.isdir(
        "/usr/lib/x86_64-linux-gnu") else "/usr/lib/" + os.path.basename(lib)


def _stage_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reflow" / "sandbox-libs"


def _staged(binds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The same (host path, sandbox path) view with one bind per sandbox directory.

    Each sandbox directory that gets two or more files (``/lib/x86_64-linux-gnu``)
    is bound from one host directory holding hard links to exactly those files,
    under their sandbox names: the sandbox sees the same files at the same paths,
    and bwrap makes one mount instead of one mount, one mount point and one
    read-only remount per file. The directory lives in the user's cache, named by
    the identity (device, inode, size, mtime) of what it links, so every host of
    this interpreter shares it and a changed library gets a new one; a directory
    found there is used only if it links exactly those inodes. Wherever a hard
    link cannot be made (another filesystem, ``fs.protected_hardlinks`` for files
    we do not own) the files stay bound one by one.
    """
    dsts = {dst for _, dst in binds}
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for src, dst in binds:
        if os.path.isfile(src):
            groups[os.path.dirname(dst)].append((src, dst))
    out = list(binds)
    for folder, files in groups.items():
        # Only a directory nothing else is bound into: a read-only bind takes the whole of it.
        if len(files) < 2 or any(d.startswith(folder + "/") and os.path.dirname(d) != folder for d in dsts):
            continue
        try:
            staged = _stage_dir({os.path.basename(dst): src for src, dst in files})
        except OSError as exc:
            log.debug("binding %s file by file: %s", folder, exc)
            continue
        out = [b for b in out if b not in files] + [(staged, folder)]
    return out


def _stage_dir(files: dict[str, str]) -> str:
    """A directory of hard links ``name -> files[name]``, reused when one already matches.

    Raises OSError when the links cannot be made.
    """
    stats = {name: os.stat(src) for name, src in files.items()}
    key = hashlib.sha256(repr(sorted(
        (name, files[name], st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats.items()
    )).encode()).hexdigest()[:24]
    root = _stage_root()
    final = root / key
    if _links_exactly(final, stats):
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        for name, src in files.items():
            os.link(src, tmp / name)
        os.chmod(tmp, 0o755)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another host made it meanwhile (or a stale one is in the way): use ours
        if _links_exactly(final, stats):
            shutil.rmtree(tmp, ignore_errors=True)
            return str(final)
        return str(tmp)
    return str(final)


def _links_exactly(folder: Path, stats: dict[str, os.stat_result]) -> bool:
    try:
        if set(os.listdir(folder)) != set(stats):
            return False
        for name, want in stats.items():
            st = os.stat(folder / name, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                return False
    except OSError:
        return False
    return True


_bytecode_seen: dict[Path, list[tuple]] = {}


def refresh_bytecode(folder: Path) -> None:
    """Compile the in-sandbox Python runtime's stale or missing ``.pyc`` files, on the host.

    The sandbox runs with ``-B`` on a read-only ``/reflow``, so it can use bytecode
    but never write it: a source edited since the last compile (or a checkout run
    with ``PYTHONDONTWRITEBYTECODE``) would be recompiled by every worker at start.
    Cheap when nothing changed (a stat per file); a read-only install is left as
    it is (pip compiled it at install time).
    """
    mark = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                try:
                    st = os.stat(os.path.join(top, name))
                except OSError:
                    continue
                mark.append((top, name, st.st_mtime_ns, st.st_size))
    if _bytecode_seen.get(folder) == mark:
        return
    try:
        # Named as the sandbox sees them (/reflow/…): no host path inside the .pyc.
        compileall.compile_dir(str(folder), ddir="/reflow", quiet=2)
    except OSError:
        pass
    _bytecode_seen[folder] = mark


# Runs /reflow/reflow_worker.py as `python3 /reflow/reflow_worker.py ARGS…` would (as
# __main__, argv[0] and __file__ set), but from its cached bytecode: a script named on the
# command line is compiled afresh every time (~4 ms for the worker), a loader uses its .pyc.
PY_WORKER = "/reflow/reflow_worker.py"
PY_BOOT = ("import sys; sys.argv[0] = __file__ = %r; exec(__import__('_frozen_importlib_external')"
           ".SourceFileLoader('__main__', __file__).get_code('__main__'))" % PY_WORKER)


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

    def argv(self, spec: WorkerSpec, shm: dict | None = None) -> list[str]:
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
            refresh_bytecode(rt / "python")
            args += ["--ro-bind", str(rt / "python"), "/reflow", "--remount-ro", "/", "--chdir", "/tmp",
                     "/usr/local/bin/python3", "-I", "-S", "-B", "-c", PY_BOOT, limits_arg(spec, shm=shm)]
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
        regions = None
        if spec.runtime == "python" and spec.shm_size:
            # Two fresh regions for this worker alone; inherited (pass_fds), never on a filesystem.
            regions = Regions(spec.shm_size)
            argv = self.argv(spec, shm={"in": regions.child_in, "out": regions.child_out,
                                        "size": spec.shm_size, "threshold": spec.shm_threshold})
        else:
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
        if regions is not None:
            extra += regions.child_fds  # spawn_worker closes them once the child has them
        try:
            worker = await spawn_worker(argv, spec, tier=self.tier, shell_status=True, extra_fds=extra)
        except BaseException:
            Cgroups.remove(groups)
            if regions is not None:
                regions.close()
            raise
        worker.on_exit.append(lambda: Cgroups.remove(groups))
        if regions is not None:
            worker.shm = regions
            worker.on_exit.append(regions.close)  # unmapped once the worker is reaped
        return worker
