"""Static discovery of script actors: metadata is read, never executed.

The host never imports or runs user code. Python metadata comes from the
``@actor(...)`` decorator in the AST (``ast.literal_eval`` on each argument);
JavaScript metadata from the ``@actor({...})`` / ``actor({...}, fn)`` object
literal, located by a small scanner and parsed as JSON5.

Everything here is pure: ``extract_source`` turns one script's text into a
:class:`ComponentSpec` or raises :class:`ScriptError` (file, line, message).
Reading files and walking a workspace is the shell's (``supervisor._scan``).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import json5
import pyjson5

from .units import parse_duration, parse_size

__all__ = ["ComponentSpec", "ScriptProblem", "ScriptError", "Discovery", "extract_source", "is_script"]

_PY_SUFFIXES = (".py",)
_JS_SUFFIXES = (".js", ".mjs", ".cjs")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")          # used with fullmatch: "$" would admit "X\n"
_NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or '_'"

# Argument spellings → ComponentSpec fields. Python takes snake_case (plus the seed's
# awaitAllInports); JavaScript takes camelCase or snake_case.
_PY_KEYS = {
    "name": "name", "inports": "inports", "outports": "outports",
    "await_all_inports": "await_all_inports", "awaitAllInports": "await_all_inports",
    "version": "version", "description": "description", "tags": "tags", "category": "category",
    "config_schema": "config_schema", "memory": "memory", "timeout": "timeout", "state_backend": "state_backend",
}
_JS_KEYS = {**_PY_KEYS, "configSchema": "config_schema", "stateBackend": "state_backend"}
_POSITIONAL = ("name", "inports", "outports")
_NO_ACTOR_PY = "no @actor function and no top-level async def process(context)"
_NO_ACTOR_JS = "no @actor({...}) / actor({...}, fn) and no top-level async function process(context)"


@attrs.frozen
class ComponentSpec:
    """One script actor as read from its file (nothing of it has run)."""

    name: str
    runtime: str                 # "python" | "javascript"
    file: Path                   # absolute (resolved) path
    line: int                    # line of the @actor / def
    source: str                  # full script text (sent into the sandbox later)
    entry: str | None            # Python: decorated / `process` function; JS: function name or None
    inports: tuple[str, ...]
    outports: tuple[str, ...]
    dynamic_ports: bool = False  # the undecorated `async def process(context)` form
    await_all_inports: bool = False
    version: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    category: str | None = None
    config_schema: dict | None = None
    memory: int | None = None    # bytes
    timeout: float | None = None  # seconds
    state_backend: str | None = None
    mtime_ns: int = 0


@attrs.frozen
class ScriptProblem:
    """Why one script was not loaded. ``line`` is 0 when the problem is the file itself (missing, unreadable)."""

    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ScriptError(Exception):
    """A script's metadata cannot be read; ``.problem`` says where and why."""

    def __init__(self, file: Path, line: int, message: str):
        self.problem = ScriptProblem(Path(file), line, message)
        super().__init__(str(self.problem))


@attrs.frozen
class Discovery:
    components: tuple[ComponentSpec, ...]
    problems: tuple[ScriptProblem, ...]


# -- shared validation ----------------------------------------------------------------------------

def _stem(path: Path) -> str:
    """The actor name of an undecorated script: ``test_actor.py`` → ``test_actor``, ``calc.actor.js`` → ``calc``."""
    name = path.name
    for suffix in _PY_SUFFIXES + _JS_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len(".actor")] if name.endswith(".actor") else name


def _dynamic_name(path: Path, line: int) -> str:
    name = _stem(path)
    if not _NAME.fullmatch(name):
        raise ScriptError(path, line, f"the file name gives the actor name {name!r}, which is not a valid name "
                                      f"({_NAME_RULE}); rename the file or use @actor(name=...)")
    return name


