//! Bindings of squant-io: checkpoint files (safetensors / squant-rs) read,
//! quantized and written in Rust. The file work runs with the GIL released
//! on the calling thread (parallel sections in the chosen pool); progress
//! callbacks and signal checks re-take the GIL between blocks, so Ctrl-C
//! stops a long run (the partial output is removed).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use squant_core::Mode;
use squant_io::format::{Kind, QEntry, Quantizer, SquantFile, SquantWriter};
use squant_io::{dtype, IoError};

use crate::error::{InvalidArgumentError, NonFiniteWeightError, WeightRangeError};
use crate::pool;

/// A Python exception class defined in the pure-Python package.
fn py_class<'py>(py: Python<'py>, module: &str, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import(module)?.getattr(name)
}

/// An I/O error as the Python exception the API documents.
/// What a file operation refused once the exit's clean-up ran says.
const EXITING: &str = "the interpreter is exiting (runs still in progress were stopped and \
                       their temporary output removed): no file is written any more";

fn to_py(py: Python<'_>, err: IoError, cancelled: &mut Option<PyErr>) -> PyErr {
    let msg = err.to_string();
    let made = match err {
        IoError::Format(_) => py_class(py, "squant_rs.errors", "FormatError")
            .and_then(|c| c.call1((msg,)))
            .map(PyErr::from_value),
        IoError::UnsupportedDtype(_) => py_class(py, "squant_rs.errors", "UnsupportedDtypeError")
            .and_then(|c| c.call1((msg,)))
            .map(PyErr::from_value),
        IoError::Os { path, source } => {
            let errno = source.raw_os_error().unwrap_or(0);
            let reason = squant_io::error::os_reason(&source);
            py.get_type::<PyOSError>()
                // The path as `os.fsdecode` gives it (surrogate escapes, not U+FFFD).
                .call1((errno, reason, path.into_os_string()))
                .map(PyErr::from_value)
        }
        IoError::Unsynced { path, source } => {
            let errno = source.raw_os_error().unwrap_or(0);
            let reason = squant_io::error::unsynced_reason(&source);
            py.get_type::<PyOSError>()
                .call1((errno, reason, path.into_os_string()))
                .map(PyErr::from_value)
        }
        IoError::Quantize { source, .. } => Ok(match source {
            squant_core::SquantError::NonFinite { .. } => NonFiniteWeightError::new_err(msg),
            squant_core::SquantError::RangeTooLarge { .. } => WeightRangeError::new_err(msg),
            _ => InvalidArgumentError::new_err(msg),
        }),
        IoError::InvalidArgument(_) => Ok(InvalidArgumentError::new_err(msg)),
        IoError::Cancelled => Ok(cancelled.take().unwrap_or_else(|| {
            InvalidArgumentError::new_err(if squant_io::write::cleaning_up() {
                EXITING
            } else {
                "cancelled"
            })
        })),
    };
    made.unwrap_or_else(|e| e)
}

fn mode_of(mode: &str) -> PyResult<Mode> {
    mode.parse::<Mode>()
        .map_err(|e| InvalidArgumentError::new_err(e.to_string()))
}

fn dtype_of(name: &str) -> PyResult<dtype::Dtype> {
    dtype::from_name(name)
        .ok_or_else(|| InvalidArgumentError::new_err(format!("unsupported dtype {name:?}")))
}

fn quantizer_of(name: &str) -> PyResult<Quantizer> {
    match name {
        "asymmetric" => Ok(Quantizer::Asymmetric),
        "symmetric" => Ok(Quantizer::Symmetric),
        other => Err(InvalidArgumentError::new_err(format!(
            "quantizer must be 'asymmetric' or 'symmetric', got {other:?}"
        ))),
    }
}

/// A progress callback for squant-io that re-takes the GIL, checks for
/// signals (KeyboardInterrupt) and calls `progress(done, total, name)`.
/// Once the interpreter is exiting ([`io_at_exit`] ran, or it is being
/// finalized: a daemon thread's run) it stops the run without the GIL.
fn progress_fn<'a>(
    progress: &'a Option<Py<PyAny>>,
    stash: &'a Mutex<Option<PyErr>>,
) -> impl FnMut(u64, u64, &str) -> squant_io::Result<()> + 'a {
    move |done, total, name| {
        if squant_io::write::cleaning_up() {
            return Err(IoError::Cancelled);
        }
        let called = Python::try_attach(|py| {
            py.check_signals()?;
            if let Some(cb) = progress {
                cb.call1(py, (done, total, name))?;
            }
            Ok::<(), PyErr>(())
        });
        match called {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                if let Ok(mut s) = stash.lock() {
                    *s = Some(e);
                }
                Err(IoError::Cancelled)
            }
            None => Err(IoError::Cancelled),
        }
    }
}

