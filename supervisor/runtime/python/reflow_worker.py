"""The in-sandbox Python worker: say ready, load one script, serve its messages.

Runs as ``python3 -I -S -B reflow_worker.py LIMITS_JSON FD`` inside the
sandbox. Talks newline-delimited JSON-RPC 2.0 over the inherited socket FD.
Stays on the standard library and imports lazily (``asyncio`` is a heavy import):
a script's coroutine is driven directly unless the script uses asyncio.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reflow  # noqa: E402


def _json_codec():
    """(dumps, loads) with the output of ``json.JSONEncoder(ensure_ascii=False,
    separators=(",", ":"), allow_nan=False).encode`` and ``json.loads``, straight on the
    C accelerator ``_json``: ``import json`` pulls in ``re`` (its decoder and encoder
    compile regexes at import), which every cold start would pay for. Falls back to ``json`` where
    ``_json`` is missing or differs."""
    try:
        import _json

        def fail(o):
            raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

        def encoder():
            return _json.make_encoder({}, fail, _json.encode_basestring, None, ":", ",", False, False, False)

        enc = [encoder()]

        def dumps(obj):
            if isinstance(obj, str):
                return _json.encode_basestring(obj)
            try:
                return "".join(enc[0](obj, 0))
            except BaseException:
                enc[0] = encoder()  # (its circular-reference markers may keep what this call left)
                raise

        class _Context:  # what the C scanner reads off a JSONDecoder
            strict = True
            object_hook = object_pairs_hook = None
            parse_float, parse_int = float, int
            parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__

        scan = _json.make_scanner(_Context())
        ws = " \t\n\r"

        def loads(data):
            s = data if isinstance(data, str) else data.decode("utf-8")  # (str, bytes, bytearray)
            try:
                obj, end = scan(s, 0 if s[:1] == "{" else len(s) - len(s.lstrip(ws)))
            except StopIteration as stop:
                raise ValueError(f"Expecting value at char {stop.value}") from None
            if end != len(s) and s[end:].strip(ws):
                raise ValueError(f"Extra data at char {end}")
            return obj

        if dumps({"a": [1, 2.5, "\u00e9\n", None, True]}) == '{"a":[1,2.5,"\u00e9\\n",null,true]}' \
                and loads(b' {"a": [1, 2.5, "\\u00e9", null]} ') == {"a": [1, 2.5, "\u00e9", None]}:
            return dumps, loads
    except Exception:  # noqa: BLE001 - any surprise: the slow, certain way
        pass
    import json

    return json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode, json.loads


_dumps, _loads = _json_codec()

# A frame wraps a value in at most this many levels (a reply: the frame, result, outputs,
# the message; a state call: the frame, params, args).
_FRAME_LEVELS = 4
# Digits as "0", brackets as "[": two counts of one C pass say whether a frame may break
# reflow's limits (an integer beyond 64 bits has 19 digits; deep nesting as many brackets).
_MARKS = bytes(48 if 48 <= i <= 57 else 91 if i in (91, 123) else 32 for i in range(256))
_DIGIT_RUN = b"0" * 19


def _check_frame(obj, data):
    """Raise ValueError (naming the limit) if the frame ``obj``, encoded as ``data``, holds
    an integer the host cannot carry exactly or nests too deep: checked only where the
    bytes say it may (nearly never), so a small frame pays two counts."""
    marks = data.translate(_MARKS)
    if (marks.count(48) >= 19 and marks.find(_DIGIT_RUN) >= 0) \
            or marks.count(91) > reflow.MAX_DEPTH + _FRAME_LEVELS:
        reflow.check_limits(obj, reflow.MAX_DEPTH + _FRAME_LEVELS)


def _apply_limits(limits):
    import resource

    def cap(which, value):
        if value is None:
            return
        value = int(value)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_AS, limits.get("memory"))
    cpu = limits.get("cpu_seconds")
    if cpu:
        soft = max(1, int(cpu))
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
        except (ValueError, OSError):
            pass
    cap(resource.RLIMIT_NOFILE, limits.get("nofile"))
    cap(resource.RLIMIT_FSIZE, limits.get("fsize"))
    if os.getuid() != 0:  # RLIMIT_NPROC counts every process of the uid: meaningless for root
        cap(resource.RLIMIT_NPROC, limits.get("nproc"))


class Channel:
    """Frames on the inherited socket: one JSON object per line; a line ``@LEN,… JSON`` is
    followed by that many raw bytes per attachment (bytes payloads, no base64)."""

    def __init__(self, fd, out_fd=None, attachments=True):
        self.fd = fd
        self.out_fd = fd if out_fd is None else out_fd
        self.attachments = attachments
        self.buf = bytearray()
        self.rbuf = bytearray(1 << 18)
        self.rview = memoryview(self.rbuf)
        self.pending = []  # frames read while waiting for a specific reply
        self.held = []  # replies held back while the next request is already here

    def send(self, obj, atts=None, hold=False):
        """Write a frame. ``hold``: the host has already sent the next request, so this reply
        may wait and go out with whatever is written next (one write, one wake-up for both);
        held frames are flushed before any blocking read."""
        try:
            data = _dumps(obj).encode()
        except RecursionError:
            raise ValueError(f"a value nested deeper than {reflow.MAX_DEPTH} levels cannot be sent") from None
        _check_frame(obj, data)
        if not atts:
            if hold and len(self.held) < 16:
                self.held.append(data + b"\n")
                return None
            if not self.held:
                return self._write_one(data + b"\n")
            return self._write([*self._take_held(), data + b"\n"])
        views = [memoryview(a).cast("B") if memoryview(a).ndim != 1 or memoryview(a).format != "B"
                 else memoryview(a) for a in atts]
        head = b"@" + b",".join(b"%d" % v.nbytes for v in views) + b" " + data + b"\n"
        self._write([*self._take_held(), head, *views])

    def _take_held(self):
        held, self.held = self.held, []
        return held

    def flush(self):
        if self.held:
            self._write(self._take_held())

    def has_frame(self):
        """Whether a whole request is already here (read, or set aside)."""
        return bool(self.pending) or self.buf.find(b"\n") >= 0

    def _write_one(self, data):
        n = os.write(self.out_fd, data)
        if n < len(data):
            self._write([memoryview(data)[n:]])

    def _write(self, bufs):
        bufs = [memoryview(b) for b in bufs]
        while bufs:
            n = os.writev(self.out_fd, bufs[:1024])
            while bufs and n >= bufs[0].nbytes:
                n -= bufs[0].nbytes
                bufs.pop(0)
            if n:
                bufs[0] = bufs[0][n:]

    def receive(self):
        if self.pending:
            return self.pending.pop(0)
        return self.receive_new()

    def receive_new(self):
        """The next frame off the wire (not one set aside in ``pending``)."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                if self.buf[0] == 64:  # b"@"
                    return self._attached(i)
                line = self.buf[:i]
                del self.buf[:i + 1]
                return _loads(line)
            self._read()

    def _read(self):
        self.flush()
        # Into one buffer kept for the worker's life: os.read(fd, 256 KiB) allocates that
        # much per call, which glibc maps, shrinks and unmaps again (three system calls
        # and fresh zeroed pages on every message).
        n = os.readv(self.fd, [self.rbuf])
        if not n:
            raise EOFError
        self.buf += self.rview[:n]

    def _attached(self, i):
        sp = self.buf.find(b" ", 0, i)
        sizes = [int(x) for x in bytes(self.buf[1:sp]).split(b",")]
        msg = _loads(bytes(self.buf[sp + 1:i]))
        del self.buf[:i + 1]
        atts = []
        for n in sizes:  # each straight into its own buffer: one copy, from the socket
            att = bytearray(n)
            have = min(n, len(self.buf))
            att[:have] = self.buf[:have]
            del self.buf[:have]
            view = memoryview(att)
            while have < n:
                got = os.readv(self.fd, [view[have:]])
                if not got:
                    raise EOFError
                have += got
            atts.append(view.toreadonly())
        msg["_atts"] = atts
        return msg


