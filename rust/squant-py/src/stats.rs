//! `normal_cdf`: the standard normal CDF of a float64 array, each value
//! `0.5 * erfc(-x / sqrt(2))` through the C library's `erfc` (the function
//! CPython's `math.erfc` calls: bit for bit the values of the recipe's
//! former per-element `math.erfc`, without a Python call per element).

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

extern "C" {
    /// The C library's complementary error function (C99 `<math.h>`).
    fn erfc(x: f64) -> f64;
}

fn cdf(x: f64) -> f64 {
    // SAFETY: `erfc` is a pure C99 math function of one double, defined
    // for every input (infinities and NaN included).
    0.5 * unsafe { erfc(-x / std::f64::consts::SQRT_2) }
}

/// normal_cdf(x)
/// --
///
/// The standard normal CDF of every element of the 1-D float64 array `x`
/// (infinities allowed): `0.5 * erfc(-x / sqrt(2))` with the C library's
/// `erfc`, the same bits as `math.erfc` element by element.
#[pyfunction]
pub fn normal_cdf<'py>(
    py: Python<'py>,
    x: PyReadonlyArray1<'py, f64>,
) -> Bound<'py, PyArray1<f64>> {
    let out: Vec<f64> = x.as_array().iter().map(|&v| cdf(v)).collect();
    out.into_pyarray(py)
}

#[cfg(test)]
mod tests {
    use super::cdf;

    #[test]
    fn known_values() {
        assert_eq!(cdf(0.0), 0.5);
        assert_eq!(cdf(f64::INFINITY), 1.0);
        assert_eq!(cdf(f64::NEG_INFINITY), 0.0);
        assert!(cdf(f64::NAN).is_nan());
        assert!((cdf(1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
    }
}
