"""torch tensors in and out: routes to the Rust core (CPU) or to the
vectorized torch implementation (CUDA, or on request)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _squant_rs as _native
from ._squant_rs import InvalidArgumentError, NonFiniteWeightError, WeightRangeError
from ._validate import UnsupportedDtypeError, check_shape

if TYPE_CHECKING:
    import torch

    from ._tensor import QuantizedTensor


def require_torch() -> Any:
    """Import torch or explain how to get it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised without torch
        raise ImportError(
            "this squant_rs feature needs PyTorch: pip install 'squant-rs[torch]'"
        ) from exc
    return torch


def _float_dtypes(torch: Any) -> tuple[Any, ...]:
    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_torch_weight(w: torch.Tensor) -> None:
    torch = require_torch()
    if w.layout != torch.strided or w.is_nested:
        raise UnsupportedDtypeError(
            f"weight must be a dense (strided) tensor, got layout {w.layout}"
            + (" (nested)" if w.is_nested else "")
        )
    if w.device.type == "meta":
        raise InvalidArgumentError("weight is a meta tensor: it has no values to quantize")
    if w.dtype not in _float_dtypes(torch):
        raise UnsupportedDtypeError(
            f"weight dtype {w.dtype} is not supported: expected float16, bfloat16, "
            "float32 or float64"
        )
    check_shape(tuple(w.shape))


def _check_values_torch(w32: torch.Tensor, bits: int, original: torch.Tensor | None = None) -> None:
    """The Rust core's value checks, for the torch path: non-finite weights
    and channels whose quantizer overflows float32.  Raises the Rust core's
    error for the first such channel; returns when there is none.  The
    backend calls it only when its own cheap test flags a channel."""
    torch = require_torch()
    flat = w32.reshape(w32.shape[0], -1)
    bad = ~torch.isfinite(flat)
    bad_rows = bad.any(dim=1)
    mx = flat.amax(dim=1)
    mn = flat.amin(dim=1)
    levels = float(2**bits - 1)
    scale = levels / (mx - mn).clamp_min(1e-8)
    zp = torch.round(scale * mn) + float(2 ** (bits - 1))
    overflow = ~(
        torch.isfinite(scale)
        & (scale > 0)
        & torch.isfinite(scale * mn)
        & torch.isfinite(scale * mx)
        & torch.isfinite(zp)
    )
    if bool(bad_rows.any() | overflow.any()):
        rows = bad_rows.nonzero()
        if rows.numel():
            o = int(rows[0, 0])
            i = int(bad[o].nonzero()[0, 0])
            if original is not None and bool(torch.isfinite(original.reshape(flat.shape)[o, i])):
                raise WeightRangeError(
                    f"output channel {o}: a float64 value exceeds the float32 range "
                    "(squant-rs computes in float32)"
                )
            raise NonFiniteWeightError(
                f"weight contains NaN or infinity in output channel {o} "
                f"(element {i} of that channel)"
            )
        o = int(overflow.nonzero()[0, 0])
        raise WeightRangeError(
            f"output channel {o}: weight values too large to quantize in float32 "
            "(scale or zero point overflows)"
        )


def quantize_torch_tensor(
    w: torch.Tensor, bits: int, mode: str, backend: str, threads: int | None
) -> QuantizedTensor:
    from ._tensor import QuantizedTensor

    torch = require_torch()
    check_torch_weight(w)
    w = w.detach()
    use_torch = backend == "torch" or (backend == "auto" and w.device.type != "cpu")
    if use_torch:
        from ._torch_backend import quantize_torch

        def check() -> None:  # the error path only: raises for a bad weight
            _check_values_torch(w.to(torch.float32), bits, w if w.dtype == torch.float64 else None)

        # The backend flags suspect channels from the quantizer it computes
        # anyway and calls check() after its one host sync.
        codes, scale, zp, kf, cf = quantize_torch(w, bits, mode, check=check)
        return QuantizedTensor(codes, scale, zp, bits, mode, w.dtype, int(kf), int(cf))
    # A contiguous float32 CPU tensor is shared with numpy, not copied.
    arr = to_numpy_f32(w)
    codes_np, scale_np, zp_np, kf, cf = _native.quantize(arr, bits, mode, threads)
    codes = torch.from_numpy(codes_np).to(w.device)
    scale = torch.from_numpy(scale_np).to(w.device)
    zp = torch.from_numpy(zp_np).to(w.device)
    return QuantizedTensor(codes, scale, zp, bits, mode, w.dtype, int(kf), int(cf))


def dequantize_torch(qt: QuantizedTensor) -> torch.Tensor:
    import torch  # present: the codes are a tensor

    codes: torch.Tensor = qt.codes
    if codes.device.type == "cpu":
        # Same IEEE operations in the parallel Rust loop, on zero-copy views.
        out_np = _native.dequantize(codes.numpy(), qt.scale.numpy(), qt.zero_point.numpy())
        return cast_dequantized(torch.from_numpy(out_np), qt.dtype)
    view = (-1,) + (1,) * (codes.dim() - 1)
    out: torch.Tensor = (codes.to(torch.float32) + qt.zero_point.view(view)) / qt.scale.view(view)
    return cast_dequantized(out, qt.dtype)


def cast_dequantized(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 dequantized values in the weight's dtype. The grid's end
    points can lie slightly beyond the channel's range (the zero point is
    rounded), so for float16 they are clamped to its largest finite value
    instead of becoming infinities."""
    import torch

    if dtype == torch.float16:
        fmax = float(torch.finfo(torch.float16).max)
        out = out.clamp(-fmax, fmax)
    return out.to(dtype)


def to_numpy_f32(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 numpy view (or copy, when needed) of a tensor."""
    torch = require_torch()
    # Negative/conjugate views are lazy in torch; numpy needs real values.
    host = t.detach().to(device="cpu", dtype=torch.float32).resolve_neg().resolve_conj()
    return host.numpy()