def _encodable(s: str) -> bool:
    # A lone surrogate (from a "\ud800" escape) cannot travel as UTF-8 JSON later on.
    return s.isascii() or not any("\ud800" <= c <= "\udfff" for c in s)


def _json_value(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float)):
        return True
    if isinstance(v, str):
        return _encodable(v)
    if isinstance(v, list):
        return all(_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _encodable(k) and _json_value(x) for k, x in v.items())
    return False


def _meta(path: Path, raw: dict[str, Any], keys: dict[str, str], line_of: Callable[[str], int]) -> dict[str, Any]:
    """Validate and normalise @actor arguments (shared by both languages).

    ``raw`` maps the argument as spelled in the script to its value; ``line_of``
    gives the line to blame for one argument. Raises ScriptError naming the argument.
    """
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        field = keys.get(key)
        if field is None:
            raise ScriptError(path, line_of(key), f"unknown @actor argument {key!r} "
                                                  f"(accepted: {', '.join(sorted(keys))})")
        if field in out:
            raise ScriptError(path, line_of(key), f"@actor argument {field!r} given twice "
                                                  f"(as {spelled[field]!r} and {key!r})")
        out[field], spelled[field] = value, key
    for field in [f for f, v in out.items() if v is None]:
        del out[field]                    # an explicit None / null is the default

    def bad(field: str, what: str) -> ScriptError:
        key = spelled.get(field, field)
        return ScriptError(path, line_of(key), f"@actor argument {key!r} must be {what}, got {out.get(field)!r}")

    name = out.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad("name", f"a non-empty string of {_NAME_RULE}")
    for field in ("inports", "outports"):
        v = out.get(field, ())
        if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p and _encodable(p) for p in v):
            raise bad(field, "a list of port names (non-empty strings)")
        if len(set(v)) != len(v):
            dup = next(p for i, p in enumerate(v) if p in v[:i])
            raise ScriptError(path, line_of(spelled[field]), f"@actor argument {spelled[field]!r} has a duplicate "
                                                             f"port {dup!r}")
        out[field] = tuple(v)
    if "tags" in out:
        v = out["tags"]
        if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and _encodable(t) for t in v):
            raise bad("tags", "a list of strings")
        out["tags"] = tuple(v)
    for field in ("version", "description", "category", "state_backend"):
        v = out.get(field)
        if v is not None and not (isinstance(v, str) and _encodable(v)):
            raise bad(field, "a string")
    if "await_all_inports" in out and not isinstance(out["await_all_inports"], bool):
        raise bad("await_all_inports", "true or false")
    v = out.get("config_schema")
    if v is not None and not (isinstance(v, dict) and _json_value(v)):
        raise bad("config_schema", "an object of JSON values (a JSON-schema-like dict)")
    for field, parse in (("memory", parse_size), ("timeout", parse_duration)):
        if out.get(field) is not None:
            try:
                out[field] = parse(out[field])
            except ValueError as exc:
                raise ScriptError(path, line_of(spelled[field]), f"@actor argument {spelled[field]!r}: {exc}") from None
    return out


# -- Python ---------------------------------------------------------------------------------------

def _actor_decorator(dec: ast.expr) -> bool:
    """``@actor``, ``@actor(...)``, ``@reflow.actor(...)`` (any ``<module>.actor``)."""
    f = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(f, ast.Name) and f.id == "actor") or (
        isinstance(f, ast.Attribute) and f.attr == "actor" and isinstance(f.value, ast.Name))


