//! # squant-io
//!
//! Checkpoint I/O for squant-rs, in pure Rust (no Python): safetensors files
//! read lazily on the `safetensors` crate (header first, tensor data read
//! or memory-mapped range by range on demand), weights quantized with
//! `squant-core` a block of channels at a time (the next block read, the
//! previous one written, while one is quantized), codes packed and written
//! as they are produced into an atomically written squant-rs file with
//! per-tensor CRC32C checksums, and sharded (Hugging Face layout)
//! checkpoints in one pipeline over the shards. The format is described in
//! `docs/format.md`.
//!
//! ```no_run
//! use squant_io::{quantize_file, Options};
//! let opts = Options { bits: 4, mode: squant_core::Mode::Full,
//!                      quantizer: squant_core::Quantizer::Asymmetric, include: vec![], skip: vec![],
//!                      pool: None };
//! let report = quantize_file("model.safetensors".as_ref(), "q4.safetensors".as_ref(), &opts,
//!                            &mut |_, _, _| Ok(()))?;
//! println!("{} weights quantized", report.layers.len());
//! # Ok::<(), squant_io::IoError>(())
//! ```

pub mod dtype;
pub mod error;
pub mod format;
pub mod json;
pub mod load;
pub mod pack;
pub mod quant;
pub mod read;
pub mod select;
pub mod sharded;
pub mod write;

pub use error::{IoError, Result};
pub use format::{Kind, Logical, QEntry, Quantizer, SquantFile, SquantWriter};
pub use quant::{quantize_file, LayerStats, Options, Report};
pub use read::{Entry, SafetensorsFile};
pub use sharded::{is_sharded, quantize_sharded, ShardedReport};
pub use write::{remove_live_temp_files, Planned, Writer};
