//! # squant-core
//!
//! SQuant (Guo et al., ICLR 2022): data-free, on-the-fly quantization of
//! neural-network weights by CASE rounding (Constrained Absolute Sum of
//! Error) at element, kernel and output-channel level. Pure Rust: slices in,
//! slices out; parallel over output channels with rayon.
//!
//! ```
//! use squant_core::{quantize, Layout, Mode, Quantizer};
//! let w: Vec<f32> = (0..2 * 3 * 9).map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5).collect();
//! let layout = Layout { oc: 2, ic: 3, k: 9 };
//! let mut codes = vec![0i8; w.len()];
//! let (mut scale, mut zp) = (vec![0f32; 2], vec![0f32; 2]);
//! let flips = quantize(&w, layout, 4, Quantizer::Asymmetric, Mode::Full, &mut codes, &mut scale, &mut zp)
//!     .unwrap();
//! assert!(codes.iter().all(|&q| (-8..=7).contains(&q)));
//! # let _ = flips;
//! ```
//!
//! The computation runs in the current rayon pool; wrap the call in
//! `ThreadPool::install` to choose the thread count. Results never depend on
//! it.

pub mod case;
pub mod error;
mod fast;
#[cfg(target_arch = "x86_64")]
mod fast_avx2;
#[cfg(target_arch = "x86_64")]
mod fast_avx512;
pub mod mode;
pub mod qparams;
pub mod reference;
pub mod sum;

use rayon::prelude::*;

pub use case::Flips;
pub use error::SquantError;
pub use mode::Mode;
pub use qparams::{dequantize_one, ChannelParams, Quantizer};

/// A weight viewed as `W[o, i, k]`: `oc` output channels, `ic` input
/// channels (per group), `k` elements per kernel (1 for Linear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub oc: usize,
    pub ic: usize,
    pub k: usize,
}

impl Layout {
    /// Layout of a weight of shape `(OC, IC, *kernel)`; `None` below 2-D.
    pub fn from_shape(shape: &[usize]) -> Option<Layout> {
        match shape {
            [oc, ic, rest @ ..] => Some(Layout {
                oc: *oc,
                ic: *ic,
                k: rest.iter().product(),
            }),
            _ => None,
        }
    }

    /// Elements of one output channel.
    pub fn channel_len(&self) -> usize {
        self.ic * self.k
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.oc * self.channel_len()
    }

    /// Whether the layout holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The layout alone: no zero dimension, channels within `u32`, the
    /// element count within `usize`. Returns the element count.
    pub fn check(&self) -> Result<usize, SquantError> {
        if self.oc == 0 || self.ic == 0 || self.k == 0 {
            return Err(SquantError::EmptyTensor);
        }
        let g = self
            .ic
            .checked_mul(self.k)
            .ok_or(SquantError::ChannelTooLarge(usize::MAX))?;
        if g > u32::MAX as usize {
            return Err(SquantError::ChannelTooLarge(g));
        }
        self.oc.checked_mul(g).ok_or(SquantError::ShapeMismatch {
            what: "weights",
            expected: usize::MAX,
            got: 0,
        })
    }