/// Quantizing runs in progress (the GIL released), in any thread, and the
/// process they run in (a child forked meanwhile has none).
static RUNS: AtomicUsize = AtomicUsize::new(0);
static RUNS_PID: AtomicU32 = AtomicU32::new(0);

struct Run;

impl Run {
    fn enter() -> Run {
        let me = std::process::id();
        if RUNS_PID.swap(me, Ordering::SeqCst) != me {
            // A child forked during its parent's runs: none of them is its own.
            RUNS.store(0, Ordering::SeqCst);
        }
        RUNS.fetch_add(1, Ordering::SeqCst);
        Run
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        RUNS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the file work `f` with the GIL released, counted in [`RUNS`]. A
/// run that the interpreter's exit stopped ([`io_at_exit`]: a daemon
/// thread's) does not come back to Python, which is being finalized: its
/// thread parks once its clean-up is done (`crate::exit::detach`).
fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> squant_io::Result<T> + Send,
) -> squant_io::Result<T> {
    crate::exit::detach(py, || {
        // A run started after the exit's clean-up (in a later atexit
        // handler, in the exiting thread) is refused: no file is written
        // any more.
        if squant_io::write::cleaning_up() {
            return Err(IoError::InvalidArgument(EXITING.into()));
        }
        let _run = Run::enter();
        f()
    })
}

/// For atexit: marks the interpreter's exit as begun (see `exit.rs`: a
/// daemon thread inside a native call parks instead of taking the GIL
/// again). Files still being written by other (daemon) threads are then
/// removed, and quantizing runs still in progress stopped: a checkpoint run
/// (its temporary files and directories were left, and its next progress
/// step panicked in the finalized interpreter) or a `save_quantized` (its
/// temporary file was left and the process aborted). It then waits (the
/// GIL released, at most 10 s) until each checkpoint run has stopped, so
/// that none is still in Python (a progress callback) when the interpreter
/// is finalized. Does nothing more when nothing is being written.
#[pyfunction]
pub fn io_at_exit(py: Python<'_>) {
    crate::exit::begin(py);
    let me = std::process::id();
    let runs = RUNS.load(Ordering::SeqCst) > 0 && RUNS_PID.load(Ordering::SeqCst) == me;
    if runs || squant_io::write::live_temp_files() > 0 {
        crate::exit::detach(py, || {
            squant_io::remove_live_temp_files();
            let start = std::time::Instant::now();
            while RUNS.load(Ordering::SeqCst) > 0 && start.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
    }
}

fn finish_err(py: Python<'_>, err: IoError, stash: Mutex<Option<PyErr>>) -> PyErr {
    let mut cancelled = stash.into_inner().unwrap_or_else(|p| p.into_inner());
    to_py(py, err, &mut cancelled)
}

type LayerTuple = (String, Vec<usize>, f64, f64, u64, u64);
type ReportTuple = (Vec<LayerTuple>, usize, u64, u64);

fn report_tuple(r: squant_io::Report) -> ReportTuple {
    let layers = r
        .layers
        .into_iter()
        .map(|l| {
            (
                l.name,
                l.shape,
                l.time_ms,
                l.rel_error,
                l.k_flips,
                l.c_flips,
            )
        })
        .collect();
    (layers, r.tensors, r.size_before, r.size_after)
}

fn options(
    bits: u32,
    mode: &str,
    include: Vec<String>,
    skip: Vec<String>,
    threads: Option<usize>,
    quantizer: &str,
) -> PyResult<squant_io::Options> {
    squant_core::qparams::check_bits(bits)
        .map_err(|e| InvalidArgumentError::new_err(e.to_string()))?;
    let n = pool::resolve_threads(threads)?;
    Ok(squant_io::Options {
        bits,
        mode: mode_of(mode)?,
        quantizer: quantizer_of(quantizer)?,
        include,
        skip,
        pool: Some(pool::pool(n)?),
    })
}

/// io_quantize_file(src, dst, bits, mode, include, skip, threads=None, progress=None, require_selection=True, quantizer="asymmetric")
/// --
///
/// Quantize a safetensors file into a squant-rs file (block by block from a
/// memory map, written atomically). Returns (layers, tensors, size_before,
/// size_after), layers as (name, shape, time_ms, rel_error, k_flips, c_flips).
#[pyfunction]
#[pyo3(signature = (src, dst, bits, mode, include, skip, threads=None, progress=None, require_selection=true, quantizer="asymmetric"))]
#[allow(clippy::too_many_arguments)]
pub fn io_quantize_file(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    bits: u32,
    mode: &str,
    include: Vec<String>,
    skip: Vec<String>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    require_selection: bool,
    quantizer: &str,
) -> PyResult<ReportTuple> {
    let opts = options(bits, mode, include, skip, threads, quantizer)?;
    let stash = Mutex::new(None);
    let result = run_detached(py, || {
        let mut cb = progress_fn(&progress, &stash);
        let file = squant_io::quant::open_input(&src)?;
        let selected = squant_io::quant::selection(&file, &opts);
        if require_selection && !selected.iter().any(|&s| s) {
            return Err(IoError::InvalidArgument(format!(
                "{}: no tensor to quantize (none is a floating tensor of 2+ dimensions matching the include patterns)",
                src.display()
            )));
        }
        let total = file.entries.iter().map(|e| e.nbytes() as u64).sum();
        squant_io::quant::quantize_open(&file, &dst, &opts, &selected, &mut cb, 0, total)
    });
    result
        .map(report_tuple)
        .map_err(|e| finish_err(py, e, stash))
}

/// io_quantize_sharded(src, dst, bits, mode, include, skip, threads=None, progress=None, quantizer="asymmetric")
/// --
///
/// Quantize a sharded checkpoint (directory with model.safetensors.index.json,
/// or the index) into the directory dst. Returns (report tuple, shards,
/// input_size).
#[pyfunction]
#[pyo3(signature = (src, dst, bits, mode, include, skip, threads=None, progress=None, quantizer="asymmetric"))]
#[allow(clippy::too_many_arguments)]
pub fn io_quantize_sharded(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    bits: u32,
    mode: &str,
    include: Vec<String>,
    skip: Vec<String>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    quantizer: &str,
) -> PyResult<(ReportTuple, usize, u64)> {
    let opts = options(bits, mode, include, skip, threads, quantizer)?;
    let stash = Mutex::new(None);
    let result = run_detached(py, || {
        let mut cb = progress_fn(&progress, &stash);
        squant_io::quantize_sharded(&src, &dst, &opts, true, &mut cb)
    });
    result
        .map(|r| (report_tuple(r.report), r.shards, r.input_size))
        .map_err(|e| finish_err(py, e, stash))
}

/// io_check_input(path)
/// --
///
/// Check that path is a safetensors file to quantize (header only): a
/// squant-rs file (already quantized) raises InvalidArgumentError, in the
/// words every quantizing path uses (io_quantize_file, io_quantize_sharded).
#[pyfunction]
pub fn io_check_input(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    crate::exit::detach(py, || squant_io::quant::open_input(&path))
        .map(drop)
        .map_err(|e| to_py(py, e, &mut None))
}

/// io_is_sharded(path)
/// --
///
/// Whether path is a sharded checkpoint (a directory with an index, or the index).
#[pyfunction]
pub fn io_is_sharded(path: PathBuf) -> bool {
    squant_io::is_sharded(&path)
}

/// io_shard_files(path)
/// --
///
/// The shard files of the sharded checkpoint path (a directory with an
/// index, or the index), in index order: the index read and checked as
/// io_quantize_sharded reads it.
#[pyfunction]
pub fn io_shard_files(py: Python<'_>, path: PathBuf) -> PyResult<Vec<PathBuf>> {
    let index = crate::exit::detach(py, || squant_io::sharded::read_index(&path))
        .map_err(|e| to_py(py, e, &mut None))?;
    Ok(index.shards.iter().map(|s| index.dir.join(s)).collect())
}

type TensorInfoTuple = (
    String,
    Vec<usize>,
    String,
    Option<u32>,
    Option<String>,
    usize,
);

fn open_all(py: Python<'_>, path: &std::path::Path) -> PyResult<Vec<SquantFile>> {
    crate::exit::detach(py, || squant_io::sharded::open_quantized(path))
        .map_err(|e| to_py(py, e, &mut None))
}

/// What [`io_inspect`] returns.
type InspectTuple = (
    String,
    String,
    u64,
    Vec<TensorInfoTuple>,
    bool,
    String,
    bool,
);

/// io_inspect(path)
/// --
///
/// The header of a squant-rs file (or sharded directory): (format_version,
/// writer_version, file_size, tensors, has_checksums, quantizer,
/// some_checksums), tensors as (name, shape, dtype, bits or None, mode or
/// None, stored_bytes); has_checksums: every file has checksums,
/// some_checksums: at least one does. No tensor data is read.
#[pyfunction]
pub fn io_inspect(py: Python<'_>, path: PathBuf) -> PyResult<InspectTuple> {
    let files = open_all(py, &path)?;
    let mut tensors = Vec::new();
    let mut size = 0;
    for f in &files {
        size += f.st.size();
        for t in &f.tensors {
            let (bits, mode) = match &t.kind {
                Kind::Quantized(q) => (Some(q.bits), Some(q.mode.as_str().to_string())),
                Kind::Plain { .. } => (None, None),
            };
            tensors.push((
                t.name.clone(),
                t.shape().to_vec(),
                dtype::name(t.dtype()).to_string(),
                bits,
                mode,
                t.stored_bytes,
            ));
        }
    }
    let first = &files[0];
    Ok((
        first.format_version.clone(),
        first.writer_version.clone(),
        size,
        tensors,
        files.iter().all(|f| f.checksums.is_some()),
        first.quantizer.as_str().to_string(),
        files.iter().any(|f| f.checksums.is_some()),
    ))
}

/// io_verify(path, threads=None)
/// --
///
/// Check every tensor of a squant-rs file (checksums, codes, scales, zero
/// points) without keeping anything. Raises FormatError naming the first
/// bad tensor.
#[pyfunction]
#[pyo3(signature = (path, threads=None))]
pub fn io_verify(py: Python<'_>, path: PathBuf, threads: Option<usize>) -> PyResult<()> {
    let p = pool::pool(pool::resolve_threads(threads)?)?;
    let mut files = open_all(py, &path)?;
    for f in files.iter_mut() {
        f.pool = Some(Arc::clone(&p));
        crate::exit::detach(py, || f.verify()).map_err(|e| to_py(py, e, &mut None))?;
    }
    Ok(())
}

type Loaded<'py> = (String, String, Vec<usize>, Bound<'py, PyArray1<u8>>);

/// io_load(path, verify=True, threads=None)
/// --
///
/// The state dict of a squant-rs file (or sharded directory), header order:
/// a list of (name, dtype, shape, bytes as a uint8 array). Quantized weights
/// are dequantized into their original dtype; checksums are verified when
/// verify is set and the file has them.
#[pyfunction]
#[pyo3(signature = (path, verify=true, threads=None))]
pub fn io_load<'py>(
    py: Python<'py>,
    path: PathBuf,
    verify: bool,
    threads: Option<usize>,
) -> PyResult<Vec<Loaded<'py>>> {
    let p = pool::pool(pool::resolve_threads(threads)?)?;
    let mut files = open_all(py, &path)?;
    let np = py.import("numpy")?;
    let mut out = Vec::new();
    for f in files.iter_mut() {
        f.pool = Some(Arc::clone(&p));
        // Every output of the file first, then one parallel pass over all
        // of them (GIL released).
        let mut arrays = Vec::with_capacity(f.tensors.len());
        for t in &f.tensors {
            arrays.push(
                np.call_method1("empty", (t.nbytes(), "uint8"))?
                    .cast_into::<PyArray1<u8>>()?,
            );
        }
        {
            let mut guards: Vec<_> = arrays.iter().map(|a| a.readwrite()).collect();
            let mut items = Vec::with_capacity(guards.len());
            for (t, g) in f.tensors.iter().zip(guards.iter_mut()) {
                let buf = g
                    .as_slice_mut()
                    .map_err(|e| InvalidArgumentError::new_err(e.to_string()))?;
                // Fresh memory written in full: 2 MiB pages where the
                // kernel allows them (fewer, cheaper page faults).
                crate::advise_huge(buf.as_mut_ptr(), buf.len());
                items.push((t, Some(buf)));
            }
            let f = &*f;
            crate::exit::detach(py, || f.load_many(items, verify))
                .map_err(|e| to_py(py, e, &mut None))?;
        }
        py.check_signals()?;
        for (t, arr) in f.tensors.iter().zip(arrays) {
            out.push((
                t.name.clone(),
                dtype::name(t.dtype()).to_string(),
                t.shape().to_vec(),
                arr,
            ));
        }
    }
    Ok(out)
}

