//! Python bindings of squant-core. One flow for every entry point:
//! validate -> borrow the numpy buffer (copy only when it is not
//! C-contiguous) -> allocate the outputs -> run the core with the GIL
//! released, in the chosen pool -> map errors.

mod clip;
mod copy;
mod error;
mod exit;
mod io;
mod model;
mod pool;
mod shared;
mod stats;

use std::borrow::Cow;

use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;
use rayon::prelude::*;
use squant_core::{Layout, Mode, Quantizer};

use crate::error::{InvalidArgumentError, PyCoreError};

type Quantized<'py> = (
    Bound<'py, PyArrayDyn<i8>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    u64,
    u64,
);

/// Below this many elements a weight is quantized on the calling thread:
/// waking a worker costs about as much as the work.
const SERIAL_BELOW: usize = 1 << 15;

/// The Python tuple of one quantized weight: its codes array and the
/// core's other outputs moved into numpy arrays (no copy).
fn to_python<'py>(
    py: Python<'py>,
    codes: Bound<'py, PyArrayDyn<i8>>,
    scale: Vec<f32>,
    zp: Vec<f32>,
    flips: squant_core::Flips,
) -> Quantized<'py> {
    (
        codes,
        scale.into_pyarray(py),
        zp.into_pyarray(py),
        flips.k,
        flips.c,
    )
}

/// The buffer of a C-contiguous array made by [`empty`], to be written.
pub(crate) fn slice_mut<'a, T: numpy::Element>(
    rw: &'a mut numpy::PyReadwriteArrayDyn<'_, T>,
) -> PyResult<&'a mut [T]> {
    rw.as_slice_mut()
        .map_err(|e| InvalidArgumentError::new_err(e.to_string()))
}

/// The layout of a shape, fully checked before anything is copied or
/// allocated (a broadcast view can claim far more elements than memory).
pub(crate) fn layout_of(shape: &[usize]) -> PyResult<Layout> {
    let layout = Layout::from_shape(shape).ok_or_else(|| {
        InvalidArgumentError::new_err(format!(
            "weight must have at least 2 dimensions (OC, IC, *kernel), got {} dimension(s)",
            shape.len()
        ))
    })?;
    layout.check().map_err(PyCoreError)?;
    Ok(layout)
}

/// A zeroed buffer of `n` elements, or `MemoryError` instead of an abort.
pub(crate) fn alloc<T: Clone + Default>(n: usize) -> PyResult<Vec<T>> {
    let mut v = with_room(n)?;
    v.resize(n, T::default());
    Ok(v)
}

