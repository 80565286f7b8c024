"""Discovery's I/O: reading script files and walking a workspace for them.

The metadata itself is read by the pure :mod:`supervisor.core.discovery` (never by
running the script); this module only opens, stats and lists files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .core.discovery import (ComponentSpec, Discovery, ScriptError, ScriptProblem, _glob_regex, _literal_prefix,
                             extract_source, is_script)

__all__ = ["extract", "discover"]


def extract(path: Path, text: str | None = None) -> ComponentSpec:
    """Read one script's actor metadata without running it.

    ``text`` is the file's content when the caller has it already (the file is then
    only stat-ed for its mtime, and may not exist). The spec's ``file`` is absolute.

    Raises:
        ScriptError: the file is missing, unreadable or not ``.py``/``.js``; it has a
            syntax error in what we read, no actor or more than one, or metadata that
            is not literal, unknown or of the wrong type. ``.problem`` has the file
            and line (0 when the problem is the file itself).
    """
    return _extract(Path(path).expanduser().resolve(), text)


def _extract(path: Path, text: str | None) -> ComponentSpec:
    """``extract`` for a path that is already absolute and resolved."""
    if not is_script(path):
        raise ScriptError(path, 0, "a script actor is a .py or .js file")
    if text is None:
        try:
            with open(path, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime_ns
                data = f.read()
        except FileNotFoundError:
            raise ScriptError(path, 0, "no such script") from None
        except OSError as exc:
            raise ScriptError(path, 0, f"cannot read the script: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ScriptError(path, line, f"the script is not UTF-8 text ({exc.reason})") from None
    else:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = 0
    return extract_source(path, text, mtime)


def _walk(root: Path, patterns: Sequence[str], excluded: Sequence[str]) -> list[str]:
    """Absolute paths of the files under ``root`` that match; symlinked directories are not followed."""
    wanted = [_glob_regex(p, anywhere=True) for p in patterns]
    skip = [_glob_regex(p, anywhere=True) for p in excluded]
    prefixes = [_literal_prefix(p) for p in patterns]
    found: list[str] = []
    stack = [(str(root), "")]
    while stack:
        dirpath, base = stack.pop()
        try:
            entries = list(os.scandir(dirpath))
        except OSError:
            continue                                   # unreadable or vanished: nothing to find there
        for e in entries:
            rel = base + e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                # Excluding a directory excludes what is under it; `**/x/**` matches "x/" too.
                if any(s.fullmatch(rel) or s.fullmatch(rel + "/") for s in skip):
                    continue
                parts = rel.split("/")
                if all(pre is not None and parts[:len(pre)] != list(pre[:len(parts)]) for pre in prefixes):
                    continue                           # no pattern can match below here
                stack.append((e.path, rel + "/"))
            elif any(w.fullmatch(rel) for w in wanted) and not any(s.fullmatch(rel) for s in skip):
                found.append(os.path.realpath(e.path) if e.is_symlink() else e.path)
    return found


def discover(root: Path, patterns: Sequence[str], excluded: Sequence[str] = (), scripts: Sequence[Path | str] = (),
             *, discover_scripts: bool = True) -> Discovery:
    """Find and read every script actor under ``root`` matching ``patterns``, plus ``scripts``.

    ``patterns`` and ``excluded`` are root-relative posix globs (see ``_glob_regex``):
    ``**/*.actor.py`` matches at any depth including the root; ``**/node_modules/**``
    excludes everything inside any ``node_modules``. Symlinked directories are not
    followed. ``scripts`` (relative to the current directory, or absolute) are read
    even when excluded or not matching. Files are deduplicated by resolved path and
    read in path order.

    Never raises for a bad script: a missing, unreadable or broken file, or a second
    file declaring an actor name already taken, becomes a :class:`ScriptProblem`.
    """
    root = Path(root).expanduser().resolve()
    problems: list[ScriptProblem] = []
    paths: set[Path] = set()
    if discover_scripts:
        if root.is_dir():
            paths.update(map(Path, _walk(root, patterns, excluded)))
        else:
            problems.append(ScriptProblem(root, 0, "the workspace root is not a directory"))
    for s in scripts:
        p = Path(s).expanduser().resolve()
        if not p.exists():
            problems.append(ScriptProblem(p, 0, "no such script"))
        elif not p.is_file():
            problems.append(ScriptProblem(p, 0, "not a file (a script is one .py or .js file)"))
        else:
            paths.add(p)
    components: list[ComponentSpec] = []
    first: dict[str, ComponentSpec] = {}
    for p in sorted(paths):
        try:
            spec = _extract(p, None)
        except ScriptError as exc:
            problems.append(exc.problem)
            continue
        other = first.get(spec.name)
        if other is not None:
            problems.append(ScriptProblem(p, spec.line, f"duplicate actor name {spec.name!r} "
                                                        f"(first defined at {other.file}:{other.line})"))
            continue
        first[spec.name] = spec
        components.append(spec)
    return Discovery(tuple(components), tuple(problems))
