//! The squant-rs file format on top of safetensors (see `docs/format.md`):
//! strict reading of its metadata, dequantization with checksum
//! verification, and the writer of packed files.

use std::collections::HashMap;
use std::path::Path;

use serde::de::MapAccess;
use serde_json::Value;
use squant_core::Mode;

use crate::dtype::{self, Dtype};
use crate::error::{IoError, Result};
use crate::json::{self, Ints, Key, Keys, Pairs, Read, Text, Typed, UInt, UInts, Walk};
use crate::pack::{codes_per_byte, pack_into, packed_size};
use crate::read::{repr, too_many_dims, Entry, SafetensorsFile, MAX_DIMS};
use crate::write::{Planned, Writer, CHECKSUMS_KEY};

/// `format` metadata value.
pub const FORMAT_NAME: &str = "squant-rs";
/// The format version written and read (version rules: `docs/format.md`).
pub const FORMAT_VERSION: &str = "1";
/// Suffixes of the three stored tensors of one quantized weight.
pub const CODES: &str = ":codes";
pub const SCALE: &str = ":scale";
pub const ZERO_POINT: &str = ":zero_point";
const SUFFIXES: [&str; 3] = [CODES, SCALE, ZERO_POINT];
/// The writer's version, stored as `squant_rs_version`.
pub const WRITER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How codes map to values (metadata key `quantizer`; absent: asymmetric):
/// squant-core's quantizer, re-exported.
pub use squant_core::Quantizer;

/// One quantized weight's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QEntry {
    pub bits: u32,
    pub mode: Mode,
    pub shape: Vec<usize>,
    /// The original dtype (F32, F16, BF16 or F64), restored on load.
    pub dtype: Dtype,
}

/// A tensor of the state dict a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Plain { dtype: Dtype, shape: Vec<usize> },
    Quantized(QEntry),
}

/// One logical tensor of a squant-rs file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logical {
    pub name: String,
    pub kind: Kind,
    /// Bytes stored (codes + scale + zero point when quantized).
    pub stored_bytes: usize,
}

impl Logical {
    /// The dtype it loads as.
    pub fn dtype(&self) -> Dtype {
        match &self.kind {
            Kind::Plain { dtype, .. } => *dtype,
            Kind::Quantized(q) => q.dtype,
        }
    }

    /// The shape it loads as.
    pub fn shape(&self) -> &[usize] {
        match &self.kind {
            Kind::Plain { shape, .. } => shape,
            Kind::Quantized(q) => &q.shape,
        }
    }

    /// Bytes of the loaded tensor.
    pub fn nbytes(&self) -> usize {
        self.shape().iter().product::<usize>() * dtype::item_size(self.dtype())
    }
}

