"""The slot-aware Redis Cluster client (supervisor/_redis.py ``ClusterRedis``) against a
real 3-master cluster of the bundled redis-server (conftest ``redis_cluster``).

What it must get right: each command reaches its slot's master (keys, scripts,
transactions, pipelines, multi-key commands split per node), it follows the cluster when a
slot moves (MOVED, ASK), and a lost master fails only its own slots' calls, with a sentence
naming it, until it is back.
"""

from __future__ import annotations

import re

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from supervisor._redis import (EVERY, SPLIT, ClusterRedis, Redis, RedisError, RedisUnavailable, command_keys,
                               command_slot, key_slot, open_redis)


def _node_of(cluster, slot: int) -> int:
    """The index of the node serving ``slot`` (as the conftest split them: evenly, in order)."""
    per = 16384 // len(cluster.ports)
    return min(slot // per, len(cluster.ports) - 1)


def _key_on(cluster, node: int, prefix: str = "k") -> str:
    """A key (with a hash tag of its own) whose slot node ``node`` serves."""
    for n in range(10000):
        key = f"{{{prefix}{n}}}:x"
        if _node_of(cluster, key_slot(key)) == node:
            return key
    raise AssertionError("no key found")


def _calls(cluster, node: int, command: str, field: str = "calls") -> int:
    """INFO commandstats of node ``node``: ``calls`` run, or ``rejected_calls`` (MOVED, ASK, …)."""
    stats = cluster.client(node).info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get(field, 0))


async def test_keys_in_every_nodes_slots_round_trip_and_multi_key_commands_split(redis_cluster):
    async with open_redis(redis_cluster.url) as redis:
        assert isinstance(redis, ClusterRedis) and redis.clustered
        keys = [_key_on(redis_cluster, i) for i in range(3)]
        for i, key in enumerate(keys):
            assert await redis.execute("SET", key, f"v{i}") == b"OK"
            assert redis_cluster.client(i).get(key) == f"v{i}".encode()  # on the node its slot names
        assert await redis.execute("MGET", *keys, "{nothing}:here") == [b"v0", b"v1", b"v2", None]
        assert await redis.execute("EXISTS", *keys) == 3
        assert await redis.execute("DEL", *keys) == 3
        assert await redis.execute("MGET", *keys) == [None, None, None]
        assert await redis.execute("PING") == b"PONG"  # (keyless: any master)
        assert "3 masters" in redis.describe() and redis.connected


async def test_a_hash_tagged_script_runs_on_its_node_and_goes_as_evalsha_after(redis_cluster):
    script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])"  # (body of this test only)
    async with open_redis(redis_cluster.url) as redis:
        node = _node_of(redis_cluster, key_slot("{proc7}"))
        before = _calls(redis_cluster, node, "evalsha")
        assert await redis.execute("EVAL", script, 2, "{proc7}:state", "{proc7}:n", "a") == 1
        assert await redis.execute("EVAL", script, 2, "{proc7}:state", "{proc7}:n", "b") == 2
        assert _calls(redis_cluster, node, "evalsha") == before + 1
        assert redis_cluster.client(node).get("{proc7}:state") == b"b"
        # a node that connected before the script was known gets it too (SCRIPT LOAD first)
        other = _key_on(redis_cluster, (node + 1) % 3, "other")
        await redis.execute("SET", other, "x")
        tag = other.split("}")[0] + "}"
        assert await redis.execute("EVAL", script, 2, other, f"{tag}:n", "c") == 1
        with pytest.raises(RedisError, match=r"CROSSSLOT.*'\{a\}:1'.*'\{b\}:2'"):
            await redis.execute("EVAL", script, 2, "{a}:1", "{b}:2", "z")
        assert await redis.execute("EVAL", "return 7", 0) == 7  # (no keys: any node)


