//! The lane path's kernel block and min/max in AVX2 intrinsics (x86-64 CPUs
//! with AVX2 but without the AVX-512 build's features; chosen at run time).
//! The element passes are the portable ones, compiled for AVX2. Same IEEE
//! operations as every other build (no FMA, `vroundps` in round-to-nearest-
//! even, f64 sums); the parity tests compare it with the scalar reference.
//!
//! AVX2 has eight f32 lanes, so a block of 16 kernels runs as two halves of
//! eight. There is no byte permutation: the block's SQuant-E codes are
//! written first (portable `e_codes`) and the flipped codes over them.

use std::arch::x86_64::*;

use crate::fast::{Carries, HwRound, Portable, Simd, L};
use crate::qparams::ChannelParams;

/// The AVX2 build. Its methods run AVX2 instructions without checking the
/// CPU: they must only be called from `quantize_channel_avx2`, which runs
/// after the AVX2 check (debug builds assert it).
pub(crate) struct Avx2;

/// Lanes of one half block.
const H: usize = 8;

/// `vroundps` immediate: round to nearest even, no precision exception.
const RNE: i32 = 0x08;

/// Debug builds: the CPU really has AVX2 (see [`Avx2`]).
#[inline(always)]
fn debug_check() {
    debug_assert!(
        std::arch::is_x86_feature_detected!("avx2"),
        "AVX2 build called on a CPU without it"
    );
}

impl Simd for Avx2 {
    type R = HwRound;

    #[inline(always)]
    fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
        debug_check();
        // SAFETY: only reached from `quantize_channel_avx2`, after the CPU
        // check.
        unsafe { min_max(w) }
    }

    #[inline(always)]
    fn e_codes(w: &[f32], p: ChannelParams, tmin: f32, tmax: f32, codes: &mut [i8]) {
        <Portable<HwRound> as Simd>::e_codes(w, p, tmin, tmax, codes)
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
        <Portable<HwRound> as Simd>::e_pass(w, p, tmin, tmax, codes, pv)
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
        assert!(wb.len() == L * K && qb.len() == L * K);
        assert!(carries.cp.len() >= L && carries.cpos.len() >= L && carries.ccur.len() >= L);
        <Portable<HwRound> as Simd>::e_codes(wb, p, tmin, tmax, qb);
        let mut out = (0u32, 0u32, 0f64);
        for half in 0..2 {
            let span = half * H * K..(half + 1) * H * K;
            let c = half * H..(half + 1) * H;
            // SAFETY: as above; the slices hold 8 kernels and 8 carries.
            let (ch, bad, s) = unsafe {
                block8::<K, CARRY>(
                    &wb[span.clone()],
                    p,
                    tmin,
                    tmax,
                    &mut qb[span],
                    &mut carries.cp[c.clone()],
                    &mut carries.cpos[c.clone()],
                    &mut carries.ccur[c],
                    base + (half * H * K) as u32,
                )
            };
            out.0 += ch;
            out.1 |= bad << (half * H);
            out.2 += s;
        }
        out
    }

    #[inline(always)]
    fn collect_above(vals: &[f32], sign: f32, thr: f32, keys: &mut Vec<u64>, idx: &mut Vec<u32>) {
        <Portable<HwRound> as Simd>::collect_above(vals, sign, thr, keys, idx)
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
    let mut mn = _mm256_set1_ps(f32::INFINITY);
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    let zero = _mm256_setzero_ps();
    let mut bad = zero;
    let chunks = w.chunks_exact(H);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: a chunk holds 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        mn = _mm256_min_ps(mn, v);
        mx = _mm256_max_ps(mx, v);
        // v * 0 is NaN exactly for NaN and infinities.
        let z = _mm256_mul_ps(v, zero);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_UNORD_Q>(z, z));
    }
    let mut lo = [0f32; H];
    let mut hi = [0f32; H];
    // SAFETY: stores into local arrays of 8 floats.
    unsafe {
        _mm256_storeu_ps(lo.as_mut_ptr(), mn);
        _mm256_storeu_ps(hi.as_mut_ptr(), mx);
    }
    let mut any_bad = _mm256_movemask_ps(bad) != 0;
    let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
    for i in 0..H {
        l = if lo[i] < l { lo[i] } else { l };
        h = if hi[i] > h { hi[i] } else { h };
    }
    for &v in tail {
        any_bad |= !v.is_finite();
        l = if v < l { v } else { l };
        h = if v > h { v } else { h };
    }
    if any_bad {
        return Err(w.iter().position(|v| !v.is_finite()).unwrap_or(0));
    }
    Ok((l, h))
}

