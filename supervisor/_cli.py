"""``python -m supervisor`` — run, discover, check-config, call, status.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. Errors are one
sentence on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import os
import sys
import time
import traceback
import typing
from pathlib import Path
from typing import Any

import orjson

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line or configuration: exit code 2."""


def _common(top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    Only the top-level parser has defaults: a subcommand's parser (which argparse runs
    after the top level's) would otherwise reset ``-c x check-config`` to its own default.
    """
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=d(None), help="reflow.yaml (default: ./reflow.yaml if present)")
    common.add_argument("--log-level", default=d(None), choices=["debug", "info", "warning", "error"],
                        help="host log level (or REFLOW_LOG)")
    common.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks")
    return common


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one sentence and exit 2, as every other usage error
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    p = _Parser(prog="python -m supervisor", parents=[_common(top=True)],
                description="Run sandboxed Python and JavaScript script actors under supervision.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", parents=[common], help="run the host (the default)")
    run.add_argument("scripts", nargs="*", metavar="SCRIPT", help="extra .py/.js scripts to serve")
    d = sub.add_parser("discover", parents=[common], help="list discovered actors")
    d.add_argument("--json", action="store_true")
    sub.add_parser("check-config", parents=[common], help="validate the config")
    c = sub.add_parser("call", parents=[common], help="send one message and print every output")
    c.add_argument("actor")
    c.add_argument("inputs", nargs="*", metavar="port=JSON")
    c.add_argument("--url", default=None)
    c.add_argument("--token", default=None)
    c.add_argument("--timeout", type=float, default=None)
    dl = sub.add_parser("deadletters", parents=[common], help="list dead letters, or replay one")
    dl.add_argument("--replay", metavar="ID", default=None, help="put this dead letter back in its inbox")
    dl.add_argument("--url", default=None)
    dl.add_argument("--token", default=None)
    s = sub.add_parser("status", parents=[common], help="print the live supervision tree")
    s.add_argument("--url", default=None)
    s.add_argument("--token", default=None)
    s.add_argument("--json", action="store_true")
    return p


def _config_path(arg: str | None) -> Path | None:
    if arg is not None:
        return Path(arg)
    default = Path("reflow.yaml")
    return default if default.exists() else None


def _load_config(arg: str | None) -> Any:
    from .core.config import ConfigError, load_config

    try:
        return load_config(_config_path(arg))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        if command == "run":
            return _run(args)
        if command == "discover":
            return _discover(args)
        if command == "check-config":
            return _check_config(args)
        if command == "call":
            return _call(args)
        if command == "status":
            return _status(args)
        if command == "deadletters":
            return _deadletters(args)
    except UsageError as exc:
        for line in str(exc).splitlines() or [""]:   # one sentence per problem
            print(f"error: {line}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        leaves = _leaves(exc)   # trio wraps a task's error in an ExceptionGroup: show the error
        cause = leaves[0] if len(leaves) == 1 else exc
        print(f"error: {str(cause) or type(cause).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


def _tune_gc() -> None:
    """The host allocates a few short-lived containers per message; CPython's default
    (a young-generation collection every 700 allocations, each older one walking every
    module and config object) costs a loaded host a visible share of its time. Freeze what
    exists at start (imports, config) out of the collector's walks and collect the
    young generation less often; cycles still go, just in larger batches."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _run(args: argparse.Namespace) -> int:
    import trio

    from .core.errors import HostError
    from ._host import Host
    from ._log import setup_logging

    setup_logging("debug" if args.debug and not args.log_level else args.log_level)
    config = _load_config(args.config)
    ws = config.workspace.websocket
    if not _is_loopback(ws.host) and not ws.token:
        raise UsageError(f"workspace.websocket.host is {ws.host!r}, not a loopback address: set "
                         "workspace.websocket.token (or REFLOW_TOKEN) so clients must authenticate")
    for s in getattr(args, "scripts", []):
        if not Path(s).is_file():
            raise UsageError(f"no such script: {s}")
    host = Host(config, extra_scripts=getattr(args, "scripts", []))
    # Everything discovery can tell (names, ports, config against config_schema) is
    # checked before anything starts, with the same messages as check-config.
    _component_problems(config, host.discover().components)
    _tune_gc()
    try:
        trio.run(host.main)
    except HostError as exc:
        raise UsageError(str(exc)) from exc
    except BaseExceptionGroup as eg:  # unwrap a single cause so the user sees one sentence
        leaves = _leaves(eg)
        host_errors = [e for e in leaves if isinstance(e, HostError)]
        if host_errors:
            raise UsageError(str(host_errors[0])) from eg
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return EXIT_OK
        raise _listen_error(leaves[0], ws) from eg
    except OSError as exc:
        raise _listen_error(exc, ws) from exc
    return EXIT_OK


def _listen_error(exc: BaseException, ws: Any) -> BaseException:
    """The API's port cannot be bound: say which, and how to choose another."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        return RuntimeError(f"cannot listen on {ws.host}:{ws.port}: {(exc.strerror or str(exc)).lower()} "
                            "(another host running? choose workspace.websocket.port or REFLOW_WS_PORT)")
    return exc


def _leaves(eg: BaseException) -> list[BaseException]:
    if isinstance(eg, BaseExceptionGroup):
        return [leaf for e in eg.exceptions for leaf in _leaves(e)]
    return [eg]


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _discover(args: argparse.Namespace) -> int:
    found = _discovered(_load_config(args.config))
    if args.json:
        out = {"actors": [_component_json(c) for c in found.components],
               "problems": [{"file": str(p.file), "line": p.line, "message": p.message} for p in found.problems]}
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        for c in found.components:
            ports = f"in: {', '.join(c.inports) or '-'}  out: {', '.join(c.outports) or '-'}"
            print(f"{c.name:24} {c.runtime:10} {ports}  ({_rel(c.file)}:{c.line})")
        for p in found.problems:
            print(f"broken: {_rel(p.file)}:{p.line}: {p.message}")
    return EXIT_OK


def _component_json(c: Any) -> dict:
    return {"name": c.name, "runtime": c.runtime, "file": str(c.file), "line": c.line, "inports": list(c.inports),
            "outports": list(c.outports), "description": c.description, "version": c.version,
            "tags": list(c.tags), "category": c.category, "await_all_inports": c.await_all_inports,
            "dynamic_ports": c.dynamic_ports, "memory": c.memory, "timeout": c.timeout,
            "state_backend": c.state_backend, "config_schema": c.config_schema}


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _discovered(config: Any) -> Any:
    """What the workspace's scripts declare, read statically (nothing of them runs)."""
    from ._scan import discover

    ws = config.workspace
    return discover(ws.root, ws.script_patterns, ws.excluded_paths, ws.scripts, discover_scripts=ws.discover_scripts)


def _component_problems(config: Any, components: Any) -> None:
    """Raise UsageError with every problem ``run`` would have with these components."""
    from .components import package_components
    from .core.config import check_components

    problems = check_components(config, components, package_components())
    if problems:
        raise UsageError("\n".join(str(p) for p in problems))


def _check_config(args: argparse.Namespace) -> int:
    """The file, then the network and process config against what discovery finds (statically)."""
    config = _load_config(args.config)
    found = _discovered(config)
    _component_problems(config, found.components)
    for p in found.problems:   # run serves the others; say so, but the config itself is fine
        print(f"warning: script not loaded: {_rel(p.file)}:{p.line}: {p.message}", file=sys.stderr)
    where = config.path or "defaults (no reflow.yaml)"
    n = len(config.network.processes) if config.network is not None else len(found.components)
    print(f"{where}: ok ({len(found.components)} actors discovered, {n} processes)")
    return EXIT_OK


def _url(args: argparse.Namespace) -> str:
    """The host's URL: --url, else the running host's state file, else the config's address."""
    if args.url:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(args.url)
            ok = parts.scheme in ("ws", "wss") and bool(parts.hostname)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--url {args.url!r} is not a ws:// or wss:// URL (like ws://127.0.0.1:8080/)")
        return args.url
    config = _load_config(args.config)
    info = config.workspace.state_dir / "host.json"
    if info.exists():
        try:
            return orjson.loads(info.read_bytes())["url"]
        except (ValueError, KeyError):
            pass
    ws = config.workspace.websocket
    return f"ws://{ws.host}:{ws.port}/"


def _call(args: argparse.Namespace) -> int:
    import trio

    from .client import RpcError, open_client

    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    inputs: dict[str, Any] = {}
    for item in args.inputs:
        port, sep, raw = item.partition("=")
        if not sep or not port:
            raise UsageError(f"expected port=JSON, got {item!r}")
        try:
            inputs[port] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # A bare word is a string (op=mul), but a typo'd number or object would be too: say so.
            inputs[port] = raw
            print(f"note: {port}: not JSON, sent as the string {raw!r}", file=sys.stderr)
    url = _url(args)
    token = args.token or os.environ.get("REFLOW_TOKEN")

    async def go() -> int:
        async with open_client(url, token=token) as client:
            outputs = client.on_notification("output")

            streamed: collections.Counter = collections.Counter()

            def show(note: dict) -> None:
                p = note["params"]
                streamed[(p["port"], orjson.dumps(p["data"], option=orjson.OPT_SORT_KEYS))] += 1
                print(f"{p['port']}: {orjson.dumps(p['data']).decode()}", flush=True)

            async def show_streamed() -> None:
                async for note in outputs:
                    show(note)

            def show_queued() -> None:
                """Streamed outputs come before the reply, but may still wait to be shown (read
                in the same network read as the reply, they are all queued by now)."""
                while True:
                    try:
                        show(outputs.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        return

            failed: RpcError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show_streamed)
                try:
                    result = await client.request("process", {"actor_id": args.actor, "payload": inputs,
                                                              **({"timeout": args.timeout} if args.timeout else {})})
                except RpcError as exc:
                    failed = exc
                finally:
                    nursery.cancel_scope.cancel()  # (it prints a note it was already handed first)
            show_queued()
            if failed is not None:
                print(f"error: {failed.message} ({failed.code})", file=sys.stderr)
                if failed.data and args.debug:
                    print(orjson.dumps(failed.data, option=orjson.OPT_INDENT_2).decode(), file=sys.stderr)
                return EXIT_FAILURE
            for port, value in result["outputs"].items():
                # A script that streams an output and also returns it (``return context.get_outputs()``)
                # would show it twice: print only what was not streamed already.
                seen = (port, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
                if streamed[seen]:
                    streamed[seen] -= 1
                    continue
                print(f"{port}: {orjson.dumps(value).decode()}")
            return EXIT_OK

    return _connecting(url, lambda: trio.run(go))


def _status(args: argparse.Namespace) -> int:
    import trio

    from .client import open_client

    url = _url(args)

    async def go() -> dict:
        async with open_client(url, token=args.token or os.environ.get("REFLOW_TOKEN")) as client:
            return await client.status()

    tree = _connecting(url, lambda: trio.run(go))
    if args.json:
        print(orjson.dumps(tree, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    _print_tree(tree, 0)
    tiers = _tiers(tree)
    backend = tree.get("backend")
    if backend:
        print(f"backend: {backend}")
    for tier in sorted(tiers):
        print(f"tier={tier}: {_TIERS.get(tier, 'an isolation tier this client does not know')}")
    pools = tree.get("pools") or {}
    for rt, p in pools.items():
        state = p.get("state")
        preload = f"/{p['preload']}" if "preload" in p else ""
        line = f"pool {rt}: {state + ' — ' if state else ''}{p['warm']}{preload} warm, {p['live']}/{p['max_size']} live"
        if p.get("last_error"):
            line += f"  last_error={p['last_error']}"
        print(line)
    hosts = tree.get("hosts") or []
    for h in hosts:
        me = " (this host)" if h.get("id") == tree.get("host") else ""
        seen = f"{max(0.0, time.time() - h['last_seen']):.1f}s ago" if isinstance(h.get("last_seen"), float) else "?"
        labels = f" labels={','.join(h['labels'])}" if h.get("labels") else ""
        print(f"host {h.get('id')}{me}: {h.get('url')}{labels}, seen {seen}, "
              f"owns {', '.join(h.get('processes') or []) or 'nothing'}")
    problems = tree.get("script_problems") or []
    for problem in problems:
        print(f"broken script (not loaded): {problem}")
    return EXIT_OK


#: What each worker's ``tier`` in ``supervisor.status`` means.
_TIERS = {
    "microvm": "its own microVM (microsandbox): a separate guest kernel",
    "namespaces": "its own bubblewrap sandbox: Linux namespaces, no network, seccomp, resource limits",
    "none": "a plain host process with the host's privileges: NO ISOLATION (backend: process)",
}


def _tiers(node: dict) -> set[str]:
    found = {node["tier"]} if node.get("tier") else set()
    for child in node.get("children") or []:
        found |= _tiers(child)
    return found


def _deadletters(args: argparse.Namespace) -> int:
    import trio

    from .client import open_client

    url = _url(args)

    async def go() -> Any:
        async with open_client(url, token=args.token or os.environ.get("REFLOW_TOKEN"), reconnect=False) as client:
            if args.replay:
                return await client.request("deadletters.replay", {"id": args.replay})
            return await client.request("deadletters.list", {"count": 1000})

    result = _connecting(url, lambda: trio.run(go))
    if args.replay:
        print(f"replayed {args.replay} into {result['process']}")
        return EXIT_OK
    if not result["deadletters"]:
        print("no dead letters")
    for d in result["deadletters"]:
        err = d["error"]
        why = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else err
        print(f"{d['id']}  {d['process']}  attempts={d['attempts']}  {why}  inputs={orjson.dumps(d['inputs']).decode()}")
    return EXIT_OK


def _connecting(url: str, fn: Any) -> Any:
    """Run a client; a refused or failed connection becomes one sentence."""
    import trio_websocket

    from .client import ConnectionLost

    try:
        return fn()
    except (OSError, trio_websocket.HandshakeError, ConnectionLost) as exc:
        why = exc.__cause__ or exc
        if isinstance(exc, trio_websocket.ConnectionRejected) or isinstance(why, trio_websocket.ConnectionRejected):
            rej = exc if isinstance(exc, trio_websocket.ConnectionRejected) else why
            raise RuntimeError(f"the host at {url} refused the connection (HTTP {rej.status_code}); "
                               "a token may be needed: --token or REFLOW_TOKEN") from exc
        raise RuntimeError(f"cannot reach the host at {url}: {why or type(why).__name__}") from exc


def _print_tree(node: dict, depth: int) -> None:
    pad = "  " * depth
    kind = node.get("kind")
    extra = f" strategy={node.get('strategy')}" if kind == "supervisor" else \
        f" tier={node.get('tier')} pending={node.get('pending')} processed={node.get('processed')}"
    if kind == "actor" and node.get("host") is not None:
        extra += f" host={node['host']} fence={node.get('fence')}"
    line = f"{pad}{node['name']} [{kind}] {node.get('state')} restarts={node.get('restarts')}{extra}"
    err = node.get("last_error")
    if err:
        line += f"  last_error={err.get('type')}: {err.get('message')}"
    if isinstance(node.get("last_exit"), dict):
        line += f"  last_exit={node['last_exit'].get('reason')}: {node['last_exit'].get('message')}"
    if node.get("last_restart_cause"):
        line += f"  restarted because: {node['last_restart_cause']}"
    print(line)
    for child in node.get("children") or []:
        _print_tree(child, depth + 1)
