"""The cluster outbox's exactly-once relay (supervisor/_outbox.py), against a real redis-server.

The property: however relays interleave — a paused host relaying an old read while the
new owner relays, a relay that dies after delivering and before deleting, new commits in
between — every routed message reaches its target's inbox (or fan-in list) exactly once,
and one sender's messages reach a target in commit order. The cluster layout's keys
(``Keys(clustered=True)``) work on one Redis too, which is what this runs on; the
cluster's slot routing is tests/test_redis_cluster.py's.
"""

from __future__ import annotations


import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor._outbox import deliver_cmd, outbox_cmd, parse_outbox
from supervisor.core.keys import Keys

KEYS = Keys("ob", clustered=True)
SENDER = "S"
TARGETS = ("A", "B")


@pytest.fixture(scope="module")
def r(redis_py_server):
    return redis_py_server


def _read(r, count: int):
    """A relay's read: the outbox's head."""
    return r.xrange(KEYS.outbox(SENDER), "-", "+", count=count)


def _deliver(r, snapshot) -> None:
    ids, by_target = parse_outbox([[sid, [k for kv in f.items() for k in kv]] for sid, f in snapshot])
    for target, share in by_target.items():
        r.execute_command(*deliver_cmd(KEYS, SENDER, target, share))


def _delete(r, snapshot) -> None:
    if snapshot:
        r.xdel(KEYS.outbox(SENDER), *(sid for sid, _ in snapshot))


# A commit routes 1-3 deliveries; each goes to a target's inbox or to its fan-in port "p".
commit = st.lists(st.tuples(st.sampled_from(TARGETS), st.booleans()), min_size=1, max_size=3)
# What happens next: a commit, or relay 0/1 reading (count), delivering or deleting what it read.
action = st.one_of(st.tuples(st.just("commit"), commit),
                   st.tuples(st.just("read"), st.integers(0, 1), st.integers(1, 4)),
                   st.tuples(st.just("deliver"), st.integers(0, 1)),
                   st.tuples(st.just("delete"), st.integers(0, 1)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, max_size=30))
def test_every_routed_message_arrives_once_and_in_order(r, actions):
    r.flushall()
    sent: dict[tuple[str, bool], list] = {(t, f): [] for t in TARGETS for f in (False, True)}
    seq = 0
    snapshots: list[list] = [[], []]
    delivered = [False, False]  # (a relay deletes only what it has delivered)
    for act in actions:
        if act[0] == "commit":
            deliveries = []
            for target, fan_in in act[1]:
                seq += 1
                if fan_in:
                    deliveries.append({"t": target, "p": "p", "v": {"type": "integer", "value": seq}})
                else:
                    deliveries.append({"t": target, "b": {"id": f"m{seq}", "inputs": {"x": seq}}})
                sent[(target, fan_in)].append(seq)
            r.execute_command(*outbox_cmd(KEYS.outbox(SENDER), deliveries))
        elif act[0] == "read":
            snapshots[act[1]], delivered[act[1]] = _read(r, act[2]), False
        elif act[0] == "deliver":
            _deliver(r, snapshots[act[1]])
            delivered[act[1]] = True
        elif delivered[act[1]]:
            _delete(r, snapshots[act[1]])
    # Then one relay runs to the end, as the owner's does.
    while snapshot := _read(r, 4):
        _deliver(r, snapshot)
        _delete(r, snapshot)
    for target in TARGETS:
        inbox = [orjson.loads(f[b"m"])["inputs"]["x"] for _, f in r.xrange(KEYS.inbox(target))]
        assert inbox == sent[(target, False)]
        buffered = [orjson.loads(v)["value"] for v in r.lrange(KEYS.fanin(target, "p"), 0, -1)]
        assert buffered == sent[(target, True)]


def test_an_entry_that_is_not_a_routed_message_is_skipped_and_deleted(r):
    r.flushall()
    r.xadd(KEYS.outbox(SENDER), {"d": b"not json"})
    r.xadd(KEYS.outbox(SENDER), {"d": orjson.dumps([{"t": 7}])})
    r.execute_command(*outbox_cmd(KEYS.outbox(SENDER), [{"t": "A", "b": {"id": "ok", "inputs": {"x": 1}}}]))
    snapshot = _read(r, 10)
    ids, by_target = parse_outbox([[sid, [k for kv in f.items() for k in kv]] for sid, f in snapshot])
    assert len(ids) == 3 and list(by_target) == ["A"]
    _deliver(r, snapshot)
    assert [orjson.loads(f[b"m"])["id"] for _, f in r.xrange(KEYS.inbox("A"))] == ["ok"]


def test_the_cluster_layout_keeps_a_process_in_one_slot():
    from redis.crc import key_slot

    p = "Counter"
    keys = [KEYS.state_prefix(p) + "n", KEYS.inbox(p), KEYS.fanin(p, "x"), KEYS.deadletters(p), KEYS.outbox(p),
            KEYS.relayed(p), KEYS.lease(p), KEYS.fence(p), KEYS.fence(p) + ":released"]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert key_slot(KEYS.host("h1").encode()) == key_slot(KEYS.hosts().encode())
    one = Keys("ob")  # one Redis: the names every release used
    assert (one.state_prefix(p), one.inbox(p), one.lease(p), one.deadletters(p)) == (
        "ob:Counter:state:", "ob:Counter:inbox", "ob:lease:Counter", "ob:deadletter")
