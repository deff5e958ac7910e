//! Sharded checkpoints in the Hugging Face layout: a directory with
//! `model.safetensors.index.json` (`{"metadata": {...}, "weight_map":
//! {tensor: shard file}}`) and the shard files next to it. Quantized shard
//! by shard into the same layout (one output shard per input shard, index
//! rewritten), built in a temporary directory (`.OUT.<unique>.tmp`) renamed
//! into place at the end: an error leaves no partial output directory. An
//! empty output directory that is a mount point cannot be renamed over: the
//! output is then built in a temporary directory inside it and its files
//! moved into it at the end, the index last (an error removes those moved);
//! so is an existing empty output directory whose parent cannot take the
//! temporary directory (not writable). A temporary directory holds a lock
//! while in use: one that a killed run left inside the output directory is
//! removed by the next run, which writes the output as if it were not there.

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

use serde::de::MapAccess;
use serde_json::{Map, Value};

use crate::error::{IoError, Result};
use crate::format::{base_of, Kind, SquantFile, CODES, SCALE, ZERO_POINT};
use crate::json::{self, Key, Keys, Pairs, Read, Text, Typed, Walk};
use crate::quant::{quantize_files, selection, Job, Options, ProgressFn, Report};
use crate::read::{repr, SafetensorsFile};
use crate::write::{
    is_temp_name_of, parent_of, register_temp, sync_dir, temp_name, unregister_temp, TempSection,
    TEMP_TRIES,
};

/// File name of the index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// A parsed index: its directory and the shard files in order of first use.
#[derive(Debug, Clone)]
pub struct ShardIndex {
    pub dir: PathBuf,
    pub index_path: PathBuf,
    pub shards: Vec<String>,
    /// Tensor name -> shard file, in index order.
    pub weight_map: Vec<(String, String)>,
}

/// Whether `path` is a sharded checkpoint (a directory with an index, or
/// the index file itself).
pub fn is_sharded(path: &Path) -> bool {
    (path.is_dir() && path.join(INDEX_NAME).is_file())
        || path.file_name().is_some_and(|n| n == INDEX_NAME)
}

/// The largest index read (as the largest header): anything bigger is
/// refused before it is read.
pub const MAX_INDEX: u64 = crate::read::MAX_HEADER;

/// An index's `weight_map` (tensor -> shard file, `Err` where that is not
/// a string), in index order; `None` when there is no such object.
struct IndexReader;

impl<'de> Typed<'de> for IndexReader {
    type Out = Option<Vec<(String, std::result::Result<String, String>)>>;
    fn other(self, _: String) -> Self::Out {
        None
    }
    fn object<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Out, A::Error> {
        let mut weight_map = None;
        let mut keys = Keys::default();
        while let Some(Key(key)) = map.next_key()? {
            if key == "weight_map" {
                weight_map = map.next_value_seed(Read(Pairs(Text::<false>)))?;
            } else {
                map.next_value_seed(Walk(None))?;
            }
            keys.insert(key)?;
        }
        Ok(weight_map)
    }
}

