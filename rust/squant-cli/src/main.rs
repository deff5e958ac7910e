//! `squant`: SQuant quantization of safetensors checkpoints (single files
//! and sharded Hugging Face directories) without Python: the edge-device
//! tool. Same options, exit codes, messages and output files as the Python
//! CLI's `squant-rs quantize` / `squant-rs info` on safetensors input.
//!
//! Exit status: 0 on success, 2 on bad input (one `squant: error: ...` line
//! on stderr, no output left behind; but when only the sync of the output's
//! directory after the rename failed, the line says the output was
//! written), 130 when interrupted (SIGINT; the
//! temporary output is removed first), killed by the signal on SIGTERM or
//! SIGHUP (after removing the temporary output; 143 / 129 in a shell), 141
//! (quietly) when stdout is a pipe closed early (`squant info -v F | head`):
//! all as the Python CLI.

mod printable_table;
mod text;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use squant_core::{Mode, Quantizer};
use squant_io::format::{Kind, SquantFile};
use squant_io::{dtype, IoError, Options};

use crate::text::{commas, format_bytes, format_table, report_table, totals};

const PROG: &str = "squant";
const MAX_THREADS: usize = 1024;
const THREADS_ENV: &str = "SQUANT_NUM_THREADS";
/// Exit status when stdout is a pipe that was closed early (128 + SIGPIPE),
/// as the Python CLI's.
const EXIT_BROKEN_PIPE: i32 = 141;

/// `println!` that never panics: a closed stdout (`squant info -v F | head`)
/// ends the process quietly with status 141, any other write error with one
/// error line and status 2 (as the Python CLI).
macro_rules! out {
    () => {
        write_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

fn write_stdout(args: std::fmt::Arguments) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        stdout_failed(&e);
    }
}

/// stdout could not be written: see [`out!`].
fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(EXIT_BROKEN_PIPE);
    }
    error_line(&squant_io::error::os_reason(e));
    std::process::exit(2);
}

#[derive(Parser)]
#[command(
    name = PROG,
    version,
    disable_help_subcommand = true,
    infer_long_args = true,
    about = "SQuant data-free weight quantization (Guo et al., ICLR 2022) of safetensors checkpoints."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a .safetensors file or sharded checkpoint directory into a squant-rs file (or directory)
    #[command(args_override_self = true)]
    Quantize {
        /// .safetensors file, or a directory with model.safetensors.index.json
        #[arg(value_name = "IN")]
        input: PathBuf,
        /// squant-rs .safetensors file to write (a directory for sharded input)
        #[arg(value_name = "OUT", value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from))]
        output: PathBuf,
        /// weight bits, 2..8
        #[arg(long, default_value_t = 4, value_parser = parse_bits, allow_negative_numbers = true)]
        wbits: u32,
        /// quantization mode
        #[arg(long, default_value = "squant", value_parser = ["squant", "squant-e", "squant-k", "squant-c"], allow_negative_numbers = true)]
        mode: String,
        /// asymmetric (zero point, SQuant's) or symmetric (zero point 0, what int8 runtimes fuse)
        #[arg(long, default_value = "asymmetric", value_parser = ["asymmetric", "symmetric"], allow_negative_numbers = true)]
        quantizer: String,
        /// quantize tensors whose name matches one of these fnmatch patterns (default: '*weight')
        #[arg(long, num_args = 1.., value_name = "PATTERN", action = clap::ArgAction::Append, allow_negative_numbers = true)]
        include: Vec<String>,
        /// leave tensors matching these patterns float (tried on the name and on the name without '.weight')
        #[arg(long, num_args = 1.., value_name = "PATTERN", action = clap::ArgAction::Append, allow_negative_numbers = true)]
        skip: Vec<String>,
        /// thread count (default: SQUANT_NUM_THREADS, else the CPUs)
        #[arg(long, value_parser = parse_threads, allow_negative_numbers = true)]
        threads: Option<usize>,
        /// print the per-layer table
        #[arg(short, long, conflicts_with = "quiet")]
        verbose: bool,
        /// print nothing on success
        #[arg(short, long)]
        quiet: bool,
    },
    /// Describe a squant-rs file (or sharded directory) from its header
    #[command(args_override_self = true)]
    Info {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// list every tensor
        #[arg(short, long)]
        verbose: bool,
        /// read every tensor and check its checksum, codes, scales and zero points
        #[arg(long)]
        verify: bool,
        /// (with --verify) thread count (default: SQUANT_NUM_THREADS, else the CPUs)
        #[arg(long, value_parser = parse_threads, allow_negative_numbers = true)]
        threads: Option<usize>,
    },
}

