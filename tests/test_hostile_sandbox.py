"""Hostile probes against the bubblewrap sandbox itself, through one real host.

Each probe is a script actor (Python and JavaScript) that tries an attack and
returns what happened; each test asserts that the attack failed *and* that the
host still serves (a bystander actor answers). test_hostile.py covers the
scripted abuse of a host (files, state, limits, the channel); this file covers
the kernel and the sandbox boundary: the host uid behind the sandbox, procfs
and sysfs, devices, what names a host path, signals and ptrace, sockets, the
system calls the seccomp allow-list refuses, inherited descriptors and the
shared-memory rings.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import orjson
import pytest
import trio

from conftest import ROOT, HostProcess, cmdline, open_client, write_workspace
from supervisor._sandbox._bubblewrap import SANDBOX_INNER_ID, SANDBOX_UID, drops_privileges
from supervisor._sandbox._spawn import descendants
from supervisor.client import RpcError

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")

PY = r'''
import ctypes, errno, mmap, os, socket, stat, sys
from reflow import actor

libc = ctypes.CDLL(None, use_errno=True)
ALLOWED = "ALLOWED"


def name(e):
    return errno.errorcode.get(e, str(e))


def attempt(fn):
    """ALLOWED, or the errno name (or exception type) the attack met."""
    try:
        r = fn()
        if isinstance(r, socket.socket):
            r.close()
        return ALLOWED
    except OSError as e:
        return name(e.errno) if e.errno else type(e).__name__
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


def sc(nr, *args):
    """A raw system call: ALLOWED (any fd it made is closed) or the errno name."""
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if rc == 0 and nr == 56:  # the child of a clone that should have been refused
        os._exit(0)
    if rc >= 0:
        if 2 < rc < 4096 and nr != 56:
            os.close(rc)
        return ALLOWED
    return name(ctypes.get_errno())


def buf(n=512):
    return ctypes.create_string_buffer(n)


def identity():
    caps = [libc.prctl(23, cap, 0, 0, 0) for cap in range(41)]  # PR_CAPBSET_READ
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "setuid0": attempt(lambda: os.setuid(0)), "setgid0": attempt(lambda: os.setgid(0)),
            "setgroups0": attempt(lambda: os.setgroups([0])), "bounding_caps": sum(c == 1 for c in caps),
            "no_new_privs": libc.prctl(39, 0, 0, 0, 0)}  # PR_GET_NO_NEW_PRIVS


def procfs():
    out = {"exists": [p for p in ("/proc", "/sys", "/etc", "/home", "/root", "/var", "/run", "/mnt", "/opt",
                                  "/boot", "/srv", "/work", "/dev/shm", "/dev/fd") if os.path.lexists(p)]}
    for p in ("/proc/self/mountinfo", "/proc/1/cmdline", "/proc/1/environ", "/proc/self/maps", "/proc/kcore",
              "/proc/kallsyms", "/sys/kernel/notes", "/sys/fs/cgroup/pids/tasks"):
        out["read " + p] = attempt(lambda: open(p, "rb").read(1))
    for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/pid_max", "/proc/sys/kernel/panic",
              "/proc/sys/vm/drop_caches", "/proc/sys/fs/file-max", "/proc/sysrq-trigger", "/proc/self/uid_map"):
        out["write " + p] = attempt(lambda: open(p, "w").close())
    out["mount proc"] = sc(165, b"proc", b"/tmp", b"proc", 0, 0)
    out["mount sysfs"] = sc(165, b"sysfs", b"/tmp", b"sysfs", 0, 0)
    return out


def devices():
    out = {"dev": sorted(os.listdir("/dev"))}
    for p in ("/dev/kvm", "/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/fuse", "/dev/net/tun",
              "/dev/vsock", "/dev/vhost-vsock", "/dev/tty", "/dev/console", "/dev/ptmx", "/dev/vda", "/dev/sda"):
        out[p] = attempt(lambda: open(p, "rb").close())
    out["mknod"] = attempt(lambda: os.mknod("/tmp/mem", stat.S_IFCHR | 0o600, os.makedev(1, 1)))
    out["mknod via syscall"] = sc(259, -100, b"/tmp/kvm", stat.S_IFCHR | 0o600, os.makedev(10, 232))
    return out


def host_paths(arg):
    import sysconfig
    markers, specific = arg["markers"], arg["specific"]
    strings = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.executable, os.getcwd(), os.uname().nodename,
               *[str(v) for v in sysconfig.get_config_vars().values()],
               *sys.path, *sys.argv, *os.environ.keys(), *os.environ.values(), *sysconfig.get_paths().values()]
    import types
    for m in list(sys.modules.values()):
        strings.append(getattr(m, "__file__", None) or "")
        for v in list(vars(m).values()):
            code = getattr(v, "__code__", None)
            if isinstance(code, types.CodeType):
                strings.append(code.co_filename)
    found = [s for s in strings if any(k in s for k in markers)]
    names = []
    for top, dirs, files in os.walk("/"):
        for n in dirs + files:
            p = os.path.join(top, n)
            if any(k in p for k in markers):
                names.append(p)
            try:
                if os.path.islink(p) and any(k in os.readlink(p) for k in markers):
                    names.append(p + " -> " + os.readlink(p))
            except OSError:
                pass
    # And what files say: every text file (the interpreter's own binaries and bytecode carry
    # its build prefix as bytes; see the README's threat model).
    contents = []
    for top, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/dev", "/tmp")]
        for n in files:
            p = os.path.join(top, n)
            if n.endswith(".pyc") or ".so" in n:
                continue
            try:
                with open(p, "rb") as f:
                    data = f.read(1 << 20)
            except OSError:
                continue
            if not data.startswith(b"\x7fELF") and any(k.encode() in data for k in specific):
                contents.append(p)
    return {"strings": found, "fs": names[:20], "contents": contents[:20], "hostname": os.uname().nodename}


def setuid_files():
    found = []
    for top, dirs, files in os.walk("/"):
        for n in files:
            try:
                st = os.lstat(os.path.join(top, n))
            except OSError:
                continue
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(os.path.join(top, n))
    open("/tmp/suid", "w").close()
    os.chmod("/tmp/suid", 0o4755)
    return {"setuid": found, "tmp_nosuid": bool(os.statvfs("/tmp").f_flag & os.ST_NOSUID)}


def signals():
    visible = [pid for pid in range(1, 4096) if attempt(lambda: os.kill(pid, 0)) == ALLOWED]
    # Pid 1 is bwrap's init: a signal from inside its namespace that it has no handler for
    # is dropped, so "sent" here must not mean "delivered" (we are still here to report).
    return {"visible": visible, "me": os.getpid(), "kill 1": attempt(lambda: os.kill(1, signal.SIGKILL)),
            "kill -1": attempt(lambda: os.kill(-1, signal.SIGCONT))}


def ptrace():
    return {"attach 1": sc(101, 16, 1, 0, 0), "traceme": sc(101, 0, 0, 0, 0), "seize 1": sc(101, 0x4206, 1, 0, 0),
            "process_vm_readv": sc(310, 1, 0, 0, 0, 0, 0), "process_vm_writev": sc(311, 1, 0, 0, 0, 0, 0),
            "kcmp": sc(312, 1, os.getpid(), 0, 0, 0), "pidfd_getfd": sc(438, 0, 0, 0),
            "process_madvise": sc(440, 0, 0, 0, 0, 0)}


def network(port):
    fams = {"AF_INET": (2, 1), "AF_INET6": (10, 1), "AF_INET udp": (2, 2), "AF_NETLINK": (16, 3),
            "AF_PACKET": (17, 3), "AF_VSOCK": (40, 1), "AF_ALG": (38, 5), "AF_BLUETOOTH": (31, 1),
            "AF_CAN": (29, 3), "AF_XDP": (44, 3), "AF_KEY": (15, 3), "AF_TIPC": (30, 5), "AF_RDS": (21, 5),
            "AF_APPLETALK": (5, 2), "AF_X25": (9, 5), "AF_QIPCRTR": (42, 2), "AF_SMC": (43, 1)}
    out = {k: attempt(lambda: socket.socket(f, t)) for k, (f, t) in fams.items()}
    out["AF_INET raw syscall"] = sc(41, 2, 1, 0)
    out["AF_INET high bits"] = sc(41, (1 << 32) | 2, 1, 0)
    out["AF_VSOCK raw syscall"] = sc(41, 40, 1, 0)
    out["socketpair AF_INET"] = sc(53, 2, 1, 0, buf(8))
    out["tcp to host"] = attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=1))
    out["dns"] = attempt(lambda: socket.getaddrinfo("pypi.org", 443))
    out["if_nameindex"] = attempt(lambda: socket.if_nameindex())
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out["abstract unix"] = attempt(lambda: s.connect("\0/tmp/.X11-unix/X0"))
    s.close()
    out["unix socketpair"] = attempt(lambda: socket.socketpair()[0])
    return out


def kernel():
    p = buf()
    out = {
        "io_uring_setup": sc(425, 8, p), "io_uring_enter": sc(426, 0, 0, 0, 0, 0, 0),
        "io_uring_register": sc(427, 0, 0, 0, 0), "bpf": sc(321, 0, p, 64), "perf_event_open": sc(298, p, 0, -1, -1, 0),
        "userfaultfd": sc(323, 0), "keyctl": sc(250, 0, -3, 0, 0, 0), "add_key": sc(248, b"user", b"x", b"y", 1, -2),
        "request_key": sc(249, b"user", b"x", 0, 0), "mount": sc(165, b"none", b"/tmp", b"tmpfs", 0, 0),
        "umount2": sc(166, b"/tmp", 2), "unshare user": sc(272, 0x10000000), "unshare net": sc(272, 0x40000000),
        "unshare ns": sc(272, 0x00020000), "setns": sc(308, 0, 0), "pivot_root": sc(155, b"/tmp", b"/tmp"),
        "chroot": sc(161, b"/tmp"), "open_by_handle_at": sc(304, -100, p, 0), "name_to_handle_at": sc(303, -100, b"/", p, p, 0),
        "init_module": sc(175, p, 16, b""), "finit_module": sc(313, 0, b"", 0), "kexec_load": sc(246, 0, 0, 0, 0),
        "fsopen": sc(430, b"tmpfs", 0), "open_tree": sc(428, -100, b"/tmp", 1), "move_mount": sc(429, -1, b"", -1, b"", 0),
        "memfd_secret": sc(447, 0), "swapon": sc(167, b"/tmp/x", 0), "syslog": sc(103, 3, p, 16),
        "iopl": sc(172, 3), "ioperm": sc(173, 0x80, 1, 1), "personality READ_IMPLIES_EXEC": sc(135, 0x0400000),
        "clone newuser": sc(56, 0x10000000 | 17, 0, 0, 0, 0), "clone newns": sc(56, 0x00020000 | 17, 0, 0, 0, 0),
        "clone newpid": sc(56, 0x20000000 | 17, 0, 0, 0, 0), "reboot": sc(169, 0xfee1dead, 672274793, 0x4321fedc, 0),
        "settimeofday": sc(164, p, 0), "clock_adjtime": sc(305, 0, p), "acct": sc(163, b"/tmp/acct"),
        "fanotify_init": sc(300, 0, 0), "lookup_dcookie": sc(212, 0, p, 16), "quotactl": sc(179, 0, b"/", 0, p),
        "sethostname": sc(170, b"evil", 4), "vhangup": sc(153), "modify_ldt": sc(154, 0, p, 16),
    }
    out["clone3"] = sc(435, p, 88)
    out["unknown 1000"] = sc(1000)
    pid = os.fork()
    if pid == 0:  # an x32-ABI call: not this filter's architecture, so the process is killed
        libc.syscall(ctypes.c_long(0x40000000 | 39))
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    out["x32 getpid"] = "killed by %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit %d" % (status >> 8)
    pid = os.fork()  # plain fork still works
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitpid(pid, 0)[1] >> 8
    return out


def fds():
    out = []
    for fd in range(0, 1024):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        kind = ("chr %d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode)
                else "sock" if stat.S_ISSOCK(st.st_mode) else "reg %d" % st.st_size if stat.S_ISREG(st.st_mode)
                else "fifo" if stat.S_ISFIFO(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other")
        out.append([fd, kind])
    return {"fds": out, "channel": int(sys.argv[-1]), "reopen": attempt(lambda: os.open("/dev/fd/3", os.O_RDWR))}


def shm_regions():
    out = {}
    for fd in range(3, 1024):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        size = st.st_size
        mode = "ro" if os.O_ACCMODE & __import__("fcntl").fcntl(fd, 3) == os.O_RDONLY else "rw"  # F_GETFL
        r = {"mode": mode, "size": size}
        r["write"] = attempt(lambda: os.pwrite(fd, b"x", 64))
        r["mmap shared writable"] = attempt(lambda: mmap.mmap(fd, size, prot=mmap.PROT_READ | mmap.PROT_WRITE).close())
        r["shrink"] = attempt(lambda: os.ftruncate(fd, 0))
        r["grow"] = attempt(lambda: os.ftruncate(fd, size * 2))
        r["fallocate"] = attempt(lambda: os.posix_fallocate(fd, 0, size * 4))
        r["punch hole"] = sc(285, fd, 3, 0, size)  # FALLOC_FL_PUNCH_HOLE | KEEP_SIZE
        r["unseal"] = attempt(lambda: __import__("fcntl").fcntl(fd, 1033, 0))  # F_ADD_SEALS 0: still sealable?
        out[str(fd)] = r
        if r["shrink"] == ALLOWED and mode == "rw":
            # Make the region shorter than the host's mapping (the probes above grew it back),
            # then hand the host a reference into it: its next read there is a SIGBUS.
            os.ftruncate(fd, 0)
            import reflow
            rid = reflow._emit.__self__.current
            frame = {"jsonrpc": "2.0", "method": "output", "params": {"id": rid, "port": "out", "message": {
                "type": "bytes", "$shm": [80, 16, 1, 128]}}}
            os.write(int(sys.argv[-1]), (__import__("json").dumps(frame) + "\n").encode())
    return out


def files():
    out = {}
    for p in ("/evil", "/usr/local/evil", "/usr/local/lib/python3.11/os.py", "/reflow/evil", "/reflow/reflow_worker.py",
              "/lib/evil", "/dev/evil", "/usr/local/bin/python3", "/usr/evil"):
        out[p] = attempt(lambda: open(p, "ab").close())
    out["/tmp"] = attempt(lambda: open("/tmp/ok", "wb").write(b"ok"))
    out["rename into /usr"] = attempt(lambda: os.rename("/tmp/ok", "/usr/ok"))
    out["link /usr file into /tmp"] = attempt(lambda: os.link("/usr/local/bin/python3", "/tmp/py"))

    def fill():
        with open("/tmp/fill", "wb") as f:
            for _ in range(200):
                f.write(b"x" * 2**20)
    out["fill /tmp with 200 MB"] = attempt(fill)
    os.unlink("/tmp/fill") if os.path.exists("/tmp/fill") else None
    return out


def limits():
    import resource
    names = ("RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_AS")
    out = {n: list(resource.getrlimit(getattr(resource, n))) for n in names}
    out["raise NPROC"] = attempt(lambda: resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6)))
    return out


def crash(how):
    if how == "json":
        import json
        json.loads("{")
    if how == "open":
        open("/no/such/file")
    if how == "import":
        import no_such_module  # noqa: F401
    raise RuntimeError("boom")


@actor(name="ProbePy", inports=["probe", "arg"], outports=["out"])
def probe(context):
    what, arg = context.get_input("probe"), context.get_input("arg")
    if what == "crash":
        crash(arg)
    fn = {"identity": identity, "procfs": procfs, "devices": devices, "setuid_files": setuid_files,
          "signals": signals, "ptrace": ptrace, "kernel": kernel, "fds": fds, "shm": shm_regions,
          "files": files, "limits": limits}.get(what)
    if fn is not None:
        return {"out": fn()}
    if what == "host_paths":
        return {"out": host_paths(arg)}
    if what == "network":
        return {"out": network(arg)}
    if what == "big":
        return {"out": b"y" * arg}
    return {"out": None}
'''

JS = r'''
const fs = require('fs');
const os = require('os');
const net = require('net');

function attempt(fn) {
  try { fn(); return 'ALLOWED'; } catch (e) { return e.code || e.name; }
}

function settle(start) {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve('TIMEOUT'), 2000);
    try {
      start((err) => { clearTimeout(t); resolve(err ? (err.code || err.name) : 'ALLOWED'); });
    } catch (e) { clearTimeout(t); resolve(e.code || e.name); }
  });
}

function walk(dir, markers, found) {
  let entries;
  try { entries = fs.readdirSync(dir, { withFileTypes: true }); } catch (_) { return; }
  for (const e of entries) {
    const p = (dir === '/' ? '' : dir) + '/' + e.name;
    if (markers.some((m) => p.includes(m))) found.push(p);
    if (e.isSymbolicLink()) {
      try { const t = fs.readlinkSync(p); if (markers.some((m) => t.includes(m))) found.push(p + ' -> ' + t); } catch (_) {}
    } else if (e.isDirectory()) walk(p, markers, found);
  }
}

const probes = {
  identity: () => ({ uid: process.getuid(), gid: process.getgid(), groups: process.getgroups(),
                     setuid0: attempt(() => process.setuid(0)), setgid0: attempt(() => process.setgid(0)) }),
  procfs: () => {
    const out = { exists: ['/proc', '/sys', '/etc', '/home', '/root', '/var', '/run', '/work', '/dev/shm']
      .filter((p) => { try { fs.lstatSync(p); return true; } catch (_) { return false; } }) };
    for (const p of ['/proc/self/mountinfo', '/proc/1/cmdline', '/proc/self/maps', '/sys/kernel/notes'])
      out['read ' + p] = attempt(() => fs.readFileSync(p));
    for (const p of ['/proc/sys/kernel/core_pattern', '/proc/sys/kernel/pid_max', '/proc/sys/vm/drop_caches'])
      out['write ' + p] = attempt(() => fs.closeSync(fs.openSync(p, 'w')));
    return out;
  },
  host_paths: ({ markers, specific }) => {
    const strings = [process.execPath, process.cwd(), os.homedir(), os.tmpdir(), os.hostname(), ...process.argv,
                     ...process.execArgv, ...Object.keys(process.env), ...Object.values(process.env),
                     ...(require.resolve.paths('x') || []), ...require('module').globalPaths,
                     JSON.stringify(os.networkInterfaces()), JSON.stringify(process.memoryUsage())];
    const found = [];
    walk('/', markers, found);
    const contents = fs.readdirSync('/reflow').filter((n) => {
      try { const t = fs.readFileSync('/reflow/' + n, 'latin1'); return specific.some((m) => t.includes(m)); } catch (_) { return false; }
    });
    return { strings: strings.filter((s) => markers.some((m) => String(s).includes(m))), fs: found.slice(0, 20), contents,
             hostname: os.hostname(), interfaces: Object.keys(os.networkInterfaces()),
             memory: process.memoryUsage().heapUsed > 0 && process.memoryUsage.rss() > 0, cpus: os.cpus().length };
  },
  signals: () => {
    const visible = [];
    for (let pid = 1; pid < 4096; pid++) { if (attempt(() => process.kill(pid, 0)) === 'ALLOWED') visible.push(pid); }
    // (Node's own threads answer signal 0 by their thread ids too: only pid 1 is not us.)
    return { visible, me: process.pid, 'kill 1': attempt(() => process.kill(1, 'SIGKILL')) };
  },
  network: async (port) => ({
    tcp: await settle((done) => { const s = net.connect(port, '127.0.0.1'); s.on('connect', () => { s.destroy(); done(); }); s.on('error', done); }),
    listen: await settle((done) => { const srv = net.createServer(); srv.on('error', done); srv.listen(0, '127.0.0.1', () => { srv.close(); done(); }); }),
    udp: await settle((done) => { const s = require('dgram').createSocket('udp4'); s.on('error', done); s.bind(0, () => { s.close(); done(); }); }),
    dns: await settle((done) => require('dns').lookup('pypi.org', (err) => done(err))),
    interfaces: Object.keys(os.networkInterfaces()),
  }),
  fds: () => {
    const out = [];
    for (let fd = 0; fd < 1024; fd++) {
      try {
        const st = fs.fstatSync(fd);
        out.push([fd, st.isCharacterDevice() ? 'chr' : st.isSocket() ? 'sock' : st.isFile() ? 'reg' : st.isFIFO() ? 'fifo' : 'other']);
      } catch (_) {}
    }
    return { fds: out, channel: Number(process.argv[process.argv.length - 1]) };
  },
  files: () => {
    const out = {};
    for (const p of ['/evil', '/usr/evil', '/usr/bin/node', '/reflow/evil', '/reflow/reflow_worker.js', '/lib/evil', '/dev/evil'])
      out[p] = attempt(() => fs.closeSync(fs.openSync(p, 'a')));
    out['/tmp'] = attempt(() => fs.writeFileSync('/tmp/ok', 'ok'));
    out['fill /tmp with 200 MB'] = attempt(() => {
      const fd = fs.openSync('/tmp/fill', 'w');
      const mb = Buffer.alloc(2 ** 20, 120);
      try { for (let i = 0; i < 200; i++) fs.writeSync(fd, mb); } finally { fs.closeSync(fd); fs.unlinkSync('/tmp/fill'); }
    });
    return out;
  },
  crash: (how) => {
    if (how === 'json') JSON.parse('{');
    if (how === 'open') fs.readFileSync('/no/such/file');
    if (how === 'import') require('no-such-module');
    throw new Error('boom');
  },
};

module.exports = actor({ name: 'ProbeJs', inports: ['probe', 'arg'], outports: ['out'] }, async (ctx) => {
  const fn = probes[ctx.getInput('probe')];
  return { out: fn ? await fn(ctx.getInput('arg')) : null };
});
'''

OTHER = '''
from reflow import actor

@actor(name="Bystander", inports=["x"], outports=["y"])
def other(context):
    return {"y": context.get_input("x")}
'''

ACTORS = {"python": "ProbePy", "javascript": "ProbeJs"}
BOTH = pytest.mark.parametrize("runtime", ["python", "javascript"])


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """One real host for the whole module (probes are actor calls; a probe that ends its
    sandbox gets a fresh one from supervision)."""
    cfg = write_workspace(tmp_path_factory.mktemp("hostile_sandbox"),
                          {"probe.actor.py": PY, "probe.actor.js": JS, "bystander.actor.py": OTHER},
                          "supervision: {max_restarts: 100, max_seconds: 60}\n")
    h = HostProcess(cfg)
    trio.run(h.start)
    yield h
    trio.run(h.stop)


@pytest.fixture
async def client(host):
    async with open_client(host.url) as c:
        yield c
        # Whatever the probe did, the host still serves, and so does an actor beside it.
        assert host.proc.poll() is None, f"the host died:\n{host.output()[-3000:]}"
        assert (await c.call("Bystander", {"x": 7}))["outputs"]["y"]["value"] == 7


async def probe(c, runtime, what, arg=None):
    return (await c.call(ACTORS[runtime], {"probe": what, "arg": arg}, timeout=60))["outputs"]["out"]["value"]


def host_markers(host) -> list[str]:
    """Strings that name the host's layout: none may appear in anything a sandbox can read."""
    return sorted({str(ROOT), str(host.config.parent), str(host.config.parent.parent), "/root/", "/work/",
                   "/home/", ".pyenv", ".venv", "sandbox-libs", "/var/cache", "site-packages/supervisor"})


