"""What can go wrong, named after what happened, and its JSON-RPC code.

Every error a caller can see is an :class:`ActorError` subclass carrying a
JSON-RPC ``code`` and JSON-safe ``data``; :func:`rpc_error` is the one place
that maps exceptions to error objects (like h11's ``error_status_hint``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorError", "UnknownActor", "ActorRemoved", "ActorFailed", "ActorTimedOut", "Overloaded",
    "ResourceLimitExceeded", "Unauthorized", "ActorStopped", "InvalidParams", "RequestCancelled",
    "HostError", "single_error",
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
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
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