/// An integer as Python's `int()` reads the Python CLI's options
/// (surrounding whitespace, a sign, underscores between digits): its value
/// (saturated beyond i64) and its decimal text as Python prints it.
fn python_int(text: &str) -> Option<(i64, String)> {
    let t = text.trim();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let ok = !digits.is_empty()
        && !digits.starts_with('_')
        && !digits.ends_with('_')
        && !digits.contains("__")
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    if !ok {
        return None;
    }
    let plain = digits.replace('_', "");
    let plain = match plain.trim_start_matches('0') {
        "" => "0",
        rest => rest,
    };
    let v: i64 = plain.parse().unwrap_or(i64::MAX);
    let shown = if neg && plain != "0" {
        format!("-{plain}")
    } else {
        plain.to_string()
    };
    Some((if neg { -v } else { v }, shown))
}

fn parse_bits(text: &str) -> Result<u32, String> {
    let (v, shown) = python_int(text).ok_or_else(|| format!("invalid bit width '{text}'"))?;
    if !(2..=8).contains(&v) {
        return Err(format!("bit width must be in 2..8, got {shown}"));
    }
    Ok(v as u32)
}

fn parse_threads(text: &str) -> Result<usize, String> {
    let (v, shown) =
        python_int(text).ok_or_else(|| format!("invalid positive integer '{text}'"))?;
    if !(1..=MAX_THREADS as i64).contains(&v) {
        return Err(format!(
            "must be a positive integer up to {MAX_THREADS}, got {shown}"
        ));
    }
    Ok(v as usize)
}

/// A user-facing error: one line, exit status 2.
struct CliError(String);

impl From<IoError> for CliError {
    fn from(e: IoError) -> Self {
        CliError(e.to_string())
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

fn threads(arg: Option<usize>) -> Result<usize, CliError> {
    if let Some(n) = arg {
        return Ok(n);
    }
    match std::env::var(THREADS_ENV) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            // The Python CLI's words.
            _ => fail(format!(
                "bad {THREADS_ENV} environment variable ({THREADS_ENV} must be an integer in 1..={MAX_THREADS}, got {v:?}): unset it or pass --threads N"
            )),
        },
        Err(_) => Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)),
    }
}

/// "safetensors", "torch" or "unknown", from the first bytes (as the Python
/// CLI). The safetensors test comes first: its 8-byte header length can
/// start with the byte 0x80 of a pickle (a header of 128, 384, ... bytes),
/// while neither a zip nor a pickle from `torch.save` has `{` at byte 8.
fn sniff(path: &Path) -> Result<&'static str, CliError> {
    let mut head = Vec::with_capacity(9);
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_to_end(&mut head))
        .map_err(|e| IoError::os(path, e))?;
    Ok(if head.len() == 9 && head[8] == b'{' {
        "safetensors"
    } else if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
        "torch"
    } else {
        "unknown"
    })
}

/// What an existing non-regular file is (as the Python CLI names it).
#[cfg(unix)]
fn kind_of(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn kind_of(_ft: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// Python's `os.path.splitext(path)[1]`: the extension of the last
/// component as written (a trailing `/` leaves none; leading dots are not
/// an extension), `None` when there is none.
fn py_suffix(path: &Path) -> Option<String> {
    let text = path.to_string_lossy();
    let base = text.rsplit('/').next().unwrap_or("");
    let stem = base.trim_start_matches('.');
    stem.rfind('.').map(|i| stem[i..].to_lowercase())
}

/// Whether `path` names an ONNX model: its name ends in `.onnx`, in any
/// case (the Python CLI's `_is_onnx`, which quantizes those).
fn is_onnx(path: &Path) -> bool {
    path.as_os_str()
        .as_encoded_bytes()
        .to_ascii_lowercase()
        .ends_with(b".onnx")
}

/// Where writing `dst` really lands: `dst` with its symlinks followed as
/// far as they go (a dangling link names its target; as Python's
/// non-strict `os.path.realpath`). `Ok(None)`: the directory it would be
/// created in does not exist.
fn resolve_output(dst: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut path = dst.to_path_buf();
    // The kernel's limit on links followed in one lookup.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&path)?;
                path = squant_io::write::parent_of(&path).join(link);
            }
            Ok(_) => return std::fs::canonicalize(&path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = path.file_name() else {
                    return Ok(None);
                };
                return match std::fs::canonicalize(squant_io::write::parent_of(&path)) {
                    Ok(dir) if dir.is_dir() => Ok(Some(dir.join(name))),
                    _ => Ok(None),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::from_raw_os_error(40)) // ELOOP
}

/// `access(path, W_OK)`: whether this user may write `path` (as Python's
/// `os.access`: the real user's permissions, root's included).
#[cfg(unix)]
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a plain system call on a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

#[cfg(not(unix))]
fn writable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.permissions().readonly())
}

