//! The fast CASE path: one output channel at a time, everything in a
//! per-thread scratch that stays in cache. Produces exactly the codes of
//! `reference::quantize_channel_ref`.
//!
//! Differences from the reference, none observable in the codes:
//! - the flip tables are never materialised; they are recomputed from `x`;
//! - only the ranks of an order that a step actually uses are selected
//!   (`t` flips plus the carry), with keys that make the order total;
//! - carries are only tracked when the C level follows the K level.

use crate::error::SquantError;
use crate::fast::{self, Simd};
use crate::mode::Mode;
use crate::qparams::{channel_params, code_range, rne, ChannelParams, Quantizer};
use crate::sum;

/// Numbers of elements whose value changed at each level.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flips {
    /// Kernel-wise (SQuant-K) changes.
    pub k: u64,
    /// Channel-wise (SQuant-C) changes.
    pub c: u64,
}

impl std::ops::Add for Flips {
    type Output = Flips;
    fn add(self, o: Flips) -> Flips {
        Flips {
            k: self.k + o.k,
            c: self.c + o.c,
        }
    }
}

/// Per-thread working memory, reused across channels.
#[derive(Default)]
pub struct Scratch {
    /// `x = s * w - z`.
    x: Vec<f32>,
    /// Current value and error of every element.
    r: Vec<f32>,
    e: Vec<f32>,
    /// E-level priorities in the up and down tables.
    pu: Vec<f32>,
    pd: Vec<f32>,
    /// `e` of every element in fixed point (see `sum`), kept current.
    fx: Vec<i64>,
    keys: Vec<u64>,
    /// Carries of the K level: position in channel, up table?, priority.
    carries: Vec<(u32, bool, f32)>,
    zeros: Vec<u32>,
    /// K-level flips decided but not yet applied: position, up?
    pending: Vec<(u32, bool)>,
    /// The lane path's working memory.
    lanes: fast::Lanes,
}

/// A sort key that orders by priority descending, then position ascending,
/// when keys are compared descending. Priorities are non-negative floats,
/// whose bit patterns order like their values.
#[inline(always)]
pub(crate) fn key(priority: f32, pos: usize) -> u64 {
    ((priority.to_bits() as u64) << 32) | (!(pos as u32)) as u64
}

#[inline(always)]
pub(crate) fn key_pos(k: u64) -> usize {
    (!(k as u32)) as usize
}

/// `v` where `ok`, else `0.0`, without a branch.
#[inline(always)]
fn masked(v: f32, ok: bool) -> f32 {
    f32::from_bits(v.to_bits() & 0u32.wrapping_sub(ok as u32))
}

/// Table entry `(value, error)` of an element for a flip in direction `up`
/// (docs/algorithm.md section 2), computed with selects: the direction and the
/// candidate test are coin flips on real weights, so branches mispredict.
#[inline(always)]
pub(crate) fn table(x: f32, up: bool, tmin: f32, tmax: f32) -> (f32, f32) {
    let r0 = rne(x);
    let e0 = r0 - x;
    let cand = (up & (e0 < 0.0) & (x < tmax)) | (!up & (e0 > 0.0) & (x > tmin));
    let sigma = f32::from_bits(1.0f32.to_bits() | ((!up as u32) << 31));
    let value = r0 + masked(sigma, cand);
    (value, masked(e0 + sigma, cand))
}

/// S of the group `span` from the precomputed fixed-point errors `fx`, or
/// from the errors `e` for a group too large for 40 fractional bits (see
/// `sum`).
#[inline(always)]
fn group_sum(fx: &[i64], e: &[f32], span: std::ops::Range<usize>) -> f64 {
    let f = sum::frac_bits(span.len());
    if f == FX_BITS {
        sum::to_sum(fx[span].iter().sum(), f)
    } else {
        sum::slice_sum(&e[span], f)
    }
}

/// Direction, flip count and over flag of one CASE step (docs/algorithm.md section 3).
#[inline(always)]
pub(crate) fn step_params(s: f64, len: usize) -> (bool, usize, bool) {
    let up = s < 0.0;
    let a = s.abs() as f32;
    let t = rne(a);
    let over = t >= a;
    (up, (t as usize).min(len), over)
}

/// Up to this many wanted ranks, a sorted buffer beats quickselect.
const SMALL_TOP: usize = 48;

/// Fractional bits of the precomputed fixed-point errors.
const FX_BITS: i32 = 40;

