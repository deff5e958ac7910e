//! `quantize_into`: the whole-model pass. Every weight of a list is
//! quantized in one parallel run, and each one's dequantized values are
//! written straight into a caller-given output buffer (the quantized model's
//! weight storage, in the weight's own dtype), with the relative error, the
//! flip counts and the time of every weight computed in the same pass.
//!
//! The weights are cut into chunks of whole output channels (a fixed cut:
//! it depends on the shapes only) that the calling thread and `threads - 1`
//! pool workers take from one queue. A chunk is quantized, then dequantized
//! and compared with its weights while it is still in cache. Sums are kept
//! per chunk and added in chunk order, so every result is independent of
//! the thread count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use half::{bf16, f16};
use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use rayon::prelude::*;
use squant_core::case::{self, Flips, Isa, Scratch};
use squant_core::{dequantize_one, ChannelParams, Layout, Mode, Quantizer, SquantError};

use crate::error::{InvalidArgumentError, PyCoreError};
use crate::{
    advise_huge, alloc, empty, layout_of, parse_mode, parse_quantizer, pool, prefault_pages,
    row_major, with_index,
};

/// Channels are handed out in chunks of about this many elements.
const CHUNK_ELEMS: usize = 1 << 14;

/// One weight's results: codes (when kept), scale, zero point, K and C
/// flips, relative error, milliseconds spent on it, and the per-channel dot
/// products asked for it (see [`quantize_into`]'s `dots`).
type LayerResult<'py> = (
    Option<Bound<'py, PyArrayDyn<i8>>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    u64,
    u64,
    f64,
    f64,
    Option<Bound<'py, PyArray1<f64>>>,
);

/// The vectors of one weight's dot products (see [`quantize_into`]'s
/// `dots`): `(v_hat, v_w)`.
type DotVectors<'py> = (
    PyReadonlyArray1<'py, f64>,
    Option<PyReadonlyArray1<'py, f64>>,
);

/// An element type of the output buffers: how a dequantized float32 value
/// is stored, and read back exactly for the error.
trait Store: Copy + Send {
    fn store(v: f32) -> Self;
    fn widen(self) -> f64;
}

impl Store for f32 {
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
}

impl Store for f64 {
    #[inline(always)]
    fn store(v: f32) -> Self {
        v as f64
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}

impl Store for f16 {
    /// Clamped to float16's finite range first (the grid's end points can
    /// lie slightly beyond the channel's range), then rounded to nearest
    /// even: what `QuantizedTensor.dequantize` does for float16.
    #[inline(always)]
    fn store(v: f32) -> Self {
        const MAX: f32 = 65504.0;
        f16::from_f32(v.clamp(-MAX, MAX))
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self.to_f64()
    }
}

/// bfloat16 as its bit pattern in an int16 buffer (numpy has no bfloat16;
/// torch gives one with `t.view(torch.int16).numpy()`).
impl Store for i16 {
    /// Clamped to bfloat16's finite range first, like float16, then
    /// rounded to nearest even.
    #[inline(always)]
    fn store(v: f32) -> Self {
        const MAX: f32 = 3.389_531_4e38; // bfloat16's largest value, 0x7f7f
        bf16::from_f32(v.clamp(-MAX, MAX)).to_bits() as i16
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        bf16::from_bits(self as u16).to_f64()
    }
}

/// An output buffer (or a chunk of one), by element type.
enum Out<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [i16]),
}

impl<'a> Out<'a> {
    fn split_at(self, n: usize) -> (Out<'a>, Out<'a>) {
        match self {
            Out::F32(s) => {
                let (a, b) = s.split_at_mut(n);
                (Out::F32(a), Out::F32(b))
            }
            Out::F64(s) => {
                let (a, b) = s.split_at_mut(n);
                (Out::F64(a), Out::F64(b))
            }
            Out::F16(s) => {
                let (a, b) = s.split_at_mut(n);
                (Out::F16(a), Out::F16(b))
            }
            Out::Bf16(s) => {
                let (a, b) = s.split_at_mut(n);
                (Out::Bf16(a), Out::Bf16(b))
            }
        }
    }

    /// Start and length in bytes.
    fn bytes(&self) -> (usize, usize) {
        match self {
            Out::F32(s) => (s.as_ptr() as usize, std::mem::size_of_val(*s)),
            Out::F64(s) => (s.as_ptr() as usize, std::mem::size_of_val(*s)),
            Out::F16(s) => (s.as_ptr() as usize, std::mem::size_of_val(*s)),
            Out::Bf16(s) => (s.as_ptr() as usize, std::mem::size_of_val(*s)),
        }
    }
}