/// The output rules of the Python CLI (`check_output`, `output_format`):
/// never the input, regular files only (a symlink is written through: its
/// target is replaced and the link kept; a dangling link gets its target
/// created), `.safetensors` only. Returns the path to write (the writer
/// gives a replaced file's permissions to the new one before it is renamed
/// into place).
fn check_output(dst: &Path, src: &Path) -> Result<PathBuf, CliError> {
    let name = show(dst);
    let suffix = py_suffix(dst);
    let wrong_extension = || {
        let shown = match &suffix {
            Some(s) => py_repr(s),
            None => "'no extension'".to_string(),
        };
        fail(format!(
            "output {name}: the output format is chosen by the file extension and {shown} is not one squant-rs writes (use .safetensors)"
        ))
    };
    if dst.as_os_str().is_empty() {
        return wrong_extension(); // (names no file: the extension decides, as in Python)
    }
    if dst.is_dir() {
        return fail(format!("output is a directory: {name}"));
    }
    let target = match std::fs::metadata(dst) {
        Ok(m) => {
            if squant_io::read::same_file(src, dst) {
                return fail(format!(
                    "output {name} is the same file as the input {}: refusing to overwrite the input",
                    show(src)
                ));
            }
            if !m.is_file() {
                return fail(format!(
                    "output {name} is {}; squant-rs writes regular files only (atomically, through a temporary file): write to a file and copy it",
                    kind_of(&m.file_type())
                ));
            }
            let real = std::fs::canonicalize(dst).map_err(|e| IoError::os(dst, e))?;
            if !writable(&real) {
                return fail(format!("Permission denied: {name}"));
            }
            real
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Nothing there yet, or a dangling symlink: its target is created.
            match resolve_output(dst).map_err(|e| IoError::os(dst, e))? {
                Some(target) => target,
                None => return fail(format!("No such file or directory: {name}")),
            }
        }
        // A symlink loop, a component that is not a directory...
        Err(e) => return Err(IoError::os(dst, e).into()),
    };
    if suffix.as_deref() != Some(".safetensors") {
        return wrong_extension();
    }
    Ok(target)
}

/// A path as the Python CLI prints it (see [`squant_io::error::show_path`]).
fn show(path: &Path) -> String {
    squant_io::error::show_path(path)
}

fn py_repr(s: &str) -> String {
    squant_io::read::repr(s)
}

/// Python's `str.isprintable` (generated table, [`printable_table`]).
fn is_printable(c: char) -> bool {
    let code = c as u32;
    printable_table::NON_PRINTABLE
        .binary_search_by(|&(lo, hi)| {
            if hi < code {
                std::cmp::Ordering::Less
            } else if lo > code {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_err()
}

/// Python's `printable`: the characters `str.isprintable` rejects as the
/// backslash escapes of Python's `unicode_escape`.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_printable(c) {
            out.push(c);
            continue;
        }
        let code = c as u32;
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ if code < 0x100 => out.push_str(&format!("\\x{code:02x}")),
            _ if code < 0x10000 => out.push_str(&format!("\\u{code:04x}")),
            _ => out.push_str(&format!("\\U{code:08x}")),
        }
    }
    out
}

fn message(kind: &str, text: &str) {
    eprintln!("{PROG}: {kind}: {}", printable(text));
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("[{bar:24}] {binary_bytes}/{binary_total_bytes} {wide_msg}")
    {
        bar.set_style(style.progress_chars("#>."));
    }
    bar
}

/// The `--include`/`--skip` patterns that change nothing (one warning each,
/// as the Python CLI).
fn unmatched_patterns(
    entries: &[squant_io::Entry],
    include: &[String],
    skip: &[String],
) -> Vec<String> {
    let count = |inc: &[String], sk: &[String]| {
        entries
            .iter()
            .filter(|e| squant_io::select::is_selected(e, inc, sk))
            .count()
    };
    let candidates = count(include, &[]);
    let mut notes: Vec<String> = include
        .iter()
        .filter(|p| count(std::slice::from_ref(p), &[]) == 0)
        .map(|p| {
            format!(
                "--include pattern {} matches no floating tensor of 2+ dimensions",
                py_repr(p)
            )
        })
        .collect();
    notes.extend(
        skip.iter()
            .filter(|p| count(include, std::slice::from_ref(p)) == candidates)
            .map(|p| {
                format!(
                    "--skip pattern {} matches no tensor that would be quantized",
                    py_repr(p)
                )
            }),
    );
    notes
}

