//! Checkpoint in, squant-rs file out: each selected weight is quantized
//! straight from the input's mapping, a block of output channels at a time
//! (converted to float32 per block, never the whole tensor), and written as
//! it is produced. Everything runs in the current rayon pool.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use squant_core::{dequantize_one, ChannelParams, Flips, Layout, Mode};

use crate::dtype;
use crate::error::{IoError, Result};
use crate::format::{Kind, QEntry, Quantizer, SquantWriter};
use crate::pack::{codes_per_byte, pack_slice, packed_size};
use crate::read::{Entry, Region, SafetensorsFile};
use crate::select::is_selected;
use crate::write::aligned_like;

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub bits: u32,
    pub mode: Mode,
    /// Asymmetric (zero point) or symmetric (zero point 0); recorded in the
    /// file's `quantizer` metadata key when symmetric.
    pub quantizer: Quantizer,
    /// fnmatch patterns of names to quantize (empty: `*weight`).
    pub include: Vec<String>,
    /// fnmatch patterns of names (or module names) to leave float.
    pub skip: Vec<String>,
    /// Pool of the parallel sections (`None`: the current rayon pool). The
    /// tensor loop itself stays on the calling thread, so a progress
    /// callback runs there (e.g. to check for signals).
    pub pool: Option<Arc<rayon::ThreadPool>>,
}

/// Runs `f` in `pool` (or in the current pool).
pub fn in_pool<R: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// One quantized weight in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    pub name: String,
    pub shape: Vec<usize>,
    /// Conversion, quantization, error and packing time (not reading or
    /// writing).
    pub time_ms: f64,
    /// `||w_hat - w|| / ||w||` over float32 values, summed in float64.
    pub rel_error: f64,
    pub k_flips: u64,
    pub c_flips: u64,
}

/// What [`quantize_file`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub layers: Vec<LayerStats>,
    /// Tensors in the input.
    pub tensors: usize,
    /// Bytes of the input tensors as stored, and of the written file.
    pub size_before: u64,
    pub size_after: u64,
}

/// Progress callback: `(bytes done, bytes total, tensor name)`; an error
/// stops the work (the output is then removed).
pub type ProgressFn<'a> = dyn FnMut(u64, u64, &str) -> Result<()> + 'a;

/// The selected tensors of an open file.
pub fn selection(src: &SafetensorsFile, opts: &Options) -> Vec<bool> {
    src.entries
        .iter()
        .map(|e| is_selected(e, &opts.include, &opts.skip))
        .collect()
}

/// Quantizes the selected tensors of `src` into `dst` (written atomically).
/// `offset`/`total` place this file's bytes in a larger progress count.
///
/// See [`quantize_files`] for the pipeline.
pub fn quantize_open(
    src: &SafetensorsFile,
    dst: &Path,
    opts: &Options,
    selected: &[bool],
    progress: &mut ProgressFn<'_>,
    offset: u64,
    total: u64,
) -> Result<Report> {
    let job = Job { src, dst, selected };
    let mut reports = quantize_files(&[job], opts, progress, offset, total, false)?;
    reports
        .pop()
        .ok_or_else(|| IoError::InvalidArgument("no report".to_string()))
}

/// One file of a run of [`quantize_files`].
pub struct Job<'a> {
    pub src: &'a SafetensorsFile,
    pub dst: &'a Path,
    /// Per tensor of `src`: quantized or copied.
    pub selected: &'a [bool],
}

