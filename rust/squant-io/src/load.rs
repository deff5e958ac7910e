//! Loading and verifying squant-rs files in one parallel pass: the tensors
//! asked for are cut into pieces (a block of output channels of a quantized
//! weight, a megabyte of a plain tensor), and every piece is mapped, its
//! checksum computed, its codes unpacked, checked and dequantized straight
//! into its part of the caller's output, all pieces in parallel. The pieces'
//! checksums are then combined per stored tensor and every check is reported
//! in file order, as a sequential reader would: the first bad tensor is the
//! one named.

use std::cell::RefCell;

use rayon::prelude::*;
use squant_core::{dequantize_one, ChannelParams};

use crate::dtype::{self, Dtype};
use crate::error::{IoError, Result};
use crate::format::{Kind, Logical, QEntry, Quantizer, SquantFile, CODES, SCALE, ZERO_POINT};
use crate::pack::codes_per_byte;
use crate::read::{repr, Entry};

/// Codes per piece of a quantized weight (rounded to whole blocks of 4
/// channels; at least 4 channels).
const PIECE_CODES: usize = 1 << 18;
/// Bytes per piece of a plain tensor.
const PIECE_BYTES: usize = 1 << 20;

/// What one piece found.
#[derive(Default)]
struct Found {
    /// CRC32C of the piece's stored bytes (0 when not verifying).
    crc: u32,
    /// Stored bytes of the piece.
    len: usize,
    /// The mapping failed.
    os: Option<IoError>,
    /// Some packed code is not a valid code.
    bad_codes: bool,
    /// First output channel (of the tensor) that dequantizes to a value that
    /// is not finite in the stored dtype.
    non_finite: Option<usize>,
}

/// A piece of work.
struct Piece<'a> {
    /// Index into the request list.
    item: usize,
    entry: &'a Entry,
    /// Byte range of the stored tensor.
    start: usize,
    len: usize,
    out: Option<&'a mut [u8]>,
    /// For codes: the weight, its first channel, channel count, channel
    /// length and the pieces' parameters.
    codes: Option<CodesPiece<'a>>,
}

struct CodesPiece<'a> {
    q: &'a QEntry,
    ch0: usize,
    g: usize,
    scale: &'a [f32],
    zp: &'a [f32],
}

