//! Lazy reading of a safetensors file: the header is read and checked
//! first; tensor data is memory-mapped on demand, one range at a time, and
//! unmapped when the range is dropped, or read range by range into reused
//! buffers (Linux, [`SafetensorsFile::read`]: from the page cache when the
//! range is all there, otherwise with `O_DIRECT`, which costs the CPU
//! almost nothing); either way resident memory stays bounded by what the
//! caller holds, not by the file's size.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};
use serde::de::MapAccess;

use crate::dtype::{self, Dtype};
use crate::error::{IoError, Result};
use crate::json::{self, Ints, Key, Keys, Read, Text, Typed, UInts, Walk};

/// Largest header accepted (as the safetensors library).
pub const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// One tensor as stored: name, dtype, shape and its byte range in the data
/// region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl Entry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes stored.
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// An open, validated safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    data_start: u64,
    size: u64,
    header_len: usize,
    /// Tensors in header order.
    pub entries: Vec<Entry>,
    /// `__metadata__`, in header order.
    pub metadata: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

/// A byte range of a tensor: mapped ([`SafetensorsFile::map`]) or read
/// into a buffer ([`SafetensorsFile::read`]); empty ranges hold nothing.
pub struct Region(Inner);

enum Inner {
    Empty,
    Map(Mmap),
    /// `len` bytes at `at` of `buf`.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Buf {
        buf: Vec<u8>,
        at: usize,
        len: usize,
    },
}

impl Deref for Region {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Empty => &[],
            Inner::Map(m) => m,
            Inner::Buf { buf, at, len } => &buf[*at..*at + *len],
        }
    }
}

impl Region {
    /// Whether the region is held in a buffer ([`Region::into_buffer`]).
    pub fn is_buffered(&self) -> bool {
        matches!(self.0, Inner::Buf { .. })
    }

