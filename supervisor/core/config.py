"""reflow.yaml → frozen attrs classes (CONTRACT §2), with errors a user can act on.

Pipeline, all pure except ``load_config`` reading files:

1. ruamel.yaml's round-trip loader parses the text; every key's line is kept
   (``_Document``), so any problem can name ``file:line``.
2. Shape adaptation, before typing: the seed's flat ``workspace.sandbox`` keys
   are moved onto the nested form (remembering the key the user wrote, for
   error paths), and ``network: graph.json`` is replaced by that file's graph.
3. One module-level cattrs converter (``forbid_extra_keys=True``) structures
   the tree. Each custom value type (sizes, durations, ports, …) has exactly
   one structure hook, which raises ``ValueError`` with a sentence for users.
4. Checks that span fields (connections name declared processes, backoff
   min ≤ max, …) run on the typed result.
5. Environment overrides, then relative paths resolved against the config
   file's directory.

Nothing stops at the first problem: every one found is collected and raised
together as ``ConfigError``, each rendered ``path.to.key: message (file:line)``.
"""

from __future__ import annotations

import difflib
import enum
import json
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NewType

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import (ClassValidationError, ForbiddenExtraKeysError, IterableValidationError)
from cattrs.gen import make_dict_structure_fn
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from .units import parse_duration, parse_size

__all__ = [
    "ActorOverride", "BackoffConfig", "Config", "ConfigError", "ConfigProblem", "ConnectionConfig", "GroupConfig",
    "MailboxConfig", "NO_DATA", "NetworkConfig", "PoolConfig", "PortRef", "ProcessConfig", "RedisConfig",
    "RuntimeConfig", "SandboxConfig", "SupervisionConfig", "WebSocketConfig", "WorkspaceConfig",
    "check_components", "config_json_schema", "load_config", "parse_config",
]


# -- problems ------------------------------------------------------------------------------------


@attrs.frozen
class ConfigProblem:
    """One thing wrong with the configuration.

    ``path`` is the dotted key path as the user wrote it (``workspace.sandbox.memory_limit``,
    ``network.connections[0].tgt``), or an environment variable's name, or ``""`` for the
    file as a whole (a syntax error, an unreadable file).
    """

    path: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f" ({self.file}:{self.line})" if self.line is not None else f" ({self.file})"
        return f"{self.path}: {self.message}{where}" if self.path else f"{self.message}{where}"


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds every problem found, in file order.

    ``str(error)`` is one problem per line, ready for stderr.
    """

    def __init__(self, problems: typing.Iterable[ConfigProblem]):
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# -- value types: each has exactly one structure hook (see "the converter") -----------------------

Size = NewType("Size", int)                #: bytes, from 512MB / 64KiB / 4096
Duration = NewType("Duration", float)      #: seconds, from 10ms / 5s / 2m / 1h / 30
Port = NewType("Port", int)                #: 0..65535
Count = NewType("Count", int)              #: an integer ≥ 0
Fraction = NewType("Fraction", float)      #: 0..1
Cpus = NewType("Cpus", float)              #: a positive number of CPUs, like 0.5

_Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
_Backend = Literal["auto", "microsandbox", "bubblewrap", "process"]
_RestartType = Literal["permanent", "transient", "temporary"]
_MailboxKind = Literal["redis", "memory"]
_Fsync = Literal["always", "everysec", "no"]


# -- the schema ----------------------------------------------------------------------------------
# Field names are the YAML keys and are what the rest of the package reads.


@attrs.frozen
class RuntimeConfig:
    """One sandbox runtime. A section given without ``image`` keeps its runtime's default image."""

    image: str
    packages: tuple[str, ...] = ()
    memory: Size = Size(512 * 10**6)
    cpu: Cpus = Cpus(0.5)
    rootfs: Path | None = None           # resolved against the config file's directory


@attrs.frozen
class PoolConfig:
    preload_count: Count = Count(2)
    max_size: Count = Count(20)
    idle_timeout: Duration = Duration(300.0)


@attrs.frozen
class SandboxConfig:
    backend: _Backend = "auto"
    python: RuntimeConfig = RuntimeConfig(image="python:3.11")
    javascript: RuntimeConfig = RuntimeConfig(image="node:20")
    pool: PoolConfig = PoolConfig()
    max_output: Size = Size(16 * 2**20)
    tmp_size: Size = Size(64 * 2**20)
    # Per-worker CPU-time rlimit (the worker's life, not one message: a backstop for CPU
    # burnt outside any message's timeout, e.g. a thread that spins between messages).
    cpu_seconds: Duration | None = Duration(3600.0)
    max_processes: Count = Count(64)
    shm_threshold: Size = Size(64 * 2**10)  # bytes payloads this large go through shared memory
    shm_size: Size = Size(16 * 2**20)       # each of a Python worker's two rings; 0: no shared memory


