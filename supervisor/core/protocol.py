"""JSON-RPC 2.0 framing and typed messages, pure (no I/O, no trio, no clock).

Everything a peer sends goes through :func:`decode_frame`, which never raises:
malformed input becomes an :class:`Invalid` entry carrying the error the
JSON-RPC 2.0 specification says to answer with. Everything we send goes
through :func:`encode` / :func:`encode_batch` / :func:`reply_frame`, which
raise instead of putting something on the wire that is not JSON.

This module is on the hot path of every call (every frame goes through it), so it
decodes with orjson, validates with plain ``type()`` checks and builds the
attrs classes directly. cattrs is deliberately not used here: structuring a
``Request`` through a converter costs more than a direct construction before
any validation, and the typed-message codec works on plain dicts —
there is no class for a converter to structure into. The one converter of
the package lives in ``_config``.

orjson is a near-complete JSON codec, but two gaps are filled by hand here
because no maintained library closes them (comments at each place say why):
integers beyond 64 bits (orjson silently reads them as floats and refuses to
write them) and NaN/Infinity (orjson silently writes them as ``null``).
Integers of any size are read exactly; what the host cannot carry through
its workers, Redis and orjson (integers beyond signed 64 bits, nesting past
MAX_DEPTH) is refused in a request's params with -32602 naming the limit
(see "limits" below).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import attrs
import orjson

# One table of codes for the package: _errors maps exception classes to them.
from .errors import (ACTOR_FAILED as ACTOR_FAILED, INTERNAL_ERROR as INTERNAL_ERROR,
                      INVALID_PARAMS as INVALID_PARAMS, INVALID_REQUEST as INVALID_REQUEST,
                      METHOD_NOT_FOUND as METHOD_NOT_FOUND, OVERLOADED as OVERLOADED,
                      PARSE_ERROR as PARSE_ERROR, REQUEST_CANCELLED as REQUEST_CANCELLED,
                      RESOURCE_LIMIT as RESOURCE_LIMIT, TIMED_OUT as TIMED_OUT,
                      UNAUTHORIZED as UNAUTHORIZED, UNKNOWN_ACTOR as UNKNOWN_ACTOR)

__all__ = [
    "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "INTERNAL_ERROR",
    "REQUEST_CANCELLED", "UNKNOWN_ACTOR", "ACTOR_FAILED", "TIMED_OUT", "OVERLOADED", "RESOURCE_LIMIT",
    "UNAUTHORIZED",
    "ErrorObject", "Request", "Notification", "Response", "ErrorResponse", "Invalid", "Incoming", "Frame",
    "decode_frame", "encode", "encode_batch", "reply_frame", "error_response", "invalid_to_reply",
    "INT_MIN", "INT_MAX", "MAX_DEPTH",
    "MESSAGE_TYPES", "wrap", "unwrap", "is_typed", "Blob", "json_default",
    "attach", "split_attachments", "bind_attachments",
]

Id = Union[int, str, None]


# -- messages ------------------------------------------------------------------------------------

@attrs.frozen
class ErrorObject:
    """A JSON-RPC error object; ``data`` None means "no data member"."""

    code: int
    message: str
    data: Any = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            d["data"] = self.data
        return d


@attrs.frozen
class Request:
    """A call that expects an answer; ``id`` None is a (discouraged but valid) null id."""

    id: Id
    method: str
    params: dict | list | None = None


@attrs.frozen
class Notification:
    """A call without an id: it is never answered, not even with an error."""

    method: str
    params: dict | list | None = None


@attrs.frozen
class Response:
    """A peer's (or our) successful answer to the request with this id."""

    id: Id
    result: Any


@attrs.frozen
class ErrorResponse:
    """A failed answer; ``id`` is None when the request's id could not be read."""

    id: Id
    error: ErrorObject