/// [`unmatched_patterns`] over every shard of a sharded checkpoint, read
/// once its quantization (which checked the index and the shards) has
/// succeeded; none if they cannot be read again.
fn sharded_notes(src: &Path, include: &[String], skip: &[String]) -> Vec<String> {
    match squant_io::sharded::read_index(src).and_then(|i| squant_io::sharded::open_shards(&i)) {
        Ok(files) => {
            let entries: Vec<squant_io::Entry> =
                files.into_iter().flat_map(|f| f.entries).collect();
            unmatched_patterns(&entries, include, skip)
        }
        Err(_) => Vec::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn cmd_quantize(
    src: &Path,
    dst: &Path,
    bits: u32,
    mode: &str,
    quantizer: &str,
    include: Vec<String>,
    skip: Vec<String>,
    n_threads: Option<usize>,
    verbose: bool,
    quiet: bool,
) -> Result<(), CliError> {
    // (the Python CLI quantizes ONNX models: its words, not "not one
    // squant-rs writes" or "unrecognized input format")
    if is_onnx(src) {
        return fail(format!(
            "{}: an ONNX model: this tool reads safetensors files only (use the Python CLI, squant-rs quantize)",
            show(src)
        ));
    }
    if is_onnx(dst) {
        return fail(format!(
            "output {}: an ONNX model: this tool writes safetensors files only (use the Python CLI, squant-rs quantize, on an ONNX input)",
            show(dst)
        ));
    }
    let sharded = squant_io::is_sharded(src);
    let mut target = dst.to_path_buf();
    if !sharded {
        target = check_output(dst, src)?;
    }
    let n = threads(n_threads)?;
    let start = Instant::now();
    let mut kind = "safetensors".to_string();
    let mut file = None;
    // Printed only when the quantization succeeds (after an error, its one
    // line says what went wrong), as the Python CLI.
    let mut notes = Vec::new();
    if !sharded {
        if !src.exists() {
            return fail(format!("input file not found: {}", show(src)));
        }
        if src.is_dir() {
            return fail(format!("input is a directory, not a file: {}", show(src)));
        }
        // A FIFO or a device would block the read below, or never end.
        squant_io::read::check_regular(src)?;
        match sniff(src)? {
            "torch" => {
                return fail(format!(
                    "{}: a torch checkpoint: this tool reads safetensors files only (use the Python CLI, squant-rs quantize)",
                    show(src)
                ))
            }
            // The name's end, as the Python CLI tests it: `.safetensors`
            // (a name Path::extension() finds none in) too.
            "unknown" if !src.as_os_str().as_encoded_bytes().ends_with(b".safetensors") => {
                return fail(format!(
                    "{}: unrecognized input format (expected a .safetensors file or a torch .pt/.pth checkpoint)",
                    show(src)
                ))
            }
            _ => {}
        }
        // A squant-rs file is refused here, as by the Python CLI, and so is
        // a tensor of more than 64 dimensions (as the header is read).
        let f = squant_io::quant::open_input(src)?;
        notes = unmatched_patterns(&f.entries, &include, &skip);
        file = Some(f);
    } else if !src.exists() {
        return fail(format!("input file not found: {}", show(src)));
    }
    let mode_v: Mode = mode
        .parse()
        .map_err(|e: squant_core::SquantError| CliError(e.to_string()))?;
    let quantizer_v: Quantizer = quantizer
        .parse()
        .map_err(|e: squant_core::SquantError| CliError(e.to_string()))?;
    let pool = thread_pool(n)?;
    let opts = Options {
        bits,
        mode: mode_v,
        quantizer: quantizer_v,
        include,
        skip,
        pool: Some(std::sync::Arc::new(pool)),
    };
    let bar = progress_bar();
    let mut progress = |done: u64, total: u64, name: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(printable(name));
        Ok(())
    };
    let loaded = Instant::now();
    let report = match file {
        None => {
            let r = squant_io::quantize_sharded(src, dst, &opts, true, &mut progress);
            bar.finish_and_clear();
            let r = r?;
            kind = format!("sharded safetensors, {} shards", r.shards);
            notes = sharded_notes(src, &opts.include, &opts.skip);
            r.report
        }
        Some(file) => {
            let selected = squant_io::quant::selection(&file, &opts);
            if !selected.iter().any(|&s| s) {
                return fail(format!(
                    "{}: no tensor to quantize (none is a floating tensor of 2+ dimensions matching the include patterns)",
                    show(src)
                ));
            }
            let total = file.entries.iter().map(|e| e.nbytes() as u64).sum();
            let r = squant_io::quant::quantize_open(
                &file,
                &target,
                &opts,
                &selected,
                &mut progress,
                0,
                total,
            );
            bar.finish_and_clear();
            // Errors name the output as the user gave it, not where its
            // symlinks lead.
            r.map_err(|e| match e {
                IoError::Os { path, source } if path == target => IoError::os(dst, source),
                IoError::Unsynced { path, source } if path == target => IoError::Unsynced {
                    path: dst.to_path_buf(),
                    source,
                },
                e => e,
            })?
        }
    };
    let written = Instant::now();
    for note in notes {
        message("warning", &note);
    }
    if quiet {
        return Ok(());
    }
    let t = totals(&report.layers);
    if verbose {
        let wall_ms = (written - loaded).as_secs_f64() * 1e3;
        let mut layers = report.layers.clone();
        for l in layers.iter_mut() {
            l.name = printable(&l.name);
        }
        out!(
            "{}",
            report_table(
                &layers,
                bits,
                mode,
                quantizer,
                wall_ms,
                report.size_before,
                report.size_after
            )
        );
        out!();
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let rows = [
        ("input", format!("{} ({kind})", show(src))),
        ("output", show(dst)),
        (
            "layers quantized",
            format!("{} of {} tensors", report.layers.len(), report.tensors),
        ),
        ("parameters quantized", commas(t.params)),
        ("bits / mode", format!("{bits} / {mode} ({quantizer})")),
        (
            "time",
            format!(
                "load {:.1} ms, quantize {:.1} ms (SQuant {:.1} ms), write {:.1} ms",
                ms(loaded - start),
                t.total_ms,
                t.total_ms,
                (ms(written - loaded) - t.total_ms).max(0.0)
            ),
        ),
        (
            "size before",
            format!(
                "{} (tensor data, original dtypes)",
                format_bytes(report.size_before)
            ),
        ),
        (
            "size after",
            format!(
                "{} ({:.3}x)",
                format_bytes(report.size_after),
                report.size_after as f64 / report.size_before.max(1) as f64
            ),
        ),
        ("mean relative error", format!("{:.4}", t.mean_rel_error)),
        (
            "flips (K / C)",
            format!("{} / {}", commas(t.k_flips), commas(t.c_flips)),
        ),
    ];
    for (label, value) in rows {
        out!("{label:<22}{}", printable(&value));
    }
    Ok(())
}

/// A pool of `n` worker threads.
fn thread_pool(n: usize) -> Result<rayon::ThreadPool, CliError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("squant-{i}"))
        .build()
        .map_err(|e| CliError(format!("cannot start {n} threads: {e}")))
}