/// Quantizes each job's selected tensors into its `dst` (each written
/// atomically), one file after the other; a report per file.
/// `with_path`: a quantization error names the input file too. A `dst`
/// that is the same file as its `src` is refused before anything is read.
///
/// Four stages run at once, across file boundaries: a reader thread reads
/// the next input block into a reused buffer (Linux: copied from the page
/// cache when it is all there, otherwise straight from the device with
/// `O_DIRECT`; elsewhere mapped) while the pool converts, quantizes,
/// measures the error and packs the current one in one parallel pass
/// (planned by the calling thread, which also runs the progress callback);
/// a writer thread computes the checksums and writes the packed blocks
/// (see [`crate::write::Writer`]), and completes each file (checksums,
/// `fsync`, rename) while the next one is computed. Set `SQUANT_TIMINGS=1`
/// for a breakdown of the wall time on stderr.
pub fn quantize_files(
    jobs: &[Job<'_>],
    opts: &Options,
    progress: &mut ProgressFn<'_>,
    offset: u64,
    total: u64,
    with_path: bool,
) -> Result<Vec<Report>> {
    // No output may replace its input (nothing is read or written yet).
    if let Some(job) = jobs.iter().find(|j| j.src.is_same_file(j.dst)) {
        return Err(IoError::InvalidArgument(format!(
            "output {} is the same file as the input {}: refusing to overwrite the input",
            crate::error::show_path(job.dst),
            crate::error::show_path(job.src.path())
        )));
    }
    let started = Instant::now();
    let plan: Vec<Piece> = jobs
        .iter()
        .enumerate()
        .flat_map(|(f, job)| pieces(f, job.src, job.selected))
        .collect();
    let files: Vec<&SafetensorsFile> = jobs.iter().map(|j| j.src).collect();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<ToWriter>(IN_FLIGHT);
        let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
        let (in_tx, in_rx) = mpsc::sync_channel::<Result<Region>>(READ_AHEAD);
        let (used_tx, used_rx) = mpsc::channel::<Vec<u8>>();
        let used = used_tx.clone();
        let stopped = Arc::new(AtomicBool::new(false));
        let writer_stopped = stopped.clone();
        let reader_stopped = stopped.clone();
        let spawn_err = |e| IoError::os(jobs.first().map_or(Path::new("."), |j| j.dst), e);
        let writer = std::thread::Builder::new()
            .name("squant-writer".to_string())
            .spawn_scoped(scope, move || {
                write_loop(rx, back_tx, used, &writer_stopped)
            })
            .map_err(spawn_err)?;
        let files = &files;
        let reader = std::thread::Builder::new()
            .name("squant-reader".to_string())
            .spawn_scoped(scope, move || {
                read_loop(files, plan, in_tx, used_rx, &reader_stopped)
            })
            .map_err(spawn_err)?;
        let mut io = Pipe {
            tx,
            spare: back_rx,
            input: in_rx,
            used: used_tx,
            stopped,
            buffers: 0,
            t: MainTimes::default(),
        };
        let mut reports = Vec::with_capacity(jobs.len());
        let mut done = offset;
        let mut result = Ok(());
        for (k, job) in jobs.iter().enumerate() {
            let last = k + 1 == jobs.len();
            let r =
                quantize_one(job, opts, progress, done, total, last, &mut io).map_err(
                    |e| match e {
                        IoError::Quantize { name, source } if with_path => IoError::Quantize {
                            name: format!("{}: {name}", crate::error::show_path(job.src.path())),
                            source,
                        },
                        other => other,
                    },
                );
            match r {
                Ok(report) => {
                    done += report.size_before;
                    reports.push(report);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() && jobs.is_empty() {
            result = progress(done, total, "");
        }
        let t = io.t;
        drop(io);
        let read_busy = reader.join().unwrap_or_default();
        let (sizes, written, wt) = writer
            .join()
            .map_err(|_| IoError::InvalidArgument("the writer thread panicked".to_string()))?;
        // A write error stops the writer first; the compute side then only
        // sees its flag (or a closed channel), so the writer's error is the
        // one to report.
        written?;
        result?;
        if sizes.len() != reports.len() {
            return Err(IoError::InvalidArgument(
                "the writer completed too few files".to_string(),
            ));
        }
        for (r, size) in reports.iter_mut().zip(sizes) {
            r.size_after = size;
        }
        if std::env::var_os("SQUANT_TIMINGS").is_some_and(|v| v != "0") {
            let s = |d: Duration| d.as_secs_f64();
            eprintln!(
                "squant timings: wall {:.3} s; main thread: plan+create {:.3}, waiting for input {:.3}, \
                 quantizing {:.3}, waiting for the writer {:.3}; reader busy {:.3}; \
                 writer busy {:.3} (checksums+writes) + {:.3} (completing files: fsync, rename)",
                s(started.elapsed()),
                s(t.create),
                s(t.input),
                s(t.compute),
                s(t.send),
                s(read_busy),
                s(wt.write),
                s(wt.finish),
            );
        }
        Ok(reports)
    })
}

/// Where the main thread's time went.
#[derive(Default, Clone, Copy)]
struct MainTimes {
    create: Duration,
    input: Duration,
    compute: Duration,
    send: Duration,
}

/// Where the writer thread's time went.
#[derive(Default, Clone, Copy)]
struct WriterTimes {
    write: Duration,
    finish: Duration,
}

/// One input range: file, tensor, byte start and length.
type Piece = (usize, usize, usize, usize);

/// The input ranges of file number `f` in the order [`quantize_one`] asks
/// for them: blocks of channels of each quantized tensor, pieces of each
/// copied one.
fn pieces(f: usize, src: &SafetensorsFile, selected: &[bool]) -> Vec<Piece> {
    let mut out = Vec::new();
    for (i, (e, &q)) in src.entries.iter().zip(selected).enumerate() {
        if q {
            let Some(layout) = Layout::from_shape(&e.shape) else {
                continue;
            };
            if layout.check().is_err() {
                continue;
            }
            let g = layout.channel_len();
            let isz = dtype::item_size(e.dtype);
            let (_, per_block) = blocking(g, isz);
            let mut o0 = 0;
            while o0 < layout.oc {
                let n_ch = per_block.min(layout.oc - o0);
                out.push((f, i, o0 * g * isz, n_ch * g * isz));
                o0 += n_ch;
            }
        } else {
            let mut pos = 0;
            while pos < e.nbytes() {
                let len = PLAIN_BLOCK.min(e.nbytes() - pos);
                out.push((f, i, pos, len));
                pos += len;
            }
        }
    }
    out
}

/// Channels per task and per block of a tensor with channels of `g`
/// elements of `isz` bytes. Blocks are whole tasks, so the tasks (and so
/// the results) do not depend on the block size.
fn blocking(g: usize, isz: usize) -> (usize, usize) {
    let per_task = (TASK_ELEMS / g).max(1).next_multiple_of(4);
    let per_block = per_task * (BLOCK_BYTES / (per_task * g * isz)).max(1);
    (per_task, per_block)
}

/// Reads every range of `plan` in turn (Linux: into buffers given back
/// through `spare`, see [`SafetensorsFile::read`]; elsewhere mapped) and
/// sends it on; stops at the first error (sent on) or when the receiver is
/// gone. Returns the time spent reading.
fn read_loop(
    files: &[&SafetensorsFile],
    plan: Vec<Piece>,
    tx: mpsc::SyncSender<Result<Region>>,
    spare: mpsc::Receiver<Vec<u8>>,
    stopped: &AtomicBool,
) -> Duration {
    let mut busy = Duration::ZERO;
    // The direct-read descriptor of the file being read (the ranges come
    // file after file): one at a time, not one per file read so far (a
    // checkpoint of many shards would need twice its shards' descriptors).
    #[cfg(target_os = "linux")]
    let mut direct: Option<(usize, Option<std::fs::File>)> = None;
    // Buffers handed out and not back yet, and those back in hand.
    let mut out = 0usize;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for &(f, i, start, len) in &plan {
        // A block far above the usual size (a task of a few huge
        // channels) is read alone: every other buffer back, and freed.
        let alone = len > 2 * BLOCK_BYTES;
        let buf = loop {
            while let Ok(b) = spare.try_recv() {
                out -= 1;
                kept.push(b);
            }
            if alone && out == 0 {
                kept.truncate(1);
            }
            if !alone || out == 0 {
                if let Some(b) = kept.pop() {
                    break b;
                }
                if out < READ_BUFFERS {
                    break Vec::new();
                }
            }
            match spare.recv_timeout(Duration::from_millis(50)) {
                Ok(b) => {
                    out -= 1;
                    kept.push(b);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if !stopped.load(Ordering::Acquire) => {}
                // The others gone: the send below fails. The writer
                // stopped (a buffer it held may be lost): no more waiting,
                // the compute side stops at its next message to the writer.
                Err(_) => break Vec::new(),
            }
        };
        let t = Instant::now();
        let (src, e) = (files[f], &files[f].entries[i]);
        #[cfg(target_os = "linux")]
        let r = {
            let d = match &mut direct {
                Some((g, d)) if *g == f => d,
                slot => {
                    // The previous file's descriptor is closed first.
                    drop(slot.take());
                    &mut slot.insert((f, src.open_direct())).1
                }
            };
            src.read(d, e, start, len, buf)
        };
        #[cfg(not(target_os = "linux"))]
        let r = {
            drop(buf);
            src.map(e, start, len)
        };
        busy += t.elapsed();
        // Only buffers come back (not mappings, not empty ranges).
        if r.as_ref().is_ok_and(|r| r.is_buffered()) {
            out += 1;
        }
        let stop = r.is_err();
        if tx.send(r).is_err() || stop {
            break;
        }
    }
    busy
}

/// Input blocks read ahead by the reader thread.
const READ_AHEAD: usize = 1;
/// Packed blocks and plain data queued for the writer (bounds the memory
/// held in flight).
const IN_FLIGHT: usize = 2;
/// Packed-code buffers: those queued, one being written, one being filled.
const BUFFERS: usize = IN_FLIGHT + 2;
/// Input buffers: those queued for the main thread, the one it holds,
/// plain ones queued for the writer and the one it writes, and the one
/// being read (so the reader never waits for a buffer that cannot come).
const READ_BUFFERS: usize = READ_AHEAD + 1 + IN_FLIGHT + 1 + 1;

/// What the writer thread is given.
enum ToWriter {
    /// The next output file (all messages up to `Finish` are for it).
    Start(Box<SquantWriter>),
    Plain(usize, Region),
    /// Packed codes: a range of a buffer.
    Packed(usize, Vec<u8>, std::ops::Range<usize>),
    Params(usize, Vec<f32>, Vec<f32>),
    /// Complete the current file.
    Finish,
}

/// The main thread's ends of the reader's and the writer's queues.
struct Pipe {
    tx: mpsc::SyncSender<ToWriter>,
    /// Buffers the writer is done with, to be filled again.
    spare: mpsc::Receiver<Vec<u8>>,
    input: mpsc::Receiver<Result<Region>>,
    /// Input buffers back to the reader.
    used: mpsc::Sender<Vec<u8>>,
    /// Set by the writer when it stopped on an error.
    stopped: Arc<AtomicBool>,
    /// Packed-code buffers made so far.
    buffers: usize,
    t: MainTimes,
}

impl Pipe {
    fn send(&mut self, msg: ToWriter) -> Result<()> {
        let t = Instant::now();
        // The writer stopped on an error, which the join reports; this
        // error only stops the compute side (which then sends nothing more
        // and asks the reader for nothing more).
        let stopped = || IoError::InvalidArgument("the writer stopped".to_string());
        let r = if self.stopped.load(Ordering::Acquire) {
            Err(stopped())
        } else {
            self.tx.send(msg).map_err(|_| stopped())
        };
        self.t.send += t.elapsed();
        r
    }

    /// A buffer for packed codes: one the writer is done with if there is
    /// one; a new one while fewer than [`BUFFERS`] exist; otherwise the
    /// next one the writer gives back (so buffers are reused, not
    /// allocated and cleared for every block).
    fn buffer(&mut self) -> Vec<u8> {
        if let Ok(b) = self.spare.try_recv() {
            return b;
        }
        if self.buffers < BUFFERS {
            self.buffers += 1;
            return Vec::new();
        }
        let t = Instant::now();
        // The writer stopped (a buffer it held may be lost, and it may not
        // end before this side closes the queue): the next send reports it.
        let b = loop {
            match self.spare.recv_timeout(Duration::from_millis(50)) {
                Ok(b) => break b,
                Err(mpsc::RecvTimeoutError::Timeout) if !self.stopped.load(Ordering::Acquire) => {}
                Err(_) => break Vec::new(),
            }
        };
        self.t.send += t.elapsed();
        b
    }

    /// Gives an input block's buffer back to the reader.
    fn done_with(&self, region: Region) {
        if let Some(b) = region.into_buffer() {
            // The reader may have finished already.
            let _ = self.used.send(b);
        }
    }

    /// The next input block (in the order of [`pieces`]), checked to be
    /// `len` bytes.
    fn next(&mut self, len: usize) -> Result<Region> {
        let t = Instant::now();
        let r = self
            .input
            .recv()
            .map_err(|_| IoError::InvalidArgument("the reader stopped".to_string()));
        self.t.input += t.elapsed();
        let region = r??;
        if region.len() != len {
            return Err(IoError::InvalidArgument(
                "the reader is out of step".to_string(),
            ));
        }
        Ok(region)
    }
}

/// The writer thread: the sizes of the files it completed, and how it
/// stopped.
///
/// After an error (or a panic) it sets `stopped`, removes the file being
/// written and goes on taking messages until the compute side closes the
/// queue, only handing their buffers back: an input buffer queued here and
/// dropped would never reach the reader, which may be waiting for every
/// buffer to be back (a block read alone) while the compute side waits
/// for that block: both would wait forever.
fn write_loop(
    rx: mpsc::Receiver<ToWriter>,
    back: mpsc::Sender<Vec<u8>>,
    used: mpsc::Sender<Vec<u8>>,
    stopped: &AtomicBool,
) -> (Vec<u64>, Result<()>, WriterTimes) {
    let mut cur: Option<Box<SquantWriter>> = None;
    let mut sizes = Vec::new();
    let mut t = WriterTimes::default();
    let mut failed = Ok(());
    for msg in rx {
        if failed.is_err() {
            match msg {
                ToWriter::Plain(_, region) => {
                    if let Some(b) = region.into_buffer() {
                        let _ = used.send(b);
                    }
                }
                ToWriter::Packed(_, buf, _) => {
                    let _ = back.send(buf);
                }
                _ => {}
            }
            continue;
        }
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_one(msg, &mut cur, &mut sizes, &back, &used)
        }))
        .unwrap_or_else(|_| {
            Err(IoError::InvalidArgument(
                "the writer thread panicked".to_string(),
            ))
        });
        let spent = start.elapsed();
        if cur.is_some() {
            t.write += spent;
        } else {
            t.finish += spent;
        }
        if r.is_err() {
            // Dropping `cur` removes its temporary file.
            cur = None;
            failed = r;
            stopped.store(true, Ordering::Release);
        }
    }
    drop(cur);
    (sizes, failed, t)
}

