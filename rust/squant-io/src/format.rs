//! The squant-rs file format on top of safetensors (see `docs/format.md`):
//! strict reading of its metadata, dequantization with checksum
//! verification, and the writer of packed files.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use squant_core::Mode;

use crate::dtype::{self, Dtype};
use crate::error::{IoError, Result};
use crate::json;
use crate::pack::{codes_per_byte, pack_into, packed_size};
use crate::read::{repr, Entry, SafetensorsFile};
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

fn parse_entry(info: &Value) -> std::result::Result<QEntry, String> {
    let Value::Object(info) = info else {
        return Err("not a JSON object".to_string());
    };
    let bits = info
        .get("bits")
        .and_then(Value::as_u64)
        .filter(|b| (2..=8).contains(b))
        .ok_or("bits must be an integer in 2..8")? as u32;
    let mode_s = info
        .get("mode")
        .and_then(Value::as_str)
        .ok_or("mode must be a string")?;
    let mode = mode_of(mode_s).ok_or_else(|| format!("unknown mode {}", repr(mode_s)))?;
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|x| usize::try_from(x).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .filter(|s| s.len() >= 2 && s.iter().all(|&d| d > 0))
        .ok_or("shape must list 2 or more positive dimensions")?;
    check_shape(&shape)?;
    let dtype = info
        .get("dtype")
        .and_then(Value::as_str)
        .and_then(dtype::from_name)
        .filter(|&d| dtype::is_float(d))
        .ok_or("dtype must be F32, F16, BF16 or F64")?;
    match info.get("codes_per_byte") {
        None => {}
        Some(v) if v.as_u64() == Some(codes_per_byte(bits) as u64) => {}
        Some(v) => {
            return Err(format!(
                "codes_per_byte {v} does not match {bits} bits (expected {})",
                codes_per_byte(bits)
            ))
        }
    }
    Ok(QEntry {
        bits,
        mode,
        shape,
        dtype,
    })
}

/// The size limit of a quantized weight's shape (whatever its dtype):
/// as float64 it must be a tensor numpy and torch can make.
fn check_shape(shape: &[usize]) -> std::result::Result<(), &'static str> {
    dtype::checked_nbytes(8, shape)
        .map(|_| ())
        .ok_or("shape is too large")
}

