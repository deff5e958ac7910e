//! `clip_ratios`: the per-output-channel clip ratio search of the `squant+`
//! recipe's `weight_range="bn-mse"` (python/squant_rs/model/recipe.py).
//!
//! Bit for bit the results of the recipe's former numpy code: the same
//! float32 and float64 operations element by element, and the error sums
//! in numpy's own order (numpy 2.x on x86-64): the pairwise sum of
//! `ndarray.sum` ([`numpy_sum`]) for a full `(OC, N)` importance, the
//! two-lane sum of `np.einsum` ([`numpy_einsum_dot`]) for one `(1, N)` row,
//! both in blocks of numpy's 8192-element buffer. Rows run in parallel.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::error::{InvalidArgumentError, PyCoreError};
use crate::{pool, row_major, with_room};

/// Rows are handed out in tasks of about this many elements (times ratios).
const TASK_ELEMS: usize = 1 << 14;

/// Below this many element-ratio steps the call runs on the calling thread.
const SERIAL_BELOW: usize = 1 << 16;

/// numpy's default buffer size: reductions with a cast sum in blocks of it.
const NP_BUFSIZE: usize = 8192;

/// numpy's pairwise summation block (`PW_BLOCKSIZE`).
const PW_BLOCKSIZE: usize = 128;