    /// The buffer of a region read by [`SafetensorsFile::read`], to be
    /// given to the next read.
    pub fn into_buffer(self) -> Option<Vec<u8>> {
        match self.0 {
            Inner::Buf { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// Alignment of direct reads: offsets, lengths and buffer addresses.
#[cfg(target_os = "linux")]
const ALIGN: usize = 4096;

/// Python's `repr` of a string, as the messages of the Python reader showed
/// names (`'fc.weight'`).
pub fn repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The most dimensions a tensor may have (numpy's limit): a shape with
/// more is refused while the header is read, before it is kept.
pub const MAX_DIMS: usize = 64;

/// Why a shape of `n` dimensions is refused (`has N dimensions; ...`), if
/// it is.
pub fn too_many_dims(n: usize) -> Option<String> {
    (n > MAX_DIMS).then(|| format!("has {n} dimensions; squant-rs handles at most {MAX_DIMS}"))
}

/// A header as read: its tensors in order and `__metadata__`.
struct Header {
    entries: Vec<Entry>,
    metadata: Vec<(String, String)>,
}

/// Reads a header: what is wrong with it (`Err`, checked in header order,
/// as found once the whole header is known to be valid JSON) or its
/// entries. Each tensor is checked as soon as it is read; after the first
/// fault the rest is only walked.
struct HeaderReader;

impl<'de> Typed<'de> for HeaderReader {
    type Out = std::result::Result<Header, String>;
    fn other(self, _: String) -> Self::Out {
        Err("not a safetensors file (header is not a JSON object)".to_string())
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Out, A::Error> {
        let mut header = Header {
            entries: Vec::new(),
            metadata: Vec::new(),
        };
        let mut fault = None;
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            if fault.is_some() {
                map.next_value_seed(Walk(None))?;
            } else if key == "__metadata__" {
                match map.next_value_seed(Read(MetadataReader))? {
                    Some(m) => header.metadata = m,
                    None => {
                        fault = Some(
                            "corrupt header (__metadata__ must map strings to strings)".to_string(),
                        )
                    }
                }
            } else {
                match entry(&key, map.next_value_seed(Read(EntryReader))?) {
                    Ok(e) => header.entries.push(e),
                    Err(why) => fault = Some(why),
                }
            }
            keys.insert(key)?;
        }
        Ok(fault.map_or(Ok(header), Err))
    }
}

/// `__metadata__`: `null` (nothing) or an object of strings; anything else
/// is `None`.
struct MetadataReader;

impl<'de> Typed<'de> for MetadataReader {
    type Out = Option<Vec<(String, String)>>;
    fn other(self, _: String) -> Self::Out {
        None
    }
    fn null(self) -> std::result::Result<Self::Out, Self> {
        Ok(Some(Vec::new()))
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Out, A::Error> {
        let mut out = Some(Vec::new());
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            let value = map.next_value_seed(Read(Text::<false>))?;
            match (&mut out, value) {
                (Some(out), Ok(v)) => out.push((key.to_string(), v)),
                _ => out = None,
            }
            keys.insert(key)?;
        }
        Ok(out)
    }
}

/// The fields of a tensor's entry as read (`None` for a field that is
/// missing or not of its type; `dtype`: the name, or the value shown).
#[derive(Default)]
struct Fields {
    dtype: Option<std::result::Result<String, String>>,
    shape: Option<Ints>,
    offsets: Option<Ints>,
}

/// A tensor's entry: its fields if it is an object.
struct EntryReader;

impl<'de> Typed<'de> for EntryReader {
    type Out = Option<Fields>;
    fn other(self, _: String) -> Self::Out {
        None
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Out, A::Error> {
        let mut f = Fields::default();
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            match key.as_ref() {
                "dtype" => f.dtype = Some(map.next_value_seed(Read(Text::<true>))?),
                // Past `MAX_DIMS` dimensions only counted (see `entry`).
                "shape" => f.shape = map.next_value_seed(Read(UInts(MAX_DIMS)))?,
                "data_offsets" => f.offsets = map.next_value_seed(Read(UInts(2)))?,
                _ => map.next_value_seed(Walk(None))?,
            }
            keys.insert(key)?;
        }
        Ok(Some(f))
    }
}

/// The entry of tensor `name` from its fields, or what is wrong with it.
fn entry(name: &str, fields: Option<Fields>) -> std::result::Result<Entry, String> {
    let bad_entry = || format!("corrupt header entry for {}", repr(name));
    let Some(f) = fields else {
        return Err(bad_entry());
    };
    let dtype = match f.dtype {
        Some(Ok(s)) => dtype::from_name(&s).ok_or_else(|| {
            format!(
                "tensor {} has an unsupported dtype {}",
                repr(name),
                repr(&s)
            )
        })?,
        other => {
            let shown = other.map_or("None".to_string(), |v| v.unwrap_or_else(|shown| shown));
            return Err(format!(
                "tensor {} has an unsupported dtype {shown}",
                repr(name)
            ));
        }
    };
    let shape = f.shape.ok_or_else(bad_entry)?;
    let offsets = f.offsets.ok_or_else(bad_entry)?;
    let (2, &[begin, end]) = (offsets.len, &offsets.values[..]) else {
        return Err(bad_entry());
    };
    if begin > end {
        return Err(bad_entry());
    }
    if let Some(why) = too_many_dims(shape.len) {
        return Err(format!("tensor {} {why}", repr(name)));
    }
    let shape = shape.values;
    let Some(nbytes) = dtype::checked_nbytes(dtype::item_size(dtype), &shape) else {
        return Err(format!(
            "corrupt header: tensor {} has a shape too large to load ({:?})",
            repr(name),
            shape
        ));
    };
    if nbytes != end - begin {
        return Err(format!(
            "corrupt header: tensor {} size does not match its shape",
            repr(name)
        ));
    }
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Whether `a` and `b` name the same existing file or directory (the same
/// device and inode, symlinks followed; elsewhere the same canonical path).
#[cfg(unix)]
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
pub fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// What a file that is not a regular file is, as messages name it.
pub fn kind_of(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        } else if ft.is_char_device() {
            return "a character device";
        } else if ft.is_block_device() {
            return "a block device";
        } else if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// The error for an input that is not a regular file (a FIFO or a device
/// would block or never end).
pub fn not_regular(path: &Path, ft: &std::fs::FileType) -> IoError {
    IoError::InvalidArgument(format!(
        "input {} is {}, not a regular file: squant-rs reads regular files only",
        crate::error::show_path(path),
        kind_of(ft)
    ))
}

/// Refuses an input that is not a regular file, before anything opens it
/// (symlinks followed).
pub fn check_regular(path: &Path) -> Result<()> {
    let m = std::fs::metadata(path).map_err(|e| IoError::os(path, e))?;
    if m.is_file() {
        Ok(())
    } else {
        Err(not_regular(path, &m.file_type()))
    }
}

/// Opens an input for reading without blocking on a FIFO (`O_NONBLOCK`,
/// which changes nothing for a regular file) and refuses anything but a
/// regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| IoError::os(path, e))?;
    let m = file.metadata().map_err(|e| IoError::os(path, e))?;
    if !m.is_file() {
        return Err(not_regular(path, &m.file_type()));
    }
    Ok(file)
}

impl SafetensorsFile {
    /// Opens `path` and checks its header and layout (no tensor data is
    /// read). Anything but a regular file is refused.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let fail = |what: String| IoError::format(path, what);
        let mut file = open_regular(path)?;
        let size = file.metadata().map_err(|e| IoError::os(path, e))?.len();
        if size < 8 {
            return Err(fail(format!(
                "not a safetensors file ({size} bytes, too short for a header)"
            )));
        }
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .map_err(|e| IoError::os(path, e))?;
        let n = u64::from_le_bytes(head);
        if !(2..=MAX_HEADER).contains(&n) {
            return Err(fail(
                "not a safetensors file (no valid header length)".to_string(),
            ));
        }
        if 8 + n > size {
            return Err(fail(format!(
                "truncated or not a safetensors file (header of {n} bytes, file has {size} bytes)"
            )));
        }
        let header_len = n as usize;
        let mut raw = Vec::new();
        raw.try_reserve_exact(header_len)
            .map_err(|_| IoError::os(path, std::io::ErrorKind::OutOfMemory.into()))?;
        raw.resize(header_len, 0);
        file.read_exact(&mut raw)
            .map_err(|e| IoError::os(path, e))?;
        let not_json = || fail("not a safetensors file (header is not valid JSON)".to_string());
        let text = std::str::from_utf8(&raw).map_err(|_| not_json())?;
        let header = match json::parse_with(text, HeaderReader) {
            Ok(Ok(h)) => h,
            Ok(Err(why)) => return Err(fail(why)),
            Err(e) if json::is_duplicate(&e) => {
                return Err(fail(format!("corrupt header ({e})")));
            }
            Err(e)
                if e.contains("surrogate") || e.contains("unicode") || e.contains("hex escape") =>
            {
                return Err(fail(
                    "corrupt header (a name or value is not valid Unicode (a lone surrogate))"
                        .to_string(),
                ));
            }
            Err(_) => return Err(not_json()),
        };
        drop(raw);
        let Header { entries, metadata } = header;
        let mut spans: Vec<&Entry> = entries.iter().collect();
        spans.sort_by_key(|e| (e.begin, e.end));
        let mut pos = 0usize;
        for e in &spans {
            if e.begin != pos {
                return Err(fail(format!(
                    "corrupt header: data of {} overlaps or leaves a gap",
                    repr(&e.name)
                )));
            }
            pos = e.end;
        }
        drop(spans);
        let data_len = size - 8 - n;
        if data_len < pos as u64 {
            return Err(fail(format!(
                "truncated file ({data_len} of {pos} bytes of tensor data present)"
            )));
        }
        if data_len > pos as u64 {
            return Err(fail(format!(
                "corrupt file ({} unexpected bytes after the tensor data)",
                data_len - pos as u64
            )));
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            size,
            header_len,
            entries,
            metadata,
            index,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` names this very file (the same device and inode,
    /// symlinks followed; elsewhere the same canonical path): a file that
    /// must not be written over while it is read.
    pub fn is_same_file(&self, path: &Path) -> bool {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            match (self.file.metadata(), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            }
        }
        #[cfg(not(unix))]
        {
            matches!(
                (self.path.canonicalize(), path.canonicalize()),
                (Ok(a), Ok(b)) if a == b
            )
        }
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The header's length in bytes (without the 8-byte length prefix).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The tensor stored under `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Maps `len` bytes of `entry` from byte `start` of its data.
    pub fn map(&self, entry: &Entry, start: usize, len: usize) -> Result<Region> {
        if len == 0 {
            return Ok(Region(Inner::Empty));
        }
        check_range(entry, start, len)?;
        let offset = self.data_start + (entry.begin + start) as u64;
        // SAFETY: a read-only mapping of a range the header check proved to
        // lie inside the file. The file is opened read-only; a concurrent
        // writer could change the bytes under us, as with every
        // memory-mapped reader, which yields wrong values (caught by the
        // checksums), not UB in this safe-Rust view of plain bytes. Every caller reads the whole
        // range, so its pages are mapped in the one system call
        // (MAP_POPULATE) rather than one fault at a time.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len)
                .populate()
                .map(&self.file)
        }
        .map_err(|e| IoError::os(&self.path, e))?;
        Ok(Region(Inner::Map(map)))
    }

    /// A second descriptor of this file (the same inode, through
    /// `/proc/self/fd`) that reads with `O_DIRECT`, for
    /// [`SafetensorsFile::read`]; `None` where that is not possible.
    #[cfg(target_os = "linux")]
    pub fn open_direct(&self) -> Option<File> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .ok()
    }

    /// Reads `len` bytes of `entry` from byte `start` of its data into
    /// `buf` (reused: grown when too small, never cleared). A range whose
    /// pages are all in the page cache is copied from it; any other is
    /// read straight from the device through `direct` (from
    /// [`SafetensorsFile::open_direct`]: no page cache, no copy, little
    /// CPU time), whole aligned pages around the range; without it (or
    /// when the file system refuses, which sets it to `None`), with plain
    /// reads.
    #[cfg(target_os = "linux")]
    pub fn read(
        &self,
        direct: &mut Option<File>,
        entry: &Entry,
        start: usize,
        len: usize,
        mut buf: Vec<u8>,
    ) -> Result<Region> {
        use std::io::ErrorKind;
        use std::os::unix::fs::FileExt;
        if len == 0 {
            return Ok(Region(Inner::Empty));
        }
        check_range(entry, start, len)?;
        let os = |e| IoError::os(&self.path, e);
        let offset = self.data_start + (entry.begin + start) as u64;
        let first = offset / ALIGN as u64 * ALIGN as u64;
        let skip = (offset - first) as usize;
        let need = skip + len;
        let span = need.next_multiple_of(ALIGN);
        if buf.len() < span + ALIGN {
            buf.resize(span + ALIGN, 0);
        }
        let pad = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        let dst = &mut buf[pad..pad + span];
        let mut done = 0usize;
        // All in the page cache: a copy from memory (as `cat`) below.
        let from_cache = self.cached(first, need);
        // Otherwise from the device, whole aligned pages.
        while !from_cache && done < need && done.is_multiple_of(ALIGN) && pad < ALIGN {
            let Some(d) = direct.as_ref() else { break };
            match d.read_at(&mut dst[done..], first + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
                Err(e) => return Err(os(e)),
            }
        }
        while done < need {
            match self.file.read_at(&mut dst[done..need], first + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(os(e)),
            }
        }
        if done < need {
            return Err(IoError::format(
                &self.path,
                "truncated file (it became shorter while being read)",
            ));
        }
        Ok(Region(Inner::Buf {
            buf,
            at: pad + skip,
            len,
        }))
    }

    /// Whether all `len` bytes at `offset` (a multiple of the page size)
    /// are in the page cache: `mincore` on a mapping of them that is never
    /// read (asking starts no read-ahead, unlike a non-blocking read).
    /// Errors answer `false`.
    #[cfg(target_os = "linux")]
    fn cached(&self, offset: u64, len: usize) -> bool {
        // SAFETY: as in `map`; the mapping's bytes are never read.
        let Ok(map) = (unsafe { MmapOptions::new().offset(offset).len(len).map(&self.file) })
        else {
            return false;
        };
        let mut resident = vec![0u8; len.div_ceil(ALIGN)];
        // SAFETY: `map` is a live mapping of `len` bytes starting on a page
        // (`offset` is page-aligned), `resident` has one byte per page.
        let r = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                len,
                resident.as_mut_ptr(),
            )
        };
        r == 0 && resident.iter().all(|&b| b & 1 == 1)
    }

    /// Maps a whole tensor.
    pub fn map_all(&self, entry: &Entry) -> Result<Region> {
        self.map(entry, 0, entry.nbytes())
    }
}

/// `InvalidArgument` unless bytes `start..start + len` lie within `entry`'s data.
fn check_range(entry: &Entry, start: usize, len: usize) -> Result<()> {
    let in_range = start
        .checked_add(len)
        .is_some_and(|stop| stop <= entry.nbytes());
    if in_range {
        Ok(())
    } else {
        Err(IoError::InvalidArgument(format!(
            "range {start}+{len} outside tensor {}",
            repr(&entry.name)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `read` (from the page cache, from the device with `O_DIRECT`, and
    /// with plain reads; reusing one buffer) gives the bytes `map` gives,
    /// for ranges at unaligned offsets.
    #[cfg(target_os = "linux")]
    #[test]
    fn read_equals_map() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("squant-io-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let n = 3 * 1024 * 1024 + 5;
        let header = format!(
            "{{\"a\":{{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}},\
             \"b\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[3,{}]}}}}",
            n + 3
        );
        let data: Vec<u8> = (0..n + 3).map(|i| (i * 131 + i / 4093) as u8).collect();
        let mut f = File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let st = SafetensorsFile::open(&path).unwrap();
        let e = st.get("b").unwrap().clone();
        let ranges = [
            (0, n),
            (1, 4096),
            (4095, 8193),
            (n - 7, 7),
            (12345, 2_000_000),
        ];
        let mut buf = Vec::new();
        for evict in [false, true, false] {
            for use_direct in [true, false] {
                let mut direct = if use_direct { st.open_direct() } else { None };
                assert_eq!(direct.is_some(), use_direct);
                for &(start, len) in &ranges {
                    if evict {
                        // SAFETY: a plain system call on our descriptor.
                        unsafe {
                            libc::posix_fadvise(
                                st.file.as_raw_fd(),
                                0,
                                0,
                                libc::POSIX_FADV_DONTNEED,
                            )
                        };
                    }
                    let r = st.read(&mut direct, &e, start, len, buf).unwrap();
                    assert!(*r == *st.map(&e, start, len).unwrap(), "{start}+{len}");
                    assert!(*r == data[3 + start..3 + start + len]);
                    buf = r.into_buffer().unwrap();
                }
            }
        }
        assert!(st.read(&mut None, &e, n - 1, 2, buf).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A safetensors file of that header and data in a fresh directory.
    fn raw_file(tag: &str, header: &str, data: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("squant-io-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A shape past `MAX_DIMS` is refused as the header is read, naming its
    /// length (it was kept whole, one JSON tree node per dimension, then
    /// parsed again); other faults of the entry come first, as before.
    #[test]
    fn long_shapes_refused_as_read() {
        let entry = |shape: &str| {
            format!(r#"{{"a":{{"dtype":"U8","shape":[{shape}],"data_offsets":[0,1]}}}}"#)
        };
        let ones = |n: usize| vec!["1"; n].join(",");
        let open = |header: &str| {
            let path = raw_file("dims", header, &[0]);
            let r = SafetensorsFile::open(&path).map(|f| f.entries[0].shape.len());
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
            r.map_err(|e| e.to_string().rsplit(": ").next().unwrap().to_string())
        };
        assert_eq!(open(&entry(&ones(64))), Ok(64));
        let million = entry(&ones(1_000_000));
        assert_eq!(
            open(&million).unwrap_err(),
            "tensor 'a' has 1000000 dimensions; squant-rs handles at most 64"
        );
        let header = json::parse_with(&million, HeaderReader).unwrap();
        assert!(header.is_err());
        // A bad dimension after the 64th: a corrupt entry, as any bad one.
        let bad = format!("{},-1", ones(70));
        assert_eq!(
            open(&entry(&bad)).unwrap_err(),
            "corrupt header entry for 'a'"
        );
        // Malformed JSON anywhere comes before a fault of an entry.
        let last = million.len() - 1;
        let broken = format!(r#"{},"x":{{"a":1,"a":2}}}}"#, &million[..last]);
        assert!(open(&broken)
            .unwrap_err()
            .starts_with("corrupt header (duplicate key \"a\""));
    }

    #[test]
    fn repr_matches_python() {
        assert_eq!(repr("fc.weight"), "'fc.weight'");
        assert_eq!(repr("it's"), "\"it's\"");
        assert_eq!(repr("a\nb\x1b"), "'a\\nb\\x1b'");
    }
}