@attrs.frozen
class RedisConfig:
    url: str | None = None               # None → embedded Redis under the state dir
    namespace: str = "reflow"
    ttl: Duration | None = None
    # The embedded server's appendfsync. "everysec" (the default): Redis write()s the AOF
    # before it answers, so an accepted message survives a SIGKILL of redis-server or of
    # the host (it is in the kernel's page cache); a machine crash or power cut may lose up
    # to ~1 s. "always" fsyncs before answering and closes that too, at a large cost in
    # durable throughput and latency (a disk flush per write).
    appendfsync: _Fsync = "everysec"


@attrs.frozen
class WebSocketConfig:
    host: str = "127.0.0.1"
    port: Port = Port(8080)
    max_connections: Count = Count(100)
    ping_interval: Duration = Duration(30.0)
    max_frame_size: Size = Size(10 * 10**6)
    token: str | None = None
    max_in_flight: Count = Count(128)


@attrs.frozen
class MailboxConfig:
    kind: _MailboxKind = "redis"
    max_pending: Count = Count(10000)
    batch: Count = Count(64)


def _default_state_dir(ws: WorkspaceConfig) -> Path:
    return ws.root / ".reflow"


@attrs.frozen
class WorkspaceConfig:
    """The workspace section. After loading, ``root``, ``state_dir`` and ``scripts`` are absolute."""

    root: Path = Path(".")
    discover_scripts: bool = True
    script_patterns: tuple[str, ...] = ("**/*.actor.py", "**/*.actor.js")
    excluded_paths: tuple[str, ...] = ("**/node_modules/**", "**/__pycache__/**", "**/.venv/**", "**/.reflow/**")
    scripts: tuple[str, ...] = ()        # extra script paths besides the discovered ones
    hot_reload: bool = True
    state_dir: Path = attrs.field(default=attrs.Factory(_default_state_dir, takes_self=True))
    sandbox: SandboxConfig = SandboxConfig()
    redis: RedisConfig = RedisConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    mailbox: MailboxConfig = MailboxConfig()


@attrs.frozen
class BackoffConfig:
    """Delay before a restart: ``min`` doubling up to ``max``, ± ``jitter``."""

    min: Duration = Duration(0.01)
    max: Duration = Duration(5.0)
    jitter: Fraction = Fraction(0.2)
    reset: Duration | None = None

    @property
    def reset_after(self) -> float:
        """Seconds a child must run before its backoff starts over (default 2 × max)."""
        return self.reset if self.reset is not None else 2 * self.max


@attrs.frozen
class PlacementConfig:
    """Which hosts may own a process: those whose ``cluster.labels`` include all of these."""

    labels: tuple[str, ...] = ()


@attrs.frozen
class ActorOverride:
    restart: _RestartType = "permanent"
    timeout: Duration | None = None
    max_deliveries: Count = Count(5)
    config: dict[str, Any] | None = None
    memory: Size | None = None
    placement: PlacementConfig = PlacementConfig()


@attrs.frozen
class GroupConfig:
    """A nested supervisor over some processes (by process name), with its own policy."""

    members: tuple[str, ...]
    strategy: _Strategy = "one_for_one"
    max_restarts: Count = Count(3)
    max_seconds: Duration = Duration(5.0)
    backoff: BackoffConfig = BackoffConfig()


@attrs.frozen
class SupervisionConfig:
    strategy: _Strategy = "one_for_one"
    max_restarts: Count = Count(3)
    max_seconds: Duration = Duration(5.0)
    backoff: BackoffConfig = BackoffConfig()
    actors: dict[str, ActorOverride] = attrs.field(factory=dict)
    groups: dict[str, GroupConfig] = attrs.field(factory=dict)
    shutdown_grace: Duration = Duration(10.0)
    # A message's timeout where neither supervision.actors.NAME.timeout nor the script's
    # metadata sets one: past it the worker is killed (-32003) and restarted per policy.
    timeout: Duration = Duration(30.0)


@attrs.frozen
class ClusterConfig:
    """This host's part in a cluster of hosts sharing one Redis (CONTRACT §6)."""

    host_id: str | None = None           # None → hostname-pid (unique per running host)
    advertise: str | None = None         # ws://ADDR:PORT other hosts reach this one at (None → the bound one)
    # A dead host's processes are taken over within about this long; each live host renews
    # its leases every lease_ttl / 3.
    lease_ttl: Duration = Duration(3.0)
    labels: tuple[str, ...] = ()


@attrs.frozen
class PortRef:
    process: str
    port: str
    index: Count | None = None


class _NoData(enum.Enum):
    # An enum member is the typed sentinel idiom (PEP 484): ``data is NO_DATA`` narrows.
    NO_DATA = "NO_DATA"

    def __repr__(self) -> str:
        return "NO_DATA"


NO_DATA = _NoData.NO_DATA
"""``ConnectionConfig.data`` when the connection has a ``src`` instead (``data: null`` is a real IIP)."""