/// Moves the `m` largest keys to the front of `keys`, sorted descending.
fn top_sorted(keys: &mut [u64], m: usize) {
    let m = m.min(keys.len());
    if m == 0 {
        return;
    }
    if m < keys.len() {
        keys.select_nth_unstable_by(m - 1, |a, b| b.cmp(a));
    }
    keys[..m].sort_unstable_by(|a, b| b.cmp(a));
}

/// The first `need` positions of the order of `src` (priority descending,
/// position ascending) into `ranks`, through unique keys.
fn select_ranks(src: &[f32], need: usize, ranks: &mut [usize]) {
    let mut keys: Vec<u64> = src.iter().enumerate().map(|(i, &p)| key(p, i)).collect();
    top_sorted(&mut keys, need);
    for (r, &kk) in ranks.iter_mut().zip(&keys[..need.min(keys.len())]) {
        *r = key_pos(kk);
    }
}

/// Position of the last element of the order of `src`: lowest priority,
/// highest position among equals.
#[inline(always)]
fn last_rank(src: &[f32]) -> usize {
    let mut li = 0;
    for (i, &p) in src.iter().enumerate() {
        if p <= src[li] {
            li = i;
        }
    }
    li
}

/// Number of positive values (eight lanes, so it vectorises).
#[inline(always)]
fn count_positive(v: &[f32]) -> usize {
    let mut lanes = [0u32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += (c[i] > 0.0) as u32;
        }
    }
    let tail_count = tail.iter().filter(|&&p| p > 0.0).count();
    lanes.iter().map(|&c| c as usize).sum::<usize>() + tail_count
}

/// Whether any value exceeds `thr` (no early exit, so it vectorises).
#[inline(always)]
fn any_above(v: &[f32], thr: f32) -> bool {
    let mut m = 0u32;
    for &p in v {
        m |= (p > thr) as u32;
    }
    m != 0
}

/// Inserts `k` into the descending buffer `top` of capacity `m`.
#[inline(always)]
fn admit(top: &mut Vec<u64>, m: usize, k: u64) {
    let at = top.partition_point(|&v| v > k);
    if top.len() == m {
        top.pop();
    }
    top.insert(at, k);
}

impl Scratch {
    fn resize(&mut self, g: usize) {
        if self.x.len() != g {
            for v in [
                &mut self.x,
                &mut self.r,
                &mut self.e,
                &mut self.pu,
                &mut self.pd,
            ] {
                v.resize(g, 0.0);
            }
            self.fx.resize(g, 0);
        }
        self.carries.clear();
    }

    /// SQuant-E: values, errors, both priorities and fixed-point errors.
    #[inline(always)]
    fn nearest(&mut self, w: &[f32], p: ChannelParams, tmin: f32, tmax: f32) {
        let scale = sum::pow2(FX_BITS);
        let it = self
            .x
            .iter_mut()
            .zip(self.r.iter_mut())
            .zip(self.e.iter_mut())
            .zip(self.pu.iter_mut().zip(self.pd.iter_mut()))
            .zip(self.fx.iter_mut().zip(w));
        for ((((x, r), e), (pu, pd)), (fx, &wv)) in it {
            let prod = p.scale * wv;
            let xv = prod - p.zero_point;
            let rv = rne(xv);
            let ev = rv - xv;
            *x = xv;
            *r = rv;
            *e = ev;
            *pu = masked(-ev, (ev < 0.0) & (xv < tmax));
            *pd = masked(ev, (ev > 0.0) & (xv > tmin));
            *fx = sum::fixed(ev, scale);
        }
    }

    /// Flips element `j` (its fixed-point error follows); returns whether
    /// its value changed.
    #[inline(always)]
    fn flip(&mut self, j: usize, up: bool, tmin: f32, tmax: f32) -> u64 {
        let (v, err) = table(self.x[j], up, tmin, tmax);
        let changed = u64::from(self.r[j] != v);
        self.r[j] = v;
        self.e[j] = err;
        self.fx[j] = sum::fixed(err, sum::pow2(FX_BITS));
        changed
    }