@attrs.frozen
class Invalid:
    """An entry that broke the protocol and must be answered with ``error``.

    ``id`` is the entry's id when it was readable (a valid id in an otherwise
    invalid request), else None, as the spec requires. A malformed *response*
    from a peer also decodes to ``Invalid``: a client must not answer it, but
    the id (when readable) lets it fail the pending call it belonged to.
    ``notification``: a well-formed notification refused for its params (see
    :data:`MAX_DEPTH`); like any notification it gets no answer.
    """

    id: Id
    error: ErrorObject
    notification: bool = False


Incoming = Union[Request, Notification, Response, ErrorResponse, Invalid]


@attrs.frozen
class Frame:
    """One decoded WebSocket/channel frame; ``is_batch`` means "answer with an array"."""

    items: tuple[Incoming, ...]
    is_batch: bool


def error_response(id: Id, code: int, message: str, data: Any = None) -> ErrorResponse:  # noqa: A002
    """The error answer to request ``id``; ``data`` None sends no data member."""
    return ErrorResponse(id, ErrorObject(code, message, data))


def invalid_to_reply(inv: Invalid) -> ErrorResponse:
    """The answer a decoded :class:`Invalid` entry must get."""
    return ErrorResponse(inv.id, inv.error)


# -- decoding ------------------------------------------------------------------------------------

_MISSING: Any = object()


def _invalid(rid: Id, why: str) -> Invalid:
    return Invalid(rid, ErrorObject(INVALID_REQUEST, f"Invalid Request: {why}"))


# Frozen, so the id-less ones can be shared instead of built per bad entry.
_NOT_AN_OBJECT = _invalid(None, "expected a JSON object")
_BAD_ID = _invalid(None, "id must be a string, an integer or null")
_EMPTY_BATCH = _invalid(None, "empty batch")


def _decode_one(obj: Any) -> Incoming:
    # orjson (and the stdlib fallback) produce exact built-in types, so ``type(x) is``
    # is both correct and the cheapest check; it also keeps bool out of int.
    if type(obj) is not dict:
        return _NOT_AN_OBJECT
    rid = obj.get("id", _MISSING)
    has_id = rid is not _MISSING
    if not has_id:
        rid = None
    elif rid is not None and type(rid) is not int and type(rid) is not str:
        return _BAD_ID
    if obj.get("jsonrpc") != "2.0":
        return _invalid(rid, 'jsonrpc must be "2.0"')
    method = obj.get("method", _MISSING)
    if method is not _MISSING:
        if type(method) is not str:
            return _invalid(rid, "method must be a string")
        params = obj.get("params")
        if params is not None:
            if type(params) is not dict and type(params) is not list:
                return _invalid(rid, "params must be an object or an array")
        elif "params" in obj:
            return _invalid(rid, "params must be an object or an array, not null")
        if has_id:
            return Request(rid, method, params)
        return Notification(method, params)
    result = obj.get("result", _MISSING)
    err = obj.get("error", _MISSING)
    if (result is _MISSING) == (err is _MISSING):
        return _invalid(rid, "a request needs a method; a response needs exactly one of result and error")
    if not has_id:
        return _invalid(None, "a response needs an id")
    if result is not _MISSING:
        return Response(rid, result)
    if type(err) is not dict:
        return _invalid(rid, "error must be an object")
    code, message = err.get("code"), err.get("message")
    if type(code) is not int or type(message) is not str:
        return _invalid(rid, "error needs an integer code and a string message")
    return ErrorResponse(rid, ErrorObject(code, message, err.get("data")))


