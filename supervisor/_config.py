"""reflow.yaml → frozen attrs classes, through one cattrs converter.

Every problem is reported at once, each as ``path.to.key: message (file:line)``.
The seed's flat ``workspace.sandbox`` keys (``python_image``, ``memory_limit``,
…) are accepted verbatim and mapped onto the nested form before structuring.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NewType

import attrs
import cattrs
import orjson
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from ._units import parse_duration, parse_size

__all__ = [
    "Config", "ConfigError", "ConfigProblem", "WorkspaceConfig", "SandboxConfig", "RuntimeConfig", "PoolConfig",
    "RedisConfig", "WebSocketConfig", "MailboxConfig", "SupervisionConfig", "BackoffConfig", "ActorOverride",
    "GroupConfig", "NetworkConfig", "ProcessConfig", "PortRef", "ConnectionConfig", "NO_DATA",
    "load_config", "parse_config",
]

Size = NewType("Size", int)
Duration = NewType("Duration", float)


@attrs.frozen
class ConfigProblem:
    path: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f" ({self.file}:{self.line})" if self.file and self.line else (f" ({self.file})" if self.file else "")
        return f"{self.path}: {self.message}{where}" if self.path else f"{self.message}{where}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _non_negative(inst: Any, a: attrs.Attribute, v: Any) -> None:
    if v is not None and v < 0:
        raise ValueError(f"must not be negative, got {v}")


@attrs.frozen
class RuntimeConfig:
    image: str = "python:3.11"
    packages: tuple[str, ...] = ()
    memory: Size = Size(512 * 10**6)
    cpu: float = attrs.field(default=0.5, validator=_non_negative)
    rootfs: str | None = None


@attrs.frozen
class PoolConfig:
    preload_count: int = attrs.field(default=2, validator=_non_negative)
    max_size: int = attrs.field(default=20, validator=_non_negative)
    idle_timeout: Duration = Duration(300.0)


@attrs.frozen
class SandboxConfig:
    backend: Literal["auto", "microsandbox", "bubblewrap", "process"] = "auto"
    python: RuntimeConfig = RuntimeConfig(image="python:3.11")
    javascript: RuntimeConfig = RuntimeConfig(image="node:20")
    pool: PoolConfig = PoolConfig()
    max_output: Size = Size(16 * 2**20)
    tmp_size: Size = Size(64 * 2**20)
    cpu_seconds: Duration | None = None
    max_processes: int = 64
    shm_threshold: Size = Size(64 * 2**10)


@attrs.frozen
class RedisConfig:
    url: str | None = None
    namespace: str = "reflow"
    ttl: Duration | None = None


@attrs.frozen
class WebSocketConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080, validator=lambda i, a, v: _port(v))
    max_connections: int = attrs.field(default=100, validator=_non_negative)
    ping_interval: Duration = Duration(30.0)
    max_frame_size: Size = Size(10 * 10**6)
    token: str | None = None
    max_in_flight: int = attrs.field(default=128, validator=_non_negative)


def _port(v: int) -> None:
    if not 0 <= v <= 65535:
        raise ValueError(f"a port is 0..65535, got {v}")


@attrs.frozen
class MailboxConfig:
    kind: Literal["redis", "memory"] = "memory"
    max_pending: int = attrs.field(default=10000, validator=_non_negative)
    batch: int = 64


@attrs.frozen
class WorkspaceConfig:
    root: str = "."
    discover_scripts: bool = True
    script_patterns: tuple[str, ...] = ("**/*.actor.py", "**/*.actor.js")
    excluded_paths: tuple[str, ...] = ("**/node_modules/**", "**/__pycache__/**", "**/.venv/**", "**/.reflow/**")
    scripts: tuple[str, ...] = ()
    hot_reload: bool = True
    state_dir: str | None = None
    sandbox: SandboxConfig = SandboxConfig()
    redis: RedisConfig = RedisConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    mailbox: MailboxConfig = MailboxConfig()


def _jitter(inst: Any, a: attrs.Attribute, v: float) -> None:
    if not 0 <= v <= 1:
        raise ValueError(f"jitter is a fraction 0..1, got {v}")


@attrs.frozen
class BackoffConfig:
    min: Duration = Duration(0.01)
    max: Duration = Duration(5.0)
    jitter: float = attrs.field(default=0.2, validator=_jitter)
    reset: Duration | None = None

    @property
    def reset_after(self) -> float:
        return self.reset if self.reset is not None else 2 * self.max


Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]


@attrs.frozen
class ActorOverride:
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    timeout: Duration | None = None
    max_deliveries: int = 5
    config: dict[str, Any] | None = None
    memory: Size | None = None


@attrs.frozen
class GroupConfig:
    members: tuple[str, ...]
    strategy: Strategy = "one_for_one"
    max_restarts: int = attrs.field(default=3, validator=_non_negative)
    max_seconds: Duration = Duration(5.0)
    backoff: BackoffConfig = BackoffConfig()


@attrs.frozen
class SupervisionConfig:
    strategy: Strategy = "one_for_one"
    max_restarts: int = attrs.field(default=3, validator=_non_negative)
    max_seconds: Duration = Duration(5.0)
    backoff: BackoffConfig = BackoffConfig()
    actors: dict[str, ActorOverride] = attrs.field(factory=dict)
    groups: dict[str, GroupConfig] = attrs.field(factory=dict)
    shutdown_grace: Duration = Duration(10.0)


@attrs.frozen
class PortRef:
    process: str
    port: str
    index: int | None = None


class _NoData:
    def __repr__(self) -> str:
        return "NO_DATA"


NO_DATA: Any = _NoData()


@attrs.frozen
class ConnectionConfig:
    tgt: PortRef
    src: PortRef | None = None
    data: Any = NO_DATA
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ProcessConfig:
    component: str
    config: dict[str, Any] = attrs.field(factory=dict)
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class NetworkConfig:
    processes: dict[str, ProcessConfig] = attrs.field(factory=dict)
    connections: tuple[ConnectionConfig, ...] = ()
    inports: dict[str, PortRef] = attrs.field(factory=dict)
    outports: dict[str, PortRef] = attrs.field(factory=dict)


@attrs.frozen
class _File:
    workspace: WorkspaceConfig = WorkspaceConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    network: NetworkConfig | None = None


@attrs.frozen
class Config:
    workspace: WorkspaceConfigResolved
    supervision: SupervisionConfig
    network: NetworkConfig | None
    path: Path | None
    base_dir: Path


@attrs.frozen
class WorkspaceConfigResolved:
    """The workspace section with paths resolved against the config file's directory."""

    root: Path
    discover_scripts: bool
    script_patterns: tuple[str, ...]
    excluded_paths: tuple[str, ...]
    scripts: tuple[str, ...]
    hot_reload: bool
    state_dir: Path
    sandbox: SandboxConfig
    redis: RedisConfig
    websocket: WebSocketConfig
    mailbox: MailboxConfig