async def test_transactions_and_ordered_submits_on_one_slot_and_a_pipeline_across_nodes(redis_cluster):
    async with open_redis(redis_cluster.url) as redis:
        assert await redis.transaction([("SET", "{p}:a", "1"), ("INCR", "{p}:a"), ("GET", "{p}:a")]) == \
            [b"OK", 2, b"2"]
        with pytest.raises(RedisError, match="CROSSSLOT transaction"):
            await redis.transaction([("SET", "{p}:a", "1"), ("SET", "{q}:b", "1")])
        replies = [redis.submit("RPUSH", "{p}:order", i) for i in range(50)]
        replies.append(redis.submit_transaction([("LLEN", "{p}:order")], then=lambda r: r[0] * 10))
        assert [await r() for r in replies] == [*range(1, 51), 500]
        assert replies[0].ready
        keys = [_key_on(redis_cluster, i % 3, f"pipe{i}") for i in range(12)]
        got = await redis.pipeline([("SET", k, i) for i, k in enumerate(keys)] + [("INCR", "{p}:order")] +
                                   [("GET", k) for k in keys])
        assert got[:12] == [b"OK"] * 12 and isinstance(got[12], RedisError)  # (a list: WRONGTYPE)
        assert got[13:] == [str(i).encode() for i in range(12)]


async def test_the_client_follows_a_slot_migrated_to_another_master_moved_and_ask(redis_cluster):
    async with open_redis(redis_cluster.url) as redis:
        key = _key_on(redis_cluster, 0, "mig")
        slot = key_slot(key)
        src, dst = redis_cluster.client(0), redis_cluster.client(1)
        src_id, dst_id = redis_cluster.ids[0], redis_cluster.ids[1]
        await redis.execute("SET", key, "old")
        tag = key.split("}")[0] + "}"
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        # the window: a key of the slot that the source no longer has is the target's (ASK)
        assert await redis.execute("SET", f"{tag}:new", "fresh") == b"OK"
        assert dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        assert await redis.transaction([("SET", f"{tag}:t", "1"), ("INCR", f"{tag}:t")]) == [b"OK", 2]  # (ASK too)
        assert dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 2
        assert await redis.execute("GET", key) == b"old"  # (still on the source)
        src.execute_command("MIGRATE", "127.0.0.1", redis_cluster.ports[1], "", 0, 5000, "KEYS", key)
        for c in (src, dst, redis_cluster.client(2)):
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        moved = _calls(redis_cluster, 0, "get", "rejected_calls")
        assert await redis.submit("GET", key)() == b"old"  # MOVED: from the source to the target
        assert _calls(redis_cluster, 0, "get", "rejected_calls") == moved + 1  # (asked there, redirected)
        assert await redis.execute("GET", f"{tag}:new") == b"fresh"
        # a slot with no keys yet moves without MIGRATE: a pipeline meets MOVED for two of its commands
        key2 = _key_on(redis_cluster, 0, "mig2")
        for c in (src, dst, redis_cluster.client(2)):
            c.execute_command("CLUSTER", "SETSLOT", key_slot(key2), "NODE", dst_id)
        far = _key_on(redis_cluster, 2, "far")
        rejected = _calls(redis_cluster, 0, "set", "rejected_calls")
        assert await redis.pipeline([("SET", key2, "p"), ("SET", far, "f"), ("GET", key2), ("GET", far)]) == \
            [b"OK", b"OK", b"p", b"f"]
        assert dst.get(key2) == b"p"
        assert _calls(redis_cluster, 0, "set", "rejected_calls") == rejected + 1  # (it did meet MOVED)
        before = _calls(redis_cluster, 0, "get")
        assert await redis.transaction([("INCR", f"{tag}:n"), ("GET", key)]) == [1, b"old"]
        assert _calls(redis_cluster, 0, "get") == before  # the map was updated: straight to the target


async def test_a_killed_master_fails_only_its_slots_naming_it_and_serves_again_when_restarted(tmp_path,
                                                                                              redis_cluster):
    async with trio.open_nursery() as nursery:
        seed = Redis(redis_cluster.url, nursery)
        redis = ClusterRedis(redis_cluster.url, nursery, deadline=1.0, seed=seed)
        await redis.refresh()
        dead, alive = _key_on(redis_cluster, 2, "dead"), _key_on(redis_cluster, 1, "alive")
        await redis.execute("SET", dead, "kept")  # (appendonly: it survives the kill)
        assert redis_cluster.client(2).get(dead) == b"kept"
        redis_cluster.kill(2)
        with trio.fail_after(5):
            t0 = trio.current_time()
            with pytest.raises(RedisUnavailable, match=re.escape(f"127.0.0.1:{redis_cluster.ports[2]}")):
                await redis.execute("GET", dead)
            assert trio.current_time() - t0 < redis.deadline + 0.5  # (within its deadline)
            with pytest.raises(RedisUnavailable, match=re.escape(f"127.0.0.1:{redis_cluster.ports[2]}")):
                await redis.submit("GET", dead)()
            assert await redis.execute("SET", alive, "fine") == b"OK"
            assert await redis.execute("GET", alive) == b"fine"
        # Back on its port: refused connections, then CLUSTERDOWN while it rejoins (a 6.2 master
        # waits cluster-node-timeout), both retried within a deadline long enough for it.
        redis_cluster._spawn(2)
        redis.deadline = 8.0
        with trio.fail_after(10):
            assert await redis.execute("GET", dead) == b"kept"
        errors = redis_cluster.client(2).info("errorstats")
        assert errors.get("errorstat_CLUSTERDOWN", {}).get("count", 0) >= 1, errors
        await redis_cluster.wait_ok()
        await redis.aclose()
        nursery.cancel_scope.cancel()


