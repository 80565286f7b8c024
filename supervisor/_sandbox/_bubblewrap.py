"""The bubblewrap backend: one set of Linux namespaces per worker.

The sandbox sees only: the interpreter and the shared libraries it links
(read-only, at neutral standard paths: ``/usr/local`` for Python, ``/usr/bin``
for Node), the in-sandbox SDK at ``/reflow``, a private size-capped ``/tmp``
and ``/dev/{null,zero,urandom}``. No ``/proc`` and no ``/sys`` (procfs would name
every bind's host source in ``mountinfo`` and bwrap's command line in
``/proc/1/cmdline``), no network, no host environment, no workspace: the
script's source arrives over the channel.

Every sandbox runs as an unprivileged host uid in a user namespace of its own:
a host running as root drops to ``SANDBOX_UID`` (a uid nothing on the host
owns, with no groups) before ``bwrap`` runs, so uid 0 inside is not root
outside. Whatever such a uid cannot reach on the host (a pyenv under a 0700
``/root``, a workspace in a private directory) is staged first: hard links
(copies across filesystems) in a world-readable cache, bound at the same
sandbox paths.

Cold start is on the hot path (restarts, pool refills), so the mount table is
kept short: the libraries a runtime links are bound as one read-only directory
per sandbox directory (``_staged``) rather than one mount per file — the same
files at the same paths, far fewer mounts per spawn for Python's many libraries.
"""

from __future__ import annotations

import compileall
import contextlib
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
from collections.abc import Callable
from pathlib import Path

from .._files import write_atomic
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
    # Staged even where reachable, for two edits: the base interpreter's site-packages stays
    # out (the sandbox runs with -I -S), and so does its build configuration (config-3.X-…:
    # a Makefile and libpython.a naming the host prefix, for building extensions), and
    # sysconfig's build data names /usr/local.
    libpl = os.path.basename(sysconfig.get_config_var("LIBPL") or "") or "config-none"
    prefixes = sorted({p for p in (sysconfig.get_config_var("prefix"), sysconfig.get_config_var("exec_prefix"),
                                   sys.base_prefix, os.path.realpath(sys.base_prefix))
                       if p and p not in ("/", "/usr", "/usr/local")},  # a system prefix names nothing
                      key=len, reverse=True)
    try:
        stdlib_src = reachable_tree(stdlib, exclude=("site-packages", libpl), always=True,
                                    tag="sysconfig " + repr(prefixes),
                                    finish=functools.partial(_neutral_sysconfig, prefixes=prefixes, ver=ver))
    except OSError as exc:
        log.debug("binding the standard library as it is: %s", exc)
        stdlib_src = stdlib
    binds = [(exe, "/usr/local/bin/python3"), (stdlib_src, f"/usr/local/lib/{ver}")]
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


def _neutral_sysconfig(tree: Path, *, prefixes: list[str], ver: str) -> None:
    """The build's ``_sysconfigdata`` with the interpreter's host prefix replaced by
    /usr/local, where the sandbox sees it (``sysconfig.get_config_var("prefix")``)."""
    import importlib.util
    import py_compile

    for f in tree.glob("_sysconfigdata_*.py"):
        text = f.read_text()
        for prefix in prefixes:
            text = text.replace(prefix, "/usr/local")
        f.unlink()  # a hard link to the interpreter's own file: replace it, do not write through
        f.write_text(text)
        for pyc in (tree / "__pycache__").glob(f.stem + ".*"):
            pyc.unlink()
        py_compile.compile(str(f), cfile=importlib.util.cache_from_source(str(f)),
                           dfile=f"/usr/local/lib/{ver}/{f.name}", doraise=True)


def _neutral_lib_path(lib: str) -> str:
    """Standard library paths stay; anything else (a pyenv's libpython) moves to /usr/lib."""
    if lib.startswith(("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")):
        return lib
    return "/usr/lib/x86_64-linux-gnu/" + os.path.basename(lib) if os.path.isdir(
        "/usr/lib/x86_64-linux-gnu") else "/usr/lib/" + os.path.basename(lib)


# The host uid/gid every sandbox of a root host runs as: owns no file on the host and is in
# no group, so inside the sandbox only world-readable files can be read, and nothing of the
# host can be written, signalled or traced. Inside, it is uid/gid SANDBOX_INNER_ID.
SANDBOX_UID = SANDBOX_GID = 2_000_000_000
SANDBOX_INNER_ID = 1000


