//! The lane path: SQuant for the common case, sixteen kernels at a time.
//!
//! The general path (`case.rs`) keeps six arrays per channel and decides
//! kernel after kernel. Here a block of [`L`] kernels is transposed into
//! lanes (lane `l` holds kernel `l`, one array per kernel position), so that
//! every step of SQuant-K -- the sum, the direction, the top two priorities,
//! the flips and the carry -- runs for sixteen kernels at once in straight
//! vector code; only the flipped codes are written back one by one.
//!
//! The lane path only takes decisions it can prove equal to the exact ones:
//! - CASE sums are taken in f64. A decision (sign, `t`, `over`) can only
//!   change where `|S|` crosses a multiple of 0.5, so a sum closer to one
//!   than its error bound (f64 rounding, the fixed-point rounding of
//!   `sum.rs`, and the f32 conversion of `|S|`) is not decided here;
//! - a kernel step needs at most the first two ranks of its order (`t` flips
//!   plus the carry); the lanes track exactly those two.
//!
//! A kernel the lanes cannot decide (near a boundary, more than two ranks
//! needed, `S == 0`) is redone alone by [`kernel_exact`]; a channel whose
//! channel-level sum is near a boundary, or whose step must flip more
//! elements than it has candidates, returns `None` and the caller runs the
//! general path. Codes and flip counts are identical either way (tested
//! against the scalar reference).

use crate::case::{key, key_pos, step_params, table, Flips};
use crate::mode::Mode;
use crate::qparams::ChannelParams;
use crate::sum;

/// Kernels per block (lanes).
pub(crate) const L: usize = 16;

/// Channels longer than this take the general path (the f64 error bound of
/// the channel sum grows with the square of the length).
const MAX_CHANNEL: usize = 1 << 16;

/// Round half to even.
pub(crate) trait Round {
    /// Whether the build has a rounding instruction (and, with it, the
    /// vector blends of SSE4.1 / NEON).
    const HARDWARE: bool;
    fn rne(x: f32) -> f32;
}

/// The hardware instruction (`roundps`/`vrndscaleps`, `frintn`); for builds
/// that have one.
pub(crate) struct HwRound;

#[cfg(target_arch = "x86_64")]
pub(crate) use crate::fast_avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use crate::fast_avx512::Avx512;

impl Round for HwRound {
    const HARDWARE: bool = true;
    #[inline(always)]
    fn rne(x: f32) -> f32 {
        x.round_ties_even()
    }
}

/// The add-and-subtract trick of `qparams::rne`, for builds without a
/// rounding instruction (baseline x86-64).
#[allow(dead_code)] // unused on targets that always have a rounding instruction
pub(crate) struct SoftRound;

impl Round for SoftRound {
    const HARDWARE: bool = false;
    #[inline(always)]
    fn rne(x: f32) -> f32 {
        crate::qparams::rne(x)
    }
}

/// The int8 code of a value: `clamp(r, tmin, tmax)` (docs/algorithm.md section 4, step 4). `r` is an
/// integer in a small range, so adding 1.5 * 2^23 puts it in the low
/// mantissa bits: an integer-only conversion that vectorises.
#[inline(always)]
pub(crate) fn code_of(r: f32, tmin: f32, tmax: f32) -> i8 {
    // Comparisons, not f32::max/min (whose NaN rules cost extra
    // instructions; r is never NaN here).
    let r = if r < tmin { tmin } else { r };
    let r = if r > tmax { tmax } else { r };
    let v = r + 12_582_912.0;
    (v.to_bits() as i32).wrapping_sub(0x4B40_0000) as i8
}