/// An empty vector with room for `n` elements, or a `MemoryError`.
pub(crate) fn with_room<T>(n: usize) -> PyResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        PyMemoryError::new_err(format!(
            "cannot allocate {n} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

pub(crate) fn parse_mode(mode: &str) -> PyResult<Mode> {
    mode.parse::<Mode>()
        .map_err(|e| PyErr::from(PyCoreError(e)))
}

pub(crate) fn parse_quantizer(quantizer: &str) -> PyResult<Quantizer> {
    quantizer
        .parse::<Quantizer>()
        .map_err(|e| PyErr::from(PyCoreError(e)))
}

/// The buffer as a row-major slice: borrowed when already C-contiguous
/// and aligned. (`as_slice` alone also accepts Fortran order, which is the
/// wrong order.) Arrays that are not aligned to their element type or
/// whose strides are not whole elements (a field of a packed record array,
/// a buffer read at an odd offset) are copied element by element from
/// their bytes: rust-numpy's views assume neither.
pub(crate) fn row_major<'a, T: numpy::Element + Copy + Default, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> PyResult<Cow<'a, [T]>> {
    let size = std::mem::size_of::<T>() as isize;
    let aligned = (a.data() as usize).is_multiple_of(std::mem::align_of::<T>());
    let whole = a.strides().iter().all(|&st| st % size.max(1) == 0);
    if aligned && whole && a.is_c_contiguous() {
        if let Ok(s) = a.as_slice() {
            return Ok(Cow::Borrowed(s));
        }
    }
    let mut v: Vec<T> = with_room(a.len())?;
    if aligned && whole {
        v.extend(a.as_array().iter().copied());
    } else {
        copy_unaligned(a, &mut v);
    }
    Ok(Cow::Owned(v))
}

/// Appends `a`'s elements in row-major order to `v`, each read from its
/// byte offset (`sum index * stride`) without assuming alignment.
fn copy_unaligned<T: numpy::Element + Copy, D: numpy::ndarray::Dimension>(
    a: &numpy::PyReadonlyArray<'_, T, D>,
    v: &mut Vec<T>,
) {
    let shape = a.shape();
    let strides = a.strides();
    if shape.contains(&0) {
        return;
    }
    let base = a.data() as *const u8;
    let mut index = vec![0usize; shape.len()];
    loop {
        let offset: isize = index
            .iter()
            .zip(strides)
            .map(|(&i, &st)| i as isize * st)
            .sum();
        // SAFETY: numpy guarantees that every index within the shape, at
        // these byte strides from the data pointer, is an element of the
        // array's buffer, which the read-only borrow keeps alive; the read
        // makes no alignment assumption.
        v.push(unsafe { base.offset(offset).cast::<T>().read_unaligned() });
        // the next index in row-major order
        let mut d = shape.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// quantize(w, bits, mode, threads=None, quantizer="asymmetric")
/// --
///
/// SQuant-quantize a float32 weight of shape (OC, IC, *kernel). Returns
/// (codes int8 of w's shape, scale (OC,), zero_point (OC,), k_flips, c_flips).
#[pyfunction]
#[pyo3(signature = (w, bits, mode, threads=None, quantizer="asymmetric"))]
fn quantize<'py>(
    py: Python<'py>,
    w: PyReadonlyArrayDyn<'py, f32>,
    bits: u32,
    mode: &str,
    threads: Option<usize>,
    quantizer: &str,
) -> PyResult<Quantized<'py>> {
    let mode = parse_mode(mode)?;
    let quantizer = parse_quantizer(quantizer)?;
    let shape = w.shape().to_vec();
    let layout = layout_of(&shape)?;
    let threads = pool::resolve_threads(threads)?;
    let data = row_major(&w)?;
    // The codes array comes from numpy's allocator (huge pages for large
    // arrays, cached for reuse, nothing zeroed): far fewer page faults than
    // a fresh zeroed Vec, and no copy on return.
    let codes = empty::<i8>(py, &shape, "int8")?;
    let mut scale = alloc::<f32>(layout.oc)?;
    let mut zp = alloc::<f32>(layout.oc)?;
    let flips = {
        let mut rw = codes.readwrite();
        let out = slice_mut(&mut rw)?;
        if threads == 1 || layout.len() < SERIAL_BELOW {
            // No hand-off to a pool and back (tens of microseconds each way).
            crate::exit::detach(py, || {
                squant_core::quantize_serial(
                    &data, layout, bits, quantizer, mode, out, &mut scale, &mut zp,
                )
            })
        } else {
            let pool = pool::pool(threads)?;
            crate::exit::detach(py, || {
                shared::quantize_shared(
                    &pool, threads, &data, layout, bits, quantizer, mode, out, &mut scale, &mut zp,
                )
            })
        }
        .map_err(PyCoreError)?
    };
    Ok(to_python(py, codes, scale, zp, flips))
}

/// One weight of a `quantize_many` call, ready to run.
struct Job<'a> {
    layout: Layout,
    data: Cow<'a, [f32]>,
    scale: Vec<f32>,
    zp: Vec<f32>,
}

/// quantize_many(ws, bits, mode, threads=None, quantizer="asymmetric")
/// --
///
/// quantize() on every float32 weight of a list in one parallel run (the
/// threads share the weights and their channels; no per-weight start-up).
/// Returns the list of quantize()'s tuples. An error names the weight by
/// its position: "weight 3: ...".
#[pyfunction]
#[pyo3(signature = (ws, bits, mode, threads=None, quantizer="asymmetric"))]
fn quantize_many<'py>(
    py: Python<'py>,
    ws: Vec<PyReadonlyArrayDyn<'py, f32>>,
    bits: u32,
    mode: &str,
    threads: Option<usize>,
    quantizer: &str,
) -> PyResult<Vec<Quantized<'py>>> {
    let mode = parse_mode(mode)?;
    let quantizer = parse_quantizer(quantizer)?;
    squant_core::qparams::check_bits(bits).map_err(PyCoreError)?;
    let pool = pool::pool(pool::resolve_threads(threads)?)?;
    let mut jobs = Vec::with_capacity(ws.len());
    let mut codes = Vec::with_capacity(ws.len());
    for (i, w) in ws.iter().enumerate() {
        let shape = w.shape().to_vec();
        let layout = layout_of(&shape).map_err(|e| with_index(py, e, i))?;
        jobs.push(Job {
            layout,
            data: row_major(w)?,
            scale: alloc::<f32>(layout.oc)?,
            zp: alloc::<f32>(layout.oc)?,
        });
        codes.push(empty::<i8>(py, &shape, "int8")?);
    }
    let mut rw: Vec<_> = codes.iter().map(|c| c.readwrite()).collect();
    let mut outs = Vec::with_capacity(rw.len());
    for r in rw.iter_mut() {
        outs.push(slice_mut(r)?);
    }
    let results: Vec<Result<squant_core::Flips, squant_core::SquantError>> =
        crate::exit::detach(py, || {
            pool.install(|| {
                jobs.par_iter_mut()
                    .zip(outs.par_iter_mut())
                    .map(|(job, out)| {
                        squant_core::quantize(
                            &job.data,
                            job.layout,
                            bits,
                            quantizer,
                            mode,
                            out,
                            &mut job.scale,
                            &mut job.zp,
                        )
                    })
                    .collect()
            })
        });
    drop(rw);
    let mut ret = Vec::with_capacity(results.len());
    for (i, ((res, job), c)) in results.into_iter().zip(jobs).zip(codes).enumerate() {
        let flips = res.map_err(|e| with_index(py, PyCoreError(e).into(), i))?;
        ret.push(to_python(py, c, job.scale, job.zp, flips));
    }
    Ok(ret)
}

