"""torch tensors in and out: routes to the Rust core (CPU) or to the
vectorized torch implementation (CUDA, or on request)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _squant_rs as _native
from ..errors import InvalidArgumentError, SquantError
from ..tensor.validate import (
    UnsupportedDtypeError,
    check_memory,
    check_shape,
    dtype_max,
    grid_error,
    physical_memory,
    value_error,
    with_weight_index,
)

if TYPE_CHECKING:
    import torch

    from ..tensor.quantized import QuantizedTensor


#: How to get torch: from a package index, or from a source checkout.
TORCH_INSTALL_HINT = (
    "pip install 'squant-rs[torch]' (from a source checkout: pip install '.[torch]')"
)


def require_torch() -> Any:
    """Import torch or explain how to get it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised without torch
        raise ImportError(f"this squant_rs feature needs PyTorch: {TORCH_INSTALL_HINT}") from exc
    return torch


def _float_dtypes(torch: Any) -> tuple[Any, ...]:
    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_torch_weight(w: torch.Tensor) -> None:
    torch = require_torch()
    if w.dtype is torch.float32 and w.is_cpu and w.layout is torch.strided and not w.is_nested:
        check_shape(w.shape)  # the common case, in short
        return
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


def _check_values_torch(
    w32: torch.Tensor,
    bits: int,
    original: torch.Tensor | None = None,
    quantizer: str = "asymmetric",
) -> None:
    """The Rust core's value checks, for the torch path: non-finite weights
    and channels whose quantizer (or dequantized grid) overflows float32.
    Raises the Rust path's error for the lowest channel with any problem
    (the rule of :mod:`squant_rs.tensor.validate`; ``original``: the float64
    weight ``w32`` was converted from); returns when there is none.  The
    backend calls it only when its own cheap test flags a channel."""
    torch = require_torch()
    flat = w32.reshape(w32.shape[0], -1)
    bad = ~torch.isfinite(flat)
    bad_rows = bad.any(dim=1)
    mx = flat.amax(dim=1)
    mn = flat.amin(dim=1)
    n = float(2 ** (bits - 1))
    # True division, as in the backend and the Rust core: torch evaluates
    # ``python_float / tensor`` as ``reciprocal() * c``, which is off where
    # the reciprocal is subnormal (weights near float32's limit).
    if quantizer == "symmetric":
        amax = torch.maximum(mx.abs(), mn.abs())
        scale = torch.div(torch.tensor(n - 1), amax.clamp_min(1e-8))
        zp = torch.zeros_like(scale)
    else:
        scale = torch.div(torch.tensor(float(2**bits - 1)), (mx - mn).clamp_min(1e-8))
        zp = torch.round(scale * mn) + n
    low = n - 1 if quantizer == "symmetric" else n  # -tmin
    reach = torch.maximum(((zp - low) / scale).abs(), ((zp + (n - 1)) / scale).abs())
    overflow = ~(
        torch.isfinite(scale)
        & (scale > 0)
        & torch.isfinite(scale * mn)
        & torch.isfinite(scale * mx)
        & torch.isfinite(zp)
        & torch.isfinite(reach)
    )
    problem = bad_rows | overflow
    if bool(problem.any()):
        # The rule of squant_rs.tensor.validate: the lowest channel with any
        # problem; in it NaN/inf, then a float64 overflow, then the range.
        o = int(problem.nonzero()[0, 0])
        if original is not None:
            orig_bad = ~torch.isfinite(original.reshape(flat.shape)[o])
            f64_big = bool((bad[o] & ~orig_bad).any())  # finite in float64 only
            row_bad = orig_bad
        else:
            f64_big = False
            row_bad = bad[o]
        index = int(row_bad.nonzero()[0, 0]) if bool(row_bad.any()) else None
        raise value_error(o, index, f64_big)