/// The vector building blocks of the lane path: a portable build (plain
/// loops the compiler vectorises) and, on x86-64 CPUs with AVX-512, one
/// written with intrinsics (`fast_avx512.rs`). Both compute the same IEEE
/// operations, so they give the same results.
pub(crate) trait Simd {
    /// Rounding for the scalar parts.
    type R: Round;
    /// Whether the kernel level runs in lanes. Without a blend instruction
    /// (baseline x86-64, SSE2) the lanes cost more than the general path's
    /// kernel after kernel (ResNet-50 set, one thread: 424-444 against 287
    /// ms), so that build leaves channels with a kernel level to it.
    const LANE_KERNELS: bool = true;
    /// Min and max of a channel, or the index of its first non-finite value.
    fn min_max(w: &[f32]) -> Result<(f32, f32), usize>;
    /// SQuant-E codes of a run of elements.
    fn e_codes(w: &[f32], p: ChannelParams, tmin: f32, tmax: f32, codes: &mut [i8]);
    /// SQuant-E with what a channel level over the elements needs: codes,
    /// `pv` (see [`Lanes::p`]), the f64 sum of the errors and the numbers
    /// of up and down candidates.
    fn e_pass(
        w: &[f32],
        p: ChannelParams,
        tmin: f32,
        tmax: f32,
        codes: &mut [i8],
        pv: &mut [f32],
    ) -> (f64, usize, usize);
    /// One CASE step on each of `L` kernels of `K` elements in lanes (see
    /// [`kernel_block`]): writes the codes of the decided kernels into
    /// `qb` and their carries to `carries` (when `CARRY`), with positions
    /// offset by `base`. Returns the changed codes, the lanes it could not
    /// decide (one bit each) and the f64 sum of the errors of the decided
    /// kernels after the step.
    fn block<const K: usize, const CARRY: bool>(
        wb: &[f32],
        p: ChannelParams,
        tmin: f32,
        tmax: f32,
        qb: &mut [i8],
        carries: Carries<'_>,
        base: u32,
    ) -> (u32, u32, f64);
    /// Keys of the entries whose priority `sign * v` exceeds `thr`
    /// (`idx`: scratch).
    fn collect_above(vals: &[f32], sign: f32, thr: f32, keys: &mut Vec<u64>, idx: &mut Vec<u32>);
}

/// Where a block writes its `L` carries (see [`Lanes`]).
pub(crate) struct Carries<'a> {
    pub cp: &'a mut [f32],
    pub cpos: &'a mut [u32],
    pub ccur: &'a mut [f32],
}

/// The portable build, with rounding `R`.
pub(crate) struct Portable<R>(std::marker::PhantomData<R>);

impl<R: Round> Simd for Portable<R> {
    type R = R;
    const LANE_KERNELS: bool = R::HARDWARE;

    #[inline(always)]
    fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
        crate::qparams::min_max(w)
    }

    #[inline(always)]
    fn e_codes(w: &[f32], p: ChannelParams, tmin: f32, tmax: f32, codes: &mut [i8]) {
        e_codes::<R>(w, p, tmin, tmax, codes)
    }

    #[inline(always)]
    fn e_pass(
        w: &[f32],
        p: ChannelParams,
        tmin: f32,
        tmax: f32,
        codes: &mut [i8],
        pv: &mut [f32],
    ) -> (f64, usize, usize) {
        e_pass::<R>(w, p, tmin, tmax, codes, pv)
    }

    #[inline(always)]
    fn block<const K: usize, const CARRY: bool>(
        wb: &[f32],
        p: ChannelParams,
        tmin: f32,
        tmax: f32,
        qb: &mut [i8],
        carries: Carries<'_>,
        base: u32,
    ) -> (u32, u32, f64) {
        e_codes::<R>(wb, p, tmin, tmax, qb);
        let out = kernel_block::<R, K, CARRY>(wb, p, tmin, tmax, qb);
        if CARRY {
            carries.cp.copy_from_slice(&out.cp);
            carries.ccur.copy_from_slice(&out.ccur);
            for (d, &s) in carries.cpos.iter_mut().zip(&out.cpos) {
                *d = base + s;
            }
        }
        (out.changed, out.bad, out.sum.iter().sum())
    }

    #[inline(always)]
    fn collect_above(vals: &[f32], sign: f32, thr: f32, keys: &mut Vec<u64>, _: &mut Vec<u32>) {
        collect_above(vals, sign, thr, keys)
    }
}

/// Working memory of the lane path, reused across channels.
#[derive(Default)]
pub(crate) struct Lanes {
    /// Per element: `e` where the element is a candidate of either table
    /// (they exclude each other), else 0. Up priority `-p`, down `p`.
    p: Vec<f32>,
    /// Per kernel, its carry: priority signed by table (up negative).
    cp: Vec<f32>,
    /// Position of the carry in the channel.
    cpos: Vec<u32>,
    /// Current value of the carried element minus its E-level value.
    ccur: Vec<f32>,
    keys: Vec<u64>,
    idx: Vec<u32>,
    kx: Vec<f32>,
    kr: Vec<f32>,
    ke: Vec<f32>,
    kkeys: Vec<u64>,
}