fn cmd_info(
    path: &Path,
    verbose: bool,
    verify: bool,
    n_threads: Option<usize>,
) -> Result<(), CliError> {
    if !path.exists() {
        return fail(format!("file not found: {}", show(path)));
    }
    if path.is_dir() && !squant_io::is_sharded(path) {
        return fail(format!("is a directory, not a file: {}", show(path)));
    }
    // Only --verify runs threads: a bad SQUANT_NUM_THREADS is refused
    // before the file is read, as quantize does (and the Python CLI).
    let pool = if verify {
        Some(thread_pool(threads(n_threads)?)?)
    } else {
        None
    };
    let files: Vec<SquantFile> = squant_io::sharded::open_quantized(path)?;
    if let Some(pool) = &pool {
        pool.install(|| files.iter().try_for_each(|f| f.verify()))?;
    }
    let tensors: Vec<&squant_io::Logical> = files.iter().flat_map(|f| f.tensors.iter()).collect();
    let size: u64 = files.iter().map(|f| f.st.size()).sum();
    let first = &files[0];
    let f32_bytes = |t: &squant_io::Logical| -> u64 {
        let numel = t.shape().iter().product::<usize>() as u64;
        match &t.kind {
            Kind::Quantized(_) => 4 * numel,
            Kind::Plain { dtype: d, .. } if dtype::is_float(*d) => 4 * numel,
            Kind::Plain { .. } => t.stored_bytes as u64,
        }
    };
    let f32_total: u64 = tensors.iter().map(|t| f32_bytes(t)).sum();
    let q: Vec<_> = tensors
        .iter()
        .filter_map(|t| match &t.kind {
            Kind::Quantized(e) => Some((*t, e)),
            Kind::Plain { .. } => None,
        })
        .collect();
    let mut bits: Vec<u32> = q.iter().map(|(_, e)| e.bits).collect();
    bits.sort_unstable();
    bits.dedup();
    let mut modes: Vec<&str> = q.iter().map(|(_, e)| e.mode.as_str()).collect();
    modes.sort_unstable();
    modes.dedup();
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let params: u64 = q
        .iter()
        .map(|(_, e)| e.shape.iter().product::<usize>() as u64)
        .sum();
    let before: u64 = tensors
        .iter()
        .map(|t| match &t.kind {
            Kind::Quantized(e) => {
                e.shape.iter().product::<usize>() as u64 * dtype::item_size(e.dtype) as u64
            }
            Kind::Plain { .. } => t.stored_bytes as u64,
        })
        .sum();
    let mut rows = vec![
        ("file", format!("{} ({})", show(path), format_bytes(size))),
        (
            "format",
            format!(
                "squant-rs version {} (written by squant-rs {})",
                first.format_version, first.writer_version
            ),
        ),
        (
            "tensors",
            format!(
                "{} ({} quantized, {} stored unchanged)",
                tensors.len(),
                q.len(),
                tensors.len() - q.len()
            ),
        ),
        (
            "bits / mode",
            format!(
                "{} / {}",
                or_dash(bits.iter().map(|b| b.to_string()).collect()),
                or_dash(modes.iter().map(|m| m.to_string()).collect())
            ),
        ),
        ("quantized parameters", commas(params)),
        (
            "size before",
            format!("{} (tensor data, original dtypes)", format_bytes(before)),
        ),
        (
            "size after",
            format!(
                "{} ({:.3}x)",
                format_bytes(size),
                size as f64 / before.max(1) as f64
            ),
        ),
        (
            "as float32",
            format!(
                "{} ({:.3}x)",
                format_bytes(f32_total),
                size as f64 / f32_total.max(1) as f64
            ),
        ),
    ];
    if verify {
        let what = if files.iter().all(|f| f.checksums.is_some()) {
            "every checksum, code, scale and zero point"
        } else if !squant_io::is_sharded(path) {
            "every code, scale and zero point (no checksums in this file)"
        } else if files.iter().all(|f| f.checksums.is_none()) {
            "every code, scale and zero point (no checksums in these shards)"
        } else {
            "every code, scale and zero point, and the checksums of the shards that have them (not all do)"
        };
        rows.push(("verified", what.to_string()));
    }
    for (label, value) in rows {
        out!("{label:<22}{}", printable(&value));
    }
    if verbose || tensors.len() <= 50 {
        out!();
        let rows: Vec<Vec<String>> = tensors
            .iter()
            .map(|t| {
                let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
                let (b, m) = match &t.kind {
                    Kind::Quantized(e) => (e.bits.to_string(), e.mode.as_str().to_string()),
                    Kind::Plain { .. } => ("-".to_string(), "-".to_string()),
                };
                let ratio = match &t.kind {
                    Kind::Quantized(_) => {
                        format!("{:.3}", t.stored_bytes as f64 / f32_bytes(t).max(1) as f64)
                    }
                    Kind::Plain { .. } => "-".to_string(),
                };
                vec![
                    printable(&t.name),
                    if shape.is_empty() {
                        "scalar".to_string()
                    } else {
                        shape.join("x")
                    },
                    dtype::name(t.dtype()).to_string(),
                    b,
                    m,
                    commas(t.stored_bytes as u64),
                    ratio,
                ]
            })
            .collect();
        let headers = ["tensor", "shape", "dtype", "bits", "mode", "bytes", "ratio"];
        for line in format_table(&headers, &rows, &[5, 6]) {
            out!("{line}");
        }
    } else {
        out!("\n({} tensors; -v lists them)", tensors.len());
    }
    Ok(())
}