/// Handles one message of [`write_loop`] (buffers handed back).
fn write_one(
    msg: ToWriter,
    cur: &mut Option<Box<SquantWriter>>,
    sizes: &mut Vec<u64>,
    back: &mpsc::Sender<Vec<u8>>,
    used: &mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let closed = || IoError::InvalidArgument("no output file is open".to_string());
    match msg {
        ToWriter::Start(w) => {
            *cur = Some(w);
            Ok(())
        }
        ToWriter::Finish => match cur.take() {
            Some(w) => w.finish().map(|size| sizes.push(size)),
            None => Err(closed()),
        },
        ToWriter::Plain(i, region) => {
            let r = match cur.as_mut() {
                Some(w) => w.write_plain(i, &region),
                None => Err(closed()),
            };
            if let Some(b) = region.into_buffer() {
                // The reader may have finished already.
                let _ = used.send(b);
            }
            r
        }
        ToWriter::Packed(i, buf, range) => {
            let r = match (cur.as_mut(), buf.get(range)) {
                (Some(w), Some(bytes)) => w.write_packed(i, bytes),
                (Some(_), None) => Err(IoError::InvalidArgument(
                    "packed range outside its buffer".to_string(),
                )),
                (None, _) => Err(closed()),
            };
            // The compute side may have finished already.
            let _ = back.send(buf);
            r
        }
        ToWriter::Params(i, s, z) => match cur.as_mut() {
            Some(w) => w.write_params(i, &s, &z),
            None => Err(closed()),
        },
    }
}