/// Quantizes one channel on the lane path; `None` when it needs the general
/// path (`codes` may then hold anything).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn channel<S: Simd>(
    w: &[f32],
    next: &[f32],
    k: usize,
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    mode: Mode,
    codes: &mut [i8],
    ln: &mut Lanes,
) -> Option<Flips> {
    let g = w.len();
    if g > MAX_CHANNEL || codes.len() != g {
        return None;
    }
    let run_k = mode.has_k() && k > 1;
    let run_c = mode.has_c();
    let mut flips = Flips::default();
    if !run_k {
        if !run_c {
            for (c, ((wc, qc), _)) in chunks(w, codes, &mut ln.p).enumerate() {
                prefetch_lines(next, c * CHUNK_LINES, (c + 1) * CHUNK_LINES);
                S::e_codes(wc, p, tmin, tmax, qc);
            }
            return Some(flips);
        }
        ln.p.resize(g, 0.0);
        let (mut s, mut n_up, mut n_dn) = (0.0, 0, 0);
        for (c, ((wc, qc), pc)) in chunks(w, codes, &mut ln.p).enumerate() {
            prefetch_lines(next, c * CHUNK_LINES, (c + 1) * CHUNK_LINES);
            let (cs, cu, cd) = S::e_pass(wc, p, tmin, tmax, qc, pc);
            s += cs;
            n_up += cu;
            n_dn += cd;
        }
        let (up, t) = channel_decision(s, g)?;
        flips.c = channel_flips_elements::<S>(w, p, tmin, tmax, up, t, n_up, n_dn, codes, ln)?;
        return Some(flips);
    }
    if !S::LANE_KERNELS {
        return None;
    }
    let (changed, s) = match k {
        9 => kernel_level::<S, 9>(w, next, p, tmin, tmax, run_c, codes, ln),
        3 => kernel_level::<S, 3>(w, next, p, tmin, tmax, run_c, codes, ln),
        // 1x7 / 7x1 (Inception) and 5-tap kernels.
        7 => kernel_level::<S, 7>(w, next, p, tmin, tmax, run_c, codes, ln),
        5 => kernel_level::<S, 5>(w, next, p, tmin, tmax, run_c, codes, ln),
        _ => return None,
    };
    flips.k = changed;
    if run_c {
        let (up, t) = channel_decision(s, g)?;
        flips.c = channel_flips_carries::<S::R>(w, p, tmin, tmax, up, t, codes, ln)?;
    }
    Some(flips)
}

/// Elements per chunk of an element pass (16 cache lines).
const CHUNK_LINES: usize = 16;

/// `w`, `codes` and `pv` in chunks of `CHUNK_LINES` lines of `w` (`pv` may
/// be empty).
#[inline(always)]
fn chunks<'a>(
    w: &'a [f32],
    codes: &'a mut [i8],
    pv: &'a mut [f32],
) -> impl Iterator<Item = ((&'a [f32], &'a mut [i8]), &'a mut [f32])> {
    const N: usize = CHUNK_LINES * L;
    let pv_chunks = pv
        .chunks_mut(N)
        .chain(std::iter::repeat_with(<&mut [f32]>::default));
    w.chunks(N).zip(codes.chunks_mut(N)).zip(pv_chunks)
}

/// Starts loading 64-byte lines `[from, to)` of `next` into the cache: the
/// channel that comes after the one being computed, so that its first pass
/// (min and max) finds it there instead of waiting on memory.
#[inline(always)]
fn prefetch_lines(next: &[f32], from: usize, to: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = (to * L).min(next.len());
        let mut i = from * L;
        while i < end {
            // SAFETY: a prefetch is only a hint, and the address lies
            // inside `next`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    next.as_ptr().add(i).cast(),
                )
            };
            i += L;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (next, from, to);
}

/// SQuant-E codes of a run of elements.
#[inline(always)]
fn e_codes<R: Round>(w: &[f32], p: ChannelParams, tmin: f32, tmax: f32, codes: &mut [i8]) {
    for (q, &wv) in codes.iter_mut().zip(w) {
        let x = p.scale * wv - p.zero_point;
        *q = code_of(R::rne(x), tmin, tmax);
    }
}

