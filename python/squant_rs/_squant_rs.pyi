"""Type stubs of the native module (Rust, PyO3). Kept honest by
``python -m mypy.stubtest squant_rs._squant_rs`` in the test script."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, final

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
    "quantize_into",
    "dequantize_into",
    "copy_tree",
    "simd_build",
    "normal_cdf",
    "channel_dots",
    "scale_channels",
    "clip_ratios",
    "clip_rows",
    "quantize_reference",
    "dequantize",
    "resolve_threads",
    "io_quantize_file",
    "io_quantize_sharded",
    "io_is_sharded",
    "io_shard_files",
    "io_check_input",
    "io_at_exit",
    "io_inspect",
    "io_verify",
    "io_load",
    "io_read_safetensors",
    "io_write_safetensors",
    "QuantizedFileWriter",
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
def quantize_into(
    ws: list[npt.NDArray[np.float32]],
    outs: list[npt.NDArray[np.floating] | npt.NDArray[np.int16]],
    bits: int,
    mode: str,
    keep_codes: bool = True,
    threads: int | None = None,
    quantizer: str = "asymmetric",
    dots: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None] | None] | None = None,
) -> list[
    tuple[
        npt.NDArray[np.int8] | None,
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        int,
        int,
        float,
        float,
        npt.NDArray[np.float64] | None,
    ]
]: ...
def dequantize_into(
    codes: list[npt.NDArray[np.int8]],
    scales: list[npt.NDArray[np.float32]],
    zero_points: list[npt.NDArray[np.float32]],
    outs: list[npt.NDArray[np.floating] | npt.NDArray[np.int16]],
    ws: list[npt.NDArray[np.float32]] | None = None,
    threads: int | None = None,
) -> list[float] | None: ...
def copy_tree(obj: Any, copier: Any) -> Any: ...
def simd_build() -> str: ...
def normal_cdf(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...
def channel_dots(
    mats: list[npt.NDArray[np.float32]],
    vecs: list[npt.NDArray[np.float64]],
    threads: int | None = None,
    minus: list[npt.NDArray[np.float32] | None] | None = None,
) -> list[npt.NDArray[np.float64]]: ...
def scale_channels(
    ws: list[npt.NDArray[np.float32]],
    ks: list[npt.NDArray[np.float32]],
    outs: list[npt.NDArray[np.float32]],
    threads: int | None = None,
) -> None: ...
def clip_ratios(
    w: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    importance: npt.NDArray[np.float32],
    bits: int,
    ratios: list[float],
    threads: int | None = None,
) -> npt.NDArray[np.float64]: ...
def clip_rows(
    w: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    ratios: npt.NDArray[np.float64],
    threads: int | None = None,
) -> npt.NDArray[np.float32] | npt.NDArray[np.float64] | None: ...
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

# Checkpoint I/O (crate squant-io)

_Layer = tuple[str, list[int], float, float, int, int]
_Report = tuple[list[_Layer], int, int, int]
_Progress = Callable[[int, int, str], object]
_Path = str | os.PathLike[str]

def io_quantize_file(
    src: _Path,
    dst: _Path,
    bits: int,
    mode: str,
    include: list[str],
    skip: list[str],
    threads: int | None = None,
    progress: _Progress | None = None,
    require_selection: bool = True,
    quantizer: str = "asymmetric",
) -> _Report: ...
def io_quantize_sharded(
    src: _Path,
    dst: _Path,
    bits: int,
    mode: str,
    include: list[str],
    skip: list[str],
    threads: int | None = None,
    progress: _Progress | None = None,
    quantizer: str = "asymmetric",
) -> tuple[_Report, int, int]: ...
def io_is_sharded(path: _Path) -> bool: ...
def io_shard_files(path: _Path) -> list[Path]: ...
def io_check_input(path: _Path) -> None: ...
def io_at_exit() -> None: ...
def io_inspect(
    path: _Path,
) -> tuple[
    str, str, int, list[tuple[str, list[int], str, int | None, str | None, int]], bool, str, bool
]: ...
def io_verify(path: _Path, threads: int | None = None) -> None: ...
def io_load(
    path: _Path, verify: bool = True, threads: int | None = None
) -> list[tuple[str, str, list[int], npt.NDArray[np.uint8]]]: ...
def io_read_safetensors(
    path: _Path, data: bool = True
) -> tuple[list[tuple[str, str, list[int], npt.NDArray[np.uint8]]], dict[str, str]]: ...
def io_write_safetensors(
    path: _Path,
    tensors: list[tuple[str, str, list[int]]],
    metadata: list[tuple[str, str]],
    data: Callable[[int], npt.NDArray[np.uint8]],
) -> int: ...

@final
class QuantizedFileWriter:
    """A squant-rs file written tensor by tensor (atomically)."""

    def __new__(
        cls,
        path: _Path,
        plan: list[tuple[str, str, list[int], int | None, str | None]],
        quantizer: str = "asymmetric",
    ) -> QuantizedFileWriter: ...
    def write_plain(self, index: int, data: npt.NDArray[np.uint8]) -> None: ...
    def write_quantized(
        self,
        index: int,
        codes: npt.NDArray[np.int8],
        scale: npt.NDArray[np.float32],
        zero_point: npt.NDArray[np.float32],
    ) -> None: ...
    def finish(self) -> int: ...
    def abort(self) -> None: ...