@attrs.frozen
class ConnectionConfig:
    """An edge (``src`` → ``tgt``) or an initial packet (``data`` → ``tgt``); exactly one of the two."""

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
    """The FBP JSON graph shape: processes, connections (edges and IIPs), exported ports."""

    processes: dict[str, ProcessConfig]
    connections: tuple[ConnectionConfig, ...] = ()
    inports: dict[str, PortRef] = attrs.field(factory=dict)
    outports: dict[str, PortRef] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    """A whole, valid configuration. ``base_dir`` is the config file's directory (or the cwd)."""

    workspace: WorkspaceConfig
    supervision: SupervisionConfig
    network: NetworkConfig | None
    path: Path | None
    base_dir: Path
    cluster: ClusterConfig = ClusterConfig()
    #: Where each key was written (for ``check_components``'s file:line); not part of the value.
    doc: Any = attrs.field(default=None, eq=False, repr=False)
    #: The graph file ``network:`` names (``network: FILE.json`` or ``network: {graph: FILE.json}``),
    #: absolute; where FBP protocol edits are saved (CONTRACT §7). None for an inline network.
    graph_file: Path | None = None


# -- the converter -------------------------------------------------------------------------------

converter = cattrs.Converter(forbid_extra_keys=True)


def _hook(type_: Any) -> typing.Callable[[typing.Callable[[Any], Any]], typing.Callable[[Any], Any]]:
    """Register ``fn(value)`` as the structure hook for ``type_``."""
    def register(fn: typing.Callable[[Any], Any]) -> typing.Callable[[Any], Any]:
        converter.register_structure_hook(type_, lambda value, _: fn(value))
        return fn
    return register


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# cattrs' default scalar hooks coerce (int("12"), bool("false") is True, str(5)); a
# config must not guess, so the plain types are strict too.
@_hook(str)
def _str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r} (quote it in YAML)")


@_hook(bool)
def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


@_hook(int)
def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a whole number, got {value!r}")


@_hook(float)
def _float(value: object) -> float:
    if _is_number(value):
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f"expected a number, got {value!r}")


@_hook(Path)
def _path(value: object) -> Path:
    if isinstance(value, str) and value:
        return Path(value).expanduser()
    raise ValueError(f"expected a path, got {value!r}")


_hook(Size)(parse_size)
_hook(Duration)(parse_duration)


@_hook(Count)
def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"expected a whole number ≥ 0, got {value!r}")


@_hook(Port)
def _port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return value
    raise ValueError(f"expected a port number 0..65535, got {value!r}")


@_hook(Fraction)
def _fraction(value: object) -> float:
    if _is_number(value) and 0 <= value <= 1:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f"expected a fraction 0..1, got {value!r}")


@_hook(Cpus)
def _cpus(value: object) -> float:
    if _is_number(value) and value > 0:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f"expected a positive number of CPUs like 0.5, got {value!r}")


def _is_literal(type_: Any) -> bool:
    return typing.get_origin(type_) is Literal


@converter.register_structure_hook_factory(_is_literal)
def _literal_hook(type_: Any) -> Any:
    allowed = typing.get_args(type_)

    def structure(value: object, _: Any) -> Any:
        if isinstance(value, str) and value in allowed:
            return value
        raise ValueError(f"expected one of {', '.join(allowed)}; got {value!r}")
    return structure


def _is_homogeneous_tuple(type_: Any) -> bool:
    return typing.get_origin(type_) is tuple and typing.get_args(type_)[1:] == (...,)


@converter.register_structure_hook_factory(_is_homogeneous_tuple)
def _tuple_hook(type_: Any, conv: cattrs.Converter) -> Any:
    elements = homogenous_tuple_structure_factory(type_, conv)

    def structure(value: object, _: Any) -> Any:
        # cattrs would turn "**/*.py" into a tuple of characters.
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return elements(value, type_)
    return structure


@converter.register_structure_hook_factory(attrs.has)
def _section_hook(cls: type, conv: cattrs.Converter) -> Any:
    fields = make_dict_structure_fn(cls, conv)

    def structure(value: object, _: Any) -> Any:
        if value is None:            # "backoff:" with nothing under it → all defaults
            value = {}
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping of keys, got {value!r}")
        return fields(value, cls)
    return structure


_connection_fields = make_dict_structure_fn(ConnectionConfig, converter)
_EXACTLY_ONE = "a connection needs exactly one of src (an output port) or data (an initial packet)"


@_hook(ConnectionConfig)
def _connection(value: object) -> ConnectionConfig:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a connection like {{src: …, tgt: …}} or {{data: …, tgt: …}}, got {value!r}")
    # Presence, not value: "data: null" is a real initial packet.
    neither_or_both = ("src" in value) == ("data" in value)
    try:
        conn = _connection_fields(value, ConnectionConfig)
    except ClassValidationError as exc:
        if neither_or_both:   # report it along with the fields' problems
            raise ClassValidationError(exc.message, [*exc.exceptions, ValueError(_EXACTLY_ONE)],
                                       ConnectionConfig) from None
        raise
    if neither_or_both:
        raise ValueError(_EXACTLY_ONE)
    return conn


