//! Per-output-channel asymmetric min/max quantizer (SPEC section 1) and the
//! bit-exact float32 helpers every level uses.

use crate::error::SquantError;

/// `2^22`: below this magnitude the magic-constant rounding below is exact.
const EXACT_LIMIT: f32 = 4_194_304.0;
/// `1.5 * 2^23`: adding and subtracting it rounds to an integer, ties to even.
const MAGIC: f32 = 12_582_912.0;

/// Round half to even (numpy `rint`, torch `round`).
///
/// `f32::round_ties_even` lowers to a library call on baseline x86-64 (no
/// SSE4.1), so the hot loops use the classic magic-constant trick, exact for
/// `|x| < 2^22`; larger floats are already integers or handled by std.
#[inline(always)]
pub fn rne(x: f32) -> f32 {
    if x.abs() < EXACT_LIMIT {
        (x + MAGIC) - MAGIC
    } else {
        x.round_ties_even()
    }
}

/// Integer code range `[tmin, tmax] = [-2^(b-1), 2^(b-1) - 1]` for `bits`.
#[inline]
pub fn code_range(bits: u32) -> (f32, f32) {
    let n = (1u32 << (bits - 1)) as f32;
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
#[inline]
pub fn min_max(w: &[f32]) -> Result<(f32, f32), usize> {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    let mut bad = false;
    for &v in w {
        bad |= !v.is_finite();
        mn = mn.min(v);
        mx = mx.max(v);
    }
    if bad {
        Err(w.iter().position(|v| !v.is_finite()).unwrap_or(0))
    } else {
        Ok((mn, mx))
    }
}

/// SPEC section 1 for one channel whose min and max are known.
pub fn channel_params(
    mn: f32,
    mx: f32,
    bits: u32,
    channel: usize,
) -> Result<ChannelParams, SquantError> {
    let levels = ((1u32 << bits) - 1) as f32;
    let n = (1u32 << (bits - 1)) as f32;
    let scale = levels / (mx - mn).max(1e-8);
    let smn = scale * mn;
    let smx = scale * mx;
    let zero_point = rne(smn) + n;
    if !(scale.is_finite() && scale > 0.0 && smn.is_finite() && smx.is_finite())
        || !zero_point.is_finite()
    {
        return Err(SquantError::RangeTooLarge { channel });
    }
    Ok(ChannelParams { scale, zero_point })
}

/// Parameters of one channel straight from its weights.
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
    fn non_finite_is_located() {
        assert_eq!(min_max(&[1.0, f32::NAN, 2.0]), Err(1));
        assert_eq!(min_max(&[1.0, 2.0, f32::NEG_INFINITY]), Err(2));
        assert_eq!(min_max(&[1.0, -2.0]), Ok((-2.0, 1.0)));
    }
}