/// Per requested quantized tensor: its parameters (or why they are bad)
/// and the checksums of the scale and zero point.
struct Params {
    scale: Vec<f32>,
    zp: Vec<f32>,
    /// Why they are corrupt.
    bad: Option<String>,
    crcs: [(String, u32); 2],
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl SquantFile {
    /// Writes every tensor of `items` as it loads (see
    /// [`SquantFile::load_into`]) in one parallel pass; an `None` output
    /// only checks the tensor. Errors name the first bad tensor in the
    /// order of `items`.
    pub fn load_many(&self, items: Vec<(&Logical, Option<&mut [u8]>)>, verify: bool) -> Result<()> {
        let verify = verify && self.checksums.is_some();
        for (t, out) in &items {
            if let Some(o) = out {
                if o.len() != t.nbytes() {
                    return Err(IoError::InvalidArgument(format!(
                        "output for {} has {} bytes, expected {}",
                        repr(&t.name),
                        o.len(),
                        t.nbytes()
                    )));
                }
            }
        }
        // Parameters first (small), and the entries every piece reads.
        let mut params: Vec<Option<Params>> = Vec::with_capacity(items.len());
        for (t, _) in &items {
            params.push(match &t.kind {
                Kind::Plain { .. } => None,
                Kind::Quantized(_) => Some(self.params(&t.name, verify)?),
            });
        }
        let mut pieces = Vec::new();
        // Per request: the stored tensor whose checksum the pieces make up,
        // and the weight's metadata when quantized (to name errors).
        let mut stored: Vec<(String, Option<&QEntry>)> = Vec::with_capacity(items.len());
        for (item, ((t, out), p)) in items.into_iter().zip(&params).enumerate() {
            match (&t.kind, p) {
                (Kind::Quantized(q), Some(p)) => {
                    let entry = self.entry(&format!("{}{CODES}", t.name))?;
                    stored.push((entry.name.clone(), Some(q)));
                    self.plan_codes(item, q, entry, p, out, &mut pieces);
                }
                _ => {
                    let entry = self.entry(&t.name)?;
                    stored.push((entry.name.clone(), None));
                    plan_plain(item, entry, out, &mut pieces);
                }
            }
        }
        let found: Vec<(usize, Found)> = crate::quant::in_pool(self.pool.as_deref(), || {
            pieces
                .into_par_iter()
                .map(|p| (p.item, self.run(p, verify)))
                .collect()
        });
        // Report in order: per request, as a sequential reader finds it.
        let mut found = found.into_iter().peekable();
        for (item, (name, q)) in stored.iter().enumerate() {
            if let Some(p) = &params[item] {
                if let Some(why) = &p.bad {
                    return Err(IoError::format(self.st.path(), why));
                }
                if verify {
                    for (n, c) in &p.crcs {
                        self.check_crc(n, *c)?;
                    }
                }
            }
            let mut crc = 0u32;
            while let Some((_, f)) = found.next_if(|(i, _)| *i == item) {
                if let Some(e) = f.os {
                    return Err(e);
                }
                if let (Some(q), true) = (q, f.bad_codes || f.non_finite.is_some()) {
                    return Err(self.corrupt(name, q, f.non_finite));
                }
                if verify {
                    crc = crc_combine(crc, f.crc, f.len);
                }
            }
            if verify {
                self.check_crc(name, crc)?;
            }
        }
        Ok(())
    }

    /// The error of a piece of the codes `codes_name` with invalid codes
    /// (`channel` None) or a channel that dequantizes to non-finite values.
    fn corrupt(&self, codes_name: &str, q: &QEntry, channel: Option<usize>) -> IoError {
        let base = codes_name.strip_suffix(CODES).unwrap_or(codes_name);
        let what = match channel {
            None => format!(
                "corrupt codes for {} (packed codes hold values that are not {}-bit codes)",
                repr(base),
                q.bits
            ),
            Some(c) => format!(
                "corrupt scale or zero point for {} (output channel {c} dequantizes to values that are not finite in {})",
                repr(base),
                dtype::name(q.dtype)
            ),
        };
        IoError::format(self.st.path(), what)
    }

    /// The scale and zero point of quantized weight `name`, checked.
    fn params(&self, name: &str, verify: bool) -> Result<Params> {
        let (scale_name, zp_name) = (format!("{name}{SCALE}"), format!("{name}{ZERO_POINT}"));
        let (scale, scale_crc) = self.load_f32s(&scale_name, verify)?;
        let (zp, zp_crc) = self.load_f32s(&zp_name, verify)?;
        let symmetric = self.quantizer == Quantizer::Symmetric;
        let ok = scale
            .iter()
            .zip(&zp)
            .all(|(&s, &z)| s.is_finite() && s > 0.0 && z.is_finite() && (!symmetric || z == 0.0));
        let bad = (!ok).then(|| format!("corrupt scale or zero point for {}", repr(name)));
        Ok(Params {
            scale,
            zp,
            bad,
            crcs: [(scale_name, scale_crc), (zp_name, zp_crc)],
        })
    }

    /// A float32 tensor's values and the CRC32C of its bytes.
    fn load_f32s(&self, name: &str, verify: bool) -> Result<(Vec<f32>, u32)> {
        let e = self.entry(name)?;
        let region = self.st.map_all(e)?;
        let mut v = vec![0f32; e.numel()];
        dtype::to_f32(Dtype::F32, &region, &mut v);
        let crc = if verify { crc32c::crc32c(&region) } else { 0 };
        Ok((v, crc))
    }

    fn plan_codes<'a>(
        &self,
        item: usize,
        q: &'a QEntry,
        entry: &'a Entry,
        p: &'a Params,
        mut out: Option<&'a mut [u8]>,
        pieces: &mut Vec<Piece<'a>>,
    ) {
        let oc = q.shape[0];
        let g: usize = q.shape[1..].iter().product();
        let isz = dtype::item_size(q.dtype);
        let cpb = codes_per_byte(q.bits);
        // Pieces of a multiple of 4 channels start on a byte of the codes.
        let per = (PIECE_CODES / g).max(1).next_multiple_of(4);
        let mut ch0 = 0;
        while ch0 < oc {
            let n_ch = per.min(oc - ch0);
            let start = ch0 * g / cpb;
            let len = if ch0 + n_ch == oc {
                entry.nbytes() - start
            } else {
                n_ch * g / cpb
            };
            let piece_out = split_front(&mut out, n_ch * g * isz);
            pieces.push(Piece {
                item,
                entry,
                start,
                len,
                out: piece_out,
                codes: Some(CodesPiece {
                    q,
                    ch0,
                    g,
                    scale: &p.scale[ch0..ch0 + n_ch],
                    zp: &p.zp[ch0..ch0 + n_ch],
                }),
            });
            ch0 += n_ch;
        }
    }

