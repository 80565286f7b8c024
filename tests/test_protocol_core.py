"""The pure JSON-RPC and typed-message core: spec cases, round trips, a fuzz that never raises."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import _protocol as p

ids = st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=20), st.none())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
params = st.one_of(st.none(), st.lists(json_values, max_size=3), st.dictionaries(st.text(max_size=8), json_values,
                                                                                    max_size=3))
methods = st.text(min_size=1, max_size=20)
errors = st.builds(p.ErrorObject, st.integers(-40000, 40000), st.text(max_size=20), json_values)
messages = st.one_of(
    st.builds(p.Request, ids, methods, params),
    st.builds(p.Notification, methods, params),
    st.builds(p.Response, ids, json_values),
    st.builds(p.ErrorResponse, ids, errors),
)


def _norm(m):
    # A null "data" is the same as no data on the wire.
    if isinstance(m, p.ErrorResponse) and m.error.data is None:
        return m
    return m


@settings(max_examples=500)
@given(messages)
def test_every_message_round_trips(msg):
    (back,) = p.decode_frame(p.encode(msg)).items
    if isinstance(msg, p.ErrorResponse) and msg.error.data is None:
        assert back == msg
    else:
        assert back == msg


@settings(max_examples=200)
@given(st.lists(messages, min_size=1, max_size=5))
def test_batches_round_trip(msgs):
    frame = p.decode_frame(p.encode_batch(msgs))
    assert frame.is_batch and list(frame.items) == msgs


@settings(max_examples=500)
@given(json_values | st.binary(max_size=64))
def test_typed_values_round_trip_by_inference(value):
    typed = p.wrap(value)
    assert p.is_typed(typed)
    assert p.wrap(typed) == typed  # already typed passes through
    assert p.unwrap(orjson.loads(orjson.dumps(typed))) == value


def test_inference_types():
    assert p.wrap(True) == {"type": "boolean", "value": True}
    assert p.wrap(3) == {"type": "integer", "value": 3}
    assert p.wrap(1.5)["type"] == "float"
    assert p.wrap(b"\x00\xff") == {"type": "bytes", "value": "AP8="}
    assert p.wrap(None) == {"type": "null", "value": None}
    for bad in (float("nan"), {"type": "integer", "value": "x"}, [float("inf")]):
        try:
            p.wrap(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def _reply(data):
    frame = p.decode_frame(data)
    replies = [p.invalid_to_reply(i) for i in frame.items if isinstance(i, p.Invalid)]
    out = p.reply_frame(replies, frame.is_batch)
    return None if out is None else orjson.loads(out)


def test_spec_examples():
    assert _reply(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')["error"]["code"] == -32700
    assert _reply(b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}')["error"]["code"] == -32600
    empty = _reply(b"[]")
    assert isinstance(empty, dict) and empty["error"]["code"] == -32600 and empty["id"] is None
    assert [r["error"]["code"] for r in _reply(b"[1]")] == [-32600]
    assert [r["error"]["code"] for r in _reply(b"[1,2,3]")] == [-32600] * 3
    frame = p.decode_frame(b'[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
                           b'{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]')
    assert all(isinstance(i, p.Notification) for i in frame.items)
    assert p.reply_frame([], True) is None
    req = p.decode_frame(b'{"jsonrpc": "1.0", "method": "x", "id": 7}').items[0]
    assert isinstance(req, p.Invalid) and req.id == 7
    big = p.decode_frame(b'{"jsonrpc": "2.0", "method": "x", "id": 1, "params": [123456789012345678901234567890]}')
    assert big.items[0].params == [123456789012345678901234567890]
    assert b"123456789012345678901234567890" in p.encode(p.Response(1, 123456789012345678901234567890))


@settings(max_examples=2000)
@given(st.binary(max_size=200) | json_values.map(lambda v: orjson.dumps(v)))
def test_decode_never_raises(data):
    frame = p.decode_frame(data)
    assert frame.items