/// An open, fully checked squant-rs file (header only).
pub struct SquantFile {
    pub st: SafetensorsFile,
    pub tensors: Vec<Logical>,
    pub quantizer: Quantizer,
    pub format_version: String,
    pub writer_version: String,
    /// Stored tensor name -> CRC32C (`None`: a file written before checksums).
    pub checksums: Option<HashMap<String, u32>>,
    /// Pool of the parallel dequantization (`None`: the current pool).
    pub pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

fn mode_of(s: &str) -> Option<Mode> {
    Mode::ALL.into_iter().find(|m| m.as_str() == s)
}

/// The fields of a `quantized` entry as read (`None` for a field that is
/// missing or not of its type; `codes_per_byte`: the integer, or the value
/// shown).
#[derive(Default)]
struct QFields {
    bits: Option<u64>,
    mode: Option<String>,
    shape: Option<Ints>,
    dtype: Option<String>,
    codes_per_byte: Option<std::result::Result<u64, String>>,
}

/// The `quantized` table: each weight's name and its entry or what is
/// wrong with it, in table order (`None`: not an object).
const TABLE_READER: Pairs<QEntryReader> = Pairs(QEntryReader);

/// A `quantized` entry, or what is wrong with it.
#[derive(Clone, Copy)]
struct QEntryReader;

impl<'de> Typed<'de> for QEntryReader {
    type Out = std::result::Result<QEntry, String>;
    fn other(self, _: String) -> Self::Out {
        Err("not a JSON object".to_string())
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Out, A::Error> {
        let mut f = QFields::default();
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            match key.as_ref() {
                "bits" => f.bits = map.next_value_seed(Read(UInt::<false>))?.ok(),
                "mode" => f.mode = map.next_value_seed(Read(Text::<false>))?.ok(),
                // Past `MAX_DIMS` dimensions only counted (see `parse_entry`).
                "shape" => f.shape = map.next_value_seed(Read(UInts(MAX_DIMS)))?,
                "dtype" => f.dtype = map.next_value_seed(Read(Text::<false>))?.ok(),
                "codes_per_byte" => {
                    f.codes_per_byte = Some(map.next_value_seed(Read(UInt::<true>))?)
                }
                _ => map.next_value_seed(Walk(None))?,
            }
            keys.insert(key)?;
        }
        Ok(parse_entry(f))
    }
}

fn parse_entry(info: QFields) -> std::result::Result<QEntry, String> {
    let bits = info
        .bits
        .filter(|b| (2..=8).contains(b))
        .ok_or("bits must be an integer in 2..8")? as u32;
    let mode_s = info.mode.ok_or("mode must be a string")?;
    let mode = mode_of(&mode_s).ok_or_else(|| format!("unknown mode {}", repr(&mode_s)))?;
    let shape = info
        .shape
        .filter(|s| s.len >= 2 && !s.zero)
        .ok_or("shape must list 2 or more positive dimensions")?;
    check_dims(shape.len)?;
    let shape = shape.values;
    check_shape(&shape)?;
    let dtype = info
        .dtype
        .as_deref()
        .and_then(dtype::from_name)
        .filter(|&d| dtype::is_float(d))
        .ok_or("dtype must be F32, F16, BF16 or F64")?;
    match info.codes_per_byte {
        None => {}
        Some(Ok(v)) if v == codes_per_byte(bits) as u64 => {}
        Some(v) => {
            let shown = v.map_or_else(|shown| shown, |v| v.to_string());
            return Err(format!(
                "codes_per_byte {shown} does not match {bits} bits (expected {})",
                codes_per_byte(bits)
            ));
        }
    }
    Ok(QEntry {
        bits,
        mode,
        shape,
        dtype,
    })
}

/// A quantized weight's shape of `n` dimensions: at most [`MAX_DIMS`].
fn check_dims(n: usize) -> std::result::Result<(), String> {
    too_many_dims(n).map_or(Ok(()), |why| Err(format!("shape {why}")))
}

/// The limits of a quantized weight's shape (whatever its dtype): at most
/// [`MAX_DIMS`] dimensions and, as float64, a tensor numpy and torch can
/// make.
fn check_shape(shape: &[usize]) -> std::result::Result<(), String> {
    check_dims(shape.len())?;
    dtype::checked_nbytes(8, shape)
        .map(|_| ())
        .ok_or_else(|| "shape is too large".to_string())
}

/// The `checksums` table: stored name -> CRC32C, or the first entry that
/// is not 8 hex digits (`None`: not an object).
struct ChecksumsReader;

impl<'de> Typed<'de> for ChecksumsReader {
    type Out = Option<std::result::Result<HashMap<String, u32>, String>>;
    fn other(self, _: String) -> Self::Out {
        None
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Out, A::Error> {
        let mut out = Ok(HashMap::new());
        let mut keys = Keys::default();
        while let Some(Key(name)) = map.next_key()? {
            let crc = map
                .next_value_seed(Read(Text::<false>))?
                .ok()
                .filter(|s| s.len() == 8)
                .and_then(|s| u32::from_str_radix(&s, 16).ok());
            if let Ok(table) = &mut out {
                match crc {
                    Some(crc) => {
                        table.insert(name.to_string(), crc);
                    }
                    None => out = Err(format!("checksum of {} is not 8 hex digits", repr(&name))),
                }
            }
            keys.insert(name)?;
        }
        Ok(Some(out))
    }
}

fn parse_checksums(text: &str) -> std::result::Result<HashMap<String, u32>, String> {
    json::parse_with(text, ChecksumsReader)?.ok_or_else(|| "not a JSON object".to_string())?
}

/// The name of the quantized weight a stored name belongs to, if it has a
/// reserved suffix.
pub fn base_of(name: &str) -> Option<&str> {
    SUFFIXES.iter().find_map(|s| name.strip_suffix(s))
}

impl SquantFile {
    /// Opens and checks a squant-rs file (reads the header only).
    pub fn open(path: &Path) -> Result<SquantFile> {
        let st = SafetensorsFile::open(path)?;
        let fail = |what: String| IoError::format(path, what);
        if st.meta("format") != Some(FORMAT_NAME) {
            return Err(fail(
                "not a squant-rs file (a safetensors file without squant-rs metadata)".to_string(),
            ));
        }
        let version = st.meta("format_version");
        if version != Some(FORMAT_VERSION) {
            return Err(fail(format!(
                "unsupported squant-rs format version {} (this squant-rs {WRITER_VERSION} reads version {FORMAT_VERSION})",
                version.map_or("None".to_string(), repr)
            )));
        }
        let quantizer = match st.meta("quantizer") {
            None | Some("asymmetric") => Quantizer::Asymmetric,
            Some("symmetric") => Quantizer::Symmetric,
            Some(other) => {
                return Err(fail(format!(
                    "corrupt squant-rs metadata (unknown quantizer {})",
                    repr(other)
                )))
            }
        };
        let table = match st.meta("quantized") {
            None => {
                if let Some(e) = st.entries.iter().find(|e| base_of(&e.name).is_some()) {
                    return Err(fail(format!(
                        "corrupt squant-rs metadata (no 'quantized' table, but tensor {} is named like a part of a quantized weight)",
                        repr(&e.name)
                    )));
                }
                Vec::new()
            }
            Some(text) => match json::parse_with(text, TABLE_READER) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(fail(
                        "corrupt squant-rs metadata (not a JSON object)".to_string(),
                    ))
                }
                Err(e) if json::is_duplicate(&e) => {
                    return Err(fail(format!("corrupt squant-rs metadata ({e})")))
                }
                Err(_) => {
                    return Err(fail(
                        "corrupt squant-rs metadata (not valid JSON)".to_string(),
                    ))
                }
            },
        };
        let mut quantized: HashMap<String, QEntry> = HashMap::with_capacity(table.len());
        for (name, q) in table {
            let q = q.map_err(|why| {
                fail(format!(
                    "corrupt squant-rs metadata for {} ({why})",
                    repr(&name)
                ))
            })?;
            let part = |s: &str| st.get(&format!("{name}{s}"));
            let (Some(codes), Some(scale), Some(zp)) = (part(CODES), part(SCALE), part(ZERO_POINT))
            else {
                return Err(fail(format!(
                    "quantized tensor {} is missing its codes, scale or zero point",
                    repr(&name)
                )));
            };
            let numel: usize = q.shape.iter().product();
            let oc = q.shape[0];
            let ok = codes.dtype == Dtype::U8
                && codes.shape == [packed_size(numel, q.bits)]
                && scale.dtype == Dtype::F32
                && scale.shape == [oc]
                && zp.dtype == Dtype::F32
                && zp.shape == [oc];
            if !ok {
                return Err(fail(format!(
                    "quantized tensor {} has codes, scale or zero point of the wrong size",
                    repr(&name)
                )));
            }
            if st.get(&name).is_some() {
                return Err(fail(format!(
                    "tensor {} is stored both quantized and unchanged",
                    repr(&name)
                )));
            }
            quantized.insert(name, q);
        }
        let mut tensors = Vec::with_capacity(st.entries.len());
        for e in &st.entries {
            if let Some(base) = base_of(&e.name) {
                let Some(q) = quantized.get(base) else {
                    return Err(fail(format!(
                        "corrupt squant-rs metadata (tensor {} is named like a part of a quantized weight, but {} is not in the 'quantized' table)",
                        repr(&e.name),
                        repr(base)
                    )));
                };
                if e.name.ends_with(CODES) {
                    let stored = SUFFIXES
                        .iter()
                        .filter_map(|s| st.get(&format!("{base}{s}")))
                        .map(Entry::nbytes)
                        .sum();
                    tensors.push(Logical {
                        name: base.to_string(),
                        kind: Kind::Quantized(q.clone()),
                        stored_bytes: stored,
                    });
                }
            } else {
                tensors.push(Logical {
                    name: e.name.clone(),
                    kind: Kind::Plain {
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                    },
                    stored_bytes: e.nbytes(),
                });
            }
        }
        let checksums = match st.meta(CHECKSUMS_KEY) {
            None => None,
            Some(text) => {
                let table = parse_checksums(text).map_err(|why| {
                    fail(format!(
                        "corrupt squant-rs metadata (checksum table: {why})"
                    ))
                })?;
                let covers = table.len() == st.entries.len()
                    && st.entries.iter().all(|e| table.contains_key(&e.name));
                if !covers {
                    return Err(fail(
                        "corrupt squant-rs metadata (the checksum table does not list exactly the stored tensors)"
                            .to_string(),
                    ));
                }
                Some(table)
            }
        };
        let format_version = FORMAT_VERSION.to_string();
        let writer_version = st
            .meta("squant_rs_version")
            .unwrap_or("unknown")
            .to_string();
        Ok(SquantFile {
            st,
            tensors,
            quantizer,
            format_version,
            writer_version,
            checksums,
            pool: None,
        })
    }