/// A borrowed output array, by dtype.
enum OutArray<'py> {
    F32(PyReadwriteArrayDyn<'py, f32>),
    F64(PyReadwriteArrayDyn<'py, f64>),
    F16(PyReadwriteArrayDyn<'py, f16>),
    Bf16(PyReadwriteArrayDyn<'py, i16>),
}

fn writable<'py, T: numpy::Element>(
    a: &Bound<'py, PyArrayDyn<T>>,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    if !a.is_c_contiguous() {
        return Err(InvalidArgumentError::new_err(
            "output must be a C-contiguous array",
        ));
    }
    a.try_readwrite().map_err(|e| {
        InvalidArgumentError::new_err(format!(
            "output must be a writeable array not borrowed elsewhere ({e})"
        ))
    })
}

impl<'py> OutArray<'py> {
    fn borrow(obj: &Bound<'py, PyAny>) -> PyResult<OutArray<'py>> {
        if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
            return Ok(OutArray::F32(writable(a)?));
        }
        if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
            return Ok(OutArray::F64(writable(a)?));
        }
        if let Ok(a) = obj.cast::<PyArrayDyn<f16>>() {
            return Ok(OutArray::F16(writable(a)?));
        }
        if let Ok(a) = obj.cast::<PyArrayDyn<i16>>() {
            return Ok(OutArray::Bf16(writable(a)?));
        }
        let what = match obj.getattr("dtype") {
            Ok(d) => format!("an array of dtype {d}"),
            Err(_) => obj.get_type().name()?.to_string(),
        };
        Err(PyTypeError::new_err(format!(
            "output must be a numpy array of float16, float32, float64 or int16 \
             (bfloat16 bit patterns), got {what}"
        )))
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            OutArray::F32(a) => a.shape().to_vec(),
            OutArray::F64(a) => a.shape().to_vec(),
            OutArray::F16(a) => a.shape().to_vec(),
            OutArray::Bf16(a) => a.shape().to_vec(),
        }
    }

    fn slice(&mut self) -> PyResult<Out<'_>> {
        let err = |e: numpy::NotContiguousError| InvalidArgumentError::new_err(e.to_string());
        Ok(match self {
            OutArray::F32(a) => Out::F32(a.as_slice_mut().map_err(err)?),
            OutArray::F64(a) => Out::F64(a.as_slice_mut().map_err(err)?),
            OutArray::F16(a) => Out::F16(a.as_slice_mut().map_err(err)?),
            OutArray::Bf16(a) => Out::Bf16(a.as_slice_mut().map_err(err)?),
        })
    }
}

/// Whole output channels `first..first + scale.len()` of weight `layer`.
struct Chunk<'a> {
    layer: usize,
    first: usize,
    w: &'a [f32],
    codes: Option<&'a mut [i8]>,
    scale: &'a mut [f32],
    zp: &'a mut [f32],
    out: Out<'a>,
    dot: Option<ChunkDots<'a>>,
}

/// A weight's dot-product vectors as slices.
type DotSlices<'a> = (&'a [f64], Option<&'a [f64]>);

/// The dot products a chunk computes once its channels are written: per
/// channel `w_hat . hat - w . float`, or `(w_hat - w) . hat` (float32
/// differences) without `float`; into `out`, one value per channel.
struct ChunkDots<'a> {
    hat: &'a [f64],
    float: Option<&'a [f64]>,
    out: &'a mut [f64],
}

impl ChunkDots<'_> {
    /// Fills `out` from the chunk's weights `w` and dequantized values
    /// `w_hat` (`g` elements per channel), with
    /// [`crate::stats::channel_dots`]'s arithmetic: the same bits.
    fn fill(self, w: &[f32], w_hat: &[f32], g: usize) {
        use crate::stats::{dot_diff, dot_diff_two, dot_two};
        let hat = self.hat;
        match self.float {
            Some(f) => {
                let rows = w.chunks_exact(g).zip(w_hat.chunks_exact(g));
                for (v, (row, row_hat)) in self.out.iter_mut().zip(rows) {
                    let (a, b) = dot_two(row_hat, hat, row, f);
                    *v = a - b;
                }
            }
            None => {
                // Two channels a loop (independent sums, the same bits).
                let pairs = w.chunks_exact(2 * g).zip(w_hat.chunks_exact(2 * g));
                let mut outs = self.out.chunks_exact_mut(2);
                for (o, (r, h)) in (&mut outs).zip(pairs) {
                    (o[0], o[1]) = dot_diff_two(&h[..g], &r[..g], &h[g..], &r[g..], hat);
                }
                if let [last] = outs.into_remainder() {
                    let n = w.len().min(w_hat.len());
                    if n >= g {
                        *last = dot_diff(&w_hat[n - g..n], &w[n - g..n], hat);
                    }
                }
            }
        }
    }
}

/// What a chunk contributes to its weight's results.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    flips: Flips,
    /// `sum (w_hat - w)^2` and `sum w^2`, in float64: squares of float32
    /// values (at most about 1.2e77) and their sums cannot overflow it, nor
    /// can the squares of the smallest ones underflow to zero.
    err: f64,
    norm: f64,
    nanos: u64,
}

/// A worker's reusable memory.
#[derive(Default)]
struct Worker {
    scratch: Scratch,
    /// Codes of a chunk when the caller does not keep them.
    codes: Vec<i8>,
}

