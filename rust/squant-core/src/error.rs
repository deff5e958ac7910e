//! Errors reported by the core. Every failure a caller can provoke is a
//! variant here; the core never panics on caller input.

use std::fmt;

/// Why a weight tensor could not be quantized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SquantError {
    /// `bits` outside the supported range `2..=8`.
    InvalidBits(u32),
    /// Mode string that is none of `squant`, `squant-e`, `squant-k`, `squant-c`.
    UnknownMode(String),
    /// Quantizer string that is neither `asymmetric` nor `symmetric`.
    UnknownQuantizer(String),
    /// A dimension of the `(OC, IC, K)` layout is zero.
    EmptyTensor,
    /// Buffer lengths do not match the layout.
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// One output channel holds more than `u32::MAX` elements.
    ChannelTooLarge(usize),
    /// A NaN or an infinity in the weights.
    NonFinite { channel: usize, index: usize },
    /// The channel's range overflows float32 arithmetic of the quantizer (its
    /// scale, zero point or the ends of its dequantized grid).
    RangeTooLarge { channel: usize },
}

impl SquantError {
    /// The same error for output channel `channel` (errors that name one:
    /// for a channel quantized on its own, as channel 0).
    pub fn with_channel(self, channel: usize) -> SquantError {
        match self {
            SquantError::NonFinite { index, .. } => SquantError::NonFinite { channel, index },
            SquantError::RangeTooLarge { .. } => SquantError::RangeTooLarge { channel },
            other => other,
        }
    }
}

impl fmt::Display for SquantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SquantError::InvalidBits(b) => {
                write!(f, "bits must be an integer in 2..=8, got {b}")
            }
            SquantError::UnknownMode(m) => write!(
                f,
                "unknown mode {m:?}: expected one of 'squant', 'squant-e', 'squant-k', 'squant-c'"
            ),
            SquantError::UnknownQuantizer(q) => write!(
                f,
                "unknown quantizer {q:?}: expected 'asymmetric' or 'symmetric'"
            ),
            SquantError::EmptyTensor => write!(f, "weight tensor is empty (a dimension is 0)"),
            SquantError::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected {expected} elements, got {got}"),
            SquantError::ChannelTooLarge(n) => write!(
                f,
                "an output channel holds {n} elements, more than the supported 4294967295"
            ),
            SquantError::NonFinite { channel, index } => write!(
                f,
                "weight contains NaN or infinity in output channel {channel} (element {index} of that channel)"
            ),
            SquantError::RangeTooLarge { channel } => write!(
                f,
                "output channel {channel}: weight values too large to quantize in float32 (scale, zero point or dequantized values overflow)"
            ),
        }
    }
}

impl std::error::Error for SquantError {}