    pub(crate) fn check_crc(&self, name: &str, crc: u32) -> Result<()> {
        match self.checksums.as_ref().and_then(|t| t.get(name)) {
            Some(&want) if want != crc => Err(IoError::format(
                self.st.path(),
                format!(
                    "checksum mismatch in tensor {} (stored {want:08x}, data has {crc:08x}): the file is corrupt",
                    repr(name)
                ),
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn entry(&self, name: &str) -> Result<&Entry> {
        self.st.get(name).ok_or_else(|| {
            IoError::format(self.st.path(), format!("tensor {} is missing", repr(name)))
        })
    }

    /// Writes tensor `t` as it loads (its dtype, little-endian, row-major)
    /// into `out` (`t.nbytes()` bytes), or only checks it when `out` is
    /// `None`. Checksums are verified when the file has them and `verify`
    /// is set; codes, scales and zero points are always checked. Several
    /// tensors at once: [`SquantFile::load_many`] (one parallel pass).
    pub fn load_into(&self, t: &Logical, out: Option<&mut [u8]>, verify: bool) -> Result<()> {
        self.load_many(vec![(t, out)], verify)
    }

    /// Checks every tensor (checksums, codes, scales, zero points) without
    /// keeping anything, in one parallel pass: `info --verify`.
    pub fn verify(&self) -> Result<()> {
        self.load_many(self.tensors.iter().map(|t| (t, None)).collect(), true)
    }
}

/// A squant-rs file being written: the state dict's tensors in order, each
/// stored unchanged or quantized (codes packed on the way). It refuses
/// anything [`SquantFile::open`] and the loader would reject (names that
/// clash, shapes too large, codes, scales or zero points that are not
/// valid), so a file it completes always loads.
pub struct SquantWriter {
    w: Writer,
    slots: Vec<Slot>,
    quantizer: Quantizer,
}

/// One logical tensor of a [`SquantWriter`].
struct Slot {
    name: String,
    /// Stored indices (plain: one; quantized: codes, scale, zero point).
    at: Vec<usize>,
    /// The quantized weight's metadata (`None`: plain).
    q: Option<QEntry>,
    /// Codes given so far (quantized).
    codes: usize,
}

impl Slot {
    fn bits(&self) -> u32 {
        self.q.as_ref().map_or(0, |q| q.bits)
    }
}

impl SquantWriter {
    /// Plans the file: `tensors` in state-dict order. Names are checked:
    /// none may end in a reserved suffix or clash with a quantized part
    /// (`w` and `w:codes` both quantized would store `w:codes` twice over:
    /// as a weight and as the codes of `w`).
    pub fn create(target: &Path, tensors: &[(String, Kind)], quantizer: Quantizer) -> Result<Self> {
        let mut names: HashMap<&str, usize> = HashMap::with_capacity(tensors.len());
        for (i, (name, _)) in tensors.iter().enumerate() {
            if names.insert(name.as_str(), i).is_some() {
                return Err(IoError::InvalidArgument(format!(
                    "two tensors are named {}",
                    repr(name)
                )));
            }
        }
        let quantized_base = |base: &str| {
            matches!(
                names.get(base).map(|&j| &tensors[j].1),
                Some(Kind::Quantized(_))
            )
        };
        let clash = |base: &str, name: &str| {
            IoError::InvalidArgument(format!(
                "cannot quantize {}: the state dict already has a tensor named {}",
                repr(base),
                repr(name)
            ))
        };
        let mut planned = Vec::with_capacity(tensors.len() + 8);
        let mut table = serde_json::Map::new();
        let mut slots = Vec::with_capacity(tensors.len());
        for (name, kind) in tensors {
            match kind {
                Kind::Plain { dtype, shape } => {
                    if let Some(base) = base_of(name) {
                        if quantized_base(base) {
                            return Err(clash(base, name));
                        }
                        return Err(IoError::InvalidArgument(format!(
                            "tensor name {} ends in {}, which squant-rs files reserve for quantized weights",
                            repr(name),
                            repr(&name[base.len()..])
                        )));
                    }
                    slots.push(Slot {
                        name: name.clone(),
                        at: vec![planned.len()],
                        q: None,
                        codes: 0,
                    });
                    planned.push(Planned {
                        name: name.clone(),
                        dtype: *dtype,
                        shape: shape.clone(),
                    });
                }
                Kind::Quantized(q) => {
                    if let Some(base) = base_of(name).filter(|b| quantized_base(b)) {
                        return Err(clash(base, name));
                    }
                    if q.shape.len() < 2 || q.shape.contains(&0) || !dtype::is_float(q.dtype) {
                        return Err(IoError::InvalidArgument(format!(
                            "cannot quantize {}: not a floating tensor of 2+ dimensions with elements",
                            repr(name)
                        )));
                    }
                    check_shape(&q.shape).map_err(|why| {
                        IoError::InvalidArgument(format!("cannot quantize {}: {why}", repr(name)))
                    })?;
                    squant_core::qparams::check_bits(q.bits)
                        .map_err(|e| IoError::InvalidArgument(e.to_string()))?;
                    let numel: usize = q.shape.iter().product();
                    let at = planned.len();
                    slots.push(Slot {
                        name: name.clone(),
                        at: vec![at, at + 1, at + 2],
                        q: Some(q.clone()),
                        codes: 0,
                    });
                    planned.push(Planned {
                        name: format!("{name}{CODES}"),
                        dtype: Dtype::U8,
                        shape: vec![packed_size(numel, q.bits)],
                    });
                    for s in [SCALE, ZERO_POINT] {
                        planned.push(Planned {
                            name: format!("{name}{s}"),
                            dtype: Dtype::F32,
                            shape: vec![q.shape[0]],
                        });
                    }
                    table.insert(
                        name.clone(),
                        serde_json::json!({
                            "bits": q.bits,
                            "mode": q.mode.as_str(),
                            "shape": q.shape,
                            "dtype": dtype::name(q.dtype),
                            "codes_per_byte": codes_per_byte(q.bits),
                        }),
                    );
                }
            }
        }
        let mut metadata = vec![
            ("format".to_string(), FORMAT_NAME.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("squant_rs_version".to_string(), WRITER_VERSION.to_string()),
            ("quantized".to_string(), Value::Object(table).to_string()),
        ];
        if quantizer != Quantizer::Asymmetric {
            metadata.push(("quantizer".to_string(), quantizer.as_str().to_string()));
        }
        let w = Writer::create(target, &planned, &metadata, true)?;
        Ok(SquantWriter {
            w,
            slots,
            quantizer,
        })
    }

    fn slot(&self, i: usize, quantized: bool) -> Result<&Slot> {
        self.slots
            .get(i)
            .filter(|s| s.q.is_some() == quantized)
            .ok_or_else(|| {
                IoError::InvalidArgument(format!(
                    "tensor {i} is not a {} tensor of this file",
                    if quantized { "quantized" } else { "plain" }
                ))
            })
    }

    /// Appends raw bytes of plain tensor `i`.
    pub fn write_plain(&mut self, i: usize, bytes: &[u8]) -> Result<()> {
        let at = self.slot(i, false)?.at[0];
        self.w.write(at, bytes)
    }

    /// The range of valid codes of `bits` bits for this file's quantizer
    /// (the symmetric one never uses -2^(bits-1)).
    fn code_range(&self, bits: u32) -> (i8, i8) {
        let lo = -(1i16 << (bits - 1)) + i16::from(self.quantizer == Quantizer::Symmetric);
        let hi = (1i16 << (bits - 1)) - 1;
        (lo as i8, hi as i8)
    }

    /// Checks `codes` as the next codes of quantized tensor `i`: their
    /// range, and their count (never more than the weight has; every part
    /// but the last a multiple of 4 codes).
    fn check_codes(&self, i: usize, codes: &[i8]) -> Result<()> {
        let s = self.slot(i, true)?;
        let bits = s.bits();
        let (lo, hi) = self.code_range(bits);
        if let Some(q) = crate::pack::first_out_of_range(codes, lo, hi) {
            let which = if self.quantizer == Quantizer::Symmetric {
                " (symmetric quantizer)"
            } else {
                ""
            };
            return Err(IoError::InvalidArgument(format!(
                "codes out of range for {bits} bits{which}: expected values in [{lo}, {hi}], got {q}"
            )));
        }
        let numel: usize = s.q.as_ref().map_or(0, |q| q.shape.iter().product());
        let given = s.codes + codes.len();
        if given > numel {
            return Err(IoError::InvalidArgument(format!(
                "tensor {}: {given} codes given for its {numel} elements",
                repr(&s.name)
            )));
        }
        if given < numel && !codes.len().is_multiple_of(4) {
            return Err(IoError::InvalidArgument(format!(
                "tensor {}: {} codes given, not a multiple of 4 and not the last of its {numel}",
                repr(&s.name),
                codes.len()
            )));
        }
        Ok(())
    }

    /// Appends codes of quantized tensor `i` (row-major). Every call but the
    /// last of a tensor must pass a multiple of 4 codes. Codes out of range
    /// (including -2^(bits-1) for the symmetric quantizer) and more codes
    /// than the weight has are refused.
    pub fn write_codes(&mut self, i: usize, codes: &[i8], packed: &mut Vec<u8>) -> Result<()> {
        self.check_codes(i, codes)?;
        let (at, bits) = {
            let s = &self.slots[i];
            (s.at[0], s.bits())
        };
        packed.clear();
        pack_into(codes, bits, packed);
        self.w.write(at, packed)?;
        self.slots[i].codes += codes.len();
        Ok(())
    }

    /// Appends codes of quantized tensor `i` already packed (see
    /// [`crate::pack::pack_slice`]; the caller guarantees valid codes).
    pub fn write_packed(&mut self, i: usize, packed: &[u8]) -> Result<()> {
        let at = self.slot(i, true)?.at[0];
        self.w.write(at, packed)
    }

    /// File offset of the next packed byte of quantized tensor `i` (see
    /// [`Writer::next_offset`]).
    pub fn next_codes_offset(&self, i: usize) -> Option<u64> {
        let at = *self.slot(i, true).ok()?.at.first()?;
        self.w.next_offset(at)
    }

    /// Checks the per-channel scale and zero point of quantized tensor `i`
    /// as the loader does: one of each per output channel, every scale
    /// finite and positive, every zero point finite (0 for the symmetric
    /// quantizer).
    fn check_params(&self, i: usize, scale: &[f32], zero_point: &[f32]) -> Result<()> {
        let s = self.slot(i, true)?;
        let oc = s.q.as_ref().map_or(0, |q| q.shape[0]);
        if scale.len() != oc || zero_point.len() != oc {
            return Err(IoError::InvalidArgument(format!(
                "tensor {}: {} scales and {} zero points given, expected {oc} of each (one per output channel)",
                repr(&s.name),
                scale.len(),
                zero_point.len()
            )));
        }
        let symmetric = self.quantizer == Quantizer::Symmetric;
        let bad = scale.iter().zip(zero_point).position(|(&s, &z)| {
            !(s.is_finite() && s > 0.0 && z.is_finite() && (!symmetric || z == 0.0))
        });
        if let Some(c) = bad {
            return Err(IoError::InvalidArgument(format!(
                "invalid scale or zero point for {} (output channel {c}: scale {}, zero point {}): scales must be finite and positive, zero points finite{}",
                repr(&s.name),
                scale[c],
                zero_point[c],
                if symmetric {
                    " and 0 with the symmetric quantizer"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// Writes the per-channel scale and zero point of quantized tensor `i`
    /// (checked as the loader checks them).
    pub fn write_params(&mut self, i: usize, scale: &[f32], zero_point: &[f32]) -> Result<()> {
        self.check_params(i, scale, zero_point)?;
        let idx = self.slots[i].at.clone();
        for (at, v) in [(idx[1], scale), (idx[2], zero_point)] {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.w.write(at, &bytes)?;
        }
        Ok(())
    }

    /// Writes the whole of quantized tensor `i`: all its codes (row-major)
    /// and its per-channel scale and zero point, after every check the
    /// loader makes, the dequantized values included (each must be finite
    /// in the weight's dtype). `packed` is scratch space.
    pub fn write_quantized(
        &mut self,
        i: usize,
        codes: &[i8],
        scale: &[f32],
        zero_point: &[f32],
        packed: &mut Vec<u8>,
    ) -> Result<()> {
        let s = self.slot(i, true)?;
        let Some(q) = s.q.as_ref() else {
            return Err(IoError::InvalidArgument(format!(
                "tensor {i} is not quantized"
            )));
        };
        let numel: usize = q.shape.iter().product();
        if s.codes != 0 || codes.len() != numel {
            return Err(IoError::InvalidArgument(format!(
                "tensor {}: {} codes given for its {numel} elements",
                repr(&s.name),
                s.codes + codes.len()
            )));
        }
        self.check_codes(i, codes)?;
        self.check_params(i, scale, zero_point)?;
        // The loader's own check, on the codes as it unpacks them.
        let offset = 1i16 << (q.bits - 1);
        packed.clear();
        packed.extend(codes.iter().map(|&c| (i16::from(c) + offset) as u8));
        let g = numel / q.shape[0];
        if let Some(c) = crate::load::dequantize_piece(q, g, scale, zero_point, packed, None) {
            return Err(IoError::InvalidArgument(format!(
                "cannot store {}: output channel {c} dequantizes to values that are not finite in {}",
                repr(&s.name),
                dtype::name(q.dtype)
            )));
        }
        self.write_codes(i, codes, packed)?;
        self.write_params(i, scale, zero_point)
    }

    /// Completes the file (see [`Writer::finish`]); returns its size.
    pub fn finish(self) -> Result<u64> {
        self.w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("squant-io-format-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn weight() -> QEntry {
        QEntry {
            bits: 4,
            mode: Mode::Full,
            shape: vec![2, 3],
            dtype: Dtype::F32,
        }
    }

    /// The file of `tensors` laid out as `SquantWriter` lays it out, but
    /// without its name checks (straight through `Writer`); whether the
    /// reader accepts it (a file that cannot even be laid out, with two
    /// stored tensors of one name, counts as rejected).
    fn reader_accepts(path: &Path, tensors: &[(String, Kind)]) -> bool {
        let mut planned = Vec::new();
        let mut table = serde_json::Map::new();
        for (name, kind) in tensors {
            match kind {
                Kind::Plain { dtype, shape } => planned.push(Planned {
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                }),
                Kind::Quantized(q) => {
                    planned.push(Planned {
                        name: format!("{name}{CODES}"),
                        dtype: Dtype::U8,
                        shape: vec![packed_size(6, q.bits)],
                    });
                    for s in [SCALE, ZERO_POINT] {
                        planned.push(Planned {
                            name: format!("{name}{s}"),
                            dtype: Dtype::F32,
                            shape: vec![2],
                        });
                    }
                    table.insert(
                        name.clone(),
                        serde_json::json!({"bits": 4, "mode": "squant", "shape": [2, 3], "dtype": "F32"}),
                    );
                }
            }
        }
        let metadata = vec![
            ("format".to_string(), FORMAT_NAME.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("quantized".to_string(), Value::Object(table).to_string()),
        ];
        let Ok(mut w) = Writer::create(path, &planned, &metadata, true) else {
            return false;
        };
        for (i, p) in planned.iter().enumerate() {
            let data = if p.dtype == Dtype::F32 {
                1f32.to_le_bytes().repeat(p.nbytes().unwrap() / 4)
            } else {
                vec![0x88; p.nbytes().unwrap()]
            };
            w.write(i, &data).unwrap();
        }
        w.finish().unwrap();
        let ok = SquantFile::open(path).and_then(|f| f.verify()).is_ok();
        std::fs::remove_file(path).unwrap();
        ok
    }

    /// A quantized weight of more than 64 dimensions: the reader refuses its
    /// table entry as it reads it (however long the shape: it was kept
    /// whole), the writer refuses to write it; 64 are fine.
    #[test]
    fn quantized_shapes_past_64_dims_refused_by_reader_and_writer() {
        let table = |n: usize| {
            let dims = ",1".repeat(n - 1);
            format!(r#"{{"w":{{"bits":4,"mode":"squant","shape":[2{dims}],"dtype":"F32"}}}}"#)
        };
        let read = |n: usize| {
            let mut t = json::parse_with(&table(n), TABLE_READER).unwrap().unwrap();
            assert_eq!(t.len(), 1);
            t.remove(0).1.map(|q| q.shape.len())
        };
        assert_eq!(read(64), Ok(64));
        for n in [65, 1_000_000] {
            let why = format!("shape has {n} dimensions; squant-rs handles at most 64");
            assert_eq!(read(n), Err(why));
        }
        // A zero anywhere is the fault it was.
        let zero = table(70).replace("1]", "0]");
        let got = json::parse_with(&zero, TABLE_READER).unwrap().unwrap();
        assert_eq!(
            got[0].1,
            Err("shape must list 2 or more positive dimensions".to_string())
        );
        let dir = scratch("dims");
        for (n, ok) in [(64, true), (65, false)] {
            let mut q = weight();
            q.shape = [2]
                .into_iter()
                .chain(std::iter::repeat_n(1, n - 1))
                .collect();
            let tensors = [("w".to_string(), Kind::Quantized(q))];
            let r =
                SquantWriter::create(&dir.join("f.safetensors"), &tensors, Quantizer::Asymmetric);
            match r {
                Ok(_) => assert!(ok),
                Err(e) => assert_eq!(
                    (ok, e.to_string()),
                    (
                        false,
                        "cannot quantize 'w': shape has 65 dimensions; squant-rs handles at most 64"
                            .to_string()
                    )
                ),
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Every state dict over names that end in the reserved suffixes, each
    /// name absent, plain or quantized, in two orders: `SquantWriter`
    /// refuses exactly those whose file the reader would reject (it
    /// wrote `w` and `w:codes` both quantized, which the reader rejects).
    #[test]
    fn writer_refuses_exactly_the_name_sets_the_reader_rejects() {
        let dir = scratch("names");
        let pool = [
            "a",
            "a:codes",
            "a:scale",
            "a:codes:zero_point",
            "a:zero_point:codes",
        ];
        let (mut accepted, mut refused) = (0, 0);
        for combo in 0..3usize.pow(pool.len() as u32) {
            let mut tensors = Vec::new();
            let mut c = combo;
            for name in pool {
                let kind = match c % 3 {
                    0 => None,
                    1 => Some(Kind::Plain {
                        dtype: Dtype::F32,
                        shape: vec![2],
                    }),
                    _ => Some(Kind::Quantized(weight())),
                };
                c /= 3;
                if let Some(kind) = kind {
                    tensors.push((name.to_string(), kind));
                }
            }
            for order in 0..2 {
                if order == 1 {
                    tensors.reverse();
                }
                let path = dir.join("f.safetensors");
                let want = reader_accepts(&path, &tensors);
                let got = match SquantWriter::create(&path, &tensors, Quantizer::Asymmetric) {
                    Ok(w) => {
                        drop(w);
                        true
                    }
                    Err(IoError::InvalidArgument(_)) => false,
                    Err(e) => panic!("{e}"),
                };
                assert_eq!(got, want, "{tensors:?}");
                if want {
                    accepted += 1;
                } else {
                    refused += 1;
                }
            }
        }
        assert!(accepted > 20 && refused > 20, "{accepted} {refused}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Codes given in parts: their count and range are checked as they
    /// come, the parameters when given; the file then loads.
    #[test]
    fn writer_checks_codes_and_parameters() {
        let dir = scratch("codes");
        let path = dir.join("f.safetensors");
        let q = QEntry {
            shape: vec![2, 5],
            ..weight()
        };
        let plan = [("w".to_string(), Kind::Quantized(q))];
        let mut w = SquantWriter::create(&path, &plan, Quantizer::Symmetric).unwrap();
        let mut packed = Vec::new();
        let err = |r: Result<()>| match r {
            Err(IoError::InvalidArgument(m)) => m,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert!(err(w.write_codes(0, &[-8], &mut packed)).contains("[-7, 7], got -8"));
        assert!(err(w.write_codes(0, &[1, 2, 3], &mut packed)).contains("not a multiple of 4"));
        w.write_codes(0, &[1, 2, 3, 4], &mut packed).unwrap();
        assert!(err(w.write_codes(0, &[0; 7], &mut packed)).contains("11 codes given for its 10"));
        w.write_codes(0, &[-7; 6], &mut packed).unwrap();
        assert!(err(w.write_params(0, &[1.0, 2.0], &[0.0, 0.5])).contains("channel 1"));
        assert!(err(w.write_params(0, &[1.0, 0.0], &[0.0, 0.0])).contains("channel 1"));
        assert!(err(w.write_params(0, &[1.0], &[0.0])).contains("1 scales and 1 zero points"));
        w.write_params(0, &[1.0, 7.0], &[0.0, 0.0]).unwrap();
        w.finish().unwrap();
        let f = SquantFile::open(&path).unwrap();
        let mut out = vec![0u8; 40];
        f.load_into(&f.tensors[0], Some(&mut out), true).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
