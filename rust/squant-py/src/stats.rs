//! Numeric helpers of the `squant+` recipe's bias correction.
//!
//! `normal_cdf`: the standard normal CDF of a float64 array, each value
//! `0.5 * erfc(-x / sqrt(2))` through the C library's `erfc` (the function
//! CPython's `math.erfc` calls: bit for bit the values of the recipe's
//! former per-element `math.erfc`, without a Python call per element).
//!
//! `channel_dots`: `W . v` per row of many float32 matrices in one parallel
//! pass (float64 products and sums).
//!
//! `scale_channels`: `out = k * w` per output channel of many float32
//! weights in one parallel pass (BatchNorm folding; the same correctly
//! rounded products as numpy's).

use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::error::InvalidArgumentError;
use crate::pool;

/// Rows are handed out in tasks of about this many elements.
const TASK_ELEMS: usize = 1 << 15;

extern "C" {
    /// The C library's complementary error function (C99 `<math.h>`).
    fn erfc(x: f64) -> f64;
}

fn cdf(x: f64) -> f64 {
    // SAFETY: `erfc` is a pure C99 math function of one double, defined
    // for every input (infinities and NaN included).
    0.5 * unsafe { erfc(-x / std::f64::consts::SQRT_2) }
}

/// normal_cdf(x)
/// --
///
/// The standard normal CDF of every element of the 1-D float64 array `x`
/// (infinities allowed): `0.5 * erfc(-x / sqrt(2))` with the C library's
/// `erfc`, the same bits as `math.erfc` element by element.
#[pyfunction]
pub fn normal_cdf<'py>(
    py: Python<'py>,
    x: PyReadonlyArray1<'py, f64>,
) -> Bound<'py, PyArray1<f64>> {
    let out: Vec<f64> = x.as_array().iter().map(|&v| cdf(v)).collect();
    out.into_pyarray(py)
}

/// `sum_i row[i] * v[i]` in float64, over four interleaved partial sums
/// (added as `(s0 + s1) + (s2 + s3)`, then the tail in order).
pub(crate) fn dot(row: &[f32], v: &[f64]) -> f64 {
    dot_lanes(quads(row), tail(row), v)
}

/// [`dot`] of the float32 differences `a[i] - b[i]` (each rounded to float32).
pub(crate) fn dot_diff(a: &[f32], b: &[f32], v: &[f64]) -> f64 {
    dot_lanes(diff_quads(a, b), diff_tail(a, b), v)
}

/// `(dot(a, va), dot(b, vb))` for rows of one length, in one loop: the two
/// sums' dependency chains interleave (twice the throughput of two calls
/// on rows in cache), each with [`dot`]'s lanes and order: the same bits.
pub(crate) fn dot_two(a: &[f32], va: &[f64], b: &[f32], vb: &[f64]) -> (f64, f64) {
    if a.len() != b.len() {
        return (dot(a, va), dot(b, vb));
    }
    lanes_two(quads(a), tail(a), va, quads(b), tail(b), vb)
}

/// `(dot_diff(a1, b1, v), dot_diff(a2, b2, v))` for rows of one length, in
/// one loop (see [`dot_two`]): the same bits as two calls.
pub(crate) fn dot_diff_two(
    a1: &[f32],
    b1: &[f32],
    a2: &[f32],
    b2: &[f32],
    v: &[f64],
) -> (f64, f64) {
    if a1.len() != a2.len() {
        return (dot_diff(a1, b1, v), dot_diff(a2, b2, v));
    }
    lanes_two(
        diff_quads(a1, b1),
        diff_tail(a1, b1),
        v,
        diff_quads(a2, b2),
        diff_tail(a2, b2),
        v,
    )
}

/// The elements of `row` four at a time (the last `len % 4` left out).
fn quads(row: &[f32]) -> impl Iterator<Item = [f32; 4]> + '_ {
    row.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]])
}

/// The last `len % 4` elements of `row`.
fn tail(row: &[f32]) -> impl Iterator<Item = f32> + '_ {
    row[row.len() - row.len() % 4..].iter().copied()
}

/// The float32 differences `a[i] - b[i]` four at a time.
fn diff_quads<'a>(a: &'a [f32], b: &'a [f32]) -> impl Iterator<Item = [f32; 4]> + 'a {
    a.chunks_exact(4)
        .zip(b.chunks_exact(4))
        .map(|(x, y)| [x[0] - y[0], x[1] - y[1], x[2] - y[2], x[3] - y[3]])
}