/// numpy's `pairwise_sum` of float32 values widened to float64.
fn pairwise(a: &[f32]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0f64;
        for &x in a {
            res += f64::from(x);
        }
        res
    } else if n <= PW_BLOCKSIZE {
        let mut r = [0.0f64; 8];
        for (acc, &x) in r.iter_mut().zip(a) {
            *acc = f64::from(x);
        }
        let full = n - n % 8;
        for block in a[8..full].chunks_exact(8) {
            for (acc, &x) in r.iter_mut().zip(block) {
                *acc += f64::from(x);
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[full..] {
            res += f64::from(x);
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise(&a[..n2]) + pairwise(&a[n2..])
    }
}

/// `a.sum(dtype=np.float64)` of a float32 row as numpy sums it: pairwise
/// within each buffer of 8192 elements, the buffers added in order.
#[inline(always)]
fn numpy_sum(a: &[f32]) -> f64 {
    let mut out = 0.0f64;
    for chunk in a.chunks(NP_BUFSIZE) {
        out += pairwise(chunk);
    }
    out
}

/// One buffer of `np.einsum("on,n->o", k, row, dtype=np.float64)`'s inner
/// loop (`sum_of_products_contig_contig_outstride0_two` on two float64
/// lanes, unfused multiply-add): blocks of 8 taken from the back
/// (elements 6-7, 4-5, 2-3, 0-1), then pairs, the lanes added last. For
/// `G` rows `ks` of `k` at once: each row's additions in that order, the
/// rows' chains interleaved (they would otherwise wait on each other).
#[inline(always)]
fn einsum_lanes<const G: usize>(ks: [&[f32]; G], b: &[f64]) -> [f64; G] {
    let mut acc = [[0.0f64; 2]; G];
    let n = b.len();
    let full = n - n % 8;
    let mut i = 0;
    while i < full {
        for pair in (0..4).rev() {
            for (a, s) in ks.iter().zip(acc.iter_mut()) {
                for (lane, s) in s.iter_mut().enumerate() {
                    let j = i + 2 * pair + lane;
                    *s += f64::from(a[j]) * b[j];
                }
            }
        }
        i += 8;
    }
    while i < n {
        for (a, s) in ks.iter().zip(acc.iter_mut()) {
            for (lane, s) in s.iter_mut().enumerate() {
                // A missing lane adds 0 * 0 (numpy loads it as zero).
                let j = i + lane;
                *s += if j < n { f64::from(a[j]) * b[j] } else { 0.0 };
            }
        }
        i += 2;
    }
    acc.map(|s| s[0] + s[1])
}

/// `sum_n k[n] * row[n]` in float64 for each of `G` rows `ks` as
/// `np.einsum` sums it: per buffer of 8192 elements ([`einsum_lanes`]), the
/// buffers added in order. Every row has `row`'s length.
#[inline(always)]
fn numpy_einsum_dots<const G: usize>(ks: [&[f32]; G], row: &[f64]) -> [f64; G] {
    let mut out = [0.0f64; G];
    let mut start = 0;
    while start < row.len() {
        let end = row.len().min(start + NP_BUFSIZE);
        let part = einsum_lanes(ks.map(|k| &k[start..end]), &row[start..end]);
        for (o, p) in out.iter_mut().zip(part) {
            *o += p;
        }
        start = end;
    }
    out
}

/// Rows shorter than this run in the AVX2 build even where the CPU has
/// AVX-512 (measured: 3x slower on rows of 9, a depthwise 3x3 kernel).
const AVX512_MIN_N: usize = 64;

/// Ratios whose einsum sums run together.
const GROUP: usize = 4;

/// [`numpy_einsum_dots`] of the first `G` rows of `n` elements of `k`.
#[inline(always)]
fn dots<const G: usize>(k: &[f32], n: usize, row: &[f64]) -> [f64; G] {
    numpy_einsum_dots(std::array::from_fn(|j| &k[j * n..(j + 1) * n]), row)
}

/// [`numpy_einsum_dots`] of one row.
#[cfg(test)]
fn numpy_einsum_dot(k: &[f32], row: &[f64]) -> f64 {
    numpy_einsum_dots([k], row)[0]
}

/// `np.rint` of a float32 (round half to even), NaN and infinities kept.
#[inline(always)]
fn rint(t: f32) -> f32 {
    // Above 2^23 every float32 is an integer; below it, adding 2^23 leaves
    // no fraction bits, so the addition rounds (to even, the default mode).
    const TWO23: f32 = 8_388_608.0;
    let a = t.abs();
    if a < TWO23 {
        ((a + TWO23) - TWO23).copysign(t)
    } else {
        t
    }
}

/// The minimum and maximum of a non-empty `x` by `<` / `>` over eight
/// lanes (so that it vectorises), and whether `x` holds a NaN (then the
/// bounds mean nothing); `None` for an empty `x`.
#[inline(always)]
fn lane_min_max<T: Copy + PartialOrd>(x: &[T], is_nan: impl Fn(T) -> bool) -> Option<(T, T, bool)> {
    let first = *x.first()?;
    let (mut mn, mut mx) = ([first; 8], [first; 8]);
    let mut nan = false;
    let mut blocks = x.chunks_exact(8);
    for b in &mut blocks {
        for (j, &v) in b.iter().enumerate() {
            nan |= is_nan(v);
            mn[j] = if v < mn[j] { v } else { mn[j] };
            mx[j] = if v > mx[j] { v } else { mx[j] };
        }
    }
    for &v in blocks.remainder() {
        nan |= is_nan(v);
        mn[0] = if v < mn[0] { v } else { mn[0] };
        mx[0] = if v > mx[0] { v } else { mx[0] };
    }
    let lo = mn.iter().fold(first, |a, &b| if b < a { b } else { a });
    let hi = mx.iter().fold(first, |a, &b| if b > a { b } else { a });
    Some((lo, hi, nan))
}

/// `(np.min(x), np.max(x))` in float64 (NaN where `x` holds one), `None`
/// for an empty `x` (a zero's sign never shows in the ratios).
#[inline(always)]
fn min_max<T: Elem>(x: &[T]) -> Option<(f64, f64)> {
    let (lo, hi, nan) = lane_min_max(x, T::nan)?;
    Some(if nan {
        (f64::NAN, f64::NAN)
    } else {
        (lo.into(), hi.into())
    })
}

/// The weights of each element's squared error.
#[derive(Clone, Copy)]
enum Importance<'a> {
    /// One float32 row per output channel, row-major (OC, N).
    Full(&'a [f32]),
    /// One row for every output channel, widened to float64.
    Row(&'a [f64]),
}

/// The search of one problem: `w` row-major (rows, n), `levels = 2^bits - 1`.
struct Search<'a, T> {
    w: &'a [T],
    n: usize,
    imp: Importance<'a>,
    levels: f64,
    ratios: &'a [f64],
}

impl<T: Elem> Search<'_, T> {
    /// The chosen ratio of row `o`, `u` and `k` being scratch buffers.
    #[inline(always)]
    fn row(&self, o: usize, u: &mut Vec<f32>, k: &mut Vec<f32>) -> f64 {
        let n = self.n;
        let x = &self.w[o * n..(o + 1) * n];
        let Some((mn, mx)) = min_max(x) else {
            return 1.0; // no weights: nothing to clip
        };
        // np.maximum: NaN wins.
        let d = mx - mn;
        let width = if d.is_nan() { d } else { d.max(1e-30) };
        let scale = self.levels / width;
        let levels = self.levels as f32;
        u.resize(n, 0.0);
        for (uu, &v) in u.iter_mut().zip(x) {
            *uu = ((v.into() - mn) * scale) as f32;
        }
        let mut best = f64::INFINITY;
        let mut chosen = 1.0f64;
        let mut pick = |r: f64, err: f64| {
            let err = err * (r * r);
            if err < best {
                best = err;
                chosen = r;
            }
        };
        // One grid per ratio: `t = (u - off) / r` in its steps.
        let grid = |r: f64| (((r - 1.0) * mn * scale) as f32, (1.0 / r) as f32);
        match self.imp {
            Importance::Full(imp) => {
                let imp = &imp[o * n..(o + 1) * n];
                k.resize(n, 0.0);
                for &r in self.ratios {
                    let (off, inv) = grid(r);
                    for ((kk, &uu), &w) in k.iter_mut().zip(u.iter()).zip(imp) {
                        *kk = sq_err(uu, off, inv, levels) * w;
                    }
                    pick(r, numpy_sum(k));
                }
            }
            Importance::Row(row) => {
                // GROUP ratios at a time, their sums interleaved.
                k.resize(GROUP * n, 0.0);
                for rs in self.ratios.chunks(GROUP) {
                    for (&r, kr) in rs.iter().zip(k.chunks_exact_mut(n.max(1))) {
                        let (off, inv) = grid(r);
                        for (kk, &uu) in kr.iter_mut().zip(u.iter()) {
                            *kk = sq_err(uu, off, inv, levels);
                        }
                    }
                    let errs: &[f64] = match rs.len() {
                        4 => &dots::<4>(k, n, row),
                        3 => &dots::<3>(k, n, row),
                        2 => &dots::<2>(k, n, row),
                        _ => &dots::<1>(k, n, row),
                    };
                    for (&r, &err) in rs.iter().zip(errs) {
                        pick(r, err);
                    }
                }
            }
        }
        chosen
    }

    /// The chosen ratios of rows `first..first + count`: the AVX-512 build
    /// where the CPU has it and rows are long, else the AVX2 one, else the
    /// baseline one (the same operations, so the same bits); `None` where
    /// the scratch rows cannot be allocated.
    fn rows(&self, first: usize, count: usize) -> Option<Vec<f64>> {
        #[cfg(target_arch = "x86_64")]
        if self.n >= AVX512_MIN_N && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { self.rows_avx512(first, count) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.rows_avx2(first, count) };
        }
        self.rows_impl(first, count)
    }

    /// [`Self::rows_impl`] compiled for AVX-512F (512-bit vectors).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn rows_avx512(&self, first: usize, count: usize) -> Option<Vec<f64>> {
        self.rows_impl(first, count)
    }

    /// [`Self::rows_impl`] compiled for AVX2 (wider float32 vectors).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn rows_avx2(&self, first: usize, count: usize) -> Option<Vec<f64>> {
        self.rows_impl(first, count)
    }

    /// [`Self::rows`] in the build of its caller.
    #[inline(always)]
    fn rows_impl(&self, first: usize, count: usize) -> Option<Vec<f64>> {
        // the most `row` uses: one row `u`, GROUP rows `k`
        let (mut u, mut k) = (Vec::new(), Vec::new());
        u.try_reserve_exact(self.n).ok()?;
        k.try_reserve_exact(self.n.checked_mul(GROUP)?).ok()?;
        let mut out = Vec::with_capacity(count);
        for o in first..first + count {
            out.push(self.row(o, &mut u, &mut k));
        }
        Some(out)
    }
}