# -- limits: what every part of the host can carry exactly ---------------------------------------
#
# JSON has integers of any size and nesting of any depth; what carries them does not.
# orjson reads an integer beyond 64 bits as a float (silently losing digits) and refuses
# to write one, and it writes at most 254 levels of nesting while it reads 1024; Redis
# counts in signed 64 bits; a JavaScript number is exact only to 2**53. So the API takes
# what all of them carry, and refuses the rest with -32602 naming the limit, before it
# reaches a mailbox (a value no part can write would otherwise fail far from its sender):
#   - integers from INT_MIN to INT_MAX (signed 64-bit), exact end to end (a JavaScript
#     script or client sees those beyond 2**53 rounded, as JavaScript does); larger
#     numbers travel as strings or floats;
#   - requests nested at most MAX_DEPTH levels, the request object itself counted, which
#     leaves orjson room for the few levels the host wraps a value in on its way.
# The worker SDKs hold scripts to the same limits (a script error naming the limit).
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
MAX_DEPTH = 128
_INT_LIMIT = {"limit": "integer", "min": INT_MIN, "max": INT_MAX}
_DEPTH_LIMIT = {"limit": "depth", "max": MAX_DEPTH}

# Both checks cost nothing on a frame that cannot break them, which is nearly every
# frame: an integer beyond 64 bits has at least 19 digits, and a request nested
# MAX_DEPTH levels has as many brackets. One C pass maps digits to "0" and brackets to
# "["; two counts then say whether to look closer (cheaper than a regex would be).
# Frames with a run of 19 digits are read by the stdlib instead (exact
# ints; slower, rare), and only then are their integers checked.
_MARKS = bytes(48 if 48 <= i <= 57 else 91 if i in (91, 123) else 32 for i in range(256))
_DIGIT_RUN = b"0" * 19


def _breach(params: Any, ints: bool) -> str | None:
    """Which limit ``params`` (at level 2: inside its request) breaks: "integer" (only
    looked for with ``ints``), "depth", or None. Iterative: it may be 1024 levels deep."""
    if type(params) is not dict and type(params) is not list:
        return None
    stack = [(params, 2)]
    while stack:
        v, level = stack.pop()
        if level > MAX_DEPTH:
            return "depth"
        for x in (v.values() if type(v) is dict else v):
            t = type(x)
            if t is dict or t is list:
                stack.append((x, level + 1))
            elif ints and t is int and not INT_MIN <= x <= INT_MAX:
                return "integer"
    return None


def _refuse(entry: Incoming, limit: str) -> Incoming:
    """``entry`` (a Request or a Notification) refused for breaking ``limit``."""
    if limit == "integer":
        error = ErrorObject(INVALID_PARAMS, f"an integer is out of range: integers are exact from {INT_MIN} to "
                            f"{INT_MAX} (signed 64-bit); send larger ones as strings", _INT_LIMIT)
    else:
        error = ErrorObject(INVALID_PARAMS, f"params are nested deeper than {MAX_DEPTH} levels "
                            "(the request counted)", _DEPTH_LIMIT)
    if type(entry) is Request:
        return Invalid(entry.id, error)
    return Invalid(None, error, notification=True)


def _within_limits(entry: Incoming, ints: bool) -> Incoming:
    if type(entry) is Request or type(entry) is Notification:
        limit = _breach(entry.params, ints)
        if limit is not None:
            return _refuse(entry, limit)
    return entry


def _finite_float(text: str) -> float:
    f = float(text)
    if f - f != 0:  # inf - inf and nan - nan are nan
        raise ValueError(f"number {text[:20]} is out of range")
    return f


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_exact(raw: bytes) -> Any:
    # The stdlib parser is more permissive than orjson in three ways; close them so
    # both paths accept the same documents: NaN/Infinity literals, numbers that
    # overflow to infinity, and escaped lone surrogates (which are not Unicode and
    # could never be encoded back).
    obj = json.loads(raw.decode("utf-8"), parse_float=_finite_float, parse_constant=_reject_constant)
    json.dumps(obj, ensure_ascii=False).encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
    return obj


