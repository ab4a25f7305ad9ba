//! The Rust runtime's worker: the program a Rust script is compiled into.
//!
//! The user's script is the module `script` (script.rs beside this file); this
//! program serves many executions of its `handler` (or, compiled with
//! `--cfg lambda_handle`, of the original service's `handle`: see `entry`) over the same framed protocol
//! as the Python and Node.js workers: requests as frames on stdin, answers on the
//! descriptor named by LAMBDA_RESPONSE_FD, a frame being a 4-byte big-endian
//! length and a UTF-8 JSON body; an answer with a result appends a newline and
//! the result's JSON text (see process.py). The script's stdout and stderr are two
//! pipes that a thread of the worker's own reads as they fill (so that a request
//! with "stream": true gets output frames as the script writes); at the end of an
//! execution the main thread drains them itself, so that everything written before
//! the handler returned is in the logs before the answer. Where the thread cannot
//! start (a max_processes of 1), they go to a file of the scratch directory, read
//! back and emptied after each execution, and nothing streams.
//!
//! serde_json cannot make a result JSON does not carry: its integers are 64-bit
//! (kept exactly in result_json), its strings are UTF-8, and a float that is NaN
//! or infinite becomes null (`Value::from(f64::NAN)` is `Value::Null`). Only the
//! nesting depth is the server's to bound (MAX_JSON_DEPTH). A `handle`'s result is its
//! own JSON text, passed on as it is (the server reads it: see process.py).
//! It uses std and serde_json only; the few libc calls std does not offer are
//! declared here (std links libc already).

#[allow(dead_code, unused_imports)]
#[path = "script.rs"]
mod script;

use serde_json::{json, Map, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::fmt::Display;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SCRIPT_FILE: &str = "script.rs";
const TRUNCATED: &str = "\n[logs truncated]\n";
// Streaming: an execution's first OUTPUT_FREE_FRAMES output frames go as they are read;
// past them, at most one per OUTPUT_INTERVAL, what was read meanwhile held (see process.py).
// A frame carries all that was held, both streams, as its `parts`.
const OUTPUT_FREE_FRAMES: u32 = 256;
const OUTPUT_INTERVAL: Duration = Duration::from_millis(100);
const POLLIN: i16 = 1;
const F_GETFL: i32 = 3;
const F_SETFL: i32 = 4;
const O_NONBLOCK: i32 = 0o4000;
const STREAM_NAMES: [&str; 2] = ["stdout", "stderr"];

extern "C" {
    fn dup(fd: i32) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn abort() -> !;
    fn clock_gettime(clock: i32, spec: *mut [i64; 2]) -> i32;
    fn pipe(fds: *mut [i32; 2]) -> i32;
    fn poll(fds: *mut [PollFd; 2], count: u64, timeout: i32) -> i32;
    fn fcntl(fd: i32, command: i32, argument: i32) -> i32;
    fn read(fd: i32, buf: *mut u8, count: usize) -> isize;
    fn close(fd: i32) -> i32;
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
// The runtime's own stderr (the parent reads it), kept apart from the script's.
static mut RUNTIME_STDERR: i32 = 2;

/// The system allocator, which says on the runtime's stderr that memory ran out
/// before it aborts, so the parent reports MEMORY_LIMIT rather than a crash.
struct Allocator;

unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        checked(System.alloc(layout))
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        checked(System.alloc_zeroed(layout))
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        checked(System.realloc(ptr, layout, size))
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

unsafe fn checked(ptr: *mut u8) -> *mut u8 {
    if ptr.is_null() {
        let message = b"memory allocation failed: out of memory\n";
        write(RUNTIME_STDERR, message.as_ptr(), message.len());
        abort();
    }
    ptr
}

#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// A handler of either accepted signature: `fn(Value)` or the original's
/// `fn(Map<String, Value>)`, returning `Result<Value, E>` for any displayable E.
trait Handler<Marker> {
    fn call(&self, event: Value) -> Result<Value, String>;
}

impl<F, E> Handler<(Value, E)> for F
where
    F: Fn(Value) -> Result<Value, E>,
    E: Display,
{
    fn call(&self, event: Value) -> Result<Value, String> {
        self(event).map_err(|e| e.to_string())
    }
}

impl<F, E> Handler<(Map<String, Value>, E)> for F
where
    F: Fn(Map<String, Value>) -> Result<Value, E>,
    E: Display,
{
    fn call(&self, event: Value) -> Result<Value, String> {
        let map = match event {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        self(map).map_err(|e| e.to_string())
    }
}

fn invoke<M, H: Handler<M>>(handler: H, event: Value) -> Result<Value, String> {
    handler.call(event)
}

/// Why an execution gave no result: the script's error, or a `handle` result that is not JSON.
enum Failed {
    Error(String),
    NotJson(String),
}

/// The script's `handler`, called with the event; its result as JSON text.
#[cfg(not(lambda_handle))]
fn entry(event: Value) -> Result<String, Failed> {
    invoke(script::handler, event).map(|result| result.to_string()).map_err(Failed::Error)
}

/// The original service's convention, `pub fn handle(event: &str) -> Result<String, String>`
/// (any displayable error will do): the event `{params, context, request_id}` as JSON text
/// in, the result's JSON text out. Text that is not JSON is an INVALID_RESULT, said here
/// for what serde_json reads; past its nesting limit, the server reads it (MAX_JSON_DEPTH).
#[cfg(lambda_handle)]
fn entry(event: Value) -> Result<String, Failed> {
    fn call<F, E>(handle: F, event: &str) -> Result<String, String>
    where
        F: Fn(&str) -> Result<String, E>,
        E: Display,
    {
        handle(event).map_err(|e| e.to_string())
    }
    let text = call(script::handle, &event.to_string()).map_err(Failed::Error)?;
    let text = text.trim().to_string();
    match serde_json::from_str::<Value>(&text) {
        Err(error) if !error.to_string().starts_with("recursion limit exceeded") => {
            Err(Failed::NotJson(format!("handle returned text that is not JSON: {}", error)))
        }
        _ => Ok(text),
    }
}

thread_local! {
    // the last panic's message and place in the script, set by the panic hook
    static PANIC: RefCell<Option<(String, u32, u32)>> = RefCell::new(None);
}

fn panic_hook(payload: &(dyn std::any::Any + Send), place: Option<&panic::Location<'_>>) {
    let message = if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        String::from("panic")
    };
    let (line, column) = match place {
        Some(place) if place.file().ends_with(SCRIPT_FILE) => (place.line(), place.column()),
        _ => (0, 0),
    };
    PANIC.with(|slot| *slot.borrow_mut() = Some((message, line, column)));
}

fn cpu_seconds() -> f64 {
    let mut spec = [0i64; 2];
    unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut spec) };
    spec[0] as f64 + spec[1] as f64 / 1e9
}

