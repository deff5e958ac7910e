//! The safetensors dtypes squant-rs stores, and conversions of the float
//! ones to and from float32 (little-endian bytes, any alignment).

pub use safetensors::Dtype;

/// Every dtype a squant-rs file may hold (those torch and numpy know).
pub const SUPPORTED: [Dtype; 15] = [
    Dtype::F64,
    Dtype::F32,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F8_E4M3,
    Dtype::F8_E5M2,
    Dtype::I64,
    Dtype::I32,
    Dtype::I16,
    Dtype::I8,
    Dtype::U64,
    Dtype::U32,
    Dtype::U16,
    Dtype::U8,
    Dtype::BOOL,
];

/// The safetensors name of a dtype (`"F32"`, `"BF16"`, ...).
pub fn name(d: Dtype) -> &'static str {
    match d {
        Dtype::F64 => "F64",
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::F8_E4M3 => "F8_E4M3",
        Dtype::F8_E5M2 => "F8_E5M2",
        Dtype::I64 => "I64",
        Dtype::I32 => "I32",
        Dtype::I16 => "I16",
        Dtype::I8 => "I8",
        Dtype::U64 => "U64",
        Dtype::U32 => "U32",
        Dtype::U16 => "U16",
        Dtype::U8 => "U8",
        Dtype::BOOL => "BOOL",
        _ => "unsupported",
    }
}

/// The supported dtype of that name.
pub fn from_name(s: &str) -> Option<Dtype> {
    SUPPORTED.iter().copied().find(|&d| name(d) == s)
}

/// Bytes per element of a supported dtype.
pub fn item_size(d: Dtype) -> usize {
    d.bitsize() / 8
}

/// Bytes of a tensor of `shape` with items of `item_size` bytes, or `None`
/// when numpy and torch could not make such a tensor: the item size times
/// the product of the dimensions, zeros counted as ones, must not exceed
/// `isize::MAX` (numpy's rule; torch's strides and storage size then fit
/// its 64-bit integers too). An empty tensor of shape `[0, 2^63]` holds no
/// byte, yet no reader could make it.
pub fn checked_nbytes(item_size: usize, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(item_size, |a, &d| a.checked_mul(d.max(1)))
        .filter(|&n| n <= isize::MAX as usize)?;
    Some(shape.iter().product::<usize>() * item_size)
}

/// Whether SQuant can quantize tensors of this dtype.
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Converts little-endian `src` of float dtype `d` into `dst` (one value
/// per element; `src.len() == dst.len() * item_size(d)`). float64 values
/// round to nearest, as numpy's `astype(float32)`.
pub fn to_f32(d: Dtype, src: &[u8], dst: &mut [f32]) {
    match d {
        Dtype::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Dtype::BF16 => bf16_to_f32(src, dst),
        Dtype::F64 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *o = f64::from_le_bytes(a) as f32;
            }
        }
        _ => dst.fill(f32::NAN),
    }
}

/// bfloat16 bytes to float32 (exact: the upper half of the bits).
fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { bf16_to_f32_avx2(src, dst) };
        }
    }
    bf16_to_f32_scalar(src, dst);
}

fn bf16_to_f32_scalar(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// [`bf16_to_f32_scalar`] 16 values per step (32-byte loads and stores).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_to_f32_avx2(src: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(src.len() / 2);
    let (src, dst) = (&src[..2 * n], &mut dst[..n]);
    let mut s = src.chunks_exact(32);
    let mut d = dst.chunks_exact_mut(16);
    let zero = _mm256_setzero_si256();
    for (sv, dv) in (&mut s).zip(&mut d) {
        // SAFETY: `sv` holds 32 bytes and `dv` 16 floats (exact chunks).
        unsafe {
            let v = _mm256_loadu_si256(sv.as_ptr().cast());
            // Interleaving with zeros below each value puts its 16 bits in
            // the upper half of a 32-bit lane (within each 128-bit half).
            let lo = _mm256_unpacklo_epi16(zero, v);
            let hi = _mm256_unpackhi_epi16(zero, v);
            // lo: values 0-3 and 8-11, hi: 4-7 and 12-15.
            let first = _mm256_permute2x128_si256(lo, hi, 0x20);
            let second = _mm256_permute2x128_si256(lo, hi, 0x31);
            _mm256_storeu_si256(dv.as_mut_ptr().cast(), first);
            _mm256_storeu_si256(dv.as_mut_ptr().add(8).cast(), second);
        }
    }
    bf16_to_f32_scalar(s.remainder(), d.into_remainder());
}

