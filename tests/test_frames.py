"""The host⇄worker frame codec (supervisor/core/frames.py), hit directly: what a worker's
frames decode to, that nothing a worker sends makes it raise, and that each per-request
limit holds exactly at its boundary. The same codec through a real host and hostile
sandboxes is tests/test_hostile_channel.py."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor._shm import ShmError
from supervisor.core import frames
from supervisor.core.frames import (BadReference, Log, Output, OverLimit, Reply, RequestReader, StateCall, Violation,
                                    json_values, resolve_bytes)
from supervisor.core.protocol import MESSAGE_TYPES, Blob

BIG = 1 << 30
EVENTS = (Reply, Output, StateCall, Log, OverLimit, Violation, type(None))

json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=10) \
    | st.floats(allow_nan=False, allow_infinity=False)
json_values_st = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3)
                              | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)
ports = st.text(min_size=1, max_size=8)
blobs = st.binary(max_size=64)
plain_messages = st.builds(lambda t, v: {"type": t, "value": v},
                           st.sampled_from([t for t in MESSAGE_TYPES if t != "bytes"]), json_values_st)


def reader(rid: int = 1, **kw) -> RequestReader:
    kw.setdefault("max_output", BIG)
    kw.setdefault("max_values", BIG)
    return RequestReader(rid, **kw)


def frame(obj) -> bytes:
    return orjson.dumps(obj)


# -- round trips --------------------------------------------------------------------------------

@given(port=ports, message=plain_messages)
def test_an_output_decodes_to_its_port_and_message(port, message):
    ev = reader().feed(frame({"jsonrpc": "2.0", "method": "output", "params": {"port": port, "message": message}}))
    assert ev == Output(port, message)


@given(port=ports, atts=st.lists(blobs, min_size=1, max_size=5), data=st.data())
def test_an_attachment_reference_resolves_to_its_bytes(port, atts, data):
    k = data.draw(st.integers(0, len(atts) - 1))
    msg = {"jsonrpc": "2.0", "method": "output", "params": {"port": port, "message": {"type": "bytes", "$att": k}}}
    ev = reader().feed(frame(msg), atts)
    assert ev == Output(port, {"type": "bytes", "value": Blob(atts[k])})


@given(rid=st.integers(0, 2**31), outputs=st.dictionaries(ports, plain_messages | blobs, max_size=5))
def test_a_reply_round_trips_with_its_bytes_outputs_resolved(rid, outputs):
    atts: list[bytes] = []
    wire = {}
    for port, value in outputs.items():
        if isinstance(value, bytes):
            atts.append(value)
            wire[port] = {"type": "bytes", "$att": len(atts) - 1}
        else:
            wire[port] = value
    ev = reader(rid).feed(frame({"jsonrpc": "2.0", "id": rid, "result": {"outputs": wire}}), atts)
    assert type(ev) is Reply
    want = {p: {"type": "bytes", "value": Blob(v)} if isinstance(v, bytes) else v for p, v in outputs.items()}
    assert ev.message == {"jsonrpc": "2.0", "id": rid, "result": {"outputs": want}}


@given(ref=json_values_st, data=blobs)
def test_a_shm_reference_goes_to_the_injected_lookup(ref, data):
    asked = []

    def take(r):
        asked.append(r)
        return data

    msg = {"jsonrpc": "2.0", "method": "output", "params": {"port": "p", "message": {"type": "bytes", "$shm": ref}}}
    assert reader(take_shm=take).feed(frame(msg)) == Output("p", {"type": "bytes", "value": Blob(data)})
    assert asked == [ref]


@given(sid=json_values_st, params=st.dictionaries(st.text(max_size=5), json_values_st, max_size=3))
def test_a_state_call_carries_its_id_and_params(sid, params):
    ev = reader().feed(frame({"jsonrpc": "2.0", "id": sid, "method": "state", "params": params}))
    assert ev == StateCall(sid, params)


@given(stream=json_values_st, text=st.text(max_size=600))
def test_a_log_line_is_kept_to_its_length(stream, text):
    ev = reader().feed(frame({"jsonrpc": "2.0", "method": "log", "params": {"stream": stream, "text": text}}))
    assert ev == Log(stream, text[:frames.LOG_TEXT_MAX], False)


def test_an_error_reply_passes_as_it_is():
    msg = {"jsonrpc": "2.0", "id": 3, "error": {"code": -32002, "message": "boom", "data": {"type": "ValueError"}}}
    assert reader(3).feed(frame(msg)) == Reply(msg)


def test_outputs_of_a_request_no_message_waits_on_are_counted_not_read():
    r = reader(outputs=False, max_outputs=1)
    bad = frame({"method": "output", "params": {"port": 1, "message": {"type": "bytes", "$att": 9}}})
    assert r.feed(bad) is None                       # not judged: nobody takes it
    assert type(r.feed(bad)) is OverLimit            # but still counted


# -- malformed frames are violations, never exceptions -------------------------------------------

near_frames = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.just("2.0") | json_values_st,
    "id": st.integers(0, 3) | json_values_st,
    "method": st.sampled_from(["output", "state", "log", "process", "load"]) | json_values_st,
    "params": st.fixed_dictionaries({}, optional={
        "port": ports | json_values_st,
        "message": plain_messages | st.fixed_dictionaries(
            {"type": st.just("bytes") | json_values_st},
            optional={"$att": st.integers(-2, 6) | json_values_st, "$shm": json_values_st,
                      "value": json_values_st}) | json_values_st,
        "stream": json_values_st, "text": json_values_st}) | json_values_st,
    "result": st.fixed_dictionaries({}, optional={"outputs": st.dictionaries(ports, json_values_st | st.fixed_dictionaries(
        {"type": st.just("bytes"), "$att": st.integers(-2, 6) | json_values_st}), max_size=3)}) | json_values_st,
    "error": st.fixed_dictionaries({"code": st.integers(-2**40, 2**40), "message": st.text(max_size=5)}) | json_values_st,
})


def _take_shm(ref):
    if ref == [0, 0, 0, 0]:
        return b"ok"
    raise ShmError("a shared-memory reference is [offset, length, seq, end] of non-negative integers")


@settings(max_examples=400)
@given(raw=st.binary(max_size=64) | st.builds(frame, json_values_st | near_frames),
       atts=st.lists(blobs, max_size=3), shm=st.booleans())
def test_nothing_a_worker_sends_makes_the_codec_raise(raw, atts, shm):
    ev = reader(1, take_shm=_take_shm if shm else None).feed(raw, atts)
    assert type(ev) in EVENTS
    if isinstance(ev, Violation | OverLimit):
        assert ev.reason
    if type(ev) is Output:
        assert isinstance(ev.port, str) and set(ev.message) == {"type", "value"}
    if type(ev) is Reply:
        assert ev.message.get("id") == 1


@pytest.mark.parametrize("raw, why", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"id": 2, "result": {}}', "a reply to request '2' while request 1 was pending"),
    (b'{"id": 1, "result": []}', "result or error is not an object"),
    (b'{"id": 1, "error": "x"}', "result or error is not an object"),
    (b'{"method": "process", "params": {}}', "a request for 'process', which the host does not serve"),
    (b'{"method": "output", "params": {"port": 1, "message": {"type": "integer", "value": 1}}}',
     "not a port name and a typed message"),
    (b'{"method": "output", "params": {"port": "p", "message": {"type": "integer"}}}',
     "not a port name and a typed message"),
    (b'{"method": "output", "params": {"port": "p", "message": {"type": "bytes", "$att": 0}}}',
     "names no attachment"),
    (b'{"method": "output", "params": {"port": "p", "message": {"type": "bytes", "$att": true}}}',
     "names no attachment"),
    (b'{"method": "output", "params": {"port": "p", "message": {"type": "bytes", "$att": -1}}}',
     "names no attachment"),
    (b'{"id": 1, "result": {"outputs": {"p": {"type": "bytes", "$att": 1}}}}', "names no attachment"),
    (b'{"method": "output", "params": {"port": "p", "message": {"type": "bytes", "$shm": [0, 1, 2, 3]}}}',
     "from a worker that has none"),
])
def test_each_malformed_shape_is_a_violation_with_its_reason(raw, why):
    ev = reader(1).feed(raw)
    assert type(ev) is Violation and why in ev.reason, ev


def test_a_stale_shm_reference_is_a_violation():
    ev = reader(take_shm=_take_shm).feed(
        frame({"method": "output", "params": {"port": "p", "message": {"type": "bytes", "$shm": [1, 2, 3, 4]}}}))
    assert ev == Violation("a shared-memory reference is [offset, length, seq, end] of non-negative integers")
    assert issubclass(ShmError, BadReference)  # what the shell's ring raises is what the codec catches


@given(message=json_values_st)
def test_resolve_bytes_passes_what_is_no_reference(message):
    if isinstance(message, dict) and message.get("type") == "bytes":
        return
    assert resolve_bytes(message, [], None) is message


# -- limits, exactly at the boundary ----------------------------------------------------------------

@given(size=st.integers(1, 10_000), extra=st.integers(0, 3))
def test_the_byte_budget_admits_exactly_max_output(size, extra):
    ok = frame({"method": "log", "params": {"text": "x"}})
    r = reader(max_output=size)
    assert type(r.feed(ok, received=size)) is Log
    ev = r.feed(ok, received=size + 1 + extra)
    assert ev == OverLimit(f"more than {size} bytes for one request")


@given(n=st.integers(2, 200), strings=st.booleans())
def test_the_value_budget_admits_exactly_max_values(n, strings):
    # A list of n-1 items counts n; commas inside strings do not count (the exact pass).
    item = '",[{"' if strings else "0"
    raw = ("[" + ",".join([item] * (n - 1)) + "]").encode()
    assert json_values(raw, exact=True) == n
    wrapped = b'{"method":"log","params":{"text":' + raw + b"}}"
    total = json_values(wrapped, exact=True)
    assert type(reader(max_values=total).feed(wrapped)) is Log
    assert type(reader(max_values=total - 1).feed(wrapped)) is OverLimit
    if strings:
        # Within budget a frame is charged its quick count (brackets in strings too): the
        # exact pass runs only for a frame that would not fit otherwise.
        assert json_values(wrapped) > total
        return
    r = reader(max_values=2 * total)  # the budget is for the whole request, across frames
    assert type(r.feed(wrapped)) is Log and type(r.feed(wrapped)) is Log
    assert r.feed(wrapped) == OverLimit(f"more than {2 * total} JSON values for one request")


@given(cap=st.integers(0, 30))
def test_outputs_and_state_calls_stop_exactly_at_their_cap(cap):
    out = frame({"method": "output", "params": {"port": "p", "message": {"type": "integer", "value": 1}}})
    st_ = frame({"id": 7, "method": "state", "params": {"op": "get"}})
    r = reader(max_outputs=cap, max_state_calls=cap)
    for _ in range(cap):
        assert type(r.feed(out)) is Output and type(r.feed(st_)) is StateCall
    assert r.feed(out) == OverLimit(f"more than {cap} outputs for one request")
    assert r.feed(st_) == OverLimit(f"more than {cap} state calls for one request")


@given(cap=st.integers(1, 30))
def test_log_lines_past_the_cap_are_dropped_and_the_last_says_so(cap):
    line = frame({"method": "log", "params": {"stream": "stdout", "text": "hi"}})
    r = reader(max_log_lines=cap)
    got = [r.feed(line) for _ in range(cap + 3)]
    assert got[:cap] == [Log("stdout", "hi", False)] * (cap - 1) + [Log("stdout", "hi", True)]
    assert got[cap:] == [None] * 3


def test_the_default_limits_are_the_documented_ones():
    # supervisor/runtime/PROTOCOL.md and the README name these numbers.
    assert (frames.MAX_OUTPUTS, frames.MAX_STATE_CALLS, frames.MAX_LOG_LINES) == (10_000, 10_000, 1_000)
    assert frames.max_values_for(4 * 2**20) == 4 * 2**20 // 32 and frames.max_values_for(1000) == 4096