# What a broken probe raises (a typo, a wrong ctypes argument, an API this runtime lacks): it
# says nothing about the sandbox, so it must not pass for a refusal.
PROBE_BUGS = frozenset({"TypeError", "NameError", "AttributeError", "ArgumentError", "ReferenceError",
                        "SyntaxError", "ImportError", "ModuleNotFoundError", "KeyError", "IndexError"})


def denied(results: dict, *, allowed: tuple[str, ...] = ()) -> dict:
    """The attacks that were not refused (or whose probe broke before it could try)."""
    return {k: v for k, v in results.items() if (v == "ALLOWED" or v in PROBE_BUGS) and k not in allowed}


# -- who the sandbox is on the host ---------------------------------------------------------------

def sandbox_processes(host) -> list[int]:
    """Host pids of every sandbox process (bwrap and what runs inside), not Redis or the host."""
    # By what they run: a worker being spawned passes through `sh` and `setpriv` (root) first.
    starts = (shutil.which("bwrap") or "/usr/bin/bwrap", "/usr/local/bin/python3 ", "/usr/bin/node ")
    return [pid for pid in descendants(host.proc.pid) if cmdline(pid).startswith(starts)]


def uids(pid: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("Uid:"))
    return tuple(int(x) for x in line.split()[1:])


