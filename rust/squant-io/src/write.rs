//! Atomic safetensors writing with per-tensor CRC32C checksums.
//!
//! The header is computed up front from the names, dtypes and shapes; the
//! data is then written tensor by tensor at its final offset of a temporary
//! file in the target's directory (checksums computed on the way), the
//! checksums are patched into their fixed-width slots of the header, and the
//! file is synced and renamed over the target. On Linux the bulk of the data
//! (runs of contiguous writes) bypasses the page cache (`O_DIRECT`, see
//! [`Direct`]): the kernel then neither copies it nor writes it back, which
//! on a small machine costs as much CPU time as quantizing it. An error, a drop without
//! [`Writer::finish`] or [`remove_live_temp_files`] (signal handlers) removes
//! the temporary file: no partial output is ever left behind. Replacing an
//! existing file keeps its permission bits (and, where allowed, its owner):
//! they are set on the temporary file before the rename, so the target is
//! never seen with other permissions.
//!
//! Temporary paths are created, and renamed into place, inside a
//! [`TempSection`]: [`remove_live_temp_files`] waits for the sections in
//! progress and then refuses new ones, so nothing is created in (or
//! renamed into) a temporary directory while it is being removed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

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
    /// Bytes of its data (`None`: too large, see [`dtype::checked_nbytes`]).
    pub fn nbytes(&self) -> Option<usize> {
        dtype::checked_nbytes(dtype::item_size(self.dtype), &self.shape)
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

/// Temporary files being written (removed by [`remove_live_temp_files`]),
/// with the id of the process that registered each: a child forked while
/// they were written inherits the list but not the work.
static LIVE: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Held shared by every [`TempSection`], exclusively by
/// [`remove_live_temp_files`].
static GATE: RwLock<()> = RwLock::new(());
/// Set by [`remove_live_temp_files`]: no temporary path may be created or
/// renamed into place any more.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether [`Writer::finish`] syncs the target's directory after its rename
/// (see [`leave_directory_sync_to_caller`]).
static SYNC_AFTER_RENAME: AtomicBool = AtomicBool::new(true);

/// From now on, [`Writer::finish`] leaves the sync of the target's
/// directory after its rename to the caller: for a program that renames
/// the finished file once more itself and syncs the directory after that
/// rename (the Python package, whose writers stage the output under a
/// temporary name of their own), so that a failing sync is reported once,
/// for the rename that puts the output in place. The sharded writer syncs
/// its directories itself either way.
pub fn leave_directory_sync_to_caller() {
    SYNC_AFTER_RENAME.store(false, Ordering::SeqCst);
}

fn live() -> std::sync::MutexGuard<'static, Vec<(u32, PathBuf)>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A section of code that creates registered temporary paths (or entries
/// inside a registered temporary directory), or renames them into place.
/// While one is open, [`remove_live_temp_files`] waits; once that has run,
/// [`TempSection::enter`] fails with [`IoError::Cancelled`]. So a thread
/// that keeps writing while another one cleans up (a signal) cannot create
/// a file in a directory being removed, nor rename a temporary file over
/// its target afterwards. A section must not be entered again by a thread
/// that holds one.
pub struct TempSection {
    _guard: RwLockReadGuard<'static, ()>,
}

impl TempSection {
    /// Opens a section; [`IoError::Cancelled`] once
    /// [`remove_live_temp_files`] has run (the process is ending).
    pub fn enter() -> Result<TempSection> {
        let guard = GATE.read().unwrap_or_else(|p| p.into_inner());
        if CLOSED.load(Ordering::Acquire) {
            return Err(IoError::Cancelled);
        }
        Ok(TempSection { _guard: guard })
    }
}

/// Removes every temporary file and directory this process is still
/// writing (not those of the process it was forked from); for a signal
/// handler that is about to end the process. It first waits for the
/// [`TempSection`]s in progress (a rename into place completes, with the
/// sync of its directory), then makes every later one fail, so that no
/// thread still running creates anything more. Returns how many paths were
/// removed.
pub fn remove_live_temp_files() -> usize {
    // Set first: an error another thread meets from here on may come from
    // this clean-up (see [`cleaning_up`]).
    CLOSED.store(true, Ordering::Release);
    let _gate = GATE.write().unwrap_or_else(|p| p.into_inner());
    let mut files = live();
    let me = std::process::id();
    let mine: Vec<PathBuf> = files
        .drain(..)
        .filter(|(pid, _)| *pid == me)
        .map(|(_, f)| f)
        .collect();
    let n = mine.len();
    // Newest first: files inside a temporary directory before it.
    for f in mine.into_iter().rev() {
        if f.is_dir() {
            // Nothing new appears in it any more (see above), but another
            // thread may be removing it too (an error's clean-up): its
            // entries then vanish under this walk, which may stop early.
            // Gone only once it is not there (the process ends next, in the
            // middle of the other thread's removal).
            for _ in 0..100 {
                if std::fs::remove_dir_all(&f).is_ok() || std::fs::symlink_metadata(&f).is_err() {
                    break;
                }
            }
        } else {
            let _ = std::fs::remove_file(f);
        }
    }
    n
}

/// How many temporary files and directories this process is writing (not
/// those of the process it was forked from).
pub fn live_temp_files() -> usize {
    let me = std::process::id();
    live().iter().filter(|(pid, _)| *pid == me).count()
}

/// Whether [`remove_live_temp_files`] has begun: an error met since then
/// may be its doing (a temporary file removed under its writer, a section
/// refused), and the process is about to end by the signal: a caller
/// should not report it.
pub fn cleaning_up() -> bool {
    CLOSED.load(Ordering::Acquire)
}

/// Registers a temporary file or directory for [`remove_live_temp_files`].
pub fn register_temp(path: &Path) {
    live().push((std::process::id(), path.to_path_buf()));
}

/// Forgets a registered temporary path (it was renamed or removed).
pub fn unregister_temp(path: &Path) {
    live().retain(|(_, p)| p != path);
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries to disk (a rename into it is then
/// durable). Best effort where the system cannot (a directory that cannot
/// be opened for reading, a file system without directory sync, not Unix);
/// an I/O error is reported.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        if let Err(e) = d.sync_all() {
            // EIO: 5 on every Unix.
            if e.raw_os_error() == Some(5) {
                return Err(e);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// A temporary name in `dir` for `target`: `.NAME.<unique>.tmp`, the
/// unique part made of the process id, the time, a counter and the
/// standard library's per-process random hash keys (so that another run
/// with the same process id, in a container, does not pick the same name).
/// Creating it can still find it taken: the caller then asks again.
pub fn temp_name(dir: &Path, target: &Path) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    let base = short_base(target);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u32(nanos);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut name = std::ffi::OsString::from(".");
    name.push(&base);
    name.push(format!(".{:012x}.tmp", h.finish() & 0xffff_ffff_ffff));
    dir.join(name)
}

/// Whether `name` is a temporary name [`temp_name`] gives for `target`
/// (`.NAME.<hex digits>.tmp`, in any directory).
pub fn is_temp_name_of(name: &std::ffi::OsStr, target: &Path) -> bool {
    let base = short_base(target);
    let Some(rest) = name
        .as_encoded_bytes()
        .strip_prefix(b".")
        .and_then(|r| r.strip_prefix(base.as_encoded_bytes()))
        .and_then(|r| r.strip_prefix(b"."))
        .and_then(|r| r.strip_suffix(b".tmp"))
    else {
        return false;
    };
    (1..=16).contains(&rest.len()) && rest.iter().all(u8::is_ascii_hexdigit)
}

/// The longest file name most file systems take (bytes).
const NAME_MAX: usize = 255;

/// Bytes [`temp_name`] adds to the target's name (`.`, `.<12 hex>.tmp`).
const TEMP_ROOM: usize = 18;

/// `target`'s file name, shortened where the temporary name would be
/// longer than a file name may be (as the Python package shortens its own
/// temporary names): an output of 250 bytes' name is a legal name whose
/// temporary name would not be.
fn short_base(target: &Path) -> std::ffi::OsString {
    let Some(base) = target.file_name() else {
        return "out".into();
    };
    let keep = NAME_MAX - TEMP_ROOM;
    #[cfg(unix)]
    {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let bytes = base.as_bytes();
        std::ffi::OsString::from_vec(bytes[..bytes.len().min(keep)].to_vec())
    }
    #[cfg(not(unix))]
    {
        let text = base.to_string_lossy();
        let mut end = text.len().min(keep);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].into()
    }
}

/// Tries of a new temporary name when one is taken.
pub const TEMP_TRIES: usize = 100;

/// Gives the file (`fd`) being written for `target` the permission bits
/// and, where allowed, the owner and group of the file it replaces (as the
/// Python `atomic_output`): owner first, since a change of owner clears the
/// set-user-ID bits.
#[cfg(unix)]
fn copy_permissions(file: &File, old: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: a plain system call on a file descriptor we own. Not root:
    // the file keeps this user's owner (the error is expected).
    unsafe {
        libc::fchown(file.as_raw_fd(), old.uid(), old.gid());
    }
    file.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o7777))
}

