//! Atomic safetensors writing with per-tensor CRC32C checksums.
//!
//! The header is computed up front from the names, dtypes and shapes; the
//! data is then written tensor by tensor at its final offset of a temporary
//! file in the target's directory (checksums computed on the way), the
//! checksums are patched into their fixed-width slots of the header, and the
//! file is synced and renamed over the target. An error, a drop without
//! [`Writer::finish`] or [`remove_live_temp_files`] (signal handlers) removes
//! the temporary file: no partial output is ever left behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::dtype::{self, Dtype};
use crate::error::{IoError, Result};
use crate::json::quote;
use crate::read::repr;

/// Metadata key of the checksum table.
pub const CHECKSUMS_KEY: &str = "checksums";
/// Placeholder of a checksum before it is known (8 hex digits).
const PLACEHOLDER: &str = "00000000";

/// One tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Planned {
    /// Bytes of its data (`None` on overflow).
    pub fn nbytes(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(dtype::item_size(self.dtype), |a, &d| a.checked_mul(d))
    }
}

struct Slot {
    name: String,
    begin: u64,
    len: u64,
    written: u64,
    crc: u32,
    /// File offset of the checksum's 8 hex digits in the header.
    crc_at: Option<u64>,
}

/// Temporary files being written (removed by [`remove_live_temp_files`]).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temporary file still being written; for a signal handler
/// that is about to end the process. Returns how many were removed.
pub fn remove_live_temp_files() -> usize {
    let mut files = live();
    let n = files.len();
    for f in files.drain(..) {
        if f.is_dir() {
            let _ = std::fs::remove_dir_all(f);
        } else {
            let _ = std::fs::remove_file(f);
        }
    }
    n
}

/// Registers a temporary file or directory for [`remove_live_temp_files`].
pub fn register_temp(path: &Path) {
    live().push(path.to_path_buf());
}

/// Forgets a registered temporary path (it was renamed or removed).
pub fn unregister_temp(path: &Path) {
    live().retain(|p| p != path);
}

/// The temporary path next to `target`: `.NAME.<unique>.tmp`.
fn temp_path(target: &Path) -> PathBuf {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let unique = (u64::from(std::process::id()) << 32)
        ^ (u64::from(nanos) << 8)
        ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{base}.{:012x}.tmp", unique & 0xffff_ffff_ffff))
}

/// Writes at least this large start their write-back to disk at once.
const START_WRITEBACK: usize = 1 << 20;

/// Starts writing the whole pages of the `len` bytes at `at` back to disk
/// without waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the
/// final `fsync` finds little left to do while the rest of the file is
/// being computed. The pages at either end, which the neighbouring writes
/// share, are left alone: a write into a page under write-back would wait
/// for it. Best effort: an error here changes nothing (the `fsync` runs).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, at: u64, len: usize) {
    use std::os::fd::AsRawFd;
    const PAGE: u64 = 4096;
    let first = at.div_ceil(PAGE) * PAGE;
    let end = (at + len as u64) / PAGE * PAGE;
    if end <= first {
        return;
    }
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(first),
        libc::off64_t::try_from(end - first),
    ) else {
        return;
    };
    // SAFETY: a plain system call on a file descriptor we own.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _at: u64, _len: usize) {}

/// A safetensors file being written.
pub struct Writer {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    data_start: u64,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
}

/// The header of `tensors` laid out by decreasing item size (each tensor
/// aligned to its item size), and the checksum slots' offsets in it.
fn build_header(
    tensors: &[Planned],
    metadata: &[(String, String)],
    checksums: bool,
) -> Result<(Vec<u8>, Vec<Slot>)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(dtype::item_size(tensors[i].dtype)));
    let mut offsets = vec![(0u64, 0u64); tensors.len()];
    let mut pos = 0u64;
    for &i in &order {
        let n = tensors[i].nbytes().ok_or_else(|| {
            IoError::InvalidArgument(format!("tensor {} is too large", repr(&tensors[i].name)))
        })? as u64;
        offsets[i] = (pos, pos + n);
        pos += n;
    }
    let mut h = String::from("{");
    let mut crc_pos = Vec::new();
    if !metadata.is_empty() || checksums {
        h.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&quote(k));
            h.push(':');
            h.push_str(&quote(v));
        }
        if checksums {
            if !metadata.is_empty() {
                h.push(',');
            }
            h.push_str(&quote(CHECKSUMS_KEY));
            h.push(':');
            // The value is the JSON text {"name":"hex",...} as a JSON string.
            // JSON escaping works character by character, so the escaped
            // text is built piece by piece and every hex slot's place known.
            let esc = |s: &str| {
                let q = quote(s);
                q[1..q.len() - 1].to_string()
            };
            h.push('"');
            h.push_str(&esc("{"));
            for (i, t) in tensors.iter().enumerate() {
                if i > 0 {
                    h.push(',');
                }
                h.push_str(&esc(&quote(&t.name)));
                h.push_str(&esc(":\""));
                crc_pos.push(h.len());
                h.push_str(PLACEHOLDER);
                h.push_str(&esc("\""));
            }
            h.push_str(&esc("}"));
            h.push('"');
        }
        h.push('}');
    }
    for (i, t) in tensors.iter().enumerate() {
        if h.len() > 1 {
            h.push(',');
        }
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            quote(&t.name),
            dtype::name(t.dtype),
            shape.join(","),
            offsets[i].0,
            offsets[i].1
        ));
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let slots = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| Slot {
            name: t.name.clone(),
            begin: offsets[i].0,
            len: offsets[i].1 - offsets[i].0,
            written: 0,
            crc: 0,
            crc_at: crc_pos.get(i).map(|&p| 8 + p as u64),
        })
        .collect();
    Ok((h.into_bytes(), slots))
}