async def test_every_sandbox_process_is_an_unprivileged_host_uid(host, client):
    await probe(client, "python", "none")
    await probe(client, "javascript", "none")
    pids = sandbox_processes(host)
    assert len(pids) >= 4, [cmdline(p) for p in pids]  # bwrap, its init and the interpreter, per runtime
    seen = {pid: uids(pid) for pid in pids}
    if drops_privileges():
        assert all(set(u) == {SANDBOX_UID} for u in seen.values()), seen
        inner = [pid for pid in pids if not cmdline(pid).startswith(shutil.which("bwrap") or "/usr/bin/bwrap")]
        for pid in inner:  # uid 1000 inside is SANDBOX_UID outside, and nothing else is mapped
            maps = open(f"/proc/{pid}/uid_map").read().split()
            assert maps in (["0", str(SANDBOX_UID), "1"], [str(SANDBOX_INNER_ID), str(SANDBOX_UID), "1"]), maps
    else:
        assert all(0 not in u for u in seen.values()), seen


@BOTH
async def test_no_root_no_capabilities_no_way_back(client, runtime):
    res = await probe(client, runtime, "identity")
    # (Node lists the effective gid among the groups.)
    assert res["uid"] == SANDBOX_INNER_ID and res["gid"] == SANDBOX_INNER_ID and set(res["groups"]) <= {res["gid"]}, res
    assert res["setuid0"] != "ALLOWED" and res["setgid0"] != "ALLOWED", res
    if runtime == "python":
        assert res["setgroups0"] != "ALLOWED" and res["bounding_caps"] == 0 and res["no_new_privs"] == 1, res


