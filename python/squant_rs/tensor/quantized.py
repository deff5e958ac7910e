"""`quantize_tensor` and `QuantizedTensor`: the numpy path (Rust core) and
the dispatch to the torch adapter."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _squant_rs as _native
from .._squant_rs import WeightRangeError
from .validate import (
    UnsupportedDtypeError,
    check_backend,
    check_bits,
    check_mode,
    check_quantizer,
    check_shape,
    check_threads,
)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A SQuant-quantized weight.

    Convention (the SQuant release's): per output channel ``o``,
    ``codes = rne(scale[o] * w - zero_point[o])`` refined by CASE flips, and
    ``w_hat = (codes + zero_point[o]) / scale[o]``. With
    ``quantizer="symmetric"`` the zero point is 0 and the codes lie in
    ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``. ``scale`` is in levels per
    unit, i.e. the inverse of the step size that torch calls "scale"; the
    step and torch-style zero point are available as :attr:`step` and
    :attr:`torch_zero_point`.

    ``codes``, ``scale`` and ``zero_point`` are numpy arrays for numpy input
    and torch tensors on the input's device for torch input.
    """

    codes: Any
    scale: Any
    zero_point: Any
    bits: int
    mode: str
    dtype: Any
    k_flips: int
    c_flips: int
    quantizer: str = "asymmetric"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def step(self) -> Any:
        """Step size ``1 / scale`` per output channel (torch's "scale")."""
        return 1.0 / self.scale

    @property
    def torch_zero_point(self) -> Any:
        """``-zero_point``: with :attr:`step`, ``w_hat ~= (codes - zp) * step``."""
        return -self.zero_point

    def dequantize(self) -> Any:
        """Dequantized weight of the input's shape and dtype (and device)."""
        if isinstance(self.codes, np.ndarray):
            out = _native.dequantize(self.codes, self.scale, self.zero_point)
            if self.dtype == np.float16:
                # The grid's end points can lie slightly beyond the range
                # (rounded zero point): clamp instead of overflowing to inf.
                fmax = np.finfo(np.float16).max
                np.clip(out, -fmax, fmax, out=out)
            return out.astype(self.dtype, copy=False)
        from ..torch.adapter import dequantize_torch

        return dequantize_torch(self)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, bits={self.bits}, mode={self.mode!r}, "
            f"quantizer={self.quantizer!r}, dtype={self.dtype}, "
            f"k_flips={self.k_flips}, c_flips={self.c_flips})"
        )


def _is_torch_tensor(w: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(w, torch.Tensor)


def as_float32_array(w: object) -> tuple[np.ndarray, np.dtype]:
    """Validated float32 view of a numpy-like weight (copies only when the
    dtype or byte order differs), with the original dtype in native order."""
    a = np.asarray(w)
    if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4, 8):
        raise UnsupportedDtypeError(
            f"weight dtype {a.dtype} is not supported: expected float16, float32 or float64"
        )
    check_shape(a.shape)
    # float64 beyond float32's range becomes inf here, then fails the
    # non-finite check with a clear message instead of a numpy warning.
    with np.errstate(over="ignore"):
        a32 = np.asarray(a, dtype=np.float32)
    if a.dtype.itemsize == 8:
        _check_float32_range(a, a32)
    return a32, a.dtype.newbyteorder("=")


def _check_float32_range(a: np.ndarray, a32: np.ndarray) -> None:
    """float64 values beyond float32's range: a clear error, not "NaN"."""
    big = np.isinf(a32) & np.isfinite(a)
    if big.any():
        o, *_ = np.unravel_index(int(np.argmax(big)), a.shape)
        raise WeightRangeError(
            f"output channel {int(o)}: a float64 value exceeds the float32 range "
            "(squant-rs computes in float32)"
        )


def quantize_tensor(
    w: Any,
    bits: int = 4,
    mode: str = "squant",
    *,
    backend: str = "auto",
    threads: int | None = None,
    quantizer: str = "asymmetric",
) -> QuantizedTensor:
    """Quantize one weight of shape ``(OC, IC, *kernel)`` with SQuant.

    ``w`` is a numpy array (float16/32/64) or a torch tensor (float16,
    bfloat16, float32, float64, any device). ``bits`` in 2..8; ``mode`` one of
    ``"squant"`` (E+K+C), ``"squant-e"``, ``"squant-k"``, ``"squant-c"``.
    ``quantizer``: ``"asymmetric"`` (the paper's min/max quantizer) or
    ``"symmetric"`` (zero point 0, narrow signed range: what int8 runtimes
    fuse into integer kernels).
    ``backend`` applies to torch input: ``"auto"`` (CUDA -> torch, CPU ->
    Rust), ``"rust"`` or ``"torch"``. ``threads`` sets the Rust thread count
    (default: ``SQUANT_NUM_THREADS`` or all CPUs). The input is never
    modified.
    """
    bits = check_bits(bits)
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    backend = check_backend(backend)
    threads = check_threads(threads)
    if _is_torch_tensor(w):
        from ..torch.adapter import quantize_torch_tensor

        return quantize_torch_tensor(w, bits, mode, backend, threads, quantizer)
    if type(w).__module__.startswith("torch"):
        raise TypeError("got a torch object but torch is not importable")
    a32, dtype = as_float32_array(w)
    res = _native.quantize(a32, bits, mode, threads, quantizer)
    return from_native(res, bits, mode, dtype, quantizer=quantizer)


def from_native(
    res: tuple[Any, Any, Any, int, int],
    bits: int,
    mode: str,
    dtype: Any,
    device: Any = None,
    quantizer: str = "asymmetric",
) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from the native ``quantize`` tuple: numpy
    arrays, or torch tensors on ``device`` when one is given."""
    codes, scale, zp, kf, cf = res
    if device is not None:
        import torch

        codes = torch.from_numpy(codes).to(device)
        scale = torch.from_numpy(scale).to(device)
        zp = torch.from_numpy(zp).to(device)
    return QuantizedTensor(codes, scale, zp, bits, mode, dtype, int(kf), int(cf), quantizer)