def check_grid_torch(scale: torch.Tensor, zp: torch.Tensor, bits: int, dtype: Any) -> None:
    """:func:`squant_rs.tensor.quantized.check_grid` for torch tensors."""
    torch = require_torch()
    fmax = dtype_max(dtype)
    n = float(2 ** (bits - 1))
    s32, z32 = scale.float(), zp.float()
    reach = ((z32 - n) / s32).abs().maximum(((z32 + (n - 1)) / s32).abs())
    ok = torch.isfinite(reach) & (s32 > 0)
    if fmax != math.inf:
        ok &= reach - torch.div(torch.tensor(1.0), s32) <= fmax  # as numpy's 1 / s
    if not bool(ok.all()):
        o = int((~ok).nonzero()[0, 0])
        raise grid_error(o, dtype, float(reach[o]), float(s32[o]), float(z32[o]))


#: Lower bound of the torch backend's working memory per element (float32
#: ``x``, ``r`` and their errors, and the codes): the up-front size check.
TORCH_BYTES_PER_ELEMENT = 9


def _device_memory(device: torch.device) -> tuple[int | None, str]:
    """Total memory of ``device`` in bytes (``None`` where unknown) and its name."""
    torch = require_torch()
    if device.type == "cpu":
        return physical_memory(), "this machine"
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), f"device {device}"
    return None, f"device {device}"


def check_torch_memory(w: torch.Tensor, use_torch: bool) -> None:
    """The up-front size check of every backend: ``MemoryError`` at once
    when the weight (e.g. a broadcast view) cannot fit the working memory."""
    if use_torch:
        available, where = _device_memory(w.device)
        check_memory(w.numel(), TORCH_BYTES_PER_ELEMENT, available, where)
    else:
        check_memory(w.numel(), 1, physical_memory(), "this machine")


def host_float32(
    w: torch.Tensor, bits: int | None = None, quantizer: str = "asymmetric"
) -> np.ndarray:
    """A CPU float32 numpy view (or copy) of a checked weight for the Rust
    core; float64 values beyond float32's range are a
    :class:`WeightRangeError`, as on the numpy path (``bits`` and
    ``quantizer``: see :func:`~squant_rs.tensor.quantized.to_float32`)."""
    torch = require_torch()
    if w.dtype == torch.float64:
        from ..tensor.quantized import to_float32

        host = w.detach().to("cpu").resolve_neg().resolve_conj()
        return to_float32(host.numpy(), bits, quantizer)
    return to_numpy_f32(w)


def quantize_torch_tensor(
    w: torch.Tensor,
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    quantizer: str = "asymmetric",
) -> QuantizedTensor:
    from ..tensor.quantized import QuantizedTensor, from_native, quantize_blocks

    torch = require_torch()
    check_torch_weight(w)
    w = w.detach()
    use_torch = backend == "torch" or (backend == "auto" and w.device.type != "cpu")
    check_torch_memory(w, use_torch)
    if use_torch:
        from .backend import quantize_torch

        def check() -> None:  # the error path only: raises for a bad weight
            _check_values_torch(
                w.to(torch.float32), bits, w if w.dtype == torch.float64 else None, quantizer
            )

        # The backend flags suspect channels from the quantizer it computes
        # anyway and calls check() after its one host sync.
        codes, scale, zp, kf, cf = quantize_torch(w, bits, mode, check=check, quantizer=quantizer)
        return QuantizedTensor(
            codes, scale, zp, bits, mode, w.dtype, int(kf), int(cf), True, quantizer=quantizer
        )
    if w.element_size() == 2:
        # float16 / bfloat16: converted a block of channels at a time.
        res = quantize_blocks(
            tuple(w.shape),
            lambda c0, c1: to_numpy_f32(w[c0:c1]),
            bits,
            mode,
            threads,
            quantizer,
        )
    else:
        # A contiguous float32 CPU tensor is shared with numpy, not copied.
        res = _native.quantize(host_float32(w, bits, quantizer), bits, mode, threads, quantizer)
    return from_native(res, bits, mode, w.dtype, w.device, quantizer)


# A batch is cut into passes of at most this many elements (a weight larger
# than that gets a pass of its own): beyond it launches no longer dominate,
# and the backend's scratch memory stays that of one large weight.
_MAX_PASS_ELEMENTS = 1 << 24


