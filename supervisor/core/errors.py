"""What can go wrong, named after what happened, and its JSON-RPC code.

Every error a caller can see is an :class:`ActorError` subclass carrying a
JSON-RPC ``code`` and JSON-safe ``data``: the classes' ``code`` attributes are
the one error→code table (CONTRACT §4, like h11's ``error_status_hint``), and
:func:`rpc_error` is the one place that turns any exception into the
``(code, message, data)`` of the error object that answers for it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorError", "UnknownActor", "ActorRemoved", "ActorFailed", "ActorTimedOut", "Overloaded",
    "ResourceLimitExceeded", "Unauthorized", "ActorStopped", "InvalidParams", "RequestCancelled",
    "HostError", "answers_as_itself", "rpc_error", "single_error", "ActorMoved", "RemoteError",
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


class ActorError(Exception):
    """Base of the errors a caller sees; ``code`` is its JSON-RPC error code."""

    code = INTERNAL_ERROR

    def __init__(self, message: str, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.data = data

    def to_error(self) -> dict[str, Any]:
        code, message, data = rpc_error(self)
        err: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        return err


class HostError(Exception):
    """The host cannot start as configured (exit code 2); the message says why."""


class InvalidParams(ActorError):
    code = INVALID_PARAMS


class UnknownActor(ActorError):
    code = UNKNOWN_ACTOR

    def __init__(self, name: object):
        super().__init__(f"unknown actor {name!r}", {"actor": name if isinstance(name, str) else None})


class ActorRemoved(UnknownActor):
    """The actor is no longer in the supervision tree (a temporary one that exited)."""

    def __init__(self, name: str, why: str):
        ActorError.__init__(self, f"unknown actor {name!r}: {why}", {"actor": name})


class ActorFailed(ActorError):
    """The script raised, or its sandbox died. ``data``: type, message, traceback or exit."""

    code = ACTOR_FAILED


class ActorStopped(ActorFailed):
    """The actor is not running (stopped, or its supervisor gave up)."""


class ActorMoved(ActorStopped):
    """The message had not started when its process moved to another host (a handoff, or
    this host lost the lease): it did nothing, so sending it again is safe."""

    def __init__(self, name: str, why: str):
        super().__init__(f"actor {name!r} moved before this message started ({why}); retry",
                         {"type": "ActorMoved", "actor": name})


class RemoteError(ActorError):
    """An error another host answered a forwarded request with, passed on as it came."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message, data)
        self.code = code


class ActorTimedOut(ActorError):
    code = TIMED_OUT


class Overloaded(ActorError):
    code = OVERLOADED


class ResourceLimitExceeded(ActorError):
    code = RESOURCE_LIMIT

    def __init__(self, limit: str, message: str | None = None):
        super().__init__(message or f"the actor exceeded its {limit} limit", {"limit": limit})
        self.limit = limit


class Unauthorized(ActorError):
    code = UNAUTHORIZED


class RequestCancelled(ActorError):
    code = REQUEST_CANCELLED


# Exception classes that carry the JSON-RPC error answering for them (``code``,
# ``message``, ``data``): ActorError here, and the client's RpcError (a handler raises it
# to answer with exactly the error the other side sent), registered by its module.
_CARRIERS: tuple[type[BaseException], ...] = (ActorError,)


def answers_as_itself(cls: type[BaseException]) -> type[BaseException]:
    """Register ``cls`` (instances have an int ``code``, a str ``message``, a JSON-safe
    ``data``) as answering with its own error; returns ``cls`` (usable as a decorator)."""
    global _CARRIERS
    if cls not in _CARRIERS:
        _CARRIERS = (*_CARRIERS, cls)
    return cls


def rpc_error(exc: BaseException) -> tuple[int, str, Any]:
    """The ``(code, message, data)`` of the JSON-RPC error that answers for ``exc``.

    An :class:`ActorError` (or a class registered with :func:`answers_as_itself`)
    answers with its own code, message and data. Anything else is a bug of ours:
    -32603 naming only its type, never its text or traceback (they may hold host
    paths or secrets); the caller logs it.
    """
    if isinstance(exc, _CARRIERS):
        return exc.code, exc.message, exc.data  # type: ignore[attr-defined]
    return INTERNAL_ERROR, f"internal error: {type(exc).__name__}", None


def single_error(group: BaseException) -> Exception | None:
    """The one real failure inside a (nested) exception group, ignoring cancellations; else None.

    trio wraps whatever leaves a nursery in an ExceptionGroup; at a task boundary
    the supervisor wants the failure itself, not the wrapper.
    """
    leaves: list[BaseException] = []
    todo = [group]
    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        elif not isinstance(e, (KeyboardInterrupt, SystemExit)) and type(e).__name__ != "Cancelled":
            leaves.append(e)
    if len(leaves) == 1 and isinstance(leaves[0], Exception):
        return leaves[0]
    return None

