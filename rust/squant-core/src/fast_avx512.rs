//! The lane path's building blocks in AVX-512 intrinsics (x86-64 CPUs with
//! AVX-512 F, BW, DQ, VL and VBMI; chosen at run time). Same IEEE operations as
//! the portable build in `fast.rs`: no FMA, rounding by `vrndscaleps` in
//! round-to-nearest-even, f64 sums; the tests compare both with the scalar
//! reference.

use std::arch::x86_64::*;

use crate::case::key;
use crate::fast::{Carries, HwRound, Simd, L};
use crate::qparams::ChannelParams;

/// The AVX-512 build. Its methods run AVX-512 instructions without checking
/// the CPU: they must only be called from `quantize_channel_avx512`, which
/// runs after `case::has_avx512()` (debug builds assert it).
pub(crate) struct Avx512;

/// Debug builds: the CPU really has the features (see [`Avx512`]).
#[inline(always)]
fn debug_check() {
    debug_assert!(
        crate::case::has_avx512(),
        "AVX-512 build called on a CPU without it"
    );
}

/// `vrndscaleps` immediate: round to nearest even, no precision exception.
const RNE: i32 = 0x08;

impl Simd for Avx512 {
    type R = HwRound;

    #[inline(always)]
    fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
        debug_check();
        // SAFETY: only reached from `quantize_channel_avx512`, which runs
        // after the CPU features were checked.
        unsafe { min_max(w) }
    }

    #[inline(always)]
    fn e_codes(w: &[f32], p: ChannelParams, tmin: f32, tmax: f32, codes: &mut [i8]) {
        debug_check();
        // SAFETY: as above.
        unsafe { e_codes(w, p, tmin, tmax, codes) }
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
        debug_check();
        // SAFETY: as above.
        unsafe { e_pass(w, p, tmin, tmax, codes, pv) }
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
        debug_check();
        // SAFETY: as above.
        unsafe { block::<K, CARRY>(wb, p, tmin, tmax, qb, carries, base) }
    }

    #[inline(always)]
    fn collect_above(vals: &[f32], sign: f32, thr: f32, keys: &mut Vec<u64>, idx: &mut Vec<u32>) {
        debug_check();
        // SAFETY: as above.
        unsafe { collect_above(vals, sign, thr, keys, idx) }
    }
}

/// Mask of the first `n` lanes (`n <= 16`).
#[inline(always)]
fn first_lanes(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// int8 codes of sixteen integral values: clamp, convert, narrow.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
fn codes16(r: __m512, lo: __m512, hi: __m512) -> __m128i {
    _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi)))
}