impl Writer {
    /// Starts writing `tensors` (header order) with `metadata` to `target`,
    /// adding a CRC32C checksum table when `checksums` is set. The data of
    /// each tensor must then be given in full with [`Writer::write`].
    pub fn create(
        target: &Path,
        tensors: &[Planned],
        metadata: &[(String, String)],
        checksums: bool,
    ) -> Result<Writer> {
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if t.name == "__metadata__" {
                return Err(IoError::InvalidArgument(
                    "'__metadata__' cannot be a tensor name".to_string(),
                ));
            }
            if index.insert(t.name.clone(), i).is_some() {
                return Err(IoError::InvalidArgument(format!(
                    "two tensors are named {}",
                    repr(&t.name)
                )));
            }
        }
        if metadata
            .iter()
            .any(|(k, _)| checksums && k == CHECKSUMS_KEY)
        {
            return Err(IoError::InvalidArgument(format!(
                "metadata key {CHECKSUMS_KEY:?} is reserved for the checksum table"
            )));
        }
        let (header, slots) = build_header(tensors, metadata, checksums)?;
        let tmp = temp_path(target);
        // Registered before it exists, so a signal that arrives right after
        // the file appears still finds it.
        live().push(tmp.clone());
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => f,
            Err(e) => {
                unregister_temp(&tmp);
                return Err(IoError::os(target, e));
            }
        };
        let mut w = Writer {
            target: target.to_path_buf(),
            tmp,
            file: None,
            data_start: 8 + header.len() as u64,
            slots,
            index,
        };
        let head = (header.len() as u64).to_le_bytes();
        file.write_all(&head)
            .and_then(|_| file.write_all(&header))
            .map_err(|e| IoError::os(target, e))?;
        w.file = Some(file);
        Ok(w)
    }

    /// Index of the tensor named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Appends `bytes` to the data of tensor `i`.
    pub fn write(&mut self, i: usize, bytes: &[u8]) -> Result<()> {
        let slot = self
            .slots
            .get_mut(i)
            .ok_or_else(|| IoError::InvalidArgument(format!("no tensor {i}")))?;
        if slot.written + bytes.len() as u64 > slot.len {
            return Err(IoError::InvalidArgument(format!(
                "tensor {}: {} bytes given, {} expected",
                repr(&slot.name),
                slot.written + bytes.len() as u64,
                slot.len
            )));
        }
        let at = self.data_start + slot.begin + slot.written;
        let target = &self.target;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| IoError::InvalidArgument("writer is closed".to_string()))?;
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.write_all(bytes))
            .map_err(|e| IoError::os(target, e))?;
        if bytes.len() >= START_WRITEBACK {
            start_writeback(file, at, bytes.len());
        }
        slot.crc = crc32c::crc32c_append(slot.crc, bytes);
        slot.written += bytes.len() as u64;
        Ok(())
    }

    /// Completes the file: checks every tensor was written in full, patches
    /// the checksums in, syncs and renames it over the target. Returns the
    /// file's size.
    pub fn finish(mut self) -> Result<u64> {
        let target = self.target.clone();
        let Some(mut file) = self.file.take() else {
            return Err(IoError::InvalidArgument("writer is closed".to_string()));
        };
        let mut size = self.data_start;
        for slot in &self.slots {
            if slot.written != slot.len {
                return Err(IoError::InvalidArgument(format!(
                    "tensor {}: {} of {} bytes written",
                    repr(&slot.name),
                    slot.written,
                    slot.len
                )));
            }
            size += slot.len;
            if let Some(at) = slot.crc_at {
                let hex = format!("{:08x}", slot.crc);
                file.seek(SeekFrom::Start(at))
                    .and_then(|_| file.write_all(hex.as_bytes()))
                    .map_err(|e| IoError::os(&target, e))?;
            }
        }
        file.flush()
            .and_then(|_| file.sync_all())
            .map_err(|e| IoError::os(&target, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &target).map_err(|e| IoError::os(&target, e))?;
        live().retain(|p| p != &self.tmp);
        Ok(size)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not finished (or finishing failed): remove the temporary file.
        let mut files = live();
        if let Some(i) = files.iter().position(|p| p == &self.tmp) {
            files.swap_remove(i);
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