def drops_privileges() -> bool:
    """Whether sandboxes switch to SANDBOX_UID (the host runs as root)."""
    return os.geteuid() == 0


def _reachable(path: str) -> bool:
    """Whether a uid with no groups and no privilege (the sandbox's) can open ``path``:
    every directory on the way searchable by others, the file itself readable by them."""
    if not drops_privileges():
        return True  # bwrap runs as the host's own (unprivileged) uid, which reached it
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        if not st.st_mode & 0o004 or (os.path.isdir(real) and not st.st_mode & 0o001):
            return False
        d = os.path.dirname(real)
        while True:
            if not os.stat(d).st_mode & 0o001:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def _stage_root() -> Path:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reflow" / "sandbox-libs"
    if not drops_privileges():
        return home
    base = home.parent.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    # Root's home is usually 0700: the sandbox uid could not reach a stage there.
    return home if _reachable(str(base)) else Path("/var/cache/reflow/sandbox-libs")


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
        # A lone file is staged too when the sandbox uid could not reach it where it is.
        nested = any(d.startswith(folder + "/") and os.path.dirname(d) != folder for d in dsts)
        if nested or (len(files) < 2 and _reachable(files[0][0])):
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
    _make_root(root)
    with _fresh_dir(root) as tmp:
        for name, src in files.items():
            os.link(src, tmp / name)
        os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:  # another host made it meanwhile (or a stale one is in the way): use ours
        if _links_exactly(final, stats):
            shutil.rmtree(tmp, ignore_errors=True)
            return str(final)
        return str(tmp)
    return str(final)