    /// SQuant-K on every kernel of the channel; records carries when `carry`.
    fn kernel_level(&mut self, k: usize, carry: bool, tmin: f32, tmax: f32) -> u64 {
        // Common kernel sizes get a build with the size known at compile
        // time (unrolled loops, no bounds checks); the rest the same code
        // with a run-time size.
        match k {
            9 => self.kernel_level_with(9, &mut [0; 9], carry, tmin, tmax),
            3 => self.kernel_level_with(3, &mut [0; 3], carry, tmin, tmax),
            25 => self.kernel_level_with(25, &mut [0; 25], carry, tmin, tmax),
            49 => self.kernel_level_with(49, &mut [0; 49], carry, tmin, tmax),
            27 => self.kernel_level_with(27, &mut [0; 27], carry, tmin, tmax),
            _ => self.kernel_level_with(k, &mut vec![0; k], carry, tmin, tmax),
        }
    }

    /// SQuant-K for kernels of `k` elements (`ranks.len() == k`): decisions
    /// first (every kernel reads only its own E-level state), flips applied
    /// afterwards.
    #[inline(always)]
    fn kernel_level_with(
        &mut self,
        k: usize,
        ranks: &mut [usize],
        carry: bool,
        tmin: f32,
        tmax: f32,
    ) -> u64 {
        let Scratch {
            x,
            e,
            pu,
            pd,
            fx,
            carries,
            pending,
            ..
        } = self;
        pending.clear();
        let kernels = pu.chunks_exact(k).zip(pd.chunks_exact(k));
        for (kk, (puk, pdk)) in kernels.enumerate() {
            let base = kk * k;
            let (up, t, over) = step_params(group_sum(fx, e, base..base + k), k);
            let src = if up { puk } else { pdk };
            let need = if carry && !over { (t + 1).min(k) } else { t };
            if need <= 2 {
                // Top two keys without a data-dependent branch (the
                // comparisons are coin flips on real weights).
                let (mut k1, mut k2) = (0u64, 0u64);
                for (i, &p) in src.iter().enumerate() {
                    let kv = key(p, i);
                    let lo = kv.min(k1);
                    k1 = kv.max(k1);
                    k2 = k2.max(lo);
                }
                ranks[0] = key_pos(k1);
                if k > 1 {
                    ranks[1] = key_pos(k2);
                }
            } else {
                select_ranks(src, need, ranks);
            }
            if t <= 2 {
                // Without a loop of unpredictable length: push both, keep t.
                let len = pending.len();
                pending.push(((base + ranks[0]) as u32, up));
                pending.push(((base + ranks[1.min(k - 1)]) as u32, up));
                pending.truncate(len + t);
            } else {
                for &i in &ranks[..t] {
                    pending.push(((base + i) as u32, up));
                }
            }
            if carry {
                // `&`/`|`, not `&&`/`||`: no branch on the unpredictable
                // `over`; the first case (S == 0 exactly) is rare.
                if over & (t == 0) {
                    // S == 0 exactly: the carry is the order's last element.
                    let j = base + last_rank(src);
                    carries.push((j as u32, !up, e[j].abs()));
                } else if over | (t < k) {
                    // order[t - 1] (flipped just now, so its error is the
                    // table's) or order[t]; selects instead of branches.
                    let j = base + ranks[t - over as usize];
                    let flipped = table(x[j], up, tmin, tmax).1.abs();
                    let v = if over { flipped } else { e[j].abs() };
                    carries.push((j as u32, up ^ over, v));
                }
            }
        }
        let pending = std::mem::take(&mut self.pending);
        let mut changed = 0;
        for &(j, up) in &pending {
            changed += self.flip(j as usize, up, tmin, tmax);
        }
        self.pending = pending;
        changed
    }