/// Reads the index of a directory (or the index file itself).
pub fn read_index(path: &Path) -> Result<ShardIndex> {
    let index_path = if path.is_dir() {
        path.join(INDEX_NAME)
    } else {
        path.to_path_buf()
    };
    let dir = match index_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fail = |what: String| IoError::format(&index_path, what);
    let too_large = |size: u64| {
        fail(format!(
            "not a safetensors index ({size} bytes: more than the {} MiB an index may have)",
            MAX_INDEX >> 20
        ))
    };
    let file = crate::read::open_regular(&index_path)?;
    let size = file
        .metadata()
        .map_err(|e| IoError::os(&index_path, e))?
        .len();
    if size > MAX_INDEX {
        return Err(too_large(size));
    }
    let mut text = Vec::new();
    text.try_reserve_exact(size as usize)
        .map_err(|_| IoError::os(&index_path, std::io::ErrorKind::OutOfMemory.into()))?;
    // One byte past the limit read at most, should the file grow meanwhile.
    file.take(MAX_INDEX + 1)
        .read_to_end(&mut text)
        .map_err(|e| IoError::os(&index_path, e))?;
    if text.len() as u64 > MAX_INDEX {
        return Err(too_large(text.len() as u64));
    }
    let text = std::str::from_utf8(&text)
        .map_err(|_| fail("not a safetensors index (not UTF-8 text)".to_string()))?;
    let map = json::parse_with(text, IndexReader)
        .map_err(|e| fail(format!("not a safetensors index ({e})")))?
        .ok_or_else(|| fail("not a safetensors index (no 'weight_map' object)".to_string()))?;
    let mut shards = Vec::new();
    let mut seen = HashSet::new();
    let mut weight_map = Vec::with_capacity(map.len());
    for (name, shard) in map {
        let shard =
            shard.map_err(|_| fail(format!("shard of {} is not a file name", repr(&name))))?;
        let plain = !shard.is_empty()
            && shard != "."
            && shard != ".."
            && !shard.contains('/')
            && !shard.contains('\\');
        if !plain {
            return Err(fail(format!(
                "shard {} is not a file name in the index's directory",
                repr(&shard)
            )));
        }
        if seen.insert(shard.clone()) {
            shards.push(shard.clone());
        }
        weight_map.push((name, shard));
    }
    if shards.is_empty() {
        return Err(fail("the index lists no tensors".to_string()));
    }
    Ok(ShardIndex {
        dir,
        index_path,
        shards,
        weight_map,
    })
}

/// Opens every shard (headers only, as inputs to quantize: a squant-rs
/// shard is refused, see [`crate::quant::open_input`]) and checks that each
/// holds exactly the tensors the index maps to it.
pub fn open_shards(index: &ShardIndex) -> Result<Vec<SafetensorsFile>> {
    let mut by_shard: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (name, shard) in &index.weight_map {
        by_shard.entry(shard).or_default().insert(name);
    }
    let mut files = Vec::with_capacity(index.shards.len());
    for shard in &index.shards {
        let path = index.dir.join(shard);
        let f = crate::quant::open_input(&path)?;
        let names: HashSet<&str> = f.entries.iter().map(|e| e.name.as_str()).collect();
        let listed = by_shard.get(shard.as_str()).cloned().unwrap_or_default();
        if names != listed {
            return Err(IoError::format(
                &path,
                "the shard's tensors differ from those the index maps to it",
            ));
        }
        files.push(f);
    }
    Ok(files)
}

/// What [`quantize_sharded`] did: the merged report and the shard count.
#[derive(Debug, Clone, Default)]
pub struct ShardedReport {
    pub report: Report,
    pub shards: usize,
    /// Sum of the input shard files' sizes.
    pub input_size: u64,
}

/// Removes a temporary directory unless disarmed; the lock it holds on it
/// (see [`lock_dir`]) is released after the removal.
struct TempDir(Option<PathBuf>, #[allow(dead_code)] Option<std::fs::File>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Still registered while it is being removed: a signal's
            // clean-up that comes meanwhile removes it too, and makes sure
            // it is gone before the process ends.
            let _ = std::fs::remove_dir_all(&p);
            unregister_temp(&p);
        }
    }
}

/// Whether the last component of `path` is `.` or `..` (or there is none:
/// `/`), trailing slashes aside.
fn names_a_dot(path: &Path) -> bool {
    let text = path.to_string_lossy();
    let trimmed = text.trim_end_matches('/');
    let last = trimmed.rsplit('/').next().unwrap_or("");
    last.is_empty() || last == "." || last == ".."
}