# -- reading YAML with line numbers --------------------------------------------------------------

_Path = tuple[str | int, ...]


class _Document:
    """Plain data parsed from YAML, plus where each key came from.

    ``where[path] = (file, line)`` for every mapping key and list item. ``aliases`` maps a
    path we rewrote (``workspace.sandbox.python.memory``) to the one the user wrote
    (``workspace.sandbox.memory_limit``), so errors name what is in the file.
    """

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.where: dict[_Path, tuple[str, int]] = {}
        self.aliases: dict[_Path, _Path] = {}

    def parse(self, text: str, filename: str, at: _Path = ()) -> Any:
        """Parse ``text`` and record lines under ``at``. Raises ConfigError on bad syntax."""
        kind = "JSON" if filename.endswith(".json") else "YAML"
        try:
            node = YAML(typ="rt").load(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = exc.problem or exc.context or str(exc)
            if "'\\t'" in what:   # ruamel shows a tab escaped: "found character '\\t'"
                what += " (indent with spaces, not tabs)"
            raise ConfigError([ConfigProblem(_join(at), f"{kind} syntax error: {what}", filename,
                                             mark.line + 1 if mark else None)]) from None
        except YAMLError as exc:
            raise ConfigError([ConfigProblem(_join(at), f"{kind} syntax error: {exc}", filename)]) from None
        return self._plain(node, at, filename)

    def _plain(self, node: Any, path: _Path, filename: str) -> Any:
        # ruamel's round-trip types → plain Python, so hooks and equality see ordinary values.
        if isinstance(node, CommentedMap):
            out = {}
            for key, value in node.items():
                key = self._plain(key, (), filename)
                self._record(path + (key,), filename, node.lc, "key", key)
                out[key] = self._plain(value, path + (key,), filename)
            return out
        if isinstance(node, CommentedSeq):
            items = []
            for i, value in enumerate(node):
                self._record(path + (i,), filename, node.lc, "item", i)
                items.append(self._plain(value, path + (i,), filename))
            return items
        if isinstance(node, ScalarBoolean):   # an int subclass; must not become 1
            return bool(node)
        for plain in (str, bool, int, float):
            if isinstance(node, plain):
                return plain(node)
        return node

    def _record(self, path: _Path, filename: str, lc: Any, kind: str, key: Any) -> None:
        try:
            line = (lc.key(key) if kind == "key" else lc.item(key))[0]
        except (KeyError, TypeError, AttributeError):   # merged (<<:) keys have no position
            return
        self.where[path] = (filename, line + 1)

    def user_path(self, path: _Path) -> _Path:
        for ours, theirs in self.aliases.items():
            if path[:len(ours)] == ours:
                return theirs + path[len(ours):]
        return path

    def problem(self, path: _Path, message: str) -> ConfigProblem:
        """A problem at ``path``, located at its own line or its nearest ancestor's."""
        path = self.user_path(path)
        probe = path
        while probe and probe not in self.where:
            probe = probe[:-1]
        file, line = self.where.get(probe, (self.filename, None))
        return ConfigProblem(_join(path), message, file, line)


_IDENTIFIER = re.compile(r"^[A-Za-z_][\w-]*$")


def _join(path: _Path) -> str:
    """``("network", "connections", 0, "tgt")`` → ``network.connections[0].tgt``."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        elif isinstance(key, str) and _IDENTIFIER.match(key):
            out += f".{key}" if out else key
        else:
            out += f"[{key!r}]"
    return out


# -- shape adaptation before typing --------------------------------------------------------------

_SANDBOX = ("workspace", "sandbox")

# The seed's flat workspace.sandbox keys and where each lands in the nested form.
_FLAT_SANDBOX_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "python_image": (("python", "image"),),
    "javascript_image": (("javascript", "image"),),
    "preload_count": (("pool", "preload_count"),),
    "max_pool_size": (("pool", "max_size"),),
    "memory_limit": (("python", "memory"), ("javascript", "memory")),
    "cpu_limit": (("python", "cpu"), ("javascript", "cpu")),
}
_DEFAULT_IMAGES = {"python": SandboxConfig().python.image, "javascript": SandboxConfig().javascript.image}


def _adapt_sandbox(sandbox: dict, doc: _Document) -> list[ConfigProblem]:
    """Move flat keys onto the nested form; fill each runtime section's default image.

    A flat key and its nested twin both given is a problem: which one was meant is a guess.
    """
    problems = []
    for flat, targets in _FLAT_SANDBOX_KEYS.items():
        if flat not in sandbox:
            continue
        value = sandbox.pop(flat)
        for section, key in targets:
            nested = sandbox.setdefault(section, {})
            if not isinstance(nested, dict):
                continue                      # "python: 5" is reported by the converter
            if key in nested:
                problems.append(doc.problem(_SANDBOX + (flat,),
                                            f"conflicts with {section}.{key}; give only one of them"))
                continue
            nested[key] = value
            doc.aliases[_SANDBOX + (section, key)] = _SANDBOX + (flat,)
    for runtime, image in _DEFAULT_IMAGES.items():
        if isinstance(sandbox.get(runtime), dict):
            sandbox[runtime].setdefault("image", image)
    return problems


# FBP JSON graph keys that configure an editor, not the running network.
_IGNORED_GRAPH_KEYS = ("properties", "groups")


def _read_graph(relative: str, base_dir: Path, doc: _Document) -> Any:
    """``network: graph.json`` → that file's FBP JSON graph (JSON is YAML: lines come free).

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    shown = os.path.join(os.path.dirname(doc.filename), relative)
    try:
        text = (base_dir / relative).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([doc.problem(("network",), f"cannot read the graph file {shown}: {reason}")]) from None
    if relative.endswith(".json"):
        # YAML would accept broken JSON ('{"a": }' is {a: null}); hold a .json file to JSON.
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([ConfigProblem("network", f"JSON syntax error: {exc.msg}", shown, exc.lineno)]) from None
    graph = doc.parse(text, shown, at=("network",))
    if isinstance(graph, dict):
        for key in _IGNORED_GRAPH_KEYS:
            graph.pop(key, None)
    return graph


# -- cattrs errors → problems --------------------------------------------------------------------


def _leaves(exc: BaseException, path: _Path, type_: Any = None) -> Iterator[tuple[_Path, BaseException, Any]]:
    """Every leaf error of a cattrs validation tree, with its key path (as cattrs.transform_error walks)."""
    if isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _leaves(sub, path + (note.index,), note.type)
        for sub in without:
            yield from _leaves(sub, path, None)
    elif isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _leaves(sub, path + (note.name,), note.type)
        for sub in without:
            yield from _leaves(sub, path, None)
    else:
        yield path, exc, type_


def _problems_from(exc: BaseException, at: _Path, data: Any, doc: _Document) -> Iterator[ConfigProblem]:
    for path, leaf, type_ in _leaves(exc, at):
        if isinstance(leaf, ForbiddenExtraKeysError):
            known = [f.name for f in attrs.fields(leaf.cl)]
            if leaf.cl is SandboxConfig:
                known += list(_FLAT_SANDBOX_KEYS)
            for key in sorted(leaf.extra_fields, key=str):
                yield doc.problem(path + (key,), _unknown_key(key, known))
        elif isinstance(leaf, KeyError):
            yield doc.problem(path, "required key missing")
        elif isinstance(leaf, ValueError):
            yield doc.problem(path, str(leaf))
        else:   # cattrs' own TypeError/AttributeError: the value had the wrong shape
            yield doc.problem(path, f"expected {_describe(type_)}, got {_value_at(data, path)!r}")


def _unknown_key(key: object, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(sorted(known))})"


