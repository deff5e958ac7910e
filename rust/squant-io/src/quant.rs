//! Checkpoint in, squant-rs file out: each selected weight is quantized
//! straight from the input's mapping, a block of output channels at a time
//! (converted to float32 per block, never the whole tensor), and written as
//! it is produced. Everything runs in the current rayon pool.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use squant_core::{dequantize_one, ChannelParams, Flips, Layout, Mode};

use crate::dtype;
use crate::error::{IoError, Result};
use crate::format::{Kind, QEntry, Quantizer, SquantWriter, BLOCK_ELEMS};
use crate::read::{Entry, SafetensorsFile};
use crate::select::is_selected;

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
    /// Conversion and quantization time (not reading or writing).
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
pub fn quantize_open(
    src: &SafetensorsFile,
    dst: &Path,
    opts: &Options,
    selected: &[bool],
    progress: &mut ProgressFn<'_>,
    offset: u64,
    total: u64,
) -> Result<Report> {
    let plan: Vec<(String, Kind)> = src
        .entries
        .iter()
        .zip(selected)
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
    let mut w = SquantWriter::create(dst, &plan, opts.quantizer)?;
    let mut report = Report {
        tensors: src.entries.len(),
        ..Report::default()
    };
    let mut done = offset;
    let mut packed = Vec::new();
    for (i, (e, &q)) in src.entries.iter().zip(selected).enumerate() {
        progress(done, total, &e.name)?;
        if q {
            report
                .layers
                .push(quantize_entry(src, e, i, opts, &mut w, &mut packed)?);
        } else {
            let step = BLOCK_ELEMS * 4;
            let mut pos = 0;
            while pos < e.nbytes() {
                let len = step.min(e.nbytes() - pos);
                let region = src.map(e, pos, len)?;
                w.write_plain(i, &region)?;
                pos += len;
            }
        }
        done += e.nbytes() as u64;
        report.size_before += e.nbytes() as u64;
    }
    progress(done, total, "")?;
    report.size_after = w.finish()?;
    Ok(report)
}

/// Quantizes the safetensors file `src` into the squant-rs file `dst`.
pub fn quantize_file(
    src: &Path,
    dst: &Path,
    opts: &Options,
    progress: &mut ProgressFn<'_>,
) -> Result<Report> {
    let file = SafetensorsFile::open(src)?;
    let selected = selection(&file, opts);
    let total = file.entries.iter().map(|e| e.nbytes() as u64).sum();
    quantize_open(&file, dst, opts, &selected, progress, 0, total)
}

fn quantize_entry(
    src: &SafetensorsFile,
    e: &Entry,
    i: usize,
    opts: &Options,
    w: &mut SquantWriter,
    packed: &mut Vec<u8>,
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
    // A multiple of 4 channels: every block but the last packs whole bytes.
    let per_block = (BLOCK_ELEMS / g).max(1).next_multiple_of(4);
    let cap = per_block.min(layout.oc) * g;
    let mut wbuf = vec![0f32; cap];
    let mut codes = vec![0i8; cap];
    let mut scale = vec![0f32; layout.oc];
    let mut zp = vec![0f32; layout.oc];
    let mut flips = Flips::default();
    let (mut err2, mut ref2) = (0f64, 0f64);
    let mut ms = 0f64;
    let mut o0 = 0;
    while o0 < layout.oc {
        let n_ch = per_block.min(layout.oc - o0);
        let n = n_ch * g;
        let region = src.map(e, o0 * g * isz, n * isz)?;
        let start = Instant::now();
        let wb = &mut wbuf[..n];
        let sub = Layout { oc: n_ch, ..layout };
        let (s, z) = (&mut scale[o0..o0 + n_ch], &mut zp[o0..o0 + n_ch]);
        let cb = &mut codes[..n];
        let (f, a, b) = in_pool(opts.pool.as_deref(), || {
            wb.par_chunks_mut(1 << 16)
                .zip(region.par_chunks((1 << 16) * isz))
                .for_each(|(d, s)| dtype::to_f32(e.dtype, s, d));
            let f = squant_core::quantize(wb, sub, opts.bits, opts.quantizer, opts.mode, cb, s, z)?;
            let (a, b) = wb
                .par_chunks(g)
                .zip(cb.par_chunks(g))
                .zip(s.par_iter().zip(z.par_iter()))
                .map(|((wc, qc), (&s, &z))| {
                    let p = ChannelParams {
                        scale: s,
                        zero_point: z,
                    };
                    // The channel's 2^bits values (as dequantize_one: no
                    // division per element).
                    let mut lut = [0f32; 256];
                    let half = 1i32 << (opts.bits - 1);
                    for q in -half..half {
                        lut[q as i8 as u8 as usize] = dequantize_one(q as i8, p);
                    }
                    wc.iter().zip(qc).fold((0f64, 0f64), |(a, b), (&x, &q)| {
                        let d = (lut[q as u8 as usize] - x) as f64;
                        (a + d * d, b + (x as f64) * (x as f64))
                    })
                })
                .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1));
            Ok((f, a, b))
        })
        .map_err(|err| qerr(shift_channel(err, o0)))?;
        drop(region);
        flips = flips + f;
        err2 += a;
        ref2 += b;
        ms += start.elapsed().as_secs_f64() * 1e3;
        w.write_codes(i, &codes[..n], packed)?;
        o0 += n_ch;
    }
    w.write_params(i, &scale, &zp)?;
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
