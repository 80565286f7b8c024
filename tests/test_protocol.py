"""The pure JSON-RPC 2.0 / typed-message core (supervisor.core.protocol).

Round trips for every message type, the JSON-RPC 2.0 specification's own
examples (section 7) run through a tiny reference dispatcher, the corners the
spec leaves to us, integers of any size, NaN refusal, typed-value inference,
and fuzzing: no input makes decode_frame raise, and every error it produces
can be sent back.
"""

from __future__ import annotations

import base64
import json
import math
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core import protocol as p

# -- strategies ----------------------------------------------------------------------------------

# st.text() never yields lone surrogates, so every string here is encodable.
texts = st.text(max_size=12)
big_ints = st.integers()  # unbounded: exercises the >64-bit paths
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | big_ints | finite_floats | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)
ids = st.none() | big_ints | texts
params = st.none() | st.lists(json_values, max_size=3) | st.dictionaries(texts, json_values, max_size=3)
methods = st.text(max_size=20)
error_objects = st.builds(p.ErrorObject, st.integers(-2**40, 2**40), texts, st.none() | json_values)
messages = st.one_of(
    st.builds(p.Request, ids, methods, params),
    st.builds(p.Notification, methods, params),
    st.builds(p.Response, ids, json_values),
    st.builds(p.ErrorResponse, ids, error_objects),
)


# -- constants -----------------------------------------------------------------------------------

def test_error_codes_are_the_contracts():
    assert (p.PARSE_ERROR, p.INVALID_REQUEST, p.METHOD_NOT_FOUND, p.INVALID_PARAMS, p.INTERNAL_ERROR) == (
        -32700, -32600, -32601, -32602, -32603)
    assert (p.REQUEST_CANCELLED, p.UNKNOWN_ACTOR, p.ACTOR_FAILED, p.TIMED_OUT, p.OVERLOADED, p.RESOURCE_LIMIT,
            p.UNAUTHORIZED) == (-32800, -32001, -32002, -32003, -32004, -32005, -32006)
    assert set(p.__all__) <= set(dir(p))


# -- round trips ---------------------------------------------------------------------------------

def _limit_broken(v, level):
    """The reference for decode_frame's limits, written the obvious (recursive) way."""
    if isinstance(v, (dict, list)):
        if level > p.MAX_DEPTH:
            return "depth"
        for x in (v.values() if isinstance(v, dict) else v):
            if (why := _limit_broken(x, level + 1)) is not None:
                return why
    elif type(v) is int and not p.INT_MIN <= v <= p.INT_MAX:
        return "integer"
    return None


def _as_decoded(msg):
    """What ``msg`` decodes to: itself, unless it is a request or notification whose
    params break a limit (then an Invalid with -32602 naming it)."""
    if isinstance(msg, (p.Request, p.Notification)) and (why := _limit_broken(msg.params, 2)) is not None:
        rid = msg.id if isinstance(msg, p.Request) else None
        (item,) = p.decode_frame(p.encode(msg)).items
        assert isinstance(item, p.Invalid) and item.id == rid and item.error.code == p.INVALID_PARAMS
        assert item.error.data["limit"] == why and item.notification == isinstance(msg, p.Notification)
        return item
    return msg


@settings(max_examples=400, deadline=None)
@given(messages)
def test_every_message_round_trips(msg):
    data = p.encode(msg)
    assert b"\n" not in data  # the sandbox channel splits frames on newlines
    frame = p.decode_frame(data)
    assert frame == p.Frame((_as_decoded(msg),), False)
    assert p.decode_frame(data.decode()) == frame  # text frames too


