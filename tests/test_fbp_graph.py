"""The FBP protocol's pure core (supervisor/core/fbp_graph.py) and the graph file in reflow.yaml."""

from __future__ import annotations

import json

import pytest

from supervisor.core.config import ConfigError, parse_config
from supervisor.core.fbp_graph import Graph, GraphError, ProtocolError, data_event_id, parse_message


def kinds(actions):
    return [(a.kind, a.node, a.port, a.tgt, a.tgt_port) for a in actions]


def built() -> Graph:
    g = Graph(id="g")
    for nid in ("a", "b", "c"):
        g.apply("addnode", {"id": nid, "component": "core/Repeat", "graph": "g"})
    g.apply("addedge", {"src": {"node": "a", "port": "out"}, "tgt": {"node": "b", "port": "in"}, "graph": "g"})
    g.apply("addedge", {"src": {"node": "b", "port": "out"}, "tgt": {"node": "c", "port": "in"}, "graph": "g"})
    g.apply("addinitial", {"src": {"data": 5}, "tgt": {"node": "a", "port": "in"}, "graph": "g"})
    g.apply("addinport", {"public": "in", "node": "a", "port": "in", "graph": "g"})
    g.apply("addoutport", {"public": "out", "node": "c", "port": "out", "graph": "g"})
    g.apply("addgroup", {"name": "grp", "nodes": ["a", "b"], "graph": "g"})
    return g


def test_each_edit_is_echoed_and_says_what_the_network_does():
    g = Graph(id="g")
    replies, acts = g.apply("addnode", {"id": "a", "component": "X", "metadata": {"x": 1}, "graph": "g"})
    assert replies == [("addnode", {"id": "a", "component": "X", "metadata": {"x": 1}, "graph": "g"})]
    assert kinds(acts) == [("start_node", "a", "", "", "")]
    g.apply("addnode", {"id": "b", "component": "X", "graph": "g"})
    edge = {"src": {"node": "a", "port": "out"}, "tgt": {"node": "b", "port": "in"}}
    replies, acts = g.apply("addedge", {**edge, "graph": "g"})
    assert replies == [("addedge", {**edge, "metadata": {}, "graph": "g"})]
    assert kinds(acts) == [("add_route", "a", "out", "b", "in")]
    replies, acts = g.apply("addinitial", {"src": {"data": [1]}, "tgt": {"node": "b", "port": "in"}, "graph": "g"})
    assert acts[0].kind == "send_iip" and acts[0].data == [1]


def test_removing_a_node_cuts_its_inputs_drains_it_then_stops_it():
    g = built()
    replies, acts = g.apply("removenode", {"id": "b", "graph": "g"})
    assert kinds(acts) == [("remove_route", "a", "out", "b", "in"), ("drain_node", "b", "", "", ""),
                           ("remove_route", "b", "out", "c", "in"), ("stop_node", "b", "", "", "")]
    assert [r[0] for r in replies] == ["removeedge", "removeedge", "removenode"]
    assert g.edges == [] and g.groups[0]["nodes"] == ["a"]


def test_renaming_a_running_node_starts_the_new_one_before_the_old_one_drains():
    g = built()
    replies, acts = g.apply("renamenode", {"from": "b", "to": "b2", "graph": "g"})
    assert replies == [("renamenode", {"from": "b", "to": "b2", "graph": "g"})]
    assert [k[:2] for k in kinds(acts)] == [("start_node", "b2"), ("add_route", "a"), ("add_route", "b2"),
                                            ("remove_route", "a"), ("drain_node", "b"), ("remove_route", "b"),
                                            ("stop_node", "b")]
    assert {(e["src"]["node"], e["tgt"]["node"]) for e in g.edges} == {("a", "b2"), ("b2", "c")}


def test_network_stop_stops_upstream_nodes_first():
    g = built()
    assert [a.node for a in g.stop_actions() if a.kind == "stop_node"] == ["a", "b", "c"]
    g.apply("addedge", {"src": {"node": "c", "port": "out"}, "tgt": {"node": "a", "port": "in"}, "graph": "g"})
    assert sorted(a.node for a in g.stop_actions() if a.kind == "stop_node") == ["a", "b", "c"]  # a cycle


