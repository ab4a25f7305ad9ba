// The Node.js runtime's worker: runs one script, many times, for one environment.
//
// Requests come as frames on stdin, answers go as frames on the file descriptor
// named by LAMBDA_RESPONSE_FD; a frame is a 4-byte big-endian length and a UTF-8
// JSON body, and an answer with a result appends a newline and the result's JSON
// text (see process.py). vm is used only to compile with a file name and line
// offset; the isolation boundary is the process, never the interpreter.
//
// A result JSON cannot carry is an INVALID_RESULT answer, and the worker goes on:
// NaN and infinities, a BigInt, and a string that is not valid Unicode (a lone
// surrogate, "\uD800"). Numbers here are doubles, params' included: an integer
// past 2^53 in params_json reaches a script rounded.
'use strict';

const fs = require('fs');
const path = require('path');
const { Writable } = require('stream');
const util = require('util');
const vm = require('vm');
const { createRequire } = require('module');

const SCRIPT_NAME = 'script.js';
const TRUNCATED = '\n[logs truncated]\n';
const RESPONSE_FD = Number(process.env.LAMBDA_RESPONSE_FD);
const MAX_LOGS = Number(process.env.LAMBDA_MAX_LOG_BYTES || 65536);
const MAX_RESULT = Number(process.env.LAMBDA_MAX_RESULT_BYTES || 1048576);
// JSON.stringify writes a lone surrogate as a \u escape (a pair stays as is): an
// escape of a surrogate that follows an even run of backslashes is one.
const LONE_SURROGATE = /(?<!\\)(?:\\\\)*\\ud[89a-f]/;
const MODULE_STYLE = /\bmodule\.exports\b|\bexports\.[A-Za-z_$][\w$]*\s*=/;

// Streaming (a request's "stream": true): an execution's first OUTPUT_FREE_FRAMES output
// frames go as they are written; past them, at most one frame per OUTPUT_INTERVAL_MS, the
// text written meanwhile held and sent by a timer, or at the end (see process.py). A frame
// carries all that was held, both streams, as its `parts`.
const OUTPUT_FREE_FRAMES = 256;
const OUTPUT_INTERVAL_MS = 100;

let handler = null;
let logs = null;
let requestId = 0; // the request under way
let streaming = false; // it asked for output frames
let failRun = null; // rejects the execution under way: an error thrown in a callback ends it

// An execution's console output: its two streams keep at most `limit` bytes between them
// (the logs), and note that they cut; with `stream`, each write also goes as an output frame.
class LogBuffer {
  constructor(limit, stream = false) {
    this.limit = limit;
    this.parts = []; // [stream, text]: the logs, write by write
    this.size = 0;
    this.cut = false;
    this.stream = stream;
    this.frames = 0;
    this.last = 0;
    this.held = []; // [stream, text] kept back by the frame rate
    this.cutSent = false; // a frame said that the output was cut
    this.timer = null;
  }
  write(text, name = 'stdout') {
    const room = this.limit - this.size;
    if (room <= 0) {
      if (!this.cut) {
        this.cut = true;
        if (this.stream) this.release(false);
      }
      return;
    }
    let data = Buffer.from(text, 'utf8');
    if (data.length > room) {
      let end = room;
      while (end > 0 && (data[end] & 0xc0) === 0x80) end--; // a character cut in two is left out
      data = data.subarray(0, end);
      this.cut = true;
    }
    this.size = this.cut ? this.limit : this.size + data.length;
    if (data.length > 0) {
      text = data.toString('utf8'); // a lone surrogate is U+FFFD from here
      this.parts.push([name, text]);
      if (this.stream) {
        const last = this.held[this.held.length - 1];
        if (last !== undefined && last[0] === name) last[1] += text;
        else this.held.push([name, text]);
      }
    }
    if (this.stream) this.release(false);
  }
  // Send what is held, in one frame, unless the frame rate says to wait (not at the end).
  release(final) {
    if (this.held.length === 0 && (this.cutSent || !this.cut)) return;
    const now = performance.now();
    if (!final && this.frames >= OUTPUT_FREE_FRAMES && now - this.last < OUTPUT_INTERVAL_MS) {
      if (this.timer === null) {
        this.timer = setTimeout(() => {
          this.timer = null;
          if (this.stream) this.release(true);
        }, OUTPUT_INTERVAL_MS - (now - this.last));
      }
      return;
    }
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const held = this.held;
    this.held = [];
    this.cutSent = this.cut;
    sendOutput(held, this.cut);
    this.frames += 1;
    this.last = now;
  }
  // The end of the execution: what is held goes, and nothing the script writes later does.
  finish() {
    if (this.stream) this.release(true);
    this.stream = false;
  }
  // Send every chunk kept, in one output frame (a load that failed: its logs).
  replay() {
    if (this.parts.length > 0 || this.cut) sendOutput(this.parts, this.cut);
  }
  text() {
    return this.parts.map((part) => part[1]).join('') + (this.cut ? TRUNCATED : '');
  }
}

