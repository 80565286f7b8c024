"""JSON-RPC 2.0 as both ends of a connection speak it, pure (no I/O, no trio, no clock).

:mod:`._protocol` reads and writes the messages (``decode_frame`` never raises,
``encode``/``reply_frame`` refuse what is not JSON); this module holds what the
server (``_server.Connection``) and the client (``_peer.Peer``) would otherwise
each decide for themselves:

* the answers a request gets when it does not get its result: the error a
  method raised (:func:`error_reply`, the one place an exception becomes an
  error object), cancelled, method not found, a frame too large
  (:class:`FrameTooLarge`), a result that is not JSON (:func:`encodable`);
* which request a ``$/cancelRequest`` names (:func:`cancel_target`);
* on the calling side, the ids of our requests and which waiter each answer
  belongs to (:class:`Correlator`), and what an answer means to the caller
  (:func:`result_of`, raising :class:`RpcError`).

The wire (CONTRACT §4) is the server's as it was: the texts and ``data`` of
these errors are part of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from .errors import answers_as_itself, rpc_error
from .protocol import (INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, REQUEST_CANCELLED, ErrorResponse, Id,
                        Incoming, Invalid, Response, encode, error_response)

__all__ = ["CANCEL_METHOD", "Correlator", "FrameTooLarge", "RpcError", "cancel_target", "cancelled",
           "encodable", "error_reply", "internal_error", "method_not_found", "result_of"]

CANCEL_METHOD = "$/cancelRequest"

W = TypeVar("W")


# -- errors ------------------------------------------------------------------------------------

class RpcError(Exception):
    """The other side answered with a JSON-RPC error.

    A request handler raises it too, to answer with exactly this error.
    """

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{message} ({code})")
        self.code, self.message, self.data = code, message, data


answers_as_itself(RpcError)  # a handler raising it answers with exactly that error (errors.rpc_error)


class FrameTooLarge(Exception):
    """The other side sent a frame larger than we read (``size``: its bytes, or as many as
    were seen before giving up); the frame is not read, so framing is lost: answer it
    (:meth:`reply`) and close."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"frame of {size} bytes exceeds max_frame_size ({limit} bytes)")
        self.size, self.limit = size, limit

    def reply(self) -> ErrorResponse:
        """The answer (id null: the frame was not read), ``data.limit`` naming the limit."""
        return error_response(None, INVALID_REQUEST, str(self),
                              {"limit": "max_frame_size", "max": self.limit, "size": self.size})


# -- answers -----------------------------------------------------------------------------------

def error_reply(rid: Id, exc: BaseException) -> ErrorResponse | None:
    """The answer to request ``rid`` whose method raised ``exc``: the error's own code,
    message and data for the errors that carry them (``ActorError``, :class:`RpcError`);
    None for any other exception, a bug: answer it with :func:`internal_error` (and log it;
    its text is not sent, it may hold paths or secrets)."""
    code, message, data = rpc_error(exc)
    if code == INTERNAL_ERROR and not isinstance(exc, RpcError):
        return None
    return error_response(rid, code, message, data)


def internal_error(rid: Id, exc: BaseException) -> ErrorResponse:
    """-32603 for a bug of ours: it names the exception's type, nothing of its text."""
    return error_response(rid, *rpc_error(exc))


def cancelled(rid: Id) -> ErrorResponse:
    """The answer to a request a ``$/cancelRequest`` (or its connection's end) cancelled."""
    return error_response(rid, REQUEST_CANCELLED, "request cancelled")


def method_not_found(rid: Id, method: str) -> ErrorResponse:
    return error_response(rid, METHOD_NOT_FOUND, f"method not found: {method}")


def encodable(replies: Iterable[Response | ErrorResponse]) -> list[Response | ErrorResponse]:
    """``replies`` with each that cannot be written as JSON (NaN, an integer no encoder
    writes, a non-str key …) replaced by -32603 for that request alone; for when a reply
    frame could not be written (the others of a batch still go out)."""
    out: list[Response | ErrorResponse] = []
    for reply in replies:
        try:
            encode(reply)
        except (TypeError, ValueError) as exc:
            reply = error_response(reply.id, INTERNAL_ERROR, f"the result cannot be sent as JSON: {exc}")
        out.append(reply)
    return out


_NO_REQUEST: Any = object()


def cancel_target(params: Any) -> Any:
    """The id of the request a ``$/cancelRequest`` with these ``params`` cancels, or a
    sentinel no request id equals. Only ids a request can have count: ``true`` and
    ``1.0`` are not the id 1 (as they would be as keys of a Python dict), and an id that
    cannot be a key at all (an array) names nothing."""
    rid = params.get("id", _NO_REQUEST) if type(params) is dict else _NO_REQUEST
    if rid is None or type(rid) is int or type(rid) is str:
        return rid
    return _NO_REQUEST


# -- the calling side ----------------------------------------------------------------------------

class Correlator(Generic[W]):
    """Our requests' ids, and which waiter each answer belongs to.

    :meth:`issue` gives a waiter a fresh id; :meth:`resolve` hands back the waiter an
    incoming answer is for, once (a second answer, a late answer to a withdrawn call,
    an id we never sent, the id 1 written as "1" or 1.0: None). A malformed response
    (an ``Invalid`` with a readable id) resolves the call whose id it bears: that call
    gets an error instead of waiting forever. Ids are integers and never reused, so an
    answer can reach no waiter but its own.
    """

    __slots__ = ("_next", "_waiting")

    def __init__(self, first: int = 1):
        self._next = first
        self._waiting: dict[int, W] = {}

    def issue(self, waiter: W) -> int:
        """A new id for a request, whose answer ``waiter`` waits for."""
        rid = self._next
        self._next = rid + 1
        self._waiting[rid] = waiter
        return rid

    def resolve(self, item: Incoming) -> W | None:
        """The waiter ``item`` (a Response, an ErrorResponse or an Invalid) answers, no
        longer waiting; None if no one waits for it."""
        rid = getattr(item, "id", None)
        if type(rid) is not int:
            return None
        return self._waiting.pop(rid, None)

    def withdraw(self, rid: int, waiter: W) -> bool:
        """``waiter`` stops waiting for ``rid`` (its caller left); False if it was no longer
        waiting (answered, or the connection lost), so there is nothing to cancel."""
        if self._waiting.get(rid) is waiter:
            del self._waiting[rid]
            return True
        return False

    def drain(self) -> list[W]:
        """Every waiter still waiting (the connection is lost); none is left."""
        waiting, self._waiting = list(self._waiting.values()), {}
        return waiting

    @property
    def pending(self) -> tuple[int, ...]:
        """Ids still waiting for an answer, oldest first."""
        return tuple(self._waiting)


def result_of(reply: Response | ErrorResponse | Invalid) -> Any:
    """What an answer means to its caller: the result, or :class:`RpcError`.

    Raises:
        RpcError: the other side answered with an error (its code, message and data),
            or sent a malformed response (its -32600, saying so).
    """
    if type(reply) is Response:
        return reply.result
    if type(reply) is ErrorResponse:
        e = reply.error
        raise RpcError(e.code, e.message, e.data)
    if type(reply) is Invalid:
        raise RpcError(reply.error.code, f"the other side sent a malformed response: {reply.error.message}")
    raise TypeError(f"not an answer: {reply!r}")