async def test_limits_bind_a_non_root_uid_and_cannot_be_raised(client):
    res = await probe(client, "python", "limits")
    # RLIMIT_NPROC binds now that the sandbox is not uid 0 (counted in its own user namespace).
    assert res.pop("raise NPROC") != "ALLOWED"
    assert res["RLIMIT_CORE"] == [0, 0] and 0 < res["RLIMIT_NPROC"][1] <= 64, res
    assert all(0 <= hard < 2**62 for _, hard in res.values()), res


# -- what the sandbox can see -----------------------------------------------------------------------

@BOTH
async def test_no_procfs_no_sysfs_and_no_host_tree(client, runtime):
    res = await probe(client, runtime, "procfs")
    assert res.pop("exists") == [], "procfs, sysfs or a host directory is mounted"
    assert denied(res) == {}, res


async def test_only_null_zero_and_urandom_in_dev(client):
    res = await probe(client, "python", "devices")
    assert res.pop("dev") == ["null", "urandom", "zero"]
    assert denied(res) == {}, res


@BOTH
async def test_nothing_the_sandbox_can_read_names_a_host_path(host, client, runtime):
    # Names anywhere; file contents for the host's own paths (the stdlib's tests mention /home/).
    specific = sorted({str(ROOT), str(host.config.parent.parent), os.path.realpath(sys.base_prefix),
                       os.path.realpath(sys.prefix), "/var/cache/reflow", str(Path.home() / ".cache")})
    res = await probe(client, runtime, "host_paths", {"markers": host_markers(host), "specific": specific})
    assert res["strings"] == [] and res["fs"] == [] and res["contents"] == [], res
    assert res["hostname"] == "sandbox"
    if runtime == "javascript":
        assert res["memory"] is True and res["cpus"] >= 1  # process.memoryUsage(), os.cpus() without /proc
        assert res["interfaces"] in ([], ["lo"])