type RawTuple<'py> = (String, String, Vec<usize>, Bound<'py, PyArray1<u8>>);

/// io_read_safetensors(path, data=True)
/// --
///
/// Every tensor of a safetensors file, header order, as (name, dtype, shape,
/// bytes as a uint8 array; empty when data is false: the header only), and
/// its metadata as a dict.
#[pyfunction]
#[pyo3(signature = (path, data=true))]
pub fn io_read_safetensors<'py>(
    py: Python<'py>,
    path: PathBuf,
    data: bool,
) -> PyResult<(Vec<RawTuple<'py>>, Bound<'py, PyDict>)> {
    let f = crate::exit::detach(py, || squant_io::SafetensorsFile::open(&path))
        .map_err(|e| to_py(py, e, &mut None))?;
    let mut out = Vec::with_capacity(f.entries.len());
    for e in &f.entries {
        let bytes = if data {
            let region = f.map_all(e).map_err(|e| to_py(py, e, &mut None))?;
            PyArray1::from_slice(py, &region)
        } else {
            PyArray1::from_slice(py, &[])
        };
        out.push((
            e.name.clone(),
            dtype::name(e.dtype).to_string(),
            e.shape.clone(),
            bytes,
        ));
    }
    let meta = PyDict::new(py);
    for (k, v) in &f.metadata {
        meta.set_item(k, v)?;
    }
    Ok((out, meta))
}

