"""The Reflow script-actor SDK, as seen from inside a sandbox.

``from reflow import actor, ActorContext, Message`` — see CONTRACT §3. State
calls are synchronous from the script's point of view: each one is a request
to the host over the sandbox channel, answered before the call returns, and
buffered by the host until the message that made it commits.

Kept to the standard library and lazy about imports: this module is loaded in
every warm worker before any script arrives, so its import cost is startup
latency.
"""

from __future__ import annotations

# No module-level imports beyond the interpreter's own: ``base64`` alone pulls in ``re``
# (which every cold start would pay for), ``math`` is a shared object to load. Bytes messages
# use ``binascii`` (what ``base64`` calls), imported when the first one is converted.

_INF = float("inf")

__all__ = ["actor", "ActorContext", "ActorState", "Message", "ActorError"]

# What the host carries exactly (supervisor/core/protocol.py, CONTRACT §4): integers in signed
# 64 bits, and values nested at most MAX_DEPTH levels (so that the host's answers carrying
# them stay within what a client may be sent). Anything else is a script error naming the
# limit, not a value that arrives changed (an integer beyond 64 bits as a float, say).
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
MAX_DEPTH = 120

_TYPES = frozenset(("integer", "float", "string", "boolean", "array", "object", "error", "bytes", "any", "null"))

# Set by the worker: a function (op, args) -> result that performs a state call on the host.
_state_call = None
# Set by the worker: a function (port, wire_message) -> None that streams an output.
_emit = None
_stop = None  # set by the worker: context.stop()
# Filled by @actor: the metadata and function of this file's actor.
_registry: list = []


class ActorError(Exception):
    """Raise it from a script to fail the message with a chosen message and code."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Message:
    """A typed value on a port: ``Message.integer(3)``, ``msg.unwrap()``, ``msg.type``."""

    __slots__ = ("type", "value")

    def __init__(self, type, value):
        if not isinstance(type, str) or type not in _TYPES:
            raise ValueError(f"unknown message type {type!r}")
        self.type = type
        self.value = value

    @classmethod
    def integer(cls, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"Message.integer needs an int, got {v!r}")
        if not INT_MIN <= v <= INT_MAX:
            raise ValueError(_out_of_range(v))
        return cls("integer", v)

    @classmethod
    def float(cls, v):
        v = float(v)
        if v != v or v in (_INF, -_INF):
            raise ValueError("Message.float cannot carry NaN or infinity (not JSON)")
        return cls("float", v)

    @classmethod
    def string(cls, v):
        return cls("string", str(v))

    @classmethod
    def boolean(cls, v):
        return cls("boolean", bool(v))

    @classmethod
    def array(cls, v):
        return cls("array", list(v))

    @classmethod
    def object(cls, v):
        return cls("object", dict(v))

    @classmethod
    def error(cls, message, code=None):
        return cls("error", {"message": str(message), "code": code})

    @classmethod
    def bytes(cls, v):
        """Any buffer (bytes, bytearray, memoryview, a NumPy array): sent without a copy."""
        return cls("bytes", v if isinstance(v, (bytes, bytearray, memoryview)) else memoryview(v))

    @classmethod
    def any(cls, v):
        return cls("any", v)

    @classmethod
    def null(cls):
        return cls("null", None)

    @classmethod
    def infer(cls, v):
        """Wrap a plain value by its Python type (bool before int: ``True`` is a boolean)."""
        if isinstance(v, Message):
            return v
        if v is None:
            return cls("null", None)
        if isinstance(v, bool):
            return cls("boolean", v)
        if isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                raise ValueError(_out_of_range(v))
            return cls("integer", v)
        if isinstance(v, float):
            return cls.float(v)
        if isinstance(v, str):
            return cls("string", v)
        if isinstance(v, (list, tuple)):
            return cls("array", list(v))
        if isinstance(v, dict):
            return cls("object", v)
        if isinstance(v, (bytes, bytearray, memoryview)):
            return cls("bytes", v)
        try:  # anything else with the buffer protocol (a NumPy array, array.array …)
            return cls("bytes", memoryview(v))
        except TypeError:
            pass
        raise TypeError(f"cannot send a {type(v).__name__} as a message; use plain JSON values or Message.*")

    def unwrap(self):
        return self.value

    def is_error(self):
        return self.type == "error"

    def to_wire(self):
        if self.type == "bytes":
            return {"type": "bytes", "value": _b64encode(self.value)}
        return {"type": self.type, "value": _plain(self.value)}

    @classmethod
    def from_wire(cls, w):
        t = w.get("type") if isinstance(w, dict) else None
        if not isinstance(t, str) or t not in _TYPES or "value" not in w or len(w) != 2:
            return cls.infer(w)
        if t == "bytes":  # input bytes are read-only memoryviews, however they travelled
            return cls("bytes", memoryview(_b64decode(w["value"])).toreadonly())
        return cls(t, w["value"])

    def __eq__(self, other):
        return isinstance(other, Message) and other.type == self.type and other.value == self.value

    def __hash__(self):
        return hash((self.type, repr(self.value)))

    def __repr__(self):
        return f"Message.{self.type}({self.value!r})"


def _out_of_range(v):
    digits = str(v)
    shown = digits if len(digits) <= 24 else f"{digits[:10]}...({len(digits)} digits)"
    return (f"integer {shown} is out of range: messages and state carry integers from {INT_MIN} to {INT_MAX} "
            "(signed 64-bit); send larger ones as strings")


def check_limits(v, depth=MAX_DEPTH):
    """Raise ValueError naming the limit if ``v`` holds an integer outside INT_MIN..INT_MAX
    or nests deeper than ``depth`` levels (``v`` itself counted). Iterative: any depth."""
    stack = [(v, 1)]
    while stack:
        x, level = stack.pop()
        if isinstance(x, dict):
            items = x.values()
        elif isinstance(x, (list, tuple)):
            items = x
        else:
            if isinstance(x, int) and not isinstance(x, bool) and not INT_MIN <= x <= INT_MAX:
                raise ValueError(_out_of_range(x))
            continue
        if level > depth:
            raise ValueError(f"a value nested deeper than {MAX_DEPTH} levels cannot be sent")
        stack.extend((y, level + 1) for y in items)


def _plain(v):
    """Make a value JSON-ready: nested Messages unwrap, tuples become lists, bytes base64."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Message):
        return v.to_wire()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return _b64encode(bytes(v))
    raise TypeError(f"cannot send a {type(v).__name__} as a message value")


