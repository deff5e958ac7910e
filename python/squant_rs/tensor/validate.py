"""Argument checks shared by every backend, so that the Rust and the torch
paths reject the same inputs with the same exceptions and messages."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .._squant_rs import InvalidArgumentError, resolve_threads

MODES: tuple[str, ...] = ("squant", "squant-e", "squant-k", "squant-c")
BACKENDS: tuple[str, ...] = ("auto", "rust", "torch")
QUANTIZERS: tuple[str, ...] = ("asymmetric", "symmetric")
#: Largest accepted thread count (the Rust side enforces the same bound).
MAX_THREADS = 1024


class UnsupportedDtypeError(TypeError):
    """The weight's dtype is not a supported floating type."""


def check_bits(bits: object, name: str = "bits") -> int:
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
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    return backend


def check_threads(threads: object) -> int:
    """The thread count a call will use: ``threads`` if given, else
    ``SQUANT_NUM_THREADS``, else the CPU count (errors raised here, once,
    before any work)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
            raise TypeError(f"threads must be a positive integer or None, got {threads!r}")
        if not 1 <= int(threads) <= MAX_THREADS:
            raise InvalidArgumentError(
                f"threads must be an integer in 1..={MAX_THREADS}, got {int(threads)}"
            )
        return int(threads)
    return resolve_threads(None)


def check_shape(shape: Sequence[int]) -> None:
    if len(shape) < 2:
        raise InvalidArgumentError(
            "weight must have at least 2 dimensions (OC, IC, *kernel), "
            f"got {len(shape)} dimension(s) (shape {tuple(shape)})"
        )
    if math.prod(shape) == 0:
        raise InvalidArgumentError(f"weight tensor is empty (shape {tuple(shape)})")


def with_weight_index(exc: Exception, index: int) -> Exception:
    """``exc`` (same type and traceback) with ``"weight {index}: "`` in front
    of its message: errors of calls over many weights name the weight."""
    return type(exc)(f"weight {index}: {exc}").with_traceback(exc.__traceback__)