// An output frame of the request under way: its [stream, text] parts, in order, and whether
// the output was cut.
function sendOutput(parts, cut) {
  send(JSON.stringify({ id: requestId, op: 'output', parts, ...(cut ? { cut: true } : {}) }));
}

// An answer's `cut`: present, and true, when the console output went past the limit.
function cut(buffer) {
  return buffer.cut ? { cut: true } : {};
}

function capturing(name) {
  return (...args) => {
    if (logs !== null) logs.write(util.format(...args) + '\n', name);
  };
}
const capture = capturing('stderr');
for (const name of ['log', 'info', 'debug']) {
  console[name] = capturing('stdout');
}
for (const name of ['warn', 'error', 'trace']) {
  console[name] = capture;
}
// process.stdout and process.stderr go to the logs too, as Python's print and sys.stderr
// do. They are streams of our own: Node's real ones, made on first use, switch fds 1 and
// 2 to non-blocking, and a script's fs.writeSync(2, ...) then failed EAGAIN on a full pipe.
function capturingStream(fd) {
  const stream = new Writable({
    decodeStrings: false,
    write(chunk, encoding, done) {
      const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
      if (logs !== null) logs.write(text, fd === 2 ? 'stderr' : 'stdout');
      done();
    },
  });
  stream.fd = fd;
  stream.isTTY = false;
  return stream;
}
const capturedStdout = capturingStream(1);
const capturedStderr = capturingStream(2);
Object.defineProperty(process, 'stdout', { configurable: true, get: () => capturedStdout });
Object.defineProperty(process, 'stderr', { configurable: true, get: () => capturedStderr });
function uncaught(err) {
  if (failRun !== null) failRun(err);
  else capture('Uncaught', err);
}
process.on('uncaughtException', uncaught);
process.on('unhandledRejection', uncaught);

function send(body) {
  const payload = Buffer.from(body, 'utf8');
  const header = Buffer.alloc(4);
  header.writeUInt32BE(payload.length, 0);
  let data = Buffer.concat([header, payload]);
  while (data.length > 0) {
    const written = fs.writeSync(RESPONSE_FD, data);
    data = data.subarray(written);
  }
}

// A string with each lone surrogate replaced by U+FFFD: an error's message may quote one,
// and the parent refuses a frame that is not valid Unicode.
function wellFormed(text) {
  return typeof text === 'string' ? Buffer.from(text, 'utf8').toString('utf8') : text;
}

function failure(code, message, line = 0, column = 0, stack = '') {
  return { code, message: wellFormed(message), line, column, stack: wellFormed(stack) };
}

function position(err) {
  const stack = typeof (err && err.stack) === 'string' ? err.stack : '';
  const match = stack.match(/script\.js:(\d+):(\d+)/);
  return match ? [Number(match[1]), Number(match[2])] : [0, 0];
}

function userStack(err) {
  const stack = typeof (err && err.stack) === 'string' ? err.stack : String(err);
  const lines = stack.split('\n');
  const head = lines.filter((l) => !/^\s+at /.test(l));
  const frames = lines.filter((l) => /^\s+at /.test(l) && l.includes(SCRIPT_NAME));
  return head.concat(frames).join('\n');
}

function errorMessage(err) {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  try {
    return `Error: ${typeof err === 'string' ? err : JSON.stringify(err)}`;
  } catch (_) {
    return `Error: ${String(err)}`;
  }
}

function runtimeFailure(err) {
  const [line, column] = position(err);
  return failure('RUNTIME_ERROR', errorMessage(err), line, column, userStack(err));
}