/// Takes an exclusive lock (`flock(2)`) on the directory `dir`, held until
/// the file returned is closed, that is at the latest when the process ends
/// (however it ends, `SIGKILL` included): `Ok(None)` if another process
/// holds it, an error if it cannot be locked (a file system without locks).
#[cfg(unix)]
fn lock_dir(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: a plain system call on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// [`lock_dir`] on `dir`, waiting (at most 10 s) while another process
/// holds it; `None` where it cannot be had (no locks on that file system,
/// or held all that time): the caller goes on without it.
fn wait_for_lock(dir: &Path) -> Option<std::fs::File> {
    let start = std::time::Instant::now();
    loop {
        match lock_dir(dir) {
            Ok(Some(f)) => return Some(f),
            Ok(None) if start.elapsed().as_secs() < 10 => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            _ => return None,
        }
    }
}

#[cfg(not(unix))]
fn lock_dir(_dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Whether the open file `f` is the one at `path` now.
#[cfg(unix)]
fn is_at(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_at(_f: &std::fs::File, path: &Path) -> bool {
    path.is_dir()
}

/// Creates a new temporary directory in `dir` for the output `out_dir`
/// (`.NAME.<unique>.tmp`, registered for [`crate::remove_live_temp_files`])
/// and locks it (see [`lock_dir`]; no lock where the file system has
/// none); a name already taken (say left by a killed run) is not an error:
/// another is tried, as when another run removing leftovers (see
/// [`remove_leftovers`]) locked the new directory first.
fn create_temp_dir(dir: &Path, out_dir: &Path) -> Result<(PathBuf, Option<std::fs::File>)> {
    let _section = TempSection::enter()?;
    let mut tries = 0;
    loop {
        let tmp = temp_name(dir, out_dir);
        // Registered before it exists, so a signal that arrives right after
        // the directory appears still finds it.
        register_temp(&tmp);
        let made = std::fs::create_dir(&tmp).map(|()| match lock_dir(&tmp) {
            // Still there once locked: nobody can remove it from now on.
            Ok(Some(lock)) if is_at(&lock, &tmp) => Some(Some(lock)),
            // Locked (or removed) first by a run removing leftovers.
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // A file system without locks: used unlocked.
            Err(_) => Some(None),
        });
        match made {
            Ok(Some(lock)) => return Ok((tmp, lock)),
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                unregister_temp(&tmp);
                // The output cannot be created there either.
                return Err(IoError::os(out_dir, e));
            }
            taken => {
                // Taken, or being removed by another run (which removes it).
                unregister_temp(&tmp);
                tries += 1;
                if tries < TEMP_TRIES {
                    continue;
                }
                // Name what exists: the temporary directory.
                let e = taken
                    .err()
                    .unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into());
                return Err(IoError::os(&tmp, e));
            }
        }
    }
}

/// Removes what killed runs left in the output directory `out_dir` (built
/// in place: a mount point): their temporary directories, which no process
/// holds locked any more. Only when there is nothing else in it (anything
/// else is left for the emptiness check to report, and nothing is
/// removed); one that another run holds locked (or that cannot be locked to
/// tell) is an error naming it.
fn remove_leftovers(out_dir: &Path) -> Result<()> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(out_dir).map_err(|e| IoError::os(out_dir, e))? {
        let entry = entry.map_err(|e| IoError::os(out_dir, e))?;
        let ours = is_temp_name_of(&entry.file_name(), out_dir)
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !ours {
            return Ok(());
        }
        found.push(entry.path());
    }
    let mut locked = Vec::with_capacity(found.len());
    for dir in found {
        let name = crate::error::show_path(Path::new(dir.file_name().unwrap_or_default()));
        match lock_dir(&dir) {
            Ok(Some(lock)) => locked.push((dir, lock)),
            Ok(None) => {
                return Err(IoError::InvalidArgument(format!(
                    "output directory is being written by another run (its temporary directory {name} is in use): {}",
                    crate::error::show_path(out_dir)
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                return Err(IoError::InvalidArgument(format!(
                    "output directory holds the temporary directory {name} of another run, in progress or killed (remove it if no run is writing there): {}",
                    crate::error::show_path(out_dir)
                )))
            }
        }
    }
    // Removed while locked: a run that creates a directory of this name
    // meanwhile cannot lock it, and tries another.
    for (dir, _lock) in &locked {
        std::fs::remove_dir_all(dir).map_err(|e| IoError::os(dir, e))?;
    }
    Ok(())
}

/// Whether the directory `dir` is a mount point: on another device than
/// its parent, or (Linux) the root of a mount, as a bind mount of a
/// directory of the same file system is. Such a directory cannot be
/// renamed over (`EBUSY`), nor can anything be renamed into it from
/// outside (`EXDEV`).
fn is_mount_point(dir: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(d), Ok(p)) = (std::fs::metadata(dir), std::fs::metadata(dir.join(".."))) {
            if d.dev() != p.dev() || d.ino() == p.ino() {
                return true;
            }
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        // STATX_ATTR_MOUNT_ROOT (Linux 5.8); older kernels leave it out of
        // the mask.
        const MOUNT_ROOT: u64 = 0x2000;
        if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
            // SAFETY: statx(2) fills a zeroed struct of the right type; the
            // path is NUL-terminated.
            let mut st: libc::statx = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, 0, &mut st) };
            if r == 0 && st.stx_attributes_mask & MOUNT_ROOT != 0 {
                return st.stx_attributes & MOUNT_ROOT != 0;
            }
        }
    }
    let _ = dir;
    false
}

