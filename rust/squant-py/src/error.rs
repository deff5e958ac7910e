//! Core errors mapped onto a small Python exception hierarchy. All derive
//! from `SquantError`, itself a `ValueError`.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;
use squant_core::SquantError as CoreError;

create_exception!(
    _squant_rs,
    SquantError,
    PyValueError,
    "Base class of squant-rs errors about values (a ValueError)."
);
create_exception!(
    _squant_rs,
    NonFiniteWeightError,
    SquantError,
    "The weight holds NaN or infinity; the message names the output channel."
);
create_exception!(
    _squant_rs,
    WeightRangeError,
    SquantError,
    "A channel's values overflow the float32 quantizer."
);
create_exception!(
    _squant_rs,
    InvalidArgumentError,
    SquantError,
    "An argument (bits, mode, shape, threads) is out of range."
);

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