/// The float32 differences `a[i] - b[i]` of `a`'s last `len % 4` elements.
fn diff_tail<'a>(a: &'a [f32], b: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
    let full = a.len() - a.len() % 4;
    a[full..].iter().zip(&b[full..]).map(|(x, y)| x - y)
}

/// Two [`dot_lanes`] in one loop (the quads of both rows equal in number).
#[inline(always)]
fn lanes_two(
    q1: impl Iterator<Item = [f32; 4]>,
    t1: impl Iterator<Item = f32>,
    v1: &[f64],
    q2: impl Iterator<Item = [f32; 4]>,
    t2: impl Iterator<Item = f32>,
    v2: &[f64],
) -> (f64, f64) {
    let mut s = [0.0f64; 4];
    let mut u = [0.0f64; 4];
    let (w1, w2) = (v1.chunks_exact(4), v2.chunks_exact(4));
    let (r1, r2) = (w1.remainder(), w2.remainder());
    for ((a, x), (b, y)) in q1.zip(w1).zip(q2.zip(w2)) {
        for k in 0..4 {
            s[k] += f64::from(a[k]) * x[k];
            u[k] += f64::from(b[k]) * y[k];
        }
    }
    let mut first = (s[0] + s[1]) + (s[2] + s[3]);
    for (e, w) in t1.zip(r1) {
        first += f64::from(e) * w;
    }
    let mut second = (u[0] + u[1]) + (u[2] + u[3]);
    for (e, w) in t2.zip(r2) {
        second += f64::from(e) * w;
    }
    (first, second)
}

/// The shared body: lane `k` of the accumulator adds the products of the
/// elements `4 i + k` in order (no reassociation, so the compiler keeps the
/// four lanes in one vector register), then the lanes are added as
/// `(s0 + s1) + (s2 + s3)` and the last `len % 4` elements (`tail`) in order.
#[inline(always)]
fn dot_lanes(
    quads: impl Iterator<Item = [f32; 4]>,
    tail: impl Iterator<Item = f32>,
    v: &[f64],
) -> f64 {
    let mut s = [0.0f64; 4];
    let vq = v.chunks_exact(4);
    let rest = vq.remainder();
    for (q, w) in quads.zip(vq) {
        for k in 0..4 {
            s[k] += f64::from(q[k]) * w[k];
        }
    }
    let mut total = (s[0] + s[1]) + (s[2] + s[3]);
    for (x, w) in tail.zip(rest) {
        total += f64::from(x) * w;
    }
    total
}