/// The /proc files read around every execution, opened once: a read at offset 0
/// makes the kernel write the status anew. None where /proc is not readable.
struct Usage {
    status: Option<File>,
    clear_refs: Option<File>,
}

impl Usage {
    fn open() -> Usage {
        Usage {
            status: File::open("/proc/self/status").ok(),
            clear_refs: std::fs::OpenOptions::new().write(true).open("/proc/self/clear_refs").ok(),
        }
    }

    /// "5" resets the peak resident memory (VmHWM) that the status reports.
    fn reset_peak(&mut self) {
        if let Some(file) = self.clear_refs.as_mut() {
            let _ = file.write_all(b"5");
        }
    }

    /// Peak resident memory since the last reset, in bytes; 0 when it cannot be read.
    fn peak_bytes(&self) -> u64 {
        let mut buffer = [0u8; 8192];
        let read = match self.status.as_ref().map(|file| file.read_at(&mut buffer, 0)) {
            Some(Ok(read)) => read,
            _ => return 0,
        };
        String::from_utf8_lossy(&buffer[..read])
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:").map(str::to_owned))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

fn failure(code: &str, message: &str, line: u32, column: u32) -> Value {
    json!({"code": code, "message": message, "line": line, "column": column, "stack": ""})
}

/// The script's console output of the execution under way: the logs (at most `limit`
/// bytes), and, while a streaming request runs (`request`), the output frames to send.
/// What is written between executions (a thread the script left) is read and dropped.
struct Console {
    pipes: [i32; 2], // the read ends of stdout's and stderr's pipes, non-blocking
    tails: [Vec<u8>; 2], // the start of a character whose end is not read yet
    limit: usize,
    logs: String,
    size: usize,
    cut: bool,
    request: Option<u64>,
    running: bool, // an execution is under way
    frames: u32,
    last: Instant,
    held: Vec<(usize, String)>,
    cut_sent: bool, // a frame said that the output was cut
}

impl Console {
    /// Read what each pipe holds (called with the lock held); `last`: the end of an execution.
    fn pump(&mut self, responses: &Mutex<File>, last: bool) {
        let mut buffer = [0u8; 16384];
        for which in 0..2 {
            loop {
                let count = unsafe { read(self.pipes[which], buffer.as_mut_ptr(), buffer.len()) };
                if count <= 0 {
                    break;
                }
                if self.cut {
                    continue; // past the limit: read and drop, so that the script never blocks
                }
                self.tails[which].extend_from_slice(&buffer[..count as usize]);
                let text = decode(&mut self.tails[which]);
                self.add(which, text);
            }
            if last && !self.tails[which].is_empty() {
                let text = String::from_utf8_lossy(&self.tails[which]).into_owned();
                self.tails[which].clear();
                self.add(which, text);
            }
        }
        self.release(responses, last);
    }

    fn add(&mut self, which: usize, text: String) {
        if !self.running {
            return;
        }
        let room = self.limit.saturating_sub(self.size);
        if room == 0 {
            self.cut = self.cut || !text.is_empty();
            return;
        }
        let mut text = text;
        if text.len() > room {
            let mut end = room;
            while !text.is_char_boundary(end) {
                end -= 1; // a character cut in two is left out whole
            }
            text.truncate(end);
            self.cut = true;
        }
        self.size = if self.cut { self.limit } else { self.size + text.len() };
        if text.is_empty() {
            return;
        }
        self.logs.push_str(&text);
        if self.request.is_some() {
            match self.held.last_mut() {
                Some((last, held)) if *last == which => held.push_str(&text),
                _ => self.held.push((which, text)),
            }
        }
    }

    /// Send what is held, unless the frame rate says to wait (not at the end).
    fn release(&mut self, responses: &Mutex<File>, last: bool) {
        let request = match self.request {
            Some(request) => request,
            None => return,
        };
        if !self.pending()
            || (!last && self.frames >= OUTPUT_FREE_FRAMES && self.last.elapsed() < OUTPUT_INTERVAL)
        {
            return;
        }
        let parts: Vec<Value> =
            self.held.drain(..).map(|(which, text)| json!([STREAM_NAMES[which], text])).collect();
        let mut frame = json!({"id": request, "op": "output", "parts": parts});
        if self.cut {
            frame["cut"] = Value::Bool(true);
        }
        self.cut_sent = self.cut;
        write_frame(&mut responses.lock().unwrap_or_else(|e| e.into_inner()), frame.to_string().as_bytes());
        self.frames += 1;
        self.last = Instant::now();
    }

    /// Whether a frame is due: text held, or a cut not said yet.
    fn pending(&self) -> bool {
        !self.held.is_empty() || (self.cut && !self.cut_sent)
    }

    /// How long the reader may wait for output: until held text is due, or for ever (-1).
    fn wait_ms(&self) -> i32 {
        if self.request.is_none() || !self.pending() {
            return -1;
        }
        OUTPUT_INTERVAL.saturating_sub(self.last.elapsed()).as_millis() as i32 + 1
    }
}

/// The text of the bytes read, invalid sequences as U+FFFD; an incomplete last character's
/// bytes stay in `bytes` for the next read.
fn decode(bytes: &mut Vec<u8>) -> String {
    let mut text = String::new();
    let mut start = 0;
    while start < bytes.len() {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(valid) => {
                text.push_str(valid);
                start = bytes.len();
            }
            Err(error) => {
                let good = start + error.valid_up_to();
                text.push_str(std::str::from_utf8(&bytes[start..good]).unwrap_or(""));
                match error.error_len() {
                    Some(length) => {
                        text.push('\u{FFFD}');
                        start = good + length;
                    }
                    None => {
                        start = good;
                        break;
                    }
                }
            }
        }
    }
    bytes.drain(..start);
    text
}

fn write_frame(file: &mut File, body: &[u8]) {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    if file.write_all(&frame).is_err() {
        std::process::exit(1);
    }
}

/// The reader thread: waits for output on either pipe and reads it as it comes.
fn read_console(console: Arc<Mutex<Console>>, responses: Arc<Mutex<File>>) {
    let pipes = console.lock().unwrap_or_else(|e| e.into_inner()).pipes;
    let mut wait = -1;
    loop {
        let mut fds = [
            PollFd { fd: pipes[0], events: POLLIN, revents: 0 },
            PollFd { fd: pipes[1], events: POLLIN, revents: 0 },
        ];
        unsafe { poll(&mut fds, 2, wait) };
        let mut state = console.lock().unwrap_or_else(|e| e.into_inner());
        state.pump(&responses, false);
        wait = state.wait_ms();
    }
}

struct Worker {
    requests: File,
    responses: Arc<Mutex<File>>,
    piped: Option<Arc<Mutex<Console>>>,
    console: File,
    max_logs: usize,
    max_result: usize,
    usage: Usage,
}

impl Worker {
    fn receive(&mut self) -> Option<Value> {
        let mut header = [0u8; 4];
        self.requests.read_exact(&mut header).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        self.requests.read_exact(&mut body).ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// One answer: its JSON object, then, when it carries one, a newline and the result's text.
    fn send(&mut self, answer: &Value, result: Option<&str>) {
        let mut body = answer.to_string().into_bytes();
        if let Some(text) = result {
            body.push(b'\n');
            body.extend_from_slice(text.as_bytes());
        }
        write_frame(&mut self.responses.lock().unwrap_or_else(|e| e.into_inner()), &body);
    }

    /// Start an execution's console: its output streams as output frames of `request`.
    fn begin_logs(&mut self, request: Option<u64>) {
        if let Some(piped) = self.piped.as_ref() {
            let mut console = piped.lock().unwrap_or_else(|e| e.into_inner());
            console.pump(&self.responses, false); // what came between executions is dropped
            console.running = true;
            console.request = request;
            console.frames = 0;
            console.cut_sent = false;
        }
    }

    /// What the script printed during the execution, cut at the limit, and whether it was
    /// cut; the console is emptied.
    fn take_logs(&mut self) -> (String, bool) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        if let Some(piped) = self.piped.as_ref() {
            let mut console = piped.lock().unwrap_or_else(|e| e.into_inner());
            console.pump(&self.responses, true);
            console.request = None;
            console.running = false;
            console.held.clear();
            let mut text = std::mem::take(&mut console.logs);
            let cut = console.cut;
            if cut {
                text.push_str(TRUNCATED);
            }
            console.size = 0;
            console.cut = false;
            return (text, cut);
        }
        let size = self.console.seek(SeekFrom::End(0)).unwrap_or(0) as usize;
        let mut data = vec![0u8; size.min(self.max_logs)];
        let read = self.console.read_at(&mut data, 0).unwrap_or(0);
        data.truncate(read);
        let _ = self.console.set_len(0);
        let _ = self.console.seek(SeekFrom::Start(0));
        let mut text = String::from_utf8_lossy(&data).into_owned();
        if size > self.max_logs {
            text.push_str(TRUNCATED);
        }
        (text, size > self.max_logs)
    }