async def test_listen_on_the_cluster_gets_messages_published_on_every_node(redis_cluster):
    got: list[bytes | None] = []
    arrived = trio.Event()

    def on_message(data):
        got.append(data)
        if len([m for m in got if m]) == 3:
            arrived.set()

    async with open_redis(redis_cluster.url) as redis, trio.open_nursery() as nursery:
        nursery.start_soon(redis.listen, "events", on_message)
        with trio.fail_after(5):
            while not any(redis_cluster.client(i).pubsub_numsub("events")[0][1] for i in range(3)):
                await trio.sleep(0.01)  # (polling the subscription's arrival)
            for i in range(3):
                redis_cluster.client(i).publish("events", f"from{i}")
            await arrived.wait()
        assert got == [None, b"from0", b"from1", b"from2"]
        nursery.cancel_scope.cancel()


async def test_open_redis_tells_a_cluster_from_one_redis_and_names_an_unreachable_one(redis_cluster, tmp_path):
    import subprocess

    from conftest import answers, free_port, redis_server_argv, wait_for

    port, argv = redis_server_argv(tmp_path / "plain")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis as redis_py

        await wait_for(lambda: answers(redis_py.Redis(port=port)), 10, 0.005)
        async with open_redis(f"redis://127.0.0.1:{port}") as plain:
            assert type(plain) is Redis and not plain.clustered
            assert await plain.execute("SET", "{a}:1", 1) == b"OK"
        async with open_redis(redis_cluster.url) as cluster:
            assert type(cluster) is ClusterRedis
    finally:
        proc.kill()
        proc.wait()
    nowhere = free_port()
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{nowhere}"):
        async with open_redis(f"redis://127.0.0.1:{nowhere}"):
            pass


# --- pure: which keys a command names, and where it goes ---------------------------------

keys_st = st.lists(st.text(min_size=1, max_size=8) | st.binary(min_size=1, max_size=8), min_size=1, max_size=6)


@given(keys=keys_st, args=st.lists(st.text(max_size=5), max_size=3))
def test_command_keys_names_the_keys_of_each_form(keys, args):
    n = len(keys)
    assert command_keys(["MGET", *keys]) == keys
    assert command_keys(["DEL", *keys]) == keys
    assert command_keys(["EVAL", "return 1", n, *keys, *args]) == keys
    assert command_keys(["EVALSHA", "abc", n, *keys, *args]) == keys
    assert command_keys(["XREADGROUP", "GROUP", "g", "c", "COUNT", 5, "BLOCK", 0, "STREAMS", *keys,
                         *([">"] * n)]) == keys
    assert command_keys(["XREAD", "STREAMS", *keys, *(["0"] * n)]) == keys
    assert command_keys(["MSET", *[x for k in keys for x in (k, "v")]]) == keys
    assert command_keys(["BLPOP", *keys, 0]) == keys
    assert command_keys(["SET", keys[0], *args]) == [keys[0]]
    assert command_keys(["XGROUP", "CREATE", keys[0], "g", "0", "MKSTREAM"]) == [keys[0]]
    assert command_keys(["XREADGROUP", "GROUP", "streams", "streams", "STREAMS", *keys, *([">"] * n)]) == keys
    assert command_keys(["PUBLISH", keys[0], "m"]) == [] and command_keys(["PING"]) == []


@given(tag=st.text(min_size=1, max_size=8).filter(lambda t: not set(t) & set("{}*?[\\")),
       suffixes=st.lists(st.text(max_size=8), min_size=1, max_size=5))
