"""reflow.yaml loading: the seed's flat form, the contract's nested form, errors with key path and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor._config import NO_DATA, ConfigError, load_config, parse_config
from supervisor._units import parse_duration, parse_size

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def _yaml_block(path: Path) -> str:
    return path.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(not SHARED.exists(), reason="shared/ is not beside the checkout")
def test_seed_flat_form_loads_verbatim():
    c = parse_config(_yaml_block(SHARED / "seeds" / "004_907eda7e1530af8d.txt"), env={})
    sb = c.workspace.sandbox
    assert sb.python.image == "python:3.11" and sb.javascript.image == "node:20"
    assert sb.pool.preload_count == 5 and sb.pool.max_size == 20
    assert sb.python.memory == sb.javascript.memory == 512 * 10**6 and sb.python.cpu == 0.5
    assert c.workspace.redis.url == "redis://localhost:6379" and c.workspace.redis.ttl == 3600
    assert c.workspace.websocket.port == 8080 and c.workspace.websocket.ping_interval == 30


@pytest.mark.skipif(not SHARED.exists(), reason="shared/ is not beside the checkout")
def test_contract_nested_form_loads_verbatim():
    c = parse_config(_yaml_block(SHARED / "CONTRACT.md"), env={})
    assert c.supervision.backoff.min == 0.01 and c.supervision.backoff.reset_after == 10.0
    assert c.supervision.actors["DataProcessor"].timeout == 30
    assert c.workspace.websocket.max_frame_size == 10 * 10**6
    assert c.network.processes["double"].config == {"factor": 2}
    iip = c.network.connections[1]
    assert iip.src is None and iip.data == 2 and c.network.connections[0].data is NO_DATA


def test_every_problem_named_with_path_and_line():
    text = ("workspace:\n  websocket: {port: x}\n  sandbox:\n    memory_limt: 1GB\n"
            "supervision: {strategy: nope, backoff: {min: 5q}}\nfoo: 1\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text, filename="r.yaml", env={})
    msgs = {p.path: (p.message, p.line) for p in err.value.problems}
    assert msgs["workspace.sandbox.memory_limt"] == ("unknown key", 4)
    assert msgs["foo"] == ("unknown key", 6)
    assert msgs["workspace.websocket.port"][1] == 2
    assert "one_for_one" in msgs["supervision.strategy"][0]
    assert "duration" in msgs["supervision.backoff.min"][0]
    assert "r.yaml:4" in str(err.value)


def test_network_validation_and_yaml_syntax():
    with pytest.raises(ConfigError) as err:
        parse_config("network:\n  processes: {a: {component: X}}\n  connections:\n"
                     "    - {src: {process: b, port: o}, tgt: {process: a, port: i}}\n", env={})
    assert str(err.value.problems[0]).startswith("network.connections[0].src.process: unknown process 'b'")
    with pytest.raises(ConfigError) as err:
        parse_config("a: [\n", filename="x.yaml", env={})
    assert "YAML syntax error" in str(err.value) and "x.yaml:2" in str(err.value)


def test_env_overrides_and_graph_file(tmp_path):
    (tmp_path / "g.json").write_text('{"processes": {"p": {"component": "C"}}, "connections": '
                                     '[{"data": 1, "tgt": {"process": "p", "port": "x"}}], "properties": {}}')
    (tmp_path / "reflow.yaml").write_text("network: g.json\n")
    c = load_config(tmp_path / "reflow.yaml", env={"REFLOW_WS_PORT": "9001", "REFLOW_TOKEN": "t",
                                                   "REFLOW_REDIS_URL": "redis://h:1"})
    assert c.workspace.websocket.port == 9001 and c.workspace.websocket.token == "t"
    assert c.workspace.redis.url == "redis://h:1" and c.network.processes["p"].component == "C"
    with pytest.raises(ConfigError, match="REFLOW_WS_PORT"):
        load_config(tmp_path / "reflow.yaml", env={"REFLOW_WS_PORT": "high"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})


@settings(max_examples=200)
@given(st.integers(0, 10**6), st.sampled_from([("B", 1), ("KB", 10**3), ("MB", 10**6), ("KiB", 2**10),
                                               ("MiB", 2**20), ("GiB", 2**30)]))
def test_sizes(n, unit):
    assert parse_size(f"{n}{unit[0]}") == n * unit[1]


@settings(max_examples=200)
@given(st.integers(0, 10**5), st.sampled_from([("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600), ("", 1)]))
def test_durations(n, unit):
    assert parse_duration(f"{n}{unit[0]}") == pytest.approx(n * unit[1])


@settings(max_examples=100)
@given(st.sampled_from([(), ("workspace",), ("workspace", "sandbox"), ("workspace", "redis"), ("supervision",),
                        ("supervision", "backoff")]),
       st.from_regex(r"[a-z]{3,10}_x", fullmatch=True))
def test_any_unknown_key_at_any_level_is_reported(where, key):
    text, indent = "", ""
    for part in where:
        text += f"{indent}{part}:\n"
        indent += "  "
    text += f"{indent}{key}: 1\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, env={})
    (problem,) = err.value.problems
    assert problem.path == ".".join((*where, key)) and problem.line == len(where) + 1