/// SQuant-E for a channel whose C level ranks its elements: codes, `p`, the
/// channel sum (f64) and the numbers of up and down candidates.
#[inline(always)]
fn e_pass<R: Round>(
    w: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    codes: &mut [i8],
    pv: &mut [f32],
) -> (f64, usize, usize) {
    let mut acc = [0f64; L];
    let mut nu = [0u32; L];
    let mut nd = [0u32; L];
    let n = w.len().min(codes.len()).min(pv.len());
    let full = n / L * L;
    for i in (0..full).step_by(L) {
        let (wb, qb, pb) = (&w[i..i + L], &mut codes[i..i + L], &mut pv[i..i + L]);
        let mut e = [0f32; L];
        let mut cu = [false; L];
        let mut cd = [false; L];
        for l in 0..L {
            let x = p.scale * wb[l] - p.zero_point;
            let r = R::rne(x);
            e[l] = r - x;
            qb[l] = code_of(r, tmin, tmax);
            cu[l] = (e[l] < 0.0) & (x < tmax);
            cd[l] = (e[l] > 0.0) & (x > tmin);
        }
        for l in 0..L {
            pb[l] = if cu[l] | cd[l] { e[l] } else { 0.0 };
            nu[l] += cu[l] as u32;
            nd[l] += cd[l] as u32;
            acc[l] += e[l] as f64;
        }
    }
    for i in full..n {
        let l = i - full;
        let x = p.scale * w[i] - p.zero_point;
        let r = R::rne(x);
        let e = r - x;
        codes[i] = code_of(r, tmin, tmax);
        let u = (e < 0.0) & (x < tmax);
        let d = (e > 0.0) & (x > tmin);
        pv[i] = if u | d { e } else { 0.0 };
        nu[l] += u as u32;
        nd[l] += d as u32;
        acc[l] += e as f64;
    }
    let n_up = nu.iter().map(|&v| v as usize).sum();
    let n_dn = nd.iter().map(|&v| v as usize).sum();
    (acc.iter().sum(), n_up, n_dn)
}

/// Direction and flip count of a channel step from its f64 sum, or `None`
/// when the sum is too close to a multiple of 0.5 to be sure (see module
/// doc): `|S|` is within `g * 2^-41` (fixed point) plus `g^2 * 2^-52` (f64
/// rounding) of the exact sum, and its f32 conversion within half an ulp.
#[inline(always)]
fn channel_decision(s: f64, g: usize) -> Option<(bool, usize)> {
    let a = s.abs() as f32;
    let gf = g as f32;
    let tol = a * 2f32.powi(-21) + gf * 2f32.powi(-38) + gf * gf * 2f32.powi(-50) + 2f32.powi(-30);
    if (a - (a + a).round_ties_even() * 0.5).abs() <= tol {
        return None;
    }
    Some((s < 0.0, a.round_ties_even() as usize))
}

/// Keys (priority, position) of the entries whose priority `sign * v`
/// exceeds `thr`, in `keys`: a bit mask per block of `L`, then one push per
/// set bit.
#[inline(always)]
fn collect_above(vals: &[f32], sign: f32, thr: f32, keys: &mut Vec<u64>) {
    keys.clear();
    for (b, block) in vals.chunks(L).enumerate() {
        let mut m = 0u32;
        for (i, &v) in block.iter().enumerate() {
            m |= ((v * sign > thr) as u32) << i;
        }
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            keys.push(key(block[i] * sign, b * L + i));
        }
    }
}

/// Up to this many wanted keys, [`keep_top`] keeps a sorted buffer.
const TOP_BUFFER: usize = 32;

/// The `t` largest keys (unique), in `keys[..t]` (any order).
///
/// A small `t` among many keys (the usual channel step: a handful of flips
/// among hundreds of carries) keeps a sorted buffer of the `t` best: after
/// the first few keys almost none beats its last entry, so the scan is one
/// well-predicted comparison per key. Otherwise quickselect.
#[inline(always)]
fn keep_top(keys: &mut [u64], t: usize) {
    let n = keys.len();
    if t == 0 || t >= n {
        return;
    }
    if t > TOP_BUFFER || 4 * t > n {
        keys.select_nth_unstable_by(t - 1, |a, b| b.cmp(a));
        return;
    }
    let mut top = [0u64; TOP_BUFFER];
    top[..t].copy_from_slice(&keys[..t]);
    top[..t].sort_unstable_by(|a, b| b.cmp(a));
    let mut last = top[t - 1];
    for &k in &keys[t..] {
        if k > last {
            let mut i = t - 1;
            while i > 0 && top[i - 1] < k {
                top[i] = top[i - 1];
                i -= 1;
            }
            top[i] = k;
            last = top[t - 1];
        }
    }
    keys[..t].copy_from_slice(&top[..t]);
}