fn error_line(message: &str) {
    let text = message.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("{PROG}: error: {}", printable(&text));
}

/// A usage error as one line, as the Python CLI words it where it can
/// (missing arguments by name), else clap's message folded into one line;
/// then where to look: the subcommand's help for the errors of its
/// arguments (as argparse's subparsers), the program's otherwise.
/// An option as argparse names it in messages (`--wbits`, `-q/--quiet`),
/// from clap's `--wbits <WBITS>`, `--quiet` or `-q`.
fn argparse_name(clap_name: &str) -> String {
    use clap::CommandFactory;
    let flag = clap_name.split([' ', '=']).next().unwrap_or(clap_name);
    let cli = Cli::command();
    let found = cli
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .find(|a| {
            a.get_long().is_some_and(|l| flag == format!("--{l}"))
                || a.get_short().is_some_and(|c| flag == format!("-{c}"))
        });
    match found {
        Some(a) => match (a.get_short(), a.get_long()) {
            (Some(c), Some(l)) => format!("-{c}/--{l}"),
            (None, Some(l)) => format!("--{l}"),
            _ => flag.to_string(),
        },
        None => flag.to_string(),
    }
}

/// argparse's error for a long option abbreviated to a prefix of several
/// of the command's options (clap calls it unknown).
fn ambiguous(arg: &str) -> Option<String> {
    use clap::CommandFactory;
    let prefix = arg.split('=').next().unwrap_or(arg).strip_prefix("--")?;
    if prefix.is_empty() {
        return None; // `--` itself
    }
    let sub = std::env::args_os()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))?;
    let cli = Cli::command();
    let cmd = cli.find_subcommand(sub)?;
    let matches: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| l.starts_with(prefix))
        .map(|l| format!("--{l}"))
        .collect();
    (matches.len() > 1).then(|| {
        format!(
            "ambiguous option: --{prefix} could match {}",
            matches.join(", ")
        )
    })
}

/// argparse's error where an option-like `arg` follows an option that
/// takes values, given none (`--include -x`): that option expects them.
fn expected_before(arg: &str) -> Option<String> {
    use clap::CommandFactory;
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == arg)?;
    let prev = args.get(i.checked_sub(1)?)?;
    let sub = args.iter().skip(1).find(|a| !a.starts_with('-'))?;
    let cli = Cli::command();
    let opt = cli.find_subcommand(sub)?.get_arguments().find(|a| {
        a.get_long().is_some_and(|l| *prev == format!("--{l}"))
            || a.get_short().is_some_and(|c| *prev == format!("-{c}"))
    })?;
    let takes = matches!(
        opt.get_action(),
        clap::ArgAction::Set | clap::ArgAction::Append
    );
    let many = opt.get_num_args().is_some_and(|r| r.max_values() > 1);
    takes.then(|| {
        let some = if many { "at least one" } else { "one" };
        format!("argument {}: expected {some} argument", argparse_name(prev))
    })
}