/// Sum of the sixteen f32 lanes of `e` (where `m`) into two f64 halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
fn add_f64(lo: __m512d, hi: __m512d, e: __m512) -> (__m512d, __m512d) {
    (
        _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e))),
        _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(e))),
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
    let n = w.len();
    let ptr = w.as_ptr();
    let mut mn = _mm512_set1_ps(f32::INFINITY);
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let zero = _mm512_setzero_ps();
    let mut bad: __mmask16 = 0;
    let mut i = 0;
    while i < n {
        let m = if i + L <= n { !0 } else { first_lanes(n - i) };
        // SAFETY: lanes outside `m` are not read.
        let v = unsafe { _mm512_maskz_loadu_ps(m, ptr.add(i)) };
        mn = _mm512_mask_min_ps(mn, m, mn, v);
        mx = _mm512_mask_max_ps(mx, m, mx, v);
        // v * 0 is NaN exactly for NaN and infinities.
        let z = _mm512_mul_ps(v, zero);
        bad |= _mm512_mask_cmp_ps_mask::<_CMP_UNORD_Q>(m, z, z);
        i += L;
    }
    if bad != 0 {
        return Err(w.iter().position(|v| !v.is_finite()).unwrap_or(0));
    }
    Ok((_mm512_reduce_min_ps(mn), _mm512_reduce_max_ps(mx)))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn e_codes(w: &[f32], p: ChannelParams, tmin: f32, tmax: f32, codes: &mut [i8]) {
    let n = w.len().min(codes.len());
    let (sv, zv) = (_mm512_set1_ps(p.scale), _mm512_set1_ps(p.zero_point));
    let (lo, hi) = (_mm512_set1_ps(tmin), _mm512_set1_ps(tmax));
    let mut i = 0;
    while i < n {
        let m = if i + L <= n { !0 } else { first_lanes(n - i) };
        // SAFETY: lanes outside `m` are neither read nor written.
        unsafe {
            let x = _mm512_sub_ps(
                _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, w.as_ptr().add(i))),
                zv,
            );
            let r = _mm512_roundscale_ps::<RNE>(x);
            _mm_mask_storeu_epi8(codes.as_mut_ptr().add(i), m, codes16(r, lo, hi));
        }
        i += L;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn e_pass(
    w: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    codes: &mut [i8],
    pv: &mut [f32],
) -> (f64, usize, usize) {
    let n = w.len().min(codes.len()).min(pv.len());
    let (sv, zv) = (_mm512_set1_ps(p.scale), _mm512_set1_ps(p.zero_point));
    let (lo, hi) = (_mm512_set1_ps(tmin), _mm512_set1_ps(tmax));
    let zero = _mm512_setzero_ps();
    let (mut acc_lo, mut acc_hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    // Candidate counts per lane (a masked subtract of -1 adds 1).
    let (mut nu, mut nd) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let minus1 = _mm512_set1_epi32(-1);
    let mut i = 0;
    while i < n {
        let m = if i + L <= n { !0 } else { first_lanes(n - i) };
        // SAFETY: lanes outside `m` are neither read nor written.
        unsafe {
            let x = _mm512_sub_ps(
                _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, w.as_ptr().add(i))),
                zv,
            );
            let r = _mm512_roundscale_ps::<RNE>(x);
            let e = _mm512_maskz_sub_ps(m, r, x);
            _mm_mask_storeu_epi8(codes.as_mut_ptr().add(i), m, codes16(r, lo, hi));
            // Up candidate: e < 0 and x < tmax, i.e. r < tmax; down: e > 0
            // and r > tmin (r is the integer nearest to x).
            let neg = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(m, e, zero);
            let pos = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(m, e, zero);
            let cu = _mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(neg, r, hi);
            let cd = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(pos, r, lo);
            _mm512_mask_storeu_ps(pv.as_mut_ptr().add(i), m, _mm512_maskz_mov_ps(cu | cd, e));
            nu = _mm512_mask_sub_epi32(nu, cu, nu, minus1);
            nd = _mm512_mask_sub_epi32(nd, cd, nd, minus1);
            (acc_lo, acc_hi) = add_f64(acc_lo, acc_hi, e);
        }
        i += L;
    }
    (
        _mm512_reduce_add_pd(_mm512_add_pd(acc_lo, acc_hi)),
        _mm512_reduce_add_epi32(nu) as u32 as usize,
        _mm512_reduce_add_epi32(nd) as u32 as usize,
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn collect_above(
    vals: &[f32],
    sign: f32,
    thr: f32,
    keys: &mut Vec<u64>,
    idx: &mut Vec<u32>,
) {
    // Indices of the hits, compressed without a branch per block (a branch
    // on "any hit" mispredicts about as often as it is taken), then keys.
    let n = vals.len();
    if idx.len() < n + L {
        // Grows only: no zeroing on later calls.
        idx.resize(n + L, 0);
    }
    let (sg, th) = (_mm512_set1_ps(sign), _mm512_set1_ps(thr));
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut count = 0usize;
    let mut i = 0;
    while i < n {
        let m = if i + L <= n { !0 } else { first_lanes(n - i) };
        // SAFETY: lanes outside `m` are not read; the store writes 16 u32
        // at `count <= i`, inside the n + 16 scratch.
        unsafe {
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, vals.as_ptr().add(i)), sg);
            let hit = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(m, v, th);
            let at = _mm512_add_epi32(iota, _mm512_set1_epi32(i as i32));
            _mm512_storeu_si512(
                idx.as_mut_ptr().add(count).cast(),
                _mm512_maskz_compress_epi32(hit, at),
            );
            count += hit.count_ones() as usize;
        }
        i += L;
    }
    keys.clear();
    keys.extend(
        idx[..count]
            .iter()
            .map(|&j| key(vals[j as usize] * sign, j as usize)),
    );
}