/// `(rint(t) clipped to [0, levels] - t)^2` in float32, `t = (u - off) * inv`.
#[inline(always)]
fn sq_err(u: f32, off: f32, inv: f32, levels: f32) -> f32 {
    let t = (u - off) * inv;
    let q = rint(t);
    // np.clip: NaN stays NaN.
    let q = if q < 0.0 {
        0.0
    } else if q > levels {
        levels
    } else {
        q
    };
    let e = q - t;
    e * e
}

/// A 2-D float32 or float64 weight, borrowed.
enum Weights<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
}

impl<'py> Weights<'py> {
    fn borrow(obj: &Bound<'py, PyAny>) -> PyResult<Weights<'py>> {
        let busy = |e: numpy::BorrowError| {
            InvalidArgumentError::new_err(format!("w is borrowed elsewhere ({e})"))
        };
        if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
            return Ok(Weights::F64(a.try_readonly().map_err(busy)?));
        }
        if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
            return Ok(Weights::F32(a.try_readonly().map_err(busy)?));
        }
        let what = match obj.getattr("dtype") {
            Ok(d) => format!("an array of dtype {d}"),
            Err(_) => obj.get_type().name()?.to_string(),
        };
        Err(InvalidArgumentError::new_err(format!(
            "w must be a numpy array of float32 or float64, got {what}"
        )))
    }

    /// `(OC, N)` of a 2-D weight.
    fn rows_cols(&self) -> PyResult<(usize, usize)> {
        let shape = match self {
            Weights::F32(a) => a.shape(),
            Weights::F64(a) => a.shape(),
        };
        match *shape {
            [oc, n] => Ok((oc, n)),
            ref s => Err(InvalidArgumentError::new_err(format!(
                "w must be 2-D (OC, N), got shape {s:?}"
            ))),
        }
    }
}

