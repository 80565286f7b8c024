"""Static discovery of script actors (CONTRACT §3): metadata is read, never run.

The seeds' examples are read where they live: examples/scripts/ (the seed's text below a
one-line header), and tests/scripts/discovery/ for the seed's DataProcessor as the seed wrote
it (examples/scripts/ adds the helper it calls); all checked against the seeds when shared/
is beside the checkout.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import json5
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, SEEDS, seed_block
from supervisor._scan import discover, extract
from supervisor.core.discovery import ComponentSpec, Discovery, ScriptError, ScriptProblem, _glob_regex

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "scripts" / "discovery"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _error(path: Path, text: str | None = None) -> ScriptProblem:
    if text is not None:
        _write(path, text)
    with pytest.raises(ScriptError) as err:
        extract(path)
    assert str(err.value) == str(err.value.problem)
    return err.value.problem


# -- the seeds' examples --------------------------------------------------------------------------

@pytest.mark.skipif(not SEEDS.is_dir(), reason="shared/ is not beside the checkout")
def test_the_examples_and_fixtures_are_the_seeds_verbatim():
    seed = (SEEDS / "004_907eda7e1530af8d.txt").read_text()
    assert (FIXTURES / "data_processor.actor.py").read_text() == seed_block(seed, "python")
    header, text = (EXAMPLES / "stream_aggregator.actor.js").read_text().split("\n", 1)
    assert header.startswith("//") and text == seed_block(seed, "javascript")
    seed0 = (SEEDS / "000_2396b510a9ec5be8.txt").read_text()
    assert (EXAMPLES / "test_actor.py").read_text() == seed_block(seed0, "python", "Create `test_actor.py`")


def test_seed_python_data_processor():
    path = FIXTURES / "data_processor.actor.py"
    c = extract(path)
    assert c == ComponentSpec(
        name="DataProcessor", runtime="python", file=path, line=4, source=path.read_text(), entry="process_data",
        inports=("data", "config"), outports=("processed", "metrics"), state_backend="redis",
        description="Processes input data with configurable operations.", mtime_ns=path.stat().st_mtime_ns)
    assert c.file.is_absolute() and c.mtime_ns > 0


def test_seed_javascript_stream_aggregator():
    path = EXAMPLES / "stream_aggregator.actor.js"
    c = extract(path)
    assert c == ComponentSpec(
        name="StreamAggregator", runtime="javascript", file=path, line=4, source=path.read_text(),
        entry="aggregateStream", inports=("stream", "window"), outports=("aggregated", "stats"),
        state_backend="redis", description=None, mtime_ns=path.stat().st_mtime_ns)


def test_seed_undecorated_test_actor():
    c = extract(EXAMPLES / "test_actor.py")
    assert (c.name, c.runtime, c.entry, c.line, c.dynamic_ports, c.inports, c.outports) == (
        "test_actor", "python", "process", 1, True, (), ())


def test_module_exports_actor_call_form():
    path = FIXTURES / "moving_average.actor.js"
    c = extract(path)
    assert c == ComponentSpec(
        name="MovingAverage", runtime="javascript", file=path, line=11, source=path.read_text(),
        entry="movingAverage", inports=("value", "window"), outports=("average",), await_all_inports=False,
        version="2.1.0", tags=("math", "stream"), category="statistics",
        config_schema={"type": "object", "properties": {"window": {"type": "integer", "minimum": 1}}},
        memory=64_000_000, timeout=1.5, state_backend="redis",
        description="Averages the last `window` numbers it was sent.\n"
                    "Braces in comments {{ and \"quotes' must not confuse the scanner.",
        mtime_ns=path.stat().st_mtime_ns)


def test_anonymous_and_referenced_functions_in_the_call_form(tmp_path):
    anon = _write(tmp_path / "a.actor.js", """
        module.exports = actor({name: 'A', stateBackend: 'memory', awaitAllInports: true, configSchema: {}},
                               async function (context) { return {}; });
    """)
    c = extract(anon)
    assert (c.entry, c.state_backend, c.await_all_inports, c.config_schema, c.line) == (None, "memory", True, {}, 1)
    ref = _write(tmp_path / "r.actor.js", """
        async function handle(context) {}
        module.exports = reflow.actor({"name": "R", "timeout": 2, "memory": 1024}, handle);
    """)
    c = extract(ref)
    assert (c.name, c.entry, c.timeout, c.memory, c.line) == ("R", "handle", 2.0, 1024, 2)


# -- Python forms ---------------------------------------------------------------------------------

def test_python_positional_reflow_prefix_and_plain_def(tmp_path):
    c = extract(_write(tmp_path / "calc.actor.py", """
        import reflow

        @reflow.actor("Calc", ["a", "b"], ["sum"], version="1.0", memory="256MB", timeout="5s",
                      awaitAllInports=True, tags=("x",), category="math",
                      config_schema={"type": "object"})
        def add(context):
            '''Adds.

            Two numbers.'''
    """))
    assert (c.name, c.inports, c.outports, c.entry, c.line, c.version, c.memory, c.timeout, c.await_all_inports,
            c.tags, c.category, c.config_schema, c.description) == (
        "Calc", ("a", "b"), ("sum",), "add", 3, "1.0", 256_000_000, 5.0, True, ("x",), "math",
        {"type": "object"}, "Adds.\n\nTwo numbers.")


def test_python_defaults_and_explicit_description(tmp_path):
    c = extract(_write(tmp_path / "x.actor.py", """
        from reflow import actor
        @actor(description="explicit", memory=1024, timeout=0.25)
        async def echo(context):
            '''docstring loses to the argument'''
    """))
    assert (c.name, c.inports, c.outports, c.description, c.memory, c.timeout) == (
        "echo", (), (), "explicit", 1024, 0.25)


def test_undecorated_forms_are_named_after_the_file(tmp_path):
    c = extract(_write(tmp_path / "calc.actor.py", '"""Module doc."""\nasync def process(context):\n    pass\n'))
    assert (c.name, c.entry, c.dynamic_ports, c.line, c.description) == ("calc", "process", True, 2, "Module doc.")
    for i, body in enumerate([
        "// Doubles.\nasync function process(context) { return {}; }\n",
        "module.exports = async function process(context) {};\n",
        "exports.process = async (context) => ({});\n",
        "/** Export. */\nmodule.exports = async (context) => ({});\n",
    ]):
        c = extract(_write(tmp_path / f"dyn{i}.actor.js", body))
        assert (c.name, c.runtime, c.entry, c.dynamic_ports, c.inports) == (f"dyn{i}", "javascript", "process",
                                                                            True, ())
    assert extract(tmp_path / "dyn0.actor.js").description == "Doubles."
    assert extract(tmp_path / "dyn3.actor.js").description == "Export."


@pytest.mark.parametrize("source,line,fragment", [
    ("from reflow import actor\n\n@actor(name='X')\nasync def f(:\n    pass\n", 4, "syntax error"),
    ("from reflow import actor\nN = 'X'\n@actor(\n    name='X',\n    inports=[N],\n)\nasync def f(c): ...\n", 5,
     "argument 'inports' must be a literal"),
    ("from reflow import actor\n@actor(name=make_name())\nasync def f(c): ...\n", 2, "`make_name()`"),
    ("from reflow import actor\n@actor(**META)\nasync def f(c): ...\n", 2, "cannot be read without running"),
    ("from reflow import actor\n@actor(name='X',\n       color='red')\nasync def f(c): ...\n", 3,
     "unknown @actor argument 'color'"),
    ("from reflow import actor\n@actor('X', name='Y')\nasync def f(c): ...\n", 2, "'name' given twice"),
    ("from reflow import actor\n@actor('X', await_all_inports=True, awaitAllInports=True)\nasync def f(c): ...\n",
     2, "given twice"),
    ("from reflow import actor\n@actor('X', ['a'], ['b'], 'extra')\nasync def f(c): ...\n", 2, "at most 3"),
    ("from reflow import actor\n@actor(name=42)\nasync def f(c): ...\n", 2, "argument 'name' must be"),
    ("from reflow import actor\n@actor(name='has space')\nasync def f(c): ...\n", 2, "argument 'name' must be"),
    ("from reflow import actor\n@actor(name='X\\n')\nasync def f(c): ...\n", 2, "argument 'name' must be"),
    ("from reflow import actor\n@actor(name='X', inports='data')\nasync def f(c): ...\n", 2,
     "argument 'inports' must be a list"),
    ("from reflow import actor\n@actor(name='X', outports=['a', 'a'])\nasync def f(c): ...\n", 2,
     "'outports' has a duplicate port 'a'"),
    ("from reflow import actor\n@actor(name='X', outports=[''])\nasync def f(c): ...\n", 2, "'outports' must be"),
    ("from reflow import actor\n@actor(name='X', tags='a')\nasync def f(c): ...\n", 2, "'tags' must be a list"),
    ("from reflow import actor\n@actor(name='X', version=1.0)\nasync def f(c): ...\n", 2, "'version' must be a str"),
    ("from reflow import actor\n@actor(name='X', await_all_inports='yes')\nasync def f(c): ...\n", 2,
     "'await_all_inports' must be true or false"),
    ("from reflow import actor\n@actor(name='X', config_schema=[1])\nasync def f(c): ...\n", 2, "'config_schema'"),
    ("from reflow import actor\n@actor(name='X', config_schema={1: 2})\nasync def f(c): ...\n", 2, "'config_schema'"),
    ("from reflow import actor\n@actor(name='X', memory='lots')\nasync def f(c): ...\n", 2,
     "'memory': expected a size"),
    ("from reflow import actor\n@actor(name='X', timeout='soon')\nasync def f(c): ...\n", 2,
     "'timeout': expected a duration"),
    ("from reflow import actor\n@actor(name='X', description='\\ud800')\nasync def f(c): ...\n", 2,
     "'description' must be a string"),
    ("x = 1\n", 1, "no @actor function and no top-level async def process(context)"),
    ("def process(context):\n    pass\n", 1, "no @actor function"),
    ("from reflow import actor\n@actor('A')\nasync def a(c): ...\n\n@actor('B')\nasync def b(c): ...\n", 5,
     "one actor per file"),
])
def test_broken_python_scripts_name_the_line_and_argument(tmp_path, source, line, fragment):
    f = tmp_path / "b.actor.py"
    p = _error(f, source)
    assert (p.file, p.line) == (f, line) and fragment in p.message, p
    assert str(p).startswith(f"{f}:{line}: ")


def test_a_file_name_that_is_no_actor_name(tmp_path):
    p = _error(tmp_path / "1st.actor.py", "async def process(context): pass\n")
    assert "not a valid name" in p.message


def test_never_executes_the_script(tmp_path):
    marker = tmp_path / "ran"
    src = f"open({str(marker)!r}, 'w').close()\nfrom reflow import actor\n@actor('Safe')\nasync def f(c): ...\n"
    assert extract(_write(tmp_path / "s.actor.py", src)).name == "Safe"
    js = f"require('fs').writeFileSync({str(marker)!r}, '');\nmodule.exports = actor({{name: 'SafeJs'}}, f);\n"
    assert extract(_write(tmp_path / "s.actor.js", js)).name == "SafeJs"
    assert not marker.exists()


# -- JavaScript scanning --------------------------------------------------------------------------

def test_js_scanner_skips_strings_templates_and_comments(tmp_path):
    c = extract(_write(tmp_path / "tricky.actor.js", r"""
        // @actor({name: 'InLineComment'})
        /* module.exports = actor({name: 'InBlockComment'}, f); */
        const s = "@actor({name: 'InString'})", t = `actor({name: ${JSON.stringify({a: "}"})}})`;
        const q = 'a\'}';

        // Leading comment, line one.
        //   indented line two.
        @actor({
            name: "Tricky",   // a comment with } and {
            /* block } */ description: 'has } and { and "quotes" and \'single\'',
            inports: ["in",],
        })
        export async function tricky(context) { return `${"}"}`; }
    """))
    assert (c.name, c.line, c.entry, c.inports) == ("Tricky", 8, "tricky", ("in",))
    assert c.description == """has } and { and "quotes" and 'single'"""
    c = extract(_write(tmp_path / "lead.actor.js", """
        // Leading comment, line one.
        //   indented line two.

        @actor({name: 'Lead'})
        const lead = async (context) => ({});
    """))
    assert (c.description, c.entry) == ("Leading comment, line one.\n  indented line two.", "lead")


def test_js_template_literal_in_metadata_is_a_json5_error_on_its_line(tmp_path):
    p = _error(tmp_path / "t.actor.js", """
        @actor({
            name: 'T',
            inports: [`a${'}'}b`],
        })
        async function t(context) {}
    """)
    assert p.line == 3 and "must be a plain object literal (JSON5)" in p.message, p


def test_js_literal_errors_carry_the_file_line(tmp_path):
    f = tmp_path / "b.actor.js"
    p = _error(f, "const x = `{`;\n\n@actor({\n  name: 'B',\n  inports: [oops],\n})\nasync function f(c) {}\n")
    assert p.line == 5 and "JSON5" in p.message
    assert _error(f, "@actor({\n  name: 'B',\n  inports: ['a',\n") == ScriptProblem(
        f, 1, "the actor({...}) object literal is never closed")
    assert "'name' must be" in _error(f, "@actor({inports: ['a']})\nasync function f(c) {}\n").message
    p = _error(f, "@actor({\n  name: 'B',\n  stateBackend: 'redis',\n  color: 'red',\n})\nfunction f(c) {}\n")
    assert p.line == 4 and "unknown @actor argument 'color'" in p.message
    p = _error(f, "@actor({\n  name: 'B',\n  outports: ['x', 'x'],\n})\nfunction f(c) {}\n")
    assert p.line == 3 and "duplicate port 'x'" in p.message
    p = _error(f, "@actor({name: 'B', state_backend: 'a', stateBackend: 'b'})\nfunction f(c) {}\n")
    assert "given twice" in p.message
    p = _error(f, "@actor({name: 'B', name: 'C'})\nfunction f(c) {}\n")
    assert "Duplicate key" in p.message
    p = _error(f, "const meta = {name: 'M'};\nmodule.exports = actor(meta, async (c) => ({}));\n")
    assert p.line == 2 and "object literal" in p.message
    p = _error(f, "module.exports = actor({name: 'A'}, f);\nexports.b = actor({name: 'B'}, g);\n")
    assert p.line == 2 and "one actor per file" in p.message
    assert "no @actor" in _error(f, "console.log('hello');\n").message


# -- discover() -----------------------------------------------------------------------------------

GOOD = "from reflow import actor\n@actor(name={name!r})\nasync def f(context): ...\n"


def test_discover_patterns_exclusions_and_order(tmp_path):
    root = tmp_path / "ws"
    for rel, name in [("top.actor.py", "Top"), ("a/b/deep.actor.py", "Deep"), ("node_modules/nm.actor.py", "NM"),
                      ("x/node_modules/pkg/nm2.actor.py", "NM2"), ("x/__pycache__/c.actor.py", "Cache"),
                      ("plain.py", "Plain"), ("a/notes.txt", "Txt")]:
        _write(root / rel, GOOD.format(name=name))
    _write(root / "a" / "agg.actor.js", (EXAMPLES / "stream_aggregator.actor.js").read_text())
    found = discover(root, ["**/*.actor.py", "**/*.actor.js"], ["**/node_modules/**", "**/__pycache__/**"])
    assert [(c.name, c.file.relative_to(root).as_posix()) for c in found.components] == [
        ("StreamAggregator", "a/agg.actor.js"), ("Deep", "a/b/deep.actor.py"), ("Top", "top.actor.py")]
    assert found.problems == ()
    assert all(c.mtime_ns == c.file.stat().st_mtime_ns for c in found.components)
    # a slash-less exclusion works at any depth; excluding a directory excludes below it
    names = {c.name for c in discover(root, ["**/*.py"], ["node_modules", "a/"]).components}
    assert names == {"Top", "Cache", "Plain"}
    # '*' stays in one segment; '**' is zero or more directories
    assert [c.name for c in discover(root, ["a/*.actor.py", "a/**/*.actor.js"]).components] == ["StreamAggregator"]
    assert [c.name for c in discover(root, ["/*.actor.py"]).components] == ["Top"]


def test_discover_reports_broken_and_duplicate_scripts_and_loads_the_rest(tmp_path):
    _write(tmp_path / "a.actor.py", GOOD.format(name="Same"))
    _write(tmp_path / "b.actor.py", "from reflow import actor\n@actor(name=\n")
    (tmp_path / "c.actor.py").write_text("\n\n" + GOOD.format(name="Same"))
    _write(tmp_path / "d.actor.js", "module.exports = actor({name: 'Js'}, async function (context) {});\n")
    found = discover(tmp_path, ["*.actor.*"])
    assert isinstance(found, Discovery)
    assert [c.name for c in found.components] == ["Same", "Js"]
    a, c = tmp_path / "a.actor.py", tmp_path / "c.actor.py"
    assert [(p.file.name, p.line) for p in found.problems] == [("b.actor.py", 2), ("c.actor.py", 4)]
    assert found.problems[1] == ScriptProblem(c, 4, f"duplicate actor name 'Same' (first defined at {a}:2)")


def test_discover_scripts_arguments(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    _write(ws / "in.actor.py", GOOD.format(name="In"))
    extra = _write(tmp_path / "elsewhere" / "calculator.py", GOOD.format(name="Calculator"))
    _write(tmp_path / "elsewhere" / "processor.js", "// Proc.\nasync function process(context) {}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    found = discover(ws, ["**/*.actor.py"], (), ["calculator.py", "processor.js", str(extra), ws / "in.actor.py",
                                                  "missing.py", str(tmp_path)])
    assert [c.name for c in found.components] == ["Calculator", "processor", "In"]     # sorted by path, deduped
    assert found.components[1].description == "Proc."
    assert [(p.file, p.line, p.message) for p in found.problems] == [
        (tmp_path / "elsewhere" / "missing.py", 0, "no such script"),
        (tmp_path, 0, "not a file (a script is one .py or .js file)")]
    only = discover(ws, ["**/*.actor.py"], (), ["calculator.py"], discover_scripts=False)
    assert [c.name for c in only.components] == ["Calculator"]
    # an explicit SCRIPT is served even when an exclusion would hide it from discovery
    hidden = discover(ws, ["**/*.py"], ["**/in.actor.py"], [ws / "in.actor.py"])
    assert [c.name for c in hidden.components] == ["In"]


def test_discover_missing_root_and_symlink_dedupe(tmp_path):
    assert discover(tmp_path / "nope", ["**/*.py"]).problems[0].message == "the workspace root is not a directory"
    real = _write(tmp_path / "real.actor.py", GOOD.format(name="Real"))
    (tmp_path / "link.actor.py").symlink_to(real)
    (tmp_path / "loop").symlink_to(tmp_path)             # a symlinked directory is not followed
    found = discover(tmp_path, ["**/*.actor.py"])
    assert [(c.name, c.file) for c in found.components] == [("Real", real)] and found.problems == ()


@pytest.mark.parametrize("pattern,path,matches", [
    ("**/*.actor.py", "x.actor.py", True),
    ("**/*.actor.py", "a/b/x.actor.py", True),
    ("*.actor.py", "a/b/x.actor.py", True),                # no slash: any depth, as in .gitignore
    ("/*.actor.py", "a/x.actor.py", False),
    ("./*.actor.py", "x.actor.py", True),
    ("a/*.py", "a/b/c.py", False),
    ("a/**/c.py", "a/c.py", True),
    ("a/**/c.py", "a/x/y/c.py", True),
    ("**/node_modules/**", "node_modules/x.py", True),
    ("**/node_modules/**", "a/node_modules/b/x.py", True),
    ("**/node_modules/**", "a/node_modules_x/b.py", False),
    ("a/[bc]?.py", "a/cd.py", True),
    ("a/[!bc]?.py", "a/cd.py", False),
    ("a/[!bc]?.py", "a/dd.py", True),
    ("x[.py", "x[.py", True),
    ("a+b.py", "a+b.py", True),
])
def test_glob_semantics(pattern, path, matches):
    assert bool(_glob_regex(pattern, anywhere=True).fullmatch(path)) is matches


def test_discover_1000_generated_files(tmp_path):
    """Not a benchmark assertion: prints the time for the report (pytest -s)."""
    src = (FIXTURES / "data_processor.actor.py").read_text()
    for i in range(1000):
        _write(tmp_path / f"g{i % 10}" / f"a{i}.actor.py", src.replace('"DataProcessor"', f'"DP{i}"'))
        if i % 4 == 0:
            _write(tmp_path / f"g{i % 10}" / f"other{i}.py", "x = 1\n")
    t0 = time.perf_counter()
    found = discover(tmp_path, ["**/*.actor.py"], ["**/node_modules/**"])
    elapsed = time.perf_counter() - t0
    assert len(found.components) == 1000 and found.problems == ()
    print(f"\ndiscover() of 1000 Python actors: {elapsed * 1e3:.0f} ms")


# -- round trip -----------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
ports = st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), max_size=4, unique=True)
# Any text, including quotes, backslashes, braces, comment and template markers, newlines, astral characters.
texts = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(list("'\"`\\{}/*$\n"))),
                max_size=24)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names, inports=ports, outports=ports, tags=st.lists(texts, max_size=3), version=st.none() | texts,
       description=texts, call_form=st.booleans(),
       quotes=st.sampled_from(list(json5.QuoteStyle)), indent=st.sampled_from([None, 2]))
def test_metadata_round_trips_through_python_and_js_sources(tmp_path, name, inports, outports, tags, version,
                                                            description, call_form, quotes, indent):
    meta = {"name": name, "inports": inports, "outports": outports, "tags": tags, "version": version,
            "description": description}
    args = ",\n    ".join(f"{k}={v!r}" for k, v in meta.items())
    py = f"from reflow import actor\n\n@actor(\n    {args}\n)\nasync def f(context):\n    '''Doc.'''\n"
    literal = json5.dumps(meta, quote_style=quotes, indent=indent, trailing_commas=indent is not None)
    js = (f"// lead\nmodule.exports = actor({literal}, async function f(context) {{}});\n" if call_form
          else f"const x = '{{';\n@actor({literal})\nasync function f(context) {{}}\n")
    for fname, text in (("m.actor.py", py), ("m.actor.js", js)):
        c = extract(tmp_path / fname, text)
        got = {"name": c.name, "inports": list(c.inports), "outports": list(c.outports), "tags": list(c.tags),
               "version": c.version, "description": c.description}
        assert got == meta, (fname, text)


_fragments = st.sampled_from([
    "@actor({", "actor(", "reflow.", "})", "{", "}", "'", '"', "`", "${", "//", "/*", "*/", "\n", " ", "\\", "\\u",
    ",", "name: 'X'", "inports: ['a']", "module.exports = ", "async function process(c) {}",
    "@actor(name='X')\n", "async def process(c):\n    pass\n", "def f(c): pass\n"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(_fragments | st.text(max_size=4), max_size=30).map("".join),
       name=st.sampled_from(["x.actor.py", "x.actor.js"]))
@example(text="@actor({'\\", name="x.actor.js")  # an unclosed string ending in a backslash (found by this test)
@example(text='@actor({"a\\', name="x.actor.js")
def test_any_text_gives_a_spec_or_a_script_error(tmp_path, text, name):
    try:
        c = extract(tmp_path / name, text)
    except ScriptError as exc:
        assert exc.problem.file == tmp_path / name and exc.problem.line >= 0
    else:
        assert c.source == text and c.name and 1 <= c.line <= text.count("\n") + 1
