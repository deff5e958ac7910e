//! The interpreter's exit, seen from daemon threads that run native work
//! with the GIL released.
//!
//! When the interpreter is finalized while a daemon thread is inside a
//! native call (`save_quantized` or `quantize_tensors` in a
//! `threading.Thread(daemon=True)`), that thread must not take the GIL
//! again: CPython ends such a thread with `pthread_exit` when it tries, and
//! that forced unwind through this module's Rust frames aborts the process
//! ("FATAL: exception not rethrown", exit status 134). [`detach`] (used for
//! every GIL release in this crate instead of `Python::detach`) therefore
//! keeps a daemon thread from taking the GIL again once the exit has begun
//! ([`begin`], from the `atexit` hook `io_at_exit`): it waits, without the
//! GIL, until the interpreter is being finalized (then it parks for good:
//! it holds no GIL and ends with the process, as CPython's daemon threads
//! do) or, if that has not happened after [`SETTLE`] (a later `atexit`
//! handler joins this thread, say), goes on as usual. Other threads (the
//! main thread, non-daemon threads an `atexit` handler starts) are never
//! held: they are not ended by the finalization.

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// How long a daemon thread waits, once the exit has begun, for the
/// interpreter's finalization before it takes the GIL again after all.
const SETTLE: Duration = Duration::from_secs(1);

struct State {
    /// The thread that ran the exit hook (the interpreter's exiting thread).
    exiting: Option<ThreadId>,
    /// Daemon threads between their decision to take the GIL again and
    /// having it.
    returning: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    exiting: None,
    returning: 0,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// Whether this thread is one the finalization ends (computed once).
    static DAEMON: Cell<Option<bool>> = const { Cell::new(None) };
    /// When this thread first waited for the finalization (its [`SETTLE`]
    /// runs from then, over all its later calls).
    static WAITING_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Whether the calling thread is a daemon thread of `threading` or one
/// `threading` does not know (both are ended by the finalization). Read
/// from `threading._active` and the thread's `_daemonic` flag, with no
/// Python code run; false where that fails (such a thread is never held).
fn is_daemon(py: Python<'_>) -> bool {
    DAEMON.with(|cell| {
        if let Some(d) = cell.get() {
            return d;
        }
        let d = daemon_flag(py).unwrap_or(false);
        cell.set(Some(d));
        d
    })
}

fn daemon_flag(py: Python<'_>) -> PyResult<bool> {
    let modules = py.import("sys")?.getattr("modules")?;
    let Some(threading) = modules.cast::<PyDict>()?.get_item("threading")? else {
        return Ok(false);
    };
    let ident = threading.getattr("get_ident")?.call0()?;
    match threading
        .getattr("_active")?
        .cast::<PyDict>()?
        .get_item(ident)?
    {
        Some(thread) => thread.getattr("_daemonic")?.extract(),
        None => Ok(true),
    }
}

/// CPython's `Py_IsFinalizing` (3.13+) or `_Py_IsFinalizing` (before),
/// looked up at run time (neither is in the stable ABI of every version
/// this module supports); `None` where neither is found.
fn is_finalizing_fn() -> Option<unsafe extern "C" fn() -> c_int> {
    static FN: OnceLock<Option<unsafe extern "C" fn() -> c_int>> = OnceLock::new();
    *FN.get_or_init(|| {
        for name in [c"Py_IsFinalizing", c"_Py_IsFinalizing"] {
            // SAFETY: dlsym with a NUL-terminated name; the symbol, where
            // found, is CPython's `int (void)` function.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            if !p.is_null() {
                // SAFETY: see above.
                return Some(unsafe {
                    std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn() -> c_int>(p)
                });
            }
        }
        None
    })
}

/// Whether the interpreter is being finalized (a flag read without the GIL).
fn finalizing() -> bool {
    // SAFETY: the function reads the runtime's finalization flag.
    is_finalizing_fn().is_some_and(|f| unsafe { f() } != 0)
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Marks the exit as begun, by the calling thread (later calls change
/// nothing), then waits (the GIL released, at most 10 s) for the daemon
/// threads that had already decided to take the GIL again to have it: one
/// still waiting for it when the interpreter is finalized would be ended
/// inside this module.
pub fn begin(py: Python<'_>) {
    {
        let mut st = state();
        if st.exiting.is_some() {
            return;
        }
        st.exiting = Some(std::thread::current().id());
        if st.returning == 0 {
            return;
        }
    }
    #[allow(clippy::disallowed_methods)] // waits for threads that need the GIL
    py.detach(|| {
        let start = Instant::now();
        while state().returning > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// For a daemon thread about to take the GIL again (or to start native
/// work) once the exit has begun: waits for the finalization (then parks
/// for good), until [`SETTLE`] after the thread first waited (one wait per
/// thread, not per call). Returns the state's lock, held, for the caller
/// to count itself as returning.
fn settle() -> MutexGuard<'static, State> {
    let mut start = None;
    loop {
        let st = state();
        if st.exiting.is_none() {
            return st;
        }
        drop(st);
        if finalizing() {
            park_forever();
        }
        let since = *start.get_or_insert_with(|| {
            WAITING_SINCE.with(|w| {
                let t = w.get().unwrap_or_else(Instant::now);
                w.set(Some(t));
                t
            })
        });
        if since.elapsed() >= SETTLE {
            return state();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `py.detach(f)`, except that a daemon thread does not take the GIL again
/// while the interpreter's exit is under way (see the module doc): once it
/// has begun, such a thread waits before `f` (so that it starts no work
/// the finalization would cut short) and after it, parking for good if the
/// interpreter is finalized meanwhile.
#[allow(clippy::disallowed_methods)] // the one place that calls it
pub fn detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    if !is_daemon(py) {
        return py.detach(f);
    }
    let result = py.detach(|| {
        drop(settle());
        let result = f();
        // From here until the GIL is taken again, `begin` waits.
        settle().returning += 1;
        result
    });
    state().returning -= 1;
    result
}