def _python_args(path: Path, dec: ast.expr) -> tuple[dict[str, Any], dict[str, int]]:
    """The decorator's arguments as literals, and the line of each."""
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if not isinstance(dec, ast.Call):
        return raw, lines
    if len(dec.args) > len(_POSITIONAL):
        raise ScriptError(path, dec.args[len(_POSITIONAL)].lineno,
                          "@actor takes at most 3 positional arguments (name, inports, outports)")
    items: list[tuple[str | None, ast.expr]] = [*zip(_POSITIONAL, dec.args), *((k.arg, k.value) for k in dec.keywords)]
    for key, node in items:
        if key is None or isinstance(node, ast.Starred):
            raise ScriptError(path, node.lineno, "@actor(*args / **kwargs) cannot be read without running the "
                                                 "script; write the arguments out as literals")
        if key in raw:
            raise ScriptError(path, node.lineno, f"@actor argument {key!r} given twice")
        try:
            raw[key] = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ScriptError(path, node.lineno, f"@actor argument {key!r} must be a literal (metadata is read "
                                                 f"without running the script), got `{ast.unparse(node)}`") from None
        lines[key] = node.lineno
    return raw, lines


def _extract_python(path: Path, text: str, mtime_ns: int = 0) -> ComponentSpec:
    if "actor" not in text and "process" not in text:    # cheap: most non-actors never reach the parser
        raise ScriptError(path, 1, _NO_ACTOR_PY)
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ScriptError(path, exc.lineno or 1, f"syntax error: {exc.msg}") from None
    except (ValueError, MemoryError, RecursionError) as exc:      # NUL bytes, absurd nesting
        raise ScriptError(path, 1, f"cannot parse the script: {exc}") from None
    found: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, ast.expr]] = []
    process_fn: ast.AsyncFunctionDef | None = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.extend((node, dec) for dec in node.decorator_list if _actor_decorator(dec))
            if isinstance(node, ast.AsyncFunctionDef) and node.name == "process":
                process_fn = node
    if len(found) > 1:
        raise ScriptError(path, found[1][1].lineno, f"a second @actor (the first is on line {found[0][1].lineno}); "
                                                    "one actor per file")
    if found:
        fn, dec = found[0]
        raw, lines = _python_args(path, dec)
        raw.setdefault("name", fn.name)       # the reflow SDK's default: the function's name
        meta = _meta(path, raw, _PY_KEYS, lambda key: lines.get(key, dec.lineno))
        if meta.get("description") is None:
            meta["description"] = ast.get_docstring(fn) or ast.get_docstring(tree)
        return ComponentSpec(runtime="python", file=path, line=dec.lineno, source=text, entry=fn.name,
                             mtime_ns=mtime_ns, **meta)
    if process_fn is not None:
        return ComponentSpec(name=_dynamic_name(path, process_fn.lineno), runtime="python", file=path,
                             line=process_fn.lineno, source=text, entry="process", inports=(), outports=(),
                             dynamic_ports=True, mtime_ns=mtime_ns,
                             description=ast.get_docstring(process_fn) or ast.get_docstring(tree))
    raise ScriptError(path, 1, _NO_ACTOR_PY)


# -- JavaScript -----------------------------------------------------------------------------------
#
# Hand-written on purpose: no maintained pure-Python JavaScript parser gives the
# span and line of one object literal cheaply (esprima-python is unmaintained and
# parses the whole file). We only need to skip strings, template literals and
# comments while matching braces; the literal itself is then parsed by json5.
# Known limit: a regular-expression literal containing a quote or brace is read
# as code; the damage stays on its own line for quotes.

_JS_CALL = re.compile(r"(?<![\w$.])@?(?:[A-Za-z_$][\w$]*\.)?actor\s*\(\s*(\{)?")
_JS_OPEN = re.compile(r"""["'`]|//|/\*""")
_JS_BRACE = re.compile(r"""[{}"'`]|//|/\*""")
# (a lone backslash at the very end of the file is part of the unclosed string too)
_JS_STRING = {q: re.compile(rf"{q}(?:[^{q}\\\n]|\\.|\\\Z)*(?:{q}|$)", re.S | re.M) for q in "'\""}
_JS_TEMPLATE_PART = re.compile(r"(?:[^`\\$]|\\.|\$(?!\{))*", re.S)
_JS_AFTER_DECORATOR = re.compile(
    r"\s*\)\s*;?\s*(?:export\s+(?:default\s+)?)?(?:(?:async\s+)?function\b\s*\*?\s*([A-Za-z_$][\w$]*)?"
    r"|(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*=)")