/// SQuant-C over the element priorities (K level skipped): flips the first
/// `t` elements of the order; returns the number of changed codes, or
/// `None` when the order runs out of candidates (the general path then
/// continues it with zero-priority positions).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_flips_elements<S: Simd>(
    w: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    up: bool,
    t: usize,
    n_up: usize,
    n_dn: usize,
    codes: &mut [i8],
    ln: &mut Lanes,
) -> Option<u64> {
    if t == 0 {
        return Some(0);
    }
    let n_pos = if up { n_up } else { n_dn };
    if t > n_pos {
        return None;
    }
    let sign = if up { -1.0 } else { 1.0 };
    // Candidate priorities are spread over (0, 0.5]: guess a threshold that
    // a few more than t of them pass, and lower it to 0 if too few do.
    let want = t + 16;
    let mut thr: f32 = if n_pos > 2 * want {
        0.5 - 0.5 * want as f32 / n_pos as f32
    } else {
        0.0
    };
    S::collect_above(&ln.p, sign, thr, &mut ln.keys, &mut ln.idx);
    if ln.keys.len() < t && thr > 0.0 {
        thr = 0.0;
        S::collect_above(&ln.p, sign, thr, &mut ln.keys, &mut ln.idx);
    }
    if ln.keys.len() < t {
        return None;
    }
    keep_top(&mut ln.keys, t);
    let mut changed = 0;
    for &kk in &ln.keys[..t] {
        changed += channel_flip::<S::R>(w, key_pos(kk), 0.0, p, up, tmin, tmax, codes);
    }
    Some(changed)
}

/// Flips element `j` in direction `up` at the channel level (docs/algorithm.md section 2's
/// table value, computed from its `x`) and writes its code; returns 1 when
/// the value changed. `cur`: its current value minus its E-level value.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_flip<R: Round>(
    w: &[f32],
    j: usize,
    cur: f32,
    p: ChannelParams,
    up: bool,
    tmin: f32,
    tmax: f32,
    codes: &mut [i8],
) -> u64 {
    let x = p.scale * w[j] - p.zero_point;
    let (v, _) = table(x, up, tmin, tmax);
    codes[j] = code_of(v, tmin, tmax);
    u64::from(v != R::rne(x) + cur)
}

/// SQuant-C after SQuant-K: only the carries have a priority. Flips the
/// first `t` of them in the order; `None` when fewer than `t` are positive
/// in direction `up` (the order then continues with every other position).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_flips_carries<R: Round>(
    w: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    up: bool,
    t: usize,
    codes: &mut [i8],
    ln: &mut Lanes,
) -> Option<u64> {
    if t == 0 {
        return Some(0);
    }
    let sign = if up { -1.0 } else { 1.0 };
    // Carry positions grow with the kernel index, so ranking by index ranks
    // by position.
    let keys = &mut ln.keys;
    keys.clear();
    keys.resize(ln.cp.len(), 0);
    let mut n = 0;
    for (i, &v) in ln.cp.iter().enumerate() {
        let pr = v * sign;
        keys[n] = key(pr, i);
        n += (pr > 0.0) as usize;
    }
    if n < t {
        return None;
    }
    keep_top(&mut keys[..n], t);
    let mut changed = 0;
    for &kk in &keys[..t] {
        let i = key_pos(kk);
        let j = ln.cpos[i] as usize;
        changed += channel_flip::<R>(w, j, ln.ccur[i], p, up, tmin, tmax, codes);
    }
    Some(changed)
}

/// SQuant-K over a channel of kernels of `K` elements: blocks of `L`
/// kernels in lanes, the rest one by one. Records the carries when `carry`.
/// Returns the number of changed codes and the channel sum after the level.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kernel_level<S: Simd, const K: usize>(
    w: &[f32],
    next: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    carry: bool,
    codes: &mut [i8],
    ln: &mut Lanes,
) -> (u64, f64) {
    let ic = w.len() / K;
    // Without carries the blocks write into these unused slots.
    let slots = if carry { ic } else { L };
    ln.cp.resize(slots, 0.0);
    ln.cpos.resize(slots, 0);
    ln.ccur.resize(slots, 0.0);
    let mut total = 0f64;
    let mut changed = 0u64;
    let blocks = ic / L;
    for b in 0..blocks {
        // A block reads K cache lines of this channel: start loading as
        // many of the next one.
        prefetch_lines(next, b * K, (b + 1) * K);
        let base = b * L * K;
        let wb = &w[base..base + L * K];
        let qb = &mut codes[base..base + L * K];
        let at = if carry { b * L } else { 0 };
        let carries = Carries {
            cp: &mut ln.cp[at..at + L],
            cpos: &mut ln.cpos[at..at + L],
            ccur: &mut ln.ccur[at..at + L],
        };
        let (ch, bad, s) = if carry {
            S::block::<K, true>(wb, p, tmin, tmax, qb, carries, base as u32)
        } else {
            S::block::<K, false>(wb, p, tmin, tmax, qb, carries, base as u32)
        };
        changed += ch as u64;
        total += s;
        let mut bad = bad;
        while bad != 0 {
            let l = bad.trailing_zeros() as usize;
            bad &= bad - 1;
            let (ch, s) = exact_into::<S::R>(w, b * L + l, K, p, tmin, tmax, carry, codes, ln);
            changed += ch;
            total += s;
        }
    }
    for kk in blocks * L..ic {
        let (ch, s) = exact_into::<S::R>(w, kk, K, p, tmin, tmax, carry, codes, ln);
        changed += ch;
        total += s;
    }
    (changed, total)
}