function syntaxFailure(err) {
  // V8 puts "script.js:LINE" on the first line of a SyntaxError's stack, then the
  // source line and a caret under the offending column.
  const lines = String(err.stack || '').split('\n');
  const match = (lines[0] || '').match(/script\.js:(\d+)/);
  const caret = (lines[2] || '').indexOf('^');
  return failure('RUNTIME_ERROR', errorMessage(err), match ? Number(match[1]) : 0, caret >= 0 ? caret + 1 : 0);
}

// The script's source wrapped so that its first line stays line 1.
function wrap(script) {
  if (MODULE_STYLE.test(script)) {
    return { module: true, source: '(function (exports, require, module, __filename, __dirname) {\n' + script + '\n})' };
  }
  return { module: false, source: '(async function (event, params, context, require) {\n' + script + '\n})' };
}

function compile(script) {
  const wrapped = wrap(script);
  return { module: wrapped.module, compiled: new vm.Script(wrapped.source, { filename: SCRIPT_NAME, lineOffset: -1 }) };
}

function check(script) {
  try {
    compile(script);
    return { ok: true };
  } catch (err) {
    return { ok: false, error: syntaxFailure(err) };
  }
}

// The script's `require`: with a layer (a session's dependencies, mounted read-only), bare
// names resolve from <layer>/node_modules first (Node looks there, then in /node_modules);
// without one, from the working directory, as a script in it would.
function scriptRequire(layer) {
  if (typeof layer === 'string' && layer) return createRequire(path.join(layer, 'node_modules', '.require.js'));
  return createRequire(process.cwd() + '/' + SCRIPT_NAME);
}

function load(script, layer) {
  logs = new LogBuffer(MAX_LOGS);
  let unit;
  try {
    unit = compile(script);
  } catch (err) {
    return loadFailed(syntaxFailure(err));
  }
  try {
    const fn = unit.compiled.runInThisContext();
    if (!unit.module) {
      const required = scriptRequire(layer);
      handler = (event) => fn(event, event.params, event.context, required);
    } else {
      const module = { exports: {} };
      fn(module.exports, scriptRequire(layer), module, SCRIPT_NAME, process.cwd());
      let exported = module.exports;
      if (typeof exported !== 'function' && exported && typeof exported.handler === 'function') {
        exported = exported.handler;
      }
      if (typeof exported !== 'function') {
        return loadFailed(failure('RUNTIME_ERROR', 'TypeError: module.exports is not a function'));
      }
      handler = exported.length >= 2 ? callbackStyle(exported) : exported;
    }
  } catch (err) {
    return loadFailed(runtimeFailure(err));
  }
  return { ok: true, logs: logs.text() };
}

// A load that failed answers with its top level's logs: streamed too, at the end.
function loadFailed(error) {
  if (streaming) logs.replay();
  return { ok: false, error, logs: logs.text(), ...cut(logs) };
}

function callbackStyle(fn) {
  return (event) =>
    new Promise((resolve, reject) => {
      const returned = fn(event, (err, value) => (err ? reject(err) : resolve(value)));
      if (returned && typeof returned.then === 'function') returned.then(resolve, reject);
    });
}

// The /proc files read around every execution, opened once: a read at offset 0 makes
// the kernel write the status anew (7 us a run, against 40 us opening them each time).
function openProc(name, flags) {
  try {
    return fs.openSync(`/proc/self/${name}`, flags);
  } catch (_) {
    return -1; // not permitted here: the peak is then the process's lifetime peak
  }
}
const CLEAR_REFS = openProc('clear_refs', 'w');
const STATUS = openProc('status', 'r');
const STATUS_BUFFER = Buffer.alloc(8192);
const RESET_PEAK = Buffer.from('5'); // resets VmHWM, the peak RSS

// CPU time and peak resident memory of this process over one execution.
class Usage {
  constructor() {
    if (CLEAR_REFS >= 0) {
      try {
        fs.writeSync(CLEAR_REFS, RESET_PEAK);
      } catch (_) {
        // the peak is then the lifetime peak
      }
    }
    this.cpu = process.cpuUsage();
  }
  measure() {
    const used = process.cpuUsage(this.cpu);
    let peak = 0;
    try {
      const size = fs.readSync(STATUS, STATUS_BUFFER, 0, STATUS_BUFFER.length, 0);
      const match = STATUS_BUFFER.toString('latin1', 0, size).match(/^VmHWM:\s+(\d+) kB/m);
      if (match) peak = Number(match[1]) * 1024;
    } catch (_) {
      peak = process.resourceUsage().maxRSS * 1024;
    }
    return { cpu: (used.user + used.system) / 1e6, peak };
  }
}

