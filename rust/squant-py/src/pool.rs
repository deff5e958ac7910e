//! The thread-count knob. No pool exists at import time; pools are built on
//! first use and cached per thread count, and rebuilt in a forked child
//! (whose copy of the parent's pool has no threads and would deadlock).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::PyResult;
use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::InvalidArgumentError;

/// At most this many pools are kept alive at once.
const MAX_POOLS: usize = 2;

/// Upper bound of a thread count (argument or environment).
pub const MAX_THREADS: usize = 1024;

/// Environment variable read when no `threads` argument is given.
pub const ENV_VAR: &str = "SQUANT_NUM_THREADS";

struct Cache {
    pid: u32,
    pools: HashMap<usize, Arc<ThreadPool>>,
}

static POOLS: Mutex<Option<Cache>> = Mutex::new(None);

/// Thread count from the argument, else `SQUANT_NUM_THREADS`, else the
/// number of CPUs available to the process.
pub fn resolve_threads(threads: Option<usize>) -> PyResult<usize> {
    if let Some(n) = threads {
        if n == 0 || n > MAX_THREADS {
            return Err(InvalidArgumentError::new_err(format!(
                "threads must be an integer in 1..={MAX_THREADS}, got {n}"
            )));
        }
        return Ok(n);
    }
    match std::env::var(ENV_VAR) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            _ => Err(InvalidArgumentError::new_err(format!(
                "{ENV_VAR} must be an integer in 1..={MAX_THREADS}, got {v:?}"
            ))),
        },
        Err(_) => Ok(cpus()),
    }
}

/// The number of CPUs available to the process, looked up once:
/// `available_parallelism` reads the cgroup files and the affinity mask on
/// every call (tens of microseconds, paid twice per `quantize_tensor`).
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// The pool for `n` threads, built on first use in this process.
pub fn pool(n: usize) -> PyResult<Arc<ThreadPool>> {
    let pid = std::process::id();
    let mut guard = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = guard.get_or_insert_with(|| Cache {
        pid,
        pools: HashMap::new(),
    });
    if cache.pid != pid {
        // Forked child: the parent's worker threads do not exist here. Leak
        // the stale pools (dropping them would wait for those threads).
        for (_, p) in cache.pools.drain() {
            std::mem::forget(p);
        }
        cache.pid = pid;
    }
    if let Some(p) = cache.pools.get(&n) {
        return Ok(Arc::clone(p));
    }
    if cache.pools.len() >= MAX_POOLS {
        // Callers switching between many counts must not pile up threads;
        // a dropped pool's workers exit once idle (running calls keep theirs).
        cache.pools.clear();
    }
    let p = ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("squant-{i}"))
        .build()
        .map_err(|e| InvalidArgumentError::new_err(format!("cannot start {n} threads: {e}")))?;
    let p = Arc::new(p);
    cache.pools.insert(n, Arc::clone(&p));
    Ok(p)
}
