//! One weight quantized by the calling thread and the pool's workers, with
//! no hand-off: the calling thread starts on the channels at once, workers
//! join when they wake, and the call returns as soon as every channel is
//! done, without waiting for a worker that has not started yet.
//!
//! `rayon::ThreadPool::in_place_scope` would wait for every spawned job,
//! including jobs of workers that wake only after the calling thread has
//! finished all the work (tens of microseconds per call on busy or virtual
//! machines). Here a worker's job holds only an `Arc` of the shared state:
//! it registers under a lock while the call is open, and a worker that
//! arrives after the call closed touches nothing but that lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use squant_core::case::{self, Flips, Isa, Scratch};
use squant_core::{Layout, Mode, Quantizer, SquantError};

/// Channels are handed out in chunks of about this many elements: small,
/// so that the last chunk (the only wait at the end) is short.
const CHUNK_ELEMS: usize = 1 << 12;

/// Raw views of the call's buffers. Valid while the call is open; chunk
/// `i` covers channels `i * per .. (i + 1) * per`, disjoint between chunks.
struct Buffers {
    w: *const f32,
    codes: *mut i8,
    scale: *mut f32,
    zp: *mut f32,
}

struct State {
    /// Workers may still join.
    open: bool,
    /// Workers that joined and have not finished.
    active: usize,
    flips: Flips,
    failed: bool,
}

struct Shared {
    buf: Buffers,
    layout: Layout,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    per: usize,
    chunks: usize,
    next: AtomicUsize,
    state: Mutex<State>,
    done: Condvar,
}

// SAFETY: the raw pointers are only dereferenced by threads that joined
// while the call was open, for disjoint chunks, and the call does not
// return (nor touch the buffers) before every such thread has finished.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes chunks until none is left. Returns their flips and whether one
    /// failed.
    ///
    /// # Safety
    /// The call must be open for this thread: it joined (or is the caller)
    /// and the call has not returned.
    unsafe fn drain(&self) -> (Flips, bool) {
        let mut sc = Scratch::default();
        let mut flips = Flips::default();
        let g = self.layout.channel_len();
        let oc = self.layout.oc;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.chunks {
                return (flips, false);
            }
            let first = i * self.per;
            let m = self.per.min(oc - first);
            // SAFETY: chunk `i` is taken by this thread only (fetch_add),
            // its ranges lie inside the buffers and do not overlap other
            // chunks' ranges; the buffers outlive the open call.
            let (w, codes, scale, zp) = unsafe {
                (
                    std::slice::from_raw_parts(
                        self.buf.w.add(first * g),
                        (m + 1).min(oc - first) * g,
                    ),
                    std::slice::from_raw_parts_mut(self.buf.codes.add(first * g), m * g),
                    std::slice::from_raw_parts_mut(self.buf.scale.add(first), m),
                    std::slice::from_raw_parts_mut(self.buf.zp.add(first), m),
                )
            };
            for j in 0..m {
                let wc = &w[j * g..(j + 1) * g];
                // The next channel (possibly the first of the next chunk;
                // only read, never written) is prefetched.
                let next = w.get((j + 1) * g..(j + 2) * g).unwrap_or(&[]);
                let qc = &mut codes[j * g..(j + 1) * g];
                let r = case::quantize_channel_isa(
                    wc,
                    next,
                    self.layout.k,
                    self.bits,
                    self.quantizer,
                    self.mode,
                    first + j,
                    qc,
                    &mut sc,
                    Isa::Best,
                );
                match r {
                    Ok((p, f)) => {
                        scale[j] = p.scale;
                        zp[j] = p.zero_point;
                        flips = flips + f;
                    }
                    Err(_) => {
                        // Stop everyone; the caller redoes the weight
                        // serially to name the lowest failing channel.
                        self.next.store(self.chunks, Ordering::Relaxed);
                        return (flips, true);
                    }
                }
            }
        }
    }
}

/// A joined worker's departure: its results recorded and `active`
/// released even if the worker unwinds, so the call never waits forever.
struct Leave<'a> {
    shared: &'a Shared,
    flips: Flips,
    failed: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.flips = st.flips + self.flips;
        st.failed |= self.failed;
        st.active -= 1;
        if st.active == 0 {
            self.shared.done.notify_all();
        }
    }
}

/// `squant_core::quantize` by the calling thread and up to `threads - 1`
/// workers of `pool` (see the module doc). Same results as the serial
/// path; after an error the weight is quantized again serially, which
/// names the lowest failing channel.
#[allow(clippy::too_many_arguments)]
pub fn quantize_shared(
    pool: &rayon::ThreadPool,
    threads: usize,
    data: &[f32],
    layout: Layout,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    codes: &mut [i8],
    scale: &mut [f32],
    zp: &mut [f32],
) -> Result<Flips, SquantError> {
    squant_core::qparams::check_bits(bits)?;
    let n = layout.check()?;
    for (what, expected, got) in [
        ("weights", n, data.len()),
        ("codes", n, codes.len()),
        ("scale", layout.oc, scale.len()),
        ("zero_point", layout.oc, zp.len()),
    ] {
        if expected != got {
            return Err(SquantError::ShapeMismatch {
                what,
                expected,
                got,
            });
        }
    }
    let g = layout.channel_len();
    let per = (CHUNK_ELEMS / g).max(1);
    let chunks = layout.oc.div_ceil(per);
    let shared = Arc::new(Shared {
        buf: Buffers {
            w: data.as_ptr(),
            codes: codes.as_mut_ptr(),
            scale: scale.as_mut_ptr(),
            zp: zp.as_mut_ptr(),
        },
        layout,
        bits,
        quantizer,
        mode,
        per,
        chunks,
        next: AtomicUsize::new(0),
        state: Mutex::new(State {
            open: true,
            active: 0,
            flips: Flips::default(),
            failed: false,
        }),
        done: Condvar::new(),
    });
    for _ in 1..threads.min(chunks) {
        let s = Arc::clone(&shared);
        pool.spawn(move || {
            {
                let mut st = s.lock();
                if !st.open {
                    return;
                }
                st.active += 1;
            }
            let mut leave = Leave {
                shared: &s,
                flips: Flips::default(),
                failed: true, // unless drain() returns
            };
            // SAFETY: this worker joined while the call was open; the call
            // waits for it (`active`, released by `leave`) before returning.
            let (f, failed) = unsafe { s.drain() };
            leave.flips = f;
            leave.failed = failed;
        });
    }
    // SAFETY: the caller's own share, inside the open call.
    let (f, failed) = unsafe { shared.drain() };
    let (flips, failed) = {
        let mut st = shared.lock();
        st.open = false;
        while st.active > 0 {
            st = shared.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        (st.flips + f, st.failed | failed)
    };
    if failed {
        return squant_core::quantize_serial(data, layout, bits, quantizer, mode, codes, scale, zp);
    }
    Ok(flips)
}