fn run_chunk(
    c: Chunk<'_>,
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    wk: &mut Worker,
) -> Result<Tally, SquantError> {
    let start = Instant::now();
    let n = c.w.len();
    let g = n / c.scale.len().max(1);
    let (ptr, len) = c.out.bytes();
    prefault_pages(ptr as *mut u8, len, 1);
    let codes: &mut [i8] = match c.codes {
        Some(q) => q,
        None => {
            wk.codes.clear();
            wk.codes.resize(n, 0);
            &mut wk.codes
        }
    };
    let mut tally = Tally::default();
    let channels =
        c.w.chunks(g)
            .zip(codes.chunks_mut(g))
            .zip(c.scale.iter_mut().zip(c.zp.iter_mut()));
    for (j, ((wc, qc), (s, z))) in channels.enumerate() {
        let next = c.w.get((j + 1) * g..(j + 2) * g).unwrap_or(&[]);
        let (p, f) = case::quantize_channel_isa(
            wc,
            next,
            k,
            bits,
            quantizer,
            mode,
            c.first + j,
            qc,
            &mut wk.scratch,
            Isa::Best,
        )?;
        *s = p.scale;
        *z = p.zero_point;
        tally.flips = tally.flips + f;
    }
    let (err, norm) = match c.out {
        Out::F32(o) => {
            let sums = write_out_f32(c.w, codes, g, c.scale, c.zp, o);
            if let Some(d) = c.dot {
                d.fill(c.w, o, g);
            }
            sums
        }
        Out::F64(o) => write_out(c.w, codes, g, c.scale, c.zp, o),
        Out::F16(o) => write_out(c.w, codes, g, c.scale, c.zp, o),
        Out::Bf16(o) => write_out(c.w, codes, g, c.scale, c.zp, o),
    };
    tally.err = err;
    tally.norm = norm;
    tally.nanos = start.elapsed().as_nanos() as u64;
    Ok(tally)
}

/// Dequantized values of a chunk into `out`; returns `sum (out - w)^2` and
/// `sum w^2` (float64, in a fixed order: eight lanes, then the lanes added).
/// The same IEEE operations in every build (no FMA), so the same results.
fn write_out<T: Store>(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    out: &mut [T],
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { write_out_avx2(w, codes, g, scale, zp, out) };
        }
    }
    write_out_impl(w, codes, g, scale, zp, out)
}

/// [`write_out`] compiled for AVX2 (wider float32 division and float64
/// lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn write_out_avx2<T: Store>(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    out: &mut [T],
) -> (f64, f64) {
    write_out_impl(w, codes, g, scale, zp, out)
}

/// [`write_out`] for float32 outputs: the same IEEE operations, in the
/// same lanes (element `j` of a channel in lane `j % 8`), in the same order,
/// so the same results bit for bit; with explicit AVX2 vectors where the
/// CPU has them (the compiler leaves the generic loop's float64 sums scalar).
fn write_out_f32(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    out: &mut [f32],
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { write_out_f32_avx2(w, codes, g, scale, zp, out) };
        }
    }
    write_out_impl(w, codes, g, scale, zp, out)
}

/// [`write_out_f32`] in AVX2 vectors: per group of eight elements of a
/// channel, `(q + z) / s` in float32, then `d = w_hat - w` and the squares
/// in float64 (lanes 0-3 and 4-7 in two registers each), added without
/// FMA. A channel's last `g % 8` elements go through the same operations
/// with the unused lanes holding zeros, which add `+0.0` to sums that are
/// never negative: no change.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn write_out_f32_avx2(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    out: &mut [f32],
) -> (f64, f64) {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let n = w.len().min(codes.len()).min(out.len());
    let channels = scale.len().min(zp.len()).min(n.checked_div(g).unwrap_or(0));
    let full = g / L * L;
    let mut e_lo = _mm256_setzero_pd();
    let mut e_hi = _mm256_setzero_pd();
    let mut n_lo = _mm256_setzero_pd();
    let mut n_hi = _mm256_setzero_pd();
    // One group of eight: stores `v` where asked and adds its squares.
    macro_rules! group {
        ($v:expr, $x:expr) => {{
            let v: __m256 = $v;
            let x: __m256 = $x;
            let v_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let v_hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
            let x_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
            let x_hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x));
            let d_lo = _mm256_sub_pd(v_lo, x_lo);
            let d_hi = _mm256_sub_pd(v_hi, x_hi);
            e_lo = _mm256_add_pd(e_lo, _mm256_mul_pd(d_lo, d_lo));
            e_hi = _mm256_add_pd(e_hi, _mm256_mul_pd(d_hi, d_hi));
            n_lo = _mm256_add_pd(n_lo, _mm256_mul_pd(x_lo, x_lo));
            n_hi = _mm256_add_pd(n_hi, _mm256_mul_pd(x_hi, x_hi));
        }};
    }
    for c in 0..channels {
        let base = c * g;
        let (s, z) = (scale[c], zp[c]);
        let sv = _mm256_set1_ps(s);
        let zv = _mm256_set1_ps(z);
        let wp = w[base..base + g].as_ptr();
        let qp = codes[base..base + g].as_ptr();
        let op = out[base..base + g].as_mut_ptr();
        let mut j = 0;
        while j < full {
            // SAFETY: j + 8 <= full <= g: the eight elements lie inside the
            // channel's slices taken above.
            let q = _mm_loadl_epi64(qp.add(j).cast::<__m128i>());
            let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            let v = _mm256_div_ps(_mm256_add_ps(qf, zv), sv);
            _mm256_storeu_ps(op.add(j), v);
            group!(v, _mm256_loadu_ps(wp.add(j)));
            j += L;
        }
        if j < g {
            let p = ChannelParams {
                scale: s,
                zero_point: z,
            };
            let mut vt = [0f32; L];
            let mut xt = [0f32; L];
            for t in 0..g - j {
                let v = dequantize_one(codes[base + j + t], p);
                out[base + j + t] = v;
                vt[t] = v;
                xt[t] = w[base + j + t];
            }
            group!(_mm256_loadu_ps(vt.as_ptr()), _mm256_loadu_ps(xt.as_ptr()));
        }
    }
    let mut err = [0f64; L];
    let mut norm = [0f64; L];
    _mm256_storeu_pd(err.as_mut_ptr(), e_lo);
    _mm256_storeu_pd(err.as_mut_ptr().add(4), e_hi);
    _mm256_storeu_pd(norm.as_mut_ptr(), n_lo);
    _mm256_storeu_pd(norm.as_mut_ptr().add(4), n_hi);
    (err.iter().sum(), norm.iter().sum())
}