/// clip_ratios(w, importance, bits, ratios, threads=None)
/// --
///
/// Per row `o` of the float32 or float64 weight `w` (OC, N), the ratio `r`
/// of `ratios` whose grid on `[r min_o, r max_o]` (`2^bits` levels, nearest
/// rounding, clipped) gives the least `sum_n importance[o, n] (Q(w) - w)^2`,
/// `importance` float32 of shape (OC, N) or one row (1, N) for every
/// channel. Ties keep the earlier ratio; 1.0 where no ratio gives a finite
/// error. Bit for bit the recipe's former numpy code (float32 rounding,
/// float64 sums in numpy's order). Returns (OC,) float64 ratios.
#[pyfunction]
#[pyo3(signature = (w, importance, bits, ratios, threads=None))]
pub fn clip_ratios<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    importance: PyReadonlyArrayDyn<'py, f32>,
    bits: u32,
    ratios: Vec<f64>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    squant_core::qparams::check_bits(bits).map_err(PyCoreError)?;
    let threads = pool::resolve_threads(threads)?;
    if let Some(r) = ratios.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        return Err(InvalidArgumentError::new_err(format!(
            "clip ratios must be finite and positive, got {r}"
        )));
    }
    let w = Weights::borrow(w)?;
    let (oc, n) = w.rows_cols()?;
    let full = match *importance.shape() {
        [r, c] if c == n && r == oc => true,
        [1, c] if c == n => false,
        ref s => {
            return Err(InvalidArgumentError::new_err(format!(
                "importance must have shape ({oc}, {n}) or (1, {n}), got {s:?}"
            )))
        }
    };
    let imp = row_major(&importance)?;
    let row: Vec<f64> = if full {
        Vec::new()
    } else {
        let mut row = with_room(imp.len())?;
        row.extend(imp.iter().map(|&v| f64::from(v)));
        row
    };
    let imp = if full {
        Importance::Full(&imp)
    } else {
        Importance::Row(&row)
    };
    let levels = f64::from((1u32 << bits) - 1);
    let out = match &w {
        Weights::F32(a) => run(py, row_major(a)?, n, imp, levels, &ratios, oc, threads),
        Weights::F64(a) => run(py, row_major(a)?, n, imp, levels, &ratios, oc, threads),
    }?;
    Ok(out.into_pyarray(py))
}

/// The chosen ratio of every row of `w` (row-major, `rows` x `n`), with
/// the GIL released, on `threads` threads (the same results for every count).
#[allow(clippy::too_many_arguments)]
fn run<T: Elem>(
    py: Python<'_>,
    w: Cow<'_, [T]>,
    n: usize,
    imp: Importance<'_>,
    levels: f64,
    ratios: &[f64],
    rows: usize,
    threads: usize,
) -> PyResult<Vec<f64>> {
    let s = Search {
        w: &w,
        n,
        imp,
        levels,
        ratios,
    };
    let work = rows
        .saturating_mul(n.max(1))
        .saturating_mul(ratios.len().max(1));
    let no_memory =
        || PyMemoryError::new_err(format!("cannot allocate the scratch of rows of {n}"));
    if threads == 1 || work < SERIAL_BELOW {
        return crate::exit::detach(py, || s.rows(0, rows)).ok_or_else(no_memory);
    }
    let per = (TASK_ELEMS / n.max(1)).max(1);
    let tasks: Vec<(usize, usize)> = (0..rows)
        .step_by(per)
        .map(|first| (first, per.min(rows - first)))
        .collect();
    let pool = pool::pool(threads)?;
    let parts: Option<Vec<Vec<f64>>> = crate::exit::detach(py, || {
        pool.install(|| {
            tasks
                .par_iter()
                .map(|&(first, count)| s.rows(first, count))
                .collect()
        })
    });
    Ok(parts.ok_or_else(no_memory)?.concat())
}