class _Shm:
    """This worker's two shared-memory regions (see supervisor/_shm.py, whose layout this
    repeats: the sandbox has only the standard library). ``in``: the host's payloads,
    mapped read-only; ``out``: ours, a ring the host copies out of and marks consumed."""

    def __init__(self, spec):
        import mmap

        self.size, self.threshold = spec["size"], spec["threshold"]
        self.inbound = memoryview(mmap.mmap(spec["in"], self.size, prot=mmap.PROT_READ))
        self.out = memoryview(mmap.mmap(spec["out"], self.size))
        os.close(spec["in"])
        os.close(spec["out"])
        self.cap = self.size - 64
        self.head = self.seq = 0

    def view(self, ref):
        off, n, seq, _end = ref
        h = self.inbound[off - 16:off]
        if int.from_bytes(h[:8], "little") != seq or int.from_bytes(h[8:], "little") != n:
            raise RuntimeError("shared-memory slot does not match its reference")
        return self.inbound[off:off + n]

    def put(self, data):
        """Our bytes into the ``out`` ring: the reference, or None when they do not fit now."""
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        n = view.nbytes
        total = (16 + n + 63) & ~63
        pos = self.head % self.cap
        pad = self.cap - pos if pos + total > self.cap else 0
        consumed = int.from_bytes(self.out[:8], "little")
        if total > self.cap or self.head + pad + total - consumed > self.cap:
            return None
        at = 64 + (0 if pad else pos)
        self.seq += 1
        self.out[at + 16:at + 16 + n] = view
        self.out[at:at + 16] = self.seq.to_bytes(8, "little") + n.to_bytes(8, "little")  # header last
        self.head += pad + total
        return [at + 16, n, self.seq, self.head]


