"""The pure JSON-RPC core both ends share (supervisor.core.jsonrpc), hit directly.

Properties: any bytes are answered with responses or JSON-RPC error objects, never
an exception; a batch is answered in the order it listed its entries; a Correlator
never hands an answer to a waiter other than the one its id was issued to. And the
exact bytes of the answers CONTRACT §4 fixes.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from supervisor.core import jsonrpc as rpc
from supervisor.core import protocol as p
from supervisor.core.errors import ActorFailed, InvalidParams, UnknownActor

texts = st.text(max_size=10)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(p.INT_MIN, p.INT_MAX) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8)
ids = st.none() | st.integers(-2**63, 2**63 - 1) | texts
# Entries of a frame, well-formed or nearly: requests, notifications, responses, and
# objects missing or mistyping a member.
entries = st.one_of(
    st.builds(lambda i, m, a: {"jsonrpc": "2.0", "id": i, "method": m, **({} if a is None else {"params": a})},
              ids, texts, st.none() | st.lists(json_values, max_size=2) | st.dictionaries(texts, json_values, max_size=2)),
    st.builds(lambda m: {"jsonrpc": "2.0", "method": m}, texts),
    st.builds(lambda i, r: {"jsonrpc": "2.0", "id": i, "result": r}, ids, json_values),
    st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error"]), json_values,
                    max_size=5),
    json_values,
)
frames = (st.binary(max_size=200) | st.text(max_size=100).map(str.encode)
          | entries.map(orjson.dumps) | st.lists(entries, max_size=5).map(orjson.dumps))


def answer(frame: p.Frame, method: Any = None) -> bytes | None:
    """A frame answered as both shells answer it: each request by ``method`` (its result,
    or the error it raised, through the core), each invalid entry with its error, each
    notification with nothing; a reply that is not JSON becomes -32603 alone."""
    replies: list[p.Response | p.ErrorResponse] = []
    for item in frame.items:
        if type(item) is p.Request:
            try:
                replies.append(p.Response(item.id, method(item) if method else item.params))
            except Exception as exc:
                replies.append(rpc.error_reply(item.id, exc) or rpc.internal_error(item.id, exc))
        elif type(item) is p.Invalid and not item.notification:
            replies.append(p.invalid_to_reply(item))
    try:
        return p.reply_frame(replies, frame.is_batch)
    except (TypeError, ValueError):
        return p.reply_frame(rpc.encodable(replies), frame.is_batch)


def _may_raise(req: p.Request) -> Any:
    kind = len(req.method) % 4
    if kind == 1:
        raise UnknownActor(req.method)
    if kind == 2:
        raise KeyError("/home/secret")  # a bug: its text must not be sent
    if kind == 3:
        return float("nan")  # not JSON: -32603 for this request alone
    return req.params


@settings(max_examples=500)
@given(frames)
def test_any_bytes_get_responses_or_error_objects_never_an_exception(data):
    frame = p.decode_frame(data)
    out = answer(frame, _may_raise)
    if out is None:  # nothing but notifications (and responses, which are never answered)
        assert all(type(i) in (p.Notification, p.Response, p.ErrorResponse) or getattr(i, "notification", False)
                   for i in frame.items)
        return
    assert b"secret" not in out
    back = p.decode_frame(out)
    assert back.is_batch == frame.is_batch
    for item in back.items:
        assert type(item) in (p.Response, p.ErrorResponse), item
        if type(item) is p.ErrorResponse:
            assert item.error.code in (-32700, -32600, -32602, -32603, -32001), item


@given(st.lists(entries, min_size=1, max_size=8))
def test_a_batch_is_answered_in_the_order_it_listed_its_entries(batch):
    frame = p.decode_frame(orjson.dumps(batch))
    assert len(frame.items) == len(batch) and frame.is_batch
    out = answer(frame)
    answered = [i for i in frame.items if type(i) is p.Request or (type(i) is p.Invalid and not i.notification)]
    if not answered:
        assert out is None
        return
    replies = orjson.loads(out)
    assert [r["id"] for r in replies] == [i.id for i in answered]
    requests = [e for e in batch if type(e) is dict and e.get("jsonrpc") == "2.0" and "method" in e and "id" in e
                and type(e["method"]) is str and (e["id"] is None or type(e["id"]) in (int, str))
                and type(e.get("params", [])) in (list, dict)]
    assert [r["id"] for r in replies if "result" in r] == [e["id"] for e in requests]


# -- the answers CONTRACT §4 fixes, byte for byte ----------------------------------------------

def test_the_answers_are_the_contracts_bytes():
    assert p.encode(rpc.FrameTooLarge(2000, 1024).reply()) == (
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"frame of 2000 bytes exceeds max_frame_size '
        b'(1024 bytes)","data":{"limit":"max_frame_size","max":1024,"size":2000}}}')
    assert p.encode(rpc.cancelled(7)) == b'{"jsonrpc":"2.0","id":7,"error":{"code":-32800,"message":"request cancelled"}}'
    assert p.encode(rpc.method_not_found("a", "nope")) == (
        b'{"jsonrpc":"2.0","id":"a","error":{"code":-32601,"message":"method not found: nope"}}')
    assert p.encode(rpc.internal_error(1, ValueError("/etc/secret"))) == (
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"internal error: ValueError"}}')
    assert p.encode(rpc.error_reply(3, InvalidParams("bad"))) == (
        b'{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"bad"}}')


@given(st.integers(-2**40, 2**40), texts, st.none() | json_values)
def test_errors_that_carry_a_code_keep_it_and_others_are_bugs(code, message, data):
    assert rpc.error_reply(1, rpc.RpcError(code, message, data)) == p.error_response(1, code, message, data)
    failed = ActorFailed("script raised", {"type": "ValueError"})
    assert rpc.error_reply(None, failed) == p.error_response(None, failed.code, failed.message, failed.data)
    for bug in (ValueError(message), KeyError(code), RuntimeError()):
        assert rpc.error_reply(1, bug) is None


@given(st.lists(st.builds(p.Response, ids, json_values | st.sampled_from([math.nan, math.inf, object()]))
                | st.builds(p.ErrorResponse, ids, st.builds(p.ErrorObject, st.integers(-99, 99), texts)),
                max_size=5))
def test_encodable_replaces_exactly_the_replies_that_are_not_json(replies):
    fixed = rpc.encodable(replies)
    assert [r.id for r in fixed] == [r.id for r in replies]
    for before, after in zip(replies, fixed):
        p.encode(after)  # every one can be sent now
        try:
            p.encode(before)
        except (TypeError, ValueError):
            assert type(after) is p.ErrorResponse and after.error.code == -32603
        else:
            assert after is before


@given(st.fixed_dictionaries({"id": json_values}) | st.dictionaries(st.sampled_from(["id", "x"]), json_values)
       | json_values)
def test_cancel_target_names_only_ids_a_request_can_have(params):
    target = rpc.cancel_target(params)
    hash(target)  # usable as a key, whatever the client sent
    if type(params) is dict and "id" in params and (params["id"] is None or type(params["id"]) in (int, str)):
        assert target == params["id"] and type(target) is type(params["id"])
    else:  # names no request: equal to no id a request can have
        assert target is not None and type(target) not in (int, str, bool, float)


def test_cancel_target_does_not_take_true_or_1_0_for_1():
    for params in ({"id": True}, {"id": 1.0}, {"id": [1]}, {"id": {}}, {}, [1], None, "1"):
        assert rpc.cancel_target(params) not in {1: 0, None: 0}, params
    assert rpc.cancel_target({"id": None}) is None  # a request may have id null
    assert rpc.cancel_target({"id": "1"}) == "1" and rpc.cancel_target({"id": 1}) == 1


# -- the calling side --------------------------------------------------------------------------

def test_result_of_an_answer():
    assert rpc.result_of(p.Response(1, {"x": 1})) == {"x": 1}
    with pytest.raises(rpc.RpcError) as err:
        rpc.result_of(p.error_response(1, -32001, "unknown actor 'x'", {"actor": "x"}))
    assert (err.value.code, err.value.message, err.value.data) == (-32001, "unknown actor 'x'", {"actor": "x"})
    bad = p.decode_frame(b'{"jsonrpc":"2.0","id":1,"error":"no"}').items[0]
    with pytest.raises(rpc.RpcError, match="malformed response") as err:
        rpc.result_of(bad)
    assert err.value.code == -32600


class CorrelatorModel(RuleBasedStateMachine):
    """A Correlator against a plain model: every issued id is new, an answer reaches the
    waiter its id was issued to and only once, withdrawn and drained calls are answered
    by nothing, and ids written as another type reach no one."""

    issued = Bundle("issued")

    def __init__(self) -> None:
        super().__init__()
        self.corr: rpc.Correlator[object] = rpc.Correlator()
        self.waiting: dict[int, object] = {}
        self.seen: set[int] = set()

    @rule(target=issued)
    def issue(self):
        waiter = object()
        rid = self.corr.issue(waiter)
        assert type(rid) is int and rid not in self.seen
        self.seen.add(rid)
        self.waiting[rid] = waiter
        return rid, waiter

    @rule(call=issued, how=st.sampled_from(["result", "error", "malformed"]))
    def answer(self, call, how):
        rid, waiter = call
        item = {"result": p.Response(rid, 1), "error": p.error_response(rid, 1, "x"),
                "malformed": p.Invalid(rid, p.ErrorObject(-32600, "bad"))}[how]
        got = self.corr.resolve(item)
        assert got is self.waiting.pop(rid, None)
        assert got is None or got is waiter

    @rule(call=issued, as_=st.sampled_from([str, float, lambda r: True if r == 1 else r + 0.5]))
    def answer_under_another_type(self, call, as_):
        rid, _ = call
        assert self.corr.resolve(p.Response(as_(rid), 1)) is None

    @rule(rid=st.integers(-5, 5) | st.none() | texts)
    def answer_an_id_never_issued(self, rid):
        if rid in self.seen:
            return
        assert self.corr.resolve(p.Response(rid, 1)) is None

    @rule(call=consumes(issued))
    def withdraw(self, call):
        rid, waiter = call
        assert self.corr.withdraw(rid, waiter) == (self.waiting.pop(rid, None) is waiter)
        assert self.corr.withdraw(rid, waiter) is False

    @rule()
    def drain(self):
        got = self.corr.drain()
        assert sorted(map(id, got)) == sorted(map(id, self.waiting.values()))
        self.waiting.clear()

    @invariant()
    def pending_is_the_model(self):
        assert self.corr.pending == tuple(self.waiting)


TestCorrelator = CorrelatorModel.TestCase
TestCorrelator.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