# -- the converter --------------------------------------------------------------------------

converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook(Size, lambda v, _: Size(parse_size(v)))
converter.register_structure_hook(Duration, lambda v, _: Duration(parse_duration(v)))


def _strict(kind: type) -> Any:
    def hook(v: Any, _: Any) -> Any:
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if kind is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if kind is bool and isinstance(v, bool):
            return v
        if kind is str and isinstance(v, str):
            return v
        raise ValueError(f"expected {'a number' if kind in (int, float) else 'a ' + kind.__name__}, got {v!r}")
    return hook


for _t in (int, float, bool, str):
    converter.register_structure_hook(_t, _strict(_t))
converter.register_structure_hook(Any, lambda v, _: v)


def _structure_connection(v: Any, _: Any) -> ConnectionConfig:
    if not isinstance(v, Mapping):
        raise ValueError("a connection is an object with tgt and src or data")
    v = dict(v)
    has_data = "data" in v
    data = v.pop("data", NO_DATA)
    if has_data == ("src" in v):
        raise ValueError("a connection needs exactly one of src (a port) or data (an initial packet)")
    conn = converter.structure(v, _ConnectionNoData)
    return ConnectionConfig(tgt=conn.tgt, src=conn.src, data=data, metadata=conn.metadata)


@attrs.frozen
class _ConnectionNoData:
    tgt: PortRef
    src: PortRef | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)


converter.register_structure_hook(ConnectionConfig, _structure_connection)