/// io_write_safetensors(path, tensors, metadata, data)
/// --
///
/// Write a plain safetensors file atomically (no checksums added): tensors
/// as (name, dtype, shape), metadata as (key, value) pairs; data(i) returns
/// tensor i's bytes (a uint8 array), asked for while the file is written.
/// Returns the file size.
#[pyfunction]
pub fn io_write_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, String, Vec<usize>)>,
    metadata: Vec<(String, String)>,
    data: Bound<'_, PyAny>,
) -> PyResult<u64> {
    let mut planned = Vec::with_capacity(tensors.len());
    for (name, d, shape) in &tensors {
        planned.push(squant_io::Planned {
            name: name.clone(),
            dtype: dtype_of(d)?,
            shape: shape.clone(),
        });
    }
    let mut w = crate::exit::detach(py, || {
        squant_io::Writer::create(&path, &planned, &metadata, false)
    })
    .map_err(|e| to_py(py, e, &mut None))?;
    for i in 0..tensors.len() {
        // An exception here (or a signal) drops the writer: no temporary file.
        let arr = data.call1((i,))?.cast_into::<PyArray1<u8>>()?;
        let ro = arr.readonly();
        let bytes = ro
            .as_slice()
            .map_err(|e| InvalidArgumentError::new_err(e.to_string()))?;
        w.write(i, bytes).map_err(|e| to_py(py, e, &mut None))?;
    }
    crate::exit::detach(py, || w.finish()).map_err(|e| to_py(py, e, &mut None))
}

