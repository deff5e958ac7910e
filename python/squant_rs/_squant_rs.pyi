"""Type stubs of the native module (Rust, PyO3). Kept honest by
``python -m mypy.stubtest squant_rs._squant_rs`` in the test script."""

import numpy as np
import numpy.typing as npt

# The exception classes are defined in Python and raised by the native code.
from squant_rs.errors import InvalidArgumentError as InvalidArgumentError
from squant_rs.errors import NonFiniteWeightError as NonFiniteWeightError
from squant_rs.errors import SquantError as SquantError
from squant_rs.errors import WeightRangeError as WeightRangeError

__all__ = [
    "quantize",
    "quantize_many",
    "quantize_reference",
    "dequantize",
    "resolve_threads",
    "SquantError",
    "NonFiniteWeightError",
    "WeightRangeError",
    "InvalidArgumentError",
    "THREADS_ENV_VAR",
    "__version__",
]

__version__: str
THREADS_ENV_VAR: str

def quantize(
    w: npt.NDArray[np.float32],
    bits: int,
    mode: str,
    threads: int | None = None,
    quantizer: str = "asymmetric",
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.float32], int, int]: ...
def quantize_many(
    ws: list[npt.NDArray[np.float32]],
    bits: int,
    mode: str,
    threads: int | None = None,
    quantizer: str = "asymmetric",
) -> list[
    tuple[npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.float32], int, int]
]: ...
def quantize_reference(
    w: npt.NDArray[np.float32], bits: int, mode: str, quantizer: str = "asymmetric"
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.float32], int, int]: ...
def dequantize(
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    zero_point: npt.NDArray[np.float32],
    threads: int | None = None,
) -> npt.NDArray[np.float32]: ...
def resolve_threads(threads: int | None = None) -> int: ...