    /// The answer, and the result's JSON text when the script returned one.
    fn run(&mut self, event: Value, stream: Option<u64>) -> (Value, Option<String>) {
        self.begin_logs(stream);
        self.usage.reset_peak();
        let cpu = cpu_seconds();
        PANIC.with(|slot| *slot.borrow_mut() = None);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| entry(event)));
        let (logs, cut) = self.take_logs();
        let usage = (cpu_seconds() - cpu, self.usage.peak_bytes());
        let answer = |ok: bool| {
            let mut head = json!({"ok": ok, "logs": logs, "cpu": usage.0, "peak": usage.1});
            if cut {
                head["cut"] = Value::Bool(true);
            }
            head
        };
        let failed = |error: Value| {
            let mut head = answer(false);
            head["error"] = error;
            (head, None)
        };
        match outcome {
            Ok(Ok(text)) => {
                if text.len() > self.max_result {
                    let message = format!("the result is larger than {} bytes", self.max_result);
                    failed(failure("OUTPUT_LIMIT", &message, 0, 0))
                } else {
                    (answer(true), Some(text))
                }
            }
            Ok(Err(Failed::Error(message))) => failed(failure("RUNTIME_ERROR", &message, 0, 0)),
            Ok(Err(Failed::NotJson(message))) => failed(failure("INVALID_RESULT", &message, 0, 0)),
            Err(_) => {
                let (message, line, column) =
                    PANIC.with(|slot| slot.borrow_mut().take()).unwrap_or((String::from("panic"), 0, 0));
                let text = format!("panicked: {}", message);
                failed(failure("RUNTIME_ERROR", &text, line, column))
            }
        }
    }

    /// A `many`: the handler run once per event, in order, each answered as soon as it is
    /// done (its frame names the item).
    fn many(&mut self, id: u64, mut message: Value) {
        let events = match message.get_mut("events").map(Value::take) {
            Some(Value::Array(events)) => events,
            _ => Vec::new(),
        };
        for (item, event) in events.into_iter().enumerate() {
            let (mut answer, result) = self.run(event, None);
            answer["id"] = Value::from(id);
            answer["item"] = Value::from(item as u64);
            self.send(&answer, result.as_deref());
        }
    }

    fn serve(&mut self) {
        // the reader starts before `ready`: the sandbox counts the runtime's own threads then
        if let Some(piped) = self.piped.clone() {
            let responses = self.responses.clone();
            let started = std::thread::Builder::new()
                .name(String::from("console"))
                .stack_size(64 * 1024)
                .spawn(move || read_console(piped, responses));
            if started.is_err() {
                self.console_to_file();
            }
        }
        self.send(&json!({"op": "ready"}), None);
        while let Some(message) = self.receive() {
            let id = message.get("id").and_then(Value::as_u64).unwrap_or(0);
            if message.get("op").and_then(Value::as_str) == Some("many") {
                self.many(id, message);
                continue;
            }
            let event = message.get("event").cloned().unwrap_or(Value::Null);
            let stream = if message.get("stream") == Some(&Value::Bool(true)) { Some(id) } else { None };
            let (mut answer, result) = match message.get("op").and_then(Value::as_str) {
                // the script was bound when it was compiled in: `load` runs it at once
                Some("load") | Some("run") => self.run(event, stream),
                Some("check") => (json!({"ok": true}), None),
                other => {
                    let text = format!("unknown op {:?}", other);
                    (json!({"ok": false, "error": failure("RUNTIME_ERROR", &text, 0, 0)}), None)
                }
            };
            answer["id"] = Value::from(id);
            self.send(&answer, result.as_deref());
        }
    }
}