def quantize_torch_tensors(
    ws: list[torch.Tensor],
    bits: int,
    mode: str,
    indices: list[int],
    quantizer: str = "asymmetric",
) -> list[QuantizedTensor]:
    """``quantize_torch_tensor(w, bits, mode, "torch", None)`` for every
    ``w`` in ``ws``, in few passes of the torch backend.

    Output channels are quantized independently, so weights with the same
    device, dtype and trailing shape ``(IC, *kernel)`` are concatenated
    along dim 0 (one copy; the inputs are never modified), quantized in one
    pass with one host sync, and split again: the results are bit-identical
    to one call per weight, flip counts included (counted per weight).  A
    weight alone in its group takes the single-weight path.  Groups keep the
    order in which they first appear; a group is cut into passes of at most
    ``_MAX_PASS_ELEMENTS`` elements.

    ``bits`` and ``mode`` must be valid.  ``indices[i]`` is the position of
    ``ws[i]`` in the caller's list: errors are the single-weight ones with
    ``"weight {indices[i]}: "`` in front, for the weight with the lowest
    index that one call per weight would reject.  The codes, scale and zero
    point of a batched weight are views into its pass's outputs.
    """
    from ..tensor.quantized import QuantizedTensor
    from .backend import Launched, launch, settle

    torch = require_torch()
    if len(indices) != len(ws):
        raise ValueError(f"got {len(ws)} weights but {len(indices)} indices")
    ws = [w.detach() for w in ws]
    pending = set(range(len(ws)))  # weights whose values are not known good

    def check_values(positions: list[int]) -> None:
        """Raise the prefixed value error of the lowest-indexed bad weight
        in ``positions``; those found good are no longer pending."""
        for p in sorted(positions, key=indices.__getitem__):
            w = ws[p]
            with _prefix(indices[p]):
                _check_values_torch(
                    w.to(torch.float32), bits, w if w.dtype == torch.float64 else None, quantizer
                )
            pending.discard(p)

    by_index = sorted(range(len(ws)), key=indices.__getitem__)
    for j, p in enumerate(by_index):
        try:
            check_torch_weight(ws[p])
            check_torch_memory(ws[p], True)
        except (SquantError, UnsupportedDtypeError, MemoryError) as exc:
            # One call per weight would reject an earlier bad value first.
            check_values(by_index[:j])
            raise with_weight_index(exc, indices[p]) from None

    groups: dict[tuple[Any, ...], list[int]] = {}
    for p, w in enumerate(ws):
        groups.setdefault((w.device, w.dtype, tuple(w.shape[1:])), []).append(p)

    # Queue every pass, then read all their counts with one host copy per
    # device: the host keeps launching while the GPU works.
    runs: list[tuple[list[int], Launched, Callable[..., None]]] = []
    for ps in _passes(groups.values(), ws):

        def check(last: int = max(indices[p] for p in ps)) -> None:
            # Some channel of this pass is suspect: check its weights and the
            # pending ones of later passes with lower indices (the lowest bad
            # index wins); the results stand if all are good (a false alarm).
            check_values([p for p in pending if indices[p] <= last])

        if len(ps) == 1:
            run = launch(ws[ps[0]], bits, mode, None, check=check, quantizer=quantizer)
        else:
            both = torch.cat([ws[p] for p in ps])
            sizes = [int(ws[p].shape[0]) for p in ps]
            run = launch(both, bits, mode, sizes, check=check, quantizer=quantizer)
            del both
        runs.append((ps, run, check))
    counts = settle([run for _, run, _ in runs])
    for (ps, _, check), (_, _, suspect) in zip(runs, counts):
        if suspect:
            check()
        pending.difference_update(ps)

    out: list[QuantizedTensor | None] = [None] * len(ws)
    for (ps, run, _), (kfs, cfs, _) in zip(runs, counts):
        if len(ps) == 1:
            (p,) = ps
            out[p] = QuantizedTensor(
                run.codes,
                run.s,
                run.z,
                bits,
                mode,
                ws[p].dtype,
                int(kfs[0]),
                int(cfs[0]),
                True,
                quantizer=quantizer,
            )
            continue
        sizes = [int(ws[p].shape[0]) for p in ps]
        split = (torch.split(t, sizes) for t in (run.codes, run.s, run.z))
        for p, c, sc, z, kf, cf in zip(ps, *split, kfs, cfs):
            out[p] = QuantizedTensor(
                c,
                sc,
                z,
                bits,
                mode,
                ws[p].dtype,
                int(kf),
                int(cf),
                True,
                quantizer=quantizer,
            )
    return [qt for qt in out if qt is not None]