/// Rows of at least this many elements in all are clipped per task.
const CLIP_TASK_ELEMS: usize = 1 << 16;

/// A float32 or float64 element of a weight to clip.
trait Elem: Copy + Default + Into<f64> + PartialOrd + Send + Sync {
    /// `np.ndarray.astype` of a float64 to this type.
    fn from_f64(v: f64) -> Self;
    /// The bits of the value (for telling NaNs and zeros apart).
    fn bits(self) -> u64;
    /// A NaN.
    fn nan(self) -> bool;
    /// The bits of numpy's canonical quiet NaN (`np.nan`) of this type.
    fn canonical_nan_bits() -> u64;
}

impl Elem for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    #[inline(always)]
    fn nan(self) -> bool {
        self.is_nan()
    }
    #[inline(always)]
    fn canonical_nan_bits() -> u64 {
        0x7fc0_0000
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn bits(self) -> u64 {
        self.to_bits()
    }
    #[inline(always)]
    fn nan(self) -> bool {
        self.is_nan()
    }
    #[inline(always)]
    fn canonical_nan_bits() -> u64 {
        0x7ff8_0000_0000_0000
    }
}

/// `(x.min(), x.max())` of a non-empty row as numpy gives them, or `None`
/// where numpy's answer depends on its reduction order: a zero bound in a
/// row that holds zeros of both signs, or a row with NaNs of different
/// bits or signalling ones (numpy's result is one of them).
#[inline(always)]
fn exact_min_max<T: Elem>(x: &[T]) -> Option<(T, T)> {
    let (lo, hi, nan) = lane_min_max(x, T::nan)?;
    if nan {
        // numpy's min and max are then a NaN: the row's own one or the
        // canonical quiet NaN, by row length and position (its vector
        // loops make the canonical one). Unambiguous only where every NaN
        // of the row is the canonical one.
        let canonical = T::canonical_nan_bits();
        let all = x.iter().filter(|v| v.nan()).all(|v| v.bits() == canonical);
        let n0 = *x.iter().find(|v| v.nan())?;
        return all.then_some((n0, n0));
    }
    let zero = T::from_f64(0.0);
    if lo == zero || hi == zero {
        // A zero bound: numpy's has the sign of the row's zeros where
        // they all have one (then so has ours: it is one of them).
        let mut zeros = x.iter().filter(|&&v| v == zero);
        let z0 = *zeros.next()?;
        if !zeros.all(|v| v.bits() == z0.bits()) {
            return None;
        }
    }
    Some((lo, hi))
}

/// `np.clip(x, lo, hi)` of one element as numpy 2 computes it:
/// `min(max(x, lo), hi)` with a NaN first operand kept and, on a tie
/// (`+0` against `-0`), the first operand (checked against `np.clip` over
/// all pairs of +-0, +-1, +-inf and NaN).
#[inline(always)]
fn clip_one<T: Elem>(x: T, lo: T, hi: T) -> T {
    let t = if x.nan() || x >= lo { x } else { lo };
    if t.nan() || t <= hi {
        t
    } else {
        hi
    }
}

/// Clips rows `x` (`n` elements each) into `out` per [`clip_rows`]; false
/// where some row's bounds are ambiguous ([`exact_min_max`]).
#[inline(always)]
fn clip_block<T: Elem>(x: &[T], out: &mut [MaybeUninit<T>], n: usize, ratios: &[f64]) -> bool {
    for ((row, dst), &r) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(ratios) {
        let Some((mn, mx)) = exact_min_max(row) else {
            return false;
        };
        let lo = T::from_f64(r * mn.into());
        let hi = T::from_f64(r * mx.into());
        for (d, &v) in dst.iter_mut().zip(row) {
            d.write(clip_one(v, lo, hi));
        }
    }
    true
}

/// [`clip_block`] in the widest build the CPU has (the same bits).
fn clip_block_dispatch<T: Elem>(
    x: &[T],
    out: &mut [MaybeUninit<T>],
    n: usize,
    ratios: &[f64],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { clip_block_avx2(x, out, n, ratios) };
    }
    clip_block(x, out, n, ratios)
}