def decode_frame(data: bytes | str) -> Frame:
    """Decode one frame: a single message or a batch. Never raises.

    Invalid JSON is one ``Invalid`` (-32700, id None); an empty batch is one
    ``Invalid`` (-32600) answered with a single object, not an array; every
    other entry is decoded on its own, so one bad entry in a batch does not
    spoil the others. Integers of any size are read exactly; a request or
    notification whose params hold an integer outside INT_MIN..INT_MAX or
    nest deeper than MAX_DEPTH is an ``Invalid`` (-32602, ``data.limit``
    "integer" or "depth").
    """
    try:
        if isinstance(data, str):
            raw = data.encode("utf-8")  # a lone surrogate fails here: a parse error
        elif type(data) is bytes:
            raw = data
        else:
            raw = bytes(memoryview(data))  # bytearray, memoryview; anything else: TypeError
        attachments = None
        if raw[:1] == b"@" and not isinstance(data, str):  # a binary attachment frame
            raw, attachments = split_attachments(raw)
        marks = raw.translate(_MARKS)
        big = marks.count(48) >= 19 and marks.find(_DIGIT_RUN) >= 0
        obj = _loads_exact(raw) if big else orjson.loads(raw)
        if attachments is not None:
            obj = bind_attachments(obj, attachments, lambda v: Blob(bytes(v)))
    except (ValueError, TypeError, RecursionError) as exc:
        # orjson.JSONDecodeError and UnicodeError are ValueErrors; its text locates
        # the problem in the client's own input and reveals nothing of ours.
        why = str(exc).split("\n", 1)[0][:200]
        return Frame((Invalid(None, ErrorObject(PARSE_ERROR, f"Parse error: {why}")),), False)
    if big or (marks.count(91) >= MAX_DEPTH and _maybe_too_deep(obj)):  # (see _MARKS)
        return _checked(obj, big)
    if type(obj) is list:
        if not obj:
            return Frame((_EMPTY_BATCH,), False)
        return Frame(tuple(map(_decode_one, obj)), True)
    return Frame((_decode_one(obj),), False)


def _orjson_depth() -> int:
    """The deepest nesting orjson writes (254 in orjson 3), found once by bisection."""
    def writes(n: int) -> bool:
        v: list = []
        for _ in range(n - 1):
            v = [v]
        try:
            orjson.dumps(v)
        except orjson.JSONEncodeError:
            return False
        return True
    lo, hi = 1, 1 << 12
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if writes(mid) else (lo, mid - 1)
    return lo


_ORJSON_DEPTH = _orjson_depth()


def _maybe_too_deep(obj: Any) -> bool:
    """Whether the decoded frame ``obj`` may nest a request past MAX_DEPTH (False: surely
    not). Asked of frames with many brackets (a batch of small calls, say), so it asks
    orjson, in C: ``obj`` inside a chain of lists such that orjson can write the whole
    exactly when no request in ``obj`` nests past MAX_DEPTH."""
    room = _ORJSON_DEPTH - MAX_DEPTH - (type(obj) is list)  # (a batch's entries are one level down)
    if room < 1:
        return True
    chain: list = [obj]
    for _ in range(room - 1):
        chain = [chain]
    try:
        orjson.dumps(chain, default=json_default)
    except orjson.JSONEncodeError:
        return True
    return False


def _checked(obj: Any, ints: bool) -> Frame:
    """decode_frame's result for a frame that may break a limit (see MAX_DEPTH): each
    request or notification that does is refused, the others stand."""
    if type(obj) is list:
        if not obj:
            return Frame((_EMPTY_BATCH,), False)
        return Frame(tuple(_within_limits(_decode_one(x), ints) for x in obj), True)
    return Frame((_within_limits(_decode_one(obj), ints),), False)


# -- encoding ------------------------------------------------------------------------------------

def _bad_id(rid: Any) -> TypeError:
    return TypeError(f"a JSON-RPC id is a str, an int or None, not {type(rid).__name__}")


def _check_call(method: Any, params: Any) -> None:
    if type(method) is not str:
        raise TypeError(f"a method name is a str, not {type(method).__name__}")
    if params is not None and not isinstance(params, (dict, list, tuple)):
        raise TypeError(f"params are a dict, a list or None, not {type(params).__name__}")