_JS_AFTER_CALL = re.compile(r"\s*,\s*(?:(?:async\s+)?function\b\s*\*?\s*([A-Za-z_$][\w$]*)?|([A-Za-z_$][\w$]*)\s*\))")
_JS_PROCESS = re.compile(
    r"^[ \t]*(?:export\s+)?async\s+function\s*\*?\s*process\s*\("
    r"|\b(?:module\.)?exports\.process\s*="
    r"|\bmodule\.exports\s*=\s*(?:async\b|function\s+process\b)", re.M)
_JS_LINE_COMMENT = re.compile(r"^\s*//+ ?", re.M)
_JSON5_LINE = re.compile(r"<string>:(\d+)")


def _js_skip(text: str, i: int) -> int:
    """Index just past the string, template literal or comment that starts at ``i``."""
    c = text[i]
    if c in "'\"":
        return _JS_STRING[c].match(text, i).end()        # an unclosed string stops at the end of its line
    if c == "`":
        j = i + 1
        while True:
            j = _JS_TEMPLATE_PART.match(text, j).end()
            if j >= len(text) or text[j] == "`":
                return j + 1
            end = _js_close(text, j + 1)                  # text[j:j+2] == "${"
            if end < 0:
                return len(text)
            j = end + 1
    if text.startswith("//", i):
        j = text.find("\n", i)
        return len(text) if j < 0 else j
    j = text.find("*/", i + 2)
    return len(text) if j < 0 else j + 2


def _js_close(text: str, i: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``i``; -1 when the file ends first."""
    depth = 0
    while (m := _JS_BRACE.search(text, i)) is not None:
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
        else:
            i = _js_skip(text, m.start())
            continue
        i = m.end()
    return -1


def _js_code_matches(text: str, matches: list[re.Match[str]]) -> list[re.Match[str]]:
    """Those of ``matches`` (in order) that are code, not inside a string or comment."""
    out = []
    i = 0                                 # everything before i has been classified
    for m in matches:
        pos = m.start()
        if pos < i:                       # inside the string/comment that ended at i
            continue
        while (o := _JS_OPEN.search(text, i, pos)) is not None:
            i = _js_skip(text, o.start())
            if i > pos:
                break
        else:
            i = pos
        if i <= pos:
            out.append(m)
    return out


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _leading_comment(text: str, line_start: int) -> str | None:
    """The comment block or JSDoc just above ``line_start`` (blank lines allowed between), without tags."""
    before = text[:line_start].rstrip()
    if before.endswith("*/"):
        start = before.rfind("/*")
        if start < 0:
            return None
        body = before[start + 2:-2]
        lines = [re.sub(r"^\s*\*+ ?", "", ln) if ln.lstrip().startswith("*") else ln.strip()
                 for ln in body.lstrip("*").splitlines()]
    else:
        block = []
        for ln in reversed(before.splitlines()):
            if not ln.lstrip().startswith("//"):
                break
            block.append(_JS_LINE_COMMENT.sub("", ln, count=1))
        lines = block[::-1]
    kept = []
    for ln in lines:
        if ln.lstrip().startswith("@"):           # JSDoc tags (@param, @returns …) are not the description
            break
        kept.append(ln.rstrip())
    return "\n".join(kept).strip() or None


def _join_surrogates(v: Any) -> Any:
    """json5 leaves an escaped pair (``\\ud83d\\ude00``) as two code points; JavaScript reads one character."""
    if isinstance(v, str):
        try:
            return v.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            return v                              # a lone surrogate: _meta rejects it where it matters
    if isinstance(v, list):
        return [_join_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_join_surrogates(k): _join_surrogates(x) for k, x in v.items()}
    return v


# Anything that reads like `key:` in a JSON5 literal (also inside strings, which only makes the
# count larger and sends the literal to the careful parser).
_KEY_TEXT = re.compile(r""""(?:[^"\\\n]|\\.)*"\s*:|'(?:[^'\\\n]|\\.)*'\s*:|[^\W\d][\w$]*\s*:|\$[\w$]*\s*:""")