#[inline(always)]
fn write_out_impl<T: Store>(
    w: &[f32],
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    out: &mut [T],
) -> (f64, f64) {
    const L: usize = 8;
    let mut err = [0f64; L];
    let mut norm = [0f64; L];
    let channels = w
        .chunks(g)
        .zip(codes.chunks(g))
        .zip(out.chunks_mut(g).zip(scale.iter().zip(zp)));
    for ((wc, qc), (oc, (&s, &z))) in channels {
        let p = ChannelParams {
            scale: s,
            zero_point: z,
        };
        let mut wl = wc.chunks_exact(L);
        let mut ql = qc.chunks_exact(L);
        let mut ol = oc.chunks_exact_mut(L);
        for ((wv, qv), ov) in (&mut wl).zip(&mut ql).zip(&mut ol) {
            for i in 0..L {
                let v = T::store(dequantize_one(qv[i], p));
                ov[i] = v;
                let x = wv[i] as f64;
                let d = v.widen() - x;
                err[i] += d * d;
                norm[i] += x * x;
            }
        }
        let tail = wl
            .remainder()
            .iter()
            .zip(ql.remainder())
            .zip(ol.into_remainder());
        for (i, ((&wv, &qv), ov)) in tail.enumerate() {
            let v = T::store(dequantize_one(qv, p));
            *ov = v;
            let x = wv as f64;
            let d = v.widen() - x;
            err[i] += d * d;
            norm[i] += x * x;
        }
    }
    (err.iter().sum(), norm.iter().sum())
}

/// Dequantized values of a chunk into `out`, nothing else.
fn dequantize_out<T: Store>(codes: &[i8], g: usize, scale: &[f32], zp: &[f32], out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { dequantize_out_avx2(codes, g, scale, zp, out) };
        }
    }
    dequantize_out_impl(codes, g, scale, zp, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_out_avx2<T: Store>(
    codes: &[i8],
    g: usize,
    scale: &[f32],
    zp: &[f32],
    out: &mut [T],
) {
    dequantize_out_impl(codes, g, scale, zp, out)
}

#[inline(always)]
fn dequantize_out_impl<T: Store>(codes: &[i8], g: usize, scale: &[f32], zp: &[f32], out: &mut [T]) {
    let channels = codes
        .chunks(g)
        .zip(out.chunks_mut(g).zip(scale.iter().zip(zp)));
    for (qc, (oc, (&s, &z))) in channels {
        let p = ChannelParams {
            scale: s,
            zero_point: z,
        };
        for (o, &q) in oc.iter_mut().zip(qc) {
            *o = T::store(dequantize_one(q, p));
        }
    }
}

/// One chunk of a `dequantize_into` call.
struct DeqChunk<'a> {
    layer: usize,
    codes: &'a [i8],
    w: Option<&'a [f32]>,
    scale: &'a [f32],
    zp: &'a [f32],
    out: Out<'a>,
}

fn run_deq_chunk(c: DeqChunk<'_>) -> (usize, f64, f64) {
    let g = c.codes.len() / c.scale.len().max(1);
    let (ptr, len) = c.out.bytes();
    prefault_pages(ptr as *mut u8, len, 1);
    let (err, norm) = match c.w {
        Some(w) => match c.out {
            Out::F32(o) => write_out_f32(w, c.codes, g, c.scale, c.zp, o),
            Out::F64(o) => write_out(w, c.codes, g, c.scale, c.zp, o),
            Out::F16(o) => write_out(w, c.codes, g, c.scale, c.zp, o),
            Out::Bf16(o) => write_out(w, c.codes, g, c.scale, c.zp, o),
        },
        None => {
            match c.out {
                Out::F32(o) => dequantize_out(c.codes, g, c.scale, c.zp, o),
                Out::F64(o) => dequantize_out(c.codes, g, c.scale, c.zp, o),
                Out::F16(o) => dequantize_out(c.codes, g, c.scale, c.zp, o),
                Out::Bf16(o) => dequantize_out(c.codes, g, c.scale, c.zp, o),
            }
            (0.0, 0.0)
        }
    };
    (c.layer, err, norm)
}