    /// Maps, checksums, checks and (with an output) dequantizes one piece.
    fn run(&self, p: Piece<'_>, verify: bool) -> Found {
        let mut found = Found {
            len: p.len,
            ..Found::default()
        };
        let region = match self.st.map(p.entry, p.start, p.len) {
            Ok(r) => r,
            Err(e) => {
                found.os = Some(e);
                return found;
            }
        };
        if verify {
            found.crc = crc32c::crc32c(&region);
        }
        match p.codes {
            None => {
                if let Some(o) = p.out {
                    o.copy_from_slice(&region);
                }
            }
            Some(c) => {
                let symmetric = self.quantizer == Quantizer::Symmetric;
                let n = c.scale.len() * c.g;
                SCRATCH.with(|s| {
                    let mut codes = s.borrow_mut();
                    codes.resize(n, 0);
                    unpack(&region, c.q.bits, &mut codes);
                    // Only widths with room for invalid values are checked
                    // (e.g. 3 bits in a 4-bit field; code 0 when symmetric).
                    let max = ((1u16 << c.q.bits) - 1) as u8;
                    let field_max = ((1u16 << (8 / codes_per_byte(c.q.bits))) - 1) as u8;
                    let (check_lo, check_hi) = (symmetric, max < field_max);
                    if check_lo || check_hi {
                        let (lo, hi) = codes
                            .iter()
                            .fold((u8::MAX, 0u8), |(a, b), &u| (a.min(u), b.max(u)));
                        if n > 0 && ((check_hi && hi > max) || (check_lo && lo < 1)) {
                            found.bad_codes = true;
                            return;
                        }
                    }
                    found.non_finite =
                        dequantize_piece(c.q, c.g, c.scale, c.zp, &codes, p.out).map(|j| c.ch0 + j);
                });
            }
        }
        found
    }
}

fn plan_plain<'a>(
    item: usize,
    entry: &'a Entry,
    mut out: Option<&'a mut [u8]>,
    pieces: &mut Vec<Piece<'a>>,
) {
    let mut start = 0;
    // An empty tensor still gets a piece (its checksum is that of no bytes).
    loop {
        let len = PIECE_BYTES.min(entry.nbytes() - start);
        let piece_out = split_front(&mut out, len);
        pieces.push(Piece {
            item,
            entry,
            start,
            len,
            out: piece_out,
            codes: None,
        });
        start += len;
        if start >= entry.nbytes() {
            break;
        }
    }
}

/// Unpacks `out.len()` unsigned codes (`code + 2^(bits-1)`) from `packed`
/// (the layout of [`crate::pack`]; padding bits are ignored).
fn unpack(packed: &[u8], bits: u32, out: &mut [u8]) {
    match codes_per_byte(bits) {
        1 => out.copy_from_slice(&packed[..out.len()]),
        2 => {
            let mut chunks = out.chunks_exact_mut(2);
            for (o, &b) in (&mut chunks).zip(packed) {
                o[0] = b & 0x0f;
                o[1] = b >> 4;
            }
            let rest = chunks.into_remainder();
            if let Some(r) = rest.first_mut() {
                *r = packed[packed.len() - 1] & 0x0f;
            }
        }
        _ => {
            let mut chunks = out.chunks_exact_mut(4);
            for (o, &b) in (&mut chunks).zip(packed) {
                o[0] = b & 3;
                o[1] = (b >> 2) & 3;
                o[2] = (b >> 4) & 3;
                o[3] = b >> 6;
            }
            let rest = chunks.into_remainder();
            if !rest.is_empty() {
                let b = packed[packed.len() - 1];
                for (j, r) in rest.iter_mut().enumerate() {
                    *r = (b >> (2 * j)) & 3;
                }
            }
        }
    }
}

/// Dequantizes the (valid, unsigned) `codes` of a block of channels into
/// `out` (or only checks them); returns the first channel of the block
/// whose values are not all finite in the stored dtype.
pub(crate) fn dequantize_piece(
    q: &QEntry,
    g: usize,
    scale: &[f32],
    zp: &[f32],
    codes: &[u8],
    out: Option<&mut [u8]>,
) -> Option<usize> {
    match dtype::item_size(q.dtype) {
        2 => channels::<2>(q, g, scale, zp, codes, out),
        4 => channels::<4>(q, g, scale, zp, codes, out),
        _ => channels::<8>(q, g, scale, zp, codes, out),
    }
}