def _count_keys(v: Any) -> int:
    if isinstance(v, dict):
        return len(v) + sum(_count_keys(x) for x in v.values())
    if isinstance(v, list):
        return sum(_count_keys(x) for x in v)
    return 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return d


def _parse_literal(path: Path, literal: str, line: int) -> dict[str, Any]:
    """The object literal as a dict; ScriptError with the file's line on a syntax error."""
    try:
        # Plain JSON first: json5 is a slow pure-Python parser and JSON5 is a
        # superset of JSON, so a JSON-shaped literal means the same either way.
        return json.loads(literal, object_pairs_hook=_no_duplicates)
    except ValueError:
        pass
    # pyjson5 (Cython, fast) reads the usual case; it keeps the last of two equal keys
    # without a word, so a literal whose key count does not add up, and any literal it
    # refuses, goes to json5 (pure Python, slow), which rejects duplicates and says where.
    try:
        fast = pyjson5.decode(literal)
    except Exception:  # pyjson5's errors carry no line: json5 below says it properly
        fast = None
    if isinstance(fast, dict) and _count_keys(fast) == len(_KEY_TEXT.findall(literal)):
        return fast
    try:
        value = json5.loads(literal, allow_duplicate_keys=False)
    except ValueError as exc:
        detail = str(exc)
        m = _JSON5_LINE.search(detail)
        at = line + int(m.group(1)) - 1 if m else line
        detail = _JSON5_LINE.sub("", detail).strip()
        raise ScriptError(path, at, f"the actor metadata must be a plain object literal (JSON5): {detail}") from None
    except RecursionError:
        raise ScriptError(path, line, "the actor metadata literal is nested too deeply") from None
    return _join_surrogates(value) if "\\u" in literal else value


def _literal_line_of(literal: str, line: int) -> Callable[[str], int]:
    def line_of(key: str) -> int:
        m = re.search(rf"""(?:^|[{{,\s])(["']?){re.escape(key)}\1\s*:""", literal)
        return line + literal.count("\n", 0, m.start()) + (literal[m.start()] == "\n") if m else line
    return line_of


def _extract_js(path: Path, text: str, mtime_ns: int = 0) -> ComponentSpec:
    if "actor" not in text and "process" not in text and "exports" not in text:
        raise ScriptError(path, 1, _NO_ACTOR_JS)
    calls = _js_code_matches(text, list(_JS_CALL.finditer(text))) if "actor" in text else []
    if len(calls) > 1:
        raise ScriptError(path, _line_at(text, calls[1].start()),
                          f"a second actor(...) (the first is on line {_line_at(text, calls[0].start())}); "
                          "one actor per file")
    if calls:
        m = calls[0]
        if m.group(1) is None:
            raise ScriptError(path, _line_at(text, m.start()), "actor(...) must be given an object literal "
                                                               "(metadata is read without running the script)")
        brace = m.start(1)
        line = _line_at(text, brace)
        end = _js_close(text, brace)
        if end < 0:
            raise ScriptError(path, line, "the actor({...}) object literal is never closed")
        literal = text[brace:end + 1]
        meta = _meta(path, _parse_literal(path, literal, line), _JS_KEYS, _literal_line_of(literal, line))
        after = (_JS_AFTER_CALL if m.group().lstrip()[0] != "@" else _JS_AFTER_DECORATOR).match(text, end + 1)
        entry = (after.group(1) or after.group(2)) if after else None
        if meta.get("description") is None:
            meta["description"] = _leading_comment(text, text.rfind("\n", 0, m.start()) + 1)
        return ComponentSpec(runtime="javascript", file=path, line=_line_at(text, m.start()), source=text,
                             entry=entry, mtime_ns=mtime_ns, **meta)
    procs = _js_code_matches(text, list(_JS_PROCESS.finditer(text)))
    if procs:
        pos = procs[0].start() + len(procs[0].group()) - len(procs[0].group().lstrip())
        line = _line_at(text, pos)
        return ComponentSpec(name=_dynamic_name(path, line), runtime="javascript", file=path, line=line,
                             source=text, entry="process", inports=(), outports=(), dynamic_ports=True,
                             mtime_ns=mtime_ns, description=_leading_comment(text, text.rfind("\n", 0, pos) + 1))
    raise ScriptError(path, 1, _NO_ACTOR_JS)


