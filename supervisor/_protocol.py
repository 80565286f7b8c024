"""JSON-RPC 2.0 and typed messages, pure (no I/O).

``decode_frame`` never raises: every malformed input becomes an ``Invalid``
entry carrying the error the spec says to answer with. It is on the hot path
of every call, so it decodes with orjson and checks plain dicts instead of
running a generic structuring converter per frame.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import attrs
import orjson

__all__ = [
    "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "INTERNAL_ERROR",
    "REQUEST_CANCELLED", "UNKNOWN_ACTOR", "ACTOR_FAILED", "TIMED_OUT", "OVERLOADED", "RESOURCE_LIMIT",
    "UNAUTHORIZED", "ErrorObject", "Request", "Notification", "Response", "ErrorResponse", "Invalid", "Frame",
    "decode_frame", "encode", "encode_batch", "reply_frame", "error_response", "invalid_to_reply",
    "MESSAGE_TYPES", "wrap", "unwrap", "is_typed",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
REQUEST_CANCELLED = -32800
UNKNOWN_ACTOR = -32001
ACTOR_FAILED = -32002
TIMED_OUT = -32003
OVERLOADED = -32004
RESOURCE_LIMIT = -32005
UNAUTHORIZED = -32006

Id = int | str | None


@attrs.frozen
class ErrorObject:
    code: int
    message: str
    data: Any = None

    def to_dict(self) -> dict:
        d: dict = {"code": self.code, "message": self.message}
        if self.data is not None:
            d["data"] = self.data
        return d


@attrs.frozen
class Request:
    id: Id
    method: str
    params: Any = None


@attrs.frozen
class Notification:
    method: str
    params: Any = None


@attrs.frozen
class Response:
    id: Id
    result: Any


@attrs.frozen
class ErrorResponse:
    id: Id
    error: ErrorObject


@attrs.frozen
class Invalid:
    """An entry that must be answered with ``error`` (id echoed when it was readable)."""

    id: Id
    error: ErrorObject


Incoming = Request | Notification | Response | ErrorResponse | Invalid


@attrs.frozen
class Frame:
    items: tuple[Incoming, ...]
    is_batch: bool


def _valid_id(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _invalid(rid: Id, why: str) -> Invalid:
    return Invalid(rid, ErrorObject(INVALID_REQUEST, f"invalid request: {why}"))


def _decode_one(obj: Any) -> Incoming:
    if not isinstance(obj, dict):
        return _invalid(None, "expected an object")
    rid = obj.get("id")
    if not _valid_id(rid):
        return _invalid(None, "id must be a string, a number or null")
    if obj.get("jsonrpc") != "2.0":
        return _invalid(rid, 'jsonrpc must be "2.0"')
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str):
            return _invalid(rid, "method must be a string")
        params = obj.get("params")
        if "params" in obj and not isinstance(params, (dict, list)):
            return _invalid(rid, "params must be an object or an array")
        if "id" in obj:
            return Request(rid, method, params)
        return Notification(method, params)
    has_result, has_error = "result" in obj, "error" in obj
    if has_result == has_error or "id" not in obj:
        return _invalid(rid, "neither a request nor a response")
    if has_result:
        return Response(rid, obj["result"])
    err = obj["error"]
    if not isinstance(err, dict) or not isinstance(err.get("code"), int) or not isinstance(err.get("message"), str):
        return _invalid(rid, "error must have an integer code and a string message")
    return ErrorResponse(rid, ErrorObject(err["code"], err["message"], err.get("data")))


_LONG_NUMBER = re.compile(rb"\d{19}")


def _loads(data: bytes | str) -> Any:
    # orjson reads integers beyond 64 bits as floats (losing digits); JSON allows any
    # size, so frames with such long digit runs go through the stdlib instead.
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_NUMBER.search(raw):
        return json.loads(raw)
    return orjson.loads(raw)


def decode_frame(data: bytes | str) -> Frame:
    """Decode one frame (an object or a batch); never raises."""
    try:
        obj = _loads(data)
    except (ValueError, TypeError, RecursionError):
        return Frame((Invalid(None, ErrorObject(PARSE_ERROR, "parse error: not valid JSON")),), False)
    if isinstance(obj, list):
        if not obj:
            return Frame((_invalid(None, "empty batch"),), False)
        return Frame(tuple(_decode_one(o) for o in obj), True)
    return Frame((_decode_one(obj),), False)


def _to_dict(msg: Any) -> dict:
    if isinstance(msg, Request):
        d = {"jsonrpc": "2.0", "id": msg.id, "method": msg.method}
        if msg.params is not None:
            d["params"] = msg.params
        return d
    if isinstance(msg, Notification):
        d = {"jsonrpc": "2.0", "method": msg.method}
        if msg.params is not None:
            d["params"] = msg.params
        return d
    if isinstance(msg, Response):
        return {"jsonrpc": "2.0", "id": msg.id, "result": msg.result}
    if isinstance(msg, (ErrorResponse, Invalid)):
        return {"jsonrpc": "2.0", "id": msg.id, "error": msg.error.to_dict()}
    raise TypeError(f"cannot encode {type(msg).__name__}")


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError as exc:
        if "Integer exceeds 64-bit range" not in str(exc):
            raise ValueError(f"not JSON-serialisable: {exc}") from exc
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode(msg: Any) -> bytes:
    return _dumps(_to_dict(msg))


def encode_batch(msgs: Sequence[Any]) -> bytes:
    return _dumps([_to_dict(m) for m in msgs])


def error_response(rid: Id, code: int, message: str, data: Any = None) -> ErrorResponse:
    return ErrorResponse(rid, ErrorObject(code, message, data))


def invalid_to_reply(inv: Invalid) -> ErrorResponse:
    return ErrorResponse(inv.id, inv.error)


def reply_frame(replies: Sequence[Any], is_batch: bool) -> bytes | None:
    """What to send back: None when there is nothing (e.g. an all-notification batch)."""
    if not replies:
        return None
    if is_batch:
        return encode_batch(replies)
    return encode(replies[0])


# -- typed values ------------------------------------------------------------------------------

MESSAGE_TYPES = ("integer", "float", "string", "boolean", "array", "object", "error", "bytes", "any", "null")
_CHECKS = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "error": lambda v: isinstance(v, dict) and isinstance(v.get("message"), str),
    "bytes": lambda v: isinstance(v, str),
    "any": lambda v: True,
    "null": lambda v: v is None,
}


def is_typed(value: Any) -> bool:
    """True for ``{"type": T, "value": V}`` with a known T (the shape, not V's validity)."""
    return (isinstance(value, dict) and len(value) == 2 and "type" in value and "value" in value
            and value["type"] in _CHECKS)


def _finite(v: Any) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("NaN and infinity are not JSON")
    if isinstance(v, dict):
        for x in v.values():
            _finite(x)
    elif isinstance(v, list):
        for x in v:
            _finite(x)


def wrap(value: Any) -> dict:
    """A plain value → a typed message by inference; a typed message passes through (validated).

    ``None`` becomes ``{"type": "null"}``; ``bool`` is checked before ``int``; bytes go base64.
    Raises ValueError for NaN/infinity or a typed message whose value does not fit its type.
    """
    if is_typed(value):
        t, v = value["type"], value["value"]
        if not _CHECKS[t](v):
            raise ValueError(f"a {t} message cannot carry {v!r}")
        if t == "bytes":
            try:
                base64.b64decode(v, validate=True)
            except ValueError as exc:
                raise ValueError("a bytes message carries base64 text") from exc
        _finite(v)
        return value
    if value is None:
        return {"type": "null", "value": None}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int):
        return {"type": "integer", "value": value}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and infinity are not JSON")
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, (list, tuple)):
        _finite(list(value))
        return {"type": "array", "value": list(value)}
    if isinstance(value, dict):
        _finite(value)
        return {"type": "object", "value": value}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    raise ValueError(f"cannot send a {type(value).__name__} as a message")


def unwrap(msg: Any) -> Any:
    """A typed message → its plain value (bytes decoded from base64); anything else as is."""
    if not is_typed(msg):
        return msg
    if msg["type"] == "bytes":
        return base64.b64decode(msg["value"])
    return msg["value"]
