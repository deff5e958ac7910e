//! The CASE group sum `S` (docs/algorithm.md section 3), made independent of summation
//! order.
//!
//! docs/algorithm.md section 3 leaves the accumulation open (f32 or f64); both depend on the order of the
//! additions, so a sequential Rust loop, numpy's pairwise sum and a CUDA
//! reduction could disagree in the last bit and, once in a long while, round
//! a group differently. squant-rs instead sums in fixed point: every error
//! `e` (a float32 in `[-1, 1]`) becomes the integer `rne(e * 2^F)` (exact
//! f64 arithmetic), the integers are added exactly in i64, and
//! `S = total * 2^-F`. Integer addition is associative, so every backend and
//! every thread count gets the same `S`; it is within `G * 2^-(F+1)` of the
//! exact sum (F = 40: about 2e-9 for a 4608-element channel), far closer
//! than the release's float32 sum. Sums of errors on a binary grid (ties)
//! are exact.

/// Fractional bits of the fixed-point sum for a group of `len` elements:
/// 40, lowered for groups above 2^22 elements so the i64 total cannot
/// overflow (`len * 2^F <= 2^62`).
#[inline]
pub fn frac_bits(len: usize) -> i32 {
    let log2 = usize::BITS - len.saturating_sub(1).leading_zeros();
    (62 - log2 as i32).min(40)
}

const MAGIC64: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52

/// `rne(e * 2^f)` as an integer, for `|e * 2^f| < 2^51` (exact).
#[inline(always)]
pub fn fixed(e: f32, scale: f64) -> i64 {
    let v = e as f64 * scale + MAGIC64;
    (v.to_bits() as i64).wrapping_sub(MAGIC64.to_bits() as i64)
}

/// `2^f` as f64.
#[inline]
pub fn pow2(f: i32) -> f64 {
    f64::from_bits(((1023 + f) as u64) << 52)
}

/// Converts an exact fixed-point total back to `S` (one rounding, i64 -> f64).
#[inline]
pub fn to_sum(total: i64, f: i32) -> f64 {
    total as f64 * pow2(-f)
}

/// `S` of a group of `len` errors given as an iterator.
pub fn group_sum(errors: impl Iterator<Item = f32>, len: usize) -> f64 {
    let f = frac_bits(len);
    let scale = pow2(f);
    let total: i64 = errors.map(|e| fixed(e, scale)).sum();
    to_sum(total, f)
}

/// `S` of a contiguous slice of errors (vectorisable).
#[inline]
pub fn slice_sum(errors: &[f32], f: i32) -> f64 {
    let scale = pow2(f);
    let mut total = 0i64;
    for &e in errors {
        total = total.wrapping_add(fixed(e, scale));
    }
    to_sum(total, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_matches_rounding() {
        let s = pow2(40);
        for &e in &[
            0.5f32, -0.5, 0.25, -1.0, 1.0, 1e-13, -1e-13, 3e-13, 0.0, -0.0,
        ] {
            let want = (e as f64 * s).round_ties_even() as i64;
            assert_eq!(fixed(e, s), want, "e = {e}");
        }
    }

    #[test]
    fn frac_bits_bounds() {
        assert_eq!(frac_bits(1), 40);
        assert_eq!(frac_bits(1 << 22), 40);
        assert_eq!(frac_bits((1 << 22) + 1), 39);
        assert_eq!(frac_bits(u32::MAX as usize), 30);
    }

    #[test]
    fn order_does_not_matter() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.4999)
            .collect();
        let mut r = v.clone();
        r.reverse();
        assert_eq!(slice_sum(&v, 40), slice_sum(&r, 40));
        assert_eq!(slice_sum(&v, 40), group_sum(v.iter().copied(), v.len()));
    }
}
