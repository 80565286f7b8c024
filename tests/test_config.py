"""reflow.yaml loading (CONTRACT §2): the seed's flat form and the nested form load verbatim;
every problem is reported at once, named by key path and file:line."""

from __future__ import annotations

import io
import json
import types
import typing
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

import supervisor.core.config as config_module
from supervisor.core.config import (NO_DATA, ActorOverride, ConfigError, ConfigProblem, ConnectionConfig, GroupConfig,
                                    NetworkConfig, PortRef, ProcessConfig, SupervisionConfig, WorkspaceConfig,
                                    load_config, parse_config)
from supervisor.core.units import format_size

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"

# The `# reflow.yaml` block of seeds/004_907eda7e1530af8d.txt, byte for byte (blank lines keep
# their two trailing spaces); test_embedded_copies_match_the_shared_sources guards the copy.
SEED_YAML = """\
# reflow.yaml
workspace:
  discover_scripts: true
  script_patterns:
    - "**/*.actor.py"
    - "**/*.actor.js"
  
  sandbox:
    python_image: "python:3.11"
    javascript_image: "node:20"
    preload_count: 5
    max_pool_size: 20
    memory_limit: "512MB"
    cpu_limit: 0.5
  
  redis:
    url: "redis://localhost:6379"
    namespace: "reflow"
    ttl: 3600
  
  websocket:
    port: 8080
    max_connections: 100
    ping_interval: 30
"""

# The example of CONTRACT.md §2, verbatim.
CONTRACT_YAML = """\
workspace:
  root: .
  discover_scripts: true
  script_patterns: ["**/*.actor.py", "**/*.actor.js"]
  excluded_paths: ["**/node_modules/**", "**/__pycache__/**"]
  hot_reload: true
  sandbox:
    backend: auto            # auto | microsandbox | bubblewrap | process
    python:     {image: "python:3.11", packages: [], memory: 512MB, cpu: 0.5}
    javascript: {image: "node:20",     packages: [], memory: 512MB, cpu: 0.5}
    pool: {preload_count: 5, max_size: 20, idle_timeout: 300s}
  redis:
    url: redis://localhost:6379   # absent → embedded Redis under .reflow/ (persistent)
    namespace: reflow
    ttl: 3600
  websocket: {host: 127.0.0.1, port: 8080, max_connections: 100, ping_interval: 30, max_frame_size: 10MB, token: null}
supervision:                       # OTP semantics
  strategy: one_for_one            # one_for_one | one_for_all | rest_for_one
  max_restarts: 3                  # intensity …
  max_seconds: 5                   # … per period; exceeded → this supervisor fails to its parent
  backoff: {min: 10ms, max: 5s, jitter: 0.2}
  actors:                          # per actor overrides
    DataProcessor: {restart: permanent, timeout: 30s, max_deliveries: 5}
network:                           # FBP JSON graph shape (processes / connections / IIPs)
  processes:
    double: {component: Calculator, config: {factor: 2}}  # → context.get_config(); checked
    log: {component: Logger}                              #   against the actor's config_schema
  connections:
    - {src: {process: double, port: result}, tgt: {process: log, port: line}}
    - {data: 2, tgt: {process: double, port: factor}}
"""

BASE = Path("/srv/project")


def parse(text: str, env: dict[str, str] | None = None, **kw: typing.Any):
    return parse_config(text, base_dir=kw.pop("base_dir", BASE), env=env or {}, **kw)


def problems(text: str, env: dict[str, str] | None = None, **kw: typing.Any) -> dict[str, ConfigProblem]:
    with pytest.raises(ConfigError) as err:
        parse(text, env, **kw)
    assert str(err.value) == "\n".join(str(p) for p in err.value.problems)
    by_path = {p.path: p for p in err.value.problems}
    assert len(by_path) == len(err.value.problems), err.value.problems
    return by_path