def _b64encode(v):
    """``base64.b64encode(v).decode("ascii")`` without importing ``base64``."""
    import binascii

    return binascii.b2a_base64(v, newline=False).decode("ascii")


def _b64decode(s):
    """``base64.b64decode(s)`` (non-alphabet characters skipped; ``binascii.Error``, a
    ValueError, on bad padding) without importing ``base64``."""
    import binascii

    return binascii.a2b_base64(s)


class ActorState:
    """This process's state in Redis; every call returns its value directly."""

    __slots__ = ()

    def get(self, key, default=None):
        v = _state_call("get", [key])
        return default if v is None else v

    def set(self, key, value):
        _state_call("set", [key, _plain(value)])

    def delete(self, key):
        return _state_call("delete", [key])

    def exists(self, key):
        return _state_call("exists", [key])

    def increment(self, key, by=1):
        return _state_call("increment", [key, by])

    def decrement(self, key, by=1):
        return _state_call("increment", [key, -by])

    def push(self, key, value):
        return _state_call("push", [key, _plain(value)])

    def pop(self, key):
        return _state_call("pop", [key])

    def extend(self, key, values):
        return _state_call("extend", [key, _plain(list(values))])

    def expire(self, key, seconds):
        return _state_call("expire", [key, seconds])

    def ttl(self, key):
        return _state_call("ttl", [key])

    def keys(self, pattern="*"):
        return _state_call("keys", [pattern])

    def __getitem__(self, key):
        return self.get(key)

    def __setitem__(self, key, value):
        self.set(key, value)


_STATE = ActorState()  # (it holds nothing: one serves every message)


class _Done:
    """An awaitable that is already complete, so ``send_output`` works with or without ``await``."""

    __slots__ = ()

    def __await__(self):
        return
        yield  # pragma: no cover - makes this a generator


_DONE = _Done()


class ActorContext:
    """What a script is given for one message."""

    __slots__ = ("_payload", "_config", "_actor_id", "_timestamp", "_outputs", "_state")

    def __init__(self, payload, config, actor_id, timestamp):
        self._payload = payload
        self._config = config
        self._actor_id = actor_id
        self._timestamp = timestamp
        self._outputs = {}
        self._state = _STATE

    def get_payload(self):
        """``{port: Message}`` of this message's inputs."""
        return self._payload

    @property
    def payload(self):
        return self._payload

    def get_input(self, port, default=None):
        """The plain value on ``port`` (``Message.unwrap()``), or ``default``."""
        m = self._payload.get(port)
        return default if m is None else m.value

    def has_input(self, port):
        return port in self._payload

    def get_config(self):
        return self._config

    @property
    def config(self):
        return self._config

    def get_state(self):
        return self._state

    @property
    def state(self):
        return self._state

    def send_output(self, port, value):
        """Stream ``value`` out of ``port`` now, before the function returns."""
        msg = Message.infer(value)
        self._outputs[port] = msg
        _emit(port, msg)
        return _DONE

    def get_outputs(self):
        return dict(self._outputs)

    def stop(self, reason=None):
        """Stop this actor normally once this message is answered (OTP's ``{stop, normal,
        Reply, State}``): what the function returns is still the message's outputs and its
        state changes commit. A ``transient`` or ``temporary`` actor is then not restarted;
        a ``permanent`` one is. ``sys.exit()``/``sys.exit(0)`` during a message does the
        same with no outputs; any other exit status is a crash."""
        _stop("context.stop()" if reason is None else str(reason))

    def timestamp(self):
        return self._timestamp

    def actor_id(self):
        return self._actor_id


def actor(name=None, inports=(), outports=(), **meta):
    """Declare this file's actor. The host reads these arguments statically."""

    def register(fn):
        fn.__reflow_actor__ = {"name": name, "inports": list(inports), "outports": list(outports), **meta}
        _registry.append(fn)
        return fn

    if callable(name) and not inports and not outports and not meta:  # bare @actor
        fn, name = name, name.__name__
        return register(fn)
    return register


# A process's first compile() costs far more than the next ones (it builds the AST types
# and faults in the parser). This module is imported by every worker before it says
# ready: pay it now, in the cold start, rather than in the `load` a warm worker is taken for.
compile("", "<reflow warm-up>", "exec")