/// [`clip_block`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn clip_block_avx2<T: Elem>(x: &[T], out: &mut [MaybeUninit<T>], n: usize, ratios: &[f64]) -> bool {
    clip_block(x, out, n, ratios)
}

/// clip_rows(w, ratios, threads=None)
/// --
///
/// The float32 or float64 weight `w` (OC, N) clipped per row `o` to
/// `[lo_o, hi_o]`, `lo = (ratios[:, None] * w.min(axis=1, keepdims=True))
/// .astype(w.dtype)` and `hi` likewise with the max: a new C-contiguous
/// array, bit for bit `np.clip(w, lo, hi)` (NaN propagating as there).
/// `None` where numpy's `min`/`max` of some row depends on its reduction
/// order (a zero bound in a row holding zeros of both signs; NaNs of
/// different bits); the caller then clips with numpy. `ratios`: (OC,)
/// finite float64. Rows run in parallel on `threads` threads.
#[pyfunction]
#[pyo3(signature = (w, ratios, threads=None))]
pub fn clip_rows<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    ratios: PyReadonlyArrayDyn<'py, f64>,
    threads: Option<usize>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let threads = pool::resolve_threads(threads)?;
    let w = Weights::borrow(w)?;
    let (oc, n) = w.rows_cols()?;
    if ratios.shape() != [oc] {
        return Err(InvalidArgumentError::new_err(format!(
            "ratios must have shape ({oc},), got {:?}",
            ratios.shape()
        )));
    }
    let ratios = row_major(&ratios)?;
    if let Some(r) = ratios.iter().find(|r| !r.is_finite()) {
        return Err(InvalidArgumentError::new_err(format!(
            "clip ratios must be finite, got {r}"
        )));
    }
    Ok(match &w {
        Weights::F32(a) => {
            clip_all(py, &row_major(a)?, oc, n, &ratios, threads)?.map(|v| v.into_any())
        }
        Weights::F64(a) => {
            clip_all(py, &row_major(a)?, oc, n, &ratios, threads)?.map(|v| v.into_any())
        }
    })
}