def _describe(type_: Any) -> str:
    if typing.get_origin(type_) in (typing.Union, types.UnionType):   # X | None: None was fine too
        type_ = next(t for t in typing.get_args(type_) if t is not type(None))
    origin = typing.get_origin(type_) or type_
    if origin in (dict, Mapping) or attrs.has(origin):
        return "a mapping of keys"
    if origin in (tuple, list):
        return "a list"
    return getattr(type_, "__name__", str(type_))


def _value_at(data: Any, path: _Path) -> Any:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# -- checks that span fields ---------------------------------------------------------------------


def _workspace_checks(ws: WorkspaceConfig) -> Iterator[tuple[_Path, str]]:
    pool = ws.sandbox.pool
    if pool.preload_count > pool.max_size:
        yield _SANDBOX + ("pool", "preload_count"), f"{pool.preload_count} is more than max_size ({pool.max_size})"
    if not ws.redis.namespace or any(c in ws.redis.namespace for c in "{}:") or not ws.redis.namespace.isprintable():
        # It starts every key; in a Redis Cluster a brace in it would become the hash tag (core.keys).
        yield ("workspace", "redis", "namespace"), (f"{ws.redis.namespace!r} is not a namespace: use printable "
                                                    "characters other than ':', '{' and '}'")


def _supervision_checks(sup: SupervisionConfig) -> Iterator[tuple[_Path, str]]:
    backoffs = [(("supervision", "backoff"), sup.backoff)]
    backoffs += [(("supervision", "groups", name, "backoff"), g.backoff) for name, g in sup.groups.items()]
    for path, b in backoffs:
        if b.min > b.max:
            yield path + ("min",), f"{b.min}s is more than max ({b.max}s)"
    # A process in two groups would be supervised twice.
    owner: dict[str, str] = {}
    for name, group in sup.groups.items():
        for i, member in enumerate(group.members):
            if owner.setdefault(member, name) != name:
                yield ("supervision", "groups", name, "members", i), f"{member!r} is already in group {owner[member]!r}"