/// channel_dots(mats, vecs, threads=None, minus=None)
/// --
///
/// `mats[i] @ vecs[i]` for every pair: each row of the C-contiguous float32
/// matrix `mats[i]` (OC, N) times the float64 vector `vecs[i]` (N,), the
/// products and sums in float64, as a float64 array (OC,). With `minus`
/// (one matrix of the same shape, or None, per pair), the rows are the
/// float32 differences `mats[i] - minus[i]`. All pairs run in one pass on
/// `threads` threads (the results do not depend on the count).
#[pyfunction]
#[pyo3(signature = (mats, vecs, threads=None, minus=None))]
pub fn channel_dots<'py>(
    py: Python<'py>,
    mats: Vec<PyReadonlyArray2<'py, f32>>,
    vecs: Vec<PyReadonlyArray1<'py, f64>>,
    threads: Option<usize>,
    minus: Option<Vec<Option<PyReadonlyArray2<'py, f32>>>>,
) -> PyResult<Vec<Bound<'py, PyArray1<f64>>>> {
    let threads = pool::resolve_threads(threads)?;
    if mats.len() != vecs.len() {
        return Err(InvalidArgumentError::new_err(format!(
            "got {} matrices but {} vectors",
            mats.len(),
            vecs.len()
        )));
    }
    let minus = minus.unwrap_or_default();
    if !minus.is_empty() && minus.len() != mats.len() {
        return Err(InvalidArgumentError::new_err(format!(
            "got {} matrices but {} to subtract",
            mats.len(),
            minus.len()
        )));
    }
    let mut subs: Vec<Option<&[f32]>> = vec![None; mats.len()];
    for (i, b) in minus.iter().enumerate() {
        if let Some(b) = b {
            if b.shape() != mats[i].shape() || !b.is_c_contiguous() {
                return Err(InvalidArgumentError::new_err(format!(
                    "pair {i}: the matrix to subtract must be C-contiguous, of the matrix's shape"
                )));
            }
            subs[i] = Some(b.as_slice().map_err(|_| {
                InvalidArgumentError::new_err(format!("pair {i}: matrix not C-contiguous"))
            })?);
        }
    }
    let mut pairs: Vec<(&[f32], &[f64], usize)> = Vec::with_capacity(mats.len());
    for (i, (m, v)) in mats.iter().zip(&vecs).enumerate() {
        let (rows, cols) = (m.shape()[0], m.shape()[1]);
        if v.len() != cols {
            return Err(InvalidArgumentError::new_err(format!(
                "pair {i}: matrix has {cols} columns but the vector {} elements",
                v.len()
            )));
        }
        if !m.is_c_contiguous() {
            return Err(InvalidArgumentError::new_err(format!(
                "pair {i}: matrix not C-contiguous"
            )));
        }
        let ms = m.as_slice().map_err(|_| {
            InvalidArgumentError::new_err(format!("pair {i}: matrix not C-contiguous"))
        })?;
        let vs = v.as_slice().map_err(|_| {
            InvalidArgumentError::new_err(format!("pair {i}: vector not contiguous"))
        })?;
        pairs.push((ms, vs, rows));
    }
    // Tasks of whole rows: (pair, first row, row count).
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &(_, v, rows)) in pairs.iter().enumerate() {
        let per = (TASK_ELEMS / v.len().max(1)).max(1);
        let mut first = 0;
        while first < rows {
            let n = per.min(rows - first);
            tasks.push((i, first, n));
            first += n;
        }
    }
    let run = || -> Vec<Vec<f64>> {
        tasks
            .par_iter()
            .map(|&(i, first, n)| {
                let (m, v, _) = pairs[i];
                let cols = v.len();
                let row = |r: usize| r * cols..(r + 1) * cols;
                match subs[i] {
                    None => (first..first + n).map(|r| dot(&m[row(r)], v)).collect(),
                    Some(b) => (first..first + n)
                        .map(|r| dot_diff(&m[row(r)], &b[row(r)], v))
                        .collect(),
                }
            })
            .collect()
    };
    let pool = pool::pool(threads)?;
    let parts = crate::exit::detach(py, || pool.install(run));
    let mut outs: Vec<Vec<f64>> = pairs
        .iter()
        .map(|&(_, _, rows)| Vec::with_capacity(rows))
        .collect();
    for (&(i, _, _), part) in tasks.iter().zip(parts) {
        outs[i].extend(part);
    }
    Ok(outs.into_iter().map(|o| o.into_pyarray(py)).collect())
}

/// Channels of one weight: (weights, factors, output, channel length).
type ScaleTask<'a> = (&'a [f32], &'a [f32], &'a mut [f32], usize);

