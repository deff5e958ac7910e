"""Argument checks shared by every backend, so that the Rust and the torch
paths reject the same inputs with the same exceptions and messages.

Bad weight values follow one rule on every path (the Rust core, the torch
backend's CPU and CUDA strategies, numpy and torch inputs, and
``quantize_tensors``, whose message starts with ``"weight i: "``): the
error names the **lowest-index output channel with any problem**, and
within that channel the first of, in this order,

1. a NaN or an infinity (:class:`NonFiniteWeightError`, naming the first
   such element of the channel);
2. a float64 value beyond float32's range (:class:`WeightRangeError`);
3. values too large for the float32 quantizer: ``s``, ``s * lo``,
   ``s * hi``, ``z`` or a grid end ``(tmin + z) / s`` not finite
   (:class:`WeightRangeError`, :func:`grid_error`).

This is the Rust core's order for float32 (``min_max`` then
``channel_params``, channel by channel), with the float64 check placed
where the conversion to float32 would have made the value infinite.
:func:`value_error` builds the error once that channel is known.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys
from collections.abc import Sequence

import numpy as np

from .._squant_rs import resolve_threads
from ..errors import InvalidArgumentError, NonFiniteWeightError, WeightRangeError
from ..errors import UnsupportedDtypeError as UnsupportedDtypeError

MODES: tuple[str, ...] = ("squant", "squant-e", "squant-k", "squant-c")
BACKENDS: tuple[str, ...] = ("auto", "rust", "torch")
QUANTIZERS: tuple[str, ...] = ("asymmetric", "symmetric")
#: Largest accepted thread count (the Rust side enforces the same bound).
MAX_THREADS = 1024


def check_bits(bits: object, name: str = "bits") -> int:
    if type(bits) is int and 2 <= bits <= 8:
        return bits
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{name} must be an integer in 2..8, got {bits!r} ({type(bits).__name__})")
    b = int(bits)
    if not 2 <= b <= 8:
        raise InvalidArgumentError(f"{name} must be an integer in 2..8, got {b}")
    return b


def check_mode(mode: object) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, one of {MODES}, got {type(mode).__name__}")
    if mode not in MODES:
        raise InvalidArgumentError(
            f"unknown mode {mode!r}: expected one of 'squant', 'squant-e', 'squant-k', 'squant-c'"
        )
    return mode


def check_quantizer(quantizer: object) -> str:
    if not isinstance(quantizer, str):
        raise TypeError(
            f"quantizer must be a string, one of {QUANTIZERS}, got {type(quantizer).__name__}"
        )
    if quantizer not in QUANTIZERS:
        raise InvalidArgumentError(
            f"unknown quantizer {quantizer!r}: expected 'asymmetric' or 'symmetric'"
        )
    return quantizer


def check_backend(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(
            f"backend must be a string, one of {BACKENDS}, got {type(backend).__name__}"
        )
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    return backend


def check_threads(threads: object) -> int:
    """The thread count a call will use: ``threads`` if given (then
    ``SQUANT_NUM_THREADS`` is not read at all), else ``SQUANT_NUM_THREADS``,
    else the CPU count. Errors are raised here, once, before any work: a bad
    environment value is an :class:`InvalidArgumentError` naming the
    variable."""
    if type(threads) is int and 1 <= threads <= MAX_THREADS:
        return threads
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
            raise TypeError(f"threads must be a positive integer or None, got {threads!r}")
        if not 1 <= int(threads) <= MAX_THREADS:
            raise InvalidArgumentError(
                f"threads must be an integer in 1..={MAX_THREADS}, got {int(threads)}"
            )
        return int(threads)
    return resolve_threads(None)


#: Most dimensions a weight may have (numpy's limit; the torch path follows it).
MAX_DIMS = 64

#: Most elements of one output channel (the Rust core's limit, ``u32::MAX``).
MAX_CHANNEL_ELEMENTS = 2**32 - 1


def check_shape(shape: Sequence[int]) -> None:
    """The shape rules of every backend: 2..64 dimensions, no zero
    dimension, at most ``2^32 - 1`` elements per output channel."""
    if len(shape) < 2:
        raise InvalidArgumentError(
            "weight must have at least 2 dimensions (OC, IC, *kernel), "
            f"got {len(shape)} dimension(s) (shape {tuple(shape)})"
        )
    if len(shape) > MAX_DIMS:
        raise InvalidArgumentError(
            f"weight has {len(shape)} dimensions, more than the supported {MAX_DIMS}"
        )
    if math.prod(shape) == 0:
        raise InvalidArgumentError(f"weight tensor is empty (shape {tuple(shape)})")
    channel = math.prod(shape[1:])
    if channel > MAX_CHANNEL_ELEMENTS:
        raise InvalidArgumentError(
            f"an output channel holds {channel} elements, more than the supported "
            f"{MAX_CHANNEL_ELEMENTS}"
        )


@functools.cache
def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (``None`` where unknown),
    looked up once (two system calls that every quantize call would pay)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None
    return int(pages) * int(size) if pages > 0 and size > 0 else None


def check_memory(numel: int, bytes_per_element: int, available: int | None, where: str) -> None:
    """Raise ``MemoryError`` at once when a weight of ``numel`` elements
    needs more than ``available`` bytes (``bytes_per_element`` each, a lower
    bound of the backend's working memory): a broadcast view can claim far
    more elements than any memory holds, and no backend should start on it."""
    need = numel * bytes_per_element
    if available is not None and need > available:
        raise MemoryError(
            f"weight of {numel} elements needs at least {need / 2**30:.1f} GiB of working "
            f"memory, more than the {available / 2**30:.1f} GiB of {where}"
        )


#: Largest finite value of the output dtypes narrower than float32 (float32
#: and float64 output hold every finite float32).
_DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def dtype_name(dtype: object) -> str:
    """``"float16"``, ``"bfloat16"``, ... for a torch dtype or anything
    ``np.dtype`` takes (``np.float16``, ``"f2"``, ``"<f2"``, ``"e"`` are all
    ``"float16"``)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return str(dtype).rsplit(".", 1)[-1]  # "torch.float16"
    name: str = np.dtype(dtype).name  # type: ignore[call-overload]
    return name


def dtype_max(dtype: object) -> float:
    """The largest finite value of an output dtype narrower than float32,
    ``inf`` for float32 and float64."""
    return _DTYPE_MAX.get(dtype_name(dtype), math.inf)


def grid_error(
    channel: int,
    dtype: object,
    reach: float,
    scale: float | None = None,
    zero_point: float | None = None,
) -> WeightRangeError:
    """The error for an output channel whose dequantization grid (the values
    ``(q + z) / s`` for every code ``q``) is not finite in the output dtype:
    the Rust core's message for float32, a dtype-specific one otherwise.
    ``scale`` / ``zero_point``: the channel's (float32) values where known:
    a scale that is not positive and finite, or a zero point that is not
    finite, is named as such (a hand-made tensor; nothing overflowed)."""
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        return WeightRangeError(
            f"output channel {channel}: scale {scale!r} is not a positive finite number"
        )
    if zero_point is not None and not math.isfinite(zero_point):
        return WeightRangeError(
            f"output channel {channel}: zero point {zero_point!r} is not finite"
        )
    name = dtype_name(dtype)
    if math.isinf(dtype_max(dtype)) or not math.isfinite(reach):
        return WeightRangeError(
            f"output channel {channel}: weight values too large to quantize in float32 "
            "(scale, zero point or dequantized values overflow)"
        )
    return WeightRangeError(
        f"output channel {channel}: dequantized values overflow {name} (the channel's "
        f"quantization grid reaches {reach:.6g}, more than one step beyond the largest "
        f"finite {name})"
    )


def value_error(channel: int, nonfinite_index: int | None, float64_overflow: bool) -> Exception:
    """The error for ``channel``, the lowest output channel with a bad value
    (see the module's docstring for the rule): ``nonfinite_index`` is the
    first NaN or infinity of the channel (``None``: there is none),
    ``float64_overflow`` whether a float64 value of the channel exceeds
    float32's range; neither means the float32 quantizer overflows."""
    if nonfinite_index is not None:
        return NonFiniteWeightError(
            f"weight contains NaN or infinity in output channel {channel} "
            f"(element {nonfinite_index} of that channel)"
        )
    if float64_overflow:
        return WeightRangeError(
            f"output channel {channel}: a float64 value exceeds the float32 range "
            "(squant-rs computes in float32)"
        )
    return grid_error(channel, "float32", math.inf)


def with_weight_index(exc: Exception, index: int) -> Exception:
    """``exc`` (same type and traceback) with ``"weight {index}: "`` in front
    of its message: errors of calls over many weights name the weight."""
    return type(exc)(f"weight {index}: {exc}").with_traceback(exc.__traceback__)
