"""The CLI against a real host: call prints streamed and final outputs, status prints the tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import trio

from conftest import EXAMPLES, run_cli, wait_for


# The seed's test_actor.py (streamed outputs, then get_outputs), with its ports declared.
_STREAMS_AND_RETURNS = (EXAMPLES / "test_actor.py").read_text().replace(
    "async def process", "from reflow import actor\n\n"
    "@actor(name='T', inports=['value'], outports=['status', 'result'])\nasync def process")


async def test_call_and_status_commands(make_host):
    host = await make_host({"t.actor.py": _STREAMS_AND_RETURNS}, "", "--log-level", "debug")
    cwd = host.config.parent
    rc, out, err = await run_cli("call", "T", "value=21", "-c", str(host.config), cwd=cwd)
    assert rc == 0, err
    assert out.splitlines()[:2] == ['status: "processing"', "result: 42"]
    rc, out, err = await run_cli("status", "-c", str(host.config), cwd=cwd)
    assert rc == 0, err
    assert "root [supervisor] running" in out and "T [actor] running" in out and "tier=namespaces" in out
    rc, out, err = await run_cli("call", "Nope", "x=1", "--url", host.url, cwd=cwd)
    assert rc == 1 and "unknown actor 'Nope' (-32001)" in err
    rc, out, err = await run_cli("call", "T", "oops", "--url", host.url, cwd=cwd)
    assert rc == 2 and "port=JSON" in err
    log = host.output()
    for event in ("sandbox created", "rpc server started", "script loaded into worker", "rpc request"):
        assert event in log, event
    await host.stop()
    assert "sandbox cleaned up" in host.output()


async def test_status_without_a_host_is_one_clear_sentence(tmp_path):
    rc, out, err = await run_cli("status", "--url", "ws://127.0.0.1:9/", cwd=tmp_path)
    assert rc == 1 and err.startswith("error: cannot reach the host") and "Traceback" not in err


async def test_call_timeout_is_minus_32003(make_host):
    slow = ("import time\nfrom reflow import actor\n\n@actor(name='S', inports=['x'], outports=['y'])\n"
            "def s(context):\n    time.sleep(5)\n    return {'y': 1}\n")
    host = await make_host({"s.actor.py": slow})
    rc, out, err = await run_cli("call", "S", "x=1", "--timeout", "0.5", "--url", host.url, cwd=host.config.parent)
    assert rc == 1 and "(-32003)" in err


async def test_call_shows_what_a_failing_actor_streamed_before_its_error(make_host):
    script = ("from reflow import actor\n\n@actor(name='F', inports=['x'], outports=['step'])\n"
              "async def f(context):\n"
              "    for i in range(200):\n"
              "        await context.send_output('step', i)\n"
              "    raise ValueError('gave up')\n")
    host = await make_host({"f.actor.py": script})
    rc, out, err = await run_cli("call", "F", "x=1", "--url", host.url, cwd=host.config.parent)
    assert rc == 1 and "gave up" in err and "(-32002)" in err and "Traceback" not in err
    # Every streamed output, in order, then the error. (Whether the last outputs share a
    # network read with the error reply is up to timing; this does not force it.)
    assert out.splitlines() == [f"step: {i}" for i in range(200)]


def _run_cli(*args: str, cwd, timeout: float = 60) -> tuple[int, str, str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def test_common_options_work_before_and_after_the_command(tmp_path):
    (tmp_path / "bad.yaml").write_text("workspace:\n  bogus: 1\n")
    for args in (("-c", "bad.yaml", "check-config"), ("check-config", "-c", "bad.yaml"),
                 ("--log-level", "debug", "-c", "bad.yaml", "check-config")):
        rc, out, err = _run_cli(*args, cwd=tmp_path)
        assert rc == 2 and "workspace.bogus: unknown key" in err and "bad.yaml:2" in err, (args, out, err)
        assert "ok" not in out
    rc, out, err = _run_cli("--log-level", "loud", "check-config", cwd=tmp_path)
    assert rc == 2 and err.startswith("error: argument --log-level") and "Traceback" not in err


_NETWORK_CALC = ("from reflow import actor\n\n@actor(name='Calc', inports=['value'], outports=['result'],\n"
                 "       config_schema={'factor': 'number'})\nasync def calc(context):\n"
                 "    return {'result': context.get_input('value') * context.get_config()['factor']}\n")


def test_check_config_and_run_reject_what_discovery_contradicts(tmp_path):
    (tmp_path / "calc.actor.py").write_text(_NETWORK_CALC)
    (tmp_path / "reflow.yaml").write_text(
        "network:\n  processes:\n    double:\n      component: Calc\n      config: {factor: two}\n"
        "    log: {component: Logger}\n"
        "  connections:\n    - {data: 2, tgt: {process: double, port: valu}}\n")
    expected = ["error: network.processes.double.config.factor: 'two' is not of type 'number' (reflow.yaml:5)",
                "error: network.processes.log.component: unknown component 'Logger' (discovered: Calc) (reflow.yaml:6)",
                "error: network.connections[0].tgt.port: Calc has no inport 'valu' (inports: value) (reflow.yaml:8)"]
    rc, out, err = _run_cli("check-config", cwd=tmp_path)
    assert (rc, out, err.splitlines()) == (2, "", expected)
    rc, out, err = _run_cli("run", cwd=tmp_path)   # refused before any sandbox or Redis starts
    assert rc == 2 and err.splitlines() == expected and not (tmp_path / ".reflow").exists()
    (tmp_path / "reflow.yaml").write_text("network:\n  processes:\n    double: {component: Calc, config: {factor: 2}}\n")
    rc, out, err = _run_cli("check-config", cwd=tmp_path)
    assert rc == 0 and out.startswith("reflow.yaml: ok"), err


async def test_auto_backend_probes_once_and_says_what_it_chose(make_host, tmp_path):
    """The microVM probe's verdict is remembered under XDG_CACHE_HOME: the second start pays nothing for it."""
    import time

    cache = tmp_path / "xdg-cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    # A start interrupted mid-probe (Ctrl-C reaches the VMM too) says it probes first, and remembers
    # no verdict that the interrupt made: one the VMM reached itself (its log's KVM error) may stay.
    early = await make_host({}, "", backend="auto", start=False, env=env)
    with open(early.log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(early.config),
                                 "--log-level", "info"], cwd=early.config.parent, stdout=logf,
                                stderr=subprocess.STDOUT, env=early.env, start_new_session=True)
        try:
            await wait_for(lambda: "probing whether a microVM boots here" in early.output(), timeout=30)
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
            await wait_for(lambda: proc.poll() is not None, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    probe_file = cache / "reflow-supervisor" / "microvm-probe.json"
    remembered = orjson.loads(probe_file.read_bytes()) if probe_file.exists() else {}
    assert not any("SIGINT" in v["reason"] or "signal: 2" in v["reason"] for v in remembered.values()), remembered
    probe_file.unlink(missing_ok=True)

    first = await make_host({}, "", "--log-level", "info", backend="auto", start=False, env=env)
    started = time.monotonic()
    await first.start(timeout=90)
    first_s = time.monotonic() - started
    await first.stop()
    chosen = [line for line in first.output().splitlines() if "sandbox: using" in line]
    assert len(chosen) == 1, first.output()
    if "using microsandbox" in chosen[0]:
        import pytest
        pytest.skip("a microVM boots here: auto keeps checking its images at every start")
    assert "using bubblewrap (namespaces) — " in chosen[0] and "probed in" in chosen[0], chosen
    assert (cache / "reflow-supervisor" / "microvm-probe.json").exists()

    second = await make_host({}, "", "--log-level", "info", backend="auto", start=False, env=env)
    started = time.monotonic()
    await second.start()
    second_s = time.monotonic() - started
    (line,) = [line for line in second.output().splitlines() if "sandbox: using" in line]
    assert "using bubblewrap (namespaces) — " in line and f"remembered in {cache}" in line, line
    assert chosen[0].split(" — ", 1)[1].split(";")[0] == line.split(" — ", 1)[1].split(";")[0]  # the same reason
    assert second_s < 8 and second_s < first_s, (first_s, second_s)


async def test_call_prints_each_output_once_and_notes_a_non_json_input(make_host):
    host = await make_host({"t.actor.py": _STREAMS_AND_RETURNS})
    rc, out, err = await run_cli("call", "T", "value=21", "--url", host.url, cwd=host.config.parent)
    assert (rc, out.splitlines(), err) == (0, ['status: "processing"', "result: 42"], "")
    rc, out, err = await run_cli("call", "T", "value=ab", "--url", host.url, cwd=host.config.parent)
    assert (rc, out.splitlines()) == (0, ['status: "processing"', 'result: "abab"'])
    assert err.splitlines() == ["note: value: not JSON, sent as the string 'ab'"]
    rc, out, err = await run_cli("call", "T", 'value="ab"', "--url", host.url, cwd=host.config.parent)
    assert rc == 0 and err == ""


async def test_status_shows_broken_scripts_tiers_and_pool_state_and_deadletters_says_none(make_host):
    host = await make_host({"t.actor.py": _STREAMS_AND_RETURNS,
                            "broken.actor.py": "from reflow import actor\n\n@actor(name='X'\ndef f(:\n"})
    cwd = host.config.parent
    rc, out, err = await run_cli("status", "--url", host.url, cwd=cwd)
    assert rc == 0, err
    lines = out.splitlines()
    assert any(line.startswith("broken script (not loaded): ") and "broken.actor.py:4" in line for line in lines), out
    assert "tier=namespaces: its own bubblewrap sandbox" in out and "backend: bubblewrap" in out
    (pool,) = [line for line in lines if line.startswith("pool python: ")]
    assert pool.split(" — ")[0] in ("pool python: warming", "pool python: warm") and "/1 warm, " in pool, pool
    rc, out, err = await run_cli("deadletters", "--url", host.url, cwd=cwd)
    assert (rc, out, err) == (0, "no dead letters\n", "")
    rc, out, err = await run_cli("deadletters", "--replay", "0-1", "--url", host.url, cwd=cwd)
    assert (rc, out, err) == (1, "", "error: no dead letter '0-1' (-32602)\n")


async def test_status_says_the_pool_is_warming_until_preload_workers_are_warm(make_host):
    """Ready is not warm: the host serves at once; status and the log say how warm its pool is."""
    from supervisor.client import open_client

    host = await make_host({"t.actor.py": _STREAMS_AND_RETURNS}, start=False)
    host.config.write_text(host.config.read_text().replace("preload_count: 1", "preload_count: 4"))
    await host.start()
    (ready,) = [line for line in host.output().splitlines() if "rpc server started" in line]
    assert "pools=" in ready and "/4 warm" in ready, ready
    async with open_client(host.url) as client:
        with trio.fail_after(60):
            while True:
                p = (await client.status())["pools"]["python"]
                assert p["preload"] == 4
                assert p["state"] == ("warm" if p["warm"] >= 4 else "warming"), p
                if p["state"] == "warm":
                    break
                await trio.sleep(0.05)  # polling status, as a user would
    if "python 4/4 warm" not in ready:  # (it may have been warm already at ready)
        await wait_for(lambda: "pool python warm" in host.output())


async def test_every_cli_error_is_one_sentence_with_its_exit_code(tmp_path):
    import socket

    cases = [(("status", "--url", "garbage"), 2, "error: --url 'garbage' is not a ws:// or wss:// URL"),
             (("call", "X", "a=1", "--url", "http://h/"), 2, "error: --url 'http://h/' is not a ws://"),
             (("call", "X", "a=1", "--timeout", "0"), 2, "error: --timeout must be a positive number"),
             (("call", "X", "a"), 2, "error: expected port=JSON, got 'a'"),
             (("discover", "-c", "missing.yaml"), 2, "error: cannot read the config file"),
             (("run", "missing.py"), 2, "error: no such script: missing.py"),
             (("frobnicate",), 2, "error: argument command: invalid choice: 'frobnicate'")]
    results = {}

    async def one(args: tuple[str, ...]) -> None:
        results[args] = await run_cli(*args, cwd=tmp_path)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "reflow.yaml").write_text(
            f"workspace:\n  sandbox: {{backend: bubblewrap, pool: {{preload_count: 0}}}}\n"
            f"  websocket: {{port: {port}}}\n")
        cases.append((("run", "--log-level", "warning"), 1,
                      f"error: cannot listen on 127.0.0.1:{port}: address already in use"))
        cases.append((("--debug", "status", "--url", "ws://127.0.0.1:9/"), 1, "Traceback"))
        async with trio.open_nursery() as nursery:   # independent processes: run them side by side
            for args, _, _ in cases:
                nursery.start_soon(one, args)
    for args, code, start in cases[:-1]:
        rc, out, err = results[args]
        assert rc == code and err.startswith(start) and err.count("\n") == 1, (args, rc, err)
        assert "Traceback" not in err
    rc, out, err = results[cases[-1][0]]  # --debug: the traceback, then the same one sentence
    assert rc == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: cannot reach")
