"""The host's trio Redis client against the real embedded redis-server.

Its one job besides moving bytes is keeping replies matched to their callers while many
tasks pipeline on one connection and some of them are cancelled mid-call — which is what
happens to a cell's Redis calls whenever its worker is killed.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import trio

from supervisor._redis import RedisError, RedisUnavailable, open_redis, serve_embedded_redis


async def test_replies_reach_their_callers_when_callers_are_cancelled_mid_call(tmp_path, nursery):
    url = await nursery.start(serve_embedded_redis, tmp_path)
    rng = random.Random(7)
    completed = cancelled = 0
    async with open_redis(url) as redis:

        async def caller(k: int) -> None:
            nonlocal completed, cancelled
            for i in range(100):
                # Large values fill the socket buffer, so cancellations land during the
                # write as well as while waiting for the reply.
                token = f"{k}:{i}:".encode() + os.urandom(rng.choice((8, 64 << 10, 512 << 10)))
                # a third wait as long as it takes, so that some replies arrive whatever the backlog
                with trio.move_on_after(rng.choice((rng.uniform(0, 0.004),) * 2 + (60,))) as scope:
                    reply = await redis.execute("ECHO", token)
                if scope.cancelled_caught:
                    cancelled += 1
                else:
                    assert reply == token, "a reply reached the wrong caller"
                    completed += 1

        async with trio.open_nursery() as callers:
            for k in range(16):
                callers.start_soon(caller, k)
        assert await redis.execute("ECHO", b"after") == b"after"
    assert completed > 0 and cancelled > 0, (completed, cancelled)


async def test_a_dead_redis_fails_calls_in_flight_and_the_next_call_reconnects(tmp_path, nursery):
    url = await nursery.start(serve_embedded_redis, tmp_path)  # restarts the server when it dies
    async with open_redis(url) as redis:
        await redis.execute("SET", "k", "v")
        assert redis.connected
        pid = int((tmp_path / "redis.pid").read_text())
        failures: list[BaseException] = []

        async def blocked() -> None:
            try:
                await redis.execute("BLPOP", "nothing", 0)
            except RedisUnavailable as exc:
                failures.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(blocked)  # in flight when Redis dies
            async with open_redis(url) as probe:
                with trio.fail_after(5):
                    while b"blocked_clients:1" not in await probe.execute("INFO", "clients"):
                        await trio.sleep(0.005)
            os.kill(pid, signal.SIGKILL)
        assert len(failures) == 1 and "connection" in str(failures[0]), failures
        await _reachable_again(redis)
        assert redis.connected


async def test_submitted_commands_reach_redis_in_submission_order_through_connect_and_backpressure(tmp_path, nursery):
    """``submit`` queues in call order even when commands must wait: the first ones for the
    connection (none is open yet), later ones behind 1 MiB of unsent commands."""
    url = await nursery.start(serve_embedded_redis, tmp_path)
    async with open_redis(url) as redis:
        big = b"x" * (300 << 10)  # four of these fill the outbox: the rest wait in the backlog
        replies = [redis.submit("RPUSH", "order", b"%d:" % i + (big if i % 10 == 0 else b"")) for i in range(60)]
        assert not redis.connected  # the first submit had no connection to queue on
        lengths = []
        with trio.fail_after(10):
            for reply in replies:
                lengths.append(await reply())
        assert lengths == list(range(1, 61))
        got = await redis.execute("LRANGE", "order", 0, -1)
        assert [int(v.split(b":")[0]) for v in got] == list(range(60))


async def test_submitted_commands_fail_with_unavailable_when_redis_cannot_be_reached(tmp_path):
    async with open_redis(f"unix://{tmp_path}/no-such.sock") as redis:
        reply = redis.submit("PING")
        with trio.fail_after(10):
            try:
                await reply()
            except RedisUnavailable as exc:
                assert "cannot connect" in str(exc)
            else:
                raise AssertionError("a PING reached no Redis")


async def test_scripts_go_as_evalsha_and_survive_a_flushed_cache_and_a_restarted_redis(tmp_path, nursery):
    url = await nursery.start(serve_embedded_redis, tmp_path)  # restarts the server when it dies
    script = "return ARGV[1] .. ' from a script'"  # (a body no other test sends)
    async with open_redis(url) as redis:
        assert await redis.execute("EVAL", script, 0, "one") == b"one from a script"
        assert await redis.execute("EVAL", script, 0, "two") == b"two from a script"  # (as EVALSHA)
        stats = await redis.execute("INFO", "commandstats")
        assert b"cmdstat_evalsha:calls=1," in stats, stats
        await redis.execute("SCRIPT", "FLUSH")  # an operator flushes the cache under us
        with pytest.raises(RedisError, match="NOSCRIPT"):
            await redis.execute("EVAL", script, 0, "three")
        assert await redis.execute("EVAL", script, 0, "four") == b"four from a script"  # sent whole again
        os.kill(int((tmp_path / "redis.pid").read_text()), signal.SIGKILL)  # a new server: an empty cache
        await _reachable_again(redis)
        assert await redis.execute("EVAL", script, 0, "five") == b"five from a script"


async def _reachable_again(redis) -> None:
    """Until the embedded server is back (its supervisor restarts redis-server), 10 s at most."""
    with trio.fail_after(10):
        while True:
            try:
                await redis.execute("PING")
                return
            except RedisUnavailable:
                await trio.sleep(0.02)  # (polling the restarted server, with the deadline above)