/// Whether clap's empty invalid value for the option `clap_arg` (as
/// `--wbits <WBITS>`) is a missing one: the option is the command line's
/// last argument or followed by another option (`--mode ''` is a value).
fn missing_value(clap_arg: Option<&str>) -> bool {
    let Some(flag) = clap_arg.and_then(|a| a.split(' ').next()) else {
        return false;
    };
    let args: Vec<String> = std::env::args().collect();
    args.iter().enumerate().any(|(i, a)| {
        a == flag
            && args
                .get(i + 1)
                .is_none_or(|next| next.starts_with('-') && python_int(next).is_none())
    })
}

fn usage_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    let string = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let option = |kind| string(kind).map(argparse_name);
    // The Python CLI's wording (argparse's) for what both reject.
    let text = match (e.kind(), e.get(ContextKind::InvalidArg)) {
        (ErrorKind::MissingRequiredArgument, Some(ContextValue::Strings(names))) => {
            let names: Vec<&str> = names
                .iter()
                .map(|n| n.trim_start_matches('<').trim_end_matches('>'))
                .collect();
            format!("the following arguments are required: {}", names.join(", "))
        }
        (ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand, _) => {
            "the following arguments are required: COMMAND".to_string()
        }
        (ErrorKind::ValueValidation, _) if e.source().is_some() => format!(
            "argument {}: {}",
            option(ContextKind::InvalidArg).unwrap_or_default(),
            e.source().map(|s| s.to_string()).unwrap_or_default()
        ),
        (ErrorKind::InvalidValue, _) if missing_value(string(ContextKind::InvalidArg)) => {
            let arg = string(ContextKind::InvalidArg).unwrap_or_default();
            let some = if arg.ends_with("...") {
                "at least one"
            } else {
                "one"
            };
            format!("argument {}: expected {some} argument", argparse_name(arg))
        }
        (ErrorKind::TooManyValues, _) => format!(
            "argument {}: ignored explicit argument '{}'",
            option(ContextKind::InvalidArg).unwrap_or_default(),
            string(ContextKind::InvalidValue).unwrap_or_default()
        ),
        (ErrorKind::InvalidValue, _) if e.get(ContextKind::ValidValue).is_some() => {
            let valid = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => v
                    .iter()
                    .map(|v| format!("'{v}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => String::new(),
            };
            format!(
                "argument {}: invalid choice: '{}' (choose from {valid})",
                option(ContextKind::InvalidArg).unwrap_or_default(),
                string(ContextKind::InvalidValue).unwrap_or_default()
            )
        }
        (ErrorKind::ArgumentConflict, _) => {
            let prior = match e.get(ContextKind::PriorArg) {
                Some(ContextValue::String(s)) => Some(s.clone()),
                Some(ContextValue::Strings(v)) => v.first().cloned(),
                _ => None,
            };
            let (a, b) = (
                option(ContextKind::InvalidArg).unwrap_or_default(),
                prior.map(|p| argparse_name(&p)).unwrap_or_default(),
            );
            // argparse names the option given second first.
            format!("argument {b}: not allowed with argument {a}")
        }
        (ErrorKind::UnknownArgument, _) => {
            let arg = string(ContextKind::InvalidArg).unwrap_or_default();
            // argparse names the whole `--name=value` token
            let given = std::env::args().find(|a| a.starts_with(&format!("{arg}=")));
            let arg = given.as_deref().unwrap_or(arg);
            match ambiguous(arg).or_else(|| expected_before(arg)) {
                Some(text) => text,
                None => format!("unrecognized arguments: {arg}"),
            }
        }
        (ErrorKind::InvalidSubcommand, _) => format!(
            "argument COMMAND: invalid choice: '{}' (choose from 'quantize', 'info')",
            string(ContextKind::InvalidSubcommand).unwrap_or_default()
        ),
        _ => {
            let full = e.to_string();
            let lines: Vec<&str> = full
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let folded = lines.join(" ");
            let folded = folded.trim_start_matches("error: ");
            if folded.is_empty() {
                "invalid arguments".to_string()
            } else {
                folded.to_string()
            }
        }
    };
    let own = text.starts_with("ambiguous option")
        || text.ends_with(" argument")
        || matches!(
            e.kind(),
            ErrorKind::TooManyValues
                | ErrorKind::MissingRequiredArgument
                | ErrorKind::InvalidValue
                | ErrorKind::ValueValidation
                | ErrorKind::ArgumentConflict
        );
    let sub = std::env::args_os()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .filter(|a| a == "quantize" || a == "info");
    match sub {
        Some(sub) if own => format!("{text} (see '{PROG} {} --help')", sub.to_string_lossy()),
        _ => format!("{text} (see '{PROG} --help')"),
    }
}