/// dequantize_into(codes, scales, zero_points, outs, ws=None, threads=None)
/// --
///
/// dequantize() of every weight of a list, in one parallel pass, written
/// into `outs[i]` (codes' shape, C-contiguous, writeable; float16, float32,
/// float64, or int16 holding bfloat16 bit patterns: the 16-bit ones clamped
/// to their finite range, like QuantizedTensor.dequantize). With `ws` (the float32
/// weights the codes came from), returns every weight's relative error
/// ||w_hat - w|| / ||w|| of the stored values, else None. An error names
/// the weight by its position: "weight 3: ...".
#[pyfunction]
#[pyo3(signature = (codes, scales, zero_points, outs, ws=None, threads=None))]
pub fn dequantize_into<'py>(
    py: Python<'py>,
    codes: Vec<PyReadonlyArrayDyn<'py, i8>>,
    scales: Vec<PyReadonlyArray1<'py, f32>>,
    zero_points: Vec<PyReadonlyArray1<'py, f32>>,
    outs: Vec<Bound<'py, PyAny>>,
    ws: Option<Vec<PyReadonlyArrayDyn<'py, f32>>>,
    threads: Option<usize>,
) -> PyResult<Option<Vec<f64>>> {
    let threads = pool::resolve_threads(threads)?;
    let n = codes.len();
    let counts = [
        scales.len(),
        zero_points.len(),
        outs.len(),
        ws.as_ref().map_or(n, Vec::len),
    ];
    if counts.iter().any(|&c| c != n) {
        return Err(InvalidArgumentError::new_err(format!(
            "got {n} codes arrays but {} scales, {} zero points, {} outputs{}",
            counts[0],
            counts[1],
            counts[2],
            ws.as_ref()
                .map_or(String::new(), |w| format!(" and {} weights", w.len()))
        )));
    }
    let mut layouts = Vec::with_capacity(n);
    let mut qs = Vec::with_capacity(n);
    let mut ss = Vec::with_capacity(n);
    let mut zs = Vec::with_capacity(n);
    let mut wd = Vec::with_capacity(n);
    let mut out_arrays = Vec::with_capacity(n);
    for i in 0..n {
        let shape = codes[i].shape().to_vec();
        let layout = layout_of(&shape).map_err(|e| with_index(py, e, i))?;
        let out = OutArray::borrow(&outs[i]).map_err(|e| with_index(py, e, i))?;
        let bad = |what: String| with_index(py, InvalidArgumentError::new_err(what), i);
        if out.shape() != shape {
            return Err(bad(format!(
                "output has shape {:?}, expected the codes' shape {shape:?}",
                out.shape()
            )));
        }
        for (what, len) in [
            ("scale", scales[i].len()),
            ("zero_point", zero_points[i].len()),
        ] {
            if len != layout.oc {
                return Err(bad(format!(
                    "{what} has {len} elements, expected one per output channel ({})",
                    layout.oc
                )));
            }
        }
        if let Some(ws) = &ws {
            if ws[i].shape() != shape.as_slice() {
                return Err(bad(format!(
                    "weight has shape {:?}, expected the codes' shape {shape:?}",
                    ws[i].shape()
                )));
            }
            wd.push(Some(row_major(&ws[i])?));
        } else {
            wd.push(None);
        }
        qs.push(row_major(&codes[i])?);
        ss.push(row_major(&scales[i])?.into_owned());
        zs.push(row_major(&zero_points[i])?.into_owned());
        out_arrays.push(out);
        layouts.push(layout);
    }
    let mut out_slices = Vec::with_capacity(n);
    for o in out_arrays.iter_mut() {
        out_slices.push(o.slice()?);
    }
    let mut in_ranges: Vec<(usize, usize)> =
        qs.iter().map(|q| (q.as_ptr() as usize, q.len())).collect();
    in_ranges.extend(
        wd.iter()
            .flatten()
            .map(|w| (w.as_ptr() as usize, std::mem::size_of_val(&**w))),
    );
    let out_ranges: Vec<(usize, usize)> = out_slices.iter().map(|o| o.bytes()).collect();
    if let Some((i, j, is_out)) = find_overlap(&in_ranges, &out_ranges) {
        let other = if is_out {
            format!("output {j}")
        } else if j < n {
            format!("codes {j}")
        } else {
            "a weight".to_string()
        };
        return Err(with_index(
            py,
            InvalidArgumentError::new_err(format!(
                "output overlaps the memory of {other}: outputs must be separate buffers"
            )),
            i,
        ));
    }
    for &(start, len) in &out_ranges {
        advise_huge(start as *mut u8, len);
    }
    let mut chunks = Vec::new();
    let parts = qs
        .iter()
        .zip(&wd)
        .zip(ss.iter().zip(&zs))
        .zip(out_slices)
        .zip(&layouts);
    for (layer, ((((q, w), (s, z)), out), layout)) in parts.enumerate() {
        let g = layout.channel_len();
        let per = (CHUNK_ELEMS / g).max(1);
        let (mut q, mut s, mut z): (&[i8], &[f32], &[f32]) = (q, s, z);
        let (mut w, mut out): (Option<&[f32]>, Out<'_>) = (w.as_deref(), out);
        while !s.is_empty() {
            let m = per.min(s.len());
            let (qa, qb) = q.split_at(m * g);
            let (wa, wb) = match w {
                Some(w) => {
                    let (a, b) = w.split_at(m * g);
                    (Some(a), Some(b))
                }
                None => (None, None),
            };
            let (sa, sb) = s.split_at(m);
            let (za, zb) = z.split_at(m);
            let (oa, ob) = out.split_at(m * g);
            chunks.push(DeqChunk {
                layer,
                codes: qa,
                w: wa,
                scale: sa,
                zp: za,
                out: oa,
            });
            (q, w, s, z, out) = (qb, wb, sb, zb, ob);
        }
    }
    let sums: Vec<(usize, f64, f64)> = if threads <= 1 || chunks.len() <= 1 {
        crate::exit::detach(py, || chunks.into_iter().map(run_deq_chunk).collect())
    } else {
        let pool = pool::pool(threads)?;
        crate::exit::detach(py, || {
            pool.install(|| chunks.into_par_iter().map(run_deq_chunk).collect())
        })
    };
    if ws.is_none() {
        return Ok(None);
    }
    let mut totals = vec![(0f64, 0f64); n];
    for (layer, err, norm) in sums {
        totals[layer].0 += err;
        totals[layer].1 += norm;
    }
    Ok(Some(
        totals
            .into_iter()
            .map(|(e, w)| relative_error(e, w))
            .collect(),
    ))
}

/// A dot-product vector of `g` elements (a weight's channel length), as a
/// slice.
fn dot_vector<'a>(v: &'a PyReadonlyArray1<'_, f64>, what: &str, g: usize) -> PyResult<&'a [f64]> {
    let v = v
        .as_slice()
        .map_err(|_| InvalidArgumentError::new_err(format!("dot vector {what} not contiguous")))?;
    if v.len() != g {
        return Err(InvalidArgumentError::new_err(format!(
            "dot vector {what} has {} elements, expected the channel length {g}",
            v.len()
        )));
    }
    Ok(v)
}

/// `||w_hat - w|| / ||w||` from the sums of squares (0 when both are 0).
fn relative_error(err: f64, norm: f64) -> f64 {
    if norm > 0.0 {
        err.sqrt() / norm.sqrt()
    } else if err == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// The first (lowest) pair of byte ranges that overlap, one of them an
/// output: `(output index, other index, other is an output)`.
pub(crate) fn find_overlap(
    inputs: &[(usize, usize)],
    outputs: &[(usize, usize)],
) -> Option<(usize, usize, bool)> {
    let meet = |a: (usize, usize), b: (usize, usize)| {
        a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    };
    for (i, &o) in outputs.iter().enumerate() {
        for (j, &w) in inputs.iter().enumerate() {
            if meet(o, w) {
                return Some((i, j, false));
            }
        }
        for (j, &p) in outputs[..i].iter().enumerate() {
            if meet(o, p) {
                return Some((i, j, true));
            }
        }
    }
    None
}

/// quantize_into(ws, outs, bits, mode, keep_codes=True, threads=None, quantizer="asymmetric")
/// --
///
/// quantize() on every float32 weight of `ws` in one parallel pass, with
/// each weight's dequantized values written into `outs[i]` (same shape,
/// C-contiguous, writeable; float16, float32, float64, or int16 holding
/// bfloat16 bit patterns, the 16-bit ones clamped to their largest finite
/// value; overlapping no weight and no other output).
/// Returns per weight (codes or None, scale, zero_point, k_flips, c_flips,
/// relative_error, time_ms): relative_error is ||w_hat - w|| / ||w|| of the
/// stored values (float64 sums), time_ms the time the pass's threads spent
/// on that weight. `quantizer`: "asymmetric" (the paper's) or "symmetric".
/// `dots` (None, or one entry per weight: None or `(v_hat, v_w)`, float64
/// vectors of the weight's channel length, `v_w` may be None; the weight's
/// output float32): the last result is, per output channel,
/// `w_hat . v_hat - w . v_w`, or `(w_hat - w) . v_hat` (float32
/// differences) without `v_w`, computed as each channel is written, with
/// `channel_dots`'s arithmetic (the same bits); else None.
/// An error names the weight by its position: "weight 3: ...".
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (ws, outs, bits, mode, keep_codes=true, threads=None, quantizer="asymmetric", dots=None))]
pub fn quantize_into<'py>(
    py: Python<'py>,
    ws: Vec<PyReadonlyArrayDyn<'py, f32>>,
    outs: Vec<Bound<'py, PyAny>>,
    bits: u32,
    mode: &str,
    keep_codes: bool,
    threads: Option<usize>,
    quantizer: &str,
    dots: Option<Vec<Option<DotVectors<'py>>>>,
) -> PyResult<Vec<LayerResult<'py>>> {
    let mode = parse_mode(mode)?;
    let quantizer = parse_quantizer(quantizer)?;
    squant_core::qparams::check_bits(bits).map_err(PyCoreError)?;
    let threads = pool::resolve_threads(threads)?;
    if ws.len() != outs.len() {
        return Err(InvalidArgumentError::new_err(format!(
            "got {} weights but {} outputs",
            ws.len(),
            outs.len()
        )));
    }
    let dots = dots.unwrap_or_default();
    if !dots.is_empty() && dots.len() != ws.len() {
        return Err(InvalidArgumentError::new_err(format!(
            "got {} weights but {} dot-product entries",
            ws.len(),
            dots.len()
        )));
    }
    let mut layouts = Vec::with_capacity(ws.len());
    let mut data = Vec::with_capacity(ws.len());
    let mut out_arrays = Vec::with_capacity(ws.len());
    let mut dot_vecs: Vec<Option<DotSlices<'_>>> = Vec::with_capacity(ws.len());
    let mut dot_vals: Vec<Option<Vec<f64>>> = Vec::with_capacity(ws.len());
    let mut codes = Vec::with_capacity(ws.len());
    let mut scales = Vec::with_capacity(ws.len());
    let mut zps = Vec::with_capacity(ws.len());
    for (i, (w, o)) in ws.iter().zip(&outs).enumerate() {
        let shape = w.shape().to_vec();
        let layout = layout_of(&shape).map_err(|e| with_index(py, e, i))?;
        let out = OutArray::borrow(o).map_err(|e| with_index(py, e, i))?;
        if out.shape() != shape {
            return Err(with_index(
                py,
                InvalidArgumentError::new_err(format!(
                    "output has shape {:?}, expected the weight's shape {:?}",
                    out.shape(),
                    shape
                )),
                i,
            ));
        }
        match dots.get(i) {
            Some(Some((hat, float))) => {
                let g = layout.channel_len();
                let hat = dot_vector(hat, "v_hat", g).map_err(|e| with_index(py, e, i))?;
                let float = match float {
                    Some(f) => Some(dot_vector(f, "v_w", g).map_err(|e| with_index(py, e, i))?),
                    None => None,
                };
                if !matches!(out, OutArray::F32(_)) {
                    return Err(with_index(
                        py,
                        InvalidArgumentError::new_err("dot products need a float32 output"),
                        i,
                    ));
                }
                dot_vecs.push(Some((hat, float)));
                dot_vals.push(Some(vec![0.0; layout.oc]));
            }
            _ => {
                dot_vecs.push(None);
                dot_vals.push(None);
            }
        }
        data.push(row_major(w)?);
        out_arrays.push(out);
        if keep_codes {
            codes.push(Some(empty::<i8>(py, &shape, "int8")?));
        } else {
            codes.push(None);
        }
        scales.push(alloc::<f32>(layout.oc)?);
        zps.push(alloc::<f32>(layout.oc)?);
        layouts.push(layout);
    }
    let mut code_rw = Vec::with_capacity(codes.len());
    for c in &codes {
        code_rw.push(c.as_ref().map(|c| c.readwrite()));
    }
    let mut out_slices = Vec::with_capacity(out_arrays.len());
    for o in out_arrays.iter_mut() {
        out_slices.push(o.slice()?);
    }
    let in_ranges: Vec<(usize, usize)> = data
        .iter()
        .map(|d| (d.as_ptr() as usize, std::mem::size_of_val(&**d)))
        .collect();
    let out_ranges: Vec<(usize, usize)> = out_slices.iter().map(|o| o.bytes()).collect();
    for &(start, len) in &out_ranges {
        advise_huge(start as *mut u8, len);
    }
    if let Some((i, j, is_out)) = find_overlap(&in_ranges, &out_ranges) {
        let other = if is_out { "output" } else { "weight" };
        return Err(with_index(
            py,
            InvalidArgumentError::new_err(format!(
                "output overlaps the memory of {other} {j}: outputs must be separate buffers"
            )),
            i,
        ));
    }

    // The fixed cut into chunks, in weight then channel order.
    let mut chunks: Vec<Chunk<'_>> = Vec::new();
    let mut code_slices = Vec::with_capacity(code_rw.len());
    for c in code_rw.iter_mut() {
        code_slices.push(match c {
            Some(rw) => Some(crate::slice_mut(rw)?),
            None => None,
        });
    }
    let parts = data
        .iter()
        .zip(out_slices)
        .zip(code_slices)
        .zip(scales.iter_mut().zip(zps.iter_mut()))
        .zip(&layouts)
        .zip(dot_vecs.iter().zip(dot_vals.iter_mut()))
        .enumerate();
    for (layer, (((((w, out), mut q), (s, z)), layout), (vecs, vals))) in parts {
        let mut vals: Option<&mut [f64]> = vals.as_deref_mut();
        let g = layout.channel_len();
        let per = (CHUNK_ELEMS / g).max(1);
        let (mut w, mut out, mut s, mut z): (&[f32], Out<'_>, &mut [f32], &mut [f32]) =
            (w, out, s, z);
        let mut first = 0;
        while !s.is_empty() {
            let m = per.min(s.len());
            let (wa, wb) = w.split_at(m * g);
            let (oa, ob) = out.split_at(m * g);
            let (sa, sb) = std::mem::take(&mut s).split_at_mut(m);
            let (za, zb) = std::mem::take(&mut z).split_at_mut(m);
            let qa = match q.take() {
                Some(qs) => {
                    let (qa, qb) = qs.split_at_mut(m * g);
                    q = Some(qb);
                    Some(qa)
                }
                None => None,
            };
            let dot = match (vecs, vals.take()) {
                (Some((hat, float)), Some(v)) => {
                    let (va, vb) = v.split_at_mut(m);
                    vals = Some(vb);
                    Some(ChunkDots {
                        hat,
                        float: *float,
                        out: va,
                    })
                }
                _ => None,
            };
            chunks.push(Chunk {
                layer,
                first,
                w: wa,
                codes: qa,
                scale: sa,
                zp: za,
                out: oa,
                dot,
            });
            (w, out, s, z) = (wb, ob, sb, zb);
            first += m;
        }
    }

    let results = crate::exit::detach(py, || {
        run_all(chunks, &layouts, bits, quantizer, mode, threads)
    })
    .map_err(|f| match f {
        Failure::Core(layer, e) => with_index(py, PyCoreError(e).into(), layer),
        Failure::Py(e) => e,
    })?;
    drop(code_rw);

    // Per weight, the chunks' sums in chunk order.
    let mut tallies = vec![Tally::default(); layouts.len()];
    for (layer, r) in results {
        let t = &mut tallies[layer];
        t.flips = t.flips + r.flips;
        t.err += r.err;
        t.norm += r.norm;
        t.nanos += r.nanos;
    }
    let mut ret = Vec::with_capacity(layouts.len());
    let rows = codes.into_iter().zip(scales).zip(zps).zip(tallies);
    for ((((c, s), z), t), d) in rows.zip(dot_vals) {
        ret.push((
            c,
            s.into_pyarray(py),
            z.into_pyarray(py),
            t.flips.k,
            t.flips.c,
            relative_error(t.err, t.norm),
            t.nanos as f64 / 1e6,
            d.map(|d| d.into_pyarray(py)),
        ));
    }
    Ok(ret)
}