/// Largest finite float16, where dequantized values are clamped (as torch's
/// `cast_dequantized`: the grid's end points may lie just beyond the range).
const F16_MAX: f32 = 65504.0;

/// Writes float32 `v` as dtype `d` (little-endian) into `out`
/// (`item_size(d)` bytes); returns whether the stored value is finite.
/// Rounding is to nearest even, as torch's `.to(dtype)`.
#[inline]
pub fn store_f32(d: Dtype, v: f32, out: &mut [u8]) -> bool {
    match d {
        Dtype::F32 => {
            out.copy_from_slice(&v.to_le_bytes());
            v.is_finite()
        }
        Dtype::F64 => {
            out.copy_from_slice(&(v as f64).to_le_bytes());
            v.is_finite()
        }
        Dtype::F16 => {
            let h = half::f16::from_f32(v.clamp(-F16_MAX, F16_MAX));
            out.copy_from_slice(&h.to_bits().to_le_bytes());
            h.is_finite()
        }
        Dtype::BF16 => {
            let h = half::bf16::from_f32(v);
            out.copy_from_slice(&h.to_bits().to_le_bytes());
            h.is_finite()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_nbytes_refuses_what_numpy_cannot_make() {
        assert_eq!(checked_nbytes(4, &[3, 5]), Some(60));
        assert_eq!(checked_nbytes(4, &[]), Some(4));
        assert_eq!(checked_nbytes(4, &[0, 1 << 20]), Some(0));
        assert_eq!(checked_nbytes(4, &[0, 1 << 60]), Some(0));
        assert_eq!(checked_nbytes(1, &[0, isize::MAX as usize]), Some(0));
        // Zero elements, yet beyond numpy's and torch's limits.
        assert_eq!(checked_nbytes(4, &[0, 1 << 61]), None);
        assert_eq!(checked_nbytes(4, &[0, 1 << 63]), None);
        assert_eq!(checked_nbytes(1, &[0, 1 << 33, 1 << 33]), None);
        assert_eq!(checked_nbytes(8, &[1 << 31, 1 << 31, 0]), None);
        assert_eq!(checked_nbytes(4, &[1 << 61]), None);
        assert_eq!(checked_nbytes(1, &[usize::MAX]), None);
    }

    #[test]
    fn bf16_conversion_matches_scalar() {
        let src: Vec<u8> = (0..2 * 67u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for n in [0usize, 1, 15, 16, 17, 33, 67] {
            let (mut a, mut b) = (vec![0f32; n], vec![1f32; n]);
            bf16_to_f32_scalar(&src[..2 * n], &mut a);
            bf16_to_f32(&src[..2 * n], &mut b);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "n {n}");
        }
    }

    #[test]
    fn names_round_trip() {
        for d in SUPPORTED {
            assert_eq!(from_name(name(d)), Some(d));
        }
        assert_eq!(from_name("X32"), None);
        assert_eq!(from_name("C64"), None);
    }

    #[test]
    fn conversions() {
        let mut out = [0f32; 2];
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        to_f32(Dtype::BF16, &bf, &mut out);
        assert_eq!(out, [1.5, -2.0]);
        let f64s: Vec<u8> = [1e39f64, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        to_f32(Dtype::F64, &f64s, &mut out);
        assert!(out[0].is_infinite() && out[1] == 0.25);
        let mut b = [0u8; 2];
        assert!(store_f32(Dtype::F16, 70000.0, &mut b));
        assert_eq!(half::f16::from_le_bytes(b).to_f32(), 65504.0);
        assert!(!store_f32(Dtype::BF16, f32::MAX, &mut b));
    }
}