/// The same exception with "weight {i}: " before its message.
pub(crate) fn with_index(py: Python<'_>, err: PyErr, i: usize) -> PyErr {
    let msg = format!("weight {i}: {}", err.value(py));
    PyErr::from_type(err.get_type(py), msg)
}

/// A C-order numpy array of `shape` (its size already checked by
/// `layout_of`) and dtype `dtype` (matching `T`), for outputs that are
/// written in full before Python sees them (on an error they are dropped
/// unseen). Made by `numpy.empty`: numpy's allocator caches freed blocks
/// and asks for huge pages for large arrays, nothing is zeroed that is about
/// to be overwritten, and it raises `MemoryError` when the allocation fails
/// (rust-numpy's `PyArray::new` would panic). Its pages are then mapped in
/// one go ([`prefault`]).
pub(crate) fn empty<'py, T: numpy::Element>(
    py: Python<'py>,
    shape: &[usize],
    dtype: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("empty", (shape.to_vec(), dtype))?;
    let arr = arr.cast_into::<PyArrayDyn<T>>()?;
    prefault(
        arr.data().cast::<u8>(),
        arr.len() * std::mem::size_of::<T>(),
    );
    Ok(arr)
}

/// Maps the pages of a fresh output buffer in one system call
/// (`MADV_POPULATE_WRITE`, Linux 5.14+) instead of one page fault per 4 KiB
/// page during the parallel run (about 3 us each on virtual machines: 18 ms
/// for the 25 MB of ResNet-50 codes). Best effort: errors (older kernels)
/// are ignored, and the memory is already valid either way.
fn prefault(ptr: *mut u8, len: usize) {
    // Below a few pages a system call saves nothing.
    prefault_pages(ptr, len, 16);
}

/// [`prefault`] of a buffer of at least `min_pages` pages.
#[cfg(target_os = "linux")]
pub(crate) fn prefault_pages(ptr: *mut u8, len: usize, min_pages: usize) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    const PAGE: usize = 4096;
    if len < min_pages.max(1) * PAGE {
        return;
    }
    let start = (ptr as usize).div_ceil(PAGE) * PAGE;
    let end = (ptr as usize + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside the array's own allocation;
        // MADV_POPULATE_WRITE only maps pages (their contents are kept).
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE);
        }
    }
}

/// Asks for transparent huge pages for the 2 MiB-aligned part of a buffer
/// about to be written in full (the kernel then maps, and zeroes, 2 MiB per
/// fault instead of 4 KiB). Best effort, like [`prefault`]; contents kept.
#[cfg(target_os = "linux")]
pub(crate) fn advise_huge(ptr: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).div_ceil(HUGE) * HUGE;
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the buffer's own allocation;
        // MADV_HUGEPAGE only changes how its pages are backed.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn advise_huge(_ptr: *mut u8, _len: usize) {}

#[cfg(not(target_os = "linux"))]
pub(crate) fn prefault_pages(_ptr: *mut u8, _len: usize, _min_pages: usize) {}

