"""The one error→code table (supervisor/core/errors.py), hit directly: each error a
caller can see answers with its CONTRACT §4 code, and anything else is an internal
error that names only its type."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import RpcError
from supervisor.core import errors as e
from supervisor.core import protocol as proto

# CONTRACT §4, by hand: the wire codes must not move.
CONTRACT = [
    (e.InvalidParams("bad"), -32602), (e.RequestCancelled("request cancelled"), -32800),
    (e.UnknownActor("Nope"), -32001), (e.ActorRemoved("Gone", "it exited"), -32001),
    (e.ActorFailed("boom"), -32002), (e.ActorStopped("stopped"), -32002), (e.ActorTimedOut("slow"), -32003),
    (e.Overloaded("busy"), -32004), (e.ResourceLimitExceeded("memory"), -32005), (e.Unauthorized("no"), -32006),
]


@pytest.mark.parametrize("exc, code", CONTRACT, ids=lambda x: type(x).__name__ if isinstance(x, Exception) else "")
def test_each_error_answers_with_its_contract_code(exc, code):
    got = e.rpc_error(exc)
    assert got == (code, exc.message, exc.data)
    assert exc.to_error() == {"code": code, "message": exc.message, **({"data": exc.data} if exc.data else {})}


def test_the_data_shapes_stay():
    assert e.rpc_error(e.ResourceLimitExceeded("output"))[2] == {"limit": "output"}
    assert e.rpc_error(e.UnknownActor("X")) == (-32001, "unknown actor 'X'", {"actor": "X"})
    assert e.rpc_error(e.UnknownActor(3))[2] == {"actor": None}


@given(message=st.text(max_size=30))
def test_anything_else_is_an_internal_error_naming_only_its_type(message):
    for exc in (ValueError(message), KeyError(message), OSError(2, message, "/home/secret/path")):
        code, text, data = e.rpc_error(exc)
        assert (code, text, data) == (-32603, f"internal error: {type(exc).__name__}", None)


@given(code=st.integers(-2**31, 2**31), message=st.text(max_size=20), data=st.none() | st.dictionaries(
    st.text(max_size=5), st.integers(), max_size=3))
def test_a_relayed_rpc_error_answers_as_itself(code, message, data):
    """A handler raising the client's RpcError answers with exactly that error."""
    assert e.rpc_error(RpcError(code, message, data)) == (code, message, data)
    reply = proto.error_response(1, *e.rpc_error(RpcError(code, message, data)))
    assert (reply.error.code, reply.error.message, reply.error.data) == (code, message, data)


def test_an_exception_with_a_code_attribute_is_not_trusted():
    """Only registered classes carry their answer: a stray ``.code`` (SystemExit, an HTTP
    error) must not reach the wire."""
    exc = SystemExit(3)
    exc.message = "leak"  # type: ignore[attr-defined]
    assert e.rpc_error(exc) == (-32603, "internal error: SystemExit", None)