def test_keys_sharing_a_hash_tag_route_to_one_slot_and_split_commands_are_recognised(tag, suffixes):
    keys = [f"ns:{{{tag}}}:{s}" for s in suffixes]
    slot = key_slot("{" + tag + "}")
    assert command_slot(["EVAL", "s", len(keys), *keys]) == slot
    assert command_slot(["SCAN", 0, "MATCH", f"ns:{{{tag}}}:*", "COUNT", 10]) == slot
    other = next(f"{{z{i}}}" for i in range(100) if key_slot(f"{{z{i}}}") != slot)
    assert command_slot(["MGET", *keys, other]) is SPLIT
    with pytest.raises(RedisError, match="CROSSSLOT"):
        command_slot(["EVAL", "s", 2, keys[0], other])
    assert command_slot(["PING"]) is None


def test_an_untagged_scan_goes_to_every_master_and_keys_is_refused():
    assert command_slot(["SCAN", 0, "MATCH", "ns:*"]) is EVERY
    assert command_slot(["SCAN", 0, "MATCH", "ns:{*}:lease"]) is EVERY  # (a glob in the braces: no tag)
    with pytest.raises(RedisError, match="use SCAN"):
        command_slot(["KEYS", "*"])


async def test_scan_finds_every_nodes_keys_untagged_and_one_slots_keys_tagged(redis_cluster):
    async with open_redis(redis_cluster.url) as redis:
        keys = {f"scan:{{t{i}}}:k".encode() for i in range(60)}
        assert {_node_of(redis_cluster, key_slot(k)) for k in keys} == {0, 1, 2}
        await redis.pipeline([("SET", k, 1) for k in keys])
        found, cursor = [], b"0"
        for _ in range(1000):  # (bounded: a cursor that never ends fails the test)
            cursor, batch = await redis.execute("SCAN", cursor, "MATCH", "scan:*", "COUNT", 7)
            found += batch
            if cursor == b"0":
                break
        assert sorted(found) == sorted(keys)  # every key once
        cursor, batch = await redis.execute("SCAN", 0, "MATCH", "scan:{t3}:*", "COUNT", 1000)
        assert batch == [b"scan:{t3}:k"]


async def test_node_connections_carry_the_urls_credentials(nursery):
    redis = ClusterRedis("redis://user:secret@127.0.0.1:7000", nursery)
    assert redis._node("127.0.0.1:7001").url == "redis://user:secret@127.0.0.1:7001"


async def test_listen_moves_to_another_master_when_its_node_dies(redis_cluster):
    got: list[bytes | None] = []
    changed = trio.Event()

    def on_message(data):
        got.append(data)
        changed.set()

    async def until(pred) -> None:
        nonlocal changed
        while not pred():
            changed = trio.Event()
            await changed.wait()

    dead: set[int] = set()

    def subscribed_on() -> list[int]:
        return [i for i in range(3) if i not in dead and redis_cluster.client(i).pubsub_numsub("ch")[0][1]]

    async with open_redis(redis_cluster.url) as redis, trio.open_nursery() as nursery:
        nursery.start_soon(redis.listen, "ch", on_message)
        with trio.fail_after(10):
            await until(lambda: got == [None])
            (first,) = subscribed_on()
            redis_cluster.kill(first)
            dead.add(first)
            await until(lambda: got == [None, None])  # resubscribed (elsewhere): resynchronise
            (second,) = subscribed_on()
            other = next(i for i in range(3) if i not in dead and i != second)
            redis_cluster.client(other).publish("ch", "after")
            await until(lambda: got == [None, None, b"after"])
        nursery.cancel_scope.cancel()


async def test_a_host_on_the_cluster_serves_durable_sends_and_calls(make_host, redis_cluster):
    from conftest import open_client
    from test_durable import COUNTER

    host = await make_host({"counter.actor.py": COUNTER}, env={"REFLOW_REDIS_URL": redis_cluster.url})
    async with open_client(host.url) as c:
        for _ in range(5):
            await c.send("Counter", "n", 1)
        with trio.fail_after(20):
            reply = await c.call("Counter", {"n": 1, "sleep": 0})
    assert reply["outputs"]["total"]["value"] == 6  # (the five sends, then the call: none lost, none twice)
