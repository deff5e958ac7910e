//! Per-output-channel quantizers: the paper's asymmetric min/max one
//! (docs/algorithm.md section 1) and the symmetric one for int8 runtimes,
//! and the bit-exact float32 helpers every level uses.

use std::fmt;
use std::str::FromStr;

use crate::error::SquantError;

/// How a channel's floats map to codes before the CASE levels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Quantizer {
    /// The paper's: min/max range, zero point, codes in `[-2^(b-1), 2^(b-1) - 1]`.
    #[default]
    Asymmetric,
    /// Zero point 0, `s = (2^(b-1) - 1) / max|w|`, codes in the narrow
    /// signed range `[-(2^(b-1) - 1), 2^(b-1) - 1]` (what int8 runtimes fuse).
    Symmetric,
}

impl Quantizer {
    /// Both quantizers, the default first.
    pub const ALL: [Quantizer; 2] = [Quantizer::Asymmetric, Quantizer::Symmetric];

    /// The quantizer's name as used by the Python API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Quantizer::Asymmetric => "asymmetric",
            Quantizer::Symmetric => "symmetric",
        }
    }
}

impl fmt::Display for Quantizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Quantizer {
    type Err = SquantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "asymmetric" => Ok(Quantizer::Asymmetric),
            "symmetric" => Ok(Quantizer::Symmetric),
            other => Err(SquantError::UnknownQuantizer(other.to_string())),
        }
    }
}

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

/// Integer code range `[tmin, tmax]` for `bits`: `[-2^(b-1), 2^(b-1) - 1]`
/// (asymmetric) or `[-(2^(b-1) - 1), 2^(b-1) - 1]` (symmetric). Meaningful
/// for the supported 2..=8; never panics.
#[inline]
pub fn code_range(bits: u32, quantizer: Quantizer) -> (f32, f32) {
    let n = 2f32.powi(bits.clamp(1, 31) as i32 - 1);
    match quantizer {
        Quantizer::Asymmetric => (-n, n - 1.0),
        Quantizer::Symmetric => (1.0 - n, n - 1.0),
    }
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

/// docs/algorithm.md section 1 (asymmetric) or the symmetric quantizer for
/// one channel whose min and max are known.
pub fn channel_params(
    mn: f32,
    mx: f32,
    bits: u32,
    quantizer: Quantizer,
    channel: usize,
) -> Result<ChannelParams, SquantError> {
    check_bits(bits)?;
    let n = (1u32 << (bits - 1)) as f32;
    let (scale, zero_point) = match quantizer {
        Quantizer::Asymmetric => {
            let levels = ((1u32 << bits) - 1) as f32;
            let scale = levels / (mx - mn).max(1e-8);
            (scale, rne(scale * mn) + n)
        }
        Quantizer::Symmetric => ((n - 1.0) / mx.abs().max(mn.abs()).max(1e-8), 0.0),
    };
    let smn = scale * mn;
    let smx = scale * mx;
    // The ends of the channel's grid, `(tmin + z) / s` and `(tmax + z) / s`,
    // lie within half a step of `mn` and `mx`; with `mx` or `mn` near
    // float32's limit they (and so dequantized values) can overflow.
    let (tmin, tmax) = code_range(bits, quantizer);
    let lo = (tmin + zero_point) / scale;
    let hi = (tmax + zero_point) / scale;
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
pub fn params_of(
    w: &[f32],
    bits: u32,
    quantizer: Quantizer,
    channel: usize,
) -> Result<ChannelParams, SquantError> {
    let (mn, mx) = min_max(w).map_err(|index| SquantError::NonFinite { channel, index })?;
    channel_params(mn, mx, bits, quantizer, channel)
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
        let p = channel_params(0.5, 0.5, 4, Quantizer::Asymmetric, 0).unwrap();
        assert_eq!(p.scale, 15.0f32 / 1e-8);
        assert_eq!(p.zero_point, rne(p.scale * 0.5) + 8.0);
        let p = channel_params(0.0, 0.0, 4, Quantizer::Symmetric, 0).unwrap();
        assert_eq!(p.scale, 7.0f32 / 1e-8);
        assert_eq!(p.zero_point, 0.0);
    }

    #[test]
    fn symmetric_scale_uses_the_largest_magnitude() {
        let p = channel_params(-0.5, 0.25, 8, Quantizer::Symmetric, 0).unwrap();
        assert_eq!(
            p,
            ChannelParams {
                scale: 127.0 / 0.5,
                zero_point: 0.0
            }
        );
        let p = channel_params(0.1, 2.0, 2, Quantizer::Symmetric, 0).unwrap();
        assert_eq!(
            p,
            ChannelParams {
                scale: 1.0 / 2.0,
                zero_point: 0.0
            }
        );
        assert_eq!(code_range(8, Quantizer::Symmetric), (-127.0, 127.0));
        assert_eq!(code_range(2, Quantizer::Symmetric), (-1.0, 1.0));
        assert_eq!(code_range(8, Quantizer::Asymmetric), (-128.0, 127.0));
        assert_eq!("symmetric".parse::<Quantizer>(), Ok(Quantizer::Symmetric));
        assert_eq!(Quantizer::default().to_string(), "asymmetric");
        assert!("sym".parse::<Quantizer>().is_err());
    }

    #[test]
    fn huge_constant_channel_is_an_error() {
        assert_eq!(
            channel_params(1e32, 1e32, 4, Quantizer::Asymmetric, 3),
            Err(SquantError::RangeTooLarge { channel: 3 })
        );
        assert_eq!(
            channel_params(-3e38, 3e38, 4, Quantizer::Asymmetric, 1),
            Err(SquantError::RangeTooLarge { channel: 1 })
        );
    }

    #[test]
    fn grid_beyond_float32_is_an_error() {
        // Finite weights whose dequantized grid end overflows float32.
        assert_eq!(
            channel_params(0.0, f32::MAX, 2, Quantizer::Asymmetric, 5),
            Err(SquantError::RangeTooLarge { channel: 5 })
        );
        // Scale and zero point are finite here; only the grid end is not.
        assert_eq!(
            channel_params(3.4028e38, f32::MAX, 8, Quantizer::Asymmetric, 0),
            Err(SquantError::RangeTooLarge { channel: 0 })
        );
        assert!(channel_params(-f32::MAX, 0.0, 8, Quantizer::Asymmetric, 0).is_ok());
        assert!(channel_params(0.0, 1e38, 2, Quantizer::Asymmetric, 0).is_ok());
    }

    #[test]
    fn non_finite_is_located() {
        assert_eq!(min_max(&[1.0, f32::NAN, 2.0]), Err(1));
        assert_eq!(min_max(&[1.0, 2.0, f32::NEG_INFINITY]), Err(2));
        assert_eq!(min_max(&[1.0, -2.0]), Ok((-2.0, 1.0)));
    }
}