# -- entry points ---------------------------------------------------------------------------------

def is_script(path: Path) -> bool:
    """Whether ``path``'s name is a Python or JavaScript file's (what ``extract_source`` reads)."""
    return path.name.endswith(_PY_SUFFIXES + _JS_SUFFIXES)


def extract_source(path: Path, text: str, mtime_ns: int = 0) -> ComponentSpec:
    """One script's actor metadata from its text, read without running it.

    ``path`` is taken as given (the caller resolves it; the spec's ``file``): only its
    name is looked at, to tell Python from JavaScript. Pure: reads no file.

    Raises:
        ScriptError: not ``.py``/``.js``; a syntax error in what we read, no actor or
            more than one, or metadata that is not literal, unknown or of the wrong type.
    """
    name = path.name
    is_py, is_js = name.endswith(_PY_SUFFIXES), name.endswith(_JS_SUFFIXES)
    if not (is_py or is_js):
        raise ScriptError(path, 0, "a script actor is a .py or .js file")
    return _extract_python(path, text, mtime_ns) if is_py else _extract_js(path, text, mtime_ns)


def _glob_regex(pattern: str, anywhere: bool) -> re.Pattern[str]:
    """Compile a root-relative glob to a regex over posix paths.

    ``*``, ``?`` and ``[...]`` stay inside one path segment; a ``**`` segment is zero
    or more directories; a pattern with no ``/`` matches at any depth (gitignore's
    rule) when ``anywhere``; a leading ``/`` or ``./`` anchors it at the root.
    Hand-written because Python 3.11 has no ``glob.translate`` and fnmatch's ``*``
    crosses ``/`` (``examples/*.py`` would match ``examples/a/b/c.py``).
    """
    anchored = pattern.startswith(("/", "./"))
    pat = pattern.lstrip("/") if pattern.startswith("/") else pattern[2:] if anchored else pattern
    if pat.endswith("/"):
        pat += "**"
    if anywhere and not anchored and "/" not in pat:
        pat = "**/" + pat
    segments = pat.split("/")
    out = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, n = 0, len(seg)
        while j < n:
            c = seg[j]
            j += 1
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[" and (k := _class_end(seg, j)) >= 0:
                body = seg[j:k]
                negate = body.startswith("!")
                body = re.sub(r"([\\\[\]^&~|])", r"\\\1", body[negate:])
                out.append("(?!/)[" + "^" * negate + body + "]")
                j = k + 1
            else:
                out.append(re.escape(c))
        if not last:
            out.append("/")
    return re.compile("".join(out))


def _class_end(seg: str, j: int) -> int:
    """Index of the ``]`` closing a ``[`` class whose body starts at ``j`` (-1: a literal ``[``)."""
    k = j + (seg[j:j + 1] == "!")
    return seg.find("]", k + (seg[k:k + 1] == "]"))


def _literal_prefix(pattern: str) -> tuple[str, ...] | None:
    """The leading directories a match must be under (None: anywhere), to prune the walk."""
    pat = pattern[2:] if pattern.startswith("./") else pattern.lstrip("/")
    if "/" not in pat:
        return None if not pattern.startswith(("/", "./")) else ()
    prefix = []
    for seg in pat.split("/")[:-1]:
        if any(c in seg for c in "*?["):
            break
        prefix.append(seg)
    return tuple(prefix)
