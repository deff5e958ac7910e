//! The four SQuant modes of the paper's ablation.

use std::fmt;
use std::str::FromStr;

use crate::error::SquantError;

/// Which CASE levels run after nearest rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// SQuant-E: nearest rounding only.
    E,
    /// SQuant-E + SQuant-K (kernel-wise).
    K,
    /// SQuant-E + SQuant-C (output-channel-wise).
    C,
    /// SQuant-E + K + C, the paper's full method.
    Full,
}

impl Mode {
    /// All modes, in the order of the paper's ablation.
    pub const ALL: [Mode; 4] = [Mode::E, Mode::K, Mode::C, Mode::Full];

    /// The mode's name as used by the Python API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::E => "squant-e",
            Mode::K => "squant-k",
            Mode::C => "squant-c",
            Mode::Full => "squant",
        }
    }

    /// Whether the kernel-wise level is part of the mode (it still only runs when `K > 1`).
    pub fn has_k(self) -> bool {
        matches!(self, Mode::K | Mode::Full)
    }

    /// Whether the channel-wise level is part of the mode.
    pub fn has_c(self) -> bool {
        matches!(self, Mode::C | Mode::Full)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = SquantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "squant" => Ok(Mode::Full),
            "squant-e" => Ok(Mode::E),
            "squant-k" => Ok(Mode::K),
            "squant-c" => Ok(Mode::C),
            other => Err(SquantError::UnknownMode(other.to_string())),
        }
    }
}
