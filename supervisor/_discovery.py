"""Static discovery of script actors: metadata is read, never executed.

Python: the ``@actor(...)`` call is read from the AST (``ast.literal_eval`` on
each argument). JavaScript: the ``@actor({...})`` / ``actor({...}, fn)`` object
literal is located with a small scanner and parsed as JSON5. The scanner is
hand-written because no maintained Python JavaScript parser gives the literal's
span and line cheaply; it only needs to skip strings, template literals and
comments while matching braces.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import json5

from ._units import parse_duration, parse_size

__all__ = ["ComponentSpec", "ScriptProblem", "ScriptError", "Discovery", "extract", "discover"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_KEYS = {
    "name": "name", "inports": "inports", "outports": "outports",
    "await_all_inports": "await_all_inports", "awaitAllInports": "await_all_inports",
    "version": "version", "description": "description", "tags": "tags", "category": "category",
    "config_schema": "config_schema", "configSchema": "config_schema", "memory": "memory", "timeout": "timeout",
    "state_backend": "state_backend", "stateBackend": "state_backend",
}
_POSITIONAL = ("name", "inports", "outports")


@attrs.frozen
class ComponentSpec:
    name: str
    runtime: str
    file: Path
    line: int
    source: str
    entry: str | None
    inports: tuple[str, ...]
    outports: tuple[str, ...]
    dynamic_ports: bool = False
    await_all_inports: bool = False
    version: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    category: str | None = None
    config_schema: dict | None = None
    memory: int | None = None
    timeout: float | None = None
    state_backend: str | None = None
    mtime_ns: int = 0


@attrs.frozen
class ScriptProblem:
    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ScriptError(Exception):
    def __init__(self, file: Path, line: int, message: str):
        self.problem = ScriptProblem(file, line, message)
        super().__init__(str(self.problem))


@attrs.frozen
class Discovery:
    components: tuple[ComponentSpec, ...]
    problems: tuple[ScriptProblem, ...]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".actor.py", ".actor.js", ".py", ".js", ".mjs", ".cjs"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _meta(path: Path, line: int, raw: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise @actor arguments (shared by both languages)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        field = _KEYS.get(key)
        if field is None:
            raise ScriptError(path, line, f"unknown @actor argument {key!r} (known: {', '.join(sorted(set(_KEYS)))})")
        out[field] = value
    name = out.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScriptError(path, line, f"@actor name must be an identifier-like string, got {name!r}")
    for ports in ("inports", "outports"):
        v = out.get(ports, [])
        if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
            raise ScriptError(path, line, f"@actor {ports} must be a list of port names, got {v!r}")
        if len(set(v)) != len(v):
            raise ScriptError(path, line, f"@actor {ports} has a duplicate port: {v!r}")
        out[ports] = tuple(v)
    if "tags" in out:
        if not isinstance(out["tags"], (list, tuple)) or not all(isinstance(t, str) for t in out["tags"]):
            raise ScriptError(path, line, "@actor tags must be a list of strings")
        out["tags"] = tuple(out["tags"])
    for key in ("version", "description", "category", "state_backend"):
        if key in out and out[key] is not None and not isinstance(out[key], str):
            raise ScriptError(path, line, f"@actor {key} must be a string, got {out[key]!r}")
    if "await_all_inports" in out and not isinstance(out["await_all_inports"], bool):
        raise ScriptError(path, line, "@actor await_all_inports must be true or false")
    if "config_schema" in out and out["config_schema"] is not None and not isinstance(out["config_schema"], dict):
        raise ScriptError(path, line, "@actor config_schema must be an object")
    try:
        if out.get("memory") is not None:
            out["memory"] = parse_size(out["memory"])
        if out.get("timeout") is not None:
            out["timeout"] = parse_duration(out["timeout"])
    except ValueError as exc:
        raise ScriptError(path, line, f"@actor {exc}") from None
    return out


# -- Python -------------------------------------------------------------------------------------

def _is_actor_call(dec: ast.expr) -> bool:
    f = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(f, ast.Name) and f.id == "actor") or (isinstance(f, ast.Attribute) and f.attr == "actor")


def _extract_python(path: Path, text: str) -> ComponentSpec:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ScriptError(path, exc.lineno or 1, f"syntax error: {exc.msg}") from None
    found = []
    process_fn = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if _is_actor_call(dec):
                    found.append((node, dec))
            if node.name == "process" and isinstance(node, ast.AsyncFunctionDef):
                process_fn = node
    if len(found) > 1:
        raise ScriptError(path, found[1][1].lineno, "more than one @actor in one file (one actor per file)")
    if found:
        fn, dec = found[0]
        raw: dict[str, Any] = {}
        if isinstance(dec, ast.Call):
            if len(dec.args) > len(_POSITIONAL):
                raise ScriptError(path, dec.lineno, "@actor takes at most 3 positional arguments (name, inports, outports)")
            items = list(zip(_POSITIONAL, dec.args)) + [(k.arg, k.value) for k in dec.keywords]
            for key, value in items:
                if key is None:
                    raise ScriptError(path, dec.lineno, "@actor(**kwargs) cannot be read statically")
                try:
                    raw[key] = ast.literal_eval(value)
                except (ValueError, SyntaxError, TypeError):
                    raise ScriptError(path, getattr(value, "lineno", dec.lineno),
                                      f"@actor argument {key!r} must be a literal (it is read without running "
                                      "the script)") from None
        raw.setdefault("name", fn.name)
        meta = _meta(path, dec.lineno, raw)
        meta.setdefault("description", ast.get_docstring(fn) or ast.get_docstring(tree))
        return ComponentSpec(runtime="python", file=path, line=dec.lineno, source=text, entry=fn.name, **meta)
    if process_fn is not None:
        return ComponentSpec(name=_stem(path), runtime="python", file=path, line=process_fn.lineno, source=text,
                             entry="process", inports=(), outports=(), dynamic_ports=True,
                             description=ast.get_docstring(process_fn) or ast.get_docstring(tree))
    raise ScriptError(path, 1, "no @actor function and no top-level async def process(context)")


# -- JavaScript ---------------------------------------------------------------------------------

_JS_ACTOR = re.compile(r"(?:^|[^\w$.])@?actor\s*\(\s*\{", re.M)
_JS_FUNC_AFTER = re.compile(r"\s*\)\s*;?\s*(?:async\s+)?function\s*\*?\s*([A-Za-z_$][\w$]*)?")
_JS_PROCESS = re.compile(r"(?:async\s+function\s+process\s*\(|(?:module\.)?exports(?:\.process)?\s*=\s*async\s+"
                         r"(?:function\b|\())")


def _skip_js(text: str, i: int) -> int:
    """Index just past the string/template/comment starting at ``i`` (or i+1)."""
    c = text[i]
    if c in "'\"":
        j = i + 1
        while j < len(text) and text[j] != c:
            j += 2 if text[j] == "\\" else 1
        return j + 1
    if c == "`":
        j = i + 1
        while j < len(text) and text[j] != "`":
            if text[j] == "\\":
                j += 2
                continue
            if text.startswith("${", j):
                j = _match_brace(text, j + 1) + 1
                continue
            j += 1
        return j + 1
    if text.startswith("//", i):
        j = text.find("\n", i)
        return len(text) if j < 0 else j
    if text.startswith("/*", i):
        j = text.find("*/", i + 2)
        return len(text) if j < 0 else j + 2
    return i + 1


def _match_brace(text: str, i: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``i``; -1 when unbalanced."""
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in "'\"`" or text.startswith(("//", "/*"), i):
            i = _skip_js(text, i)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _leading_comment(text: str, start: int) -> str | None:
    before = text[:start].rstrip()
    m = re.search(r"/\*\*?(.*?)\*/\s*$", before, re.S)
    if m:
        lines = [ln.strip().lstrip("*").strip() for ln in m.group(1).splitlines()]
        return "\n".join(ln for ln in lines if ln).strip() or None
    comment = []
    for ln in reversed(before.splitlines()):
        s = ln.strip()
        if not s.startswith("//"):
            break
        comment.append(s[2:].strip())
    return "\n".join(reversed(comment)).strip() or None