def _request_dict(m: Request) -> dict:
    if m.id is not None and type(m.id) is not int and type(m.id) is not str:
        raise _bad_id(m.id)
    _check_call(m.method, m.params)
    if m.params is None:
        return {"jsonrpc": "2.0", "id": m.id, "method": m.method}
    return {"jsonrpc": "2.0", "id": m.id, "method": m.method, "params": m.params}


def _notification_dict(m: Notification) -> dict:
    _check_call(m.method, m.params)
    if m.params is None:
        return {"jsonrpc": "2.0", "method": m.method}
    return {"jsonrpc": "2.0", "method": m.method, "params": m.params}


def _response_dict(m: Response) -> dict:
    rid = m.id
    if rid is not None and type(rid) is not int and type(rid) is not str:
        raise _bad_id(rid)
    return {"jsonrpc": "2.0", "id": rid, "result": m.result}


def _error_response_dict(m: ErrorResponse) -> dict:
    if m.id is not None and type(m.id) is not int and type(m.id) is not str:
        raise _bad_id(m.id)
    e = m.error
    if type(e) is not ErrorObject or type(e.code) is not int or not isinstance(e.message, str):
        raise TypeError(f"an error needs an ErrorObject with an int code and a str message, not {e!r}")
    return {"jsonrpc": "2.0", "id": m.id, "error": e.to_dict()}


_TO_DICT: dict[type, Any] = {
    Request: _request_dict,
    Notification: _notification_dict,
    Response: _response_dict,
    ErrorResponse: _error_response_dict,
}


def _to_dict(msg: Any) -> dict:
    try:
        to_dict = _TO_DICT[type(msg)]
    except KeyError:
        hint = " (answer it with invalid_to_reply())" if type(msg) is Invalid else ""
        raise TypeError(f"cannot encode a {type(msg).__name__} as a JSON-RPC message{hint}") from None
    return to_dict(msg)


def _nonfinite_path(v: Any, path: str = "$") -> str | None:
    """Where in ``v`` a NaN or infinity hides, or None. Only walks dicts, lists and tuples."""
    if isinstance(v, float):
        return None if v - v == 0 else path
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, (float, dict, list, tuple)) and (p := _nonfinite_path(x, f"{path}.{k}")):
                return p
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            if isinstance(x, (float, dict, list, tuple)) and (p := _nonfinite_path(x, f"{path}[{i}]")):
                return p
    return None


class Blob:
    """The raw bytes of a typed ``bytes`` message held by the host (it came from a sandbox
    as a channel attachment, or from a client as a binary frame). It crosses the sandbox
    channel as raw bytes and becomes base64 text only where JSON is written: the client
    API, a Redis stream, a fan-in buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview):
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and bytes(self.data) == bytes(other.data)

    def __hash__(self) -> int:
        return hash(bytes(self.data))

    def __repr__(self) -> str:
        return f"Blob({memoryview(self.data).nbytes} bytes)"


def json_default(obj: Any) -> Any:
    """orjson's ``default``: a :class:`Blob` is written as base64 text."""
    if isinstance(obj, Blob):
        return base64.b64encode(obj.data).decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _dumps(obj: Any) -> bytes:
    try:
        out = orjson.dumps(obj, default=json_default)
    except orjson.JSONEncodeError as exc:
        reason = str(exc)
        # The two things orjson refuses that are still JSON: integers beyond 64 bits
        # and nesting deeper than its 254 levels. The stdlib writes both exactly.
        if "64-bit" not in reason and "ecursion" not in reason:
            raise ValueError(f"not JSON: {reason}") from exc
        try:
            text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                              default=json_default)
            return text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc2:
            raise ValueError(f"not JSON: {exc2}") from exc2
    # orjson writes NaN and ±Infinity as null without a word. Where the output has no
    # "null" there was none, so the walk (pure Python) runs only when it might matter.
    # (find, not ``in``: on short bytes it is the cheaper of the two in CPython 3.11.)
    if out.find(b"null") >= 0 and (where := _nonfinite_path(obj)):
        raise ValueError(f"not JSON: NaN or infinity at {where}")
    return out