@BOTH
@pytest.mark.parametrize("how", ["json", "open", "import", "raise"])
async def test_error_data_names_no_host_path(host, client, runtime, how):
    with pytest.raises(RpcError) as err:
        await probe(client, runtime, "crash", how)
    assert err.value.code == -32002
    text = orjson.dumps({"message": str(err.value), "data": err.value.data}).decode()
    assert not [m for m in host_markers(host) if m in text], text


async def test_no_setuid_files_and_tmp_is_nosuid(client):
    res = await probe(client, "python", "setuid_files")
    assert res == {"setuid": [], "tmp_nosuid": True}


# -- what the sandbox can reach ---------------------------------------------------------------------

@BOTH
async def test_signals_reach_only_the_sandbox_itself(client, runtime):
    res = await probe(client, runtime, "signals")
    # Its own pid namespace: bwrap's init (pid 1, which ignores signals from inside), itself
    # (and, for Node, its threads): no host pid, not even a low one.
    assert res["me"] == 2 and 1 in res["visible"], res
    assert max(res["visible"]) < (3 if runtime == "python" else 64), res


async def test_ptrace_and_cross_process_calls_are_refused(client):
    res = await probe(client, "python", "ptrace")
    assert denied(res) == {}, res


async def test_only_unix_sockets(host, client):
    port = int(host.url.rsplit(":", 1)[1].strip("/"))
    res = await probe(client, "python", "network", port)
    assert res.pop("unix socketpair") == "ALLOWED"
    assert denied(res) == {}, res
    families = {k: v for k, v in res.items() if k.startswith("AF_") and "syscall" not in k and "bits" not in k}
    assert set(families.values()) == {"EAFNOSUPPORT"}, families
    assert res["AF_VSOCK raw syscall"] == "EAFNOSUPPORT" and res["AF_INET high bits"] != "ALLOWED"