/// [`clip_rows`] of `w` (row-major, `oc` x `n`) with the GIL released.
fn clip_all<'py, T: Elem + numpy::Element>(
    py: Python<'py>,
    w: &[T],
    oc: usize,
    n: usize,
    ratios: &[f64],
    threads: usize,
) -> PyResult<Option<Bound<'py, PyArray2<T>>>> {
    let mut out: Vec<T> = with_room(w.len())?;
    let buf = &mut out.spare_capacity_mut()[..w.len()];
    let ok = if n == 0 {
        true
    } else if threads == 1 || w.len() < 2 * CLIP_TASK_ELEMS {
        crate::exit::detach(py, || clip_block_dispatch(w, buf, n, ratios))
    } else {
        let per = (CLIP_TASK_ELEMS / n).max(1);
        let pool = pool::pool(threads)?;
        crate::exit::detach(py, || {
            pool.install(|| {
                buf.par_chunks_mut(per * n)
                    .zip(w.par_chunks(per * n))
                    .zip(ratios.par_chunks(per))
                    .all(|((dst, src), r)| clip_block_dispatch(src, dst, n, r))
            })
        })
    };
    if !ok {
        return Ok(None);
    }
    // SAFETY: every row was written (`ok`: no block stopped early; with
    // `n == 0` there is nothing to write), and the capacity is `w.len()`.
    unsafe { out.set_len(w.len()) };
    let arr = numpy::ndarray::Array2::from_shape_vec((oc, n), out)
        .map_err(|e| InvalidArgumentError::new_err(format!("clip_rows: {e}")))?;
    Ok(Some(arr.into_pyarray(py)))
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::{
        clip_block, clip_block_dispatch, exact_min_max, numpy_einsum_dot, numpy_sum, pairwise,
        rint, Importance, Search,
    };

    #[test]
    fn rint_rounds_half_to_even() {
        let cases = [
            (0.5f32, 0.0f32),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, -0.0),
            (-1.5, -2.0),
            (2.4999998, 2.0),
            (8_388_607.5, 8_388_608.0),
            (1e30, 1e30),
        ];
        for (t, want) in cases {
            assert_eq!(rint(t).to_bits(), want.to_bits(), "rint({t})");
            assert_eq!(rint(t), t.round_ties_even());
        }
        assert!(rint(f32::NAN).is_nan());
        assert_eq!(rint(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn sums_agree_with_plain_sums_on_exact_values() {
        // Small integers: every order gives the same exact sum.
        let a: Vec<f32> = (0..20_000).map(|i| (i % 7) as f32).collect();
        let want: f64 = a.iter().map(|&x| f64::from(x)).sum();
        assert_eq!(numpy_sum(&a), want);
        assert_eq!(pairwise(&a[..5]), 10.0);
        let ones = vec![1.0f64; a.len()];
        assert_eq!(numpy_einsum_dot(&a, &ones), want);
        assert_eq!(numpy_einsum_dot(&a[..3], &ones[..3]), 3.0);
        assert_eq!(numpy_sum(&[]), 0.0);
    }

    /// `a` spread over 2^-30..2^30 (so that the order of the float64
    /// additions shows in the last bits) and `b`, both float32.
    fn spread(n: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..n)
            .map(|i| {
                let pow = f32::from_bits(((i % 61) as u32 + 127 - 30) << 23);
                ((i * 7919 % 1013) as f32 / 1013.0) * pow
            })
            .collect();
        let b = (0..n).map(|i| (i * 104_729 % 997) as f32 / 997.0).collect();
        (a, b)
    }

    #[test]
    fn sums_in_numpys_order() {
        // Pinned from numpy 2.4 (x86-64): with i = np.arange(n),
        // a = (i*7919 % 1013).astype(np.float32) / np.float32(1013)
        //     * np.exp2(i % 61 - 30).astype(np.float32),
        // b = (i*104729 % 997).astype(np.float32) / np.float32(997):
        // (a*b).sum(dtype=np.float64) and
        // np.einsum("on,n->o", a[None], b, dtype=np.float64)[0].
        let pinned = [
            (300, 0x41E1_0BD1_FB85_A54B_u64, 0x41E1_0BD1_FE0B_5C37_u64),
            (1100, 0x4201_AC77_12CE_BA70, 0x4201_AC77_13A4_E1DF),
            (8492, 0x4231_0F85_42E6_72FD, 0x4231_0F85_434E_3B47),
        ];
        for (n, sum_bits, einsum_bits) in pinned {
            let (a, b) = spread(n);
            let prod: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
            let row: Vec<f64> = b.iter().map(|&y| f64::from(y)).collect();
            assert_eq!(numpy_sum(&prod).to_bits(), sum_bits, "sum, n = {n}");
            assert_eq!(
                numpy_einsum_dot(&a, &row).to_bits(),
                einsum_bits,
                "einsum, n = {n}"
            );
            // ... which a plain sequential sum misses
            let seq: f64 = a.iter().zip(&row).map(|(&x, y)| f64::from(x) * y).sum();
            assert_ne!(seq.to_bits(), einsum_bits);
        }
    }

    #[test]
    fn builds_agree() {
        // The dispatched build, the AVX2 and AVX-512 ones (where the CPU
        // has them) and the baseline one give the same ratios on
        // pseudo-random rows.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (rows, n) = (37, 141);
        let w: Vec<f64> = (0..rows * n).map(|_| next() * 2.0 - 1.0).collect();
        let full: Vec<f32> = (0..rows * n).map(|_| next() as f32).collect();
        let row: Vec<f64> = (0..n).map(|_| f64::from(next() as f32)).collect();
        let ratios: Vec<f64> = (0..41).map(|i| 1.0 - 0.0125 * f64::from(i)).collect();
        for imp in [Importance::Full(&full), Importance::Row(&row)] {
            for levels in [3.0, 15.0, 255.0] {
                let s = Search {
                    w: &w,
                    n,
                    imp,
                    levels,
                    ratios: &ratios,
                };
                let got = s.rows(0, rows).expect("scratch");
                let base = s.rows_impl(0, rows).expect("scratch");
                assert_eq!(got, base);
                #[cfg(target_arch = "x86_64")]
                for (feature, on) in [
                    ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                    ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
                ] {
                    if !on {
                        eprintln!("builds_agree: no {feature} on this CPU, not compared");
                        continue;
                    }
                    let built = if feature == "avx2" {
                        // SAFETY: the CPU supports AVX2, checked above.
                        unsafe { s.rows_avx2(0, rows) }
                    } else {
                        // SAFETY: the CPU supports AVX-512F, checked above.
                        unsafe { s.rows_avx512(0, rows) }
                    };
                    assert_eq!(
                        built,
                        Some(base.clone()),
                        "{feature} build, levels {levels}"
                    );
                }
                // (coarse grids clip some rows)
                assert!(levels > 100.0 || got.iter().any(|&r| r != 1.0));
            }
        }
    }

    #[test]
    fn hand_computed_ratios() {
        // The recipe's test row: 2 bits, grid 0..3 of the full range
        // rounds the 1.3s; r = 0.65 holds 0 and 1.3 and clips 3.
        let w = [0.0f64, 1.3, 1.3, 1.3, 3.0];
        let ratios: Vec<f64> = (0..11).map(|i| 1.0 - 0.05 * f64::from(i)).collect();
        let imp = [1.0f32, 10.0, 10.0, 10.0, 0.01];
        let s = Search {
            w: &w,
            n: 5,
            imp: Importance::Full(&imp),
            levels: 3.0,
            ratios: &ratios,
        };
        let got = s.rows(0, 1).expect("scratch");
        assert_eq!(got.len(), 1);
        assert!((got[0] - 0.65).abs() < 1e-12, "{got:?}");
        let row: Vec<f64> = [1.0f32, 0.01, 0.01, 0.01, 10.0].map(f64::from).to_vec();
        let s = Search {
            imp: Importance::Row(&row),
            ..s
        };
        assert_eq!(s.rows(0, 1), Some(vec![1.0]));
        // All-equal and empty rows keep the full range.
        let flat = [2.0f32; 4];
        let s = Search {
            w: &flat,
            n: 4,
            imp: Importance::Row(&[1.0; 4]),
            levels: 15.0,
            ratios: &ratios,
        };
        assert_eq!(s.rows(0, 1), Some(vec![1.0]));
    }

    #[test]
    fn clip_bounds_and_builds() {
        // numpy's bounds: NaN where the row has one (numpy's canonical NaN), the
        // zero of the row's one sign; None where numpy's reduction order
        // would choose.
        assert_eq!(exact_min_max(&[1.0f32, -2.0, 3.0]), Some((-2.0, 3.0)));
        let (lo, hi) = exact_min_max(&[-0.0f64, -1.0, -0.0]).unwrap();
        assert_eq!((lo, hi.to_bits()), (-1.0, (-0.0f64).to_bits()));
        assert_eq!(exact_min_max(&[0.0f32, -0.0, 1.0]), None);
        assert_eq!(exact_min_max(&[1.0f32, f32::NAN, -f32::NAN]), None);
        // other NaNs: numpy gives the row's own or the canonical one
        assert_eq!(exact_min_max(&[1.0f32, -f32::NAN, 2.0]), None);
        assert_eq!(exact_min_max(&[1.0f32, f32::from_bits(0x7fc1_2345)]), None);
        assert_eq!(
            exact_min_max(&[f64::from_bits(0x7ff8_0000_0000_0001)]),
            None
        );
        let (lo, hi) = exact_min_max(&[1.0f32, f32::NAN, 2.0, f32::NAN]).unwrap();
        assert_eq!(
            (lo.to_bits(), hi.to_bits()),
            (f32::NAN.to_bits(), f32::NAN.to_bits())
        );
        assert_eq!(exact_min_max::<f32>(&[]), None);
        // the dispatched build (AVX2 where the CPU has it) and the baseline
        // one clip alike: r = 0.5 of [-4, 3] is [-2, 1.5]
        let (rows, n) = (5, 37);
        let mut x: Vec<f32> = (0..rows * n).map(|i| (i % 8) as f32 - 4.0).collect();
        x[n + 3] = f32::INFINITY;
        x[2 * n + 5] = f32::NAN;
        let ratios = [0.5, 1.0, 0.75, 0.5, 0.9];
        type Block = fn(&[f32], &mut [MaybeUninit<f32>], usize, &[f64]) -> bool;
        let run = |f: Block| {
            let mut out = vec![MaybeUninit::new(0.0f32); rows * n];
            assert!(f(&x, &mut out, n, &ratios));
            // SAFETY: every element was written (initialized above, too).
            out.iter()
                .map(|v| unsafe { v.assume_init() })
                .collect::<Vec<f32>>()
        };
        let base = run(clip_block);
        let fast = run(clip_block_dispatch);
        assert_eq!(
            base.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(&base[..8], &[-2.0, -2.0, -2.0, -1.0, 0.0, 1.0, 1.5, 1.5]);
        assert!(base[2 * n..3 * n].iter().all(|v| v.is_nan()));
        assert_eq!(base[n + 3], f32::INFINITY); // r = 1: [-4, inf]
    }
}