    fn validate(&self, w: usize, codes: usize, scale: usize, zp: usize) -> Result<(), SquantError> {
        let n = self.check()?;
        for (what, expected, got) in [
            ("weights", n, w),
            ("codes", n, codes),
            ("scale", self.oc, scale),
            ("zero_point", self.oc, zp),
        ] {
            if expected != got {
                return Err(SquantError::ShapeMismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// Below this many elements per task, rayon's splitting costs more than it
/// saves.
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// Quantizes `w` (row-major `(oc, ic, k)`) with SQuant and `quantizer`'s
/// per-channel mapping: writes int8 codes,
/// per-channel `scale` (levels per unit) and `zero_point`, and returns the
/// number of elements changed at the K and C levels.
///
/// Errors name the first (lowest) output channel at fault, whatever the
/// thread count.
#[allow(clippy::too_many_arguments)]
pub fn quantize(
    w: &[f32],
    layout: Layout,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    codes: &mut [i8],
    scale: &mut [f32],
    zero_point: &mut [f32],
) -> Result<Flips, SquantError> {
    quantize_isa(
        w,
        layout,
        bits,
        quantizer,
        mode,
        codes,
        scale,
        zero_point,
        case::Isa::Best,
    )
}

/// [`quantize`] in a chosen build of the fast path (see [`case::Isa`]).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn quantize_isa(
    w: &[f32],
    layout: Layout,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    codes: &mut [i8],
    scale: &mut [f32],
    zero_point: &mut [f32],
    isa: case::Isa,
) -> Result<Flips, SquantError> {
    qparams::check_bits(bits)?;
    layout.validate(w.len(), codes.len(), scale.len(), zero_point.len())?;
    let g = layout.channel_len();
    let min_len = MIN_TASK_ELEMS.div_ceil(g).max(1);
    let result = codes
        .par_chunks_mut(g)
        .zip(scale.par_iter_mut())
        .zip(zero_point.par_iter_mut())
        .enumerate()
        .with_min_len(min_len)
        .map_init(case::Scratch::default, |sc, (o, ((qc, s), z))| {
            channel_step(w, layout, o, qc, s, z, bits, quantizer, mode, sc, isa)
        })
        .try_reduce(Flips::default, |a, b| Ok(a + b));
    result.map_err(|err| first_error(w, g, bits, quantizer).unwrap_or(err))
}

/// [`quantize`] on the calling thread only (no rayon pool involved): for
/// one thread, or weights too small to be worth handing to a pool. Same
/// results.
#[allow(clippy::too_many_arguments)]
pub fn quantize_serial(
    w: &[f32],
    layout: Layout,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    codes: &mut [i8],
    scale: &mut [f32],
    zero_point: &mut [f32],
) -> Result<Flips, SquantError> {
    qparams::check_bits(bits)?;
    layout.validate(w.len(), codes.len(), scale.len(), zero_point.len())?;
    let g = layout.channel_len();
    let mut sc = case::Scratch::default();
    let mut flips = Flips::default();
    let channels = codes
        .chunks_mut(g)
        .zip(scale.iter_mut())
        .zip(zero_point.iter_mut());
    for (o, ((qc, s), z)) in channels.enumerate() {
        flips = flips
            + channel_step(
                w,
                layout,
                o,
                qc,
                s,
                z,
                bits,
                quantizer,
                mode,
                &mut sc,
                case::Isa::Best,
            )?;
    }
    Ok(flips)
}

/// Output channel `o` of `w` into its codes, scale and zero point, handing
/// the next channel along for prefetching.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_step(
    w: &[f32],
    layout: Layout,
    o: usize,
    codes: &mut [i8],
    scale: &mut f32,
    zero_point: &mut f32,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
    sc: &mut case::Scratch,
    isa: case::Isa,
) -> Result<Flips, SquantError> {
    let g = layout.channel_len();
    let wc = &w[o * g..(o + 1) * g];
    let next = w.get((o + 1) * g..(o + 2) * g).unwrap_or(&[]);
    let (p, f) =
        case::quantize_channel_isa(wc, next, layout.k, bits, quantizer, mode, o, codes, sc, isa)?;
    *scale = p.scale;
    *zero_point = p.zero_point;
    Ok(f)
}

/// The error of the lowest failing channel (a parallel run may report any).
fn first_error(w: &[f32], g: usize, bits: u32, quantizer: Quantizer) -> Option<SquantError> {
    w.chunks(g)
        .enumerate()
        .find_map(|(o, wc)| qparams::params_of(wc, bits, quantizer, o).err())
}

/// Dequantizes codes in place of `out`: `(q + zero_point[o]) / scale[o]`.
pub fn dequantize(
    codes: &[i8],
    layout: Layout,
    scale: &[f32],
    zero_point: &[f32],
    out: &mut [f32],
) -> Result<(), SquantError> {
    layout.validate(out.len(), codes.len(), scale.len(), zero_point.len())?;
    let g = layout.channel_len();
    out.par_chunks_mut(g)
        .zip(codes.par_chunks(g))
        .zip(scale.par_iter().zip(zero_point.par_iter()))
        .with_min_len(MIN_TASK_ELEMS.div_ceil(g).max(1))
        .for_each(|((oc, qc), (&s, &z))| {
            let p = ChannelParams {
                scale: s,
                zero_point: z,
            };
            for (o, &q) in oc.iter_mut().zip(qc) {
                *o = dequantize_one(q, p);
            }
        });
    Ok(())
}

/// The scalar reference over a whole tensor (sequential; a test oracle).
pub fn quantize_ref(
    w: &[f32],
    layout: Layout,
    bits: u32,
    quantizer: Quantizer,
    mode: Mode,
) -> Result<(Vec<i8>, Vec<ChannelParams>, Flips), SquantError> {
    qparams::check_bits(bits)?;
    let n = layout.len();
    layout.validate(w.len(), n, layout.oc, layout.oc)?;
    let g = layout.channel_len();
    let mut codes = Vec::with_capacity(n);
    let mut params = Vec::with_capacity(layout.oc);
    let mut flips = Flips::default();
    for (o, wc) in w.chunks(g).enumerate() {
        let (q, p, kf, cf) =
            reference::quantize_channel_ref(wc, layout.ic, layout.k, bits, quantizer, mode, o)?;
        codes.extend(q);
        params.push(p);
        flips = flips
            + Flips {
                k: kf as u64,
                c: cf as u64,
            };
    }
    Ok((codes, params, flips))
}