async def test_no_network_from_node(host, client):
    port = int(host.url.rsplit(":", 1)[1].strip("/"))
    res = await probe(client, "javascript", "network", port)
    assert res.pop("interfaces") in ([], ["lo"])
    assert denied(res) == {} and "TIMEOUT" not in res.values(), res


async def test_the_seccomp_allow_list_refuses_kernel_surfaces(client):
    res = await probe(client, "python", "kernel")
    assert res.pop("fork") == 7
    assert res.pop("clone3") == "ENOSYS" and res.pop("unknown 1000") == "ENOSYS"
    assert res.pop("x32 getpid") == f"killed by {signal.SIGSYS.value}"
    assert denied(res) == {}, res
    for name in ("io_uring_setup", "bpf", "perf_event_open", "userfaultfd", "keyctl", "mount", "unshare user",
                 "setns", "clone newuser", "open_by_handle_at"):
        assert res[name] == "EPERM", (name, res[name])


# -- what the sandbox holds -------------------------------------------------------------------------

@BOTH
async def test_only_the_channel_and_shared_memory_are_open(client, runtime):
    res = await probe(client, runtime, "fds")
    fds = dict(res["fds"])
    kinds = sorted(k.split()[0] for fd, k in fds.items() if fd > 2)
    if runtime == "python":
        assert [fds[0], fds[1], fds[2]] == ["chr 1:3"] * 3, fds  # /dev/null
        assert fds[res["channel"]] == "sock" and kinds == ["reg", "reg", "sock"], fds  # the channel, in, out
        assert res["reopen"] != "ALLOWED"
    else:
        assert fds[res["channel"]] == "sock" and fds[0] == fds[1] == fds[2] == "chr", fds
        # Node's own: its event loop (epoll, eventfd, signal pipe), nothing from the host.
        assert "reg" not in kinds and kinds.count("sock") == 1, fds


async def test_shared_memory_rings_cannot_be_written_resized_or_unsealed(host, client):
    res = await probe(client, "python", "shm")
    assert {r["mode"] for r in res.values()} == {"ro", "rw"}, res  # the host's `in`, the worker's `out`
    for fd, r in res.items():
        assert r["shrink"] != "ALLOWED" and r["grow"] != "ALLOWED" and r["fallocate"] != "ALLOWED", (fd, r)
        assert r["unseal"] != "ALLOWED", (fd, r)
        if r["mode"] == "ro":
            assert r["write"] != "ALLOWED" and r["mmap shared writable"] != "ALLOWED", (fd, r)
            assert r["punch hole"] != "ALLOWED", (fd, r)
    # And the rings still carry bytes (out: above the threshold, this reply goes through shm).
    await probe(client, "python", "big", 256 * 1024)


@BOTH
async def test_nothing_outside_tmp_is_writable_and_tmp_is_capped(client, runtime):
    res = await probe(client, runtime, "files")
    assert res.pop("/tmp") == "ALLOWED"
    assert res.pop("fill /tmp with 200 MB") in ("ENOSPC", "EFBIG", "ERR_FS_FILE_TOO_LARGE"), res
    assert denied(res) == {}, res