/// The byte permutation from transposed codes (`T[16 j + l]`: element `j`
/// of kernel `l`, in three 64-byte registers) to the natural order
/// (`N[K l + j]`), 64 output bytes at a time: the source byte modulo 128
/// (`vpermi2b` over the first two registers; `vpermb` over the third,
/// which reads the low six bits) and the mask of output bytes taken from
/// the third register. For `K <= 12`.
struct Transpose<const K: usize>;

impl<const K: usize> Transpose<K> {
    const TABLES: ([[u8; 64]; 3], [u64; 3]) = transpose_tables(K);
}

const fn transpose_tables(k: usize) -> ([[u8; 64]; 3], [u64; 3]) {
    let mut idx = [[0u8; 64]; 3];
    let mut third = [0u64; 3];
    let mut c = 0;
    while c < 3 {
        let mut b = 0;
        while b < 64 {
            let n = 64 * c + b;
            if n < L * k {
                let src = L * (n % k) + n / k;
                idx[c][b] = (src % 128) as u8;
                if src >= 128 {
                    third[c] |= 1 << b;
                }
            }
            b += 1;
        }
        c += 1;
    }
    (idx, third)
}

/// One CASE step on each of 16 kernels of `K` elements (`K <= 12`), as
/// `fast::kernel_block` (which documents the steps), writing all 16 `K`
/// codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn block<const K: usize, const CARRY: bool>(
    wb: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    qb: &mut [i8],
    carries: Carries<'_>,
    base: u32,
) -> (u32, u32, f64) {
    assert!(K <= 12 && wb.len() == L * K && qb.len() == L * K);
    assert!(carries.cp.len() >= L && carries.cpos.len() >= L && carries.ccur.len() >= L);
    let zero = _mm512_setzero_ps();
    let one = _mm512_set1_ps(1.0);
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let starts = _mm512_mullo_epi32(iota, _mm512_set1_epi32(K as i32));
    let (sv, zv) = (_mm512_set1_ps(p.scale), _mm512_set1_ps(p.zero_point));
    let (lo, hi) = (_mm512_set1_ps(tmin), _mm512_set1_ps(tmax));

    // Transposed E level: position j of the 16 kernels in one vector.
    let mut es = [zero; K];
    let mut rs = [zero; K];
    let (mut slo, mut shi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    for j in 0..K {
        let idx = _mm512_add_epi32(starts, _mm512_set1_epi32(j as i32));
        // SAFETY: every index is below 16 * K = wb.len().
        let wj = unsafe { _mm512_i32gather_ps::<4>(idx, wb.as_ptr()) };
        let x = _mm512_sub_ps(_mm512_mul_ps(sv, wj), zv);
        let r = _mm512_roundscale_ps::<RNE>(x);
        let e = _mm512_sub_ps(r, x);
        es[j] = e;
        rs[j] = r;
        (slo, shi) = add_f64(slo, shi, e);
    }

    // Step parameters, and the lanes that cannot be decided here.
    let zero_pd = _mm512_setzero_pd();
    let up: __mmask16 = (_mm512_cmp_pd_mask::<_CMP_LT_OQ>(slo, zero_pd) as u16)
        | ((_mm512_cmp_pd_mask::<_CMP_LT_OQ>(shi, zero_pd) as u16) << 8);
    let s32 = _mm512_insertf32x8::<1>(
        _mm512_castps256_ps512(_mm512_cvtpd_ps(slo)),
        _mm512_cvtpd_ps(shi),
    );
    let a = _mm512_abs_ps(s32);
    let t = _mm512_roundscale_ps::<RNE>(a);
    let over = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, a);
    let tol = _mm512_set1_ps(K as f32 * 2f32.powi(-21) + 2f32.powi(-20));
    let half = _mm512_mul_ps(
        _mm512_roundscale_ps::<RNE>(_mm512_add_ps(a, a)),
        _mm512_set1_ps(0.5),
    );
    let near = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(_mm512_sub_ps(a, half)), tol);
    let ge1 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, one);
    let ge2 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, _mm512_set1_ps(2.0));
    let ge3 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, _mm512_set1_ps(3.0));
    let ge4 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, _mm512_set1_ps(4.0));
    // A step needs its first t ranks plus the carry: at most three here.
    let bad = near | ge4 | (ge3 & !over);
    let ok = !bad;

    // sg: the flip's change (+1 up, -1 down); sp = -sg makes the
    // direction's priority positive; bnd: the code bound a flip must stay
    // inside.
    let sg = _mm512_mask_blend_ps(up, _mm512_set1_ps(-1.0), one);
    let sp = _mm512_sub_ps(zero, sg);
    let bnd = _mm512_mask_blend_ps(up, lo, hi);

    // First three ranks of each kernel's order (strict >, ascending j):
    // priority and position of each (their errors are gathered after).
    let neg1 = _mm512_set1_ps(-1.0);
    let mut bv = [neg1; 3];
    let mut iv = [_mm512_setzero_si512(); 3];
    for j in 0..K {
        let (e, r) = (es[j], rs[j]);
        let v = _mm512_mul_ps(e, sp);
        let d = _mm512_mul_ps(_mm512_sub_ps(r, bnd), sp);
        let cand = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, zero),
            d,
            zero,
        );
        let q = _mm512_maskz_mov_ps(cand, v);
        let g0 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(q, bv[0]);
        let g1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(q, bv[1]);
        let g2 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(q, bv[2]);
        let jv = _mm512_set1_epi32(j as i32);
        // Slot s takes slot s-1's entry where q beats it, q where q beats
        // only slot s, and keeps its own otherwise.
        bv[2] = _mm512_mask_blend_ps(g1, _mm512_mask_blend_ps(g2, bv[2], q), bv[1]);
        iv[2] = _mm512_mask_blend_epi32(g1, _mm512_mask_blend_epi32(g2, iv[2], jv), iv[1]);
        bv[1] = _mm512_mask_blend_ps(g0, _mm512_mask_blend_ps(g1, bv[1], q), bv[0]);
        iv[1] = _mm512_mask_blend_epi32(g0, _mm512_mask_blend_epi32(g1, iv[1], jv), iv[0]);
        bv[0] = _mm512_mask_blend_ps(g0, bv[0], q);
        iv[0] = _mm512_mask_blend_epi32(g0, iv[0], jv);
    }

    // The errors at the three ranks: lane l of rank s is es[iv[s][l]][l].
    let mut ev = [zero; 3];
    for s in 0..3 {
        let at = _mm512_add_epi32(_mm512_slli_epi32::<4>(iv[s]), iota);
        // SAFETY: es holds K vectors of 16 floats and iv[s] < K.
        ev[s] = unsafe { _mm512_i32gather_ps::<4>(at, es.as_ptr().cast()) };
    }

    // Rank s flips where t > s; it changes its code where it is a
    // candidate (priority > 0). Table errors: e + sg for a candidate, else 0.
    let ge = [ge1, ge2, ge3];
    let mut cand = [0 as __mmask16; 3];
    let mut flip = [0 as __mmask16; 3];
    let mut moved = [0 as __mmask16; 3];
    let mut nv = [zero; 3];
    let mut changed = 0;
    for s in 0..3 {
        cand[s] = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(bv[s], zero);
        flip[s] = ok & ge[s];
        moved[s] = flip[s] & cand[s];
        nv[s] = _mm512_maskz_add_ps(cand[s], ev[s], sg);
        changed += moved[s].count_ones();
    }

    // Kernel sums after the flips, in f64 halves.
    let delta = |lo_half: bool, f: __mmask16, n: __m512, e: __m512| -> __m512d {
        let (nn, ee, k) = if lo_half {
            (
                _mm512_castps512_ps256(n),
                _mm512_castps512_ps256(e),
                f as u8,
            )
        } else {
            (
                _mm512_extractf32x8_ps::<1>(n),
                _mm512_extractf32x8_ps::<1>(e),
                (f >> 8) as u8,
            )
        };
        _mm512_maskz_sub_pd(k, _mm512_cvtps_pd(nn), _mm512_cvtps_pd(ee))
    };
    let (mut after_lo, mut after_hi) = (slo, shi);
    for s in 0..3 {
        after_lo = _mm512_add_pd(after_lo, delta(true, flip[s], nv[s], ev[s]));
        after_hi = _mm512_add_pd(after_hi, delta(false, flip[s], nv[s], ev[s]));
    }
    let total = _mm512_reduce_add_pd(_mm512_add_pd(
        _mm512_maskz_mov_pd(ok as u8, after_lo),
        _mm512_maskz_mov_pd((ok >> 8) as u8, after_hi),
    ));

    if CARRY {
        // over: order[t-1] (flipped) to the opposite table with |its new
        // error|; else order[t] (unflipped) to dir's table with |e|. The
        // rank is 1 or 2 in `at1` / `at2`, else 0.
        let at1 = (over & ge2 & !ge3) | (!over & ge1 & !ge2);
        let at2 = (over & ge3) | (!over & ge2);
        let pick =
            |v: [__m512; 3]| _mm512_mask_blend_ps(at2, _mm512_mask_blend_ps(at1, v[0], v[1]), v[2]);
        let ce = pick(ev);
        let cn = pick(nv);
        let cc = (at2 & cand[2]) | (at1 & cand[1]) | (!(at1 | at2) & cand[0]);
        let pri = _mm512_abs_ps(_mm512_mask_blend_ps(over, ce, cn));
        let tab_up = up ^ over;
        let cp = _mm512_mask_sub_ps(pri, tab_up, zero, pri);
        let ci = _mm512_mask_blend_epi32(at2, _mm512_mask_blend_epi32(at1, iv[0], iv[1]), iv[2]);
        let pos = _mm512_add_epi32(_mm512_add_epi32(ci, starts), _mm512_set1_epi32(base as i32));
        let cur = _mm512_maskz_mov_ps(over & cc, sg);
        // SAFETY: each slice holds at least 16 values (asserted above).
        unsafe {
            _mm512_storeu_ps(carries.cp.as_mut_ptr(), cp);
            _mm512_storeu_si512(carries.cpos.as_mut_ptr().cast(), pos);
            _mm512_storeu_ps(carries.ccur.as_mut_ptr(), cur);
        }
    }

    // Codes: the flips applied in lanes, then a byte transpose back to the
    // natural order (`vpermi2b`).
    let mut t = [_mm512_setzero_si512(); 3];
    for j in 0..K {
        let jv = _mm512_set1_epi32(j as i32);
        let here = (_mm512_cmpeq_epi32_mask(iv[0], jv) & moved[0])
            | (_mm512_cmpeq_epi32_mask(iv[1], jv) & moved[1])
            | (_mm512_cmpeq_epi32_mask(iv[2], jv) & moved[2]);
        let r = _mm512_mask_add_ps(rs[j], here, rs[j], sg);
        let c = codes16(r, lo, hi);
        let reg = &mut t[j / 4];
        *reg = match j % 4 {
            0 => _mm512_inserti32x4::<0>(*reg, c),
            1 => _mm512_inserti32x4::<1>(*reg, c),
            2 => _mm512_inserti32x4::<2>(*reg, c),
            _ => _mm512_inserti32x4::<3>(*reg, c),
        };
    }
    let (idx, third) = Transpose::<K>::TABLES;
    let bytes = L * K;
    for (c, (ix, &th)) in idx.iter().zip(&third).enumerate() {
        if 64 * c >= bytes {
            break;
        }
        // SAFETY: a 64-byte table; the store covers bytes 64c.. of qb only
        // up to its end (the mask), and qb.len() == 16 K.
        unsafe {
            let ix = _mm512_loadu_si512(ix.as_ptr().cast());
            let mut v = _mm512_permutex2var_epi8(t[0], ix, t[1]);
            if bytes > 128 {
                v = _mm512_mask_permutexvar_epi8(v, th, ix, t[2]);
            }
            let n = (bytes - 64 * c).min(64);
            let m: __mmask64 = if n == 64 { !0 } else { (1u64 << n) - 1 };
            _mm512_mask_storeu_epi8(qb.as_mut_ptr().add(64 * c), m, v);
        }
    }
    (changed, bad as u32, total)
}