/// [`kernel_exact`] on kernel `kk` of the channel, its carry stored.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn exact_into<R: Round>(
    w: &[f32],
    kk: usize,
    k: usize,
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    carry: bool,
    codes: &mut [i8],
    ln: &mut Lanes,
) -> (u64, f64) {
    let span = kk * k..(kk + 1) * k;
    let (ch, c, s) = kernel_exact::<R>(&w[span.clone()], p, tmin, tmax, &mut codes[span], ln);
    if carry {
        ln.cp[kk] = c.0;
        ln.cpos[kk] = (kk * k + c.1) as u32;
        ln.ccur[kk] = c.2;
    }
    (ch, s)
}

/// What one block of lanes hands back.
struct BlockOut {
    /// Codes changed by the block (its undecided lanes excluded).
    changed: u32,
    /// Lanes the block could not decide: one bit per lane.
    bad: u32,
    /// Kernel sums after the step (0 for undecided lanes).
    sum: [f64; L],
    /// Carry of each kernel: signed priority, position in the block,
    /// current value minus E-level value.
    cp: [f32; L],
    cpos: [u32; L],
    ccur: [f32; L],
}

/// One CASE step on each of `L` kernels of `K` elements (`wb`, contiguous),
/// in lanes. The block's SQuant-E codes are already in `qb`; flipped codes
/// are written over them.
#[inline(always)]
fn kernel_block<R: Round, const K: usize, const CARRY: bool>(
    wb: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    qb: &mut [i8],
) -> BlockOut {
    assert!(wb.len() == L * K && qb.len() == L * K);
    let (s, z) = (p.scale, p.zero_point);
    // Transposed E level: position j of kernel l at [j][l].
    let mut xs = [[0f32; L]; K];
    let mut rs = [[0f32; L]; K];
    let mut es = [[0f32; L]; K];
    let mut sum = [0f64; L];
    for j in 0..K {
        for l in 0..L {
            let x = s * wb[l * K + j] - z;
            let r = R::rne(x);
            let e = r - x;
            xs[j][l] = x;
            rs[j][l] = r;
            es[j][l] = e;
            sum[l] += e as f64;
        }
    }
    // The step's parameters (docs/algorithm.md section 3), and whether the lane can decide.
    let tol = K as f32 * 2f32.powi(-21) + 2f32.powi(-20);
    let mut up = [false; L];
    let mut over = [false; L];
    let mut t = [0f32; L];
    let mut bad = [false; L];
    for l in 0..L {
        let a = sum[l].abs() as f32;
        let tt = R::rne(a);
        let ov = tt >= a;
        up[l] = sum[l] < 0.0;
        over[l] = ov;
        t[l] = tt;
        let near = (a - R::rne(a + a) * 0.5).abs() <= tol;
        let need = tt + if ov { 0.0 } else { 1.0 };
        bad[l] = near | (need > 2.0);
    }
    // The first two ranks of each kernel's order in its direction: priority
    // descending, lower position first (strict comparisons, ascending j).
    let mut b1 = [-1f32; L];
    let mut b2 = [-1f32; L];
    let mut i1 = [0u32; L];
    let mut i2 = [0u32; L];
    let mut e1 = [0f32; L];
    let mut e2 = [0f32; L];
    let mut r1 = [0f32; L];
    let mut r2 = [0f32; L];
    for j in 0..K {
        for l in 0..L {
            let (x, e, r) = (xs[j][l], es[j][l], rs[j][l]);
            let cand = if up[l] {
                (e < 0.0) & (x < tmax)
            } else {
                (e > 0.0) & (x > tmin)
            };
            let q = if cand { e.abs() } else { 0.0 };
            let g1 = q > b1[l];
            let g2 = q > b2[l];
            b2[l] = if g1 {
                b1[l]
            } else if g2 {
                q
            } else {
                b2[l]
            };
            i2[l] = if g1 {
                i1[l]
            } else if g2 {
                j as u32
            } else {
                i2[l]
            };
            e2[l] = if g1 {
                e1[l]
            } else if g2 {
                e
            } else {
                e2[l]
            };
            r2[l] = if g1 {
                r1[l]
            } else if g2 {
                r
            } else {
                r2[l]
            };
            b1[l] = if g1 { q } else { b1[l] };
            i1[l] = if g1 { j as u32 } else { i1[l] };
            e1[l] = if g1 { e } else { e1[l] };
            r1[l] = if g1 { r } else { r1[l] };
        }
    }
    let mut out = BlockOut {
        changed: 0,
        bad: 0,
        sum: [0.0; L],
        cp: [0.0; L],
        cpos: [0; L],
        ccur: [0.0; L],
    };
    let mut pos1 = [0u32; L];
    let mut pos2 = [0u32; L];
    let mut code1 = [0i8; L];
    let mut code2 = [0i8; L];
    let mut changed = [0u32; L];
    let mut badbits = [0u32; L];
    for l in 0..L {
        let sg = if up[l] { 1.0f32 } else { -1.0 };
        let ok = !bad[l];
        let (c1, c2) = (b1[l] > 0.0, b2[l] > 0.0);
        let f1 = ok & (t[l] >= 1.0);
        let f2 = ok & (t[l] >= 2.0);
        let d1 = if f1 & c1 { sg } else { 0.0 };
        let d2 = if f2 & c2 { sg } else { 0.0 };
        code1[l] = code_of(r1[l] + d1, tmin, tmax);
        code2[l] = code_of(r2[l] + d2, tmin, tmax);
        pos1[l] = l as u32 * K as u32 + i1[l];
        pos2[l] = l as u32 * K as u32 + i2[l];
        changed[l] = (f1 & c1) as u32 + (f2 & c2) as u32;
        badbits[l] = (bad[l] as u32) << l;
        // Table errors of the two (docs/algorithm.md section 2: e + sigma, or 0 for a
        // non-candidate) and the sum after the flips.
        let n1 = if c1 { e1[l] + sg } else { 0.0 };
        let n2 = if c2 { e2[l] + sg } else { 0.0 };
        let mut after = sum[l];
        after += if f1 { n1 as f64 - e1[l] as f64 } else { 0.0 };
        after += if f2 { n2 as f64 - e2[l] as f64 } else { 0.0 };
        out.sum[l] = if ok { after } else { 0.0 };
        if CARRY {
            // over: order[t-1], flipped, to the opposite table with |its new
            // error|; else order[t], unflipped, to dir's table with |e|.
            let first = if over[l] { t[l] <= 1.0 } else { t[l] < 1.0 };
            let (ce, cn, cc) = if first {
                (e1[l], n1, c1)
            } else {
                (e2[l], n2, c2)
            };
            let pri = if over[l] { cn.abs() } else { ce.abs() };
            let tab_up = up[l] ^ over[l];
            out.cp[l] = if tab_up { -pri } else { pri };
            out.cpos[l] = if first { pos1[l] } else { pos2[l] };
            out.ccur[l] = if over[l] & cc { sg } else { 0.0 };
        }
    }
    for l in 0..L {
        qb[pos1[l] as usize] = code1[l];
        qb[pos2[l] as usize] = code2[l];
    }
    out.changed = changed.iter().sum();
    out.bad = badbits.iter().fold(0, |a, &b| a | b);
    out
}