def _network_checks(net: NetworkConfig) -> Iterator[tuple[_Path, str]]:
    """Every reference to a process names a declared one (components and ports: ``check_components``)."""
    def check(path: _Path, ref: PortRef | None) -> Iterator[tuple[_Path, str]]:
        if ref is not None and ref.process not in net.processes:
            known = ", ".join(sorted(net.processes)) or "none declared"
            yield path + ("process",), f"unknown process {ref.process!r} (processes: {known})"

    for name in net.processes:
        if any(c in name for c in ":{}") or not name.strip():
            # ':' separates a process's Redis keys ({namespace}:{process}:state:…) and the API's
            # component:process form: "a:state:b" could write process a's keys from process a:state.
            # A name is its keys' hash tag in a Redis Cluster (core.keys): braces would cut it.
            yield ("network", "processes", name), "a process name must be non-blank and may not contain ':', '{' or '}'"
    for i, conn in enumerate(net.connections):
        yield from check(("network", "connections", i, "src"), conn.src)
        yield from check(("network", "connections", i, "tgt"), conn.tgt)
    for kind, ports in (("inports", net.inports), ("outports", net.outports)):
        for name, ref in ports.items():
            yield from check(("network", kind, name), ref)


_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _cluster_checks(cluster: ClusterConfig) -> Iterator[tuple[_Path, str]]:
    if cluster.host_id is not None and not _HOST_ID.fullmatch(cluster.host_id):
        # It names Redis keys and shows in status: keep it to a plain token.
        yield ("cluster", "host_id"), (f"{cluster.host_id!r} is not a host id: use 1-128 letters, digits, "
                                       "'.', '_' or '-', starting with a letter or digit")
    if cluster.lease_ttl < 0.3:
        yield ("cluster", "lease_ttl"), f"{cluster.lease_ttl}s is too short: at least 0.3s (renewed every third)"
    if cluster.advertise is not None and not re.fullmatch(r"wss?://[^\s/]+(:[0-9]+)?/?", cluster.advertise):
        yield ("cluster", "advertise"), f"expected ws://ADDRESS:PORT, got {cluster.advertise!r}"
    for i, label in enumerate(cluster.labels):
        if not label.strip():
            yield ("cluster", "labels", i), "a label must be non-blank"


# -- environment overrides -----------------------------------------------------------------------


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], list[ConfigProblem]]:
    """``REFLOW_REDIS_URL``, ``REFLOW_WS_PORT``, ``REFLOW_TOKEN``, ``REFLOW_HOST_ID`` → per-section
    overrides; empty means unset."""
    redis: dict[str, Any] = {}
    websocket: dict[str, Any] = {}
    problems = []
    if env.get("REFLOW_REDIS_URL"):
        redis["url"] = env["REFLOW_REDIS_URL"]
    if env.get("REFLOW_WS_PORT"):
        raw = env["REFLOW_WS_PORT"]
        try:
            if not re.fullmatch(r"\s*[0-9]+\s*", raw):   # int() would also take "8_080" and "+80"
                raise ValueError(raw)
            websocket["port"] = _port(int(raw))
        except ValueError:
            problems.append(ConfigProblem("REFLOW_WS_PORT", f"expected a port number 0..65535, got {raw!r}"))
    if env.get("REFLOW_TOKEN"):
        websocket["token"] = env["REFLOW_TOKEN"]
    cluster: dict[str, Any] = {}
    if env.get("REFLOW_HOST_ID"):
        if _HOST_ID.fullmatch(env["REFLOW_HOST_ID"]):
            cluster["host_id"] = env["REFLOW_HOST_ID"]
        else:
            problems.append(ConfigProblem("REFLOW_HOST_ID", f"{env['REFLOW_HOST_ID']!r} is not a host id: use "
                                          "1-128 letters, digits, '.', '_' or '-'"))
    return {"redis": redis, "websocket": websocket, "cluster": cluster}, problems


def _resolve_paths(ws: WorkspaceConfig, base_dir: Path) -> WorkspaceConfig:
    def at(p: Path) -> Path:
        return (base_dir / p).resolve()

    sb = ws.sandbox
    runtimes = {name: attrs.evolve(rt, rootfs=at(rt.rootfs)) if rt.rootfs is not None else rt
                for name, rt in (("python", sb.python), ("javascript", sb.javascript))}
    return attrs.evolve(ws, root=at(ws.root), state_dir=at(ws.state_dir),
                        scripts=tuple(str(at(Path(s).expanduser())) for s in ws.scripts),
                        sandbox=attrs.evolve(sb, **runtimes))


# -- entry points --------------------------------------------------------------------------------