@settings(max_examples=150, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_batches_round_trip(msgs):
    frame = p.decode_frame(p.encode_batch(msgs))
    assert frame.is_batch and list(frame.items) == [_as_decoded(m) for m in msgs]


def test_encoded_shapes():
    assert orjson.loads(p.encode(p.Request(1, "m"))) == {"jsonrpc": "2.0", "id": 1, "method": "m"}
    assert orjson.loads(p.encode(p.Request(None, "m", []))) == {"jsonrpc": "2.0", "id": None, "method": "m",
                                                                 "params": []}
    assert orjson.loads(p.encode(p.Notification("n", {"a": 1}))) == {"jsonrpc": "2.0", "method": "n",
                                                                      "params": {"a": 1}}
    assert orjson.loads(p.encode(p.Response("x", None))) == {"jsonrpc": "2.0", "id": "x", "result": None}
    err = orjson.loads(p.encode(p.error_response(3, p.TIMED_OUT, "slow")))
    assert err == {"jsonrpc": "2.0", "id": 3, "error": {"code": -32003, "message": "slow"}}  # no "data": null
    err = orjson.loads(p.encode(p.error_response(3, p.RESOURCE_LIMIT, "big", {"limit": "memory"})))
    assert err["error"]["data"] == {"limit": "memory"}
    assert p.ErrorObject(1, "m").to_dict() == {"code": 1, "message": "m"}


def test_a_null_id_request_is_a_request_answered_with_null():
    (req,) = p.decode_frame(b'{"jsonrpc":"2.0","id":null,"method":"m"}').items
    assert req == p.Request(None, "m")
    assert orjson.loads(p.reply_frame([p.Response(req.id, 1)], False))["id"] is None
    (note,) = p.decode_frame(b'{"jsonrpc":"2.0","method":"m"}').items
    assert note == p.Notification("m")


# -- the specification's examples (jsonrpc.org/specification §7) ---------------------------------

def _subtract(params):
    if isinstance(params, list):
        return params[0] - params[1]
    return params["minuend"] - params["subtrahend"]


_METHODS = {"subtract": _subtract, "sum": sum, "get_data": lambda _: ["hello", 5],
            "update": None, "foobar": None, "notify_hello": None, "notify_sum": None}


def _serve(data):
    """A minimal pure server: what the real one does, minus trio."""
    frame = p.decode_frame(data)
    replies = []
    for item in frame.items:
        if isinstance(item, p.Invalid):
            replies.append(p.invalid_to_reply(item))
        elif isinstance(item, p.Request):
            fn = _METHODS.get(item.method)
            if fn is None:
                replies.append(p.error_response(item.id, p.METHOD_NOT_FOUND, "Method not found"))
            else:
                replies.append(p.Response(item.id, fn(item.params)))
    out = p.reply_frame(replies, frame.is_batch)
    return None if out is None else orjson.loads(out)


def _matches(got, want):
    """Equal, except that our error messages may add detail after the spec's words."""
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_matches, got, want))
    if "error" not in want:
        return got == want
    return (got.keys() == want.keys() and got["id"] == want["id"]
            and got["error"]["code"] == want["error"]["code"]
            and got["error"]["message"].startswith(want["error"]["message"]))