/// Quantizes one file's selected tensors into its writer (which the
/// writer thread then completes).
fn quantize_one(
    job: &Job<'_>,
    opts: &Options,
    progress: &mut ProgressFn<'_>,
    offset: u64,
    total: u64,
    last: bool,
    io: &mut Pipe,
) -> Result<Report> {
    let t = Instant::now();
    let src = job.src;
    let plan: Vec<(String, Kind)> = src
        .entries
        .iter()
        .zip(job.selected)
        .map(|(e, &q)| {
            let kind = if q {
                Kind::Quantized(QEntry {
                    bits: opts.bits,
                    mode: opts.mode,
                    shape: e.shape.clone(),
                    dtype: e.dtype,
                })
            } else {
                Kind::Plain {
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                }
            };
            (e.name.clone(), kind)
        })
        .collect();
    let w = SquantWriter::create(job.dst, &plan, opts.quantizer)?;
    // Where each tensor's codes go in the file: packed blocks are laid out
    // in memory in phase with it (written without a copy).
    let codes_at: Vec<u64> = (0..plan.len())
        .map(|i| w.next_codes_offset(i).unwrap_or(0))
        .collect();
    io.t.create += t.elapsed();
    io.send(ToWriter::Start(Box::new(w)))?;
    let mut report = Report {
        tensors: src.entries.len(),
        ..Report::default()
    };
    let mut done = offset;
    for (i, (e, &q)) in src.entries.iter().zip(job.selected).enumerate() {
        progress(done, total, &e.name)?;
        if q {
            report
                .layers
                .push(quantize_entry(e, i, codes_at[i], opts, io)?);
        } else {
            let mut pos = 0;
            while pos < e.nbytes() {
                let len = PLAIN_BLOCK.min(e.nbytes() - pos);
                let region = io.next(len)?;
                io.send(ToWriter::Plain(i, region))?;
                pos += len;
            }
        }
        done += e.nbytes() as u64;
        report.size_before += e.nbytes() as u64;
    }
    // The last call (where a caller checks for an interrupt) before the
    // last file is completed: an error there leaves no output, as at any
    // other call (the writer completes a file only on `Finish`).
    if last {
        progress(done, total, "")?;
    }
    io.send(ToWriter::Finish)?;
    Ok(report)
}

