'use strict';
// The in-sandbox Node worker: say ready, load one script, serve its messages.
//
// Runs as `node reflow_worker.js LIMITS_JSON FD` (or `... LIMITS_JSON stdio` in
// a microVM) and speaks newline-delimited JSON-RPC 2.0 over the inherited
// socket, exactly like runtime/python/reflow_worker.py (see ../PROTOCOL.md).
//
// The channel is read with blocking fs.readSync on purpose: state calls must
// return their value synchronously to the script (the seed's
// `state.get("buffer", [])`), which no event-loop socket can do. The event
// loop still runs while an async actor function is awaited, so timers and
// promises inside a script work.

const fs = require('fs');
const path = require('path');
const vm = require('vm');
const Module = require('module');
const { Console } = require('console');
const { Writable } = require('stream');
const sdk = require('./reflow.js');

const { Message, ActorContext, ActorError } = sdk;

// The worker's own exits; process.exit itself is the script's (see Worker.scriptExit).
const realExit = process.exit.bind(process);

// Thrown by process.exit(0) in a script during a message: a normal stop (PROTOCOL.md).
class ExitSignal extends Error {}

// Node cannot set its own rlimits; the host applies them before exec (ulimit).
// argv[-2] is kept for symmetry with the Python worker and read for the record.
const LIMITS = JSON.parse(process.argv[process.argv.length - 2] || '{}');
const CHANNEL_ARG = process.argv[process.argv.length - 1];

class ChannelClosed extends Error {}

const sleeper = new Int32Array(new SharedArrayBuffer(4));

class Channel {
  constructor(inFd, outFd) {
    this.inFd = inFd;
    this.outFd = outFd;
    this.chunks = [];
    this.pending = []; // frames read while waiting for a specific reply
    this.readBuf = Buffer.allocUnsafe(1 << 18);
  }

  // One frame; with `atts` (Buffers) the line is `@LEN,… JSON` and the raw bytes follow
  // (bytes messages without base64; see supervisor/_channel.py).
  send(obj, atts) {
    const json = JSON.stringify(obj);
    if (!atts || !atts.length) return this.write(Buffer.from(json + '\n', 'utf8'));
    this.write(Buffer.from('@' + atts.map((a) => a.length).join(',') + ' ' + json + '\n', 'utf8'));
    for (const a of atts) this.write(a);
  }

  write(data) {
    let off = 0;
    while (off < data.length) {
      try {
        off += fs.writeSync(this.outFd, data, off, data.length - off);
      } catch (e) {
        if (e.code === 'EAGAIN') { Atomics.wait(sleeper, 0, 0, 1); continue; }
        if (e.code === 'EPIPE' || e.code === 'ECONNRESET') realExit(0);
        throw e;
      }
    }
  }

  receive() {
    if (this.pending.length) return this.pending.shift();
    return this.receiveNew();
  }

  // The next frame off the wire (not one set aside in `pending`).
  receiveNew() {
    for (;;) {
      const last = this.chunks.length ? this.chunks[this.chunks.length - 1] : null;
      const nl = last === null ? -1 : last.indexOf(10);
      if (nl >= 0) {
        const all = this.chunks.length === 1 ? last : Buffer.concat(this.chunks);
        const at = all.length - last.length + nl;
        const line = all.subarray(0, at);
        const rest = all.subarray(at + 1);
        this.chunks = rest.length ? [Buffer.from(rest)] : [];
        if (line[0] === 64) return this.attached(line); // '@': attachments follow
        return JSON.parse(line.toString('utf8'));
      }
      this.readMore();
    }
  }

  readMore() {
    for (;;) {
      let n;
      try {
        n = fs.readSync(this.inFd, this.readBuf, 0, this.readBuf.length, null);
      } catch (e) {
        if (e.code === 'EAGAIN') { Atomics.wait(sleeper, 0, 0, 1); continue; }
        if (e.code === 'EOF' || e.code === 'ECONNRESET') throw new ChannelClosed();
        throw e;
      }
      if (n === 0) throw new ChannelClosed();
      this.chunks.push(Buffer.from(this.readBuf.subarray(0, n)));
      return;
    }
  }

