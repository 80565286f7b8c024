"""The host⇄worker frame protocol, read from the host's side, with no I/O.

A worker answers the host's request (``process``, ``load``) with frames on its channel:
notifications ``output`` and ``log``, requests ``state`` the host serves meanwhile, and
then the reply to that request. A worker runs an untrusted script that can write any
bytes to its channel, so every frame is judged before the host acts on it.
:class:`RequestReader` is that judgement for one request: fed each frame (its JSON line,
its attachments, the bytes read so far for the request), it answers with one typed event
— a :class:`Reply`, an :class:`Output`, a :class:`StateCall`, a :class:`Log`, nothing
(``None``: a line past the log cap, an output nobody waits for) — or with why the worker
must end: :class:`OverLimit` (it sent more than one request allows: the output limit) or
:class:`Violation` (a frame that is not the protocol). It never raises for what a worker
sent; the shell (``supervisor._cell``) kills the worker and fails its message.

Bytes messages arrive as references: ``{"type": "bytes", "$att": k}`` names attachment k
of the same frame, ``{"type": "bytes", "$shm": ref}`` a slot of the worker's shared-memory
ring. Reading a slot is I/O on a mapping the shell owns, so it comes in as a callable
(``take_shm``) that raises :class:`BadReference` for a reference naming no current slot.

What one request may make its worker send, besides ``max_output`` bytes in all: each
output is routed and kept with the message, each state call is Redis work, each log line
a line of the host's log. The caps are well past what a script does on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import orjson

from .protocol import Blob, is_typed

__all__ = [
    "BadReference", "Log", "MAX_LOG_LINES", "MAX_OUTPUTS", "MAX_STATE_CALLS", "Output", "OverLimit", "Reply",
    "RequestReader", "StateCall", "VALUES_PER_OUTPUT_BYTE", "Violation", "json_values", "max_values_for",
    "resolve_bytes",
]

MAX_OUTPUTS = 10_000
MAX_STATE_CALLS = 10_000
MAX_LOG_LINES = 1_000
# JSON values one message's frames may hold, per byte of ``max_output``: parsing makes
# ~100 bytes per value (a dict, a list, a str), so a frame of ``[{},{},…]`` would make
# ~30 times its length; at 1/32 a value per byte that is ~3 × max_output at most.
VALUES_PER_OUTPUT_BYTE = 1 / 32
LOG_TEXT_MAX = 512  # characters of one log line the host keeps

_STRUCTURE = b",[{"
# A JSON string, escapes and all (possessive: linear, no backtracking).
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')


def max_values_for(max_output: int) -> int:
    """The JSON values one request's frames may hold, for a ``max_output`` byte budget."""
    return max(4096, int(max_output * VALUES_PER_OUTPUT_BYTE))


def json_values(frame: bytes | bytearray, *, exact: bool = False) -> int:
    """An upper bound on the number of values (containers, numbers, strings, literals)
    parsing ``frame`` as JSON makes: one more than its commas and opening brackets.

    What a parse allocates is about its length plus some 100 bytes per value, so this
    bounds what a frame can inflate to before anything is allocated for it. The quick
    count (one C pass) also counts commas and brackets inside strings; ``exact``
    first drops the strings' contents (a slower regex pass), for a frame whose quick
    count is over the budget. Never raises: a frame
    that is not JSON gets some count and fails its parse later.
    """
    if exact:
        frame = _STRING.sub(b'""', frame)
    return len(frame) - len(frame.translate(None, _STRUCTURE)) + 1


class BadReference(Exception):
    """A ``$shm`` reference that names no whole, current slot of the worker's ring; the
    message says why (what ``take_shm`` raises)."""


# -- what a frame is ------------------------------------------------------------------------------

@attrs.frozen
class Reply:
    """The reply to the pending request: ``message`` is the JSON-RPC reply object, its
    ``result.outputs`` (when a dict) with every bytes reference resolved."""

    message: dict


@attrs.frozen
class Output:
    """An ``output`` notification: a port name and a typed message (references resolved)."""

    port: str
    message: dict


@attrs.frozen
class StateCall:
    """A ``state`` request to serve: answer ``id`` with the result of ``params``."""

    id: Any
    params: dict


@attrs.frozen
class Log:
    """A ``log`` line of the script; ``last``: the request's further lines are dropped."""

    stream: Any
    text: str
    last: bool


@attrs.frozen
class OverLimit:
    """The worker sent more than one request allows: it ends with the output limit."""

    reason: str


@attrs.frozen
class Violation:
    """A frame that is not the protocol: the worker ends and its message fails (-32002)."""

    reason: str


Event = Reply | Output | StateCall | Log | OverLimit | Violation | None