/// Opens the safetensors file `path` to be quantized (headers only): a
/// squant-rs file, already quantized, is refused by name
/// ([`IoError::InvalidArgument`]), the same words for a file and for a
/// shard of a sharded checkpoint (every quantizing path opens its inputs
/// here).
pub fn open_input(path: &Path) -> Result<SafetensorsFile> {
    let file = SafetensorsFile::open(path)?;
    if file.meta("format") == Some(crate::format::FORMAT_NAME) {
        return Err(IoError::InvalidArgument(format!(
            "{} is already a squant-rs file (written by squant-rs {}): quantize the original float model instead (the info command describes it)",
            crate::error::show_path(path),
            file.meta("squant_rs_version").unwrap_or("?")
        )));
    }
    Ok(file)
}

/// Quantizes the safetensors file `src` into the squant-rs file `dst`.
pub fn quantize_file(
    src: &Path,
    dst: &Path,
    opts: &Options,
    progress: &mut ProgressFn<'_>,
) -> Result<Report> {
    let file = open_input(src)?;
    let selected = selection(&file, opts);
    let total = file.entries.iter().map(|e| e.nbytes() as u64).sum();
    quantize_open(&file, dst, opts, &selected, progress, 0, total)
}

/// Elements per parallel task: whole channels (a multiple of 4, so that a
/// task's packed codes start on a byte), about this many.
const TASK_ELEMS: usize = 1 << 16;
/// Input bytes per block: the range read at a time (whole tasks, about
/// this many bytes), quantized in one parallel pass, its packed codes
/// handed to the writer at once.
const BLOCK_BYTES: usize = 1 << 23;
/// Bytes of a plain tensor handed to the writer at once.
const PLAIN_BLOCK: usize = 1 << 23;

/// One task's scratch: its channels in float32 and their codes.
#[derive(Default)]
struct TaskScratch {
    w: Vec<f32>,
    codes: Vec<i8>,
}

thread_local! {
    /// Each pool thread's scratch, kept from task to task (a scratch per
    /// rayon split would be allocated and cleared many times per block).
    static SCRATCH: std::cell::RefCell<TaskScratch> = std::cell::RefCell::default();
}

/// Quantizes tensor `i` of the file (`e`), whose codes start at byte
/// `codes_at` of the output file.
fn quantize_entry(
    e: &Entry,
    i: usize,
    codes_at: u64,
    opts: &Options,
    io: &mut Pipe,
) -> Result<LayerStats> {
    let qerr = |source| IoError::Quantize {
        name: e.name.clone(),
        source,
    };
    let layout = Layout::from_shape(&e.shape)
        .ok_or_else(|| IoError::InvalidArgument(format!("{}: fewer than 2 dimensions", e.name)))?;
    layout.check().map_err(qerr)?;
    let g = layout.channel_len();
    let isz = dtype::item_size(e.dtype);
    let cpb = codes_per_byte(opts.bits);
    let (per_task, per_block) = blocking(g, isz);
    let mut scale = vec![0f32; layout.oc];
    let mut zp = vec![0f32; layout.oc];
    let mut flips = Flips::default();
    let (mut err2, mut ref2) = (0f64, 0f64);
    let mut ms = 0f64;
    let mut at = codes_at;
    let mut o0 = 0;
    while o0 < layout.oc {
        let n_ch = per_block.min(layout.oc - o0);
        let n = n_ch * g;
        let region = io.next(n * isz)?;
        // Every byte is written by the packing (no clearing needed).
        let mut buf = io.buffer();
        let n_packed = packed_size(n, opts.bits);
        let p0 = aligned_like(&mut buf, at, n_packed);
        let packed = &mut buf[p0..p0 + n_packed];
        at += n_packed as u64;
        let start = Instant::now();
        let (s, z) = (&mut scale[o0..o0 + n_ch], &mut zp[o0..o0 + n_ch]);
        // Tasks of `per_task` channels: their input bytes, packed bytes
        // (whole bytes: a multiple of 4 codes), scales and zero points.
        let results: Vec<std::result::Result<(Flips, f64, f64), squant_core::SquantError>> =
            in_pool(opts.pool.as_deref(), || {
                region
                    .par_chunks(per_task * g * isz)
                    .zip(packed.par_chunks_mut(per_task * g / cpb))
                    .zip(s.par_chunks_mut(per_task).zip(z.par_chunks_mut(per_task)))
                    .enumerate()
                    .map(|(k, ((bytes, pk), (s, z)))| {
                        SCRATCH.with_borrow_mut(|sc| {
                            let n_c = s.len();
                            let m = n_c * g;
                            sc.w.resize(m, 0.0);
                            sc.codes.resize(m, 0);
                            dtype::to_f32(e.dtype, bytes, &mut sc.w);
                            let sub = Layout { oc: n_c, ..layout };
                            let f = squant_core::quantize_serial(
                                &sc.w,
                                sub,
                                opts.bits,
                                opts.quantizer,
                                opts.mode,
                                &mut sc.codes,
                                s,
                                z,
                            )
                            .map_err(|err| shift_channel(err, o0 + k * per_task))?;
                            let (a, b) = error_sums(&sc.w, &sc.codes, g, s, z, opts.bits);
                            pack_slice(&sc.codes, opts.bits, pk);
                            Ok((f, a, b))
                        })
                    })
                    .collect()
            });
        io.done_with(region);
        // In task order: the first failing channel is reported, and the
        // sums do not depend on the thread count.
        for r in results {
            let (f, a, b) = r.map_err(qerr)?;
            flips = flips + f;
            err2 += a;
            ref2 += b;
        }
        let spent = start.elapsed();
        io.t.compute += spent;
        ms += spent.as_secs_f64() * 1e3;
        io.send(ToWriter::Packed(i, buf, p0..p0 + n_packed))?;
        o0 += n_ch;
    }
    io.send(ToWriter::Params(i, scale, zp))?;
    let rel_error = if ref2 > 0.0 {
        (err2 / ref2).sqrt()
    } else if err2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    Ok(LayerStats {
        name: e.name.clone(),
        shape: e.shape.clone(),
        time_ms: ms,
        rel_error,
        k_flips: flips.k,
        c_flips: flips.c,
    })
}