  attached(line) {
    const text = line.toString('utf8');
    const sp = text.indexOf(' ');
    const sizes = text.slice(1, sp).split(',').map(Number);
    const msg = JSON.parse(text.slice(sp + 1));
    const need = sizes.reduce((a, b) => a + b, 0);
    let have = this.chunks.reduce((a, c) => a + c.length, 0);
    while (have < need) { this.readMore(); have += this.chunks[this.chunks.length - 1].length; }
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const atts = [];
    let at = 0;
    for (const n of sizes) { atts.push(all.subarray(at, at + n)); at += n; }
    this.chunks = at < all.length ? [Buffer.from(all.subarray(at))] : [];
    msg._atts = atts;
    return msg;
  }
}

// The seed writes `@actor({...})` above a function. That is not JavaScript:
// the `@` becomes a space (line and column numbers stay as written), the
// call then declares the metadata, and a line appended after the last one
// binds the function that followed it. Scanning is hand-written because no
// maintained library parses "JavaScript plus one decorator line"; it only needs
// to skip strings, template literals and comments to find the closing paren.
const DECORATOR = /^([ \t]*)@actor\s*\(/m;

function closingParen(src, open) {
  let depth = 0;
  for (let i = open; i < src.length; i++) {
    const c = src[i];
    if (c === '"' || c === "'" || c === '`') {
      for (i++; i < src.length && src[i] !== c; i++) if (src[i] === '\\') i++;
    } else if (c === '/' && src[i + 1] === '/') {
      while (i < src.length && src[i] !== '\n') i++;
    } else if (c === '/' && src[i + 1] === '*') {
      const end = src.indexOf('*/', i + 2);
      i = end < 0 ? src.length : end + 1;
    } else if (c === '(' || c === '{' || c === '[') {
      depth++;
    } else if (c === ')' || c === '}' || c === ']') {
      depth--;
      if (depth === 0) return i;
    }
  }
  return -1;
}

const DECLARED = /^\s*(?:export\s+)?(?:(?:async\s+)?function\s*\*?\s*([A-Za-z_$][\w$]*)|(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*=)/;

function transformDecorators(src) {
  let out = src;
  const names = [];
  for (let m = DECORATOR.exec(out); m !== null; m = DECORATOR.exec(out)) {
    const at = m.index + m[1].length;
    out = out.slice(0, at) + ' ' + out.slice(at + 1); // "@actor(" -> " actor("
    const close = closingParen(out, out.indexOf('(', at));
    if (close < 0) break; // the compiler will report the unbalanced call with its line
    const decl = DECLARED.exec(out.slice(close + 1));
    if (decl) names.push(decl[1] || decl[2]);
  }
  if (!names.length) return out;
  const name = names[names.length - 1];
  return out + `\n;__reflowBind(typeof ${name} === 'function' ? ${name} : undefined);`;
}

// -- the worker ---------------------------------------------------------------

class Worker {
  constructor(chan) {
    this.chan = chan;
    this.fn = null;
    this.meta = {};
    this.filename = 'actor.js';
    this.config = {};
    this.actorId = null;
    this.nextId = 0;
    this.current = null; // id of the request being processed
    this.lines = [];
    this.stopReason = null; // set by context.stop() (or process.exit(0)) while handling a message
    this.inMessage = false; // a process request is running the script (not a load)
  }

  requestStop(reason) {
    if (!this.inMessage) throw new Error('context.stop() is only available while handling a message');
    this.stopReason = reason;
  }

  // process.exit for scripts: exit code 0 during a message is a normal stop after its reply
  // (the script's code ends here, as it would with a real exit); anything else really exits.
  scriptExit(code) {
    const status = code === undefined || code === null ? (process.exitCode || 0) : Number(code);
    if (status === 0 && this.inMessage) {
      this.stopReason = this.stopReason || 'process.exit(0)';
      throw new ExitSignal('process.exit(0)');
    }
    realExit(status);
  }

  // After a normal stop's reply: run nothing more (what the host sent ahead goes to the next
  // worker) and exit 0 once the host closes the channel or says shutdown.
  stopped() {
    this.fn = null;
    for (;;) {
      let msg;
      try {
        msg = this.chan.receive();
      } catch (e) {
        if (e instanceof ChannelClosed) return;
        throw e;
      }
      if (msg.method === 'shutdown') return;
    }
  }

  stateCall(op, args) {
    const rid = 's' + (++this.nextId);
    this.chan.send({ jsonrpc: '2.0', id: rid, method: 'state', params: { op, args } });
    for (;;) {
      const msg = this.chan.receiveNew(); // the host may already have sent the next message
      if (msg.id === rid && msg.method === undefined) {
        if (msg.error) throw new ActorError(msg.error.message || 'state call failed', msg.error.code);
        return msg.result === undefined ? null : msg.result;
      }
      if (msg.method === 'shutdown') realExit(0);
      this.chan.pending.push(msg);
    }
  }

  emit(port, msg) {
    const atts = [];
    const wire = this.wire(msg, atts);
    this.chan.send({ jsonrpc: '2.0', method: 'output', params: { id: this.current, port, message: wire } }, atts);
  }

  // A Message for the channel: a bytes value as a raw attachment.
  wire(msg, atts) {
    if (msg.type === 'bytes' && atts) {
      atts.push(msg.value);
      return { type: 'bytes', $att: atts.length - 1 };
    }
    return msg.toWire();
  }

  load(params) {
    const source = String(params.source);
    this.filename = params.filename || 'actor.js';
    this.config = params.config || {};
    this.actorId = params.actor_id || null;
    this.lines = source.split('\n');
    sdk.registry.length = 0;
    sdk.declared.meta = null;
    const code = transformDecorators(source);
    const mod = { exports: {} };
    // Bare names resolve in the runtime's installed `packages:` (LIMITS.packages/node_modules).
    const base = Module.createRequire(path.join(LIMITS.packages || process.cwd(), this.filename));
    const scriptRequire = (id) => (id === 'reflow' ? sdk : base(id));
    scriptRequire.resolve = base.resolve;
    let compiled;
    try {
      compiled = vm.compileFunction(code, ['exports', 'require', 'module', '__filename', '__dirname', '__reflowBind'],
        { filename: this.filename });
    } catch (e) {
      if (e instanceof SyntaxError) e.reflowLine = syntaxLine(e, this.filename);
      throw e;
    }
    const bound = [];
    compiled.call(mod.exports, mod.exports, scriptRequire, mod, this.filename, '.', (fn) => {
      if (typeof fn === 'function') bound.push(fn);
    });
    const entry = params.entry;
    let fn = bound.length ? bound[bound.length - 1] : null;
    if (fn === null && sdk.registry.length) fn = sdk.registry[sdk.registry.length - 1];
    if (fn === null && typeof mod.exports === 'function') fn = mod.exports;
    if (fn === null && mod.exports && typeof mod.exports[entry || 'process'] === 'function') {
      fn = mod.exports[entry || 'process'];
    }
    if (typeof fn !== 'function') {
      throw new Error(`${this.filename} declares no @actor function and exports no function`);
    }
    this.fn = fn;
    this.meta = fn.__reflowActor || sdk.declared.meta || {};
    return {};
  }

  async process(params, inAtts) {
    const payload = new Map();
    for (const [port, v] of Object.entries(params.payload || {})) {
      const att = v !== null && typeof v === 'object' && v.type === 'bytes' ? v.$att : undefined;
      payload.set(port, att !== undefined ? new Message('bytes', inAtts[att]) : Message.fromWire(v));
    }
    const config = params.config === undefined || params.config === null ? this.config : params.config;
    const ctx = new ActorContext(payload, config, params.actor_id || this.actorId, params.timestamp);
    const fn = this.fn; // called bare so stack frames name the script's function only
    let result = fn(ctx);
    if (result !== null && typeof result === 'object' && typeof result.then === 'function') {
      // Keep the event loop alive while the script awaits: a promise that never
      // settles must meet the host's timeout, not end the worker.
      const keep = setInterval(() => {}, 1 << 30);
      try { result = await result; } finally { clearInterval(keep); }
    }
    const atts = [];
    return [{ outputs: this.outputs(result, atts) }, atts];
  }

  outputs(result, atts) {
    if (result === undefined || result === null) return {};
    if (result instanceof Message && result.type === 'error') { // `return Message.error(...)`
      throw new ActorError(result.value.message, result.value.code);
    }
    if (result instanceof Map) result = Object.fromEntries(result);
    if (typeof result === 'object' && !Array.isArray(result) && !(result instanceof Message) &&
        !Buffer.isBuffer(result) && !ArrayBuffer.isView(result)) {
      const out = {};
      for (const [port, v] of Object.entries(result)) if (v !== undefined) out[port] = this.wire(Message.infer(v), atts);
      return out;
    }
    const outs = this.meta.outports || [];
    if (outs.length === 1) return { [outs[0]]: this.wire(Message.infer(result), atts) };
    throw new TypeError(`return an object of port -> value, not ${Array.isArray(result) ? 'an array' : typeof result}`);
  }

  errorData(err) {
    if (!(err instanceof Error)) {
      return { type: 'Error', message: typeof err === 'string' ? err : safeString(err), traceback: [] };
    }
    const traceback = [];
    const esc = this.filename.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    const frame = new RegExp(`^\\s*at (?:(.*?) \\()?${esc}:(\\d+):(\\d+)\\)?$`);
    for (const line of String(err.stack || '').split('\n')) {
      const m = frame.exec(line);
      if (!m) continue;
      const n = Number(m[2]);
      const text = (this.lines[n - 1] || '').trim();
      traceback.push(`File "${this.filename}", line ${n}, in ${m[1] || '<anonymous>'}` + (text ? `: ${text}` : ''));
    }
    traceback.reverse(); // outermost first, the failing line last: as Python tracebacks read
    if (err.reflowLine) traceback.push(`File "${this.filename}", line ${err.reflowLine}`);
    return { type: err.name || 'Error', message: String(err.message), traceback };
  }

  reply(rid, result, atts) {
    this.chan.send({ jsonrpc: '2.0', id: rid, result }, atts);
  }

  fail(rid, err) {
    const data = this.errorData(err);
    if (err instanceof ActorError && err.code !== null) data.code = err.code;
    let frame = { jsonrpc: '2.0', id: rid, error: { code: -32002, message: `${data.type}: ${data.message}`, data } };
    try {
      JSON.stringify(frame);
    } catch (_) {
      frame = { jsonrpc: '2.0', id: rid, error: { code: -32002, message: data.type } };
    }
    this.chan.send(frame);
  }

  async serve() {
    const chan = this.chan;
    for (;;) {
      let msg;
      try {
        msg = chan.receive();
      } catch (e) {
        if (e instanceof ChannelClosed) return;
        throw e;
      }
      const { method, id: rid } = msg;
      if (method === 'shutdown') return;
      if (rid === undefined || rid === null || !['load', 'process', 'ping'].includes(method)) {
        if (rid !== undefined && rid !== null) {
          chan.send({ jsonrpc: '2.0', id: rid, error: { code: -32601, message: `method not found: ${method}` } });
        }
        continue;
      }
      this.current = rid;
      try {
        if (method === 'process') {
          let out;
          this.inMessage = true;
          try {
            out = await this.process(msg.params || {}, msg._atts || []);
          } catch (e) {
            if (!(e instanceof ExitSignal)) throw e;
            out = [{ outputs: {} }, []]; // process.exit(0): what was sent so far, then stop
          } finally {
            this.inMessage = false;
          }
          if (this.stopReason !== null) {
            out[0].stop = this.stopReason;
            this.reply(rid, ...out);
            this.stopped();
            return;
          }
          this.reply(rid, ...out);
        } else if (method === 'load') this.reply(rid, this.load(msg.params || {}));
        else this.reply(rid, {});
      } catch (err) {
        if (err instanceof RangeError && /allocation failed/i.test(err.message)) {
          chan.send({ jsonrpc: '2.0', id: rid, error: { code: -32005, message: 'memory limit exceeded',
            data: { limit: 'memory' } } });
          realExit(3);
        }
        this.stopReason = null; // (a stop is honoured with a reply only: this is a failure)
        this.fail(rid, err);
      } finally {
        this.current = null;
      }
    }
  }
}

function syntaxLine(err, filename) {
  const first = String(err.stack || '').split('\n')[0];
  const m = first.match(/:(\d+)$/);
  return m && first.startsWith(filename) ? Number(m[1]) : null;
}

function safeString(v) {
  try { return String(v); } catch (_) { return Object.prototype.toString.call(v); }
}

// The sandbox has no /proc, where libuv reads the resident set size: process.memoryUsage()
// would throw ENOENT; scripts get V8's own figures instead (rss: what V8 has mapped). os.cpus()
// would be empty (/proc/cpuinfo): one entry per CPU this process may run on, without figures.
// Nor any socket but AF_UNIX, so libuv cannot list interfaces (there is only lo): none are.
function withoutProc() {
  const memoryUsage = process.memoryUsage;
  const fallbackUsage = () => {
    const h = require('v8').getHeapStatistics();
    return { rss: h.total_physical_size + h.malloced_memory + h.external_memory, heapTotal: h.total_heap_size,
             heapUsed: h.used_heap_size, external: h.external_memory, arrayBuffers: 0 };
  };
  const usage = () => { try { return memoryUsage(); } catch (_) { return fallbackUsage(); } };
  usage.rss = () => { try { return memoryUsage.rss(); } catch (_) { return fallbackUsage().rss; } };
  process.memoryUsage = usage;
  const os = require('os');
  const networkInterfaces = os.networkInterfaces;
  os.networkInterfaces = () => { try { return networkInterfaces(); } catch (_) { return {}; } };
  const cpus = os.cpus;
  os.cpus = () => {
    const real = cpus();
    if (real.length) return real;
    return Array.from({ length: os.availableParallelism() }, () => (
      { model: 'unknown', speed: 0, times: { user: 0, nice: 0, sys: 0, idle: 0, irq: 0 } }));
  };
}

function main() {
  let chan;
  if (CHANNEL_ARG === 'stdio') { // a microVM has no inherited fd: the channel is stdin/stdout
    chan = new Channel(fs.openSync('/dev/stdin', 'r'), fs.openSync('/dev/stdout', 'w'));
  } else {
    const fd = Number(CHANNEL_ARG);
    chan = new Channel(fd, fd);
  }
  const worker = new Worker(chan);
  sdk.hooks.stateCall = (op, args) => worker.stateCall(op, args);
  sdk.hooks.emit = (port, wire) => worker.emit(port, wire);
  sdk.hooks.stop = (reason) => worker.requestStop(reason);
  process.exit = (code) => worker.scriptExit(code);

  // What a script prints goes to the host's log, as with Python.
  const sink = (stream) => new Writable({
    decodeStrings: false,
    write(chunk, encoding, cb) {
      const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
      if (text) chan.send({ jsonrpc: '2.0', method: 'log', params: { stream, text: text.slice(0, 4096) } });
      cb();
    },
  });
  const out = sink('stdout');
  const err = sink('stderr');
  Object.defineProperty(process, 'stdout', { value: out, configurable: true });
  Object.defineProperty(process, 'stderr', { value: err, configurable: true });
  globalThis.console = new Console({ stdout: out, stderr: err });
  process.on('uncaughtException', (e) => err.write(`uncaught: ${e && e.stack ? e.stack : safeString(e)}\n`));

  // The seed's scripts use actor and Message without requiring them.
  globalThis.actor = sdk.actor;
  globalThis.Message = Message;
  globalThis.ActorContext = ActorContext;
  globalThis.ActorError = ActorError;

  chan.send({ jsonrpc: '2.0', method: 'ready', params: { runtime: 'javascript', pid: process.pid, limits: LIMITS,
                                                        attachments: CHANNEL_ARG !== 'stdio' } });
  withoutProc(); // after ready (off the cold start), before any script: those come as messages
  worker.serve().then(() => realExit(0), (e) => {
    err.write(`worker failed: ${e && e.stack ? e.stack : safeString(e)}\n`);
    realExit(1);
  });
}

main();
