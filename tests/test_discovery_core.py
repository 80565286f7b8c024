"""Static discovery: metadata read without running anything; broken scripts named with file:line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, SEEDS, seed_block
from supervisor._scan import discover, extract
from supervisor.core.discovery import ScriptError

SEED = SEEDS / "004_907eda7e1530af8d.txt"


@pytest.mark.skipif(not SEED.exists(), reason="shared/ is not beside the checkout")
def test_seed_actors(tmp_path):
    seed = SEED.read_text()
    (tmp_path / "agg.actor.js").write_text(seed_block(seed, "javascript"))
    (tmp_path / "dp.actor.py").write_text(seed_block(seed, "python"))
    found = {c.name: c for c in discover(tmp_path, ["**/*.actor.py", "**/*.actor.js"]).components}
    agg, dp = found["StreamAggregator"], found["DataProcessor"]
    assert (agg.runtime, agg.inports, agg.outports, agg.state_backend, agg.entry) == (
        "javascript", ("stream", "window"), ("aggregated", "stats"), "redis", "aggregateStream")
    assert (dp.runtime, dp.inports, dp.outports, dp.entry) == ("python", ("data", "config"),
                                                               ("processed", "metrics"), "process_data")
    assert dp.description == "Processes input data with configurable operations."


def test_undecorated_process_form_and_module_exports(tmp_path):
    t = extract(EXAMPLES / "test_actor.py")
    assert (t.name, t.dynamic_ports, t.entry) == ("test_actor", True, "process")
    js = tmp_path / "dbl.actor.js"
    js.write_text("// Doubles a number.\nmodule.exports = actor({name: 'Dbl', inports: ['in'], outports: ['out',],"
                  " awaitAllInports: true, timeout: '2s'}, async function (context) { return {out: 1}; });\n")
    d = extract(js)
    assert (d.name, d.inports, d.await_all_inports, d.timeout, d.description) == (
        "Dbl", ("in",), True, 2.0, "Doubles a number.")


@pytest.mark.parametrize("source,line,fragment", [
    ("from reflow import actor\n\n@actor(name='X')\ndef f(:\n", 4, "syntax error"),
    ("from reflow import actor\nN='X'\n@actor(name=N)\nasync def f(c): pass\n", 3, "must be a literal"),
    ("from reflow import actor\n@actor(name='X', color='red')\nasync def f(c): pass\n", 2, "unknown @actor argument"),
    ("x = 1\n", 1, "no @actor"),
    ("from reflow import actor\n@actor(name='X', inports=['a', 'a'])\nasync def f(c): pass\n", 2, "duplicate port"),
])
def test_broken_python_scripts(tmp_path, source, line, fragment):
    f = tmp_path / "b.actor.py"
    f.write_text(source)
    with pytest.raises(ScriptError) as err:
        extract(f)
    assert err.value.problem.line == line and fragment in err.value.problem.message
    assert str(err.value).startswith(f"{f}:{line}:")


def test_js_literal_error_line(tmp_path):
    f = tmp_path / "b.actor.js"
    f.write_text("// x\n@actor({\n  name: 'B',\n  inports: [oops],\n})\nasync function f(c) {}\n")
    with pytest.raises(ScriptError) as err:
        extract(f)
    assert err.value.problem.line == 4


def test_discover_excludes_dedupes_and_reports(tmp_path):
    good = "from reflow import actor\n@actor(name='{n}')\nasync def f(c): pass\n"
    (tmp_path / "a.actor.py").write_text(good.format(n="A"))
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.actor.py").write_text(good.format(n="Hidden"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dup.actor.py").write_text(good.format(n="A"))
    (tmp_path / "plain.py").write_text(good.format(n="Extra"))
    r = discover(tmp_path, ["**/*.actor.py"], ["**/node_modules/**"], [tmp_path / "plain.py", tmp_path / "nope.py"])
    assert [c.name for c in r.components] == ["A", "Extra"]
    msgs = [p.message for p in r.problems]
    assert any("duplicate actor name 'A'" in m for m in msgs) and "no such script" in msgs


names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,12}", fullmatch=True)
ports = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), max_size=4, unique=True)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=150, deadline=None)
@given(name=names, inports=ports, outports=ports, tags=st.lists(texts, max_size=3), version=texts,
       description=texts)
def test_metadata_round_trips_through_python_and_js(tmp_path_factory, name, inports, outports, tags, version,
                                                   description):
    d = tmp_path_factory.mktemp("rt")
    meta = dict(name=name, inports=inports, outports=outports, tags=tags, version=version, description=description)
    (d / "m.actor.py").write_text("from reflow import actor\n@actor(**{})\n".replace("**{}", ", ".join(
        f"{k}={v!r}" for k, v in meta.items())) + "async def f(context):\n    pass\n")
    (d / "m.actor.js").write_text(f"@actor({json.dumps(meta)})\nasync function f(context) {{}}\n")
    for f in ("m.actor.py", "m.actor.js"):
        c = extract(d / f)
        assert (c.name, list(c.inports), list(c.outports), list(c.tags), c.version, c.description) == (
            name, inports, outports, tags, version, description)