/// Sums of `(w_hat - w)^2` (the difference taken in float32) and of `w^2`
/// in float64 over a block of channels of `bits`-bit codes, in 16 fixed
/// lanes (element `j` of a channel goes to lane `j % 16`), the lanes added
/// last in order: the result depends neither on the thread count nor on
/// the instruction set. `w_hat` is `dequantize_one`'s value.
fn error_sums(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    bits: u32,
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { error_sums_avx512(w, codes, g, scale, zp, bits) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { error_sums_avx2(w, codes, g, scale, zp, bits) };
        }
    }
    error_sums_scalar(w, codes, g, scale, zp)
}

const LANES: usize = 16;

/// Elements `0..len < 16` of a step into lanes `0..len` (as every build).
#[inline(always)]
fn error_tail(
    wv: &[f32],
    qv: &[i8],
    p: ChannelParams,
    err: &mut [f64; LANES],
    norm: &mut [f64; LANES],
) {
    for (i, (&x, &q)) in wv.iter().zip(qv).enumerate() {
        let d = (dequantize_one(q, p) - x) as f64;
        err[i] += d * d;
        norm[i] += (x as f64) * (x as f64);
    }
}

fn error_sums_scalar(w: &[f32], codes: &[i8], g: usize, scale: &[f32], zp: &[f32]) -> (f64, f64) {
    let mut err = [0f64; LANES];
    let mut norm = [0f64; LANES];
    let channels = w.chunks(g).zip(codes.chunks(g)).zip(scale.iter().zip(zp));
    for ((wc, qc), (&s, &z)) in channels {
        let p = ChannelParams {
            scale: s,
            zero_point: z,
        };
        let mut wl = wc.chunks_exact(LANES);
        let mut ql = qc.chunks_exact(LANES);
        for (wv, qv) in (&mut wl).zip(&mut ql) {
            error_tail(wv, qv, p, &mut err, &mut norm);
        }
        error_tail(wl.remainder(), ql.remainder(), p, &mut err, &mut norm);
    }
    (err.iter().sum(), norm.iter().sum())
}