/// QuantizedFileWriter(path, plan, quantizer="asymmetric")
/// --
///
/// A squant-rs file written tensor by tensor (atomically; the temporary
/// file is removed when the writer is dropped unfinished). plan: the state
/// dict in order as (name, dtype, shape, bits or None, mode or None).
#[pyclass(module = "squant_rs._squant_rs")]
pub struct QuantizedFileWriter {
    inner: Mutex<Option<SquantWriter>>,
    packed: Mutex<Vec<u8>>,
}

type PlanItem = (String, String, Vec<usize>, Option<u32>, Option<String>);

impl QuantizedFileWriter {
    fn with<R>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut SquantWriter, &mut Vec<u8>) -> squant_io::Result<R>,
    ) -> PyResult<R> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = guard
            .as_mut()
            .ok_or_else(|| InvalidArgumentError::new_err("the writer is closed"))?;
        let mut packed = self.packed.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(w, &mut packed);
        r.map_err(|e| {
            // A failed write ends the file: drop it (removes the temp file).
            guard.take();
            to_py(py, e, &mut None)
        })
    }
}

#[pymethods]
impl QuantizedFileWriter {
    #[new]
    #[pyo3(signature = (path, plan, quantizer="asymmetric"))]
    fn new(py: Python<'_>, path: PathBuf, plan: Vec<PlanItem>, quantizer: &str) -> PyResult<Self> {
        let quantizer = quantizer_of(quantizer)?;
        let mut tensors = Vec::with_capacity(plan.len());
        for (name, d, shape, bits, mode) in plan {
            let dtype = dtype_of(&d)?;
            let kind = match bits {
                None => Kind::Plain { dtype, shape },
                Some(bits) => Kind::Quantized(QEntry {
                    bits,
                    mode: mode_of(mode.as_deref().unwrap_or("squant"))?,
                    shape,
                    dtype,
                }),
            };
            tensors.push((name, kind));
        }
        // (the GIL released: a daemon thread that the exit has stranded
        // parks before it creates the file)
        let w = crate::exit::detach(py, || SquantWriter::create(&path, &tensors, quantizer))
            .map_err(|e| to_py(py, e, &mut None))?;
        Ok(QuantizedFileWriter {
            inner: Mutex::new(Some(w)),
            packed: Mutex::new(Vec::new()),
        })
    }