/// quantize_reference(w, bits, mode, quantizer="asymmetric")
/// --
///
/// The scalar Rust reference (slow, sequential): same outputs as quantize().
#[pyfunction]
#[pyo3(signature = (w, bits, mode, quantizer="asymmetric"))]
fn quantize_reference<'py>(
    py: Python<'py>,
    w: PyReadonlyArrayDyn<'py, f32>,
    bits: u32,
    mode: &str,
    quantizer: &str,
) -> PyResult<Quantized<'py>> {
    let mode = parse_mode(mode)?;
    let quantizer = parse_quantizer(quantizer)?;
    let shape = w.shape().to_vec();
    let layout = layout_of(&shape)?;
    let data = row_major(&w)?;
    let (codes, params, flips) = crate::exit::detach(py, || {
        squant_core::quantize_ref(&data, layout, bits, quantizer, mode)
    })
    .map_err(PyCoreError)?;
    let scale = params.iter().map(|p| p.scale).collect();
    let zp = params.iter().map(|p| p.zero_point).collect();
    let codes = codes.into_pyarray(py).reshape(shape)?;
    Ok(to_python(py, codes, scale, zp, flips))
}

/// dequantize(codes, scale, zero_point, threads=None)
/// --
///
/// (codes + zero_point[o]) / scale[o] in float32, codes of shape (OC, ...).
#[pyfunction]
#[pyo3(signature = (codes, scale, zero_point, threads=None))]
fn dequantize<'py>(
    py: Python<'py>,
    codes: PyReadonlyArrayDyn<'py, i8>,
    scale: PyReadonlyArray1<'py, f32>,
    zero_point: PyReadonlyArray1<'py, f32>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = codes.shape().to_vec();
    let layout = layout_of(&shape)?;
    let pool = pool::pool(pool::resolve_threads(threads)?)?;
    let q = row_major(&codes)?;
    let s = row_major(&scale)?.into_owned();
    let z = row_major(&zero_point)?.into_owned();
    let out = empty::<f32>(py, &shape, "float32")?;
    {
        let mut rw = out.readwrite();
        let dst = slice_mut(&mut rw)?;
        crate::exit::detach(py, || {
            pool.install(|| squant_core::dequantize(&q, layout, &s, &z, dst))
        })
        .map_err(PyCoreError)?;
    }
    Ok(out)
}

/// simd_build()
/// --
///
/// The build of the core's fast path that runs on this CPU: "avx512",
/// "avx2" or "baseline" (x86-64), "neon" (aarch64) or "portable".
#[pyfunction]
fn simd_build() -> &'static str {
    squant_core::case::best_build()
}

/// resolve_threads(threads=None)
/// --
///
/// The thread count a call would use (argument, else SQUANT_NUM_THREADS, else CPUs).
#[pyfunction]
#[pyo3(signature = (threads=None))]
fn resolve_threads(threads: Option<usize>) -> PyResult<usize> {
    pool::resolve_threads(threads)
}

/// Fills, at import, the caches that rust-numpy fills on first use (its
/// handle on numpy's C API, the shared borrow checker): pyo3 releases the
/// GIL while it fills them, and a daemon thread that did so for the first
/// time while the interpreter exits was ended inside this module, which
/// aborted the process (see `exit.rs`).
fn warm_up(py: Python<'_>) -> PyResult<()> {
    let a = empty::<f32>(py, &[1], "float32")?;
    drop(a.readonly());
    drop(a.readwrite());
    Ok(())
}

#[pymodule]
fn _squant_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The package's writers rename every finished file once more (from the
    // temporary name `formats.output.staged_output` gives the writer) and
    // sync the directory after that rename themselves.
    squant_io::write::leave_directory_sync_to_caller();
    warm_up(m.py())?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_many, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_reference, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_threads, m)?)?;
    m.add_function(wrap_pyfunction!(model::quantize_into, m)?)?;
    m.add_function(wrap_pyfunction!(model::dequantize_into, m)?)?;
    m.add_function(wrap_pyfunction!(copy::copy_tree, m)?)?;
    m.add_function(wrap_pyfunction!(simd_build, m)?)?;
    m.add_function(wrap_pyfunction!(stats::normal_cdf, m)?)?;
    m.add_function(wrap_pyfunction!(stats::channel_dots, m)?)?;
    m.add_function(wrap_pyfunction!(stats::scale_channels, m)?)?;
    m.add_function(wrap_pyfunction!(clip::clip_ratios, m)?)?;
    m.add_function(wrap_pyfunction!(clip::clip_rows, m)?)?;
    io::register(m)?;
    let py = m.py();
    m.add("SquantError", py.get_type::<error::SquantError>())?;
    m.add(
        "NonFiniteWeightError",
        py.get_type::<error::NonFiniteWeightError>(),
    )?;
    m.add("WeightRangeError", py.get_type::<error::WeightRangeError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<error::InvalidArgumentError>(),
    )?;
    m.add("THREADS_ENV_VAR", pool::ENV_VAR)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