    /// SQuant-C on the whole channel. `after_k`: the only non-zero
    /// priorities are the K-level carries; otherwise they are the E-level
    /// element priorities.
    #[inline(always)]
    fn channel_level(&mut self, after_k: bool, tmin: f32, tmax: f32) -> u64 {
        let g = self.x.len();
        let (up, t, _over) = step_params(group_sum(&self.fx, &self.e, 0..g), g);
        if t == 0 {
            return 0;
        }
        let mut keys = std::mem::take(&mut self.keys);
        let mut zeros = std::mem::take(&mut self.zeros);
        keys.clear();
        zeros.clear();
        let pri = if up { &self.pu } else { &self.pd };
        // The t largest positive-priority keys, and the number of positives.
        let n_pos = if after_k {
            // Branch-free compaction of the carries in this direction.
            keys.resize(self.carries.len(), 0);
            let mut n = 0;
            for &(j, tu, p) in &self.carries {
                keys[n] = key(p, j as usize);
                n += ((tu == up) & (p > 0.0)) as usize;
            }
            keys.truncate(n);
            if t < n {
                keys.select_nth_unstable_by(t - 1, |a, b| b.cmp(a));
                keys.truncate(t);
            }
            n
        } else if t <= SMALL_TOP {
            // One pass with a sorted buffer. Positions only grow, so a
            // priority equal to the threshold loses its tie: compare
            // priorities strictly.
            let n = count_positive(pri);
            let mut thr = 0.0f32;
            const B: usize = 16;
            for (b, block) in pri.chunks(B).enumerate() {
                // Most blocks hold nothing above the threshold once the
                // buffer is full: one vectorised test skips them.
                if !any_above(block, thr) {
                    continue;
                }
                for (i, &p) in block.iter().enumerate() {
                    if p > thr {
                        admit(&mut keys, t, key(p, b * B + i));
                        if keys.len() == t {
                            thr = f32::from_bits((keys[t - 1] >> 32) as u32);
                        }
                    }
                }
            }
            n
        } else {
            keys.extend(
                pri.iter()
                    .enumerate()
                    .filter(|&(_, &p)| p > 0.0)
                    .map(|(j, &p)| key(p, j)),
            );
            let n = keys.len();
            if t < n {
                keys.select_nth_unstable_by(t - 1, |a, b| b.cmp(a));
                keys.truncate(t);
            }
            n
        };
        if t > n_pos {
            // The order continues with zero-priority positions, ascending.
            let is_positive = |j: usize| -> bool {
                if after_k {
                    false
                } else {
                    pri[j] > 0.0
                }
            };
            let mut carried: Vec<usize> = if after_k {
                keys.iter().map(|&kk| key_pos(kk)).collect()
            } else {
                Vec::new()
            };
            carried.sort_unstable();
            let mut cp = carried.iter().peekable();
            for j in 0..g {
                if zeros.len() == t - n_pos {
                    break;
                }
                if cp.peek() == Some(&&j) {
                    cp.next();
                } else if !is_positive(j) {
                    zeros.push(j as u32);
                }
            }
        }
        let mut changed = 0;
        for &kk in &keys {
            changed += self.flip(key_pos(kk), up, tmin, tmax);
        }
        for &j in &zeros {
            changed += self.flip(j as usize, up, tmin, tmax);
        }
        self.keys = keys;
        self.zeros = zeros;
        changed
    }
}

/// Which build of the fast path runs. Every build gives the same results;
/// tests and benchmarks choose one to compare them.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The best build the CPU supports.
    Best,
    /// At most the AVX2 build (x86-64).
    Avx2,
    /// The baseline build of the target.
    Baseline,
}

impl Isa {
    /// All builds, best first.
    pub const ALL: [Isa; 3] = [Isa::Best, Isa::Avx2, Isa::Baseline];
}

/// Quantizes one output channel `w` (`ic * k` values) into `codes`.
///
/// On x86-64 the code runs in a build for the best instruction set the CPU
/// has (chosen at run time): AVX-512 (with lane kernels written in
/// intrinsics), AVX2, or the baseline. All of them compute the same IEEE
/// operations (no FMA contraction), so the results are identical.
#[allow(clippy::too_many_arguments)]
pub fn quantize_channel(
    w: &[f32],
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    channel: usize,
    codes: &mut [i8],
    sc: &mut Scratch,
) -> Result<(ChannelParams, Flips), SquantError> {
    quantize_channel_isa(
        w,
        &[],
        k,
        bits,
        quantizer,
        mode,
        channel,
        codes,
        sc,
        Isa::Best,
    )
}

/// [`quantize_channel`] in the build `isa` (or the best one below it that
/// the CPU supports). `next`: the channel that will be quantized next on
/// this thread (or empty), loaded into the cache while this one computes.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn quantize_channel_isa(
    w: &[f32],
    next: &[f32],
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    channel: usize,
    codes: &mut [i8],
    sc: &mut Scratch,
    isa: Isa,
) -> Result<(ChannelParams, Flips), SquantError> {
    check_channel(w, k, bits, codes)?;
    #[cfg(target_arch = "x86_64")]
    {
        if isa == Isa::Best && has_avx512() {
            // SAFETY: the CPU supports these features (`has_avx512`).
            return unsafe {
                quantize_channel_avx512(w, next, k, bits, quantizer, mode, channel, codes, sc)
            };
        }
        if isa != Isa::Baseline && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe {
                quantize_channel_avx2(w, next, k, bits, quantizer, mode, channel, codes, sc)
            };
        }
        // Baseline x86-64 has no rounding instruction (SSE4.1).
        quantize_channel_impl::<fast::Portable<fast::SoftRound>>(
            w, next, k, bits, quantizer, mode, channel, codes, sc,
        )
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = isa;
        quantize_channel_impl::<fast::Portable<fast::HwRound>>(
            w, next, k, bits, quantizer, mode, channel, codes, sc,
        )
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = isa;
        quantize_channel_impl::<fast::Portable<fast::SoftRound>>(
            w, next, k, bits, quantizer, mode, channel, codes, sc,
        )
    }
}