@pytest.mark.parametrize(("command", "payload", "message"), [
    ("addnode", {"id": "a", "component": "core/Repeat"}, "node 'a' already exists"),
    ("addnode", {"id": "z", "component": "Nope"}, "component 'Nope' not available"),
    ("addnode", {"id": "", "component": "X"}, "node id must be a non-empty string"),
    ("addnode", {"id": "x" * 300, "component": "X"}, "longer than 200"),
    ("removenode", {"id": "zz"}, "node 'zz' not found"),
    ("addedge", {"src": {"node": "a", "port": "out"}, "tgt": {"node": "b", "port": "in"}}, "already exists"),
    ("addedge", {"src": {"node": "q", "port": "out"}, "tgt": {"node": "b", "port": "in"}}, "src node 'q' not found"),
    ("removeedge", {"src": {"node": "a", "port": "x"}, "tgt": {"node": "b", "port": "in"}}, "not found"),
    ("removeinitial", {"tgt": {"node": "c", "port": "in"}}, "no initial packet for c.in"),
    ("removeinport", {"public": "nope"}, "inport 'nope' not found"),
    ("renameoutport", {"from": "nope", "to": "x"}, "outport 'nope' not found"),
    ("addgroup", {"name": "grp", "nodes": []}, "group 'grp' already exists"),
    ("renamenode", {"from": "a", "to": "b"}, "node 'b' already exists"),
    ("bogus", {}, "unknown graph command"),
])
def test_a_bad_edit_is_a_clear_error_and_changes_nothing(command, payload, message):
    g = built()
    before = g.to_json()
    with pytest.raises(GraphError, match=message.replace("(", r"\(")):
        g.apply(command, {**payload, "graph": "g"}, known=lambda c: c != "Nope")
    assert g.to_json() == before


def test_metadata_merges_and_null_removes():
    g = built()
    g.apply("changenode", {"id": "a", "metadata": {"x": 1, "y": 2}, "graph": "g"})
    replies, _ = g.apply("changenode", {"id": "a", "metadata": {"x": None}, "graph": "g"})
    assert replies[0][1]["metadata"] == {"y": 2}


def test_noflo_json_round_trips():
    g = built()
    g.nodes["a"]["config"] = {"factor": 2}
    doc = json.loads(json.dumps(g.to_json()))
    assert doc["connections"][-1] == {"data": 5, "tgt": {"process": "a", "port": "in"}}
    assert doc["inports"] == {"in": {"process": "a", "port": "in"}}
    again = Graph.from_json(doc)
    assert again.to_json() == g.to_json() and again.id == "g"
    with pytest.raises(GraphError, match="processes.x.component"):
        Graph.from_json({"processes": {"x": {}}})


def test_event_ids_are_noflos():
    assert data_event_id({"node": "A", "port": "out"}, {"node": "B", "port": "in"}) == "A() OUT -> IN B()"
    assert data_event_id(None, {"node": "B", "port": "in"}) == "DATA -> IN B()"


def test_messages_are_parsed_or_refused_with_a_reason():
    m = parse_message('{"protocol": "graph", "command": "addnode", "payload": {"secret": "s"}}')
    assert (m.protocol, m.command, m.secret) == ("graph", "addnode", "s")
    assert parse_message('{"protocol": "a", "command": "b", "payload": {}, "secret": "t"}').secret == "t"
    for bad, why in [("{", "not JSON"), ("[]", "JSON object"), ('{"protocol": 1, "command": "x"}', "strings"),
                     ('{"protocol": "a", "command": "b", "payload": 3}', "payload must be an object")]:
        with pytest.raises(ProtocolError, match=why):
            parse_message(bad)


GRAPH = {"properties": {"id": "main", "name": "main"}, "groups": [{"name": "g", "nodes": ["a"]}],
         "processes": {"a": {"component": "core/Repeat", "metadata": {"x": 1}, "config": {"k": 1}}},
         "connections": [{"data": 1, "tgt": {"process": "a", "port": "in"}, "metadata": {"route": 1}}],
         "inports": {"in": {"process": "a", "port": "in"}}, "outports": {}}


@pytest.mark.parametrize("form", ["network: {graph: graphs/main.json}\n", "network: graphs/main.json\n"])
def test_reflow_yaml_names_the_graph_file(tmp_path, form):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "main.json").write_text(json.dumps(GRAPH))
    cfg = parse_config(form, base_dir=tmp_path, env={})
    assert cfg.graph_file == tmp_path / "graphs" / "main.json"
    assert cfg.network.processes["a"].component == "core/Repeat" and cfg.network.processes["a"].config == {"k": 1}
    assert cfg.network.connections[0].data == 1


def test_the_inline_network_still_works_and_names_no_file(tmp_path):
    cfg = parse_config("network:\n  processes: {a: {component: X}}\n  connections: []\n", base_dir=tmp_path, env={})
    assert cfg.graph_file is None and list(cfg.network.processes) == ["a"]


def test_a_missing_graph_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the graph file"):
        parse_config("network: {graph: nope.json}\n", base_dir=tmp_path, env={})
