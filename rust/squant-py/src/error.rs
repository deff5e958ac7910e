//! Core errors mapped onto squant-rs's Python exception hierarchy (defined
//! in `squant_rs/errors.py`). All derive from `SquantError`, a `ValueError`.

use pyo3::PyErr;
use squant_core::SquantError as CoreError;

// The exception classes live in Python (`squant_rs/errors.py`), so that they
// pickle by reference to `squant_rs` and cross process boundaries; the glue
// imports them (on first use) instead of defining its own.
pyo3::import_exception!(squant_rs.errors, SquantError);
pyo3::import_exception!(squant_rs.errors, NonFiniteWeightError);
pyo3::import_exception!(squant_rs.errors, WeightRangeError);
pyo3::import_exception!(squant_rs.errors, InvalidArgumentError);

/// Wrapper so `?` converts core errors in the glue.
pub struct PyCoreError(pub CoreError);

impl From<CoreError> for PyCoreError {
    fn from(e: CoreError) -> Self {
        PyCoreError(e)
    }
}

impl From<PyCoreError> for PyErr {
    fn from(e: PyCoreError) -> PyErr {
        let msg = e.0.to_string();
        match e.0 {
            CoreError::NonFinite { .. } => NonFiniteWeightError::new_err(msg),
            CoreError::RangeTooLarge { .. } => WeightRangeError::new_err(msg),
            CoreError::InvalidBits(_)
            | CoreError::UnknownMode(_)
            | CoreError::UnknownQuantizer(_)
            | CoreError::EmptyTensor
            | CoreError::ShapeMismatch { .. }
            | CoreError::ChannelTooLarge(_) => InvalidArgumentError::new_err(msg),
        }
    }
}