def dump(doc: dict) -> str:
    out = io.StringIO()
    YAML().dump(doc, out)
    return out.getvalue()


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing ``needle`` (the oracle for reported lines)."""
    (line,) = [i for i, s in enumerate(text.splitlines(), 1) if needle in s]
    return line


# -- the two forms the contract promises --------------------------------------------------------


@pytest.mark.skipif(not SHARED.exists(), reason="shared/ is not beside the checkout")
def test_embedded_copies_match_the_shared_sources():
    seed = (SHARED / "seeds" / "004_907eda7e1530af8d.txt").read_text()
    assert "```yaml\n" + SEED_YAML + "```" in seed
    assert "```yaml\n" + CONTRACT_YAML + "```" in (SHARED / "CONTRACT.md").read_text()


def test_seed_flat_form_loads_verbatim_onto_the_nested_form():
    c = parse(SEED_YAML)
    sb = c.workspace.sandbox
    assert (sb.python.image, sb.javascript.image) == ("python:3.11", "node:20")
    assert (sb.pool.preload_count, sb.pool.max_size) == (5, 20)
    assert sb.python.memory == sb.javascript.memory == 512 * 10**6
    assert sb.python.cpu == sb.javascript.cpu == 0.5
    assert c.workspace.discover_scripts is True
    assert c.workspace.script_patterns == ("**/*.actor.py", "**/*.actor.js")
    assert c.workspace.redis == config_module.RedisConfig(url="redis://localhost:6379", namespace="reflow", ttl=3600.0)
    ws = c.workspace.websocket
    assert (ws.port, ws.max_connections, ws.ping_interval, ws.host) == (8080, 100, 30.0, "127.0.0.1")
    assert c.network is None and c.supervision == SupervisionConfig()


def test_contract_nested_form_loads_verbatim():
    c = parse(CONTRACT_YAML)
    w = c.workspace
    assert w.root == BASE and w.state_dir == BASE / ".reflow" and w.hot_reload
    assert w.excluded_paths == ("**/node_modules/**", "**/__pycache__/**")
    assert w.sandbox.backend == "auto" and w.sandbox.python.packages == ()
    assert w.sandbox.pool.idle_timeout == 300.0 and w.sandbox.pool.preload_count == 5
    assert w.redis.ttl == 3600.0 and w.redis.url == "redis://localhost:6379"
    assert w.websocket.max_frame_size == 10 * 10**6 and w.websocket.token is None
    s = c.supervision
    assert (s.strategy, s.max_restarts, s.max_seconds) == ("one_for_one", 3, 5.0)
    assert (s.backoff.min, s.backoff.max, s.backoff.jitter, s.backoff.reset_after) == (0.01, 5.0, 0.2, 10.0)
    assert s.actors == {"DataProcessor": ActorOverride(restart="permanent", timeout=30.0, max_deliveries=5)}
    assert c.network == NetworkConfig(
        processes={"double": ProcessConfig("Calculator", config={"factor": 2}), "log": ProcessConfig("Logger")},
        connections=(ConnectionConfig(src=PortRef("double", "result"), tgt=PortRef("log", "line")),
                     ConnectionConfig(data=2, tgt=PortRef("double", "factor"))))
    assert c.network.connections[0].data is NO_DATA


def test_defaults_for_an_empty_file_and_empty_sections():
    empty = parse("")
    assert parse("# nothing yet\nworkspace:\nsupervision:\n  backoff:\n") == empty
    assert empty.workspace.sandbox.max_output == 16 * 2**20 and empty.workspace.sandbox.cpu_seconds == 3600
    assert empty.workspace.mailbox.kind == "redis" and empty.supervision.shutdown_grace == 10.0
    assert empty.supervision.backoff.reset_after == 10.0
    assert parse("supervision: {backoff: {reset: 1m}}").supervision.backoff.reset_after == 60.0


def test_anchored_scalars_keep_their_type():
    # ruamel gives an anchored `false` as an int subclass; it must still be a bool.
    w = parse("workspace: {hot_reload: &off false, discover_scripts: *off, websocket: {port: &p 9000, "
              "max_connections: *p}, redis: {namespace: &n ns, url: *n}}").workspace
    assert w.hot_reload is False and w.discover_scripts is False
    assert type(w.websocket.port) is int and w.websocket.max_connections == 9000
    assert type(w.redis.namespace) is str and w.redis.url == "ns"


def test_a_runtime_section_without_image_keeps_its_default_image():
    sb = parse("workspace: {sandbox: {javascript: {cpu: 2}, memory_limit: 1GB}}").workspace.sandbox
    assert (sb.javascript.image, sb.javascript.memory, sb.javascript.cpu) == ("node:20", 10**9, 2.0)
    assert (sb.python.image, sb.python.memory) == ("python:3.11", 10**9)


# -- problems name the key path and the line ----------------------------------------------------


def test_problem_renders_as_path_message_file_line():
    text = "workspace:\n  sandbox:\n    python:\n      memory: lots\n"
    (p,) = problems(text, filename="reflow.yaml").values()
    assert p == ConfigProblem("workspace.sandbox.python.memory",
                              "expected a size like 512MB, 64KiB or a number of bytes, got 'lots'", "reflow.yaml", 4)
    assert str(p) == ("workspace.sandbox.python.memory: expected a size like 512MB, 64KiB or a number of bytes, "
                      "got 'lots' (reflow.yaml:4)")
    assert str(ConfigProblem("REFLOW_WS_PORT", "bad")) == "REFLOW_WS_PORT: bad"


def test_a_bad_flat_key_is_named_as_written():
    text = SEED_YAML.replace('memory_limit: "512MB"', "memory_limit: lots").replace(
        '"python:3.11"', "3.11").replace("cpu_limit: 0.5", "cpu_limit: half")
    found = problems(text)
    assert set(found) == {"workspace.sandbox.memory_limit", "workspace.sandbox.python_image",
                          "workspace.sandbox.cpu_limit"}
    assert "size like 512MB" in found["workspace.sandbox.memory_limit"].message
    assert found["workspace.sandbox.memory_limit"].line == line_of(text, "memory_limit")
    assert found["workspace.sandbox.python_image"].line == line_of(text, "python_image")
    assert "positive number of CPUs" in found["workspace.sandbox.cpu_limit"].message


def test_a_flat_key_and_its_nested_twin_conflict():
    found = problems("workspace:\n  sandbox:\n    pool: {preload_count: 1}\n    preload_count: 2\n")
    assert found["workspace.sandbox.preload_count"].line == 4
    assert "pool.preload_count" in found["workspace.sandbox.preload_count"].message


@pytest.mark.parametrize(("yaml", "path", "fragment"), [
    ("workspace: {sandbox: {max_output: 12 parsecs}}", "workspace.sandbox.max_output", "size like 512MB"),
    ("workspace: {sandbox: {tmp_size: -1}}", "workspace.sandbox.tmp_size", "negative"),
    ("workspace: {sandbox: {pool: {idle_timeout: soon}}}", "workspace.sandbox.pool.idle_timeout", "duration"),
    ("workspace: {sandbox: {cpu_seconds: -2}}", "workspace.sandbox.cpu_seconds", "negative"),
    ("workspace: {sandbox: {backend: docker}}", "workspace.sandbox.backend",
     "one of auto, microsandbox, bubblewrap, process; got 'docker'"),
    ("supervision: {strategy: one_for_none}", "supervision.strategy", "one of one_for_one, one_for_all, rest_for_one"),
    ("supervision: {actors: {A: {restart: sometimes}}}", "supervision.actors.A.restart",
     "one of permanent, transient, temporary"),
    ("workspace: {mailbox: {kind: kafka}}", "workspace.mailbox.kind", "one of redis, memory"),
    ("workspace: {websocket: {port: 70000}}", "workspace.websocket.port", "0..65535"),
    ("workspace: {websocket: {port: '8080'}}", "workspace.websocket.port", "0..65535"),
    ("supervision: {max_restarts: -1}", "supervision.max_restarts", "≥ 0"),
    ("supervision: {backoff: {jitter: 1.5}}", "supervision.backoff.jitter", "fraction 0..1"),
    ("workspace: {hot_reload: yes}", "workspace.hot_reload", "true or false"),
    ("workspace: {script_patterns: '**/*.py'}", "workspace.script_patterns", "a list"),
    ("workspace: {redis: {namespace: 7}}", "workspace.redis.namespace", "a string"),
    ("workspace: {redis: [1]}", "workspace.redis", "a mapping"),
    ("supervision: {actors: [DataProcessor]}", "supervision.actors", "a mapping"),
    ("network: {processes: {a: {}}}", "network.processes.a.component", "required key missing"),
    ("supervision: {groups: {g: {strategy: one_for_all}}}", "supervision.groups.g.members", "required key missing"),
])
def test_bad_values_name_their_key(yaml, path, fragment):
    (p,) = problems(yaml).values()
    assert p.path == path and fragment in p.message and p.line == 1


def test_unknown_keys_suggest_what_was_meant():
    found = problems("workspace:\n  sandbox:\n    memory_limt: 1GB\nsupervision: {actors: {'x.y': {bogus: 1}}}\n")
    assert found["workspace.sandbox.memory_limt"].message == "unknown key (did you mean 'memory_limit'?)"
    assert found["workspace.sandbox.memory_limt"].line == 3
    assert found["supervision.actors['x.y'].bogus"].message.startswith("unknown key (expected one of: config,")


def _schema_sites() -> list[tuple[tuple[str | int, ...], list[type]]]:
    """Every mapping the schema has: (path with "NAME" for dict keys, the class at each step)."""
    sites: list[tuple[tuple[str | int, ...], list[type]]] = [((), [])]

    def walk(cls: type, path: tuple[str | int, ...], chain: list[type]) -> None:
        sites.append((path, chain))
        for f in attrs.fields(attrs.resolve_types(cls)):
            t = f.type
            if typing.get_origin(t) in (typing.Union, types.UnionType):
                t = next(a for a in typing.get_args(t) if a is not type(None))
            args = typing.get_args(t)
            if attrs.has(t):
                walk(t, path + (f.name,), chain + [t])
            elif typing.get_origin(t) is dict and attrs.has(args[1]):
                walk(args[1], path + (f.name, "NAME"), chain + [dict, args[1]])
            elif typing.get_origin(t) is tuple and attrs.has(args[0]):
                walk(args[0], path + (f.name, 0), chain + [list, args[0]])

    for name, (cls, _) in config_module._SECTIONS.items():
        if typing.get_origin(cls) is not None:
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
        walk(cls, (name,), [cls])
    return sites


# What a mapping of each class needs besides the unknown key, to be otherwise valid.
_REQUIRED = {GroupConfig: {"members": []}, ProcessConfig: {"component": "C"}, NetworkConfig: {"processes": {}},
             PortRef: {"process": "p", "port": "x"}, ConnectionConfig: {"tgt": {"process": "p", "port": "x"}}}
SITES = _schema_sites()


def test_the_schema_walk_reaches_every_depth():
    paths = {p for p, _ in SITES}
    assert {(), ("workspace", "sandbox", "python"), ("supervision", "actors", "NAME"),
            ("supervision", "groups", "NAME", "backoff"), ("network", "connections", 0, "tgt"),
            ("network", "inports", "NAME")} <= paths


@settings(max_examples=150, deadline=None)
@given(site=st.sampled_from(SITES), key=st.from_regex(r"[a-z]{1,8}_zz", fullmatch=True),
       name=st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True))
def test_any_unknown_key_at_any_level_is_reported_with_path_and_line(site, key, name):
    path, chain = site
    path = tuple(name if step == "NAME" else step for step in path)
    doc: dict = {}
    node: typing.Any = doc
    for step, cls in zip(path, chain):
        child: typing.Any = [] if cls is list else {}
        if isinstance(node, list):
            node.append(child)
        else:
            node[step] = child
        node = child
    node[key] = 1
    # Then what each mapping on the way requires, after the unknown key.
    node = doc
    for step, cls in zip(path, chain):
        node = node[step]
        for k, v in _REQUIRED.get(cls, {}).items():
            node.setdefault(k, v)
        if cls is ConnectionConfig and "src" not in node:
            node["data"] = 1
    text = dump(doc)
    expected = ""
    for step in path + (key,):
        expected += f"[{step}]" if isinstance(step, int) else (f".{step}" if expected else step)
    (p,) = problems(text).values()
    assert p.path == expected
    assert p.message.startswith("unknown key")
    assert p.line == line_of(text, f"{key}:")


# Independent bad settings: each must be reported whichever others are also wrong.
BAD = [
    (("workspace", "root"), 5, "a path"),
    (("workspace", "sandbox", "memory_limit"), "lots", "size"),
    (("workspace", "sandbox", "python_image"), 3.11, "quote it"),
    (("workspace", "sandbox", "javascript", "cpu"), 0, "positive"),
    (("workspace", "sandbox", "pool", "max_size"), -1, "≥ 0"),
    (("workspace", "sandbox", "backend"), "docker", "one of"),
    (("workspace", "websocket", "port"), 65536, "0..65535"),
    (("workspace", "websocket", "ping_interval"), "often", "duration"),
    (("workspace", "redis", "ttl"), "forever", "duration"),
    (("workspace", "mailbox", "nope"), 1, "unknown key"),
    (("supervision", "strategy"), "all_for_one", "one of"),
    (("supervision", "backoff", "jitter"), -0.5, "fraction"),
    (("supervision", "actors", "A", "max_deliveries"), "five", "≥ 0"),
    (("supervision", "groups", "g", "members"), "a", "a list"),
    (("network", "processes", "p", "component"), 3, "a string"),
    (("network", "connections"), {"a": 1}, "a list"),
    (("top_level_typo",), 1, "unknown key"),
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(BAD), min_size=1, unique_by=lambda b: b[0]))
def test_every_problem_is_reported_at_once(bad):
    doc: dict = {}
    for path, value, _ in bad:
        node = doc
        for step in path[:-1]:
            node = node.setdefault(step, {})
        node[path[-1]] = value
    if "network" in doc:
        doc["network"].setdefault("processes", {})
    text = dump(doc)
    found = problems(text)
    assert set(found) == {".".join(path) for path, _, _ in bad}
    for path, _, fragment in bad:
        assert fragment in found[".".join(path)].message
    lines = [p.line for p in found.values()]
    assert all(isinstance(n, int) and 1 <= n <= len(text.splitlines()) for n in lines)


def test_problems_come_in_file_order_and_str_lists_them_one_per_line():
    text = "supervision: {strategy: x}\nworkspace:\n  websocket: {port: -1}\n  root: 5\n"
    with pytest.raises(ConfigError) as err:
        parse(text, filename="r.yaml", env={"REFLOW_WS_PORT": "nine"})
    assert [p.path for p in err.value.problems] == ["supervision.strategy", "workspace.websocket.port",
                                                    "workspace.root", "REFLOW_WS_PORT"]
    assert str(err.value).splitlines()[0].endswith("(r.yaml:1)")
    assert str(err.value).splitlines()[-1] == "REFLOW_WS_PORT: expected a port number 0..65535, got 'nine'"


# -- checks across fields -----------------------------------------------------------------------


def test_connections_and_exported_ports_must_name_declared_processes():
    text = """\
