"""The messages that cross the middle of the host: what a process is (``ProcessSpec``) and
one message for a cell with its one-shot answer (``Envelope``), and its commit on the way
to Redis (``Commit``).

Pure data shared by the server, the host, the cells and the mailboxes, kept apart so that
none of them has to import another to name a message (no import circle). Nothing here does
I/O or waits: a sender hears the answer through ``Envelope.on_done`` (the server's
``wait_for`` turns that into a trio event). The one clock read is the import-time tag that
keeps message ids unique across host restarts; no decision depends on it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from .errors import ActorError

if TYPE_CHECKING:
    from .discovery import ComponentSpec


class PendingReply(Protocol):
    """What a commit waits on: a Redis reply that may not be in yet (``_redis.Reply``)."""

    @property
    def ready(self) -> bool: ...

__all__ = ["Commit", "Envelope", "NOTHING_TO_COMMIT", "ProcessSpec", "new_message_id"]

_message_ids = itertools.count(1)
_run_tag = f"{int(time.time() * 1000):x}"  # message ids stay unique across host restarts


@attrs.frozen
class ProcessSpec:
    """A process of the network: a component, its config and its supervision settings."""

    name: str
    component: ComponentSpec
    config: dict = attrs.field(factory=dict)
    restart: str = "permanent"
    timeout: float | None = None
    max_deliveries: int = 5
    memory: int | None = None


def new_message_id() -> str:
    return f"m{next(_message_ids)}-{_run_tag}"


@attrs.define(eq=False)
class Envelope:
    """One message for a cell and the one-shot answer its sender waits for."""

    inputs: dict[str, Any]                      # port -> typed wire message
    message_id: str = attrs.field(factory=new_message_id)
    on_output: Callable[[str, dict], None] | None = None
    config: dict | None = None
    outputs: dict | None = None
    emitted: list = attrs.field(factory=list)
    error: ActorError | None = None
    stream_id: bytes | None = None              # set for messages from the durable inbox
    attempts: int = 0
    outage: bool = False                        # a state call met Redis unavailable
    body: bytes | None = None                   # its entry's body: set for every durable message
    claim: PendingReply | None = None           # started before Redis confirmed its add (see start_now)
    shm_end: int = 0                            # its inputs' end in the worker's inbound ring
    finished: bool = False
    # Called once, when the message is answered: how its sender hears, with no task
    # waiting on an event (a request answered from a callback costs the host far less).
    on_done: Callable[[], None] | None = None

    @property
    def durable(self) -> bool:
        return self.body is not None

    def resolve(self, outputs: dict) -> None:
        if not self.finished:
            self.outputs = outputs
            self._finish()

    def fail(self, error: ActorError) -> None:
        if not self.finished:
            self.error = error
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        done, self.on_done = self.on_done, None
        if done is not None:
            done()

    def result(self) -> dict:
        """The answer of a finished message.

        Raises:
            ActorError: the message failed.
        """
        if self.error is not None:
            raise self.error
        return {"message_id": self.message_id, "outputs": self.outputs,
                "emitted": [{"port": p, "message": m} for p, m in self.emitted]}


@attrs.frozen
class Commit:
    """A message's commit on its way: ``finish()`` waits for Redis's answer, then routes
    what follows from it; ``ready`` says whether that answer is in (no Redis: always).
    ``finish`` is None when there is nothing to wait for or route (a call on a memory
    host whose outputs go nowhere): no coroutine to run per message then."""

    reply: PendingReply | None
    finish: Callable[[], Awaitable[None]] | None

    @property
    def ready(self) -> bool:
        return self.reply is None or self.reply.ready


NOTHING_TO_COMMIT = Commit(None, None)