/// The process is interrupted: remove the temporary output, then end as the
/// Python CLI does: SIGINT with `squant: error: interrupted` and status 130,
/// SIGTERM and SIGHUP killed by that signal (status 128 + signal in a shell).
fn on_interrupt(signal: Option<i32>) -> ! {
    squant_io::remove_live_temp_files();
    #[cfg(unix)]
    if let Some(sig) = signal.filter(|&s| s != libc::SIGINT) {
        // SAFETY: plain system calls: the default action, then the signal
        // again, to this thread; the default action ends the process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig); // not reached
    }
    let _ = signal;
    eprintln!("{PROG}: error: interrupted");
    std::process::exit(130);
}

/// SIGINT, SIGTERM, SIGHUP: the handler writes the signal's number to a
/// pipe; a thread reads it and runs [`on_interrupt`] (not async-signal-safe).
#[cfg(unix)]
fn install_signal_handlers() {
    use std::sync::atomic::{AtomicI32, Ordering};
    static WRITE_END: AtomicI32 = AtomicI32::new(-1);

    extern "C" fn handler(sig: libc::c_int) {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the fd is the pipe's write end.
        unsafe {
            libc::write(
                WRITE_END.load(Ordering::Relaxed),
                (&byte as *const u8).cast(),
                1,
            );
        }
    }

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe(2) fills the two descriptors of a valid array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let [read_end, write_end] = fds;
    WRITE_END.store(write_end, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut byte = 0u8;
            // SAFETY: read(2) of one byte into a valid buffer.
            let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                on_interrupt(Some(i32::from(byte)));
            }
            if n == 0
                || (n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
            {
                return;
            }
        });
    if spawned.is_err() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: reads the current disposition into a zeroed sigaction, then
        // installs a handler that only calls write(2); SA_RESTART so that
        // interrupted system calls elsewhere resume. A signal the parent set
        // to be ignored (`nohup`, a shell's background job) stays ignored, as
        // in the Python CLI.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

#[cfg(not(unix))]
fn install_signal_handlers() {
    let _ = ctrlc::set_handler(|| on_interrupt(None));
}

/// A write past the file-size limit (`ulimit -f`) fails with `EFBIG`, an
/// ordinary error that removes the temporary output, instead of killing
/// the process by SIGXFSZ with the partial file left behind (Python ignores
/// SIGXFSZ at start-up, so the Python CLI already behaved so).
#[cfg(unix)]
fn ignore_file_size_signal() {
    // SAFETY: a plain system call setting a disposition.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn ignore_file_size_signal() {}

fn main() -> ExitCode {
    ignore_file_size_signal();
    install_signal_handlers();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            error_line(&usage_error(&e));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Quantize {
            input,
            output,
            wbits,
            mode,
            quantizer,
            include,
            skip,
            threads,
            verbose,
            quiet,
        } => cmd_quantize(
            &input, &output, wbits, &mode, &quantizer, include, skip, threads, verbose, quiet,
        ),
        Command::Info {
            file,
            verbose,
            verify,
            threads,
        } => cmd_info(&file, verbose, verify, threads),
    };
    // A closed pipe shows here, not silently at exit.
    if let Err(e) = std::io::stdout().flush() {
        stdout_failed(&e);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError(msg)) => {
            if squant_io::write::cleaning_up() {
                // A signal's clean-up is under way (the error may be its
                // doing: a temporary file removed under the writer): the
                // signal thread ends the process as interrupted.
                loop {
                    std::thread::park();
                }
            }
            error_line(&msg);
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escapes_what_python_does_not_print() {
        // Control, format (RLO, ZWSP, soft hyphen, BOM), private use,
        // unassigned, line and paragraph separators, non-ASCII spaces.
        assert_eq!(printable("a\x1b[31m\n"), "a\\x1b[31m\\n");
        assert_eq!(
            printable("\u{202e}\u{200b}\u{ad}\u{feff}\u{e000}\u{378}"),
            "\\u202e\\u200b\\xad\\ufeff\\ue000\\u0378"
        );
        assert_eq!(
            printable("\u{2028}\u{2029}\u{a0}\u{3000}\u{f0000}"),
            "\\u2028\\u2029\\xa0\\u3000\\U000f0000"
        );
        // Printable: the ASCII space, letters of any script, emoji.
        assert_eq!(
            printable("a b\u{e9}\u{4e2d}\u{1f600}"),
            "a b\u{e9}\u{4e2d}\u{1f600}"
        );
    }
}
