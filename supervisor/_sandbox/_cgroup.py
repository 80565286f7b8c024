"""cgroup v1 limits for sandboxes, where the host may write the hierarchy.

Where ``/sys/fs/cgroup/{pids,memory,cpu}`` are writable (root without a
systemd-owned hierarchy, as on this machine), each worker gets its own group:
``pids.max`` (a fork bomb stops at the cap; Node cannot set RLIMIT_NPROC on
itself, so for it this is the only cap), ``memory.limit_in_bytes`` (a backstop above
the RLIMIT_AS the runtime sets itself) and a CFS quota for the ``cpu``
fraction. The worker joins its groups before ``bwrap`` runs, through a
``sh -c 'echo 0 > …/tasks; exec bwrap …'`` prefix (on a root host ``exec
setpriv … bwrap …``: the joins need root, the sandbox must not have it), so
nothing in the sandbox ever runs outside them. Where a controller is not writable, the
backend says so once at startup and relies on rlimits.

Why ``echo 0 > tasks`` and not ``echo $$ > cgroup.procs``: moving a whole
thread group write-locks the kernel's global ``cgroup_threadgroup_rwsem``,
which waits out an RCU grace period on every spawn, a large share of a cold
start. Moving the *current, single* thread (``0`` written
to ``tasks``) skips that lock (Linux ≥ 5.17; older kernels just take it), and
for the single-threaded ``sh`` it moves the whole process: what it then
``exec``s and forks stays inside.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
from pathlib import Path

__all__ = ["Cgroups"]

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory", "cpu")
_ids = itertools.count(1)


class Cgroups:
    def __init__(self, available: dict[str, Path]):
        self.available = available  # controller -> this host's parent group

    @classmethod
    def probe(cls) -> Cgroups:
        """Create this host's parent groups where possible; clean up groups of dead hosts."""
        available: dict[str, Path] = {}
        for ctrl in CONTROLLERS:
            base = ROOT / ctrl
            if not base.is_dir():
                continue
            for stale in base.glob("reflow-*"):
                with contextlib.suppress(ValueError, OSError):
                    pid = int(stale.name.split("-", 1)[1])
                    if not Path(f"/proc/{pid}").exists():
                        for child in stale.iterdir():
                            if child.is_dir():
                                _kill_members(child)
                                child.rmdir()
                        stale.rmdir()
            mine = base / f"reflow-{os.getpid()}"
            try:
                mine.mkdir(exist_ok=True)
                (mine / "cgroup.procs").stat()
                (mine / "tasks").stat()
            except OSError:
                continue
            available[ctrl] = mine
        return cls(available)

    def missing(self) -> tuple[str, ...]:
        what = {"pids": "process count (pids.max)", "memory": "memory hard cap (memory.limit_in_bytes)",
                "cpu": "cpu share (cpu.cfs_quota_us)"}
        return tuple(what[c] for c in CONTROLLERS if c not in self.available)

    def create(self, *, pids: int, memory: int, cpu: float) -> tuple[list[Path], str]:
        """Make one worker's groups; returns them and the shell prefix that joins them."""
        name = f"w{next(_ids)}"
        groups: list[Path] = []
        for ctrl, parent in self.available.items():
            g = parent / name
            try:
                g.mkdir()
                if ctrl == "pids":
                    (g / "pids.max").write_text(str(pids))
                elif ctrl == "memory":
                    # Above the runtime's own RLIMIT_AS, so a script gets MemoryError first.
                    (g / "memory.limit_in_bytes").write_text(str(memory + 64 * 2**20))
                    with contextlib.suppress(OSError):
                        (g / "memory.memsw.limit_in_bytes").write_text(str(memory + 64 * 2**20))
                elif ctrl == "cpu" and cpu > 0:
                    (g / "cpu.cfs_period_us").write_text("100000")
                    (g / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu * 100000))))
            except OSError:
                with contextlib.suppress(OSError):
                    g.rmdir()
                continue
            groups.append(g)
        # `echo` is a builtin, so the task written as 0 is the shell itself (see the module doc).
        joins = "; ".join(f"echo 0 > {shlex.quote(str(g / 'tasks'))}" for g in groups)
        return groups, joins

    @staticmethod
    def remove(groups: list[Path]) -> None:
        """Remove a reaped worker's groups, killing anything of it still inside first: if
        bwrap's outer process dies before its pid-namespace init has armed its death
        signal, that init lingers, and its group is the one place that still knows it."""
        for g in groups:
            _kill_members(g)
            with contextlib.suppress(OSError):
                g.rmdir()

    def close(self) -> None:
        for parent in self.available.values():
            with contextlib.suppress(OSError):
                for child in parent.iterdir():
                    if child.is_dir():
                        _kill_members(child)
                        with contextlib.suppress(OSError):
                            child.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()


def _kill_members(group: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)