fn parse_checksums(text: &str) -> std::result::Result<HashMap<String, u32>, String> {
    let v = json::parse(text)?;
    let Value::Object(m) = v else {
        return Err("not a JSON object".to_string());
    };
    let mut out = HashMap::with_capacity(m.len());
    for (k, v) in m {
        let crc = v
            .as_str()
            .filter(|s| s.len() == 8)
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .ok_or_else(|| format!("checksum of {} is not 8 hex digits", repr(&k)))?;
        out.insert(k, crc);
    }
    Ok(out)
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
                serde_json::Map::new()
            }
            Some(text) => match json::parse(text) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
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
        for (name, info) in &table {
            let q = parse_entry(info).map_err(|why| {
                fail(format!(
                    "corrupt squant-rs metadata for {} ({why})",
                    repr(name)
                ))
            })?;
            let part = |s: &str| st.get(&format!("{name}{s}"));
            let (Some(codes), Some(scale), Some(zp)) = (part(CODES), part(SCALE), part(ZERO_POINT))
            else {
                return Err(fail(format!(
                    "quantized tensor {} is missing its codes, scale or zero point",
                    repr(name)
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
                    repr(name)
                )));
            }
            if st.get(name).is_some() {
                return Err(fail(format!(
                    "tensor {} is stored both quantized and unchanged",
                    repr(name)
                )));
            }
            quantized.insert(name.clone(), q);
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
/// stored unchanged or quantized (codes packed on the way).
pub struct SquantWriter {
    w: Writer,
    /// Per logical tensor: stored indices (plain: one; quantized: codes,
    /// scale, zero point) and bits (0 for plain).
    slots: Vec<(Vec<usize>, u32)>,
}

impl SquantWriter {
    /// Plans the file: `tensors` in state-dict order. Names are checked:
    /// none may end in a reserved suffix or clash with a quantized part.
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
        let mut planned = Vec::with_capacity(tensors.len() + 8);
        let mut table = serde_json::Map::new();
        let mut slots = Vec::with_capacity(tensors.len());
        for (name, kind) in tensors {
            match kind {
                Kind::Plain { dtype, shape } => {
                    if let Some(base) = base_of(name) {
                        let why = match names.get(base).map(|&j| &tensors[j].1) {
                            Some(Kind::Quantized(_)) => format!(
                                "cannot quantize {}: the state dict already has a tensor named {}",
                                repr(base),
                                repr(name)
                            ),
                            _ => format!(
                                "tensor name {} ends in {}, which squant-rs files reserve for quantized weights",
                                repr(name),
                                repr(&name[base.len()..])
                            ),
                        };
                        return Err(IoError::InvalidArgument(why));
                    }
                    slots.push((vec![planned.len()], 0));
                    planned.push(Planned {
                        name: name.clone(),
                        dtype: *dtype,
                        shape: shape.clone(),
                    });
                }
                Kind::Quantized(q) => {
                    if q.shape.len() < 2 || q.shape.contains(&0) || !dtype::is_float(q.dtype) {
                        return Err(IoError::InvalidArgument(format!(
                            "cannot quantize {}: not a floating tensor of 2+ dimensions with elements",
                            repr(name)
                        )));
                    }
                    squant_core::qparams::check_bits(q.bits)
                        .map_err(|e| IoError::InvalidArgument(e.to_string()))?;
                    let numel: usize = q.shape.iter().product();
                    let at = planned.len();
                    slots.push((vec![at, at + 1, at + 2], q.bits));
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
        Ok(SquantWriter { w, slots })
    }

    fn slot(&self, i: usize, quantized: bool) -> Result<&(Vec<usize>, u32)> {
        self.slots
            .get(i)
            .filter(|s| (s.1 != 0) == quantized)
            .ok_or_else(|| {
                IoError::InvalidArgument(format!(
                    "tensor {i} is not a {} tensor of this file",
                    if quantized { "quantized" } else { "plain" }
                ))
            })
    }

    /// Appends raw bytes of plain tensor `i`.
    pub fn write_plain(&mut self, i: usize, bytes: &[u8]) -> Result<()> {
        let at = self.slot(i, false)?.0[0];
        self.w.write(at, bytes)
    }

    /// Appends codes of quantized tensor `i` (row-major). Every call but the
    /// last of a tensor must pass a multiple of 4 codes.
    pub fn write_codes(&mut self, i: usize, codes: &[i8], packed: &mut Vec<u8>) -> Result<()> {
        let (at, bits) = {
            let s = self.slot(i, true)?;
            (s.0[0], s.1)
        };
        let lo = -(1i16 << (bits - 1));
        let hi = (1i16 << (bits - 1)) - 1;
        if let Some(q) = crate::pack::first_out_of_range(codes, lo as i8, hi as i8) {
            return Err(IoError::InvalidArgument(format!(
                "codes out of range for {bits} bits: expected values in [{lo}, {hi}], got {q}"
            )));
        }
        packed.clear();
        pack_into(codes, bits, packed);
        self.w.write(at, packed)
    }

    /// Appends codes of quantized tensor `i` already packed (see
    /// [`crate::pack::pack_slice`]; the caller guarantees valid codes).
    pub fn write_packed(&mut self, i: usize, packed: &[u8]) -> Result<()> {
        let at = self.slot(i, true)?.0[0];
        self.w.write(at, packed)
    }

    /// File offset of the next packed byte of quantized tensor `i` (see
    /// [`Writer::next_offset`]).
    pub fn next_codes_offset(&self, i: usize) -> Option<u64> {
        let at = *self.slot(i, true).ok()?.0.first()?;
        self.w.next_offset(at)
    }

    /// Writes the per-channel scale and zero point of quantized tensor `i`.
    pub fn write_params(&mut self, i: usize, scale: &[f32], zero_point: &[f32]) -> Result<()> {
        let idx = self.slot(i, true)?.0.clone();
        for (at, v) in [(idx[1], scale), (idx[2], zero_point)] {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.w.write(at, &bytes)?;
        }
        Ok(())
    }

    /// Completes the file (see [`Writer::finish`]); returns its size.
    pub fn finish(self) -> Result<u64> {
        self.w.finish()
    }
}