def _format(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"extra fields found ({', '.join(sorted(exc.extra_fields))})"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if " not in literal " in str(exc):
        return f"expected {_type_name(type_)}, got {str(exc).split(' not in literal ')[0]!r}"
    if isinstance(exc, ValueError) and str(exc):
        msg = str(exc)
        if msg.startswith("invalid literal") or " not in literal " in msg:
            return f"expected {_type_name(type_)}"
        return msg
    if isinstance(exc, TypeError) and type_ is not None:
        return f"expected {_type_name(type_)}"
    return cattrs.v.format_exception(exc, type_)


def _type_name(t: Any) -> str:
    args = getattr(t, "__args__", None)
    if args and all(isinstance(a, str) for a in args):
        return "one of " + ", ".join(args)
    return getattr(t, "__name__", str(t))


_PATH_RE = re.compile(r"^(.*) @ \$(.*)$")


def _problems(exc: BaseException, lines: dict[tuple, int], filename: str | None) -> list[ConfigProblem]:
    out: list[ConfigProblem] = []
    for msg in cattrs.transform_error(exc, path="$", format_exception=_format):
        m = _PATH_RE.match(msg)
        text, path = (m.group(1), m.group(2)) if m else (msg, "")
        keys = _split(path)
        extra = re.match(r"^extra fields found \((.*)\)$", text)
        if extra:
            for name in extra.group(1).split(", "):
                k = keys + (name,)
                out.append(ConfigProblem(_join(k), "unknown key", filename, _line(lines, k)))
            continue
        if text.startswith("invalid value for type, expected"):
            text = text.replace("invalid value for type, expected", "expected")
        out.append(ConfigProblem(_join(keys), text, filename, _line(lines, keys)))
    return out


def _split(path: str) -> tuple:
    keys: list = []
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]|\[['\"]?([^'\"\]]+)['\"]?\]", path):
        if part[0]:
            keys.append(part[0])
        elif part[1]:
            keys.append(int(part[1]))
        else:
            keys.append(part[2])
    return tuple(keys)


def _join(keys: tuple) -> str:
    s = ""
    for k in keys:
        s += f"[{k}]" if isinstance(k, int) else (f".{k}" if s else str(k))
    return s


def _line(lines: dict[tuple, int], keys: tuple) -> int | None:
    while keys:
        if keys in lines:
            return lines[keys]
        keys = keys[:-1]
    return None


def _plain(node: Any, path: tuple, lines: dict[tuple, int]) -> Any:
    """ruamel's round-trip nodes → plain Python, recording each key's 1-based line."""
    if isinstance(node, CommentedMap):
        out = {}
        for k, v in node.items():
            try:
                lines[path + (k,)] = node.lc.key(k)[0] + 1
            except (KeyError, TypeError, AttributeError):
                pass
            out[k] = _plain(v, path + (k,), lines)
        return out
    if isinstance(node, CommentedSeq):
        res = []
        for i, v in enumerate(node):
            try:
                lines[path + (i,)] = node.lc.item(i)[0] + 1
            except (KeyError, TypeError, AttributeError):
                pass
            res.append(_plain(v, path + (i,), lines))
        return res
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node


_FLAT_SANDBOX = {"python_image", "javascript_image", "preload_count", "max_pool_size", "memory_limit", "cpu_limit"}


def _unflatten_sandbox(sb: dict, problems: list[ConfigProblem], lines: dict, filename: str | None) -> dict:
    """Map the seed's flat sandbox keys onto the nested form (a flat key loses to a nested one)."""
    flat = {k: sb.pop(k) for k in list(sb) if k in _FLAT_SANDBOX}
    if not flat:
        return sb
    base = ("workspace", "sandbox")

    def rt(name: str) -> dict:
        v = sb.setdefault(name, {})
        return v if isinstance(v, dict) else {}

    def check(key: str, fn: Any) -> Any:
        try:
            return fn(flat[key])
        except ValueError as exc:
            problems.append(ConfigProblem(_join(base + (key,)), str(exc), filename, _line(lines, base + (key,))))
            return None

    if "python_image" in flat:
        rt("python").setdefault("image", flat["python_image"])
    if "javascript_image" in flat:
        rt("javascript").setdefault("image", flat["javascript_image"])
    if "preload_count" in flat:
        sb.setdefault("pool", {}).setdefault("preload_count", flat["preload_count"])
    if "max_pool_size" in flat:
        sb.setdefault("pool", {}).setdefault("max_size", flat["max_pool_size"])
    if "memory_limit" in flat and check("memory_limit", parse_size) is not None:
        for name in ("python", "javascript"):
            rt(name).setdefault("memory", flat["memory_limit"])
    if "cpu_limit" in flat:
        if isinstance(flat["cpu_limit"], (int, float)) and not isinstance(flat["cpu_limit"], bool):
            for name in ("python", "javascript"):
                rt(name).setdefault("cpu", flat["cpu_limit"])
        else:
            check("cpu_limit", lambda v: (_ for _ in ()).throw(ValueError(f"expected a number, got {v!r}")))
    return sb


def _load_graph(value: Any, base_dir: Path, problems: list, filename: str | None, lines: dict) -> Any:
    """``network: graph.json`` → the FBP JSON graph's processes/connections/inports/outports."""
    if not isinstance(value, str):
        return value
    path = (base_dir / value).resolve()
    try:
        graph = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        problems.append(ConfigProblem("network", f"cannot read graph file {value}: {exc}", filename,
                                      _line(lines, ("network",))))
        return None
    if not isinstance(graph, dict):
        problems.append(ConfigProblem("network", f"graph file {value} is not a JSON object", filename))
        return None
    return {k: v for k, v in graph.items() if k not in ("properties", "groups", "caseSensitive")}


def parse_config(text: str, *, filename: str = "reflow.yaml", base_dir: Path | None = None,
                 env: Mapping[str, str] | None = None, path: Path | None = None) -> Config:
    """Parse and validate a reflow.yaml text. Raises ConfigError listing every problem."""
    base_dir = (base_dir or Path.cwd()).resolve()
    env = os.environ if env is None else env
    lines: dict[tuple, int] = {}
    try:
        raw = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError([ConfigProblem("", f"YAML syntax error: {exc.problem or exc}", filename, line)]) from None
    data = _plain(raw, (), lines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", "the config must be a mapping (workspace:, supervision:, network:)",
                                         filename, 1)])
    problems: list[ConfigProblem] = []
    ws = data.get("workspace")
    if isinstance(ws, dict) and isinstance(ws.get("sandbox"), dict):
        ws["sandbox"] = _unflatten_sandbox(ws["sandbox"], problems, lines, filename)
    if "network" in data:
        data["network"] = _load_graph(data["network"], base_dir, problems, filename, lines)
    try:
        parsed = converter.structure(data, _File)
    except (ClassValidationError, ValueError, TypeError, KeyError) as exc:
        problems += _problems(exc, lines, filename) if isinstance(exc, ClassValidationError) else [
            ConfigProblem("", str(exc), filename)]
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    parsed, env_problems = _apply_env(parsed, env)
    problems += env_problems
    problems += _check_network(parsed.network, lines, filename)
    if problems:
        raise ConfigError(problems)
    w = parsed.workspace
    root = (base_dir / w.root).resolve()
    resolved = WorkspaceConfigResolved(
        root=root, discover_scripts=w.discover_scripts, script_patterns=w.script_patterns,
        excluded_paths=w.excluded_paths, scripts=tuple(str((base_dir / s).resolve()) for s in w.scripts),
        hot_reload=w.hot_reload, state_dir=(base_dir / w.state_dir).resolve() if w.state_dir else root / ".reflow",
        sandbox=w.sandbox, redis=w.redis, websocket=w.websocket, mailbox=w.mailbox)
    return Config(workspace=resolved, supervision=parsed.supervision, network=parsed.network, path=path,
                  base_dir=base_dir)