SPEC_EXAMPLES = [
    ('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
     {"jsonrpc": "2.0", "result": 19, "id": 1}),
    ('{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
     {"jsonrpc": "2.0", "result": -19, "id": 2}),
    ('{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}',
     {"jsonrpc": "2.0", "result": 19, "id": 3}),
    ('{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}',
     {"jsonrpc": "2.0", "result": 19, "id": 4}),
    ('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', None),
    ('{"jsonrpc": "2.0", "method": "foobar"}', None),
    ('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
     {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"}),
    ('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
     {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}),
    ('{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
     {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}),
    ('[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"}, {"jsonrpc": "2.0", "method"]',
     {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}),
    ("[]", {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}),
    ("[1]", [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}]),
    ("[1,2,3]", [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}] * 3),
    ("""[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
         {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
         {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
         {"foo": "boo"},
         {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
         {"jsonrpc": "2.0", "method": "get_data", "id": "9"}]""",
     [{"jsonrpc": "2.0", "result": 7, "id": "1"},
      {"jsonrpc": "2.0", "result": 19, "id": "2"},
      {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
      {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
      {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"}]),
    ('[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
     ' {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]', None),
]


@pytest.mark.parametrize(("sent", "want"), SPEC_EXAMPLES, ids=[s[:40] for s, _ in SPEC_EXAMPLES])
def test_spec_examples(sent, want):
    got = _serve(sent.encode())
    if want is None:
        assert got is None
    else:
        assert _matches(got, want), got
    assert _serve(sent) == got  # the same from a text frame


def test_single_empty_batch_is_one_object_and_batch_of_one_is_an_array():
    frame = p.decode_frame(b"[]")
    assert not frame.is_batch and frame.items[0].error.code == p.INVALID_REQUEST
    one = p.decode_frame(b'[{"jsonrpc":"2.0","id":1,"method":"m"}]')
    assert one.is_batch and one.items == (p.Request(1, "m"),)
    assert orjson.loads(p.reply_frame([p.Response(1, 2)], one.is_batch)) == [
        {"jsonrpc": "2.0", "id": 1, "result": 2}]


# -- corners the spec leaves to us ---------------------------------------------------------------

def _one(data):
    frame = p.decode_frame(data)
    assert not frame.is_batch and len(frame.items) == 1
    return frame.items[0]


@pytest.mark.parametrize(("data", "rid"), [
    ('{"jsonrpc":"2.0","id":true,"method":"m"}', None),          # bool is not an id
    ('{"jsonrpc":"2.0","id":1.5,"method":"m"}', None),           # nor a float
    ('{"jsonrpc":"2.0","id":[1],"method":"m"}', None),
    ('{"jsonrpc":"2.0","id":{"a":1},"method":"m"}', None),
    ('{"id":7,"method":"m"}', 7),                                 # jsonrpc missing: id still echoed
    ('{"jsonrpc":"1.0","id":"x","method":"m"}', "x"),
    ('{"jsonrpc":2.0,"id":7,"method":"m"}', 7),
    ('{"jsonrpc":"2.0","id":7,"method":null}', 7),
    ('{"jsonrpc":"2.0","id":7,"method":"m","params":"bar"}', 7),
    ('{"jsonrpc":"2.0","id":7,"method":"m","params":3}', 7),
    ('{"jsonrpc":"2.0","id":7,"method":"m","params":null}', 7),  # present, so it must be structured
    ('{"jsonrpc":"2.0","method":"m","params":"bar"}', None),     # a bad notification is answered, id null
    ('{"jsonrpc":"2.0","id":7}', 7),                              # neither request nor response
    ('{"jsonrpc":"2.0","id":7,"result":1,"error":{"code":1,"message":"m"}}', 7),
    ('{"jsonrpc":"2.0","result":1}', None),                       # a response needs an id
    ('{"jsonrpc":"2.0","id":7,"error":"boom"}', 7),
    ('{"jsonrpc":"2.0","id":7,"error":{"code":"1","message":"m"}}', 7),
    ('{"jsonrpc":"2.0","id":7,"error":{"code":true,"message":"m"}}', 7),
    ('{"jsonrpc":"2.0","id":7,"error":{"code":1}}', 7),
    ("1", None), ('"str"', None), ("null", None), ("true", None),
])
def test_invalid_requests_echo_the_id_only_when_it_is_valid(data, rid):
    item = _one(data)
    assert isinstance(item, p.Invalid) and item.id == rid
    assert item.error.code == p.INVALID_REQUEST and item.error.message.startswith("Invalid Request")
    assert orjson.loads(p.reply_frame([p.invalid_to_reply(item)], False))["id"] == rid


@pytest.mark.parametrize("data", [
    b"", b"   ", b"{", b"\xff\xfe", b'{"a":1} x', b"NaN", b"[Infinity]", b"1e400",
    b'"\\ud800"', b'{"k":"\\udc00"}', b"\x00", "\ud800".encode("utf-8", "surrogatepass"),
    b"[" * 5000 + b"]" * 5000,
    # the same traps on the exact (stdlib) path taken for long digit runs
    b"[12345678901234567890123, NaN]", b"[12345678901234567890123, 1e400]",
    b'[12345678901234567890123, "\\ud800"]', b"[12345678901234567890123, " + b"[" * 5000,
    b"[" + b"9" * 5000 + b"]",  # beyond Python's int-string limit
])
def test_parse_errors(data):
    item = _one(data)
    assert isinstance(item, p.Invalid) and item.id is None and item.error.code == p.PARSE_ERROR
    assert p.encode(p.invalid_to_reply(item))  # the reply can always be sent


def test_a_str_with_a_lone_surrogate_is_a_parse_error():
    item = _one('{"jsonrpc":"2.0","method":"\ud800"}')
    assert isinstance(item, p.Invalid) and item.error.code == p.PARSE_ERROR


def test_other_input_types():
    good = b'{"jsonrpc":"2.0","id":1,"method":"m"}'
    assert _one(bytearray(good)) == _one(memoryview(good)) == p.Request(1, "m")
    for weird in (None, 5, object()):
        assert _one(weird).error.code == p.PARSE_ERROR  # never raises, even on misuse


def test_method_wins_over_result_and_responses_are_decoded():
    assert _one('{"jsonrpc":"2.0","id":1,"method":"m","result":2}') == p.Request(1, "m")
    assert _one('{"jsonrpc":"2.0","id":null,"result":[1]}') == p.Response(None, [1])
    assert _one('{"jsonrpc":"2.0","id":"a","error":{"code":-1,"message":"m","data":{"x":1}}}') == \
        p.ErrorResponse("a", p.ErrorObject(-1, "m", {"x": 1}))


# -- integers of any size, NaN -------------------------------------------------------------------

@pytest.mark.parametrize("n", [2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30, -10**30,
                               1732330000123456789])
def test_integers_of_any_size_are_read_exactly_and_params_beyond_64_bits_refused(n):
    """Ids and responses carry any integer exactly; a request's params carry signed 64 bits
    (what every part of the host can write), beyond that -32602 naming the limit."""
    for msg in (p.Request(n, "m"), p.Response(1, n), p.Response(1, [n, {"k": n}])):
        assert p.decode_frame(p.encode(msg)).items == (msg,)
    assert str(n).encode() in p.encode(p.Response(1, n))
    inside = p.INT_MIN <= n <= p.INT_MAX
    for msg in (p.Request(7, "m", [n, {"k": n}]), p.Notification("m", {"n": n})):
        (item,) = p.decode_frame(p.encode(msg)).items
        if inside:
            assert item == msg
        else:
            assert isinstance(item, p.Invalid) and item.error.code == p.INVALID_PARAMS
            assert item.error.data == {"limit": "integer", "min": p.INT_MIN, "max": p.INT_MAX}
            assert item.id == (7 if isinstance(msg, p.Request) else None)
            assert item.notification == isinstance(msg, p.Notification)
            assert p.encode(p.invalid_to_reply(item))  # the refusal itself can be sent


def _nest(n):
    v: object = 1
    for _ in range(n):
        v = {"a": v} if _ % 2 else [v]
    return v


def test_params_nested_past_max_depth_are_refused_naming_the_limit_and_the_rest_of_a_batch_stands():
    at_limit = p.Request(1, "m", _nest(p.MAX_DEPTH - 1))  # the request, then MAX_DEPTH - 1 levels
    assert p.decode_frame(p.encode(at_limit)).items == (at_limit,)
    for n in (p.MAX_DEPTH, 300, 900):
        deep = p.Request(2, "m", _nest(n))
        data = json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ok"},
                           {"jsonrpc": "2.0", "id": 2, "method": "m", "params": _nest(n)}]).encode()
        frame = p.decode_frame(data)
        assert frame.is_batch and frame.items[0] == p.Request(1, "ok")
        bad = frame.items[1]
        assert isinstance(bad, p.Invalid) and bad.id == deep.id and bad.error.code == p.INVALID_PARAMS
        assert bad.error.data == {"limit": "depth", "max": p.MAX_DEPTH}
    # many brackets side by side are not depth: looked at closely, and let through
    wide = p.Request(3, "m", [[[1]] for _ in range(500)])
    assert p.decode_frame(p.encode(wide)).items == (wide,)


def test_long_digit_runs_in_strings_do_not_change_the_result():
    msg = p.Request(1, "m", {"phone": "12345678901234567890", "x": 1.5, "y": [True, None]})
    assert p.decode_frame(p.encode(msg)).items == (msg,)


def test_deep_nesting_beyond_orjsons_writer_limit_still_encodes():
    deep: list = []
    for _ in range(400):
        deep = [deep]
    assert p.decode_frame(p.encode(p.Response(1, deep))).items == (p.Response(1, deep),)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_when_encoding(bad):
    with pytest.raises(ValueError, match=r"NaN or infinity at \$\.result\.a\[1\]"):
        p.encode(p.Response(1, {"a": [0.5, bad]}))
    with pytest.raises(ValueError, match="NaN or infinity"):
        p.encode(p.Request(1, "m", [bad]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        p.encode(p.error_response(1, -1, "m", {"x": bad}))
    with pytest.raises(ValueError, match="NaN or infinity"):
        p.encode_batch([p.Response(1, 1), p.Response(2, bad)])
    with pytest.raises(ValueError):
        p.encode(p.Response(1, [2**70, bad]))  # on the exact path too


def test_encode_refuses_what_is_not_a_message_or_not_json():
    with pytest.raises(TypeError, match="invalid_to_reply"):
        p.encode(p.Invalid(None, p.ErrorObject(-32600, "x")))
    with pytest.raises(TypeError):
        p.encode({"jsonrpc": "2.0"})
    with pytest.raises(TypeError):
        p.encode(p.Request(True, "m"))
    with pytest.raises(TypeError):
        p.encode(p.Request(1.5, "m"))
    with pytest.raises(TypeError):
        p.encode(p.Notification("m", "params"))
    with pytest.raises(TypeError):
        p.encode(p.ErrorResponse(1, p.ErrorObject("x", "m")))
    for value in ({1, 2}, {1: "int key"}, "\ud800", object()):
        with pytest.raises(ValueError, match="not JSON"):
            p.encode(p.Response(1, value))
    with pytest.raises(ValueError):
        p.encode_batch([])
    with pytest.raises(ValueError):
        p.reply_frame([p.Response(1, 1), p.Response(2, 2)], False)
    assert p.reply_frame([], True) is None and p.reply_frame([], False) is None


# -- typed values --------------------------------------------------------------------------------

plain_values = json_values | st.binary(max_size=40)


@settings(max_examples=300, deadline=None)
@given(plain_values)
def test_typed_values_round_trip_by_inference(value):
    typed = p.wrap(value)
    assert p.is_typed(typed) and typed["type"] in p.MESSAGE_TYPES
    assert p.wrap(typed) is typed  # already typed passes through unchanged
    assert p.unwrap(typed) == value
    # read back as the host and client read frames (orjson alone turns ints past 64 bits into floats)
    on_the_wire = p.decode_frame(p.encode(p.Response(1, typed))).items[0].result
    assert p.wrap(on_the_wire) == typed and p.unwrap(on_the_wire) == value


def test_inference_picks_the_type():
    assert p.wrap(True) == {"type": "boolean", "value": True}  # not integer 1
    assert p.wrap(0) == {"type": "integer", "value": 0}
    assert p.wrap(2**80) == {"type": "integer", "value": 2**80}
    assert p.wrap(1.5) == {"type": "float", "value": 1.5}
    assert p.wrap("s") == {"type": "string", "value": "s"}
    assert p.wrap((1, "a")) == {"type": "array", "value": [1, "a"]}
    assert p.wrap({"a": 1}) == {"type": "object", "value": {"a": 1}}
    assert p.wrap(None) == {"type": "null", "value": None}
    for b in (b"\x00\xff", bytearray(b"\x00\xff"), memoryview(b"\x00\xff")):
        assert p.wrap(b) == {"type": "bytes", "value": "AP8="}
    # looks typed but names no known type: just an object
    assert p.wrap({"type": "flow", "value": 1}) == {"type": "object", "value": {"type": "flow", "value": 1}}
    assert p.wrap({"type": "integer", "value": 1, "x": 2})["type"] == "object"


@pytest.mark.parametrize("typed", [
    {"type": "integer", "value": 3}, {"type": "integer", "value": 2**70}, {"type": "float", "value": 2.5},
    {"type": "float", "value": 2}, {"type": "string", "value": ""}, {"type": "boolean", "value": False},
    {"type": "array", "value": [1, [None]]}, {"type": "object", "value": {"a": {"b": []}}},
    {"type": "error", "value": {"message": "boom", "code": 7}}, {"type": "error", "value": {"message": "m"}},
    {"type": "error", "value": {"message": "m", "code": "E_X"}}, {"type": "bytes", "value": ""},
    {"type": "bytes", "value": "AP8="}, {"type": "any", "value": {"x": [1.5]}}, {"type": "null", "value": None},
])
def test_valid_typed_messages_pass_through(typed):
    assert p.is_typed(typed) and p.wrap(typed) is typed


@pytest.mark.parametrize("bad", [
    {"type": "integer", "value": "x"}, {"type": "integer", "value": True}, {"type": "integer", "value": 1.0},
    {"type": "float", "value": "1"}, {"type": "float", "value": math.nan}, {"type": "float", "value": 10**400},
    {"type": "float", "value": False}, {"type": "string", "value": 1}, {"type": "boolean", "value": 0},
    {"type": "array", "value": {}}, {"type": "array", "value": [math.inf]}, {"type": "object", "value": []},
    {"type": "object", "value": {"a": {1: 2}}}, {"type": "error", "value": "boom"},
    {"type": "error", "value": {"code": 1}}, {"type": "error", "value": {"message": "m", "code": 1.5}},
    {"type": "error", "value": {"message": "m", "extra": 1}}, {"type": "bytes", "value": "not base64!"},
    {"type": "bytes", "value": b"raw"}, {"type": "null", "value": 0}, {"type": "any", "value": {"a": b"x"}},
    math.nan, -math.inf, [1, [math.nan]], {"a": math.inf}, {1: "x"}, [b"nested bytes"], {1, 2}, object(),
])
def test_wrap_refuses(bad):
    with pytest.raises(ValueError):
        p.wrap(bad)


def test_wrap_says_where_the_problem_is():
    with pytest.raises(ValueError, match=r"at value\.a\[2\]\.b"):
        p.wrap({"a": [1, 2, {"b": math.nan}]})


def test_unwrap():
    assert p.unwrap({"type": "bytes", "value": base64.b64encode(b"hi").decode()}) == b"hi"
    assert p.unwrap({"type": "error", "value": {"message": "boom"}}) == {"message": "boom", "code": None}
    assert p.unwrap({"type": "error", "value": {"message": "boom", "code": 3}}) == {"message": "boom", "code": 3}
    got = p.unwrap({"type": "float", "value": 2})
    assert got == 2.0 and type(got) is float
    assert p.unwrap({"type": "null", "value": None}) is None
    assert p.unwrap({"plain": 1}) == {"plain": 1} and p.unwrap(5) == 5  # not typed: itself
    for bad in ({"type": "bytes", "value": "!!"}, {"type": "bytes", "value": 5},
                {"type": "error", "value": "boom"}, {"type": "float", "value": 10**400}):
        with pytest.raises(ValueError):
            p.unwrap(bad)


@pytest.mark.parametrize(("value", "typed"), [
    ({"type": "integer", "value": 1}, True), ({"type": "integer", "value": "x"}, True),  # shape only
    ({"type": "integer"}, False), ({"value": 1}, False), ({"type": "nope", "value": 1}, False),
    ({"type": ["integer"], "value": 1}, False), ({"type": {"a": 1}, "value": 1}, False),  # unhashable type
    ({"type": "integer", "value": 1, "x": 0}, False), ([("type", "integer"), ("value", 1)], False),
    (None, False), ("integer", False),
])
def test_is_typed(value, typed):
    assert p.is_typed(value) is typed


# -- fuzz ----------------------------------------------------------------------------------------

# Dicts that look like JSON-RPC messages with any member possibly missing or of a wrong type.
near_messages = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.just("2.0") | json_values,
    "id": ids | json_values,
    "method": methods | json_values,
    "params": params | json_values,
    "result": json_values,
    "error": st.builds(lambda e: e.to_dict(), error_objects) | json_values,
})


def _check_frame(frame):
    """Whatever came in, every entry is classified, and every error can be sent back."""
    assert isinstance(frame, p.Frame) and frame.items
    replies = []
    for item in frame.items:
        assert isinstance(item, (p.Request, p.Notification, p.Response, p.ErrorResponse, p.Invalid))
        if isinstance(item, p.Invalid):
            assert item.id is None or type(item.id) in (int, str)
            replies.append(p.invalid_to_reply(item))
        elif isinstance(item, p.Request):
            replies.append(p.error_response(item.id, p.METHOD_NOT_FOUND, f"method not found: {item.method}"))
    out = p.reply_frame(replies, frame.is_batch)
    if out is not None:
        assert isinstance(orjson.loads(out), list if frame.is_batch else dict)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120) | st.text(max_size=60))
def test_decode_never_raises_on_arbitrary_input(data):
    _check_frame(p.decode_frame(data))


@settings(max_examples=400, deadline=None)
@given(json_values | near_messages | st.lists(near_messages | json_values, max_size=4))
def test_decode_never_raises_on_arbitrary_json(value):
    data = json.dumps(value).encode()
    frame = p.decode_frame(data)
    _check_frame(frame)
    entries = value if isinstance(value, list) and value else [value]
    if isinstance(value, list) and value:
        assert frame.is_batch and len(frame.items) == len(value)
    for obj, item in zip(entries, frame.items):
        if isinstance(item, p.Request):
            assert obj["jsonrpc"] == "2.0" and "id" in obj and obj["id"] == item.id
            assert obj["method"] == item.method and obj.get("params") == item.params
        elif isinstance(item, p.Notification):
            assert obj["jsonrpc"] == "2.0" and "id" not in obj
        elif isinstance(item, p.Invalid) and item.id is not None:
            assert obj["id"] == item.id


# -- cost ----------------------------------------------------------------------------------------

def test_measure_decode_and_encode_per_small_request(capsys):
    """Prints the cost; asserts only that it works (timing is not a test)."""
    text = '{"jsonrpc":"2.0","id":17,"method":"actor.call","params":{"actor":"Calculator","inputs":{"a":1}}}'
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        (req,) = p.decode_frame(text).items
        out = p.reply_frame([p.Response(req.id, {"outputs": {"result": {"type": "integer", "value": 2}}})], False)
    per = (time.perf_counter() - t0) / n * 1e6
    assert orjson.loads(out)["id"] == 17
    with capsys.disabled():
        print(f"\n[protocol] decode + answer one small request: {per:.2f} µs")