def parse_config(text: str, *, filename: str = "reflow.yaml", base_dir: Path,
                 env: Mapping[str, str] = os.environ) -> Config:
    """Parse and validate the text of a reflow.yaml.

    Args:
        text: the YAML text (empty → all defaults).
        filename: how problems name the file.
        base_dir: what relative paths (``workspace.root``, ``network: graph.json``, …) are
            relative to; normally the config file's directory.
        env: where ``REFLOW_REDIS_URL`` / ``REFLOW_WS_PORT`` / ``REFLOW_TOKEN`` are read.

    Raises:
        ConfigError: with every problem found (syntax, unknown keys, bad values, dangling
            references, bad environment overrides), in file order.

    Reads no file except a graph file named by ``network:``.
    """
    base_dir = Path(base_dir).resolve()
    doc = _Document(filename)
    data = doc.parse(text, filename)
    if data is None:                   # an empty file, or only comments
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([doc.problem((), f"expected a mapping with workspace:, supervision:, network:; "
                                           f"got {data!r}")])
    problems: list[ConfigProblem] = []
    workspace = data.get("workspace")
    if isinstance(workspace, dict) and isinstance(workspace.get("sandbox"), dict):
        problems += _adapt_sandbox(workspace["sandbox"], doc)
    graph_file = None
    net = data.get("network")
    if isinstance(net, dict) and list(net) == ["graph"] and isinstance(net["graph"], str):
        data["network"] = net = net["graph"]  # ``network: {graph: FILE}`` is ``network: FILE``
    if isinstance(net, str):
        graph_file = (base_dir / net).expanduser()
        try:
            data["network"] = _read_graph(net, base_dir, doc)
        except ConfigError as exc:
            problems += exc.problems
            data["network"] = None

    # Each section is structured on its own, so one broken section does not hide the
    # cross-field problems of the others.
    problems += (doc.problem((key,), _unknown_key(key, list(_SECTIONS))) for key in data if key not in _SECTIONS)
    sections: dict[str, Any] = {}
    for name, (type_, checks) in _SECTIONS.items():
        try:
            sections[name] = section = converter.structure(data.get(name), type_)
        except ClassValidationError as exc:
            problems += _problems_from(exc, (name,), data, doc)
        except ValueError as exc:      # the section is not a mapping
            problems.append(doc.problem((name,), str(exc)))
        else:
            if section is not None:
                problems += (doc.problem(path, message) for path, message in checks(section))
    overrides, env_problems = _env_overrides(env)
    problems += env_problems
    if problems:
        raise ConfigError(_in_file_order(problems, filename))

    cluster = attrs.evolve(sections["cluster"], **overrides.pop("cluster"))
    ws = sections["workspace"]
    ws = attrs.evolve(ws, **{section: attrs.evolve(getattr(ws, section), **values)
                             for section, values in overrides.items()})
    return Config(workspace=_resolve_paths(ws, base_dir), supervision=sections["supervision"],
                  network=sections["network"], path=None, base_dir=base_dir, doc=doc, graph_file=graph_file,
                  cluster=cluster)


# The top level: each section's type, and the checks that span its fields.
_SECTIONS: dict[str, tuple[Any, typing.Callable[[Any], Iterator[tuple[_Path, str]]]]] = {
    "workspace": (WorkspaceConfig, _workspace_checks),
    "supervision": (SupervisionConfig, _supervision_checks),
    "network": (NetworkConfig | None, _network_checks),
    "cluster": (ClusterConfig, _cluster_checks),
}


def _in_file_order(problems: list[ConfigProblem], filename: str) -> list[ConfigProblem]:
    unique = list(dict.fromkeys(problems))   # a flat key feeding two runtimes fails twice alike
    files = [filename] + sorted({p.file for p in unique if p.file and p.file != filename})
    return sorted(unique, key=lambda p: (files.index(p.file) if p.file in files else len(files),
                                         p.line if p.line is not None else float("inf")))


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] = os.environ) -> Config:
    """Load a reflow.yaml; ``None`` means all defaults, relative to the current directory.

    Raises:
        ConfigError: the file cannot be read (the problem names it), or see ``parse_config``.
    """
    if path is None:
        return parse_config("", filename="(defaults)", base_dir=Path.cwd(), env=env)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([ConfigProblem("", f"cannot read the config file: {reason}", str(p))]) from None
    config = parse_config(text, filename=str(p), base_dir=p.parent, env=env)
    return attrs.evolve(config, path=p)


# -- the config against the discovered components ------------------------------------------------
# Discovery reads each script's metadata without running it, so everything ``run`` would
# reject about names, ports and process config can be found before anything starts.

# Top-level keys that make a config_schema a JSON Schema rather than the shorthand.
_SCHEMA_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "$defs", "$comment", "definitions", "type", "properties", "required",
    "additionalProperties", "patternProperties", "propertyNames", "minProperties", "maxProperties",
    "dependentRequired", "dependentSchemas", "unevaluatedProperties", "items", "prefixItems", "contains",
    "minItems", "maxItems", "uniqueItems", "enum", "const", "allOf", "anyOf", "oneOf", "not", "if", "then",
    "else", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
    "maxLength", "pattern", "format", "title", "description", "default", "examples"})
_JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")