fn channels<const N: usize>(
    q: &QEntry,
    g: usize,
    scale: &[f32],
    zp: &[f32],
    codes: &[u8],
    mut out: Option<&mut [u8]>,
) -> Option<usize> {
    let levels = 1usize << q.bits;
    let offset = 1i32 << (q.bits - 1);
    let mut lut = [[0u8; N]; 256];
    let mut finite = [true; 256];
    let mut first_bad = None;
    for (j, ((&s, &z), qc)) in scale.iter().zip(zp).zip(codes.chunks(g)).enumerate() {
        let p = ChannelParams {
            scale: s,
            zero_point: z,
        };
        let value = |u: usize| dequantize_one((u as i32 - offset) as i8, p);
        // Values grow with the code (a positive scale, monotonic roundings):
        // when the two ends of the code range are finite, all are.
        let mut end = [0u8; N];
        let all_finite = dtype::store_f32(q.dtype, value(0), &mut end)
            && dtype::store_f32(q.dtype, value(levels - 1), &mut end);
        let o = out
            .as_deref_mut()
            .map(|o| &mut o[j * g * N..(j + 1) * g * N]);
        // Each value as `dequantize_one` gives it (bit-identical to the
        // core), from a table of the channel's 2^bits values when the
        // channel is long enough to pay for it, or when some are not finite.
        if g >= levels || !all_finite {
            for u in 0..levels {
                finite[u] = dtype::store_f32(q.dtype, value(u), &mut lut[u]);
            }
            if let Some(o) = o {
                for (d, &u) in o.chunks_exact_mut(N).zip(qc) {
                    d.copy_from_slice(&lut[u as usize]);
                }
            }
        } else if let Some(o) = o {
            for (d, &u) in o.chunks_exact_mut(N).zip(qc) {
                dtype::store_f32(q.dtype, value(u as usize), d);
            }
        }
        if !all_finite && first_bad.is_none() && !qc.iter().all(|&u| finite[u as usize]) {
            first_bad = Some(j);
        }
    }
    first_bad
}

/// The first `n` bytes of the output still to hand out (None when there is
/// no output); `out` keeps the rest.
fn split_front<'a>(out: &mut Option<&'a mut [u8]>, n: usize) -> Option<&'a mut [u8]> {
    out.take().map(|o| {
        let (a, b) = o.split_at_mut(n);
        *out = Some(b);
        a
    })
}

/// CRC32C reflected polynomial.
const POLY: u32 = 0x82f6_3b78;

/// `a * b` modulo the CRC polynomial (reflected bit order, as zlib's
/// `multmodp`).
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `x^(2^k)` modulo the polynomial, k = 0..32.
const fn x2n_table() -> [u32; 32] {
    let mut t = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    t[0] = p;
    let mut k = 1;
    while k < 32 {
        p = mult_mod_p(p, p);
        t[k] = p;
        k += 1;
    }
    t
}

static X2N: [u32; 32] = x2n_table();

/// The CRC32C of `A ++ B` from `crc1 = crc(A)`, `crc2 = crc(B)` and B's
/// length: a few dozen carry-less products instead of the matrix powers of
/// `crc32c::crc32c_combine` (same result, tested).
fn crc_combine(crc1: u32, crc2: u32, len2: usize) -> u32 {
    // x^(8 * len2) mod P, from the powers x^(2^k).
    let mut xp = 1u32 << 31; // x^0
    let mut n = len2 as u64;
    let mut k = 3;
    while n != 0 {
        if n & 1 != 0 {
            xp = mult_mod_p(X2N[k & 31], xp);
        }
        n >>= 1;
        k += 1;
    }
    mult_mod_p(xp, crc1) ^ crc2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_matches_the_crate() {
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for cut in [0usize, 1, 7, 8, 4096, 65_537, 99_999, 100_000] {
            let (a, b) = data.split_at(cut);
            let (c1, c2) = (crc32c::crc32c(a), crc32c::crc32c(b));
            assert_eq!(
                crc_combine(c1, c2, b.len()),
                crc32c::crc32c(&data),
                "cut {cut}"
            );
            assert_eq!(
                crc_combine(c1, c2, b.len()),
                crc32c::crc32c_combine(c1, c2, b.len())
            );
        }
        assert_eq!(crc_combine(0, 0, 0), 0);
    }

    #[test]
    fn unpack_every_width() {
        let packed = [0xa5u8, 0x3c];
        let mut out = [0u8; 3];
        unpack(&packed, 4, &mut out);
        assert_eq!(out, [5, 10, 12]);
        let mut out = [0u8; 5];
        unpack(&packed, 2, &mut out);
        assert_eq!(out, [1, 1, 2, 2, 0]);
        let mut out = [0u8; 2];
        unpack(&packed, 8, &mut out);
        assert_eq!(out, packed);
    }
}