def _passes(groups: Iterable[list[int]], ws: list[torch.Tensor]) -> list[list[int]]:
    """Cut each group (positions in ``ws``) into runs of at most
    ``_MAX_PASS_ELEMENTS`` elements (a larger weight runs alone)."""
    passes: list[list[int]] = []
    for ps in groups:
        run: list[int] = []
        size = 0
        for p in ps:
            n = ws[p].numel()
            if run and size + n > _MAX_PASS_ELEMENTS:
                passes.append(run)
                run, size = [], 0
            run.append(p)
            size += n
        passes.append(run)
    return passes


@contextlib.contextmanager
def _prefix(index: int) -> Iterator[None]:
    """Re-raise squant errors with ``"weight {index}: "`` in front."""
    try:
        yield
    except (SquantError, UnsupportedDtypeError) as exc:
        raise with_weight_index(exc, index) from None


def dequantize_torch(qt: QuantizedTensor, threads: int) -> torch.Tensor:
    """:meth:`QuantizedTensor.dequantize` for torch codes (``threads``
    resolved, a hand-made instance checked): the Rust loop on CPU, one
    torch expression elsewhere."""
    import torch  # present: the codes are a tensor

    from ..tensor.quantized import BLOCK_ELEMENTS

    codes: torch.Tensor = qt.codes
    # A hand-made instance's scale may require grad: the values are the same.
    scale_t, zp_t = qt.scale.detach(), qt.zero_point.detach()
    if codes.device.type == "cpu":
        # Same IEEE operations in the parallel Rust loop, on zero-copy views
        # (a copy of a hand-made instance's negative view: numpy needs the
        # values themselves).
        codes_np, scale, zp = (
            t.resolve_neg().resolve_conj().numpy() for t in (codes, scale_t, zp_t)
        )
        if qt.dtype == torch.float32:
            return torch.from_numpy(_native.dequantize(codes_np, scale, zp, threads))
        # Other dtypes a block of channels at a time: one float32 block at most.
        out = torch.empty(codes.shape, dtype=qt.dtype)
        oc = int(codes.shape[0])
        per = max(1, BLOCK_ELEMENTS // max(1, codes.numel() // max(1, oc)))
        for c0 in range(0, oc, per):
            c1 = min(oc, c0 + per)
            block = _native.dequantize(codes_np[c0:c1], scale[c0:c1], zp[c0:c1], threads)
            out[c0:c1].copy_(_clamp_to(torch.from_numpy(block), qt.dtype))
        return out
    view = (-1,) + (1,) * (codes.dim() - 1)
    w_hat: torch.Tensor = (codes.to(torch.float32) + zp_t.view(view)) / scale_t.view(view)
    return _clamp_to(w_hat, qt.dtype).to(qt.dtype)


def _clamp_to(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values clamped in place to a narrower dtype's largest finite
    value: a grid end can lie up to a step beyond it (see ``check_grid``)."""
    fmax = dtype_max(dtype)
    return out if fmax == math.inf else out.clamp_(-fmax, fmax)


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
    if t.dtype is torch.float32 and t.is_cpu:
        # Already there (the common case): a negative view is the only lazy
        # state a real tensor can have.
        out: np.ndarray = t.detach().resolve_neg().numpy()
        return out
    # Negative/conjugate views are lazy in torch; numpy needs real values.
    host = t.detach().to(device="cpu", dtype=torch.float32).resolve_neg().resolve_conj()
    return host.numpy()