def config_json_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Schema an actor's ``config_schema`` stands for.

    A mapping with any JSON Schema keyword at its top level (``type``, ``properties``,
    ``required``, ``$schema``, …) is a JSON Schema and is used as it is; ``{}`` accepts
    any config. Anything else is the shorthand ``{key: TYPE}``: the config is an object
    whose ``key``, when present, has that JSON type (``"number"``, ``["string", "null"]``)
    or matches that nested mapping (itself a schema or shorthand); other keys are allowed.

    Raises:
        ValueError: a shorthand value that is neither a JSON type name, a list of them,
            nor a mapping.
    """
    if not schema or any(k in _SCHEMA_KEYWORDS for k in schema):
        return dict(schema)
    props: dict[str, Any] = {}
    for key, value in schema.items():
        names = [value] if isinstance(value, str) else value
        if isinstance(value, Mapping):
            props[key] = config_json_schema(value)
        elif isinstance(names, list) and names and all(isinstance(n, str) and n in _JSON_TYPES for n in names):
            props[key] = {"type": value}
        else:
            raise ValueError(f"{key!r}: {value!r} is not a JSON type ({', '.join(_JSON_TYPES)}), a list of them, "
                             "or a schema")
    return {"type": "object", "properties": props}


def _schema_problems(config: Any, schema: Mapping[str, Any], comp: Any) -> Iterator[tuple[_Path, str]]:
    import jsonschema  # only when there is a schema to check: it is slow to import

    where = f"{getattr(comp.file, 'name', comp.file)}:{comp.line}"
    try:
        full = config_json_schema(schema)
        cls = jsonschema.validators.validator_for(full)
        cls.check_schema(full)
    except (ValueError, jsonschema.SchemaError) as exc:
        why = exc.message if isinstance(exc, jsonschema.SchemaError) else str(exc)
        yield (), f"{comp.name}'s config_schema ({where}) is not a valid JSON Schema: {why}"
        return
    errors = cls(full).iter_errors(config)
    for err in sorted(errors, key=lambda e: [str(k) for k in e.absolute_path]):
        yield tuple(err.absolute_path), err.message


def check_components(config: Config, components: typing.Iterable[Any],
                     library: Mapping[str, Any] | None = None) -> list[ConfigProblem]:
    """What ``run`` would reject about this config given these discovered components.

    Checks that each network process names a discovered component, that connections and
    exported ports name ports the component declares (an undecorated ``process(context)``
    script takes any port; ``error`` is every actor's outport), and that each process's
    config matches its component's ``config_schema`` (see ``config_json_schema``). Without
    a network, each component's ``supervision.actors.NAME.config`` is checked.

    ``components`` are ``ComponentSpec``s (``name``, ``inports``, ``outports``,
    ``dynamic_ports``, ``config_schema``, ``file``, ``line``). ``library`` is the package's
    own components by name, which a network may name too (``core/Repeat`` …, CONTRACT §7;
    the caller reads them: ``supervisor.components.package_components()``). Pure: reads no
    file. Returns every problem, located at its key's line, in file order.
    """
    comps = {**(library or {}), **{c.name: c for c in components}} if config.network is not None \
        else {c.name: c for c in components}
    net = config.network
    found: list[tuple[_Path, str]] = []
    if net is None:
        for comp in comps.values():
            ov = config.supervision.actors.get(comp.name)
            if comp.config_schema is not None:
                at: _Path = ("supervision", "actors", comp.name, "config")
                found += ((at + p, m) for p, m in _schema_problems(dict((ov.config if ov else None) or {}),
                                                                    comp.config_schema, comp))
    else:
        known = ", ".join(sorted(c.name for c in components)) or "none"
        of: dict[str, Any] = {}
        for name, proc in net.processes.items():
            comp = comps.get(proc.component)
            if comp is None:
                found.append((("network", "processes", name, "component"),
                              f"unknown component {proc.component!r} (discovered: {known})"))
                continue
            of[name] = comp
            if comp.config_schema is not None:
                at = ("network", "processes", name, "config")
                found += ((at + p, m) for p, m in _schema_problems(dict(proc.config), comp.config_schema, comp))

        def port(path: _Path, ref: PortRef | None, kind: str) -> None:
            comp = of.get(ref.process) if ref is not None else None
            if comp is None or comp.dynamic_ports:
                return
            declared = tuple(comp.inports) if kind == "inport" else (*comp.outports, "error")
            if ref.port not in declared:
                listed = ", ".join(comp.inports if kind == "inport" else comp.outports) or "none"
                found.append((path + ("port",), f"{comp.name} has no {kind} {ref.port!r} ({kind}s: {listed})"))

        for i, conn in enumerate(net.connections):
            port(("network", "connections", i, "src"), conn.src, "outport")
            port(("network", "connections", i, "tgt"), conn.tgt, "inport")
        for name, ref in net.inports.items():
            port(("network", "inports", name), ref, "inport")
        for name, ref in net.outports.items():
            port(("network", "outports", name), ref, "outport")
    doc = config.doc if config.doc is not None else _Document(str(config.path or "(defaults)"))
    problems = [doc.problem(path, message) for path, message in found]
    return _in_file_order(problems, doc.filename)