/// Sum of the eight f32 lanes of `e` into two f64 halves.
#[inline]
#[target_feature(enable = "avx2")]
fn add_f64(lo: __m256d, hi: __m256d, e: __m256) -> (__m256d, __m256d) {
    (
        _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e))),
        _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e))),
    )
}

/// The two f64 halves of an 8-lane f32 mask (all-ones lanes stay
/// all-ones).
#[inline]
#[target_feature(enable = "avx2")]
fn mask_pd(m: __m256) -> (__m256d, __m256d) {
    let mi = _mm256_castps_si256(m);
    (
        _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(mi))),
        _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(mi))),
    )
}

/// One CASE step on each of 8 kernels of `K` elements, as
/// `fast::kernel_block` (which documents the steps): masks are vectors
/// (all-ones lanes), and the codes of moved ranks are written one by one
/// over the SQuant-E codes already in `qb`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block8<const K: usize, const CARRY: bool>(
    wb: &[f32],
    p: ChannelParams,
    tmin: f32,
    tmax: f32,
    qb: &mut [i8],
    cp: &mut [f32],
    cpos: &mut [u32],
    ccur: &mut [f32],
    base: u32,
) -> (u32, u32, f64) {
    assert!(wb.len() == H * K && qb.len() == H * K);
    assert!(cp.len() == H && cpos.len() == H && ccur.len() == H);
    let zero = _mm256_setzero_ps();
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let starts = _mm256_mullo_epi32(iota, _mm256_set1_epi32(K as i32));
    let (sv, zv) = (_mm256_set1_ps(p.scale), _mm256_set1_ps(p.zero_point));
    let (lo, hi) = (_mm256_set1_ps(tmin), _mm256_set1_ps(tmax));

    // Transposed E level: position j of the 8 kernels in one vector.
    let mut es = [zero; K];
    let mut rs = [zero; K];
    let (mut slo, mut shi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for j in 0..K {
        let idx = _mm256_add_epi32(starts, _mm256_set1_epi32(j as i32));
        // SAFETY: every index is below 8 * K = wb.len().
        let wj = unsafe { _mm256_i32gather_ps::<4>(wb.as_ptr(), idx) };
        let x = _mm256_sub_ps(_mm256_mul_ps(sv, wj), zv);
        let r = _mm256_round_ps::<RNE>(x);
        let e = _mm256_sub_ps(r, x);
        es[j] = e;
        rs[j] = r;
        (slo, shi) = add_f64(slo, shi, e);
    }

    // Step parameters, and the lanes that cannot be decided here. The sign
    // of S survives the f32 conversion wherever the lane is decidable (a
    // sum within the tolerance of 0 is not).
    let s32 = _mm256_set_m128(_mm256_cvtpd_ps(shi), _mm256_cvtpd_ps(slo));
    let up = _mm256_cmp_ps::<_CMP_LT_OQ>(s32, zero);
    let a = abs(s32);
    let t = _mm256_round_ps::<RNE>(a);
    let over = _mm256_cmp_ps::<_CMP_GE_OQ>(t, a);
    let tol = _mm256_set1_ps(K as f32 * 2f32.powi(-21) + 2f32.powi(-20));
    let half = _mm256_mul_ps(
        _mm256_round_ps::<RNE>(_mm256_add_ps(a, a)),
        _mm256_set1_ps(0.5),
    );
    let near = _mm256_cmp_ps::<_CMP_LE_OQ>(abs(_mm256_sub_ps(a, half)), tol);
    let ge = |n: f32| _mm256_cmp_ps::<_CMP_GE_OQ>(t, _mm256_set1_ps(n));
    let (ge1, ge2, ge3, ge4) = (ge(1.0), ge(2.0), ge(3.0), ge(4.0));
    // A step needs its first t ranks plus the carry: at most three here.
    let bad = _mm256_or_ps(_mm256_or_ps(near, ge4), _mm256_andnot_ps(over, ge3));
    let ok = _mm256_andnot_ps(bad, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));

    let sg = _mm256_blendv_ps(_mm256_set1_ps(-1.0), one, up);
    let sp = _mm256_sub_ps(zero, sg);
    let bnd = _mm256_blendv_ps(lo, hi, up);

    // First three ranks (strict >, ascending j): priority and position (as
    // an exact float).
    let neg1 = _mm256_set1_ps(-1.0);
    let mut bv = [neg1; 3];
    let mut iv = [zero; 3];
    for j in 0..K {
        let (e, r) = (es[j], rs[j]);
        let v = _mm256_mul_ps(e, sp);
        let d = _mm256_mul_ps(_mm256_sub_ps(r, bnd), sp);
        let cand = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(v, zero),
            _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero),
        );
        let q = _mm256_and_ps(cand, v);
        let g0 = _mm256_cmp_ps::<_CMP_GT_OQ>(q, bv[0]);
        let g1 = _mm256_cmp_ps::<_CMP_GT_OQ>(q, bv[1]);
        let g2 = _mm256_cmp_ps::<_CMP_GT_OQ>(q, bv[2]);
        let jv = _mm256_set1_ps(j as f32);
        bv[2] = _mm256_blendv_ps(_mm256_blendv_ps(bv[2], q, g2), bv[1], g1);
        iv[2] = _mm256_blendv_ps(_mm256_blendv_ps(iv[2], jv, g2), iv[1], g1);
        bv[1] = _mm256_blendv_ps(_mm256_blendv_ps(bv[1], q, g1), bv[0], g0);
        iv[1] = _mm256_blendv_ps(_mm256_blendv_ps(iv[1], jv, g1), iv[0], g0);
        bv[0] = _mm256_blendv_ps(bv[0], q, g0);
        iv[0] = _mm256_blendv_ps(iv[0], jv, g0);
    }

    // Positions, errors and values at the three ranks (gathers from the
    // transposed arrays: lane l of rank s is es[iv][l]).
    let mut ii = [_mm256_setzero_si256(); 3];
    let mut ev = [zero; 3];
    let mut rv = [zero; 3];
    for s in 0..3 {
        ii[s] = _mm256_cvttps_epi32(iv[s]);
        let at = _mm256_add_epi32(_mm256_slli_epi32::<3>(ii[s]), iota);
        // SAFETY: es and rs hold K vectors of 8 floats and iv < K.
        unsafe {
            ev[s] = _mm256_i32gather_ps::<4>(es.as_ptr().cast(), at);
            rv[s] = _mm256_i32gather_ps::<4>(rs.as_ptr().cast(), at);
        }
    }

    let ges = [ge1, ge2, ge3];
    let mut cand = [zero; 3];
    let mut flip = [zero; 3];
    let mut moved = [0i32; 3];
    let mut nv = [zero; 3];
    let mut changed = 0u32;
    let (mut after_lo, mut after_hi) = (slo, shi);
    for s in 0..3 {
        cand[s] = _mm256_cmp_ps::<_CMP_GT_OQ>(bv[s], zero);
        flip[s] = _mm256_and_ps(ok, ges[s]);
        moved[s] = _mm256_movemask_ps(_mm256_and_ps(flip[s], cand[s]));
        changed += moved[s].count_ones();
        nv[s] = _mm256_and_ps(cand[s], _mm256_add_ps(ev[s], sg));
        // Sum after the flips, in f64: + (new - old) where the rank flips.
        let (fl, fh) = mask_pd(flip[s]);
        let dl = _mm256_sub_pd(
            _mm256_cvtps_pd(_mm256_castps256_ps128(nv[s])),
            _mm256_cvtps_pd(_mm256_castps256_ps128(ev[s])),
        );
        let dh = _mm256_sub_pd(
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(nv[s])),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(ev[s])),
        );
        after_lo = _mm256_add_pd(after_lo, _mm256_and_pd(fl, dl));
        after_hi = _mm256_add_pd(after_hi, _mm256_and_pd(fh, dh));
    }
    let (okl, okh) = mask_pd(ok);
    let mut sums = [0f64; H];
    // SAFETY: stores into a local array of 8 f64.
    unsafe {
        _mm256_storeu_pd(sums.as_mut_ptr(), _mm256_and_pd(okl, after_lo));
        _mm256_storeu_pd(sums.as_mut_ptr().add(4), _mm256_and_pd(okh, after_hi));
    }
    let total: f64 = sums.iter().sum();

    if CARRY {
        // over: rank t-1 (flipped) to the opposite table with |its new
        // error|; else rank t (unflipped) to dir's table with |e|.
        let at1 = _mm256_or_ps(
            _mm256_and_ps(over, _mm256_andnot_ps(ge3, ge2)),
            _mm256_andnot_ps(over, _mm256_andnot_ps(ge2, ge1)),
        );
        let at2 = _mm256_or_ps(_mm256_and_ps(over, ge3), _mm256_andnot_ps(over, ge2));
        let pick = |v: [__m256; 3]| _mm256_blendv_ps(_mm256_blendv_ps(v[0], v[1], at1), v[2], at2);
        let ce = pick(ev);
        let cn = pick(nv);
        let cc = pick(cand);
        let pri = abs(_mm256_blendv_ps(ce, cn, over));
        let tab_up = _mm256_xor_ps(up, over);
        let cpv = _mm256_blendv_ps(pri, _mm256_sub_ps(zero, pri), tab_up);
        let ci = _mm256_blendv_ps(_mm256_blendv_ps(iv[0], iv[1], at1), iv[2], at2);
        let pos = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_cvttps_epi32(ci), starts),
            _mm256_set1_epi32(base as i32),
        );
        let cur = _mm256_and_ps(_mm256_and_ps(over, cc), sg);
        // SAFETY: each slice holds 8 values (asserted above).
        unsafe {
            _mm256_storeu_ps(cp.as_mut_ptr(), cpv);
            _mm256_storeu_si256(cpos.as_mut_ptr().cast(), pos);
            _mm256_storeu_ps(ccur.as_mut_ptr(), cur);
        }
    }

    // Codes of the moved ranks, over the SQuant-E codes.
    if (moved[0] | moved[1] | moved[2]) != 0 {
        let mut pos = [[0i32; H]; 3];
        let mut code = [[0i32; H]; 3];
        for s in 0..3 {
            let v = _mm256_add_ps(rv[s], sg);
            let c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            // SAFETY: stores into local arrays of 8 i32.
            unsafe {
                _mm256_storeu_si256(pos[s].as_mut_ptr().cast(), _mm256_add_epi32(starts, ii[s]));
                _mm256_storeu_si256(code[s].as_mut_ptr().cast(), c);
            }
        }
        for s in 0..3 {
            let mut m = moved[s] as u32;
            while m != 0 {
                let l = m.trailing_zeros() as usize;
                m &= m - 1;
                qb[pos[s][l] as usize] = code[s][l] as i8;
            }
        }
    }
    (changed, _mm256_movemask_ps(bad) as u32, total)
}