function replacer(key, value) {
  if (typeof value === 'number' && !Number.isFinite(value)) {
    throw new TypeError(`${value} at ${JSON.stringify(key)} is not a JSON number`);
  }
  if (typeof value === 'function' || typeof value === 'symbol' || typeof value === 'bigint') {
    throw new TypeError(`a ${typeof value} at ${JSON.stringify(key)} is not JSON`);
  }
  return value;
}

async function run(event) {
  logs = new LogBuffer(MAX_LOGS, streaming);
  const usage = new Usage();
  const answer = (fields) => {
    logs.finish();
    return JSON.stringify({ ...fields, logs: logs.text(), ...usage.measure(), ...cut(logs) });
  };
  let result;
  try {
    const failed = new Promise((_, reject) => {
      failRun = reject;
    });
    result = await Promise.race([handler(event), failed]);
  } catch (err) {
    return answer({ ok: false, error: runtimeFailure(err) });
  } finally {
    failRun = null;
  }
  let encoded;
  try {
    encoded = result === undefined ? 'null' : JSON.stringify(result, replacer);
  } catch (err) {
    const message = `the result is not JSON-representable: ${err.message}`;
    return answer({ ok: false, error: failure('INVALID_RESULT', message) });
  }
  if (encoded.includes('\\ud') && LONE_SURROGATE.test(encoded)) {
    const message = 'the result holds a string that is not valid Unicode (a lone surrogate)';
    return answer({ ok: false, error: failure('INVALID_RESULT', message) });
  }
  if (Buffer.byteLength(encoded, 'utf8') > MAX_RESULT) {
    const message = `the result is larger than ${MAX_RESULT} bytes`;
    return answer({ ok: false, error: failure('OUTPUT_LIMIT', message) });
  }
  return `${answer({ ok: true })}\n${encoded}`;
}

async function handle(message) {
  requestId = Number(message.id);
  streaming = message.stream === true;
  switch (message.op) {
    case 'check':
      return JSON.stringify(check(message.script));
    case 'load': {
      // bind the script (and its layer), then run it with the event
      const loaded = load(message.script, message.layer);
      return loaded.ok ? run(message.event) : JSON.stringify({ ...loaded, loaded: false });
    }
    case 'run':
      return run(message.event);
    default:
      return JSON.stringify({ ok: false, error: failure('RUNTIME_ERROR', `unknown op ${message.op}`) });
  }
}

// A `many`: the bound script run once per event, in order, each answered as soon as it is
// done (its frame names the item).
async function many(id, events) {
  requestId = id;
  streaming = false; // a batch's items send no output frames
  for (let item = 0; item < events.length; item++) {
    const answer = await run(events[item]);
    send(`{"id":${id},"item":${item},` + answer.slice(1));
  }
}

// Before it says ready, the process binds and runs scripts of its own in each style, so
// that V8 has compiled the paths a first execution takes (about 3 ms of a first Execute).
// Nothing of them stays: the process is unbound again when it says ready.
const WARM_UP = ['return event.params.n + 1;', 'module.exports = async (event) => event.params.n + 1;'];

async function warmUp() {
  for (const script of WARM_UP) {
    load(script);
    await run({ params: { n: 1 }, context: {}, request_id: '' });
  }
  handler = null;
  logs = null;
}

function serve() {
  let pending = Buffer.alloc(0);
  let queue = Promise.resolve();
  // process.stdin reads the pipe without blocking a threadpool thread (a blocked
  // fs read on fd 0 would make process.exit() hang).
  const input = process.stdin;
  input.on('data', (chunk) => {
    pending = Buffer.concat([pending, chunk]);
    while (pending.length >= 4) {
      const size = pending.readUInt32BE(0);
      if (pending.length < 4 + size) break;
      const message = JSON.parse(pending.subarray(4, 4 + size).toString('utf8'));
      pending = pending.subarray(4 + size);
      // every answer carries its request's id, so a frame the script forged is told apart
      if (message.op === 'many') {
        queue = queue.then(() => many(Number(message.id), message.events));
        continue;
      }
      queue = queue.then(() => handle(message)).then((answer) => send(`{"id":${Number(message.id)},` + answer.slice(1)));
    }
  });
  input.on('end', () => process.exit(0));
  send(JSON.stringify({ op: 'ready' }));
}

warmUp().then(serve);