/// Gives the directory `dir` the permission bits (and, where allowed, the
/// owner) of the empty directory it replaces.
#[cfg(unix)]
fn copy_dir_permissions(dir: &Path, old: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Not root: the directory keeps this user's owner (the error is expected).
    let _ = std::os::unix::fs::chown(dir, Some(old.uid()), Some(old.gid()));
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(old.mode() & 0o7777))
}

#[cfg(not(unix))]
fn copy_dir_permissions(dir: &Path, old: &std::fs::Metadata) -> std::io::Result<()> {
    std::fs::set_permissions(dir, old.permissions())
}

/// Moves the files `names` of the staging directory `tmp` (inside
/// `out_dir`) into `out_dir`, in order (the index last, so that the
/// directory is a checkpoint only once every shard is there), then removes
/// `tmp` and syncs `out_dir`. On a failure the files already moved are
/// removed again, newest first: `out_dir` is left empty, as it was. A
/// signal's clean-up waits until the moves are done (or undone).
fn move_into(tmp: &Path, out_dir: &Path, names: &[&str]) -> Result<()> {
    let _section = TempSection::enter()?;
    let mut moved: Vec<PathBuf> = Vec::with_capacity(names.len());
    let mut run = || -> Result<()> {
        for name in names {
            let dst = out_dir.join(name);
            std::fs::rename(tmp.join(name), &dst).map_err(|e| IoError::os(&dst, e))?;
            moved.push(dst);
        }
        std::fs::remove_dir(tmp).map_err(|e| IoError::os(out_dir, e))
    };
    if let Err(e) = run() {
        for f in moved.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        return Err(e);
    }
    unregister_temp(tmp);
    sync_dir(out_dir).map_err(|e| IoError::Unsynced {
        path: out_dir.to_path_buf(),
        source: e,
    })
}

