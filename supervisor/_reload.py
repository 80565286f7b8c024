"""Hot reload: what an edit to the workspace's scripts changes, and the watcher.

``plan_reload`` is pure: given the components running now and a fresh
discovery, it says which to start, which to restart on new code, which to stop,
and which to keep on their previous code because their file no longer reads
(a broken edit must not take a working actor down). ``watch_scripts`` is the
thin trio shell: watchfiles (anyio, so it runs under trio as is) reports file
changes, the workspace is rediscovered in a thread, and the host applies the
plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from .core.discovery import ComponentSpec, Discovery

__all__ = ["ReloadPlan", "plan_reload", "watch_scripts"]

log = logging.getLogger("supervisor.reload")

_SUFFIXES = (".py", ".js", ".mjs", ".cjs")


@attrs.frozen
class ReloadPlan:
    start: tuple[ComponentSpec, ...] = ()
    replace: tuple[ComponentSpec, ...] = ()      # same name, new code or metadata
    stop: tuple[ComponentSpec, ...] = ()
    kept: tuple[ComponentSpec, ...] = ()         # still on the old code: their file is broken now
    components: tuple[ComponentSpec, ...] = ()   # what runs once the plan is applied

    @property
    def empty(self) -> bool:
        return not (self.start or self.replace or self.stop)


def plan_reload(running: Iterable[ComponentSpec], found: Discovery,
                exists: Callable[[Path], bool] = Path.exists) -> ReloadPlan:
    old = {c.name: c for c in running}
    new = {c.name: c for c in found.components}
    broken = {p.file for p in found.problems}
    start, replace, stop, kept = [], [], [], []
    result = dict(new)
    for name, comp in old.items():
        if name in new:
            continue
        # Its file is there but no longer reads (syntax error, duplicate name…): keep it.
        if comp.file in broken and exists(comp.file):
            kept.append(comp)
            result[name] = comp
        else:  # deleted, or the file now declares another actor
            stop.append(comp)
    for name, comp in new.items():
        if name not in old:
            start.append(comp)
        elif _differs(comp, old[name]):
            replace.append(comp)
    return ReloadPlan(tuple(start), tuple(replace), tuple(stop), tuple(kept), tuple(result.values()))


def _differs(a: ComponentSpec, b: ComponentSpec) -> bool:
    # mtime alone is not a change (a `touch`, an editor's save without edits).
    return attrs.evolve(a, mtime_ns=0) != attrs.evolve(b, mtime_ns=0)


def _is_script(change: Any, path: str) -> bool:
    return path.endswith(_SUFFIXES) and "/.reflow/" not in path and "/node_modules/" not in path


async def watch_scripts(host: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Apply script edits under the workspace root (and next to extra scripts) until cancelled."""
    import watchfiles

    # At debug level watchfiles logs every change it filters out, including the host's own
    # log file when it lies in the workspace: each line would cause the next.
    logging.getLogger("watchfiles").setLevel(max(logging.INFO, logging.getLogger("watchfiles").level))
    ws = host.config.workspace
    roots = {str(ws.root)} | {str(Path(s).expanduser().resolve().parent) for s in (*ws.scripts, *host.extra_scripts)}
    roots = {r for r in roots if Path(r).is_dir()}
    task_status.started()
    if not roots:
        return
    first = True
    # rust_timeout makes the watcher yield an empty set once it is surely running: that
    # first yield rediscovers once, so an edit made while it was starting is not missed.
    async for changes in watchfiles.awatch(*sorted(roots), watch_filter=_is_script, debounce=300, step=50,
                                           rust_timeout=500, yield_on_timeout=True, recursive=True):
        if not changes and not first:
            continue
        if first:
            first = False
            host.watching.set()
        if changes:
            log.info("scripts changed: %s", ", ".join(sorted({Path(p).name for _, p in changes})))
        found = await trio.to_thread.run_sync(host.rediscover)
        await host.apply_reload(found)