def encode(msg: Request | Notification | Response | ErrorResponse, attachments: list | None = None) -> bytes:
    """One message as compact UTF-8 JSON (never containing a raw newline).

    With an ``attachments`` list, each bytes message holding a :class:`Blob` is
    written ``{"type": "bytes", "$att": k}`` and its buffer appended to the list
    (see :func:`attach`); otherwise Blobs are written as base64 text.

    ``params`` None and ``error.data`` None are omitted; a ``Request`` id None
    is written as ``"id": null``.

    Raises:
        TypeError: ``msg`` is not one of the four message classes (an
            ``Invalid`` must go through :func:`invalid_to_reply`), or a field
            has the wrong type (e.g. a bool id).
        ValueError: a value inside is not JSON: NaN or infinity (the message
            names where), an unsupported type, a non-str key, a lone surrogate.
    """
    if attachments is not None:
        return _dumps(_lift(_to_dict(msg), attachments))
    return _dumps(_to_dict(msg))


def encode_batch(msgs: Sequence[Request | Notification | Response | ErrorResponse]) -> bytes:
    """Several messages as one JSON array. Raises like :func:`encode`, and
    ValueError for an empty sequence (the spec has no empty batches)."""
    if not msgs:
        raise ValueError("a batch holds at least one message")
    return _dumps([_to_dict(m) for m in msgs])


def reply_frame(replies: Sequence[Response | ErrorResponse], is_batch: bool,
                attachments: list | None = None) -> bytes | None:
    """The frame answering a decoded :class:`Frame`, or None when nothing is to be sent.

    A batch is answered with an array of its replies (the spec forbids an
    empty array: all-notification batches get nothing); a single message with
    one object. Raises like :func:`encode`, and ValueError for several
    replies to a non-batch frame.
    """
    if not replies:
        return None
    if is_batch:
        obj: Any = [_to_dict(r) for r in replies]
    elif len(replies) != 1:
        raise ValueError(f"a single message has one reply, not {len(replies)}")
    else:
        obj = _to_dict(replies[0])
    return _dumps(obj if attachments is None else _lift(obj, attachments))


# -- attachments: bytes without base64 (binary WebSocket frames, the sandbox channel) -------------
#
# An attachment frame is ``@LEN,LEN,… JSON\n`` followed by the raw attachments back to
# back; inside the JSON, ``{"type": "bytes", "$att": k}`` stands for a bytes message
# holding attachment k. JSON never starts with ``@``, so a frame says what it is.

def _lift(obj: Any, attachments: list) -> Any:
    if type(obj) is dict:
        if len(obj) == 2 and obj.get("type") == "bytes" and isinstance(obj.get("value"), Blob):
            attachments.append(obj["value"].data)
            return {"type": "bytes", "$att": len(attachments) - 1}
        return {k: _lift(v, attachments) for k, v in obj.items()}
    if type(obj) is list:
        return [_lift(v, attachments) for v in obj]
    return obj


def attach(body: bytes, attachments: Sequence[Any]) -> bytes:
    """``body`` (JSON) and its attachments as one attachment frame; ``body`` alone if none."""
    if not attachments:
        return body
    sizes = b",".join(b"%d" % memoryview(a).nbytes for a in attachments)
    return b"".join([b"@", sizes, b" ", body, b"\n", *attachments])