@contextlib.contextmanager
def _fresh_dir(root: Path):
    """A new private directory in ``root`` to fill before it is renamed into place; removed
    if filling it fails (so a failed stage leaves nothing behind)."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_root(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if drops_privileges():
        os.chmod(root, 0o755)  # readable by the sandbox uid, writable only by the host


def reachable_tree(src: str, *, exclude: tuple[str, ...] = (), always: bool = False, deep: bool = False,
                   finish: Callable[[Path], None] | None = None, tag: str = "") -> str:
    """``src`` if the sandbox uid can reach it, else a staged copy of the tree it can.

    The copy is hard links (plain copies where links cannot be made), world-readable
    directories, the same symlinks; ``exclude`` names top-level entries left out. It
    lives in the stage root, named by the source's path and identity (device, inode,
    mtime of its top directory), and is reused while that identity holds: meant for
    trees that do not change in place under the same top directory (an interpreter's
    standard library, a content-hashed package directory); ``deep`` names it by every
    file's identity instead, for a small tree edited in place (the runtime). ``always``
    stages even a reachable tree; ``finish`` edits the copy before it is published
    (replacing, never writing through, a hard link), ``tag`` names that edit in the
    key. Raises OSError when it cannot be made.
    """
    if not always and _reachable(src):
        return src
    real = os.path.realpath(src)
    st = os.stat(real)
    ident: list = [st.st_dev, st.st_ino, st.st_mtime_ns]
    if deep:
        for top, _, names in os.walk(real):
            for n in sorted(names):
                f = os.stat(os.path.join(top, n), follow_symlinks=False)
                ident.append((os.path.relpath(os.path.join(top, n), real), f.st_ino, f.st_mtime_ns, f.st_size))
    key = hashlib.sha256(repr((real, ident, exclude, tag)).encode()).hexdigest()[:24]
    root = _stage_root()
    final = root / f"tree-{key}"
    # What it copies, beside it (never inside: the sandbox must not read a host path), written
    # once the tree is in place; also what _sweep_trees checks.
    source = root / f"tree-{key}.source"
    if source.exists():
        return str(final)
    _make_root(root)
    _sweep_trees(root)
    with _fresh_dir(root) as tmp:
        for top, dirs, files in os.walk(real):
            rel = os.path.relpath(top, real)
            if rel == ".":
                dirs[:] = [d for d in dirs if d not in exclude]
                files = [f for f in files if f not in exclude]
            here = tmp / rel
            for d in list(dirs):
                if os.path.islink(os.path.join(top, d)):
                    os.symlink(os.readlink(os.path.join(top, d)), here / d)
                    dirs.remove(d)
                else:
                    (here / d).mkdir()
            for name in files:
                s, t = os.path.join(top, name), here / name
                if os.path.islink(s):
                    os.symlink(os.readlink(s), t)
                    continue
                try:
                    os.link(s, t)
                except OSError:
                    shutil.copy2(s, t)
        if finish is not None:
            finish(tmp)
        for top, dirs, _ in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(top, d), 0o755)
        os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:  # another host put the same tree in place meanwhile (a rename is whole)
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    # Whole or not at all: another host's _sweep_trees reading it empty would remove the tree.
    write_atomic(source, real.encode())
    return str(final)


def _sweep_trees(root: Path) -> None:
    """Remove staged trees whose source is gone (a deleted workspace's packages, an
    uninstalled interpreter), so the stage does not grow with every workspace ever run."""
    for source in root.glob("tree-*.source"):
        try:
            if not os.path.exists(source.read_text()):
                shutil.rmtree(source.with_suffix(""), ignore_errors=True)
                source.unlink()
        except OSError:
            continue


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
# command line is compiled afresh every time, a loader uses its .pyc.
PY_WORKER = "/reflow/reflow_worker.py"
PY_BOOT = ("import sys; sys.argv[0] = __file__ = %r; exec(__import__('_frozen_importlib_external')"
           ".SourceFileLoader('__main__', __file__).get_code('__main__'))" % PY_WORKER)


# The seccomp filter is an allow-list: the system calls CPython and Node (libuv, V8, glibc)
# make, taken from Docker's default profile (moby profiles/seccomp/default.json, the calls
# it allows without capabilities) minus what a script actor does not need: io_uring, Linux
# AIO, ptrace and process_vm_*, fanotify, name_to_handle_at, clock adjusting, landlock,
# memfd_secret, mknod, modify_ldt, remap_file_pages, process_mrelease. Anything else fails
# with ENOSYS (which libcs treat as "not on this kernel" and fall back from), the calls below
# with EPERM, socket()/socketpair() of any family but AF_UNIX with EAFNOSUPPORT, and clone()
# with any CLONE_NEW* flag with EPERM.
ALLOWED_SYSCALLS = (
    "accept", "accept4", "access", "alarm", "arch_prctl", "bind", "brk", "capget", "capset", "chdir",
    "chmod", "chown", "clock_getres", "clock_gettime", "clock_nanosleep", "close", "close_range", "connect",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_pwait", "epoll_pwait2", "epoll_wait", "eventfd", "eventfd2", "execve", "execveat", "exit",
    "exit_group", "faccessat", "faccessat2", "fadvise64", "fallocate", "fchdir", "fchmod", "fchmodat",
    "fchmodat2", "fchown", "fchownat", "fcntl", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork",
    "fremovexattr", "fsetxattr", "fstat", "fstatfs", "fsync", "ftruncate", "futex", "futex_waitv",
    "futex_wake", "futex_wait", "futex_requeue", "futimesat", "getcpu", "getcwd", "getdents", "getdents64",
    "getegid", "geteuid", "getgid", "getgroups", "getitimer", "getpeername", "getpgid", "getpgrp", "getpid",
    "getppid", "getpriority", "getrandom", "getresgid", "getresuid", "getrlimit", "get_robust_list",
    "getrusage", "getsid", "getsockname", "getsockopt", "get_thread_area", "gettid", "gettimeofday",
    "getuid", "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "ioctl",
    "ioprio_get", "ioprio_set", "kill", "lchown", "lgetxattr", "link", "linkat", "listen", "listxattr",
    "llistxattr", "lremovexattr", "lseek", "lsetxattr", "lstat", "madvise", "map_shadow_stack", "membarrier",
    "memfd_create", "mincore", "mkdir", "mkdirat", "mlock", "mlock2", "mlockall", "mmap", "mprotect",
    "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedsend", "mq_unlink", "mremap",
    "mseal", "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall", "munmap",
    "nanosleep", "newfstatat", "open", "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal",
    "pipe", "pipe2", "pkey_alloc", "pkey_free", "pkey_mprotect", "poll", "ppoll", "prctl", "pread64",
    "preadv", "preadv2", "prlimit64", "pselect6", "pwrite64", "pwritev", "pwritev2", "read", "readahead",
    "readlink", "readlinkat", "readv", "recvfrom", "recvmmsg", "recvmsg", "removexattr", "rename",
    "renameat", "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getscheduler", "sched_rr_get_interval", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select", "semctl",
    "semget", "semop", "semtimedop", "sendfile", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsuid",
    "setgid", "setgroups", "setitimer", "setpgid", "setpriority", "setregid", "setresgid", "setresuid",
    "setreuid", "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setxattr", "shmat", "shmctl", "shmdt", "shmget", "shutdown",
    "sigaltstack", "signalfd", "signalfd4", "splice", "stat", "statfs", "statx", "symlink", "symlinkat",
    "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_settime", "timerfd_create",
    "timerfd_gettime", "timerfd_settime", "times", "tkill", "truncate", "umask", "uname", "unlink",
    "unlinkat", "utime", "utimensat", "utimes", "vfork", "vmsplice", "wait4", "waitid", "write", "writev",
)

# Denied with EPERM (not just absent): what reaches the kernel's attack surface or other
# processes, named so that a probe sees "not permitted" rather than "not implemented".
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp", "mount",
    "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount", "fsconfig", "fspick",
    "move_mount", "open_tree", "mount_setattr", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at", "swapon",
    "swapoff", "reboot", "syslog", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "mknod", "mknodat", "quotactl", "quotactl_fd", "sethostname", "setdomainname", "lookup_dcookie",
    "fanotify_init", "fanotify_mark", "iopl", "ioperm", "vhangup", "personality", "modify_ldt",
)

# personality(2) values Docker allows: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE (and with UNAME26),
# and the 0xffffffff query.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME.
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)
_AF_UNIX = 1


@functools.cache
def seccomp_program() -> bytes | None:
    """The compiled BPF filter for ``bwrap --seccomp`` (built with libseccomp), or None without it.

    Calls this libseccomp or kernel does not know are left out (they get the default,
    ENOSYS). Calls allowed without an argument check cost nothing per call: the kernel
    caches their verdict in a bitmap and does not run the filter for them.
    """
    try:
        import errno

        import pyseccomp as seccomp
    except (ImportError, OSError):
        return None

    filt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.ENOSYS))

    def rule(action: int, name: str, *args) -> None:
        try:
            filt.add_rule(action, name, *args)
        except (RuntimeError, ValueError, OSError):
            pass  # a syscall this libseccomp/kernel/arch does not have

    for name in ALLOWED_SYSCALLS:
        rule(seccomp.ALLOW, name)
    for name in DENIED_SYSCALLS:
        if name != "personality":
            rule(seccomp.ERRNO(errno.EPERM), name)
    for value in _PERSONALITIES:
        rule(seccomp.ALLOW, "personality", seccomp.Arg(0, seccomp.EQ, value))
    # Only Unix sockets: no AF_INET/AF_INET6 (the netns has only lo, but its services and the
    # kernel's protocol code are surface), no AF_NETLINK, AF_PACKET, AF_VSOCK, AF_ALG, ….
    for name in ("socket", "socketpair"):
        rule(seccomp.ALLOW, name, seccomp.Arg(0, seccomp.EQ, _AF_UNIX))
        rule(seccomp.ERRNO(errno.EAFNOSUPPORT), name, seccomp.Arg(0, seccomp.NE, _AF_UNIX))
    # clone() can make namespaces too: allowed only without any CLONE_NEW* flag (threads and
    # fork), EPERM with one. clone3 passes its flags in memory a filter cannot read, so it
    # gets ENOSYS, on which glibc and libuv fall back to clone().
    mask = 0
    for flag in CLONE_NEW_FLAGS:
        mask |= flag
        rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rule(seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, mask, 0))
    rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
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
        # A system tool: found where util-linux puts it even when PATH is narrowed.
        self._setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
        self._cgroups: Cgroups | None = None

    def check(self) -> None:
        """Raise SandboxUnavailable when bwrap is missing or cannot create namespaces here."""
        if self._bwrap is None:
            raise SandboxUnavailable(
                "bubblewrap is not installed: install it (apt-get install bubblewrap) "
                "or set workspace.sandbox.backend")
        probe_argv = [self._bwrap, "--unshare-all", "--ro-bind", "/usr", "/usr", "--ro-bind", "/bin", "/bin",
                      "--ro-bind", "/lib", "/lib", "--ro-bind-try", "/lib64", "/lib64", "/bin/true"]
        if drops_privileges():
            if self._setpriv is None:
                raise SandboxUnavailable(
                    "setpriv is not installed (util-linux): a host running as root needs it to run "
                    "sandboxes as an unprivileged uid")
            probe_argv = [self._setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups",
                          "--", *probe_argv]
        probe = subprocess.run(probe_argv, capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            raise SandboxUnavailable(f"bubblewrap cannot create namespaces here (as an unprivileged uid; "
                                     f"is kernel.unprivileged_userns_clone or user.max_user_namespaces 0?): "
                                     f"{probe.stderr.strip()}")
        self._cgroups = Cgroups.probe()

    def limits_not_enforced(self) -> tuple[str, ...]:
        if self._cgroups is None:
            self._cgroups = Cgroups.probe()
        missing = self._cgroups.missing()
        if seccomp_program() is None:
            missing += ("seccomp filter (pyseccomp / libseccomp not available)",)
        if "process count (pids.max)" in missing:
            # Python sets RLIMIT_NPROC on itself (counted per sandbox: its own user namespace);
            # Node cannot, and a shell's ulimit before the uid switch would count every sandbox.
            missing += ("(so a JavaScript fork bomb is bounded only by the host's pid limit)",)
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
            "--uid", str(SANDBOX_INNER_ID), "--gid", str(SANDBOX_INNER_ID),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox", "--clearenv",
            "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/local/bin:/usr/bin",
            "--setenv", "LANG", "C.UTF-8",
            # No --proc: procfs names the host source of every bind (mountinfo) and bwrap's
            # whole command line (/proc/1/cmdline), and /proc/sys is the kernel's knobs.
            "--dev-bind", "/dev/null", "/dev/null",
            "--dev-bind", "/dev/zero", "/dev/zero",
            "--dev-bind", "/dev/urandom", "/dev/urandom",
            "--size", str(spec.tmp_size), "--tmpfs", "/tmp",
        ]
        rt = runtime_dir()
        if spec.packages:
            args += ["--ro-bind", reachable_tree(spec.packages), PACKAGES_AT]
        if spec.runtime == "python":
            for src, dst in python_binds():
                args += ["--ro-bind", src, dst]
            refresh_bytecode(rt / "python")
            args += ["--ro-bind", reachable_tree(str(rt / "python"), deep=True), "/reflow", "--remount-ro", "/",
                     "--chdir", "/tmp",
                     "/usr/local/bin/python3", "-I", "-S", "-B", "-c", PY_BOOT, limits_arg(spec, shm=shm)]
        elif spec.runtime == "javascript":
            binds = node_binds()
            if binds is None:
                raise SandboxUnavailable("Node.js is not installed: JavaScript actors cannot run")
            for src, dst in binds:
                args += ["--ro-bind", src, dst]
            args += ["--ro-bind", reachable_tree(str(rt / "js"), deep=True), "/reflow", "--remount-ro", "/", "--chdir", "/tmp",
                     "/usr/bin/node", "--max-old-space-size=" + str(max(16, spec.memory // 2**20 // 2)),
                     "/reflow/reflow_worker.js", limits_arg(spec)]
        else:
            raise SandboxUnavailable(f"unknown runtime {spec.runtime!r}")
        if drops_privileges():
            # Last step before bwrap, after the cgroup joins (which need root): the sandbox's
            # user namespace is then made by, and maps to, an unprivileged uid.
            args = [self._setpriv or "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}",
                    "--clear-groups", "--", *args]
        return args

    async def start(self, spec: WorkerSpec) -> Worker:
        regions = None
        if spec.runtime == "python" and spec.shm_size:
            # Two fresh regions for this worker alone; inherited (pass_fds), never on a filesystem.
            regions = Regions(spec.shm_size)
            try:  # (argv can refuse: an unreachable packages dir; the regions must not outlive that)
                argv = self.argv(spec, shm={"in": regions.child_in, "out": regions.child_out,
                                            "size": spec.shm_size, "threshold": spec.shm_threshold})
            except BaseException:
                regions.close()
                raise
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
            i = argv.index(self._bwrap) + 1  # an option of bwrap's, wherever a prefix put it
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