/// Quantizes a sharded checkpoint into `out_dir`, which must not exist or
/// be an empty directory (see the module's documentation for how it is
/// written; an empty directory replaced keeps its permissions).
pub fn quantize_sharded(
    src: &Path,
    out_dir: &Path,
    opts: &Options,
    require_selection: bool,
    progress: &mut ProgressFn<'_>,
) -> Result<ShardedReport> {
    let index = read_index(src)?;
    let files = open_shards(&index)?;
    let selections: Vec<Vec<bool>> = files.iter().map(|f| selection(f, opts)).collect();
    if require_selection && !selections.iter().flatten().any(|&s| s) {
        return Err(IoError::InvalidArgument(format!(
            "{}: no tensor to quantize (none is a floating tensor of 2+ dimensions matching the include patterns)",
            crate::error::show_path(src)
        )));
    }
    // Decided before any work: the output is built in a temporary
    // directory next to `out_dir` and renamed onto it, which cannot be done
    // through a symlink (the link would be replaced) or onto `.`/`..` or
    // the current directory by any other name (it would be removed under
    // the caller).
    if names_a_dot(out_dir) || crate::read::same_file(out_dir, Path::new(".")) {
        return Err(IoError::InvalidArgument(format!(
            "output directory {} names the current or a parent directory: give a new or empty directory by its name (the output is renamed into place)",
            crate::error::show_path(out_dir)
        )));
    }
    // Trailing slashes dropped first: an lstat of `lnk/` (what tab
    // completion gives) follows the link.
    let named: PathBuf = out_dir.components().collect();
    if std::fs::symlink_metadata(&named).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(IoError::InvalidArgument(format!(
            "output directory {} is a symbolic link: give the directory itself (the output is built next to it and renamed into place)",
            crate::error::show_path(out_dir)
        )));
    }
    // Held while OUT is checked and the temporary directory made (inside
    // it on a mount point): a run starting at the same instant then finds
    // this one's temporary directory, in use, instead of an empty OUT.
    let out_lock = if out_dir.is_dir() {
        wait_for_lock(out_dir)
    } else {
        None
    };
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(IoError::InvalidArgument(format!(
            "output directory exists and is not a directory: {}",
            crate::error::show_path(out_dir)
        )));
    }
    if out_dir.exists() {
        if out_dir.is_dir() {
            remove_leftovers(out_dir)?;
        }
        let empty = out_dir.is_dir()
            && std::fs::read_dir(out_dir)
                .map_err(|e| IoError::os(out_dir, e))?
                .next()
                .is_none();
        if !empty {
            return Err(IoError::InvalidArgument(format!(
                "output directory exists and is not empty: {}",
                crate::error::show_path(out_dir)
            )));
        }
    }
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // An existing (empty) directory that is a mount point (`docker -v
    // host/out:/out`) cannot be replaced by a rename: the output is then
    // built inside it and its files are moved into it at the end, the index
    // last. So is one whose parent cannot take the temporary directory
    // (not writable: the rename could not be made there either).
    let existing = std::fs::metadata(out_dir).ok().filter(|m| m.is_dir());
    let mut in_place = existing.is_some() && is_mount_point(out_dir);
    let (tmp, lock) = match create_temp_dir(if in_place { out_dir } else { &parent }, out_dir) {
        Err(IoError::Os { .. }) if existing.is_some() && !in_place => {
            in_place = true;
            create_temp_dir(out_dir, out_dir)?
        }
        made => made?,
    };
    drop(out_lock);
    let mut guard = TempDir(Some(tmp.clone()), lock);

    let total: u64 = files
        .iter()
        .flat_map(|f| f.entries.iter())
        .map(|e| e.nbytes() as u64)
        .sum();
    let mut merged = ShardedReport {
        shards: files.len(),
        ..ShardedReport::default()
    };
    let outs: Vec<PathBuf> = index.shards.iter().map(|s| tmp.join(s)).collect();
    let jobs: Vec<Job<'_>> = files
        .iter()
        .zip(&selections)
        .zip(&outs)
        .map(|((src, selected), dst)| Job { src, dst, selected })
        .collect();
    // One pipeline over all shards: the next shard is read and quantized
    // while the previous one is being completed.
    // Errors name the output the caller gave, not the temporary directory.
    // A shard renamed into the temporary directory whose sync failed is a
    // plain failure: the output is not in place.
    let named = |e: IoError| match e {
        IoError::Os { path, source } | IoError::Unsynced { path, source } => {
            match path.strip_prefix(&tmp) {
                Ok(rest) => IoError::os(&out_dir.join(rest), source),
                Err(_) => IoError::Os { path, source },
            }
        }
        e => e,
    };
    let reports = quantize_files(&jobs, opts, progress, 0, total, true).map_err(named)?;
    let mut weight_map = Map::new();
    for (((file, sel), shard), r) in files
        .iter()
        .zip(&selections)
        .zip(&index.shards)
        .zip(reports)
    {
        merged.input_size += file.size();
        merged.report.tensors += r.tensors;
        merged.report.size_before += r.size_before;
        merged.report.size_after += r.size_after;
        for (e, &q) in file.entries.iter().zip(sel) {
            if q {
                for s in [CODES, SCALE, ZERO_POINT] {
                    weight_map.insert(format!("{}{s}", e.name), Value::from(shard.as_str()));
                }
            } else {
                weight_map.insert(e.name.clone(), Value::from(shard.as_str()));
            }
        }
        merged.report.layers.extend(r.layers);
    }
    let data_size: u64 = index
        .shards
        .iter()
        .map(|s| {
            SafetensorsFile::open(&tmp.join(s))
                .map(|f| f.entries.iter().map(|e| e.nbytes() as u64).sum::<u64>())
        })
        .sum::<Result<u64>>()
        .map_err(named)?;
    let mut meta = Map::new();
    meta.insert("total_size".to_string(), Value::from(data_size));
    meta.insert(
        "format".to_string(),
        Value::from(crate::format::FORMAT_NAME),
    );
    let mut doc = Map::new();
    doc.insert("metadata".to_string(), Value::Object(meta));
    doc.insert("weight_map".to_string(), Value::Object(weight_map));
    let text = serde_json::to_string_pretty(&Value::Object(doc))
        .map_err(|e| IoError::InvalidArgument(e.to_string()))?;
    let index_out = tmp.join(INDEX_NAME);
    // The index, the shards (synced as they were completed) and the
    // directory's entries on disk before the directory is renamed into
    // place, and that rename after.
    let write_index = || -> Result<()> {
        let _section = TempSection::enter()?;
        let io = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&index_out)?;
            f.write_all(format!("{text}\n").as_bytes())?;
            f.sync_all()?;
            sync_dir(&tmp)
        };
        io().map_err(|e| IoError::os(out_dir, e))
    };
    write_index()?;
    if in_place {
        let mut names: Vec<&str> = index.shards.iter().map(String::as_str).collect();
        names.push(INDEX_NAME);
        move_into(&tmp, out_dir, &names)?;
        guard.0 = None;
    } else {
        // The empty directory it replaces keeps its permissions.
        if let Some(old) = &existing {
            copy_dir_permissions(&tmp, old).map_err(|e| IoError::os(out_dir, e))?;
        }
        // A signal's clean-up waits for the rename and the sync (then finds
        // the output complete, in place).
        let _section = TempSection::enter()?;
        // rename(2) replaces an empty directory: nothing is removed first,
        // so a failure leaves an existing `out_dir` as it was.
        std::fs::rename(&tmp, out_dir).map_err(|e| IoError::os(out_dir, e))?;
        unregister_temp(&tmp);
        guard.0 = None;
        sync_dir(parent_of(out_dir)).map_err(|e| IoError::Unsynced {
            path: out_dir.to_path_buf(),
            source: e,
        })?;
    }
    Ok(merged)
}