#[cfg(not(unix))]
fn copy_permissions(file: &File, old: &std::fs::Metadata) -> std::io::Result<()> {
    file.set_permissions(old.permissions())
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

/// `bytes` at offset `at` of `file`, through the page cache.
fn write_buffered(file: &mut File, at: u64, bytes: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    file.write_all(bytes)?;
    if bytes.len() >= START_WRITEBACK {
        start_writeback(file, at, bytes.len());
    }
    Ok(())
}

/// Alignment of direct writes: offsets, lengths and buffer addresses (the
/// page size, a multiple of every common logical block size).
const ALIGN: usize = 4096;
/// See [`Writer::next_offset`].
pub const WRITE_ALIGN: usize = ALIGN;

/// `n` bytes of `buf` (grown when too small, never cleared) that start at
/// an address equal to `offset` modulo [`WRITE_ALIGN`]: returns where they
/// start in `buf`.
pub fn aligned_like(buf: &mut Vec<u8>, offset: u64, n: usize) -> usize {
    if buf.len() < n + ALIGN {
        buf.resize(n + ALIGN, 0);
    }
    let phase = (offset % ALIGN as u64) as usize;
    (phase + ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN
}
/// Bytes staged before a direct write (a multiple of [`ALIGN`]).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const DIRECT_CHUNK: usize = 8 << 20;
/// Writes at least this large start a run of direct writes (smaller ones
/// join a run only when they continue it).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const DIRECT_MIN: usize = 1 << 20;

/// Writes that bypass the page cache: a second descriptor of the temporary
/// file opened with `O_DIRECT`. Contiguous writes form a run; the whole
/// pages inside a run are staged in an aligned buffer and written directly
/// [`DIRECT_CHUNK`] bytes at a time; the partial pages at either end of a
/// run go through the page cache (the ordinary descriptor). So no page is
/// ever written both ways. Each byte of the file is written once, which
/// keeps the two paths coherent; the final `fsync` of the ordinary
/// descriptor covers both (the data and the device's write cache). A file
/// system that refuses direct writes (`EINVAL`) turns them off for the rest
/// of the file: the staged bytes then go through the page cache.
#[cfg(target_os = "linux")]
struct Direct {
    file: File,
    /// `DIRECT_CHUNK + ALIGN` bytes; the staging area starts at `pad`.
    buf: Vec<u8>,
    pad: usize,
    /// File offset of the first staged byte (aligned when `len > 0`).
    start: u64,
    len: usize,
    /// Where the current run continues (`None`: no run).
    end: Option<u64>,
}

#[cfg(target_os = "linux")]
impl Direct {
    fn open(path: &Path) -> Option<Direct> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let buf = vec![0u8; DIRECT_CHUNK + ALIGN];
        let pad = buf.as_ptr().align_offset(ALIGN);
        if pad >= ALIGN {
            return None;
        }
        Some(Direct {
            file,
            buf,
            pad,
            start: 0,
            len: 0,
            end: None,
        })
    }

    /// Whether a write of `len` bytes at `at` goes this way.
    fn takes(&self, at: u64, len: usize) -> bool {
        self.end == Some(at) || len >= DIRECT_MIN
    }

    /// Writes `bytes` at `at` (see [`Direct`]). `Ok(false)`: direct writes
    /// are not supported here (everything given was written through
    /// `plain`); the caller drops this stream.
    fn write(&mut self, plain: &mut File, at: u64, mut bytes: &[u8]) -> std::io::Result<bool> {
        if self.end != Some(at) && !self.end_run(plain)? {
            write_buffered(plain, at, bytes)?;
            return Ok(false);
        }
        let mut pos = at;
        if self.len == 0 {
            // A partial first page goes through the page cache.
            let head = (pos.next_multiple_of(ALIGN as u64) - pos).min(bytes.len() as u64) as usize;
            if head > 0 {
                write_buffered(plain, pos, &bytes[..head])?;
                pos += head as u64;
                bytes = &bytes[head..];
            }
            self.start = pos;
        }
        while !bytes.is_empty() {
            // Bytes that lie at the same place in a page of memory as in
            // the file: once the staged partial page is completed, their
            // whole pages are written straight from the caller's memory
            // (no copy).
            let fill = (ALIGN - self.len % ALIGN) % ALIGN;
            if bytes.as_ptr() as usize % ALIGN == self.len % ALIGN && bytes.len() >= fill + ALIGN {
                let at = self.pad + self.len;
                self.buf[at..at + fill].copy_from_slice(&bytes[..fill]);
                self.len += fill;
                pos += fill as u64;
                bytes = &bytes[fill..];
                if self.len > 0 && !self.flush(plain, self.len)? {
                    write_buffered(plain, pos, bytes)?;
                    return Ok(false);
                }
                let whole = bytes.len() / ALIGN * ALIGN;
                let (done, supported) = self.put(pos, &bytes[..whole])?;
                pos += done as u64;
                bytes = &bytes[done..];
                self.start = pos;
                if !supported {
                    write_buffered(plain, pos, bytes)?;
                    self.end = None;
                    return Ok(false);
                }
                continue;
            }
            let n = (DIRECT_CHUNK - self.len).min(bytes.len());
            let at = self.pad + self.len;
            self.buf[at..at + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            pos += n as u64;
            bytes = &bytes[n..];
            if self.len == DIRECT_CHUNK && !self.flush(plain, DIRECT_CHUNK)? {
                write_buffered(plain, pos, bytes)?;
                return Ok(false);
            }
        }
        self.end = Some(pos);
        Ok(true)
    }

    /// Writes `data` (at an aligned address, offset and length) at `at`
    /// directly: the bytes written, and `false` if the file system refused
    /// (`EINVAL`) before the rest was written.
    fn put(&self, at: u64, data: &[u8]) -> std::io::Result<(usize, bool)> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < data.len() {
            match self.file.write_at(&data[done..], at + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok((done, false)),
                Err(e) => return Err(e),
            }
        }
        Ok((done, true))
    }

    /// Writes the first `n` staged bytes (a multiple of [`ALIGN`]) directly
    /// and keeps the rest staged; `Ok(false)`: not supported, all staged
    /// bytes were written through `plain` instead.
    fn flush(&mut self, plain: &mut File, n: usize) -> std::io::Result<bool> {
        let (done, supported) = self.put(self.start, &self.buf[self.pad..self.pad + n])?;
        if !supported {
            let rest = &self.buf[self.pad + done..self.pad + self.len];
            write_buffered(plain, self.start + done as u64, rest)?;
            self.len = 0;
            self.end = None;
            return Ok(false);
        }
        self.buf
            .copy_within(self.pad + n..self.pad + self.len, self.pad);
        self.len -= n;
        self.start += n as u64;
        Ok(true)
    }

    /// Ends the current run: its whole pages directly, the partial last
    /// page through the page cache.
    fn end_run(&mut self, plain: &mut File) -> std::io::Result<bool> {
        let whole = self.len / ALIGN * ALIGN;
        let ok = whole == 0 || self.flush(plain, whole)?;
        if self.len > 0 {
            write_buffered(plain, self.start, &self.buf[self.pad..self.pad + self.len])?;
            self.len = 0;
        }
        self.end = None;
        Ok(ok)
    }
}

/// A safetensors file being written.
pub struct Writer {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    #[cfg(target_os = "linux")]
    direct: Option<Direct>,
    data_start: u64,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    /// The replaced file's metadata (its owner and mode go to the
    /// temporary file).
    old: Option<std::fs::Metadata>,
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
        let end = pos.checked_add(n).filter(|&e| e <= i64::MAX as u64 / 2);
        let end = end.ok_or_else(|| {
            IoError::InvalidArgument(format!(
                "tensor {} is too large: the file would exceed 2^62 bytes",
                repr(&tensors[i].name)
            ))
        })?;
        offsets[i] = (pos, end);
        pos = end;
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
    if h.len() as u64 > crate::read::MAX_HEADER {
        return Err(IoError::InvalidArgument(format!(
            "the file's header would take {} bytes ({} tensors), more than the {} bytes readers accept",
            h.len(),
            tensors.len(),
            crate::read::MAX_HEADER
        )));
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
        // The file it replaces: its permissions are the new file's.
        let old = std::fs::metadata(target).ok().filter(|m| m.is_file());
        let dir = parent_of(target);
        let section = TempSection::enter()?;
        let mut tries = 0;
        let (tmp, mut file) = loop {
            let tmp = temp_name(dir, target);
            // Registered before it exists, so a signal that arrives right
            // after the file appears still finds it.
            live().push((std::process::id(), tmp.clone()));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => break (tmp, f),
                Err(e) => {
                    unregister_temp(&tmp);
                    tries += 1;
                    if e.kind() == std::io::ErrorKind::AlreadyExists && tries < TEMP_TRIES {
                        continue;
                    }
                    // Taken every time: name the temporary file, whose
                    // existence is the problem, not the target.
                    let at = if e.kind() == std::io::ErrorKind::AlreadyExists {
                        &tmp
                    } else {
                        target
                    };
                    return Err(IoError::os(at, e));
                }
            }
        };
        drop(section);
        let mut w = Writer {
            target: target.to_path_buf(),
            #[cfg(target_os = "linux")]
            direct: Direct::open(&tmp),
            tmp,
            file: None,
            data_start: 8 + header.len() as u64,
            slots,
            index,
            old,
        };
        if let Some(old) = &w.old {
            copy_permissions(&file, old).map_err(|e| IoError::os(target, e))?;
        }
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

    /// File offset of the next byte of tensor `i`'s data. Bytes given to
    /// [`Writer::write`] from memory at the same offset modulo
    /// [`WRITE_ALIGN`] (see [`aligned_like`]) are written without a copy.
    pub fn next_offset(&self, i: usize) -> Option<u64> {
        let slot = self.slots.get(i)?;
        Some(self.data_start + slot.begin + slot.written)
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
        #[cfg(target_os = "linux")]
        let plain = match self.direct.as_mut() {
            Some(d) if d.takes(at, bytes.len()) => {
                let supported = d
                    .write(file, at, bytes)
                    .map_err(|e| IoError::os(target, e))?;
                if !supported {
                    self.direct = None;
                }
                false
            }
            _ => true,
        };
        #[cfg(not(target_os = "linux"))]
        let plain = true;
        if plain {
            write_buffered(file, at, bytes).map_err(|e| IoError::os(target, e))?;
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
        #[cfg(target_os = "linux")]
        if let Some(mut d) = self.direct.take() {
            d.end_run(&mut file).map_err(|e| IoError::os(&target, e))?;
        }
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
        // The mode once more after the writes: a write by a process without
        // CAP_FSETID clears set-user-ID and set-group-ID.
        if let Some(old) = &self.old {
            copy_permissions(&file, old).map_err(|e| IoError::os(&target, e))?;
        }
        file.flush()
            .and_then(|_| file.sync_all())
            .map_err(|e| IoError::os(&target, e))?;
        drop(file);
        // A signal's clean-up waits for the rename and the sync of the
        // directory: it then finds the output complete, in place.
        let _section = TempSection::enter()?;
        std::fs::rename(&self.tmp, &target).map_err(|e| IoError::os(&target, e))?;
        live().retain(|(_, p)| p != &self.tmp);
        // The rename itself on disk. The output is in place already: a
        // failure here says so.
        if SYNC_AFTER_RENAME.load(Ordering::SeqCst) {
            sync_dir(parent_of(&target)).map_err(|e| IoError::Unsynced {
                path: target.clone(),
                source: e,
            })?;
        }
        Ok(size)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not finished (or finishing failed): remove the temporary file.
        let mut files = live();
        if let Some(i) = files.iter().position(|(_, p)| p == &self.tmp) {
            files.swap_remove(i);
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header longer than readers accept (a state dict of very many
    /// tensors) is refused before any file exists; one just within is
    /// built (the writer wrote files its reader then refused).
    #[test]
    fn header_over_the_readers_limit_is_refused() {
        let name = "n".repeat(1000);
        let planned = |count: usize| -> Vec<Planned> {
            (0..count)
                .map(|i| Planned {
                    name: format!("{name}{i}"),
                    dtype: Dtype::U8,
                    shape: vec![1],
                })
                .collect()
        };
        let per = build_header(&planned(1000), &[], true)
            .map(|(h, _)| h.len())
            .expect("a header of 1000 tensors")
            / 1000;
        let over = (MAX_HEADER_LEN / per) + 1000;
        let err = build_header(&planned(over), &[], true).map(|_| ());
        assert!(
            matches!(&err, Err(IoError::InvalidArgument(m)) if m.contains("more than the")),
            "{err:?}"
        );
        let within = (MAX_HEADER_LEN / per) - 1000;
        let (h, _) = build_header(&planned(within), &[], true).expect("within the limit");
        assert!(h.len() as u64 <= crate::read::MAX_HEADER);
    }

    const MAX_HEADER_LEN: usize = crate::read::MAX_HEADER as usize;

    /// Tensors of sizes around the direct-write thresholds, at unaligned
    /// offsets, each written in uneven pieces, with small writes to other
    /// tensors in between: the file holds exactly the bytes given
    /// (`misalign`: direct writes fail with `EINVAL` and fall back).
    fn mixed_writes(tag: &str, misalign: bool) {
        let dir = std::env::temp_dir().join(format!("squant-io-w-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.safetensors");
        let sizes = [
            3usize,
            DIRECT_MIN + 5,
            DIRECT_CHUNK * 2 + 4097,
            1,
            DIRECT_MIN - 1,
            DIRECT_CHUNK + 1,
            7,
        ];
        let planned: Vec<Planned> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Planned {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![n],
            })
            .collect();
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j * 31 + i * 7 + j / 4096) as u8).collect())
            .collect();
        let mut w = Writer::create(&target, &planned, &[], true).unwrap();
        #[cfg(target_os = "linux")]
        if misalign {
            if let Some(d) = w.direct.as_mut() {
                d.pad += 1;
            }
        }
        let _ = misalign;
        // Tensors 0, 3 and 6 (small) are written a byte at a time between
        // the pieces of the others.
        let mut small = [(0usize, 0usize), (3, 0), (6, 0)];
        let mut staged = Vec::new();
        for i in [1usize, 2, 4, 5] {
            let mut pos = 0;
            let mut step = 4096 * 3 + 1;
            while pos < sizes[i] {
                let n = step.min(sizes[i] - pos);
                if i == 2 {
                    // From memory in phase with the file: written without
                    // a copy.
                    let at = aligned_like(&mut staged, w.next_offset(i).unwrap(), n);
                    staged[at..at + n].copy_from_slice(&data[i][pos..pos + n]);
                    w.write(i, &staged[at..at + n]).unwrap();
                } else {
                    w.write(i, &data[i][pos..pos + n]).unwrap();
                }
                pos += n;
                step = (step * 5 / 2).min(DIRECT_CHUNK * 3 / 2);
                for (t, done) in small.iter_mut() {
                    if *done < sizes[*t] {
                        w.write(*t, &data[*t][*done..*done + 1]).unwrap();
                        *done += 1;
                    }
                }
            }
        }
        for (t, done) in small {
            w.write(t, &data[t][done..]).unwrap();
        }
        w.finish().unwrap();
        let f = SafetensorsFile::open(&target).unwrap();
        for (i, want) in data.iter().enumerate() {
            let e = f.get(&format!("t{i}")).unwrap();
            assert!(*f.map_all(e).unwrap() == want[..], "tensor {i}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    use crate::read::SafetensorsFile;

    #[test]
    fn direct_and_buffered_writes_give_the_same_file() {
        mixed_writes("direct", false);
    }

    #[test]
    fn refused_direct_writes_fall_back() {
        mixed_writes("fallback", true);
    }
}