def split_attachments(data: bytes) -> tuple[bytes, list[memoryview]]:
    """An attachment frame → (its JSON, its attachments as views into ``data``).

    Raises:
        ValueError: the header is not ``@LEN,… JSON\\n`` or the lengths do not add up.
    """
    nl = data.find(b"\n")
    sp = data.find(b" ", 0, nl)
    if not data.startswith(b"@") or nl < 0 or sp < 2:
        raise ValueError("an attachment frame starts with @LEN,LEN,… then a space, the JSON and a newline")
    try:
        sizes = [int(x) for x in data[1:sp].split(b",")]
    except ValueError:
        raise ValueError("attachment lengths are decimal integers") from None
    if min(sizes) < 0 or nl + 1 + sum(sizes) != len(data):
        raise ValueError(f"attachment lengths add up to {sum(sizes)}, the frame carries {len(data) - nl - 1}")
    view, at, out = memoryview(data), nl + 1, []
    for n in sizes:
        out.append(view[at:at + n])
        at += n
    return data[sp + 1:nl], out


def bind_attachments(obj: Any, attachments: Sequence[Any], make: Callable[[Any], Any] = Blob) -> Any:
    """Replace each ``{"type": "bytes", "$att": k}`` with a bytes message holding
    ``make(attachments[k])``. Raises ValueError for a reference to no attachment."""
    if type(obj) is dict:
        if "$att" in obj and obj.get("type") == "bytes" and len(obj) == 2:
            k = obj["$att"]
            if type(k) is not int or not 0 <= k < len(attachments):
                raise ValueError(f"$att {k!r} names no attachment of this frame")
            return {"type": "bytes", "value": make(attachments[k])}
        return {k: bind_attachments(v, attachments, make) for k, v in obj.items()}
    if type(obj) is list:
        return [bind_attachments(v, attachments, make) for v in obj]
    return obj


# -- typed values (CONTRACT §3/§4) ---------------------------------------------------------------

# "null" is kept: None must travel as something, and the in-sandbox SDK already
# sends Message.null() as {"type": "null", "value": null}; calling it "any" would
# make a deliberate "nothing" indistinguishable from "some value" (Reflow's own
# Optional(None) makes the same distinction). "flow" (Reflow's data-less trigger)
# is left out: the contract's Message API cannot create one and nothing here
# would emit or route it; adding a type no script can produce is dead weight.
MESSAGE_TYPES = ("integer", "float", "string", "boolean", "array", "object", "error", "bytes", "any", "null")
_TYPE_SET = frozenset(MESSAGE_TYPES)
_ERROR_KEYS = frozenset(("message", "code"))


class _NotJson(Exception):
    def __init__(self, reason: str):
        self.reason = reason
        self.path: list[str] = []


def _check_json(v: Any) -> None:
    """Raise _NotJson unless ``v`` is plain JSON (finite floats, str keys, no bytes).

    Written by hand: orjson would write NaN as null and accepts datetimes,
    dataclasses and the like that would not come back as the same value.
    """
    if v is None or isinstance(v, (str, int)):  # bool is an int
        return
    if isinstance(v, float):
        if v - v != 0:
            raise _NotJson("NaN and infinity are not JSON")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise _NotJson(f"object keys are strings, not {type(k).__name__}")
            try:
                _check_json(x)
            except _NotJson as e:
                e.path.append(f".{k}")
                raise
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            try:
                _check_json(x)
            except _NotJson as e:
                e.path.append(f"[{i}]")
                raise
        return
    raise _NotJson(f"a {type(v).__name__} is not a JSON value")