impl Worker {
    /// No reader thread (the process cap allows none): stdout and stderr go to the file.
    fn console_to_file(&mut self) {
        if let Some(piped) = self.piped.take() {
            let console = piped.lock().unwrap_or_else(|e| e.into_inner());
            unsafe {
                dup2(self.console.as_raw_fd(), 1);
                dup2(self.console.as_raw_fd(), 2);
                close(console.pipes[0]);
                close(console.pipes[1]);
            }
        }
    }
}

/// A pipe for the script's `fd` (1 or 2): its write end becomes `fd`, and its read end,
/// non-blocking, is returned; None when it cannot be made.
fn console_pipe(fd: i32) -> Option<i32> {
    let mut ends = [0i32; 2];
    unsafe {
        if pipe(&mut ends) != 0 {
            return None;
        }
        dup2(ends[1], fd);
        close(ends[1]);
        let flags = fcntl(ends[0], F_GETFL, 0);
        fcntl(ends[0], F_SETFL, flags | O_NONBLOCK);
    }
    Some(ends[0])
}

fn environment_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let response_fd: i32 = match std::env::var("LAMBDA_RESPONSE_FD").ok().and_then(|v| v.parse().ok()) {
        Some(fd) => fd,
        None => {
            eprintln!("LAMBDA_RESPONSE_FD is not set");
            std::process::exit(2);
        }
    };
    // Keep the protocol and the runtime's stderr away from the script: requests move
    // to a private descriptor, stdin reads nothing, stdout and stderr go to a file.
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(std::env::temp_dir().join(".console"))
        .or_else(|_| File::open("/dev/null"))
        .expect("a console file");
    let _ = std::fs::remove_file(std::env::temp_dir().join(".console"));
    let requests = unsafe {
        let fd = dup(0);
        RUNTIME_STDERR = dup(2);
        let null = File::open("/dev/null").expect("/dev/null");
        dup2(null.as_raw_fd(), 0);
        dup2(console.as_raw_fd(), 1);
        dup2(console.as_raw_fd(), 2);
        File::from_raw_fd(fd)
    };
    panic::set_hook(Box::new(|info| panic_hook(info.payload(), info.location())));
    let max_logs = environment_number("LAMBDA_MAX_LOG_BYTES", 65536);
    let piped = match (console_pipe(1), console_pipe(2)) {
        (Some(out), Some(err)) => Some(Arc::new(Mutex::new(Console {
            pipes: [out, err],
            tails: [Vec::new(), Vec::new()],
            limit: max_logs,
            logs: String::new(),
            size: 0,
            cut: false,
            request: None,
            running: false,
            frames: 0,
            last: Instant::now(),
            held: Vec::new(),
            cut_sent: false,
        }))),
        _ => {
            unsafe {
                dup2(console.as_raw_fd(), 1); // the console file, as before: nothing streams
                dup2(console.as_raw_fd(), 2);
            }
            None
        }
    };
    let mut worker = Worker {
        requests,
        responses: Arc::new(Mutex::new(unsafe { File::from_raw_fd(response_fd) })),
        piped,
        console,
        max_logs,
        max_result: environment_number("LAMBDA_MAX_RESULT_BYTES", 1048576),
        usage: Usage::open(),
    };
    worker.serve();
}