/// The squant-rs files of a sharded output (or one file): what
/// `load_quantized` reads.
pub fn open_quantized(path: &Path) -> Result<Vec<SquantFile>> {
    if !is_sharded(path) {
        return Ok(vec![SquantFile::open(path)?]);
    }
    let index = read_index(path)?;
    let mut files = Vec::with_capacity(index.shards.len());
    let mut listed: HashMap<&str, &str> = HashMap::new();
    for (name, shard) in &index.weight_map {
        listed.insert(name, shard);
    }
    for shard in &index.shards {
        let f = SquantFile::open(&index.dir.join(shard))?;
        let consistent =
            f.st.entries
                .iter()
                .all(|e| listed.get(e.name.as_str()) == Some(&shard.as_str()))
                && f.tensors.iter().all(|t| match &t.kind {
                    Kind::Plain { .. } => base_of(&t.name).is_none(),
                    Kind::Quantized(_) => true,
                });
        if !consistent {
            return Err(IoError::format(
                f.st.path(),
                "the shard's tensors differ from those the index maps to it",
            ));
        }
        files.push(f);
    }
    // The same logical tensor in two shards (say plain `w` in one and the
    // parts of a quantized `w` in another): the index's keys differ, but a
    // reader would keep one of them.
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for (f, shard) in files.iter().zip(&index.shards) {
        for t in &f.tensors {
            if let Some(first) = owner.insert(&t.name, shard) {
                return Err(IoError::format(
                    &index.index_path,
                    format!(
                        "tensor {} is stored in two shards, {} and {}",
                        repr(&t.name),
                        repr(first),
                        repr(shard)
                    ),
                ));
            }
        }
    }
    let stored: usize = files.iter().map(|f| f.st.entries.len()).sum();
    if stored != index.weight_map.len() {
        return Err(IoError::format(
            &index.index_path,
            "the index lists tensors that no shard holds",
        ));
    }
    Ok(files)
}
