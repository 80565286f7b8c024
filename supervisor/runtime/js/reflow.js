'use strict';
// The Reflow script-actor SDK for JavaScript, as seen from inside a sandbox:
// `const { actor, Message } = require('reflow')` (both are also globals of a
// script, so the seed's files run without a require). See CONTRACT §3.
//
// State calls are synchronous: each one is a request to the host over the
// sandbox channel, answered before the call returns (the worker blocks on the
// channel). A script may still `await` them; awaiting a plain value is fine.

// What the host carries exactly (supervisor/core/protocol.py, CONTRACT §4): integers in signed
// 64 bits (a JavaScript number is exact only to 2^53, as ever), values nested at most
// MAX_DEPTH levels. Anything else is a RangeError naming the limit, never a value that
// arrives changed (an integer beyond 64 bits read as a float, say).
// Integers are -2^63 .. 2^63-1; as a number, -2^63 itself is written -9223372036854776000,
// beyond the range, so a number must lie strictly inside ±2^63.
const INT_LIMIT = 2 ** 63;
const MAX_DEPTH = 120;

function outOfRange(v) {
  return new RangeError(`integer ${String(v)} is out of range: messages and state carry integers from -2^63 to ` +
    '2^63-1 (signed 64-bit); send larger ones as strings, or as floats with Message.float');
}

function tooDeep() {
  return new RangeError(`a value nested deeper than ${MAX_DEPTH} levels cannot be sent`);
}

const TYPES = new Set(['integer', 'float', 'string', 'boolean', 'array', 'object', 'error', 'bytes', 'any', 'null']);

// Set by the worker: (op, args) -> result, and (port, wireMessage) -> void.
const hooks = { stateCall: null, emit: null, stop: null };
// Filled by actor(): the functions this file declared, last one wins.
const registry = [];
// The metadata of the last `actor({...})` called without a function.
const declared = { meta: null };

class ActorError extends Error {
  constructor(message, code) {
    super(message);
    this.name = 'ActorError';
    this.code = code === undefined ? null : code;
  }
}

class Message {
  constructor(type, value) {
    if (!TYPES.has(type)) throw new TypeError(`unknown message type ${JSON.stringify(type)}`);
    this.type = type;
    this.value = value;
  }

  static integer(v) {
    if (typeof v === 'bigint') {
      if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
        throw new RangeError('Message.integer: a BigInt beyond 2^53 cannot travel as a JSON number');
      }
      v = Number(v);
    }
    if (!Number.isInteger(v)) throw new TypeError(`Message.integer needs an integer, got ${String(v)}`);
    if (v >= INT_LIMIT || v <= -INT_LIMIT) throw outOfRange(v);
    return new Message('integer', v);
  }

  static float(v) {
    v = Number(v);
    if (!Number.isFinite(v)) throw new RangeError('Message.float cannot carry NaN or infinity (not JSON)');
    return new Message('float', v);
  }

  static string(v) { return new Message('string', String(v)); }
  static boolean(v) { return new Message('boolean', Boolean(v)); }
  static array(v) { return new Message('array', Array.from(v)); }
  static object(v) { return new Message('object', Object.assign({}, v)); }
  static error(message, code) {
    return new Message('error', { message: String(message), code: code === undefined ? null : code });
  }
  static bytes(v) { return new Message('bytes', toBuffer(v)); }
  static any(v) { return new Message('any', v); }
  static null() { return new Message('null', null); }

  // Wrap a plain value by its JavaScript type: integral numbers are integers.
  static infer(v) {
    if (v instanceof Message) return v;
    if (v === null || v === undefined) return new Message('null', null);
    switch (typeof v) {
      case 'boolean': return new Message('boolean', v);
      case 'number': return Number.isInteger(v) ? Message.integer(v) : Message.float(v);
      case 'bigint': return Message.integer(v);
      case 'string': return new Message('string', v);
      case 'object':
        if (Array.isArray(v)) return new Message('array', v);
        if (isBinary(v)) return new Message('bytes', toBuffer(v));
        if (v instanceof Map) return new Message('object', Object.fromEntries(v));
        return new Message('object', v);
      default:
        throw new TypeError(`cannot send a ${typeof v} as a message; use plain JSON values or Message.*`);
    }
  }

  unwrap() { return this.value; }
  isError() { return this.type === 'error'; }
  is_error() { return this.type === 'error'; }
  // So `payload.get("window") || 10` and `n > windowSize` behave as the seed expects.
  valueOf() { return this.value; }
  toString() { return String(this.value); }
  toJSON() { return this.toWire(); }

  toWire(depth = 1) {
    if (this.type === 'bytes') return { type: 'bytes', value: this.value.toString('base64') };
    return { type: this.type, value: plain(this.value, depth) };
  }

  static fromWire(w) {
    if (w !== null && typeof w === 'object' && !Array.isArray(w) && TYPES.has(w.type) &&
        Object.keys(w).length === 2 && 'value' in w) {
      if (w.type === 'bytes') return new Message('bytes', Buffer.from(String(w.value), 'base64'));
      return new Message(w.type, w.value);
    }
    return Message.infer(w);
  }
}

function isBinary(v) {
  return Buffer.isBuffer(v) || ArrayBuffer.isView(v) || v instanceof ArrayBuffer;
}