/// The name of the build of the fast path that [`Isa::Best`] runs on this
/// CPU: `"avx512"`, `"avx2"` or `"baseline"` (x86-64), `"neon"` (aarch64),
/// `"portable"` elsewhere.
pub fn best_build() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            "avx512"
        } else if std::arch::is_x86_feature_detected!("avx2") {
            "avx2"
        } else {
            "baseline"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "portable"
    }
}

/// Whether the CPU has everything the AVX-512 build is compiled for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("popcnt")
        && std::arch::is_x86_feature_detected!("bmi1")
        && std::arch::is_x86_feature_detected!("bmi2")
        && std::arch::is_x86_feature_detected!("lzcnt")
}

/// The argument checks of `quantize_channel` (cheap; once per channel).
fn check_channel(w: &[f32], k: usize, bits: u32, codes: &[i8]) -> Result<(), SquantError> {
    crate::qparams::check_bits(bits)?;
    if w.is_empty() || k == 0 || !w.len().is_multiple_of(k) || w.len() > u32::MAX as usize {
        return Err(SquantError::ShapeMismatch {
            what: "channel (a non-empty multiple of the kernel size)",
            expected: k,
            got: w.len(),
        });
    }
    if codes.len() != w.len() {
        return Err(SquantError::ShapeMismatch {
            what: "codes",
            expected: w.len(),
            got: codes.len(),
        });
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn quantize_channel_avx2(
    w: &[f32],
    next: &[f32],
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    channel: usize,
    codes: &mut [i8],
    sc: &mut Scratch,
) -> Result<(ChannelParams, Flips), SquantError> {
    quantize_channel_impl::<fast::Avx2>(w, next, k, bits, quantizer, mode, channel, codes, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
#[allow(clippy::too_many_arguments)]
unsafe fn quantize_channel_avx512(
    w: &[f32],
    next: &[f32],
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    channel: usize,
    codes: &mut [i8],
    sc: &mut Scratch,
) -> Result<(ChannelParams, Flips), SquantError> {
    quantize_channel_impl::<fast::Avx512>(w, next, k, bits, quantizer, mode, channel, codes, sc)
}

/// Quantizes one output channel `w` (`ic * k` values) into `codes`: the
/// lane path when it can decide the channel, else the general path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quantize_channel_impl<S: Simd>(
    w: &[f32],
    next: &[f32],
    k: usize,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    channel: usize,
    codes: &mut [i8],
    sc: &mut Scratch,
) -> Result<(ChannelParams, Flips), SquantError> {
    let (mn, mx) = S::min_max(w).map_err(|index| SquantError::NonFinite { channel, index })?;
    let p = channel_params(mn, mx, bits, quantizer, channel)?;
    let (tmin, tmax) = code_range(bits, quantizer);
    if let Some(flips) = fast::channel::<S>(w, next, k, p, tmin, tmax, mode, codes, &mut sc.lanes) {
        return Ok((p, flips));
    }
    sc.resize(w.len());
    sc.nearest(w, p, tmin, tmax);
    let mut flips = Flips::default();
    let run_k = mode.has_k() && k > 1;
    if run_k {
        flips.k = sc.kernel_level(k, mode.has_c(), tmin, tmax);
    }
    if mode.has_c() {
        flips.c = sc.channel_level(run_k, tmin, tmax);
    }
    for (q, &r) in codes.iter_mut().zip(&sc.r) {
        *q = fast::code_of(r, tmin, tmax);
    }
    Ok((p, flips))
}

#[cfg(test)]
mod build_tests {
    use super::*;

    #[test]
    fn best_build_names_what_isa_best_runs() {
        let name = best_build();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(name == "avx512", has_avx512());
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            assert_eq!(name == "baseline", !avx2 && !has_avx512());
        }
        assert!(["avx512", "avx2", "baseline", "neon", "portable"].contains(&name));
    }
}