/// [`error_sums_scalar`] 16 elements per step in two 8-lane vectors of
/// doubles, lanes 0-7 and 8-15: the same operations per lane, so
/// bit-identical. The square and the add are one fused multiply-add: the
/// square of a float32 value is exact in float64 (24-bit significands), so
/// fusing it changes no rounding. Codes of up to 4 bits look their value up
/// in the channel's 16-entry table of `dequantize_one` values (one
/// permute).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn error_sums_avx512(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    bits: u32,
) -> (f64, f64) {
    use std::arch::x86_64::*;
    let mut e = [_mm512_setzero_pd(); 2];
    let mut n = [_mm512_setzero_pd(); 2];
    let mut err = [0f64; LANES];
    let mut norm = [0f64; LANES];
    let table = bits <= 4;
    let offset = 1i32 << (bits - 1);
    let off_v = _mm512_set1_epi32(offset);
    let halves = |v: __m512| {
        (
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                _mm512_castps_pd(v),
                1,
            ))),
        )
    };
    let channels = w.chunks(g).zip(codes.chunks(g)).zip(scale.iter().zip(zp));
    for ((wc, qc), (&s, &z)) in channels {
        let p = ChannelParams {
            scale: s,
            zero_point: z,
        };
        let (sv, zv) = (_mm512_set1_ps(s), _mm512_set1_ps(z));
        let mut lut = [0f32; 16];
        if table {
            for (u, v) in lut.iter_mut().enumerate().take(1 << bits) {
                *v = dequantize_one((u as i32 - offset) as i8, p);
            }
        }
        // SAFETY: a 16-float load from an array of 16.
        let t = unsafe { _mm512_loadu_ps(lut.as_ptr()) };
        let mut wl = wc.chunks_exact(LANES);
        let mut ql = qc.chunks_exact(LANES);
        for (wv, qv) in (&mut wl).zip(&mut ql) {
            // SAFETY: `wv` holds 16 floats and `qv` 16 bytes (exact chunks).
            let (q, x) = unsafe {
                (
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(qv.as_ptr().cast())),
                    _mm512_loadu_ps(wv.as_ptr()),
                )
            };
            let w_hat = if table {
                _mm512_permutexvar_ps(_mm512_add_epi32(q, off_v), t)
            } else {
                _mm512_div_ps(_mm512_add_ps(_mm512_cvtepi32_ps(q), zv), sv)
            };
            let (d0, d1) = halves(_mm512_sub_ps(w_hat, x));
            let (x0, x1) = halves(x);
            e[0] = _mm512_fmadd_pd(d0, d0, e[0]);
            e[1] = _mm512_fmadd_pd(d1, d1, e[1]);
            n[0] = _mm512_fmadd_pd(x0, x0, n[0]);
            n[1] = _mm512_fmadd_pd(x1, x1, n[1]);
        }
        if !wl.remainder().is_empty() {
            // The tail's lanes are the vectors' first lanes: bring them out.
            for k in 0..2 {
                // SAFETY: 8-double stores into arrays of 16 at 8 * k.
                unsafe {
                    _mm512_storeu_pd(err.as_mut_ptr().add(8 * k), e[k]);
                    _mm512_storeu_pd(norm.as_mut_ptr().add(8 * k), n[k]);
                }
            }
            error_tail(wl.remainder(), ql.remainder(), p, &mut err, &mut norm);
            for k in 0..2 {
                // SAFETY: 8-double loads from arrays of 16 at 8 * k.
                unsafe {
                    e[k] = _mm512_loadu_pd(err.as_ptr().add(8 * k));
                    n[k] = _mm512_loadu_pd(norm.as_ptr().add(8 * k));
                }
            }
        }
    }
    for k in 0..2 {
        // SAFETY: 8-double stores into arrays of 16 at 8 * k.
        unsafe {
            _mm512_storeu_pd(err.as_mut_ptr().add(8 * k), e[k]);
            _mm512_storeu_pd(norm.as_mut_ptr().add(8 * k), n[k]);
        }
    }
    (err.iter().sum(), norm.iter().sum())
}

/// [`error_sums_scalar`] 16 elements per step: the same operations per
/// lane (float32 add, divide and subtract, float64 square and add; no fused
/// multiply-add), so bit-identical. Codes of up to 4 bits look their value
/// up in the channel's table of `dequantize_one` values instead of
/// dividing (the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn error_sums_avx2(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    bits: u32,
) -> (f64, f64) {
    use std::arch::x86_64::*;
    // Accumulators: [err 0-3, err 4-7, err 8-11, err 12-15] and the same
    // for the norm.
    let mut e = [_mm256_setzero_pd(); 4];
    let mut n = [_mm256_setzero_pd(); 4];
    let mut err = [0f64; LANES];
    let mut norm = [0f64; LANES];
    let table = bits <= 4;
    let offset = 1i32 << (bits - 1);
    let off_v = _mm256_set1_epi32(offset);
    let seven = _mm256_set1_epi32(7);
    let channels = w.chunks(g).zip(codes.chunks(g)).zip(scale.iter().zip(zp));
    for ((wc, qc), (&s, &z)) in channels {
        let p = ChannelParams {
            scale: s,
            zero_point: z,
        };
        let (sv, zv) = (_mm256_set1_ps(s), _mm256_set1_ps(z));
        let mut lut = [0f32; 16];
        if table {
            for (u, v) in lut.iter_mut().enumerate().take(1 << bits) {
                *v = dequantize_one((u as i32 - offset) as i8, p);
            }
        }
        // SAFETY: 8-float loads from an array of 16.
        let (t_lo, t_hi) = unsafe {
            (
                _mm256_loadu_ps(lut.as_ptr()),
                _mm256_loadu_ps(lut.as_ptr().add(8)),
            )
        };
        let w_hat = |q8: __m128i| {
            let q = _mm256_cvtepi8_epi32(q8);
            if table {
                let u = _mm256_add_epi32(q, off_v);
                let lo = _mm256_permutevar8x32_ps(t_lo, u);
                let hi = _mm256_permutevar8x32_ps(t_hi, u);
                let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(u, seven));
                _mm256_blendv_ps(lo, hi, upper)
            } else {
                _mm256_div_ps(_mm256_add_ps(_mm256_cvtepi32_ps(q), zv), sv)
            }
        };
        let mut wl = wc.chunks_exact(LANES);
        let mut ql = qc.chunks_exact(LANES);
        for (wv, qv) in (&mut wl).zip(&mut ql) {
            for h in 0..2 {
                // SAFETY: `wv` holds 16 floats and `qv` 16 bytes (exact
                // chunks); unaligned loads of 8 of each at 8 * h.
                let (q8, x) = unsafe {
                    (
                        _mm_loadl_epi64(qv.as_ptr().add(8 * h).cast()),
                        _mm256_loadu_ps(wv.as_ptr().add(8 * h)),
                    )
                };
                let d = _mm256_sub_ps(w_hat(q8), x);
                let halves = [
                    (_mm256_castps256_ps128(d), _mm256_castps256_ps128(x)),
                    (_mm256_extractf128_ps(d, 1), _mm256_extractf128_ps(x, 1)),
                ];
                for (k, (d4, x4)) in halves.into_iter().enumerate() {
                    let (d4, x4) = (_mm256_cvtps_pd(d4), _mm256_cvtps_pd(x4));
                    e[2 * h + k] = _mm256_add_pd(e[2 * h + k], _mm256_mul_pd(d4, d4));
                    n[2 * h + k] = _mm256_add_pd(n[2 * h + k], _mm256_mul_pd(x4, x4));
                }
            }
        }
        if !wl.remainder().is_empty() {
            // The tail's lanes are the vectors' first lanes: bring them out.
            for k in 0..4 {
                // SAFETY: 4-double stores into arrays of 16 at 4 * k.
                unsafe {
                    _mm256_storeu_pd(err.as_mut_ptr().add(4 * k), e[k]);
                    _mm256_storeu_pd(norm.as_mut_ptr().add(4 * k), n[k]);
                }
            }
            error_tail(wl.remainder(), ql.remainder(), p, &mut err, &mut norm);
            for k in 0..4 {
                // SAFETY: 4-double loads from arrays of 16 at 4 * k.
                unsafe {
                    e[k] = _mm256_loadu_pd(err.as_ptr().add(4 * k));
                    n[k] = _mm256_loadu_pd(norm.as_ptr().add(4 * k));
                }
            }
        }
    }
    for k in 0..4 {
        // SAFETY: 4-double stores into arrays of 16 at 4 * k.
        unsafe {
            _mm256_storeu_pd(err.as_mut_ptr().add(4 * k), e[k]);
            _mm256_storeu_pd(norm.as_mut_ptr().add(4 * k), n[k]);
        }
    }
    (err.iter().sum(), norm.iter().sum())
}