/// A chunk's id, weight and result.
type ChunkOutcome = (usize, usize, Result<Tally, SquantError>);

/// Why a pass stopped.
enum Failure {
    /// The first failing chunk's error, and its weight.
    Core(usize, SquantError),
    Py(PyErr),
}

/// Runs every chunk on the calling thread and `threads - 1` workers of the
/// pool. Returns `(weight, tally)` per chunk in chunk order, or the error of
/// the first failing chunk.
fn run_all(
    chunks: Vec<Chunk<'_>>,
    layouts: &[Layout],
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    threads: usize,
) -> Result<Vec<(usize, Tally)>, Failure> {
    let n = chunks.len();
    let queue = Mutex::new(chunks.into_iter().enumerate());
    let failed = AtomicBool::new(false);
    let done: Mutex<Vec<ChunkOutcome>> = Mutex::new(Vec::with_capacity(n));
    let work = || {
        let mut wk = Worker::default();
        let mut mine = Vec::new();
        loop {
            // Chunks are taken in order and a chunk taken is finished, so
            // after a failure every chunk before it has run.
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let next = match queue.lock() {
                Ok(mut q) => q.next(),
                Err(_) => break,
            };
            let Some((id, c)) = next else {
                break;
            };
            let layer = c.layer;
            let r = run_chunk(c, layouts[layer].k, bits, quantizer, mode, &mut wk);
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            mine.push((id, layer, r));
        }
        let mut all = done.lock().unwrap_or_else(|p| p.into_inner());
        all.append(&mut mine);
    };
    if threads <= 1 || n <= 1 {
        work();
    } else {
        let pool = pool::pool(threads).map_err(Failure::Py)?;
        pool.in_place_scope(|sc| {
            for _ in 1..threads.min(n) {
                sc.spawn(|_| work());
            }
            work();
        });
    }
    let mut all = done.into_inner().unwrap_or_else(|p| p.into_inner());
    all.sort_unstable_by_key(|(id, _, _)| *id);
    let mut out = Vec::with_capacity(all.len());
    for (_, layer, r) in all {
        match r {
            Ok(t) => out.push((layer, t)),
            Err(e) => return Err(Failure::Core(layer, e)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_found_between_outputs_and_inputs() {
        assert_eq!(find_overlap(&[(0, 16)], &[(16, 16)]), None);
        assert_eq!(find_overlap(&[(0, 16)], &[(8, 16)]), Some((0, 0, false)));
        assert_eq!(
            find_overlap(&[(100, 4)], &[(0, 16), (32, 8), (12, 8)]),
            Some((2, 0, true))
        );
        assert_eq!(find_overlap(&[(0, 0)], &[(0, 16)]), None);
    }

    #[test]
    fn float32_write_out_equals_the_generic_loop_bit_for_bit() {
        // A small xorshift: weights of mixed magnitudes, codes, parameters.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for g in [1usize, 3, 7, 8, 9, 15, 16, 17, 25, 64, 100] {
            let oc = 13;
            let n = oc * g;
            let w: Vec<f32> = (0..n)
                .map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3 * (1 + next() % 50) as f32)
                .collect();
            let q: Vec<i8> = (0..n).map(|_| (next() % 16) as i8 - 8).collect();
            let s: Vec<f32> = (0..oc)
                .map(|_| 1.0 + (next() % 1000) as f32 * 0.37)
                .collect();
            let z: Vec<f32> = (0..oc).map(|_| (next() % 9) as f32 - 4.0).collect();
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            let ra = write_out_f32(&w, &q, g, &s, &z, &mut a);
            let rb = write_out_impl(&w, &q, g, &s, &z, &mut b);
            assert_eq!(ra.0.to_bits(), rb.0.to_bits(), "g = {g}");
            assert_eq!(ra.1.to_bits(), rb.1.to_bits(), "g = {g}");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn relative_error_of_zero_weights() {
        assert_eq!(relative_error(0.0, 0.0), 0.0);
        assert_eq!(relative_error(1.0, 0.0), f64::INFINITY);
        assert_eq!(relative_error(4.0, 16.0), 0.5);
    }

    #[test]
    fn stores_round_like_torch() {
        assert_eq!(<f16 as Store>::store(1e6).to_f32(), 65504.0);
        assert_eq!(<f16 as Store>::store(-1e6).to_f32(), -65504.0);
        // bfloat16: round to nearest even on the 16 dropped bits.
        let x = f32::from_bits(0x3f80_8000); // exactly halfway, even below
        assert_eq!(<i16 as Store>::store(x), 0x3f80);
        let y = f32::from_bits(0x3f81_8000); // halfway, odd below: up
        assert_eq!(<i16 as Store>::store(y), 0x3f82);
        assert_eq!(<i16 as Store>::store(1.0).widen(), 1.0);
        assert_eq!(<i16 as Store>::store(3.4e38), 0x7f7f);
        assert_eq!(<i16 as Store>::store(-3.4e38) as u16, 0xff7f);
    }
}