network:
  processes:
    a: {component: A}
  connections:
    - {data: 1, tgt: {process: a, port: in}}
    - {src: {process: x, port: out}, tgt: {process: a, port: in}}
  outports:
    OUT: {process: b, port: out}
"""
    found = problems(text)
    assert str(found["network.connections[1].src.process"]) == (
        "network.connections[1].src.process: unknown process 'x' (processes: a) (reflow.yaml:6)")
    assert found["network.outports.OUT.process"].line == 8


def test_a_process_name_cannot_reach_into_another_process_keys():
    # {namespace}:{process}:state:KEY — a process "a:state:b" would share process a's key space.
    found = problems("network:\n  processes:\n    a: {component: A}\n    'a:state:b': {component: A}\n")
    assert str(found["network.processes['a:state:b']"]).startswith(
        "network.processes['a:state:b']: a process name must be non-blank and may not contain ':'"), found
    assert "network.processes.a" not in found


def test_a_connection_has_exactly_one_of_src_and_data():
    text = ("network:\n  processes: {a: {component: A}}\n  connections:\n"
            "    - {tgt: {process: a, port: i}}\n"
            "    - {src: {process: a, port: o}, data: 1, tgt: {process: a}}\n")
    found = problems(text)
    assert "exactly one of src" in found["network.connections[0]"].message
    assert found["network.connections[0]"].line == 4
    # Reported together with the same connection's other problems.
    assert "exactly one of src" in found["network.connections[1]"].message
    assert found["network.connections[1].tgt.port"].message == "required key missing"


def test_iips_carry_any_json_value_including_null():
    c = parse("network:\n  processes: {a: {component: A}}\n  connections:\n"
              "    - {data: null, tgt: {process: a, port: i}}\n"
              "    - {data: {k: [1, 2.5, x]}, tgt: {process: a, port: j, index: 2}}\n")
    first, second = c.network.connections
    assert first.data is None and first.src is None
    assert second.data == {"k": [1, 2.5, "x"]} and second.tgt == PortRef("a", "j", 2)


def test_cross_field_checks_run_even_when_another_section_is_broken():
    text = ("workspace: {sandbox: {pool: {preload_count: 9, max_size: 4}}, root: 7}\n"
            "supervision:\n  backoff: {min: 10s, max: 1s}\n"
            "  groups: {g: {members: [a, b]}, h: {members: [b]}}\n"
            "network: {processes: {}, connections: [{data: 1, tgt: {process: q, port: i}}]}\n")
    found = problems(text)
    assert set(found) == {"workspace.root", "supervision.backoff.min", "supervision.groups.h.members[0]",
                          "network.connections[0].tgt.process"}
    assert found["supervision.groups.h.members[0]"].message == "'b' is already in group 'g'"
    assert "more than max" in found["supervision.backoff.min"].message
    # The pool check needs a well-typed workspace; alone it is reported on the flat key when written flat.
    (p,) = problems("workspace:\n  sandbox:\n    preload_count: 30\n    max_pool_size: 20\n").values()
    assert (p.path, p.line) == ("workspace.sandbox.preload_count", 3) and "max_size (20)" in p.message


# -- the network as a graph file ----------------------------------------------------------------

GRAPH = {
    "properties": {"name": "demo", "environment": {"type": "noflo-nodejs"}},
    "groups": [{"name": "main", "nodes": ["double"], "metadata": {"description": "x"}}],
    "processes": {"double": {"component": "Calculator", "metadata": {"x": 1, "y": 2}},
                  "log": {"component": "Logger"}},
    "connections": [{"src": {"process": "double", "port": "result"}, "tgt": {"process": "log", "port": "line"}},
                    {"data": 2, "tgt": {"process": "double", "port": "factor"}}],
    "inports": {"IN": {"process": "double", "port": "value"}},
}


def test_network_may_name_an_fbp_json_graph_file(tmp_path):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "main.json").write_text(json.dumps(GRAPH, indent="\t"))
    c = parse("network: graphs/main.json\n", base_dir=tmp_path)
    assert c.network.processes["double"] == ProcessConfig("Calculator", metadata={"x": 1, "y": 2})
    assert c.network.connections[1].data == 2 and c.network.connections[0].data is NO_DATA
    assert c.network.inports == {"IN": PortRef("double", "value")}


def test_graph_file_problems_name_the_graph_file_and_line(tmp_path):
    log = {"process": "log", "port": "line"}
    graph = dict(GRAPH, connections=[{"src": {"process": "ghost", "port": "o"}, "tgt": log},
                                     {"data": 1, "tgt": log, "weight": 3}])
    text = json.dumps(graph, indent=2)
    (tmp_path / "g.json").write_text(text)
    (p,) = problems("network: g.json\n", base_dir=tmp_path, filename="conf/reflow.yaml").values()
    assert (p.path, p.file, p.line) == ("network.connections[1].weight", "conf/g.json", line_of(text, '"weight"'))
    (tmp_path / "g.json").write_text(json.dumps(dict(GRAPH, connections=graph["connections"][:1]), indent=2))
    (p,) = problems("network: g.json\n", base_dir=tmp_path).values()
    assert p.path == "network.connections[0].src.process" and p.file == "g.json" and p.line is not None


def test_unreadable_or_broken_graph_files_are_problems_too(tmp_path):
    (p,) = problems("workspace: {}\nnetwork: missing.json\n", base_dir=tmp_path).values()
    assert (p.path, p.file, p.line) == ("network", "reflow.yaml", 2) and "missing.json" in p.message
    (tmp_path / "bad.json").write_text('{\n  "processes": {\n    "a": \n  }\n}\n')
    (p,) = problems("network: bad.json\n", base_dir=tmp_path).values()
    assert (p.file, p.line) == ("bad.json", 4) and p.message.startswith("JSON syntax error")
    # A broken graph does not hide the rest of the file's problems.
    found = problems("network: bad.json\nsupervision: {strategy: x}\n", base_dir=tmp_path)
    assert set(found) == {"network", "supervision.strategy"}


# -- syntax errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("workspace:\n  root: .\n  sandbox: [\n", 4, "YAML syntax error"),
    ("workspace:\n  root: .\n  root: src\n", 3, "duplicate key"),
    ("workspace:\n\troot: .\n", 2, "not tabs"),
])
def test_yaml_syntax_errors_carry_file_and_line(text, line, fragment):
    with pytest.raises(ConfigError) as err:
        parse(text, filename="x.yaml")
    (p,) = err.value.problems
    assert (p.path, p.file, p.line) == ("", "x.yaml", line) and fragment in p.message
    assert str(p).endswith(f"(x.yaml:{line})")


def test_a_document_that_is_not_a_mapping():
    (p,) = problems("- workspace\n").values()
    assert p.path == "" and "expected a mapping" in p.message


# -- environment, files and paths ---------------------------------------------------------------


def test_environment_overrides_win_over_the_file():
    text = "workspace: {redis: {url: redis://file:1}, websocket: {port: 1000, token: file}}"
    c = parse(text, env={"REFLOW_REDIS_URL": "redis://env:2", "REFLOW_WS_PORT": "9001", "REFLOW_TOKEN": "s3cret"})
    assert c.workspace.redis.url == "redis://env:2"
    assert (c.workspace.websocket.port, c.workspace.websocket.token) == (9001, "s3cret")
    unchanged = parse(text, env={"REFLOW_WS_PORT": "", "PATH": "/bin"})
    assert (unchanged.workspace.websocket.port, unchanged.workspace.websocket.token) == (1000, "file")


@pytest.mark.parametrize("port", ["high", "70000", "-1", "80.5", "8_080"])
def test_a_bad_port_in_the_environment_is_a_problem_named_after_the_variable(port):
    (p,) = problems("", env={"REFLOW_WS_PORT": port}).values()
    assert p == ConfigProblem("REFLOW_WS_PORT", f"expected a port number 0..65535, got {port!r}")


def test_load_config_resolves_paths_against_the_config_directory(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "reflow.yaml").write_text("workspace:\n  root: ../src\n  scripts: [extra/a.py]\n"
                                      "  sandbox: {python: {rootfs: rootfs/py}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REFLOW_TOKEN", "from-os-environ")
    c = load_config("conf/reflow.yaml")
    assert c.path == Path("conf/reflow.yaml") and c.base_dir == conf
    w = c.workspace
    assert (w.root, w.state_dir) == (tmp_path / "src", tmp_path / "src" / ".reflow")
    assert w.scripts == (str(conf / "extra" / "a.py"),)
    assert w.sandbox.python.rootfs == conf / "rootfs" / "py" and w.sandbox.javascript.rootfs is None
    assert w.websocket.token == "from-os-environ"
    assert load_config(conf / "reflow.yaml", env={}).workspace.websocket.token is None
    (conf / "reflow.yaml").write_text("workspace: {state_dir: state}\n")
    assert load_config(conf / "reflow.yaml", env={}).workspace.state_dir == conf / "state"


def test_load_config_without_a_file_is_all_defaults_in_the_cwd(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    c = load_config(None, env={})
    assert c.path is None and c.base_dir == tmp_path and c.workspace.root == tmp_path
    assert c.workspace == attrs.evolve(WorkspaceConfig(), root=tmp_path, state_dir=tmp_path / ".reflow")


def test_a_missing_or_bad_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml", env={})
    (p,) = err.value.problems
    assert p.file == str(tmp_path / "nope.yaml") and "cannot read" in p.message
    (tmp_path / "bad.yaml").write_text("supervision: {strategy: nope}\n")
    with pytest.raises(ConfigError, match=r"supervision\.strategy: .* \(.*bad\.yaml:1\)"):
        load_config(tmp_path / "bad.yaml", env={})


# -- sizes and durations go through the one converter -------------------------------------------

_SIZE_UNITS = [("", 1), ("B", 1), ("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("KiB", 2**10), ("MiB", 2**20),
               ("GiB", 2**30)]


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(_SIZE_UNITS), st.integers(0, 2**40))
def test_sizes_round_trip(n, unit, raw):
    c = parse(f"workspace:\n  sandbox:\n    max_output: {n}{unit[0]}\n    tmp_size: {format_size(raw)}\n")
    assert c.workspace.sandbox.max_output == n * unit[1]
    assert c.workspace.sandbox.tmp_size == raw


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**5), st.sampled_from([("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600), ("", 1)]))
def test_durations_round_trip(n, unit):
    c = parse(f"supervision:\n  shutdown_grace: {n}{unit[0]}\n  backoff: {{reset: {n}{unit[0]}}}\n")
    assert c.supervision.shutdown_grace == pytest.approx(n * unit[1])
    assert c.supervision.backoff.reset_after == pytest.approx(n * unit[1])


def test_public_names_exist():
    for name in config_module.__all__:
        assert hasattr(config_module, name), name
    assert repr(NO_DATA) == "NO_DATA"


# -- the config against what discovery finds (check-config and run share it) --------------------

from supervisor.core.config import check_components, config_json_schema  # noqa: E402
from supervisor._scan import extract  # noqa: E402

_CALC = ("from reflow import actor\n\n@actor(name='Calc', inports=['value'], outports=['result'],\n"
         "       config_schema={schema})\nasync def calc(context):\n    return {{}}\n")


def _calc(schema: str = "{'type': 'object', 'properties': {'factor': {'type': 'number'}}}"):
    return extract(Path("/srv/project/calc.actor.py"), _CALC.format(schema=schema))


def test_network_names_and_ports_are_checked_against_the_discovered_components():
    text = ("network:\n  processes:\n    double: {component: Calc}\n    log: {component: Logger}\n"
            "  connections:\n    - {src: {process: double, port: reslt}, tgt: {process: double, port: value}}\n"
            "    - {data: 2, tgt: {process: double, port: nope}}\n"
            "  outports: {out: {process: double, port: error}}\n")
    found = {p.path: p for p in check_components(parse(text), [_calc()])}
    assert set(found) == {"network.processes.log.component", "network.connections[0].src.port",
                          "network.connections[1].tgt.port"}
    assert str(found["network.processes.log.component"]) == (
        f"network.processes.log.component: unknown component 'Logger' (discovered: Calc) "
        f"(reflow.yaml:{line_of(text, 'Logger')})")
    assert "Calc has no outport 'reslt' (outports: result)" in found["network.connections[0].src.port"].message
    assert found["network.connections[1].tgt.port"].line == line_of(text, "nope")


def test_process_config_is_validated_against_config_schema_with_its_line():
    text = "network:\n  processes:\n    double:\n      component: Calc\n      config:\n        factor: two\n"
    (p,) = check_components(parse(text), [_calc()])
    assert str(p) == "network.processes.double.config.factor: 'two' is not of type 'number' (reflow.yaml:6)"
    ok = text.replace("factor: two", "factor: 2.5")
    assert check_components(parse(ok), [_calc()]) == []


def test_without_a_network_the_supervision_override_config_is_checked():
    text = "supervision:\n  actors:\n    Calc: {config: {factor: [1]}}\n"
    (p,) = check_components(parse(text), [_calc()])
    assert p.path == "supervision.actors.Calc.config.factor" and p.line == 3 and "[1] is not of type" in p.message
    required = _calc("{'type': 'object', 'required': ['factor']}")
    (p,) = check_components(parse(""), [required])
    assert p.path == "supervision.actors.Calc.config" and "'factor' is a required property" in p.message


def test_config_schema_shorthand_means_an_object_of_typed_keys():
    assert config_json_schema({"factor": "number", "name": ["string", "null"]}) == {
        "type": "object", "properties": {"factor": {"type": "number"}, "name": {"type": ["string", "null"]}}}
    assert config_json_schema({"type": "object"}) == {"type": "object"}   # a JSON Schema as it is
    assert config_json_schema({}) == {}
    text = "network:\n  processes:\n    d: {component: Calc, config: {factor: two, extra: 1}}\n"
    (p,) = check_components(parse(text), [_calc("{'factor': 'number'}")])
    assert p.path == "network.processes.d.config.factor" and "is not of type 'number'" in p.message
    with pytest.raises(ValueError, match="'numbr' is not a JSON type"):
        config_json_schema({"factor": "numbr"})


def test_a_broken_config_schema_is_named_once_with_the_script_line():
    text = "network:\n  processes:\n    d: {component: Calc, config: {factor: 1}}\n"
    for schema, fragment in (("{'factor': 'numbr'}", "'numbr' is not a JSON type"),
                             ("{'type': 'nonsense'}", "is not a valid JSON Schema")):
        (p,) = check_components(parse(text), [_calc(schema)])
        assert p.path == "network.processes.d.config" and "calc.actor.py:3" in p.message and fragment in p.message