class Worker:
    def __init__(self, chan):
        self.chan = chan
        self.fn = None
        self.filename = "actor.py"
        self.config = {}
        self.actor_id = None
        self.next_id = 0
        self.uses_asyncio = False
        self.loop = None
        self.current = None  # id of the message being processed
        self.result_atts = None  # attachments of the reply being built
        self.shm = None  # _Shm when the host gave this worker shared memory
        self.stop_reason = None  # set by context.stop() (or sys.exit(0)) while handling a message

    def request_stop(self, reason):
        if self.current is None or self.fn is None:
            raise RuntimeError("context.stop() is only available while handling a message")
        self.stop_reason = reason

    # -- calls from the script -------------------------------------------
    def state_call(self, op, args):
        self.next_id += 1
        rid = "s%d" % self.next_id
        self.chan.send({"jsonrpc": "2.0", "id": rid, "method": "state", "params": {"op": op, "args": args}})
        while True:
            msg = self.chan.receive_new()  # the host may already have sent the next message
            if msg.get("id") == rid and "method" not in msg:
                if "error" in msg:
                    err = msg["error"]
                    raise reflow.ActorError(err.get("message", "state call failed"), err.get("code"))
                return msg.get("result")
            if msg.get("method") == "shutdown":
                self.chan.flush()
                os._exit(0)
            self.chan.pending.append(msg)

    def emit(self, port, msg):
        atts = [] if self.chan.attachments else None
        wire = self.wire(msg, atts)
        self.chan.send({"jsonrpc": "2.0", "method": "output",
                        "params": {"id": self.current, "port": port, "message": wire}}, atts)

    def wire(self, msg, atts):
        """A Message for the channel: large bytes through shared memory where there is room,
        else as an attachment where the channel has them, else base64."""
        if msg.type == "bytes" and self.shm is not None and memoryview(msg.value).nbytes >= self.shm.threshold:
            ref = self.shm.put(msg.value)
            if ref is not None:
                return {"type": "bytes", "$shm": ref}
        if msg.type == "bytes" and atts is not None:
            atts.append(msg.value)
            return {"type": "bytes", "$att": len(atts) - 1}
        return msg.to_wire()

    # -- requests from the host ------------------------------------------
    def load(self, params):
        if params.get("limits"):
            _apply_limits(params["limits"])
        source = params["source"]
        self.filename = params.get("filename") or "actor.py"
        self.config = params.get("config") or {}
        self.actor_id = params.get("actor_id")
        self.uses_asyncio = "asyncio" in source
        code = compile(source, self.filename, "exec")
        module = type(sys)("__actor__")
        module.__file__ = self.filename
        sys.modules["__actor__"] = module
        exec(code, module.__dict__)  # noqa: S102 - this is the sandbox; running it is the point
        entry = params.get("entry")
        fn = reflow._registry[-1] if reflow._registry else module.__dict__.get(entry or "process")
        if fn is None or not callable(fn):
            raise RuntimeError(f"{self.filename} defines no @actor function and no process(context)")
        self.fn = fn
        return {}

    def process(self, params, atts=()):
        payload = {}
        for port, v in (params.get("payload") or {}).items():
            if isinstance(v, dict) and "$att" in v:  # read-only, zero-copy view of the attachment
                payload[port] = reflow.Message("bytes", atts[v["$att"]])
            elif isinstance(v, dict) and "$shm" in v:  # read-only view into the host's region
                payload[port] = reflow.Message("bytes", self.shm.view(v["$shm"]))
            else:
                payload[port] = reflow.Message.from_wire(v)
        config = params.get("config")
        ctx = reflow.ActorContext(payload, self.config if config is None else config,
                                  params.get("actor_id") or self.actor_id, params.get("timestamp"))
        result = self.fn(ctx)
        if hasattr(result, "__await__"):
            result = self.run_coroutine(result)
        return {"outputs": self.outputs(result, ctx)}, self.result_atts

    def run_coroutine(self, coro):
        if self.uses_asyncio:
            import asyncio

            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            return self.loop.run_until_complete(_as_coroutine(coro))
        if not hasattr(coro, "send"):
            coro = _as_coroutine(coro)
        try:
            while True:
                yielded = coro.send(None)
                if yielded is not None:
                    coro.throw(RuntimeError(
                        "the actor awaited something that needs an event loop; import asyncio in the script to get one"))
        except StopIteration as stop:
            return stop.value

    def outputs(self, result, ctx):
        atts = self.result_atts = [] if self.chan.attachments else None
        if result is None:
            return {}
        if isinstance(result, reflow.Message) and result.type == "error":  # `return Message.error(...)`
            raise reflow.ActorError(result.value.get("message"), result.value.get("code"))
        if isinstance(result, dict):
            return {str(port): self.wire(reflow.Message.infer(v), atts) for port, v in result.items()}
        fn_meta = getattr(self.fn, "__reflow_actor__", {})
        outs = fn_meta.get("outports") or []
        if len(outs) == 1:
            return {outs[0]: self.wire(reflow.Message.infer(result), atts)}
        raise TypeError(f"return a dict of port -> value, not a {type(result).__name__}")

    def error_data(self, exc):
        import traceback

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == self.filename]
        lines = [f'File "{f.filename}", line {f.lineno}, in {f.name}' + (f": {f.line}" if f.line else "")
                 for f in frames]
        if isinstance(exc, SyntaxError) and exc.filename == self.filename:
            lines.append(f'File "{exc.filename}", line {exc.lineno}')
        return {"type": type(exc).__name__, "message": str(exc), "traceback": lines}

    def serve(self):
        chan = self.chan
        while True:
            try:
                msg = chan.receive()
            except EOFError:
                return
            method = msg.get("method")
            rid = msg.get("id")
            if method == "shutdown":
                chan.flush()
                return
            if rid is None or method not in ("load", "process", "ping"):
                if rid is not None:
                    chan.send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"method not found: {method}"}})
                continue
            self.current = rid
            try:
                atts = None
                if method == "process":
                    self.result_atts = None
                    try:
                        result, atts = self.process(msg.get("params") or {}, msg.get("_atts") or ())
                    except SystemExit as exc:
                        if exc.code not in (None, 0):
                            raise  # any other status is a crash: the worker exits with it
                        # sys.exit(0) is a normal stop with what was sent so far (PROTOCOL.md)
                        self.stop_reason = self.stop_reason or "sys.exit(0)"
                        result, atts = {"outputs": {}}, None
                    if self.stop_reason is not None:
                        result["stop"] = self.stop_reason
                elif method == "load":
                    result = self.load(msg.get("params") or {})
                else:
                    result = {}
                stopping = self.stop_reason is not None
                chan.send({"jsonrpc": "2.0", "id": rid, "result": result}, atts,
                          hold=chan.has_frame() and not stopping)
                if stopping:
                    self.stopped()
                    return
            except MemoryError:
                self.fn = None
                chan.send({"jsonrpc": "2.0", "id": rid, "error": {
                    "code": -32005, "message": "memory limit exceeded", "data": {"limit": "memory"}}})
                os._exit(3)
            except Exception as exc:  # a script's failure is the message's, not the worker's
                self.stop_reason = None  # (a stop is honoured with a reply only: this is a failure)
                code = -32002
                data = self.error_data(exc)
                if isinstance(exc, reflow.ActorError) and exc.code is not None:
                    data["code"] = exc.code
                try:
                    chan.send({"jsonrpc": "2.0", "id": rid, "error": {
                        "code": code, "message": f"{data['type']}: {data['message']}", "data": data}})
                except ValueError:  # an unserialisable message in the traceback text
                    chan.send({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": data["type"]}})
            finally:
                self.current = None

    def stopped(self):
        """After a normal stop's reply: run nothing more (what the host sent ahead goes to
        the next worker) and exit 0 once the host closes the channel or says shutdown."""
        self.fn = None
        self.chan.flush()
        while True:
            try:
                msg = self.chan.receive()
            except EOFError:
                return
            if msg.get("method") == "shutdown":
                return


async def _as_coroutine(awaitable):
    return await awaitable


class _Stream:
    """sys.stdout/sys.stderr for scripts: text goes to the host's log as notifications."""

    def __init__(self, chan, name):
        self.chan, self.name = chan, name

    def write(self, text):
        if text:
            self.chan.send({"jsonrpc": "2.0", "method": "log", "params": {"stream": self.name, "text": text[:4096]}})
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


def main():
    limits = _loads(sys.argv[-2])
    _apply_limits(limits)
    if limits.get("packages"):  # the runtime's `packages:`, installed by the host, read-only
        sys.path.insert(1, limits["packages"])
    if sys.argv[-1] == "stdio":  # a microVM has no inherited fd: the channel is stdin/stdout
        chan = Channel(os.dup(0), os.dup(1), attachments=False)  # the exec stream carries text
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
    else:
        chan = Channel(int(sys.argv[-1]))
    worker = Worker(chan)
    if limits.get("shm"):
        worker.shm = _Shm(limits["shm"])
    reflow._state_call = worker.state_call
    reflow._emit = worker.emit
    reflow._stop = worker.request_stop
    sys.stdout = _Stream(chan, "stdout")
    sys.stderr = _Stream(chan, "stderr")
    chan.send({"jsonrpc": "2.0", "method": "ready", "params": {"runtime": "python", "pid": os.getpid(),
                                                                "attachments": chan.attachments}})
    try:
        worker.serve()
    except BrokenPipeError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