def _apply_env(parsed: _File, env: Mapping[str, str]) -> tuple[_File, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []
    w = parsed.workspace
    redis, websocket = w.redis, w.websocket
    if env.get("REFLOW_REDIS_URL"):
        redis = attrs.evolve(redis, url=env["REFLOW_REDIS_URL"])
    if env.get("REFLOW_WS_PORT"):
        try:
            port = int(env["REFLOW_WS_PORT"])
            _port(port)
            websocket = attrs.evolve(websocket, port=port)
        except ValueError:
            problems.append(ConfigProblem("REFLOW_WS_PORT", f"expected a port 0..65535, got "
                                          f"{env['REFLOW_WS_PORT']!r}", "environment"))
    if env.get("REFLOW_TOKEN"):
        websocket = attrs.evolve(websocket, token=env["REFLOW_TOKEN"])
    return attrs.evolve(parsed, workspace=attrs.evolve(w, redis=redis, websocket=websocket)), problems


def _check_network(net: NetworkConfig | None, lines: dict, filename: str | None) -> list[ConfigProblem]:
    if net is None:
        return []
    out = []
    for i, conn in enumerate(net.connections):
        for end in ("src", "tgt"):
            ref = getattr(conn, end)
            if ref is not None and ref.process not in net.processes:
                k = ("network", "connections", i, end, "process")
                out.append(ConfigProblem(_join(k), f"unknown process {ref.process!r}", filename, _line(lines, k)))
    return out


def load_config(path: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (None → all defaults, relative to the current directory)."""
    if path is None:
        return parse_config("", filename="defaults", base_dir=Path.cwd(), env=env)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the config file: {exc.strerror}", str(p))]) from None
    return parse_config(text, filename=str(p), base_dir=p.resolve().parent, env=env, path=p)
