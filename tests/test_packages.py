"""``packages:`` per runtime, installed for real from PyPI and npm, cached, bound read-only."""

from __future__ import annotations

import subprocess
import sys

from conftest import open_client, write_workspace

PY = '''
from reflow import actor

@actor(name="UsesSix", inports=["x"], outports=["version", "write"])
def uses_six(context):
    import six
    try:
        open(six.__file__, "a").close()
        write = "ALLOWED"
    except OSError as e:
        write = "denied: " + type(e).__name__
    return {"version": six.__version__, "write": write}
'''

JS = '''\
const { actor } = require('reflow');

@actor({name: "UsesIsNumber", inports: ["x"], outports: ["y"]})
function usesIsNumber(context) {
  const isNumber = require('is-number');
  return {y: [isNumber(context.getInput("x")), isNumber("nope")]};
}
'''


def with_packages(host, python: str = "", javascript: str = "") -> None:
    extra = ""
    if python:
        extra += f"    python: {{packages: [{python}]}}\n"
    if javascript:
        extra += f"    javascript: {{packages: [{javascript}]}}\n"
    host.config.write_text(host.config.read_text().replace("    backend: bubblewrap\n",
                                                           "    backend: bubblewrap\n" + extra))


async def test_python_and_node_packages_install_once_and_are_read_only(make_host):
    host = await make_host({"six.actor.py": PY, "isnum.actor.js": JS}, start=False)
    with_packages(host, python='"six==1.16.0"', javascript='"is-number@7.0.0"')
    await host.start(timeout=300)
    async with open_client(host.url) as c:
        out = (await c.call("UsesSix", {"x": 1}))["outputs"]
        assert out["version"]["value"] == "1.16.0"
        assert out["write"]["value"].startswith("denied")
        assert (await c.call("UsesIsNumber", {"x": 5}))["outputs"]["y"]["value"] == [True, False]
    await host.stop()
    installs = host.output().count("installing ")
    assert installs == 2, host.output()
    await host.start()  # cached: nothing is installed again
    async with open_client(host.url) as c:
        assert (await c.call("UsesSix", {"x": 1}))["outputs"]["version"]["value"] == "1.16.0"
    assert host.output().count("installing ") == installs


def test_a_package_that_cannot_be_installed_is_a_clear_startup_error(tmp_path):
    cfg = write_workspace(tmp_path, {"six.actor.py": PY})
    cfg.write_text(cfg.read_text().replace(
        "    backend: bubblewrap\n",
        "    backend: bubblewrap\n    python: {packages: [reflow-supervisor-no-such-package-4242]}\n"))
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "-c", str(cfg)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    err = r.stderr + r.stdout
    assert "workspace.sandbox.python.packages" in err and "reflow-supervisor-no-such-package-4242" in err, err
    assert "Traceback" not in err