    /// write_plain(index, data)
    /// --
    ///
    /// The bytes (uint8 array) of plain tensor `index` of the plan.
    fn write_plain(
        &self,
        py: Python<'_>,
        index: usize,
        data: PyReadonlyArray1<'_, u8>,
    ) -> PyResult<()> {
        let bytes = data
            .as_slice()
            .map_err(|e| InvalidArgumentError::new_err(e.to_string()))?;
        self.with(py, |w, _| w.write_plain(index, bytes))
    }

    /// write_quantized(index, codes, scale, zero_point)
    /// --
    ///
    /// The int8 codes (C order, any shape: all the weight's codes) and
    /// float32 per-channel scale and zero point of quantized tensor
    /// `index`: checked as load_quantized checks them (InvalidArgumentError
    /// otherwise, and the file is dropped), packed and written.
    fn write_quantized(
        &self,
        py: Python<'_>,
        index: usize,
        codes: numpy::PyReadonlyArrayDyn<'_, i8>,
        scale: PyReadonlyArray1<'_, f32>,
        zero_point: PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        if !codes.is_c_contiguous() {
            return Err(InvalidArgumentError::new_err("codes must be C-contiguous"));
        }
        let c = codes
            .as_slice()
            .map_err(|e| InvalidArgumentError::new_err(e.to_string()))?;
        let s = crate::row_major(&scale)?.into_owned();
        let z = crate::row_major(&zero_point)?.into_owned();
        self.with(py, |w, packed| w.write_quantized(index, c, &s, &z, packed))
    }

    /// finish()
    /// --
    ///
    /// Complete the file (checksums, sync, rename); returns its size.
    fn finish(&self, py: Python<'_>) -> PyResult<u64> {
        let w = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| InvalidArgumentError::new_err("the writer is closed"))?;
        crate::exit::detach(py, || w.finish()).map_err(|e| to_py(py, e, &mut None))
    }

    /// abort()
    /// --
    ///
    /// Drop the unfinished file (its temporary file is removed).
    fn abort(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Registers the I/O functions and classes.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(io_quantize_file, m)?)?;
    m.add_function(wrap_pyfunction!(io_quantize_sharded, m)?)?;
    m.add_function(wrap_pyfunction!(io_is_sharded, m)?)?;
    m.add_function(wrap_pyfunction!(io_shard_files, m)?)?;
    m.add_function(wrap_pyfunction!(io_check_input, m)?)?;
    m.add_function(wrap_pyfunction!(io_at_exit, m)?)?;
    m.add_function(wrap_pyfunction!(io_inspect, m)?)?;
    m.add_function(wrap_pyfunction!(io_verify, m)?)?;
    m.add_function(wrap_pyfunction!(io_load, m)?)?;
    m.add_function(wrap_pyfunction!(io_read_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(io_write_safetensors, m)?)?;
    m.add_class::<QuantizedFileWriter>()?;
    Ok(())
}
