//! The Rust runtime's worker: the program a Rust script is compiled into.
//!
//! The user's script is the module `script` (script.rs beside this file); this
//! program serves many executions of its `handler` over the same framed protocol
//! as the Python and Node.js workers: requests as frames on stdin, answers on the
//! descriptor named by LAMBDA_RESPONSE_FD, a frame being a 4-byte big-endian
//! length and a UTF-8 JSON body; an answer with a result appends a newline and
//! the result's JSON text (see process.py). The script's stdout and stderr go to
//! a file of the scratch directory, read back and emptied after each execution.
//!
//! serde_json cannot make a result JSON does not carry: its integers are 64-bit
//! (kept exactly in result_json), its strings are UTF-8, and a float that is NaN
//! or infinite becomes null (`Value::from(f64::NAN)` is `Value::Null`). Only the
//! nesting depth is the server's to bound (MAX_JSON_DEPTH).
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

const SCRIPT_FILE: &str = "script.rs";
const TRUNCATED: &str = "\n[logs truncated]\n";

extern "C" {
    fn dup(fd: i32) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn abort() -> !;
    fn clock_gettime(clock: i32, spec: *mut [i64; 2]) -> i32;
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

struct Worker {
    requests: File,
    responses: File,
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
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        if self.responses.write_all(&frame).is_err() {
            std::process::exit(1);
        }
    }

    /// What the script printed during the execution, cut at the limit; the file is emptied.
    fn take_logs(&mut self) -> String {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
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
        text
    }

    /// The answer, and the result's JSON text when the script returned one.
    fn run(&mut self, event: Value) -> (Value, Option<String>) {
        self.usage.reset_peak();
        let cpu = cpu_seconds();
        PANIC.with(|slot| *slot.borrow_mut() = None);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| invoke(script::handler, event)));
        let logs = self.take_logs();
        let usage = (cpu_seconds() - cpu, self.usage.peak_bytes());
        let answer = |ok: bool| json!({"ok": ok, "logs": logs, "cpu": usage.0, "peak": usage.1});
        let failed = |error: Value| {
            let mut head = answer(false);
            head["error"] = error;
            (head, None)
        };
        match outcome {
            Ok(Ok(result)) => {
                let text = result.to_string();
                if text.len() > self.max_result {
                    let message = format!("the result is larger than {} bytes", self.max_result);
                    failed(failure("OUTPUT_LIMIT", &message, 0, 0))
                } else {
                    (answer(true), Some(text))
                }
            }
            Ok(Err(message)) => failed(failure("RUNTIME_ERROR", &message, 0, 0)),
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
            let (mut answer, result) = self.run(event);
            answer["id"] = Value::from(id);
            answer["item"] = Value::from(item as u64);
            self.send(&answer, result.as_deref());
        }
    }

    fn serve(&mut self) {
        self.send(&json!({"op": "ready"}), None);
        while let Some(message) = self.receive() {
            let id = message.get("id").and_then(Value::as_u64).unwrap_or(0);
            if message.get("op").and_then(Value::as_str) == Some("many") {
                self.many(id, message);
                continue;
            }
            let event = message.get("event").cloned().unwrap_or(Value::Null);
            let (mut answer, result) = match message.get("op").and_then(Value::as_str) {
                // the script was bound when it was compiled in: `load` runs it at once
                Some("load") | Some("run") => self.run(event),
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
    let mut worker = Worker {
        requests,
        responses: unsafe { File::from_raw_fd(response_fd) },
        console,
        max_logs: environment_number("LAMBDA_MAX_LOG_BYTES", 65536),
        max_result: environment_number("LAMBDA_MAX_RESULT_BYTES", 1048576),
        usage: Usage::open(),
    };
    worker.serve();
}