def _extract_js(path: Path, text: str) -> ComponentSpec:
    matches = [m for m in _JS_ACTOR.finditer(text) if not _in_comment_or_string(text, m.start())]
    if len(matches) > 1:
        raise ScriptError(path, text.count("\n", 0, matches[1].start()) + 1,
                          "more than one actor({...}) in one file (one actor per file)")
    if matches:
        m = matches[0]
        brace = m.end() - 1
        line = text.count("\n", 0, brace) + 1
        end = _match_brace(text, brace)
        if end < 0:
            raise ScriptError(path, line, "the actor({...}) object literal is not closed")
        literal = text[brace:end + 1]
        try:
            raw = json5.loads(literal)
        except ValueError as exc:
            detail = str(exc)
            lm = re.search(r"<string>:(\d+)", detail)
            raise ScriptError(path, line + (int(lm.group(1)) - 1 if lm else 0),
                              f"the actor metadata is not a plain object literal: {detail}") from None
        if not isinstance(raw, dict):
            raise ScriptError(path, line, "actor(...) needs an object literal")
        raw = _join_surrogates(raw)
        meta = _meta(path, line, raw)
        fm = _JS_FUNC_AFTER.match(text, end + 1)
        entry = fm.group(1) if fm and fm.group(1) else None
        if "description" not in meta or meta["description"] is None:
            meta["description"] = _leading_comment(text, text.rfind("\n", 0, m.end()) + 1)
        return ComponentSpec(runtime="javascript", file=path, line=line, source=text, entry=entry, **meta)
    pm = _JS_PROCESS.search(text)
    if pm is not None:
        return ComponentSpec(name=_stem(path), runtime="javascript", file=path,
                             line=text.count("\n", 0, pm.start()) + 1, source=text, entry="process",
                             inports=(), outports=(), dynamic_ports=True,
                             description=_leading_comment(text, text.rfind("\n", 0, pm.start()) + 1))
    raise ScriptError(path, 1, "no @actor({...}) / actor({...}, fn) and no async function process(context)")