function toBuffer(v) {
  if (Buffer.isBuffer(v)) return v;
  if (v instanceof ArrayBuffer) return Buffer.from(v);
  if (ArrayBuffer.isView(v)) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  if (typeof v === 'string') return Buffer.from(v, 'utf8');
  if (Array.isArray(v)) return Buffer.from(v);
  throw new TypeError(`Message.bytes needs a Buffer, typed array or string, got ${typeof v}`);
}

// Make a value JSON-ready: nested Messages become typed values, Maps objects, binary base64.
// `depth`: how many levels hold `v` (at most MAX_DEPTH, counting its own).
function plain(v, depth = 1) {
  if (v === null || v === undefined) return null;
  switch (typeof v) {
    case 'string': case 'boolean': return v;
    case 'number':
      if (!Number.isFinite(v)) throw new RangeError('NaN or infinity cannot be sent (not JSON)');
      // JSON.stringify writes an integral number below 1e21 as an integer literal (above, in
      // exponent form: a float): one beyond 64 bits would reach the host as an integer it
      // cannot carry.
      if ((v >= INT_LIMIT || v <= -INT_LIMIT) && Math.abs(v) < 1e21 && Number.isInteger(v)) throw outOfRange(v);
      return v;
    case 'bigint': return Message.integer(v).value;
    case 'object':
      if (v instanceof Message) return v.toWire(depth);
      if (depth > MAX_DEPTH) throw tooDeep();
      if (Array.isArray(v)) return v.map((x) => plain(x, depth + 1));
      if (isBinary(v)) return toBuffer(v).toString('base64');
      if (v instanceof Map) v = Object.fromEntries(v);
      if (typeof v.toJSON === 'function') return plain(v.toJSON(), depth);
      {
        const out = {};
        for (const k of Object.keys(v)) if (v[k] !== undefined) out[k] = plain(v[k], depth + 1);
        return out;
      }
    default:
      throw new TypeError(`cannot send a ${typeof v} as a message value`);
  }
}

function call(op, args) {
  if (hooks.stateCall === null) throw new Error('state is only available while handling a message');
  return hooks.stateCall(op, args);
}

// This process's state in Redis; every call returns its value directly.
class ActorState {
  get(key, dflt) {
    const v = call('get', [key]);
    return v === null || v === undefined ? (dflt === undefined ? null : dflt) : v;
  }
  set(key, value) { call('set', [key, plain(value)]); }
  delete(key) { return call('delete', [key]); }
  exists(key) { return call('exists', [key]); }
  increment(key, by = 1) { return call('increment', [key, by]); }
  decrement(key, by = 1) { return call('increment', [key, -by]); }
  push(key, value) { return call('push', [key, plain(value)]); }
  pop(key) { return call('pop', [key]); }
  extend(key, values) { return call('extend', [key, plain(Array.from(values))]); }
  expire(key, seconds) { return call('expire', [key, seconds]); }
  ttl(key) { return call('ttl', [key]); }
  keys(pattern = '*') { return call('keys', [pattern]); }
}

const DONE = Promise.resolve();

// What a script is given for one message.
class ActorContext {
  constructor(payload, config, actorId, timestamp) {
    this._payload = payload; // Map port -> Message
    this._config = config;
    this._actorId = actorId;
    this._timestamp = timestamp;
    this._outputs = new Map();
    this._state = new ActorState();
  }

  getPayload() { return this._payload; }
  get payload() { return this._payload; }
  // The plain value on `port` (Message.unwrap()), or `dflt`.
  getInput(port, dflt) {
    const m = this._payload.get(port);
    return m === undefined ? (dflt === undefined ? null : dflt) : m.value;
  }
  hasInput(port) { return this._payload.has(port); }
  getConfig() { return this._config; }
  get config() { return this._config; }
  getState() { return this._state; }
  get state() { return this._state; }
  // Stream `value` out of `port` now, before the function returns (await optional).
  sendOutput(port, value) {
    const msg = Message.infer(value);
    this._outputs.set(port, msg);
    hooks.emit(String(port), msg);
    return DONE;
  }
  getOutputs() { return new Map(this._outputs); }
  // Stop this actor normally once this message is answered (OTP's {stop, normal, ...}): the
  // returned value is still the message's outputs. A transient or temporary actor is then not
  // restarted; a permanent one is. process.exit() / process.exit(0) during a message does the
  // same with no outputs; any other exit code is a crash.
  stop(reason) { hooks.stop(reason === undefined || reason === null ? 'context.stop()' : String(reason)); }
  timestamp() { return this._timestamp; }
  actorId() { return this._actorId; }
}

// actor(meta, fn) registers fn and returns it; actor(meta) returns a decorator.
function actor(meta, fn) {
  if (typeof meta === 'function' && fn === undefined) { fn = meta; meta = { name: fn.name }; }
  const register = (f) => {
    if (typeof f !== 'function') throw new TypeError('actor(...) must be given the actor function');
    Object.defineProperty(f, '__reflowActor', { value: Object.assign({}, meta), enumerable: false });
    registry.push(f);
    return f;
  };
  if (fn === undefined) declared.meta = Object.assign({}, meta); // the seed's `@actor({...})` line
  return fn === undefined ? register : register(fn);
}

module.exports = { actor, Message, ActorContext, ActorState, ActorError, hooks, registry, declared, plain, MAX_DEPTH };