def _require_json(v: Any) -> None:
    try:
        _check_json(v)
    except _NotJson as e:
        where = "".join(reversed(e.path))
        raise ValueError(f"{e.reason} (at value{where})" if where else e.reason) from None
    except RecursionError:
        raise ValueError("value nested too deeply") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_typed(t: str, v: Any) -> None:
    """Raise ValueError unless ``v`` is a valid value for message type ``t``."""
    if t == "integer":
        ok = _is_int(v)
    elif t == "float":
        # A JS client writes 2.0 as 2, so an int is a valid float value.
        ok = isinstance(v, float) or _is_int(v)
        if ok:
            try:
                ok = math.isfinite(v)
            except OverflowError:  # an int too big for a float
                ok = False
    elif t == "string":
        ok = isinstance(v, str)
    elif t == "boolean":
        ok = isinstance(v, bool)
    elif t == "array":
        ok = isinstance(v, (list, tuple))
    elif t == "object":
        ok = isinstance(v, dict)
    elif t == "error":
        ok = (isinstance(v, dict) and isinstance(v.get("message"), str) and v.keys() <= _ERROR_KEYS
              and (v.get("code") is None or _is_int(v["code"]) or isinstance(v["code"], str)))
    elif t == "bytes":
        ok = isinstance(v, (str, Blob))
        if ok and isinstance(v, str):
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                ok = False
    elif t == "null":
        ok = v is None
    else:  # "any"
        ok = True
    if not ok:
        raise ValueError(f"a {t} message cannot carry {_short(v)}")
    if t in ("array", "object", "any", "error"):
        _require_json(v)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def is_typed(value: Any) -> bool:
    """True when ``value`` has the shape of a typed message:
    exactly the keys ``type`` and ``value``, with ``type`` one of MESSAGE_TYPES.

    This is the shape only: :func:`wrap` passes such a dict through after
    validating its value, and raises if the value does not fit the type.
    """
    if not isinstance(value, dict) or len(value) != 2 or "value" not in value:
        return False
    t = value.get("type")
    return isinstance(t, str) and t in _TYPE_SET


def wrap(value: Any) -> dict:
    """A value as a typed message ``{"type": T, "value": V}``.

    A typed message (see :func:`is_typed`) passes through unchanged once its
    value is checked against its type. Anything else is wrapped by inference:
    None → null, bool → boolean (checked before int: True is not 1 here),
    int → integer, float → float, str → string, list/tuple → array,
    dict → object, bytes/bytearray/memoryview → bytes (value base64 text).
    A dict that merely looks typed but names an unknown type is an object.

    Raises:
        ValueError: NaN or infinity anywhere; a typed message whose value does
            not fit its type (``{"type": "integer", "value": "x"}``); a value
            that is not JSON (non-str keys, nested bytes, other objects).
    """
    if value is None:
        return {"type": "null", "value": None}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int):
        return {"type": "integer", "value": value}
    if isinstance(value, float):
        if value - value != 0:
            raise ValueError("NaN and infinity are not JSON")
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, dict):
        if is_typed(value):
            _validate_typed(value["type"], value["value"])
            return value
        _require_json(value)
        return {"type": "object", "value": value}
    if isinstance(value, (list, tuple)):
        _require_json(value)
        return {"type": "array", "value": list(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "bytes", "value": base64.b64encode(value).decode("ascii")}
    raise ValueError(f"cannot send a {type(value).__name__} as a message")


def unwrap(msg: Any) -> Any:
    """A typed message's plain value.

    bytes → ``bytes`` (decoded from base64); error → ``{"message", "code"}``
    (code None when absent); float → ``float`` even when written as an int;
    the others → the value itself. A value that is not typed is returned
    unchanged: under inference a plain value stands for itself.

    Raises:
        ValueError: a bytes message whose value is not base64 text, or a
            float/error message whose value does not fit (as :func:`wrap`).
    """
    if not is_typed(msg):
        return msg
    t, v = msg["type"], msg["value"]
    if t == "bytes":
        if isinstance(v, Blob):
            return bytes(v.data)
        if not isinstance(v, str):
            raise ValueError(f"a bytes message carries base64 text, not {type(v).__name__}")
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"a bytes message carries base64 text: {exc}") from None
    if t == "float":
        if isinstance(v, int) and not isinstance(v, bool):
            _validate_typed(t, v)
            return float(v)
        return v
    if t == "error":
        _validate_typed(t, v)
        return {"message": v["message"], "code": v.get("code")}
    return v