/// A block's error with the channel counted from the tensor's start.
fn shift_channel(err: squant_core::SquantError, o0: usize) -> squant_core::SquantError {
    use squant_core::SquantError as E;
    match err {
        E::NonFinite { channel, index } => E::NonFinite {
            channel: channel + o0,
            index,
        },
        E::RangeTooLarge { channel } => E::RangeTooLarge {
            channel: channel + o0,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After an error the writer hands back the buffers of the messages
    /// still queued (the reader may be waiting for all of them) and says it
    /// stopped.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_stopped_writer_hands_queued_buffers_back() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("squant-io-drain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.safetensors");
        let header = r#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]}}"#;
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&[7u8; 10]).unwrap();
        drop(f);
        let st = SafetensorsFile::open(&path).unwrap();
        let e = st.get("a").unwrap();
        let region = || st.read(&mut None, e, 0, 10, Vec::new()).unwrap();
        let (tx, rx) = mpsc::sync_channel(4);
        let (back_tx, back_rx) = mpsc::channel();
        let (used_tx, used_rx) = mpsc::channel();
        let stopped = AtomicBool::new(false);
        // No output file is open: the first message fails.
        tx.send(ToWriter::Plain(0, region())).unwrap();
        tx.send(ToWriter::Plain(0, region())).unwrap();
        tx.send(ToWriter::Packed(0, vec![1, 2, 3], 0..3)).unwrap();
        tx.send(ToWriter::Plain(0, region())).unwrap();
        drop(tx);
        let (sizes, r, _) = write_loop(rx, back_tx, used_tx, &stopped);
        assert!(sizes.is_empty());
        assert!(r.is_err());
        assert!(stopped.load(Ordering::Acquire));
        assert_eq!(used_rx.iter().count(), 3);
        assert_eq!(back_rx.iter().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn error_sums_same_in_every_build() {
        let mut seed = 12345u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (g, bits) in [1usize, 3, 7, 8, 9, 16, 17, 33, 64, 100]
            .into_iter()
            .flat_map(|g| (2..=8u32).map(move |b| (g, b)))
        {
            let oc = 5;
            let w: Vec<f32> = (0..oc * g).map(|_| rnd()).collect();
            let span = 1usize << bits;
            let codes: Vec<i8> = (0..oc * g)
                .map(|i| ((i * 7) % span) as i32 - (span as i32 / 2))
                .map(|q| q as i8)
                .collect();
            let scale: Vec<f32> = (0..oc).map(|c| 7.5 + c as f32).collect();
            let zp: Vec<f32> = (0..oc).map(|c| c as f32 - 2.0).collect();
            let a = error_sums_scalar(&w, &codes, g, &scale, &zp);
            assert_eq!(
                a,
                error_sums(&w, &codes, g, &scale, &zp, bits),
                "g {g} bits {bits}"
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2.
                let b = unsafe { error_sums_avx2(&w, &codes, g, &scale, &zp, bits) };
                assert_eq!(a, b, "avx2: g {g} bits {bits}");
            }
            // And the plain definition, up to the summation order.
            let (mut e, mut n) = (0f64, 0f64);
            for (j, (&x, &q)) in w.iter().zip(&codes).enumerate() {
                let p = ChannelParams {
                    scale: scale[j / g],
                    zero_point: zp[j / g],
                };
                let d = (dequantize_one(q, p) - x) as f64;
                e += d * d;
                n += (x as f64) * (x as f64);
            }
            assert!((a.0 - e).abs() <= 1e-12 * e && (a.1 - n).abs() <= 1e-12 * n);
        }
    }
}
