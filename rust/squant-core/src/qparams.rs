//! Per-output-channel asymmetric min/max quantizer (docs/algorithm.md section 1) and the
//! bit-exact float32 helpers every level uses.

use crate::error::SquantError;

/// `2^23`: every float32 of at least this magnitude is an integer.
const INT_LIMIT: f32 = 8_388_608.0;

/// Round half to even (numpy `rint`, torch `round`).
///
/// `f32::round_ties_even` lowers to a `rintf` library call on baseline
/// x86-64 (no SSE4.1), and LLVM happily speculates it in branch-free code,
/// so the hot loops use the classic trick instead: for `|x| < 2^23`,
/// `(x + copysign(2^23, x)) - copysign(2^23, x)` rounds in the FPU's
/// round-to-nearest-even mode and the subtraction is exact; larger floats
/// are already integers. Vectorises; bit-identical to `rint` except that it
/// may return `+0.0` where `rint` returns `-0.0`.
#[inline(always)]
pub fn rne(x: f32) -> f32 {
    let m = INT_LIMIT.copysign(x);
    let y = (x + m) - m;
    if x.abs() < INT_LIMIT {
        y
    } else {
        x
    }
}

/// Integer code range `[tmin, tmax] = [-2^(b-1), 2^(b-1) - 1]` for `bits`
/// (meaningful for the supported 2..=8; never panics).
#[inline]
pub fn code_range(bits: u32) -> (f32, f32) {
    let n = 2f32.powi(bits.clamp(1, 31) as i32 - 1);
    (-n, n - 1.0)
}

/// Validate a bit width.
pub fn check_bits(bits: u32) -> Result<(), SquantError> {
    if (2..=8).contains(&bits) {
        Ok(())
    } else {
        Err(SquantError::InvalidBits(bits))
    }
}

/// Quantizer parameters of one output channel, in the release's convention:
/// `x = scale * w - zero_point`, `w_hat = (q + zero_point) / scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelParams {
    /// Levels per unit (the inverse of the usual step size).
    pub scale: f32,
    /// Zero point, an integer held in float32.
    pub zero_point: f32,
}

/// Min and max of a channel; `Err(index)` names the first non-finite value.
///
/// Eight independent lanes so the loop vectorises; `v * 0` is 0 for every
/// finite value and NaN for NaN and infinities, so one sum flags them all.
#[inline(always)]
pub fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
    const L: usize = 8;
    let mut mn = [f32::INFINITY; L];
    let mut mx = [f32::NEG_INFINITY; L];
    let mut bad = [0.0f32; L];
    let chunks = w.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let v = c[i];
            mn[i] = if v < mn[i] { v } else { mn[i] };
            mx[i] = if v > mx[i] { v } else { mx[i] };
            bad[i] += v * 0.0;
        }
    }
    for (i, &v) in tail.iter().enumerate() {
        mn[i] = if v < mn[i] { v } else { mn[i] };
        mx[i] = if v > mx[i] { v } else { mx[i] };
        bad[i] += v * 0.0;
    }
    if bad.iter().any(|b| b.is_nan()) {
        return Err(w.iter().position(|v| !v.is_finite()).unwrap_or(0));
    }
    let lo = mn.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = mx.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok((lo, hi))
}

/// docs/algorithm.md section 1 for one channel whose min and max are known.
pub fn channel_params(
    mn: f32,
    mx: f32,
    bits: u32,
    channel: usize,
) -> Result<ChannelParams, SquantError> {
    check_bits(bits)?;
    let levels = ((1u32 << bits) - 1) as f32;
    let n = (1u32 << (bits - 1)) as f32;
    let scale = levels / (mx - mn).max(1e-8);
    let smn = scale * mn;
    let smx = scale * mx;
    let zero_point = rne(smn) + n;
    // The ends of the channel's grid, `(tmin + z) / s` and `(tmax + z) / s`,
    // lie within half a step of `mn` and `mx`; with `mx` or `mn` near
    // float32's limit they (and so dequantized values) can overflow.
    let lo = (zero_point - n) / scale;
    let hi = (zero_point + (n - 1.0)) / scale;
    let finite = scale.is_finite()
        && scale > 0.0
        && smn.is_finite()
        && smx.is_finite()
        && zero_point.is_finite()
        && lo.is_finite()
        && hi.is_finite();
    if !finite {
        return Err(SquantError::RangeTooLarge { channel });
    }
    Ok(ChannelParams { scale, zero_point })
}

/// Parameters of one channel straight from its weights.
#[inline(always)]
pub fn params_of(w: &[f32], bits: u32, channel: usize) -> Result<ChannelParams, SquantError> {
    let (mn, mx) = min_max(w).map_err(|index| SquantError::NonFinite { channel, index })?;
    channel_params(mn, mx, bits, channel)
}

/// Dequantize one code: `(q + zero_point) / scale`.
#[inline]
pub fn dequantize_one(q: i8, p: ChannelParams) -> f32 {
    (q as f32 + p.zero_point) / p.scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rne_matches_std_on_halves_and_large_values() {
        for i in -4000..4000 {
            let x = i as f32 * 0.25;
            assert_eq!(rne(x), x.round_ties_even(), "x = {x}");
        }
        for &x in &[
            4_194_303.5f32,
            -4_194_303.5,
            -6_000_000.5,
            8_388_607.5,
            -8_388_607.5,
            0.5,
            -0.5,
            1.5,
            -2.5,
            4_194_304.5,
            8_388_607.5,
            1e10,
            -1e10,
            0.49999997,
            -0.49999997,
            -0.0,
        ] {
            assert_eq!(rne(x), x.round_ties_even(), "x = {x}");
        }
    }

    #[test]
    fn constant_channel_uses_the_epsilon_guard() {
        let p = channel_params(0.5, 0.5, 4, 0).unwrap();
        assert_eq!(p.scale, 15.0f32 / 1e-8);
        assert_eq!(p.zero_point, rne(p.scale * 0.5) + 8.0);
    }

    #[test]
    fn huge_constant_channel_is_an_error() {
        assert_eq!(
            channel_params(1e32, 1e32, 4, 3),
            Err(SquantError::RangeTooLarge { channel: 3 })
        );
        assert_eq!(
            channel_params(-3e38, 3e38, 4, 1),
            Err(SquantError::RangeTooLarge { channel: 1 })
        );
    }

    #[test]
    fn grid_beyond_float32_is_an_error() {
        // Finite weights whose dequantized grid end overflows float32.
        assert_eq!(
            channel_params(0.0, f32::MAX, 2, 5),
            Err(SquantError::RangeTooLarge { channel: 5 })
        );
        // Scale and zero point are finite here; only the grid end is not.
        assert_eq!(
            channel_params(3.4028e38, f32::MAX, 8, 0),
            Err(SquantError::RangeTooLarge { channel: 0 })
        );
        assert!(channel_params(-f32::MAX, 0.0, 8, 0).is_ok());
        assert!(channel_params(0.0, 1e38, 2, 0).is_ok());
    }

    #[test]
    fn non_finite_is_located() {
        assert_eq!(min_max(&[1.0, f32::NAN, 2.0]), Err(1));
        assert_eq!(min_max(&[1.0, 2.0, f32::NEG_INFINITY]), Err(2));
        assert_eq!(min_max(&[1.0, -2.0]), Ok((-2.0, 1.0)));
    }
}
