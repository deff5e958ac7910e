//! Errors of the I/O layer. Every failure a file or a caller can provoke is
//! a variant here; nothing in this crate panics on input.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why reading, quantizing or writing a checkpoint failed.
#[derive(Debug)]
pub enum IoError {
    /// The file is not a (valid) safetensors / squant-rs file. The message
    /// starts with the file's path.
    Format(String),
    /// The operating system refused a read or write of `path`.
    Os {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Quantizing the tensor `name` failed (the core's error).
    Quantize {
        name: String,
        source: squant_core::SquantError,
    },
    /// A tensor's dtype cannot be handled here (e.g. quantizing an integer tensor).
    UnsupportedDtype(String),
    /// An argument is out of range or inconsistent.
    InvalidArgument(String),
    /// The output `path` was written and renamed into place (it is
    /// complete), but its directory could not be synced to disk afterwards:
    /// a crash may still undo the rename.
    Unsynced {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A caller's progress callback asked to stop (the caller knows why),
    /// or the process is ending ([`crate::write::remove_live_temp_files`]
    /// ran).
    Cancelled,
}

impl IoError {
    /// A [`IoError::Format`] error about `path`.
    pub fn format(path: &Path, what: impl fmt::Display) -> IoError {
        IoError::Format(format!("{}: {what}", show_path(path)))
    }

    /// An [`IoError::Os`] error about `path`.
    pub fn os(path: &Path, source: std::io::Error) -> IoError {
        IoError::Os {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Format(msg)
            | IoError::UnsupportedDtype(msg)
            | IoError::InvalidArgument(msg) => f.write_str(msg),
            IoError::Os { path, source } => write!(f, "{}: {}", os_reason(source), show_path(path)),
            IoError::Unsynced { path, source } => {
                write!(f, "{}: {}", unsynced_reason(source), show_path(path))
            }
            IoError::Quantize { name, source } => write!(f, "{name}: {source}"),
            IoError::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// A path as the Python CLI shows it: bytes that are not UTF-8 as the
/// escapes of the lone surrogates Python decodes them to (`\\udcff` for the
/// byte 0xff), not as U+FFFD.
pub fn show_path(path: &Path) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let mut out = String::new();
        for chunk in path.as_os_str().as_bytes().utf8_chunks() {
            out.push_str(chunk.valid());
            for b in chunk.invalid() {
                out.push_str(&format!("\\udc{b:02x}"));
            }
        }
        out
    }
    #[cfg(not(unix))]
    {
        path.display().to_string()
    }
}

/// The operating system's reason without Rust's " (os error N)" suffix, as
/// Python's `strerror` prints it.
pub fn os_reason(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The reason of an [`IoError::Unsynced`] error, without the path (as an
/// `OSError`'s `strerror`).
pub fn unsynced_reason(err: &std::io::Error) -> String {
    format!(
        "the output was written, but its directory could not be synced to disk ({}), so a crash may still undo it",
        os_reason(err)
    )
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IoError::Os { source, .. } | IoError::Unsynced { source, .. } => Some(source),
            IoError::Quantize { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, IoError>;