/// One kernel step by docs/algorithm.md, with the exact fixed-point sum: the kernels the
/// lanes leave. Writes the kernel's codes; returns the number of changed
/// codes, the carry (signed priority, position in the kernel, current value
/// minus E-level value; priority 0 when there is none) and the sum of the
/// errors after the step (f64).
#[inline(always)]
fn kernel_exact<R: Round>(
    wk: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    codes: &mut [i8],
    ln: &mut Lanes,
) -> (u64, (f32, usize, f32), f64) {
    let k = wk.len();
    let Lanes {
        kx, kr, ke, kkeys, ..
    } = ln;
    kx.clear();
    kr.clear();
    ke.clear();
    for &wv in wk {
        let x = p.scale * wv - p.zero_point;
        let r = R::rne(x);
        kx.push(x);
        kr.push(r);
        ke.push(r - x);
    }
    let (up, t, over) = step_params(sum::slice_sum(ke, sum::frac_bits(k)), k);
    kkeys.clear();
    for (j, (&x, &e)) in kx.iter().zip(ke.iter()).enumerate() {
        let cand = if up {
            (e < 0.0) & (x < tmax)
        } else {
            (e > 0.0) & (x > tmin)
        };
        kkeys.push(key(if cand { e.abs() } else { 0.0 }, j));
    }
    kkeys.sort_unstable_by(|a, b| b.cmp(a));
    for &kk in &kkeys[..t] {
        let j = key_pos(kk);
        let (v, err) = table(kx[j], up, tmin, tmax);
        kr[j] = v;
        ke[j] = err;
    }
    let c = if over {
        let j = key_pos(kkeys[if t == 0 { k - 1 } else { t - 1 }]);
        Some((j, !up))
    } else if t < k {
        Some((key_pos(kkeys[t]), up))
    } else {
        None
    };
    let carry = match c {
        Some((j, tab_up)) => {
            let pri = ke[j].abs();
            (if tab_up { -pri } else { pri }, j, kr[j] - R::rne(kx[j]))
        }
        None => (0.0, 0, 0.0),
    };
    let mut changed = 0;
    let mut s = 0f64;
    for (j, q) in codes.iter_mut().enumerate() {
        changed += u64::from(kr[j] != R::rne(kx[j]));
        *q = code_of(kr[j], tmin, tmax);
        s += ke[j] as f64;
    }
    (changed, carry, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qparams::{code_range, params_of, Quantizer};

    /// He-like values from a fixed generator.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                (u - 0.5) * 0.2
                    + if (s >> 20).is_multiple_of(7) {
                        0.05
                    } else {
                        0.0
                    }
            })
            .collect()
    }

    fn lane_path(w: &[f32], k: usize, mode: Mode) -> Option<Flips> {
        let p = params_of(w, 4, Quantizer::Asymmetric, 0).expect("finite");
        let (tmin, tmax) = code_range(4, Quantizer::Asymmetric);
        let mut codes = vec![0i8; w.len()];
        let mut ln = Lanes::default();
        channel::<Portable<HwRound>>(w, &[], k, p, tmin, tmax, mode, &mut codes, &mut ln)
    }

    /// The lane path must really take ordinary channels (the parity tests
    /// only see its results, which the general path would give too).
    #[test]
    fn lane_path_decides_ordinary_channels() {
        let mut decided = 0;
        for seed in 0..40 {
            for (k, ic) in [(9, 64), (3, 48), (1, 512)] {
                let w = weights(k * ic, seed);
                for mode in Mode::ALL {
                    decided += lane_path(&w, k, mode).is_some() as usize;
                }
            }
        }
        // A channel sum within ~1e-6 of a multiple of 0.5 is left to the
        // general path; that is rare on such data.
        assert!(decided >= 40 * 3 * 4 - 2, "decided {decided} of 480");
    }

    /// Both strategies of `keep_top` keep exactly the t largest keys.
    #[test]
    fn keep_top_keeps_the_largest() {
        let mut s = 7u64;
        for n in [1usize, 2, 5, 40, 300, 1000] {
            let keys: Vec<u64> = (0..n)
                .map(|i| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((s >> 45) << 32) | i as u64
                })
                .collect();
            for t in [0usize, 1, 2, 3, 7, 31, 32, 33, 100] {
                let t = t.min(n);
                let mut got = keys.clone();
                keep_top(&mut got, t);
                let mut got = got[..t].to_vec();
                got.sort_unstable();
                let mut want = keys.clone();
                want.sort_unstable_by(|a, b| b.cmp(a));
                let mut want = want[..t].to_vec();
                want.sort_unstable();
                assert_eq!(got, want, "n {n} t {t}");
            }
        }
    }

    /// A channel sum on a multiple of 0.5 (here exactly 0), and a step
    /// that would need zero-priority positions, are left to the general
    /// path.
    #[test]
    fn undecidable_channels_give_way() {
        // Every element on the grid: S == 0 exactly.
        let w: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        assert!(lane_path(&w, 1, Mode::C).is_none());
        // 2 bits, range [0.2, 1.2]: s = 3, z = 3, so the 39 minima sit at
        // x = -2.4 (error +0.4, but below tmin: no down candidate) and the
        // maximum at x = 0.6 is the only down candidate; S = 16 > 1.
        let mut w = vec![0.2f32; 40];
        w[39] = 1.2;
        let p = params_of(&w, 2, Quantizer::Asymmetric, 0).expect("finite");
        let (tmin, tmax) = code_range(2, Quantizer::Asymmetric);
        let mut codes = vec![0i8; w.len()];
        let mut ln = Lanes::default();
        let r =
            channel::<Portable<HwRound>>(&w, &[], 1, p, tmin, tmax, Mode::C, &mut codes, &mut ln);
        assert!(r.is_none(), "{r:?}");
    }
}
