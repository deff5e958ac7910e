//! Bit packing of integer codes (the layout of `squant_rs.tensor.packing`).
//!
//! Codes of `b` bits live in `[-2^(b-1), 2^(b-1) - 1]` and are stored offset
//! to unsigned, `u = q + 2^(b-1)`, in row-major order: four per byte at 2
//! bits, two per byte at 3 and 4 bits, one per byte at 5..8 bits, the first
//! code of a byte in its lowest bits, the last byte zero-padded.

/// How many `bits`-bit codes one byte holds (4, 2 or 1).
pub fn codes_per_byte(bits: u32) -> usize {
    match bits {
        2 => 4,
        3 | 4 => 2,
        _ => 1,
    }
}

/// Bytes needed for `count` packed codes of `bits` bits.
pub fn packed_size(count: usize, bits: u32) -> usize {
    count.div_ceil(codes_per_byte(bits))
}

/// Appends `codes` packed to `out`. Only the last call for a tensor may pass
/// a count that is not a multiple of [`codes_per_byte`] (it is padded).
pub fn pack_into(codes: &[i8], bits: u32, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + packed_size(codes.len(), bits), 0);
    pack_slice(codes, bits, &mut out[at..]);
}

/// Packs `codes` (valid `bits`-bit codes) into `out`, exactly
/// `packed_size(codes.len(), bits)` bytes (the last one zero-padded).
/// Written for the compiler to vectorize: a few instructions per byte.
pub fn pack_slice(codes: &[i8], bits: u32, out: &mut [u8]) {
    let off = (1u16 << (bits - 1)) as u8;
    let u = |c: i8| (c as u8).wrapping_add(off);
    match codes_per_byte(bits) {
        1 => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = u(c);
            }
        }
        2 => {
            let mut pairs = codes.chunks_exact(2);
            for (o, c) in out.iter_mut().zip(&mut pairs) {
                *o = (u(c[0]) & 0x0f) | (u(c[1]) << 4);
            }
            if let [c] = pairs.remainder() {
                out[codes.len() / 2] = u(*c) & 0x0f;
            }
        }
        _ => {
            let mut quads = codes.chunks_exact(4);
            for (o, c) in out.iter_mut().zip(&mut quads) {
                *o = (u(c[0]) & 3) | ((u(c[1]) & 3) << 2) | ((u(c[2]) & 3) << 4) | (u(c[3]) << 6);
            }
            let rest = quads.remainder();
            if !rest.is_empty() {
                out[codes.len() / 4] = rest
                    .iter()
                    .enumerate()
                    .fold(0u8, |b, (j, &c)| b | ((u(c) & 3) << (2 * j)));
            }
        }
    }
}

/// The first code outside `[lo, hi]`, if any (a vectorizable scan first).
pub fn first_out_of_range(codes: &[i8], lo: i8, hi: i8) -> Option<i8> {
    let (mn, mx) = codes
        .iter()
        .fold((i8::MAX, i8::MIN), |(a, b), &c| (a.min(c), b.max(c)));
    if codes.is_empty() || (mn >= lo && mx <= hi) {
        return None;
    }
    codes.iter().copied().find(|&q| q < lo || q > hi)
}

/// Why packed bytes do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadCode;

/// Unpacks `out.len()` codes from `packed` (exactly
/// `packed_size(out.len(), bits)` bytes). Codes below `min_unsigned` (1 for
/// the symmetric quantizer, else 0) or above `2^bits - 1` are an error.
pub fn unpack_into(
    packed: &[u8],
    bits: u32,
    min_unsigned: u8,
    out: &mut [i8],
) -> Result<(), BadCode> {
    let per = codes_per_byte(bits);
    let width = 8 / per as u32;
    let mask = ((1u16 << width) - 1) as u8;
    let max = ((1u16 << bits) - 1) as u8;
    let offset = 1i16 << (bits - 1);
    let mut bad = false;
    for (chunk, &byte) in out.chunks_mut(per).zip(packed) {
        for (j, o) in chunk.iter_mut().enumerate() {
            let u = (byte >> (j as u32 * width)) & mask;
            bad |= u > max || u < min_unsigned;
            *o = (u as i16 - offset) as i8;
        }
    }
    if bad {
        Err(BadCode)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_python_packer() {
        let cases: [(u32, &[i8], &[u8]); 5] = [
            (4, &[-8, 7, 0], &[0xF0, 0x08]),
            (2, &[-2, -1, 0, 1, 1], &[0b1110_0100, 3]),
            (3, &[-4, 3, 0], &[0x70, 0x04]),
            (5, &[-16, 15], &[0, 31]),
            (8, &[-128, 127, 0], &[0, 255, 128]),
        ];
        for (bits, codes, want) in cases {
            let mut out = Vec::new();
            pack_into(codes, bits, &mut out);
            assert_eq!(out, want, "bits {bits}");
            let mut back = vec![0i8; codes.len()];
            unpack_into(&out, bits, 0, &mut back).unwrap();
            assert_eq!(back, codes);
        }
    }

    #[test]
    fn round_trip_every_width_and_count() {
        for bits in 2..=8u32 {
            for count in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 17, 1001] {
                let lo = -(1i32 << (bits - 1));
                let span = 1i32 << bits;
                let codes: Vec<i8> = (0..count)
                    .map(|i| (lo + (i as i32 * 7919) % span) as i8)
                    .collect();
                let mut packed = Vec::new();
                pack_into(&codes, bits, &mut packed);
                assert_eq!(packed.len(), packed_size(count, bits));
                let mut back = vec![0i8; count];
                unpack_into(&packed, bits, 0, &mut back).unwrap();
                assert_eq!(back, codes);
            }
        }
    }

    #[test]
    fn invalid_codes_are_found() {
        let mut out = [0i8; 2];
        assert_eq!(unpack_into(&[0x0F], 3, 0, &mut out), Err(BadCode));
        assert_eq!(unpack_into(&[0x00], 4, 1, &mut out), Err(BadCode));
        assert!(unpack_into(&[0x11], 4, 1, &mut out).is_ok());
    }
}