def _join_surrogates(v: Any) -> Any:
    """json5 leaves an escaped surrogate pair (``\\ud800\\udc00``) as two code points; JS joins them."""
    if isinstance(v, str):
        try:
            return v.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            return v
    if isinstance(v, list):
        return [_join_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {k: _join_surrogates(x) for k, x in v.items()}
    return v


def _in_comment_or_string(text: str, pos: int) -> bool:
    i = 0
    while i < pos:
        c = text[i]
        if c in "'\"`" or text.startswith(("//", "/*"), i):
            j = _skip_js(text, i)
            if j > pos:
                return True
            i = j
            continue
        i += 1
    return False


def extract(path: Path, text: str | None = None) -> ComponentSpec:
    """Read one script's actor metadata. Raises ScriptError (file, line, message)."""
    path = Path(path).resolve()
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
        mtime = path.stat().st_mtime_ns if path.exists() else 0
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(path, 1, f"cannot read the script: {exc}") from None
    if path.suffix in (".js", ".mjs", ".cjs"):
        spec = _extract_js(path, text)
    elif path.suffix == ".py":
        spec = _extract_python(path, text)
    else:
        raise ScriptError(path, 1, "a script actor is a .py or .js file")
    return attrs.evolve(spec, mtime_ns=mtime)


def _matches(rel: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(rel, pattern):
        return True
    # "**/x" also matches x at the top level; "a/**" also matches a itself.
    if pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:]):
        return True
    return False


def _excluded(rel: str, excluded: Sequence[str]) -> bool:
    parts = rel.split("/")
    for pat in excluded:
        if _matches(rel, pat):
            return True
        if pat.startswith("**/") and pat.endswith("/**"):
            if pat[3:-3] in parts[:-1]:
                return True
    return False


def discover(root: Path, patterns: Sequence[str], excluded: Sequence[str] = (), scripts: Sequence[Path | str] = (),
             *, discover_scripts: bool = True) -> Discovery:
    """Find and read every actor under ``root`` plus ``scripts``; broken files become problems."""
    root = Path(root).resolve()
    paths: dict[Path, None] = {}
    problems: list[ScriptProblem] = []
    if discover_scripts and root.is_dir():
        skip_dirs = {p[3:-3] for p in excluded if p.startswith("**/") and p.endswith("/**") and "*" not in p[3:-3]}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
            rel_dir = os.path.relpath(dirpath, root)
            for fn in filenames:
                if not fn.endswith((".py", ".js")):
                    continue
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
                if any(_matches(rel, p) for p in patterns) and not _excluded(rel, excluded):
                    paths[Path(dirpath, fn).resolve()] = None
    for s in scripts:
        p = Path(s).resolve()
        if not p.is_file():
            problems.append(ScriptProblem(p, 0, "no such script"))
            continue
        paths[p] = None
    components: list[ComponentSpec] = []
    seen: dict[str, ComponentSpec] = {}
    for p in sorted(paths):
        try:
            spec = extract(p)
        except ScriptError as exc:
            problems.append(exc.problem)
            continue
        first = seen.get(spec.name)
        if first is not None:
            problems.append(ScriptProblem(p, spec.line, f"duplicate actor name {spec.name!r} "
                                                         f"(first defined at {first.file}:{first.line})"))
            continue
        seen[spec.name] = spec
        components.append(spec)
    return Discovery(tuple(components), tuple(problems))