def resolve_bytes(message: Any, attachments: Sequence[bytes],
                  take_shm: Callable[[Any], bytes] | None) -> Any:
    """``message`` with a bytes reference resolved to the bytes it names.

    ``{"type": "bytes", "$att": k}`` → a bytes message holding ``attachments[k]``;
    ``{"type": "bytes", "$shm": ref}`` → one holding ``take_shm(ref)``; anything else is
    returned as it is (its shape is judged by whoever takes it).

    Raises:
        BadReference: a reference that names nothing (an attachment index out of range
            or not an int, a ``$shm`` from a worker without a ring, a stale slot).
    """
    if not isinstance(message, dict) or len(message) != 2 or message.get("type") != "bytes":
        return message
    if "$shm" in message:
        if take_shm is None:
            raise BadReference("a shared-memory reference from a worker that has none")
        return {"type": "bytes", "value": Blob(take_shm(message["$shm"]))}
    if "$att" not in message:
        return message
    k = message["$att"]
    if type(k) is not int or not 0 <= k < len(attachments):
        raise BadReference("an attachment reference that names no attachment")
    return {"type": "bytes", "value": Blob(attachments[k])}


@attrs.define
class RequestReader:
    """Judges the frames a worker sends while one request of the host (id ``rid``) is
    pending, in arrival order, against that request's budget.

    ``max_output`` bounds the bytes of all its frames (attachments included), ``max_values``
    the JSON values they may parse into (see :func:`json_values`), and ``max_outputs``,
    ``max_state_calls``, ``max_log_lines`` how many of each it may send; a frame past
    a bound is :class:`OverLimit` (a log line past its cap is only dropped). ``outputs``
    False: outputs are counted, not read (a request no message waits on).
    """

    rid: int
    max_output: int
    max_values: int
    take_shm: Callable[[Any], bytes] | None = None
    outputs: bool = True
    max_outputs: int = MAX_OUTPUTS
    max_state_calls: int = MAX_STATE_CALLS
    max_log_lines: int = MAX_LOG_LINES
    _values: int = attrs.field(init=False)
    _outputs_left: int = attrs.field(init=False)
    _states_left: int = attrs.field(init=False)
    _logs_left: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._values = self.max_values
        self._outputs_left = self.max_outputs
        self._states_left = self.max_state_calls
        self._logs_left = self.max_log_lines

    def feed(self, frame: bytes, attachments: Sequence[bytes] = (), received: int = 0) -> Event:
        """What the next frame is. ``frame`` is its JSON line, ``attachments`` its raw
        attachments, ``received`` the bytes read for this request so far, this frame's
        included. Never raises for what the worker sent."""
        if received > self.max_output:
            return OverLimit(f"more than {self.max_output} bytes for one request")
        n = len(frame) - len(frame.translate(None, _STRUCTURE)) + 1  # json_values(frame), inlined
        if n > self._values:  # (the quick count also counts commas inside strings)
            n = json_values(frame, exact=True)
            if n > self._values:
                return OverLimit(f"more than {self.max_values} JSON values for one request")
        self._values -= n
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            return Violation(f"a frame that is not JSON ({exc})")
        if not isinstance(msg, dict):
            return Violation("a frame that is not a JSON object")
        method = msg.get("method")
        if method is None:
            return self._reply(msg, attachments)
        params = msg.get("params")
        if not isinstance(params, dict):
            params = {}
        if method == "state":
            self._states_left -= 1
            if self._states_left < 0:
                return OverLimit(f"more than {self.max_state_calls} state calls for one request")
            return StateCall(msg.get("id"), params)
        if method == "output":
            self._outputs_left -= 1
            if self._outputs_left < 0:
                return OverLimit(f"more than {self.max_outputs} outputs for one request")
            if not self.outputs:
                return None
            port = params.get("port")
            try:
                message = resolve_bytes(params.get("message"), attachments, self.take_shm)
            except BadReference as exc:
                return Violation(str(exc))
            if not isinstance(port, str) or not is_typed(message):
                return Violation("an output that is not a port name and a typed message")
            return Output(port, message)
        if method == "log":
            self._logs_left -= 1
            if self._logs_left < 0:
                return None
            return Log(params.get("stream"), str(params.get("text"))[:LOG_TEXT_MAX], self._logs_left == 0)
        return Violation(f"a request for {str(method)[:40]!r}, which the host does not serve")

    def _reply(self, msg: dict, attachments: Sequence[bytes]) -> Reply | Violation:
        if msg.get("id") != self.rid:
            # The worker answers in order and the host serves no other request of
            # its: a reply to anything else is no reply a worker sends.
            return Violation(f"a reply to request {str(msg.get('id'))[:40]!r} while request {self.rid} was pending")
        if not isinstance(msg.get("error", {}), dict) or not isinstance(msg.get("result", {}), dict):
            return Violation("a reply whose result or error is not an object")
        outputs = (msg.get("result") or {}).get("outputs")
        if isinstance(outputs, dict):
            try:
                for port, message in outputs.items():
                    outputs[port] = resolve_bytes(message, attachments, self.take_shm)
            except BadReference as exc:
                return Violation(str(exc))
        return Reply(msg)