/// scale_channels(ws, ks, outs, threads=None)
/// --
///
/// `outs[i][c, ...] = ws[i][c, ...] * ks[i][c]` for every float32 weight
/// `ws[i]` (C-contiguous, output channels first) and float32 factor vector
/// `ks[i]` (one per output channel), written into `outs[i]` (same shape,
/// C-contiguous, writeable, separate from every weight and every other
/// output), all in one pass on `threads` threads. An output that is not
/// writeable or shares memory with another array raises
/// InvalidArgumentError.
#[pyfunction]
#[pyo3(signature = (ws, ks, outs, threads=None))]
pub fn scale_channels<'py>(
    py: Python<'py>,
    ws: Vec<PyReadonlyArrayDyn<'py, f32>>,
    ks: Vec<PyReadonlyArray1<'py, f32>>,
    outs: Vec<Bound<'py, PyArrayDyn<f32>>>,
    threads: Option<usize>,
) -> PyResult<()> {
    let threads = pool::resolve_threads(threads)?;
    if ws.len() != ks.len() || ws.len() != outs.len() {
        return Err(InvalidArgumentError::new_err(format!(
            "got {} weights, {} factor vectors and {} outputs",
            ws.len(),
            ks.len(),
            outs.len()
        )));
    }
    // Borrowed here, not as arguments: an output that is read-only or
    // aliases a weight or another output is an error, not a panic.
    let mut outs = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            o.try_readwrite().map_err(|e| {
                InvalidArgumentError::new_err(format!(
                    "weight {i}: output must be a writeable array not borrowed elsewhere ({e})"
                ))
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let mut tasks: Vec<ScaleTask<'_>> = Vec::new();
    // Byte ranges, to refuse outputs sharing memory the borrows above
    // cannot see (say two arrays over one buffer).
    let (mut in_ranges, mut out_ranges) = (Vec::new(), Vec::new());
    for (i, ((w, k), o)) in ws.iter().zip(&ks).zip(outs.iter_mut()).enumerate() {
        if w.shape() != o.shape() || w.ndim() == 0 || w.shape()[0] != k.len() {
            return Err(InvalidArgumentError::new_err(format!(
                "weight {i}: shapes {:?}, {:?} and output {:?} do not match",
                w.shape(),
                k.len(),
                o.shape()
            )));
        }
        let not_contiguous = |what: &str| {
            InvalidArgumentError::new_err(format!("weight {i}: {what} not C-contiguous"))
        };
        if !w.is_c_contiguous() {
            return Err(not_contiguous("weight"));
        }
        if !o.is_c_contiguous() {
            return Err(not_contiguous("output"));
        }
        let ws_ = w.as_slice().map_err(|_| not_contiguous("weight"))?;
        let ks_ = k.as_slice().map_err(|_| not_contiguous("factors"))?;
        let os_ = o.as_slice_mut().map_err(|_| not_contiguous("output"))?;
        in_ranges.push((ws_.as_ptr() as usize, std::mem::size_of_val(ws_)));
        out_ranges.push((os_.as_ptr() as usize, std::mem::size_of_val(os_)));
        let g = if ks_.is_empty() {
            0
        } else {
            ws_.len() / ks_.len()
        };
        let per = (TASK_ELEMS / g.max(1)).max(1);
        let (mut wr, mut kr, mut or) = (ws_, ks_, os_);
        while !kr.is_empty() {
            let m = per.min(kr.len());
            let (wa, wb) = wr.split_at(m * g);
            let (ka, kb) = kr.split_at(m);
            let (oa, ob) = std::mem::take(&mut or).split_at_mut(m * g);
            tasks.push((wa, ka, oa, g));
            (wr, kr, or) = (wb, kb, ob);
        }
    }
    if let Some((i, j, is_out)) = crate::model::find_overlap(&in_ranges, &out_ranges) {
        let other = if is_out { "output" } else { "weight" };
        return Err(InvalidArgumentError::new_err(format!(
            "weight {i}: output overlaps the memory of {other} {j}: outputs must be separate buffers"
        )));
    }
    let pool = pool::pool(threads)?;
    crate::exit::detach(py, || {
        pool.install(|| {
            tasks.into_par_iter().for_each(|(w, k, out, g)| {
                for ((o, x), &f) in out.chunks_mut(g.max(1)).zip(w.chunks(g.max(1))).zip(k) {
                    for (d, &v) in o.iter_mut().zip(x) {
                        *d = v * f;
                    }
                }
            })
        })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{cdf, dot, dot_diff, dot_diff_two, dot_two};

    #[test]
    fn dot_sums_in_f64() {
        let row: Vec<f32> = (0..11).map(|i| i as f32 * 0.5).collect();
        let v: Vec<f64> = (0..11).map(|i| 1.0 - i as f64 * 0.25).collect();
        let want: f64 = row.iter().zip(&v).map(|(a, b)| f64::from(*a) * b).sum();
        assert!((dot(&row, &v) - want).abs() < 1e-12);
        assert_eq!(dot(&[], &[]), 0.0);
        let ones = vec![1.0f32; 11];
        let diff: Vec<f32> = row.iter().map(|a| a - 1.0).collect();
        assert_eq!(dot_diff(&row, &ones, &v), dot(&diff, &v));
    }

    #[test]
    fn paired_dots_are_single_dots_bit_for_bit() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state % 20001) as f64 - 10000.0) * 1e-3 * (1 + state % 97) as f64
        };
        for n in 0..19 {
            let mut row = || (0..n).map(|_| next() as f32).collect::<Vec<f32>>();
            let (a, b, c, d) = (row(), row(), row(), row());
            let mut vec = || (0..n).map(|_| next()).collect::<Vec<f64>>();
            let (va, vb) = (vec(), vec());
            let (x, y) = dot_two(&a, &va, &b, &vb);
            assert_eq!(x.to_bits(), dot(&a, &va).to_bits(), "n = {n}");
            assert_eq!(y.to_bits(), dot(&b, &vb).to_bits(), "n = {n}");
            let (x, y) = dot_diff_two(&a, &b, &c, &d, &va);
            assert_eq!(x.to_bits(), dot_diff(&a, &b, &va).to_bits(), "n = {n}");
            assert_eq!(y.to_bits(), dot_diff(&c, &d, &va).to_bits(), "n = {n}");
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(cdf(0.0), 0.5);
        assert_eq!(cdf(f64::INFINITY), 1.0);
        assert_eq!(cdf(f64::NEG_INFINITY), 0.0);
        assert!(cdf(f64::NAN).is_nan());
        assert!((cdf(1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
    }
}
