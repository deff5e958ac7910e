//! The interpreter's exit, seen from threads that run native work with the
//! GIL released.
//!
//! When the interpreter exits while a daemon thread is inside a native call
//! (`save_quantized` or `quantize_tensors` in a `threading.Thread(daemon=True)`),
//! that thread must not take the GIL again: CPython ends such a thread with
//! `pthread_exit` when it tries, and that forced unwind through this
//! module's Rust frames aborts the process ("FATAL: exception not
//! rethrown", exit status 134). [`detach`] (used for every GIL release in
//! this crate instead of `Python::detach`) therefore parks a thread other
//! than the exiting one for good once the exit has begun ([`begin`], from
//! the `atexit` hook `io_at_exit`): before its work when the exit came
//! first (so it creates no file), or after it. A parked thread holds no
//! GIL and ends with the process, as CPython's daemon threads do.
//! Non-daemon threads were joined before `atexit` handlers run, so only
//! daemon threads (or threads started outside `threading`) can be parked.

use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use pyo3::Python;

struct State {
    /// The thread that ran the exit hook (the interpreter's exiting thread).
    exiting: Option<ThreadId>,
    /// Threads between their decision to take the GIL again and having it.
    returning: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    exiting: None,
    returning: 0,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Marks the exit as begun, by the calling thread (the one that finalizes
/// the interpreter; later calls change nothing), then waits (the GIL
/// released, at most 10 s) for the threads that had already decided to
/// take the GIL again to have it: one still waiting for it when the
/// interpreter is finalized would be ended inside this module.
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

/// Whether this thread must not come back to Python: the exit has begun
/// and this is not the exiting thread.
fn stranded(st: &State) -> bool {
    st.exiting.is_some_and(|t| t != std::thread::current().id())
}

/// `py.detach(f)`, except that a thread other than the exiting one never
/// re-takes the GIL once the interpreter's exit has begun (see the module
/// doc): it parks before `f` if the exit came first, else after it.
#[allow(clippy::disallowed_methods)] // the one place that calls it
pub fn detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    let result = py.detach(|| {
        if stranded(&state()) {
            park_forever();
        }
        let result = f();
        let mut st = state();
        if stranded(&st) {
            drop(st);
            park_forever();
        }
        // From here until the GIL is taken again, `begin` waits.
        st.returning += 1;
        result
    });
    state().returning -= 1;
    result
}
